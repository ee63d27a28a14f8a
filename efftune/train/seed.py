"""One call that makes `--seed` decide every random draw that follows it.

Called right before anything creates trainable weights (a method's attach, a library module's
LoRA), so that two processes given the same config start from the same adapter, bit for bit; the
training loop seeds torch again at its start, so the data order, dropout and the like do not depend
on how many numbers an attach happened to draw.
"""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and every CUDA device), Python's `random` and numpy's global generator."""
    torch.manual_seed(seed)  # seeds the CUDA generators too
    random.seed(seed)
    np.random.seed(seed % 2**32)  # numpy takes 32-bit seeds only

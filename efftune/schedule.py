"""Learning-rate schedules as plain functions of the step (so resuming needs only the step)."""
from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float = 0.1) -> float:
    """Multiplier of the peak LR: linear warmup over `warmup` steps, then cosine to `min_ratio`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def jagged_cosine(step: int, total: int, warmup: int, restart_every: int, rewarmup: int,
                  min_ratio: float = 0.1) -> float:
    """ReLoRA's schedule: warmup + cosine, and after each restart (every `restart_every` steps) a
    linear re-warmup over `rewarmup` steps from 0 back up to the cosine curve."""
    base = warmup_cosine(step, total, warmup, min_ratio)
    since = step % restart_every if restart_every > 0 else step
    if restart_every > 0 and step >= restart_every and since < rewarmup:
        return base * (since + 1) / (rewarmup + 1)
    return base

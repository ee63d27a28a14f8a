"""What a method may change in the training loop: `TrainHooks`, the named points where a method
(ReLoRA's restarts and warm start, ...) steps into `efftune.train.loop.train`.

It lives below the methods (not in `train/`) because a method exports its hooks with itself and
methods sit below the loop: the loop imports this interface, a method implements it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..schedule import warmup_cosine

if TYPE_CHECKING:
    from ..train.loop import TrainConfig


class TrainHooks:
    """The named points where a training mode (ReLoRA restarts, ...) changes the loop.

    The defaults are the plain loop: warmup + cosine learning rate, nothing after a step, no
    state beyond the trainable parameters.
    """

    keeps_base_weights = True  # False: the mode writes into frozen base weights (train.fp8_base refuses it)

    def parameters(self, model: nn.Module) -> list[torch.Tensor]:
        """The parameters the optimizer is built over (once, before the first step)."""
        return [p for p in model.parameters() if p.requires_grad]

    def lr_multiplier(self, step: int, config: "TrainConfig") -> float:
        return warmup_cosine(step, config.steps, config.warmup_steps, config.min_lr_ratio)

    def after_step(self, done: int, optimizer: torch.optim.Optimizer) -> dict:
        """Called after optimizer step number `done` (1-based); returns extra metrics to log."""
        return {}

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors a checkpoint must hold besides the trainable parameters."""
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

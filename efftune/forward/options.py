"""What a forward pass runs with: one small frozen object passed down with each call.

`target_logprobs(..., options=ForwardOptions(...))` (and the evaluators and `causal.plain_causal` /
`causal.masked_rows` below it) read the kernels and the head's mode from this argument, so a reader
of the call sees what the forward will do: nothing about it is kept on the model or its config, and
no module-level switch is flipped. `train()` builds its options from its config
(`TrainConfig.forward_options()`); the default is SDPA everywhere and an eager LM head.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError
from . import flash4, flex

ATTENTION_KERNELS = ("sdpa", "flash4")
MASKED_KERNELS = ("sdpa", "flex")


def check_attention_kernel(kernel: str, key: str = "train.attention") -> None:
    if kernel not in ATTENTION_KERNELS:
        raise ConfigError(f"{key} must be one of {', '.join(ATTENTION_KERNELS)}, got {kernel!r}")


def check_masked_attention(kernel: str, key: str = "train.masked_attention") -> None:
    if kernel not in MASKED_KERNELS:
        raise ConfigError(f"{key} must be one of {', '.join(MASKED_KERNELS)}, got {kernel!r}")


@dataclass(frozen=True)
class ForwardOptions:
    """`attention`: the kernel for rows that are one causal sequence each, no mask (`causal.plain_causal`):
    "sdpa" or "flash4" (FlashAttention-4; the flash-attn-4 package and a Hopper/Blackwell GPU; inputs the
    kernels do not take still go to SDPA). `masked_attention`: the kernel for rows with a boolean mask
    (packing, token trees; `causal.masked_rows`): "sdpa" or "flex" (FlexAttention; it trains on CUDA
    only, no attention dropout). `static_masks`: flex block masks kept in storage per shape, for blocks
    replayed as CUDA graphs (`flex.block_mask`; training forwards only). `fused_head`: the chunked LM
    head's softmax work runs compiled (`logprobs._fused`; what compiled blocks use). `keep_logit_grads`:
    a trainable LM head keeps its logit gradient from forward for backward instead of recomputing the
    logits (`logprobs.ChunkedTargetLogprob`: one matmul less a step for targets × vocabulary × 2 bytes;
    train() turns it on unless activation checkpointing says memory is what counts)."""

    attention: str = "sdpa"
    masked_attention: str = "sdpa"
    static_masks: bool = False
    fused_head: bool = False
    keep_logit_grads: bool = False

    def __post_init__(self):
        check_attention_kernel(self.attention, "ForwardOptions.attention")
        check_masked_attention(self.masked_attention, "ForwardOptions.masked_attention")

    def check(self, model: nn.Module, prefix: str = "") -> None:
        """A ConfigError (its key prefixed by `prefix`, e.g. "train.") when `model` cannot train with
        these kernels: flash4 or flex unavailable on its device, flex with attention dropout."""
        if self.attention == "flash4":
            reason = flash4.unavailable_reason(next(model.parameters()).device)
            if reason:
                raise ConfigError(f"{prefix}attention: flash4 {reason}")
        if self.masked_attention == "flex":
            reason = flex.unavailable_reason(next(model.parameters()).device)
            if reason:
                raise ConfigError(f"{prefix}masked_attention: flex {reason}")
            if getattr(getattr(model, "config", None), "attention_dropout", 0.0):
                raise ConfigError(f"{prefix}masked_attention: flex has no attention dropout, and the model's "
                                  f"config.attention_dropout is {model.config.attention_dropout}")


DEFAULT = ForwardOptions()

"""Forward passes over plain causal rows without transformers' mask preparation.

Given no attention mask, transformers still inspects the position ids for packed sequences, and
that check (`find_packed_sequence_indices`) reads a GPU value on the host: one synchronisation per
forward. After it the CPU launches the embedding, the rotary tables and the loss just in time,
and the GPU waits on each launch (1% of an 8B training step, 2% at 1B, measured in
bench/RESULTS.md). When efftune knows the rows are plain causal sequences — no mask, positions
left to the model — it runs the model under an attention implementation of its own,
`efftune_plain_causal`: transformers' SDPA function itself, registered under a name that has no
mask function, so mask preparation ends at once and SDPA runs with `is_causal`.

Only for model types whose mask is exactly causal over full attention (no sliding windows, no
chunked or bidirectional parts), only when the model's attention is sdpa, and only around a plain
transformers body (not one wrapped by prefix tuning, whose cached prefix needs a real mask).

`set_attention_kernel(model, "flash4")` makes this path run FlashAttention-4 (`flash4.py`, an
optional package) instead of SDPA: `efftune_plain_causal_flash4`, the same contract. Inputs the
kernels do not take (fp32, other head sizes, attention dropout while training) still go to SDPA.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..errors import ConfigError, EfftuneError
from . import flash4

PLAIN_CAUSAL = "efftune_plain_causal"
PLAIN_CAUSAL_FLASH4 = "efftune_plain_causal_flash4"
ATTENTION_KERNELS = ("sdpa", "flash4")
PLAIN_CAUSAL_MODEL_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "olmo", "olmo2", "olmoe",
    "granite", "granitemoe", "phi3"})


def _require_plain(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
    if attention_mask is not None or query.shape[-2] != key.shape[-2]:  # a cache or a mask: not ours to run
        raise EfftuneError("efftune_plain_causal attention got a mask or cached keys; it serves only "
                           "maskless forwards over whole sequences")


def _plain_causal_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    _require_plain(query, key, attention_mask)
    return sdpa_attention_forward(module, query, key, value, None, **kwargs)


def _plain_causal_flash4(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         **kwargs):
    _require_plain(query, key, attention_mask)
    if dropout or not flash4.supports(query, key):
        return _plain_causal_sdpa(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return flash4.causal_attention(query, key, value, scale), None


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface
    AttentionInterface.register(PLAIN_CAUSAL, _plain_causal_sdpa)
    AttentionInterface.register(PLAIN_CAUSAL_FLASH4, _plain_causal_flash4)


def check_attention_kernel(kernel: str) -> None:
    if kernel not in ATTENTION_KERNELS:
        raise ConfigError(f"train.attention must be one of {', '.join(ATTENTION_KERNELS)}, got {kernel!r}")


def set_attention_kernel(model: nn.Module, kernel: str) -> None:
    """Which kernel runs `model`'s maskless causal forwards (`plain_causal`): "sdpa", the default,
    or "flash4" (FlashAttention-4; needs the flash-attn-4 package and a Hopper/Blackwell GPU)."""
    check_attention_kernel(kernel)
    if kernel == "flash4":
        device = next(model.parameters()).device
        reason = flash4.unavailable_reason(device)
        if reason:
            raise ConfigError(f"train.attention: flash4 {reason}")
    model._efftune_attention_kernel = kernel


def attention_kernel(model: nn.Module) -> str:
    """The kernel `set_attention_kernel` chose for `model` ("sdpa" until then)."""
    return getattr(model, "_efftune_attention_kernel", "sdpa")


def qualifies(model: nn.Module) -> bool:
    """Whether `model`'s own mask over maskless rows would be plain causal SDPA."""
    from transformers import PreTrainedModel
    config = getattr(model, "config", None)
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if config is None or getattr(config, "model_type", None) not in PLAIN_CAUSAL_MODEL_TYPES \
            or getattr(config, "_attn_implementation", None) != "sdpa" \
            or not isinstance(model, PreTrainedModel) or not isinstance(body, PreTrainedModel):
        return False
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return False
    return not (getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True))


@contextmanager
def plain_causal(model: nn.Module, position_ids: torch.Tensor | None,
                 attention_mask: torch.Tensor | None) -> Iterator[None]:
    """Within the block, `model` runs under `efftune_plain_causal` when that is exact: no mask, no
    position ids (the model counts from 0), and a qualifying model; otherwise nothing changes."""
    if position_ids is not None or attention_mask is not None or not qualifies(model):
        yield
        return
    _register()
    config = model.config
    config._attn_implementation = PLAIN_CAUSAL_FLASH4 if attention_kernel(model) == "flash4" else PLAIN_CAUSAL
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"

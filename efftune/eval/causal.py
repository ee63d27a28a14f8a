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

Rows with a mask (packed sequences, token trees) go to SDPA with the mask, or, after
`set_masked_attention(model, "flex")`, to FlexAttention (`flex.py`): `masked_rows` turns the
boolean mask into a block mask once per forward and runs the model under `efftune_masked_flex`.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..errors import ConfigError, EfftuneError
from . import flash4, flex

PLAIN_CAUSAL = "efftune_plain_causal"
PLAIN_CAUSAL_FLASH4 = "efftune_plain_causal_flash4"
MASKED_FLEX = "efftune_masked_flex"
ATTENTION_KERNELS = ("sdpa", "flash4")
MASKED_KERNELS = ("sdpa", "flex")
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


def _masked_flex(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    from torch.nn.attention.flex_attention import BlockMask
    if not isinstance(attention_mask, BlockMask) or query.shape[-2] != key.shape[-2] or dropout:
        raise EfftuneError("efftune_masked_flex attention serves only forwards over whole masked rows "
                           "(a block mask from masked_rows, no cache, no attention dropout)")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return flex.attention(query, key, value, attention_mask, scale), None


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface
    AttentionInterface.register(PLAIN_CAUSAL, _plain_causal_sdpa)
    AttentionInterface.register(PLAIN_CAUSAL_FLASH4, _plain_causal_flash4)
    AttentionInterface.register(MASKED_FLEX, _masked_flex)


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


def check_masked_attention(kernel: str) -> None:
    if kernel not in MASKED_KERNELS:
        raise ConfigError(f"train.masked_attention must be one of {', '.join(MASKED_KERNELS)}, got {kernel!r}")


def set_masked_attention(model: nn.Module, kernel: str, static_masks: bool = False) -> None:
    """Which kernel runs `model`'s forwards over rows with a mask (packing, token trees; `masked_rows`):
    "sdpa", the default, or "flex" (FlexAttention; CUDA only, no attention dropout). `static_masks`:
    block masks in storage kept per shape, for blocks replayed as CUDA graphs (`flex.block_mask`)."""
    check_masked_attention(kernel)
    if kernel == "flex":
        reason = flex.unavailable_reason(next(model.parameters()).device)
        if reason:
            raise ConfigError(f"train.masked_attention: flex {reason}")
        if getattr(getattr(model, "config", None), "attention_dropout", 0.0):
            raise ConfigError("train.masked_attention: flex has no attention dropout, and the model's "
                              f"config.attention_dropout is {model.config.attention_dropout}")
    model._efftune_masked_attention = kernel
    model._efftune_static_block_masks = static_masks


def masked_attention(model: nn.Module) -> str:
    """The kernel `set_masked_attention` chose for `model` ("sdpa" until then)."""
    return getattr(model, "_efftune_masked_attention", "sdpa")


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
    with _running_under(model, PLAIN_CAUSAL_FLASH4 if attention_kernel(model) == "flash4" else PLAIN_CAUSAL):
        yield


@contextmanager
def masked_rows(model: nn.Module, attention_mask: torch.Tensor | None) -> Iterator[object]:
    """Yields the mask to pass to `model` for rows with this boolean mask (rows, 1, queries, keys):
    with "flex" chosen (`set_masked_attention`) and a qualifying model whose heads the kernels take, its
    block mask, with `model` running under `efftune_masked_flex` within the block; otherwise the mask
    itself, nothing changed."""
    if attention_mask is None or attention_mask.dtype != torch.bool or masked_attention(model) != "flex" \
            or not qualifies(model) or not flex.supports(model):
        yield attention_mask
        return
    # static storage for training forwards only: evaluations come in many shapes and run no graphs
    static = getattr(model, "_efftune_static_block_masks", False) and torch.is_grad_enabled()
    block = flex.block_mask(attention_mask, static=static)
    with _running_under(model, MASKED_FLEX):
        yield block


@contextmanager
def _running_under(model: nn.Module, implementation: str) -> Iterator[None]:
    """`model` runs under one of efftune's registered attention functions within the block (a
    qualifying model's own implementation is sdpa, which is put back)."""
    _register()
    config = model.config
    config._attn_implementation = implementation
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"

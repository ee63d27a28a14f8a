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

`ForwardOptions(attention="flash4")` (`options.py`, passed with the call) makes this path run
FlashAttention-4 (`flash4.py`, an optional package) instead of SDPA: `efftune_plain_causal_flash4`,
the same contract. Inputs the kernels do not take (fp32, other head sizes, attention dropout while
training) still go to SDPA.

Rows with a mask (packed sequences, token trees) go to SDPA with the mask, or, with
`ForwardOptions(masked_attention="flex")`, to FlexAttention (`flex.py`): `masked_rows` turns the
boolean mask into a block mask once per forward and runs the model under `efftune_masked_flex`.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..errors import EfftuneError
from . import flash4, flex
from .options import DEFAULT, ForwardOptions

PLAIN_CAUSAL = "efftune_plain_causal"
PLAIN_CAUSAL_FLASH4 = "efftune_plain_causal_flash4"
MASKED_FLEX = "efftune_masked_flex"
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
def plain_causal(model: nn.Module, position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                 options: ForwardOptions = DEFAULT) -> Iterator[None]:
    """Within the block, `model` runs under `efftune_plain_causal` (`efftune_plain_causal_flash4` with
    `options.attention` "flash4") when that is exact: no mask, no position ids (the model counts from
    0), and a qualifying model; otherwise nothing changes."""
    if position_ids is not None or attention_mask is not None or not qualifies(model):
        yield
        return
    with _running_under(model, PLAIN_CAUSAL_FLASH4 if options.attention == "flash4" else PLAIN_CAUSAL):
        yield


@contextmanager
def masked_rows(model: nn.Module, attention_mask: torch.Tensor | None,
                options: ForwardOptions = DEFAULT) -> Iterator[object]:
    """Yields the mask to pass to `model` for rows with this boolean mask (rows, 1, queries, keys):
    with `options.masked_attention` "flex" and a qualifying model whose heads the kernels take, its
    block mask, with `model` running under `efftune_masked_flex` within the block; otherwise the mask
    itself, nothing changed."""
    if attention_mask is None or attention_mask.dtype != torch.bool or options.masked_attention != "flex" \
            or not qualifies(model) or not flex.supports(model):
        yield attention_mask
        return
    # static storage for training forwards only: evaluations come in many shapes and run no graphs
    static = options.static_masks and torch.is_grad_enabled()
    block = flex.block_mask(attention_mask, static=static)
    with _running_under(model, MASKED_FLEX):
        yield block


@contextmanager
def _running_under(model: nn.Module, implementation: str) -> Iterator[None]:
    """`model` runs under one of efftune's registered attention functions within the block; its own
    implementation (sdpa, for a qualifying model) is back when the block ends, however it ends.

    The one place efftune writes to a model's config, and only for the span of one forward:
    transformers (checked 5.17 and 5.25) picks both the attention function (each attention module's
    `ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, ...)`) and the mask
    preparation (`masking_utils.create_causal_mask`) from `config._attn_implementation` alone; no
    forward argument chooses them per call."""
    _register()
    config = model.config
    own = config._attn_implementation
    config._attn_implementation = implementation
    try:
        yield
    finally:
        config._attn_implementation = own

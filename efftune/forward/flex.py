"""FlexAttention for rows with a mask: packed sequences and token trees (`train.masked_attention: flex`).

efftune's rows carry a boolean mask (`efftune.data.layout.collate`: a token attends to the earlier
tokens of its own segment and to its ancestors' tokens). SDPA given such a mask runs every
(query, key) block, masked or not, in a kernel that takes arbitrary masks. FlexAttention
(`torch.nn.attention.flex_attention`) first summarises the mask per 128 × 128 block, then skips
the empty blocks and runs the full ones without reading the mask: on an H100 at Llama-3-8B's
attention shape, forward + backward over one 4,096-token row takes 0.74 ms packed (8 documents)
and 0.92 ms as a tree, against 3.2 ms for SDPA with the mask (bench/RESULTS.md, session 11).

The dense mask stays the single description of which token sees which: `block_mask` reads it
(its `mask_mod` indexes the tensor), so every layout `collate` can build runs here unchanged.
FlexAttention's backward runs on CUDA only, and its kernels are compiled by `torch.compile`.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor


def unavailable_reason(device: torch.device) -> str | None:
    """Why FlexAttention cannot train on `device` (None: it can)."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return f"needs torch.nn.attention.flex_attention (torch >= 2.5), this torch is {torch.__version__}"
    if device.type != "cuda":
        return f"needs a CUDA device (FlexAttention has no backward on {device.type})"
    return None


BLOCK = 128  # FlexAttention's default block size
MIN_HEAD_DIM = 16  # FlexAttention's kernels take no smaller head


def supports(model) -> bool:
    """Whether FlexAttention's kernels take `model`'s attention heads."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return head_dim >= MIN_HEAD_DIM


_TENSORS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks", "q_indices",
            "full_q_num_blocks", "full_q_indices")
_STATIC: dict[tuple, tuple[Tensor, object]] = {}  # (device, mask shape) -> (dense mask buffer, its BlockMask)


def block_mask(mask: Tensor, static: bool = False):
    """The FlexAttention BlockMask of a boolean mask (rows, 1, queries, keys), True = may attend.

    Built from the dense mask with a few tensor ops (which blocks are empty, full or partial)
    instead of `create_block_mask`, which evaluates a mask function over every entry again
    (about 10 ms a 4,096-token row on an H100).

    `static`: the result lives in storage kept per mask shape, refilled by each call, because CUDA
    graphs take a block mask's tensors as fixed addresses and record again whenever they move (the
    graphed step ran at half speed). So a static block mask holds only the latest mask of its shape:
    run each forward's backward before the next forward (the training loop does)."""
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"expected a boolean mask (rows, 1, queries, keys), got {mask.dtype} {tuple(mask.shape)}")
    rows, _, queries, keys = mask.shape
    nq, nk = -(-queries // BLOCK), -(-keys // BLOCK)
    whole = mask
    if (nq * BLOCK, nk * BLOCK) != (queries, keys):  # whole blocks, so the mask function never reads past the end
        whole = mask.new_zeros(rows, 1, nq * BLOCK, nk * BLOCK)
        whole[..., :queries, :keys] = mask
    if not static:
        return _from_dense(whole, queries, keys)
    key = (mask.device, tuple(mask.shape))
    if key not in _STATIC:
        dense = whole.clone()
        _STATIC[key] = dense, _from_dense(dense, queries, keys)
        return _STATIC[key][1]
    dense, kept = _STATIC[key]
    dense.copy_(whole)
    fresh = _from_dense(dense, queries, keys)
    for name in _TENSORS:
        getattr(kept, name).copy_(getattr(fresh, name))
    return kept


def _from_dense(mask: Tensor, queries: int, keys: int):
    """block_mask's work on a mask of whole blocks; the mask function reads `mask` itself."""
    from torch.nn.attention.flex_attention import BlockMask
    rows, nq, nk = mask.shape[0], mask.shape[2] // BLOCK, mask.shape[3] // BLOCK
    blocks = mask.view(rows, 1, nq, BLOCK, nk, BLOCK)
    full = blocks.all(5).all(3)  # (rows, 1, nq, nk)
    partial = blocks.any(5).any(3) & ~full

    def listed(chosen: Tensor) -> tuple[Tensor, Tensor]:  # per query block: how many, and which first
        order = torch.argsort((~chosen).to(torch.int8), dim=-1, stable=True)
        return chosen.sum(-1, dtype=torch.int32), order.to(torch.int32)

    def allowed(b, h, q, kv):
        return mask[b, 0, q, kv]
    return BlockMask.from_kv_blocks(*listed(partial), *listed(full), BLOCK_SIZE=BLOCK, mask_mod=allowed,
                                    seq_lengths=(queries, keys))


@functools.cache
def _compiled():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention)


def attention(query: Tensor, key: Tensor, value: Tensor, mask, scale: float) -> Tensor:
    """query (B, H, T, D), key/value (B, H_kv, T, D) -> (B, T, H, D), the layout transformers' attention
    functions return. Under torch.compile (compiled blocks) the call is traced into the block's graph;
    otherwise it runs through its own compiled function (uncompiled FlexAttention materialises every score)."""
    from torch.nn.attention.flex_attention import flex_attention
    fn = flex_attention if torch.compiler.is_compiling() else _compiled()
    out = fn(query, key, value, block_mask=mask, scale=scale, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous()

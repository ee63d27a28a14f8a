"""Frozen weights of sibling linears stored as the rows of one matrix, with spare rows after them.

Why: the MLP's input gradient `dx = dg W_g + du W_u + dz Â` runs as three GEMMs that accumulate
onto one output, each reading that output back while its tensor cores run. With W_g, W_u and the
stacked LoRA factors Â as consecutive rows of one matrix, the same sum is one plain GEMM over the
side-by-side gradients [dg | du | dz]; forward's `[g0 | u0 | z] = x [W_g; W_u; Â]ᵀ` is one GEMM too.
The spare rows take Â, written by the op that multiplies, right before each use. In isolation at
full clock the GEMMs take about as long either way; in the 8B training step, which the GPU's power
limit holds, the step needs 4% fewer joules and runs 1.2% faster (bench/RESULTS.md, session 9).

Each weight stays an ordinary contiguous parameter, now a view into the shared matrix: state dicts,
in-place merging and peft files see no difference. The spare rows are a view too, and the owner of a
packing keeps it (a non-persistent buffer): it is the packing's token, passed to the ops as a
tensor (a graph input under torch.compile, so blocks that differ only in where their weights live
share one compiled graph), and spare rows are only ever written where `pack_rows` made them, never
merely after weights that happen to sit next to each other. Anything that gives a weight storage of
its own (`.to()` into another dtype or device, `train.fp8_base`) ends the packing, `matrix` then
says so, and the ops multiply member by member instead, with the same result. `unpack` gives every
weight its own storage again: transformers' `save_pretrained` would take weights that share storage
for tied ones.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from torch.utils.flop_counter import register_flop_formula

from ...quantize.operands import gemm_flops, materialize, out_features, split
from .ops import _LIB, column_slices, linears_input_grad


def matrix(weights: Sequence[Tensor], spare: Tensor | None, rows: int) -> Tensor | None:
    """The matrix [w_0; …; w_{m-1}; `rows` spare rows] when the weights are consecutive rows of the
    packing that `spare` (from `pack_rows`) belongs to, in order, and it has that many spare rows;
    else None. The result has a version counter of its own, so writing its spare rows does not look
    like a change to a weight that autograd saved."""
    if spare is None or not weights or spare.dim() != 2 or spare.shape[0] < rows \
            or any(type(w.data) is not Tensor for w in weights):  # sharded (FSDP's DTensors): no storage to share
        return None
    first, address = weights[0], spare.untyped_storage().data_ptr()
    cols, offset = spare.shape[1], weights[0].storage_offset()
    for w in weights:
        if (w.dim() != 2 or w.shape[1] != cols or not w.is_contiguous() or w.dtype != spare.dtype
                or w.untyped_storage().data_ptr() != address or w.storage_offset() != offset):
            return None
        offset += w.numel()
    if offset != spare.storage_offset() or not spare.is_contiguous():
        return None
    return first.data.as_strided(((offset - first.storage_offset()) // cols + rows, cols), (cols, 1),
                                 first.storage_offset())


def pack_rows(linears: Sequence[nn.Linear], spare: int) -> Tensor | None:
    """Store the linears' frozen weights as consecutive rows of one new matrix with `spare` rows
    after them (zeros until an op writes them). Returns the spare rows, the packing's token for
    `matrix` and the ops; None (and nothing changes) where the weights cannot share one matrix:
    different input sizes, dtypes or devices, a weight that trains, or one that is not a plain
    dense tensor."""
    weights = [layer.weight for layer in linears]
    first = weights[0]
    if any(w.dim() != 2 or w.shape[1] != first.shape[1] or w.dtype != first.dtype or w.device != first.device
           or w.requires_grad or w.layout != torch.strided or w.is_meta or type(w.data) is not Tensor
           for w in weights):
        return None
    rows = sum(w.shape[0] for w in weights)
    shared = torch.zeros(rows + spare, first.shape[1], dtype=first.dtype, device=first.device)
    start = 0
    with torch.no_grad():
        for layer in linears:
            n = layer.weight.shape[0]
            shared[start:start + n].copy_(layer.weight)
            layer.weight.data = shared[start:start + n]
            start += n
    return shared[rows:]


def owns_storage(t: Tensor) -> bool:
    """Whether t is all of its storage (not, say, one weight of a packing)."""
    return t.untyped_storage().nbytes() == t.numel() * t.element_size()


def unpack(linears: Sequence[nn.Linear]) -> None:
    """Give each linear's weight storage of its own (a copy; a weight already alone is left as is)."""
    with torch.no_grad():
        for layer in linears:
            if not owns_storage(layer.weight):
                layer.weight.data = layer.weight.data.clone()


# The ops that multiply by a packing: opaque to torch.compile, which must not see the spare rows'
# write. Both take the blocks as the caller would stack them, so a weight that left its packing
# costs speed, never correctness.

# `weights` may be quantised ones, as their kinds' tensors (`quantize.operands`): those are never
# packed, and each is dequantised right before its own GEMM.
_LIB.define("rows_mm(Tensor x, Tensor[] weights, Tensor extra, Tensor? spare, str[]? kinds=None) -> Tensor")
_LIB.define("rows_grad(Tensor d, Tensor[] weights, Tensor extra, Tensor? spare, str[]? kinds=None) -> Tensor")


ROW_ALIGN = 64  # elements: the ops' outputs get row strides of whole 128-byte lines (bf16)


def aligned_rows(rows: int, cols: int, like: Tensor) -> Tensor:
    """An uninitialised (rows, cols) matrix whose row stride is rounded up to ROW_ALIGN elements: a
    kernel that walks its column blocks row by row then never straddles two cache lines per segment
    (about 4% of the SwiGLU passes' time at 8B shapes, where the plain width is 28,704)."""
    return like.new_empty(rows, aligned_stride(cols))[:, :cols]


def aligned_stride(cols: int) -> int:
    """The row stride `aligned_rows` gives a matrix of `cols` columns."""
    return -(-cols // ROW_ALIGN) * ROW_ALIGN


def _filled(weights: list[Tensor], extra: Tensor, spare: Tensor | None, kinds: Sequence[str] | None) -> Tensor | None:
    """The packed matrix [w_0; …; w_{m-1}; extra], extra just written into the spare rows; None
    where the weights are not packed with `spare` (or are quantised)."""
    if kinds:
        return None
    full = matrix(weights, spare, extra.shape[0])
    if full is not None:
        full[full.shape[0] - extra.shape[0]:].copy_(extra)
    return full


def rows_mm(x: Tensor, weights: list[Tensor], extra: Tensor, spare: Tensor | None,
            kinds: Sequence[str] | None = None) -> Tensor:
    """x [w_0; …; w_{m-1}; extra]ᵀ, shape (N, Σ out_i + rows of extra), row stride aligned
    (`aligned_rows`): one GEMM where the weights are packed with `spare` (extra goes into the spare
    rows), else one per block into its columns."""
    members = split(weights, kinds)
    widths = [out_features(kind, w) for kind, w in members] + [extra.shape[0]]
    out = aligned_rows(x.shape[0], sum(widths), x)
    full = _filled(weights, extra, spare, kinds)
    if full is not None:
        return torch.mm(x, full.t(), out=out)
    *cols, extra_cols = column_slices(widths)
    for (kind, w), c in zip(members, cols):
        torch.mm(x, materialize(kind, w, x.dtype).t(), out=out[:, c])
    torch.mm(x, extra.t(), out=out[:, extra_cols])
    return out


def rows_grad(d: Tensor, weights: list[Tensor], extra: Tensor, spare: Tensor | None,
              kinds: Sequence[str] | None = None) -> Tensor:
    """d [w_0; …; w_{m-1}; extra] for d (N, Σ out_i + rows of extra): rows_mm's input gradient. One
    plain GEMM over a packing; else `ops.linears_input_grad` (the extra term first, each
    weight's GEMM accumulating onto it)."""
    full = _filled(weights, extra, spare, kinds)
    if full is not None:
        return d @ full
    *cols, extra_cols = column_slices([out_features(k, w) for k, w in split(weights, kinds)] + [extra.shape[0]])
    return linears_input_grad(d[:, extra_cols], extra, [d[:, c] for c in cols], weights, kinds)


_LIB.impl("rows_mm", rows_mm, "CompositeExplicitAutograd")
_LIB.impl("rows_grad", rows_grad, "CompositeExplicitAutograd")


@register_flop_formula([torch.ops.efftune.rows_mm, torch.ops.efftune.rows_grad], get_raw=True)
def _(x, weights, extra, spare, kinds=None, out_val=None, **_):  # x: rows_mm's input or rows_grad's d
    return gemm_flops(x.shape[0], weights, kinds) + gemm_flops(x.shape[0], [extra], None)


@torch.library.register_fake("efftune::rows_mm", lib=_LIB)
def _(x, weights, extra, spare, kinds=None):
    return aligned_rows(x.shape[0], sum(out_features(k, w) for k, w in split(weights, kinds)) + extra.shape[0], x)


@torch.library.register_fake("efftune::rows_grad", lib=_LIB)
def _(d, weights, extra, spare, kinds=None):
    return d.new_empty(d.shape[0], extra.shape[1])

"""One op for LoRA linears that read the same input: `y_i = x W_iᵀ + b_i + (x Â_iᵀ) B_iᵀ`, with
`Â_i = s_i A_i` (the caller scales and stacks the A factors; autograd carries the scale back).

Why an op of its own (`efftune::lora_linears`, opaque to torch.compile):
- The LoRA update is computed first and the frozen GEMM then adds onto it in place
  (`addmm_`, beta = 1). cuBLAS reads the update inside the compute-bound GEMM, so the sum is
  materialised once, where Inductor would write the update, write the base output and read both
  back in the next pointwise kernel (and, for SwiGLU, write the sums again to keep them).
  Inductor rewrites a visible `addmm` into `mm` + add, hence the opaque op.
- Backward does the same for the input gradient: `dx = dz Â + Σ dy_i W_i`, accumulated by
  in-place GEMMs instead of separate outputs summed afterwards. `dÂ = dzᵀ x` stays outside the
  op, a plain matmul Inductor can see: x is then needed by that matmul alone, and torch.compile's
  recomputation of x (an RMSNorm output, or SwiGLU's `silu(g) * u`) fuses into the backward kernel
  that already reads the same inputs instead of running as a pass of its own.
- Siblings that read one x (q/k/v, gate/up) share one GEMM for their stacked A factors, so x is
  read once forward and once for `dÂ` backward.
No gradient is ever formed for the frozen weights. The ops are registered with `torch.library`
directly (not `custom_op`, whose Python dispatch costs about 0.1 ms a call, which a compiled step
without CUDA graphs pays on the host) and run on any device and dtype; tensors come in one
compute dtype (the caller casts, as autocast would). `LoraLinears` gives them autograd.

A frozen weight may be quantised (NF4, int8: `efftune.quantize`): the ops take each weight as a kind
and its tensors (`quantize.operands`: one flat `weights` list plus `kinds`) and dequantise one
weight at a time in the compute dtype right before its GEMM, in forward and again for the input
gradient. Nothing keeps the dense copy, and torch.compile cannot see it to keep it, so a quantised
base runs the same fused path as a bf16 one with no dense copy of more than one layer alive.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ...quantize.operands import gemm_flops, materialize, out_features, split

_LIB = torch.library.Library("efftune", "DEF")
_LIB.define("lora_linears(Tensor x, Tensor[] weights, Tensor?[] biases, Tensor a, Tensor[] bs, "
            "str[]? kinds=None) -> Tensor[]")
_LIB.define("lora_linears_backward(Tensor[] dys, Tensor[] weights, Tensor a, Tensor[] bs, Tensor z, "
            "bool need_dx, str[]? kinds=None) -> Tensor[]")
_LIB.define("lora_output(Tensor x, Tensor[] weights, Tensor? bias, Tensor z, Tensor b, str[]? kinds=None) -> Tensor")


def column_slices(widths: Sequence[int]) -> list[slice]:
    """The column ranges of blocks of these widths placed side by side."""
    out, start = [], 0
    for width in widths:
        out.append(slice(start, start + width))
        start += width
    return out


def _rank_slices(bs: Sequence[Tensor]) -> list[slice]:
    return column_slices([b.shape[1] for b in bs])


def linears_forward(x: Tensor, weights: list[Tensor], biases: list[Tensor | None], a: Tensor,
                    bs: list[Tensor], kinds: Sequence[str] | None = None) -> list[Tensor]:
    """x (N, in); weights[i] (out_i, in), or the tensors of each weight's kind (`kinds`, module
    docstring); a: the stacked, scaled A factors (Σr, in); bs[i] (out_i, r_i).
    Returns [y_0, …, y_{m-1}, z] with z = x aᵀ (N, Σr), kept for backward."""
    z = x @ a.t()
    outs = [lora_output(x, materialize(kind, w, x.dtype), bias, z[:, cols], b)
            for (kind, w), bias, b, cols in zip(split(weights, kinds), biases, bs, _rank_slices(bs))]
    return outs + [z]


def lora_output(x: Tensor, weight: Tensor, bias: Tensor | None, z: Tensor, b: Tensor) -> Tensor:
    """x Wᵀ + bias + z bᵀ: the update first, and the frozen GEMM accumulates onto it."""
    y = z @ b.t()
    if bias is not None:
        y += bias
    return y.addmm_(x, weight.t())


def lora_output_op(x: Tensor, weights: list[Tensor], bias: Tensor | None, z: Tensor, b: Tensor,
                   kinds: Sequence[str] | None = None) -> Tensor:
    """`lora_output` for one weight given as its kind's tensors (the op `efftune::lora_output`)."""
    ((kind, w),) = split(weights, kinds)
    return lora_output(x, materialize(kind, w, x.dtype), bias, z, b)


def linears_backward(dys: list[Tensor], weights: list[Tensor], a: Tensor, bs: list[Tensor], z: Tensor,
                     need_dx: bool, kinds: Sequence[str] | None = None) -> list[Tensor]:
    """Returns [dx (an empty tensor when not needed), dz, db_0, …]; the caller makes `da = dzᵀ x`."""
    dbs = [dy.t() @ z[:, cols] for dy, cols in zip(dys, _rank_slices(bs))]
    dz = torch.empty_like(z)
    for dy, b, cols in zip(dys, bs, _rank_slices(bs)):
        torch.mm(dy, b, out=dz[:, cols])  # straight into its columns: no concatenation pass
    dx = linears_input_grad(dz, a, dys, weights, kinds) if need_dx else dz.new_empty(0)
    return [dx, dz] + dbs


def linears_input_grad(dz: Tensor, a: Tensor, dys: list[Tensor], weights: list[Tensor],
                       kinds: Sequence[str] | None = None) -> Tensor:
    """dx = dz a + Σ dy_i W_i, the frozen GEMMs accumulating in place onto the LoRA term (a quantised
    W_i dequantised again, one at a time)."""
    dx = dz @ a
    for dy, (kind, w) in zip(dys, split(weights, kinds)):
        dx.addmm_(dy, materialize(kind, w, dz.dtype))
    return dx


_LIB.impl("lora_linears", linears_forward, "CompositeExplicitAutograd")
_LIB.impl("lora_linears_backward", linears_backward, "CompositeExplicitAutograd")
_LIB.impl("lora_output", lora_output_op, "CompositeExplicitAutograd")


@torch.library.register_fake("efftune::lora_linears", lib=_LIB)
def _(x, weights, biases, a, bs, kinds=None):
    outs = [x.new_empty(x.shape[0], out_features(kind, w)) for kind, w in split(weights, kinds)]
    return outs + [x.new_empty(x.shape[0], a.shape[0])]


@torch.library.register_fake("efftune::lora_linears_backward", lib=_LIB)
def _(dys, weights, a, bs, z, need_dx, kinds=None):
    dx = z.new_empty(z.shape[0], a.shape[1]) if need_dx else z.new_empty(0)
    return [dx, z.new_empty(z.shape)] + [b.new_empty(b.shape) for b in bs]


@torch.library.register_fake("efftune::lora_output", lib=_LIB)
def _(x, weights, bias, z, b, kinds=None):
    ((kind, w),) = split(weights, kinds)
    return x.new_empty(x.shape[0], out_features(kind, w))


# Flop counts (`torch.utils.flop_counter`) for the opaque ops: without them FlopCounterMode counts every
# op here as free, and so does torch.compile's partitioner where its memory-budget search weighs what to
# recompute by flops (`train.compile_memory_budget`), which would then recompute the GEMMs first.
@register_flop_formula(torch.ops.efftune.lora_linears, get_raw=True)
def _(x, weights, biases, a, bs, kinds=None, out_val=None, **_):
    return gemm_flops(x.shape[0], [a, *bs], None) + gemm_flops(x.shape[0], weights, kinds)


@register_flop_formula(torch.ops.efftune.lora_linears_backward, get_raw=True)
def _(dys, weights, a, bs, z, need_dx, kinds=None, out_val=None, **_):
    rows = z.shape[0]
    flops = 2 * gemm_flops(rows, bs, None)  # db_i = dy_iᵀ z_i and dz_i = dy_i b_i
    if need_dx:
        flops += gemm_flops(rows, [a], None) + gemm_flops(rows, weights, kinds)
    return flops


@register_flop_formula(torch.ops.efftune.lora_output, get_raw=True)
def _(x, weights, bias, z, b, kinds=None, out_val=None, **_):
    return gemm_flops(x.shape[0], weights, kinds) + gemm_flops(x.shape[0], [b], None)


class LoraLinears(torch.autograd.Function):
    """Autograd for the two ops: apply(x, a, kinds, m, *weights, *biases, *bs) -> (y_0, …, y_{m-1}, z),
    `weights` flat (the module docstring; empty kinds: all dense). Saves the weights as given:
    a quantised one's packed tensors, never a dense copy."""

    @staticmethod
    def forward(ctx, x, a, kinds, m, *tensors):
        n = len(tensors) - 2 * m  # the flat weights' count
        weights, biases, bs = tensors[:n], tensors[n:n + m], tensors[n + m:]
        outs = torch.ops.efftune.lora_linears(x, list(weights), list(biases), a, list(bs), list(kinds))
        ctx.save_for_backward(x, a, outs[-1], *weights, *bs)
        ctx.members, ctx.flat, ctx.kinds = m, n, kinds
        ctx.mark_non_differentiable(outs[-1])
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        x, a, z, *rest = ctx.saved_tensors
        m, n = ctx.members, ctx.flat
        weights, bs = rest[:n], rest[n:]
        dys = [g if g is not None else x.new_zeros(x.shape[0], b.shape[0]) for g, b in zip(grads[:m], bs)]
        need_dx = ctx.needs_input_grad[0]
        dx, dz, *dbs = torch.ops.efftune.lora_linears_backward(dys, list(weights), a, list(bs), z, need_dx,
                                                               list(ctx.kinds))
        return (dx if need_dx else None, dz.t() @ x, None, None) + (None,) * (n + m) + tuple(dbs)


def fused_lora_linears(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None], a: Tensor,
                       bs: Sequence[Tensor], kinds: Sequence[str] | None = None) -> list[Tensor]:
    """`LoraLinears` for x of any leading shape; returns the m outputs shaped (*lead, out_i).
    `weights`: one dense tensor each, or flat with `kinds` (`quantize.operands.flatten`)."""
    outs = LoraLinears.apply(x.reshape(-1, x.shape[-1]), a, tuple(kinds or ()), len(bs), *weights, *biases, *bs)
    return [y.view(*x.shape[:-1], y.shape[-1]) for y in outs[:-1]]


"""The routed-expert computation of transformers-5 MoE blocks, grouped by expert.

transformers 5 stores a block's experts as one module with fused 3-D weights (Qwen3-MoE, OLMoE,
Mixtral, ...): `gate_up_proj` (E, 2·I, H) holding [gate; up] and `down_proj` (E, H, I), called as
`experts(hidden (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H)`.

`GroupedExperts` wraps such a module (kept as `base_layer`) and runs it this way:
1. `dispatch`: one sort of the T·k (token, slot) pairs by expert; every later step works on that
   permuted layout, where each expert's rows are contiguous (gate_up and down share it).
2. `grouped_linear`: one grouped GEMM per projection over the per-expert row counts —
   `torch._grouped_mm` on CUDA in bf16 (anywhere in bf16 with impl "grouped_mm"), else a loop over
   per-expert slices (CPU, float64 tests).
   Both read the same layout, so they agree up to rounding.
3. the routing weights scale each row's activation before `down_proj` (the projection is linear:
   w · down(h) = down(w · h)), so the combine is a plain sum of each token's k rows, back in token
   order, and keeps nothing for backward: weighting after `down_proj` kept its (T, k, H) output for
   the weights' gradient, the largest tensor of the layer a backward needs.

A trainable weight's gradient reads its projection's input rows: expert LoRA's `A` factors and ESFT's
trained experts make them again in backward instead of keeping them. For `gate_up_proj` they are the
gathered tokens (S = T·k rows; `Dispatch.source`, `project_gathered`: k times fewer rows kept), for
`down_proj` the activation of gate_up's output (`Dispatch.activated`, `project_activated`). A frozen
base's grouped GEMM keeps only its weight.

Subclasses add per-expert updates (`ExpertLora`) or swap in trainable weights for some experts
(ESFT) through `project`. An expert subset is served by a second sort key that puts the subset's
rows last (`dispatch(..., adapted=)`), so its rows are one contiguous slice with no extra gather.

A base whose weights are stored packed (`PackedExperts`: efftune.quantize's NF4 / int8 experts)
multiplies its grouped rows itself; everything else here is the same for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import register_flop_formula

from ..errors import EfftuneError

IMPLS = ("auto", "grouped_mm", "loop")


@dataclass
class Dispatch:
    """Where each of the S = T·k (token, slot) pairs goes.

    order (S,): flat slot index (t·k + j) of each permuted row; inverse (S,): row of each flat slot;
    counts (E,): rows per expert; rest/picked (E,): counts split into non-adapted / adapted experts
    (None without a subset); split: rows before the adapted experts' rows (an int, or None);
    source: the tokens' rows (T, H) that `gate_up_proj`'s input is gathered from (`gathered`);
    activated: gate_up's output and the rows' routing weights, of which `down_proj`'s input is the
    activation (`project_activated`).
    """
    order: torch.Tensor
    inverse: torch.Tensor
    counts: torch.Tensor
    top_k: int
    rest: torch.Tensor | None = None
    picked: torch.Tensor | None = None
    split: int | None = None
    source: torch.Tensor | None = None  # (T, H) the rows `gate_up_proj`'s input was gathered from
    activated: tuple[torch.Tensor, torch.Tensor] | None = None  # (gate_up (S, 2I), weights (S,)): down's input


def dispatch(top_k_index: torch.Tensor, num_experts: int, adapted: torch.Tensor | None = None) -> Dispatch:
    """Sort the (token, slot) pairs of `top_k_index` (T, k) by expert. With `adapted` (E,) bool,
    non-adapted experts' rows come first, then the adapted experts' rows, each block by expert."""
    flat = top_k_index.reshape(-1)
    key = flat if adapted is None else flat + num_experts * adapted[flat].long()
    order = torch.argsort(key, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    # rows per expert from the sorted ids' boundaries: no host sync (bincount reads the max id back)
    # and no scatter-add (compiled, an index_add becomes a sort-based accumulate, ~0.3 ms a layer)
    bounds = torch.searchsorted(flat.index_select(0, order) if adapted is None else flat.sort().values,
                                torch.arange(num_experts + 1, device=flat.device, dtype=flat.dtype))
    counts = bounds.diff()
    d = Dispatch(order, inverse, counts, top_k_index.shape[-1])
    if adapted is not None:
        d.picked = counts * adapted
        d.rest = counts - d.picked
        d.split = int(d.rest.sum())  # one host sync per layer, paid only when a subset is adapted
    return d


class _Gather(torch.autograd.Function):
    """x (T, H) -> the permuted rows (S, H). Backward sums each token's k rows in one reshape
    instead of k-way atomic adds: deterministic, and the sum runs at fp32 accuracy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, top_k: int):
        ctx.save_for_backward(inverse)
        ctx.top_k = top_k
        return x.index_select(0, order // top_k)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        g = grad.index_select(0, inverse)
        return g.view(-1, ctx.top_k, g.shape[-1]).sum(1), None, None, None


def _wide(t: torch.Tensor) -> torch.dtype:
    """The dtype to compute t's arithmetic in: fp32, or t's own where wider (float64 tests)."""
    return torch.promote_types(t.dtype, torch.float32)


class _Permute(torch.autograd.Function):
    """v (S,) -> v[order]: the routing weights in dispatch order. Backward is the inverse permutation
    (a gather), not the scatter-add that autograd's index backward would make."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor):
        ctx.save_for_backward(inverse)
        return v.index_select(0, order)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class _SumSlots(torch.autograd.Function):
    """Permuted expert outputs (S, H), already weighted -> each token's k rows summed (T, H), in fp32
    then rounded once. Backward hands each row its token's gradient; nothing but `order` is kept."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, top_k: int):
        ctx.save_for_backward(order)
        ctx.top_k = top_k
        per_token = out.index_select(0, inverse).view(-1, top_k, out.shape[-1])  # (T, k, H)
        return per_token.sum(1, dtype=_wide(out)).to(out.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (order,) = ctx.saved_tensors
        return grad.index_select(0, order // ctx.top_k), None, None, None


def _silu_mul(gate_up: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up · w from [gate; up] (S, 2I) and w (S,), in fp32 (or wider), rounded once."""
    wide = _wide(gate_up)
    gate, up = gate_up.to(wide).chunk(2, dim=-1)
    return (F.silu(gate) * up * weights.to(wide).unsqueeze(-1)).to(gate_up.dtype)


def _silu_mul_backward(gate_up: torch.Tensor, weights: torch.Tensor, grad: torch.Tensor,
                       weights_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`_silu_mul`'s gradients (gate_up, weights) for the output gradient `grad` (S, I)."""
    wide = _wide(gate_up)
    gate, up = gate_up.to(wide).chunk(2, dim=-1)
    grad = grad.to(wide)
    silu = F.silu(gate)
    grad_weights = (grad * silu * up).sum(-1).to(weights.dtype) if weights_grad else None
    grad = grad * weights.to(wide).unsqueeze(-1)
    grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
    return torch.cat((grad_gate, grad * silu), dim=-1).to(gate_up.dtype), grad_weights


class _SiluMul(torch.autograd.Function):
    """[gate; up] (S, 2I) and routing weights w (S,) -> silu(gate) · up · w (`_silu_mul`), keeping
    only the inputs for backward (the silu and product are recomputed there: no (S, I) tensor held)."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor, weights: torch.Tensor):
        ctx.save_for_backward(gate_up, weights)
        return _silu_mul(gate_up, weights)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate_up, weights = ctx.saved_tensors
        return _silu_mul_backward(gate_up, weights, grad, ctx.needs_input_grad[1])


class _ActivatedGroupedLinear(torch.autograd.Function):
    """`grouped_linear(h, weight, counts)` for a trainable weight (expert LoRA's A of `down_proj`, ESFT's
    trained experts), where h = `_silu_mul(gate_up, w)` is already made (the frozen projection's input:
    forward reads it, its gradient reaches gate_up and w through them), keeping gate_up and w (which
    `_SiluMul` keeps anyway) instead of h, which the weight's gradient reads (S, I: 12 KB a token a layer
    at Qwen3-30B-A3B): it is made again in backward. (A compiled graph recomputes it by itself; this is
    eager's saving.)"""

    @staticmethod
    def forward(ctx, h: torch.Tensor, gate_up: torch.Tensor, weights: torch.Tensor, weight: torch.Tensor,
                counts: torch.Tensor, impl: str):
        ctx.save_for_backward(gate_up, weights, weight, counts)
        ctx.impl = impl
        return _grouped_linear(h, weight, counts, impl)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate_up, weights, weight, counts = ctx.saved_tensors
        grad = grad.contiguous()
        grad_weight = grouped_weight_grad(grad, _silu_mul(gate_up, weights), counts, ctx.impl)
        grad_h = _grouped_linear(grad, weight.transpose(-2, -1), counts, ctx.impl)
        grad_gate_up, grad_weights = _silu_mul_backward(gate_up, weights, grad_h, ctx.needs_input_grad[2])
        return None, grad_gate_up, grad_weights, grad_weight, None, None


@runtime_checkable
class PackedExperts(Protocol):
    """A fused-experts module whose 3-D weights are stored packed (efftune.quantize.QuantizedExperts).
    `dtype`: the compute dtype; `weight_like(name)`: a tensor of the weight's shape, dtype and device
    without its values (no dequantisation to read a shape); `grouped_projection`: `grouped_linear`
    over its own weight `name`."""
    dtype: torch.dtype

    def weight_like(self, name: str) -> torch.Tensor: ...

    def grouped_projection(self, name: str, x: torch.Tensor, counts: torch.Tensor, impl: str) -> torch.Tensor: ...


def weight_like(module: nn.Module, name: str) -> torch.Tensor:
    """The experts' weight `name` for its shape, dtype and device (a packed one's values not made)."""
    return module.weight_like(name) if isinstance(module, PackedExperts) else getattr(module, name)


def uses_grouped_mm(x: torch.Tensor, weight: torch.Tensor, impl: str) -> bool:
    """Whether x times the grouped `weight` runs as one `torch._grouped_mm`: with impl "auto" on CUDA
    in bf16, with "grouped_mm" on any device in bf16 (torch's CPU kernel too: it lets tests and
    bench/moe_activations.py run the GPU's graph on a CPU), never with "loop"."""
    if impl == "loop":
        return False
    ok = ((x.is_cuda or impl == "grouped_mm") and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
          and hasattr(torch, "_grouped_mm") and x.shape[-1] % 8 == 0 and weight.shape[1] % 8 == 0)
    if impl == "grouped_mm" and not ok:
        raise EfftuneError(f"experts impl 'grouped_mm' needs bf16 tensors with dims divisible by 8 "
                           f"(got {x.device.type} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype})")
    return ok


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Row block g of x (S, in) times weight[g].T: weight (G, out, in), counts (G,) rows per group
    (summing to S) -> (S, out). Empty groups are allowed."""
    if torch.is_grad_enabled() and x.requires_grad and not weight.requires_grad:
        return _FrozenGroupedLinear.apply(x, weight, counts, impl)
    return _grouped_linear(x, weight, counts, impl)


def _grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, impl: str) -> torch.Tensor:
    if uses_grouped_mm(x, weight, impl):
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    pieces, start = [], 0
    for g, n in enumerate(counts.tolist()):
        if n:
            pieces.append(x[start:start + n] @ weight[g].T.to(x.dtype))
            start += n
    if not pieces:
        return x.new_zeros(0, weight.shape[1])
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


class _FrozenGroupedLinear(torch.autograd.Function):
    """`grouped_linear` through a frozen weight: backward needs the weight, not x, which autograd's
    grouped GEMM keeps all the same (the gathered rows: k copies of each token's row)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, impl: str):
        ctx.save_for_backward(weight, counts)
        ctx.impl = impl
        return _grouped_linear(x, weight, counts, impl)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, counts = ctx.saved_tensors
        return _grouped_linear(grad.contiguous(), weight.transpose(-2, -1), counts, ctx.impl), None, None, None


def check_experts_module(module: nn.Module, path: str = "experts") -> None:
    """The layout GroupedExperts understands: fused [gate; up] (E, 2I, H) and down (E, H, I), no bias."""
    if isinstance(module, PackedExperts):
        gu, down = module.weight_like("gate_up_proj"), module.weight_like("down_proj")
    else:
        gu, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.dim() == 3 and down.dim() == 3):
        raise EfftuneError(f"{path} ({type(module).__name__}) has no 3-D gate_up_proj and down_proj parameters")
    e, two_i, h = gu.shape
    if down.shape != (e, h, two_i // 2) or two_i % 2:
        raise EfftuneError(f"{path}: gate_up_proj {tuple(gu.shape)} and down_proj {tuple(down.shape)} are not "
                           "(E, 2I, H) and (E, H, I)")
    for flag, bad in (("is_transposed", True), ("has_bias", True), ("is_concatenated", False),
                      ("has_gate", False)):
        if getattr(module, flag, not bad) == bad:
            raise EfftuneError(f"{path} ({type(module).__name__}) has {flag}={bad}, a layout efftune's expert "
                               "path does not handle")


class GroupedExperts(nn.Module):
    """A transformers fused-experts module run through `dispatch` / `grouped_linear` / `combine`.

    forward(hidden (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H), the base module's
    call signature. `adapted` (E,) bool buffer, or None: experts that `project` treats specially.
    """

    def __init__(self, base_layer: nn.Module, impl: str = "auto", adapted: list[int] | None = None):
        super().__init__()
        check_experts_module(base_layer)
        if impl not in IMPLS:
            raise EfftuneError(f"experts impl must be one of {IMPLS}, got {impl!r}")
        self.base_layer = base_layer
        self.impl = impl
        gate_up = weight_like(base_layer, "gate_up_proj")
        self.num_experts = gate_up.shape[0]
        self.silu = type(base_layer.act_fn).__name__ in ("SiLUActivation", "SiLU")
        mask = None
        if adapted is not None:
            mask = torch.zeros(self.num_experts, dtype=torch.bool, device=gate_up.device)
            mask[torch.tensor(adapted, dtype=torch.long, device=mask.device)] = True
        self.register_buffer("adapted", mask, persistent=False)

    def activation(self, gate_up: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return expert_activation(self.base_layer.act_fn, gate_up, weights, self.silu)

    def base_projection(self, name: str, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (S', in) grouped by `counts` (E,) through the frozen base weights `name`."""
        if isinstance(self.base_layer, PackedExperts):
            return self.base_layer.grouped_projection(name, x, counts, self.impl)
        return grouped_linear(x, getattr(self.base_layer, name), counts, self.impl)

    def project(self, name: str, x: torch.Tensor, d: Dispatch) -> torch.Tensor:
        """x (S, in) in dispatch order through every expert's `name` projection -> (S, out)."""
        if d.split is None:
            return self.base_projection(name, x, d.counts)
        rest, picked = x[:d.split], x[d.split:]
        return torch.cat([self.base_projection(name, rest, d.rest), self.project_adapted(name, picked, d)])

    def project_adapted(self, name: str, x: torch.Tensor, d: Dispatch) -> torch.Tensor:
        """The adapted experts' rows (their counts: d.picked) through `name`; subclasses change it."""
        return self.base_projection(name, x, d.picked)

    def trainable_projection(self, name: str, x: torch.Tensor, d: Dispatch, start: int, weight: torch.Tensor,
                             counts: torch.Tensor) -> torch.Tensor:
        """Rows `start`.. of projection `name`'s input (x: those rows, grouped by `counts`) through a
        trainable `weight` (G, out, in), whose gradient reads them: gate_up's rows (the gathered
        tokens, `project_gathered`) and down's (the SiLU activation, `project_activated`) are made
        again in backward instead of kept."""
        if name == "gate_up_proj" and d.source is not None:
            return project_gathered(d, start, weight, counts, self.impl)
        if name == "down_proj" and d.activated is not None and self.silu:
            return project_activated(x, d, start, weight, counts, self.impl)
        return grouped_linear(x, weight, counts, self.impl)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        return run_experts(self.project, self.activation, self.num_experts, experts_dtype(self.base_layer),
                           hidden_states, top_k_index, top_k_weights, self.adapted)


def expert_activation(act_fn: nn.Module, gate_up: torch.Tensor, weights: torch.Tensor, silu: bool) -> torch.Tensor:
    """act(gate) · up · w from [gate; up] (S, 2I) and the rows' routing weights w (S,); SiLU through
    `_SiluMul` (keeps only its inputs)."""
    if silu:
        return _SiluMul.apply(gate_up, weights)
    gate, up = gate_up.chunk(2, dim=-1)
    return act_fn(gate) * up * weights.to(gate_up.dtype).unsqueeze(-1)


def gathered(d: Dispatch) -> torch.Tensor:
    """`gate_up_proj`'s input: the tokens' rows in dispatch order, d.source[order // k] (S, H)."""
    return _Gather.apply(d.source, d.order, d.inverse, d.top_k)


@torch.library.custom_op("efftune::gathered_grouped_linear", mutates_args=())
def gathered_grouped_linear(source: torch.Tensor, rows: torch.Tensor, inverse: torch.Tensor | None, top_k: int,
                            weight: torch.Tensor, counts: torch.Tensor, impl: str) -> torch.Tensor:
    """`grouped_linear(source[rows], weight, counts)` without keeping source[rows] for backward: it
    gathers them again there. For expert LoRA's A of `gate_up_proj`, whose gathered input holds each
    token k times (Qwen3-30B-A3B, k = 8: 32 KB a token a layer kept, against 4 for the token's row).
    An op of its own, opaque to the compiler: a compiled block otherwise merges this gather with the
    base projection's and keeps the result. `inverse`, where rows are all of a dispatch's (order //
    k), lets backward sum each token's k rows as `_Gather` does; else (a subset) a scatter-add."""
    return grouped_linear(source.index_select(0, rows), weight, counts, impl)


@gathered_grouped_linear.register_fake
def _(source, rows, inverse, top_k, weight, counts, impl):
    return source.new_empty(rows.shape[0], weight.shape[1])


def _gathered_setup(ctx, inputs, output):
    source, rows, inverse, top_k, weight, counts, impl = inputs
    ctx.save_for_backward(source, rows, inverse, weight, counts)
    ctx.top_k, ctx.impl = top_k, impl


def _gathered_backward(ctx, grad):
    source, rows, inverse, weight, counts = ctx.saved_tensors
    grad_source, grad_weight = torch.ops.efftune.gathered_grouped_linear_backward(
        grad.contiguous(), source, rows, inverse, ctx.top_k, weight, counts, ctx.impl)
    return grad_source, None, None, None, grad_weight, None, None


@torch.library.custom_op("efftune::gathered_grouped_linear_backward", mutates_args=())
def gathered_grouped_linear_backward(grad: torch.Tensor, source: torch.Tensor, rows: torch.Tensor,
                                     inverse: torch.Tensor | None, top_k: int, weight: torch.Tensor,
                                     counts: torch.Tensor, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`gathered_grouped_linear`'s gradients (source, weight), the rows gathered again here. An op of
    its own too: traced, this gather would be merged with forward's and its result kept after all."""
    grad_weight = grouped_weight_grad(grad, source.index_select(0, rows), counts, impl)
    grad_rows = _grouped_linear(grad, weight.transpose(-2, -1), counts, impl)
    if inverse is not None:  # all of a dispatch's rows: each token's k rows summed, no scatter-add
        grad_source = grad_rows.index_select(0, inverse).view(-1, top_k, grad_rows.shape[-1]).sum(1)
    else:
        wide = _wide(grad_rows)
        grad_source = torch.zeros_like(source, dtype=wide).index_add_(0, rows, grad_rows.to(wide))
    return grad_source.to(source.dtype), grad_weight.to(weight.dtype)


@gathered_grouped_linear_backward.register_fake
def _(grad, source, rows, inverse, top_k, weight, counts, impl):
    return torch.empty_like(source), torch.empty_like(weight)


gathered_grouped_linear.register_autograd(_gathered_backward, setup_context=_gathered_setup)


def project_activated(x: torch.Tensor, d: Dispatch, start: int, weight: torch.Tensor, counts: torch.Tensor,
                      impl: str) -> torch.Tensor:
    """`down_proj`'s input rows from `start` on (x: the SiLU activation of d.activated's rows, grouped by
    `counts`) through a trainable `weight` (G, out, in), without keeping them for backward: they are made
    again from d.activated (`_ActivatedGroupedLinear`); their gradient goes to gate_up and the weights."""
    gate_up, weights = d.activated
    return _ActivatedGroupedLinear.apply(x.detach(), gate_up[start:], weights[start:], weight, counts, impl)


def project_gathered(d: Dispatch, start: int, weight: torch.Tensor, counts: torch.Tensor, impl: str) -> torch.Tensor:
    """`gate_up_proj`'s input rows from `start` on (d.source[order // k], grouped by `counts`) through
    a trainable `weight` (G, out, in), without keeping the rows for backward (`gathered_grouped_linear`)."""
    return gathered_grouped_linear(d.source, d.order[start:] // d.top_k, d.inverse if start == 0 else None,
                                   d.top_k, weight, counts, impl)


# Flop counts (`torch.utils.flop_counter`; the compiler's memory-budget search weighs recomputation
# by them): each row meets one expert's weight; backward makes the weight's and the rows' gradients.
@register_flop_formula(torch.ops.efftune.gathered_grouped_linear, get_raw=True)
def _(source, rows, inverse, top_k, weight, counts, impl, out_val=None, **_):
    return 2 * rows.shape[0] * weight.shape[1] * weight.shape[2]


@register_flop_formula(torch.ops.efftune.gathered_grouped_linear_backward, get_raw=True)
def _(grad, source, rows, inverse, top_k, weight, counts, impl, out_val=None, **_):
    return 4 * rows.shape[0] * weight.shape[1] * weight.shape[2]


def grouped_weight_grad(grad: torch.Tensor, x: torch.Tensor, counts: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """The gradient of `grouped_linear`'s weight (G, out, in): grad_g^T x_g for each row block g of
    grad (S, out) and x (S, in)."""
    groups = counts.shape[0]
    if uses_grouped_mm(x, grad.new_empty(groups, grad.shape[-1], x.shape[-1]), impl) and grad.shape[-1] % 8 == 0:
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        return torch._grouped_mm(grad.t(), x, offs=offsets)
    out = x.new_zeros(groups, grad.shape[-1], x.shape[-1])
    start = 0
    for g, n in enumerate(counts.tolist()):
        if n:
            torch.mm(grad[start:start + n].t(), x[start:start + n], out=out[g])
            start += n
    return out


def experts_dtype(module: nn.Module) -> torch.dtype:
    """The compute dtype of a fused-experts module (a packed one's, not its storage's)."""
    return module.dtype if isinstance(module, PackedExperts) else module.gate_up_proj.dtype


def run_experts(project: Callable[[str, torch.Tensor, Dispatch], torch.Tensor],
                activation: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], num_experts: int,
                dtype: torch.dtype, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor, adapted: torch.Tensor | None = None) -> torch.Tensor:
    """The routed experts by expert group: dispatch, `project` gate_up, `activation` (weighted by the
    rows' routing weights), `project` down, sum each token's rows. hidden (T, H), top_k_index /
    top_k_weights (T, k) -> (T, H)."""
    d = dispatch(top_k_index, num_experts, adapted)
    d.source = hidden_states.to(dtype)
    weights = _Permute.apply(top_k_weights.reshape(-1), d.order, d.inverse)
    gate_up = project("gate_up_proj", gathered(d), d)
    d.activated = (gate_up, weights)
    out = project("down_proj", activation(gate_up, weights), d)
    return _SumSlots.apply(out, d.order, d.inverse, d.top_k).to(hidden_states.dtype)


def experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every fused-experts module of the model (3-D gate_up_proj / down_proj), not yet wrapped."""
    found, wrapped = [], []
    for name, m in model.named_modules():
        if isinstance(m, GroupedExperts):
            wrapped.append(name + ".")
            continue
        if any(name.startswith(w) for w in wrapped):
            continue
        gu = None if isinstance(m, PackedExperts) else getattr(m, "gate_up_proj", None)
        if isinstance(m, PackedExperts) or isinstance(gu, nn.Parameter) and gu.dim() == 3:
            found.append((name, m))
    return found


def use_grouped_experts(model: nn.Module, impl: str = "auto") -> list[str]:
    """Run every fused-experts module through GroupedExperts (no adapter): efftune's expert path
    with the model's weights unchanged. Returns the wrapped module paths."""
    from ..attach import replace_module
    paths = [p for p, _ in experts_modules(model)]
    if not paths:
        raise EfftuneError("the model has no fused-experts module (3-D gate_up_proj / down_proj)")
    for p in paths:
        replace_module(model, p, GroupedExperts(model.get_submodule(p), impl))
    return paths

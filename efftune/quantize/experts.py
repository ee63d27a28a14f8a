"""The fused 3-D expert weights of transformers-5 MoE blocks stored per expert in NF4 or int8.

`QuantizedExperts` stands in for a fused-experts module (`gate_up_proj` (E, 2I, H), `down_proj`
(E, H, I), efftune.moe.experts): each expert's two matrices are quantised on their own, exactly as
a linear layer's weight is (`nf4`, `int8`), and the per-expert tensors are stacked (NF4: codes
(E, out, in / 2), scale_q (E, m), scale_scale (E, m / 256), scale_mean (E,); int8: q (E, out, in),
scale (E, out)). The integer ones are frozen parameters (`linear.frozen_packed` says why: FSDP2
shards them, whole experts a rank), the fp32 ones buffers. It runs the routed experts by expert
group (`moe.experts.run_experts`) and meets `moe.experts.PackedExperts`, so expert LoRA wraps it
as it wraps the original module.

The grouped products are two ops opaque to torch.compile (`efftune::quantized_grouped_mm` and its
input gradient), for the reason `linear.py` gives: the dense weights are made inside, used, and let
go; backward makes them again. On CUDA in bf16 (`torch._grouped_mm`) one projection's experts are
made dense together for the one grouped GEMM; elsewhere (the loop) one expert at a time.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import register_flop_formula

from ..moe.experts import check_experts_module, expert_activation, grouped_linear, run_experts, uses_grouped_mm
from . import int8, nf4
from .linear import DENSE, frozen_packed

TARGETS = ("gate_up_proj", "down_proj")
FIELDS = {"nf4": ("codes", "scale_q", "scale_scale", "scale_mean"), "int8": ("q", "scale")}
FP32_FIELDS = {"nf4": ("scale_scale", "scale_mean"), "int8": ("scale",)}


def fits(kind: str, experts: nn.Module) -> bool:
    """Whether both weights split into the format's blocks (NF4: inputs of a multiple of 64)."""
    return kind != "nf4" or all(nf4.fits(*getattr(experts, n).shape[1:]) for n in TARGETS)


@torch.no_grad()
def quantize_stacked(kind: str, weight: Tensor) -> list[Tensor]:
    """(E, out, in) -> FIELDS[kind] tensors, each expert quantised on its own, stacked on dim 0."""
    packed = [(nf4.quantize(w) if kind == "nf4" else int8.quantize(w)).tensors() for w in weight]
    return [torch.stack(field) for field in zip(*packed)]


def expert_tensors(tensors: list[Tensor], e: int, kind: str) -> tuple[Tensor, ...]:
    """Expert e's tensors as `linear.DENSE[kind]` takes a layer's (the NF4 code table last, shared)."""
    n = len(FIELDS[kind])
    return tuple(t[e] for t in tensors[:n]) + tuple(tensors[n:])


def dense_experts(kind: str, tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    """All E experts' dense weights (E, out, in) in `dtype`, in one pass (`linear.DENSE` takes stacked
    tensors too: the same numbers as dequantising each expert on its own)."""
    return DENSE[kind](tuple(tensors), dtype)


def _in_features(kind: str, tensors: list[Tensor]) -> int:
    return tensors[0].shape[2] * (2 if kind == "nf4" else 1)


def _like(kind: str, tensors: list[Tensor], dtype: torch.dtype, device) -> Tensor:
    e, out_f = tensors[0].shape[:2]
    return torch.empty((), dtype=dtype, device=device).expand(e, out_f, _in_features(kind, tensors))


_LIB = torch.library.Library("efftune", "FRAGMENT")
_LIB.define("quantized_grouped_mm(Tensor x, Tensor[] tensors, str kind, Tensor counts, str impl) -> Tensor")
_LIB.define("quantized_grouped_mm_input_grad(Tensor dy, Tensor[] tensors, str kind, Tensor counts, str impl) -> Tensor")


def quantized_grouped_mm(x: Tensor, tensors: list[Tensor], kind: str, counts: Tensor, impl: str) -> Tensor:
    """Row block g of x (S, in) times expert g's weightᵀ: `moe.experts.grouped_linear` on the
    quantised experts (counts (E,) rows per expert) -> (S, out)."""
    if uses_grouped_mm(x, _like(kind, tensors, x.dtype, x.device), impl):
        return grouped_linear(x, dense_experts(kind, tensors, x.dtype), counts, impl)
    out = x.new_empty(x.shape[0], tensors[0].shape[1])
    start = 0
    for g, n in enumerate(counts.tolist()):
        if n:
            torch.mm(x[start:start + n], DENSE[kind](expert_tensors(tensors, g, kind), x.dtype).t(),
                     out=out[start:start + n])
            start += n
    return out


def quantized_grouped_mm_input_grad(dy: Tensor, tensors: list[Tensor], kind: str, counts: Tensor,
                                    impl: str) -> Tensor:
    """Row block g of dy (S, out) times expert g's weight -> (S, in)."""
    if uses_grouped_mm(dy, _like(kind, tensors, dy.dtype, dy.device), impl):
        return grouped_linear(dy, dense_experts(kind, tensors, dy.dtype).transpose(-2, -1), counts, impl)
    out = dy.new_empty(dy.shape[0], _in_features(kind, tensors))
    start = 0
    for g, n in enumerate(counts.tolist()):
        if n:
            torch.mm(dy[start:start + n], DENSE[kind](expert_tensors(tensors, g, kind), dy.dtype),
                     out=out[start:start + n])
            start += n
    return out


_LIB.impl("quantized_grouped_mm", quantized_grouped_mm, "CompositeExplicitAutograd")
_LIB.impl("quantized_grouped_mm_input_grad", quantized_grouped_mm_input_grad, "CompositeExplicitAutograd")


@torch.library.register_fake("efftune::quantized_grouped_mm", lib=_LIB)
def _(x, tensors, kind, counts, impl):
    return x.new_empty(x.shape[0], tensors[0].shape[1])


@torch.library.register_fake("efftune::quantized_grouped_mm_input_grad", lib=_LIB)
def _(dy, tensors, kind, counts, impl):
    return dy.new_empty(dy.shape[0], _in_features(kind, tensors))


# Flop counts (`torch.utils.flop_counter`, as `quantize.linear`'s): each row meets one expert.
@register_flop_formula([torch.ops.efftune.quantized_grouped_mm, torch.ops.efftune.quantized_grouped_mm_input_grad],
                       get_raw=True)
def _(x, tensors, kind, counts, impl, out_val=None, **_):
    return 2 * x.shape[0] * tensors[0].shape[1] * _in_features(kind, tensors)


class QuantizedGroupedLinear(torch.autograd.Function):
    """apply(x, counts, kind, impl, *tensors) -> the grouped product; a gradient for x only, the
    quantised tensors saved (never a dense weight)."""

    @staticmethod
    def forward(ctx, x, counts, kind, impl, *tensors):
        ctx.save_for_backward(counts, *tensors)
        ctx.kind, ctx.impl = kind, impl
        return torch.ops.efftune.quantized_grouped_mm(x, list(tensors), kind, counts, impl)

    @staticmethod
    def backward(ctx, grad):
        counts, *tensors = ctx.saved_tensors
        dx = torch.ops.efftune.quantized_grouped_mm_input_grad(grad.contiguous(), tensors, ctx.kind, counts,
                                                               ctx.impl) if ctx.needs_input_grad[0] else None
        return (dx, None, None, None) + (None,) * len(tensors)


class QuantizedExperts(nn.Module):
    """A fused-experts module with both 3-D weights stored per expert in `kind` (module docstring).

    forward(hidden (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H), the replaced
    module's signature. `gate_up_proj` / `down_proj` read as dequantised tensors (read-only, made
    under inference mode, like `QuantizedLinear.weight`); `dense()` gives the replaced module back
    with dense weights (`dequantize_model`)."""

    def __init__(self, experts: nn.Module, kind: str):
        super().__init__()
        check_experts_module(experts)
        self.kind = kind
        self.dtype = experts.gate_up_proj.dtype
        self.act_fn = experts.act_fn
        self.silu = type(experts.act_fn).__name__ in ("SiLUActivation", "SiLU")
        self.shapes = {name: tuple(getattr(experts, name).shape) for name in TARGETS}
        self.num_experts = self.shapes["gate_up_proj"][0]
        device = experts.gate_up_proj.device
        for name in TARGETS:
            for field, t in zip(FIELDS[kind], quantize_stacked(kind, getattr(experts, name))):
                if field in FP32_FIELDS[kind]:
                    self.register_buffer(f"{name}_{field}", t)
                else:  # codes and int8 scales: FSDP2 shards them (whole experts a rank) with their block
                    frozen_packed(self, f"{name}_{field}", t)
            # the replaced module lets its dense weights go (meta: no storage); `dense` refills them
            setattr(experts, name, nn.Parameter(torch.empty(self.shapes[name], dtype=self.dtype, device="meta"),
                                                requires_grad=False))
        self.register_buffer("code", nf4.code_table(device) if kind == "nf4" else None, persistent=False)
        self.__dict__["_original"] = experts  # not a submodule: no state, nothing to move

    def packed(self, name: str) -> list[Tensor]:
        """The stacked tensors of weight `name`, as the grouped ops take them."""
        tensors = [getattr(self, f"{name}_{field}") for field in FIELDS[self.kind]]
        return tensors + ([self.code] if self.kind == "nf4" else [])

    def dequantize(self, name: str, dtype: torch.dtype | None = None) -> Tensor:
        """Weight `name` (E, out, in), dense in `dtype` (default: the compute dtype), a new tensor."""
        return dense_experts(self.kind, self.packed(name), dtype or self.dtype)

    @property
    def gate_up_proj(self) -> Tensor:
        with torch.inference_mode():
            return self.dequantize("gate_up_proj")

    @property
    def down_proj(self) -> Tensor:
        with torch.inference_mode():
            return self.dequantize("down_proj")

    @property
    def packed_weight_numel(self) -> int:
        """The weights' elements, which parameter counts take in place of the packed parameters'
        (`efftune.attach.trainable_parameters`)."""
        return sum(e * o * i for e, o, i in self.shapes.values())

    # -- moe.experts.PackedExperts ------------------------------------------------------------
    def weight_like(self, name: str) -> Tensor:
        return torch.empty((), dtype=self.dtype, device=self.packed(name)[0].device).expand(self.shapes[name])

    def grouped_projection(self, name: str, x: Tensor, counts: Tensor, impl: str) -> Tensor:
        return QuantizedGroupedLinear.apply(x, counts, self.kind, impl, *self.packed(name))

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        return run_experts(lambda name, x, d: self.grouped_projection(name, x, d.counts, "auto"),
                           lambda gate_up, weights: expert_activation(self.act_fn, gate_up, weights, self.silu),
                           self.num_experts, self.dtype, hidden_states, top_k_index, top_k_weights)

    def dense(self) -> nn.Module:
        """The replaced module, its weights the dequantised ones (compute dtype, frozen)."""
        experts = self._original
        for name in TARGETS:
            setattr(experts, name, nn.Parameter(self.dequantize(name), requires_grad=False))
        experts.act_fn = self.act_fn
        return experts

    def _apply(self, fn, recurse=True):
        probe = fn(torch.empty(0, dtype=self.dtype))  # a cast moves the compute dtype, never the scales
        super()._apply(fn, recurse)
        self.dtype = probe.dtype
        for name in TARGETS:
            for field in FP32_FIELDS[self.kind]:
                setattr(self, f"{name}_{field}", getattr(self, f"{name}_{field}").float())
        if self.code is not None:
            self.code = self.code.float()
        return self

    def extra_repr(self) -> str:
        return f"{self.num_experts} experts, {self.kind}, dtype={self.dtype}"

"""A SwiGLU MLP whose three projections carry LoRA, as one autograd function:

    g = x W_gᵀ + z_g B_gᵀ,  u = x W_uᵀ + z_u B_uᵀ  (z = x Â_guᵀ, Â the stacked, scaled A factors)
    h = silu(g) · u,        y = h W_dᵀ + (h Â_dᵀ) B_dᵀ

Why: at 8B shapes the MLP's middle tensors (tokens × 14336) dominate LoRA's memory traffic.
The `lora_linears` path writes the gate and up updates `z B_gᵀ`, `z B_uᵀ` at full width, reads h
again for the down projection's `z_d`, and backward reads dg and du again for dz. Here:
- forward makes `[g0 | u0 | z] = x [W_g; W_u; Â_gu]ᵀ` in one GEMM (the frozen weights are stored as
  one matrix with rows to spare for Â: `packing`) and adds the rank-r updates inside the SwiGLU
  pass (`swiglu_lora_forward`); g0 and u0 are kept instead of g and u;
- forward's pass also makes the down projection's `z_d = h Â_dᵀ` (no second read of h);
- backward runs one pass over (dh0, g0, u0) (`swiglu_lora_backward`) that adds the down
  projection's LoRA term to its frozen input gradient (dh = dh0 + dz_d Â_d, dh0 = dy W_d), recomputes
  g, u and writes dg, du and `dz = [dg B_g, du B_u]` side by side, and h (no second read of dg and
  du for dz, no full-width dz_d Â_d);
- the input gradient `dx = [dg | du | dz] [W_g; W_u; Â_gu]` is then one plain GEMM, where three
  GEMMs accumulating onto one output would each read it back.
On CUDA the two passes are Triton kernels (`swiglu_triton`, 64-bit row offsets: any token count);
elsewhere (CPU, float64 tests, a width whose in-tile offsets would pass 2^31: `takes_kernel`) the
same ops run in PyTorch.

`FusedSwiGLU` replaces a transformers MLP module whose forward is exactly
`down_proj(act_fn(gate_proj(x)) * up_proj(x))` with SiLU, keeping its children under their names
(state dicts and peft files are unchanged). It takes the fused path while all three projections
run one plain LoRA adapter under the rules of `lora.FusedLinears` (on plain or quantised frozen
weights: a quantised one is dequantised inside the ops, `quantize.operands`), and the MLP's own formula
otherwise (DoRA adapters included: their projections then run as `lora_linears` with DoRA's scale).
"""
from __future__ import annotations

import inspect
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import register_flop_formula

from ...attach import hooked, replace_module
from ...kernel_limits import NoFittingConfig, swiglu_fits
from ...quantize.operands import flatten, gemm_flops, materialize, split
from . import packing
from .ops import _LIB

_LIB.define("swiglu_lora_forward(Tensor gu, Tensor bg, Tensor bu, Tensor ad) -> Tensor[]")
_LIB.define("swiglu_lora_backward(Tensor dh, Tensor dzd, Tensor ad, Tensor gu, Tensor bg, Tensor bu) -> Tensor[]")


def _gate_up(gu: Tensor, bg: Tensor, bu: Tensor) -> tuple[Tensor, Tensor]:
    """g and u with their LoRA updates, in fp32 at least (as the kernels add them), from gu = [g0 | u0 | z]."""
    acc = torch.promote_types(gu.dtype, torch.float32)
    (f, rg), ru = bg.shape, bu.shape[1]
    g0, u0, z = gu[:, :f], gu[:, f:2 * f], gu[:, 2 * f:]
    g = torch.addmm(g0.to(acc), z[:, :rg].to(acc), bg.t().to(acc))
    u = torch.addmm(u0.to(acc), z[:, rg:rg + ru].to(acc), bu.t().to(acc))
    return g, u


def swiglu_forward_reference(gu: Tensor, bg: Tensor, bu: Tensor, ad: Tensor) -> list[Tensor]:
    """[h, z_d]: h = silu(g0 + z_g B_gᵀ) · (u0 + z_u B_uᵀ) rounded once to gu's dtype, z_d = h Â_dᵀ."""
    g, u = _gate_up(gu, bg, bu)
    h = (F.silu(g) * u).to(gu.dtype)
    return [h, h @ ad.t()]


def swiglu_backward_reference(dh: Tensor, dzd: Tensor, ad: Tensor, gu: Tensor, bg: Tensor, bu: Tensor) -> list[Tensor]:
    """[dgu = [dg | du | dz], h] for the upstream gradient dh + dzd ad (summed in fp32 at least),
    dz = [dg B_g, du B_u]."""
    g, u = _gate_up(gu, bg, bu)
    s = torch.sigmoid(g)
    silu = g * s
    dhf = torch.addmm(dh.to(g.dtype), dzd.to(g.dtype), ad.to(g.dtype))
    dg = (dhf * u * s * (1 + g * (1 - s))).to(dh.dtype)
    du = (dhf * silu).to(dh.dtype)
    dgu = packing.aligned_rows(dg.shape[0], 2 * dg.shape[1] + bg.shape[1] + bu.shape[1], dg)
    torch.cat([dg, du, dg @ bg, du @ bu], dim=1, out=dgu)
    return [dgu, (silu * u).to(dh.dtype)]


_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # float64 takes the PyTorch version


def takes_kernel(gu: Tensor, bg: Tensor) -> bool:
    """Whether the op on gu = [g0 | u0 | z] (gate B factor bg) runs the Triton kernels on CUDA, or
    the PyTorch version: a kernel dtype, and offsets inside one tile that fit 32 bits
    (`kernel_limits.swiglu_fits`; backward's [dg | du | dz] has gu's width on aligned rows).
    Reads shapes, strides and dtypes only (meta tensors will do)."""
    stride = max(gu.stride(0), packing.aligned_stride(gu.shape[1]))
    return gu.dtype in _KERNEL_DTYPES and swiglu_fits(gu.shape[0], bg.shape[0], stride)


def _cuda_forward(gu, bg, bu, ad):
    if not takes_kernel(gu, bg):
        return swiglu_forward_reference(gu, bg, bu, ad)
    from . import swiglu_triton
    try:
        return swiglu_triton.forward(gu, bg, bu, ad)
    except NoFittingConfig:  # no tiles fit this GPU's shared memory at this rank and dtype
        return swiglu_forward_reference(gu, bg, bu, ad)


def _cuda_backward(dh, dzd, ad, gu, bg, bu):
    if not takes_kernel(gu, bg):
        return swiglu_backward_reference(dh, dzd, ad, gu, bg, bu)
    from . import swiglu_triton
    try:
        return swiglu_triton.backward(dh, dzd, ad, gu, bg, bu)
    except NoFittingConfig:
        return swiglu_backward_reference(dh, dzd, ad, gu, bg, bu)


_LIB.impl("swiglu_lora_forward", swiglu_forward_reference, "CompositeExplicitAutograd")
_LIB.impl("swiglu_lora_backward", swiglu_backward_reference, "CompositeExplicitAutograd")


# Flop counts (`torch.utils.flop_counter`, see `ops`); the SiLU work itself is pointwise.
@register_flop_formula(torch.ops.efftune.swiglu_lora_forward, get_raw=True)
def _(gu, bg, bu, ad, out_val=None, **_):
    return gemm_flops(gu.shape[0], [bg, bu, ad], None)  # the gate and up updates, and z_d = h Â_dᵀ


@register_flop_formula(torch.ops.efftune.swiglu_lora_backward, get_raw=True)
def _(dh, dzd, ad, gu, bg, bu, out_val=None, **_):
    # the gate and up updates again, dzd Â_d, and dz = [dg B_g, du B_u]
    return gemm_flops(gu.shape[0], [bg, bu, ad, bg, bu], None)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


if triton_available():  # CUDA tensors take the kernels; the PyTorch versions stay for other devices
    _LIB.impl("swiglu_lora_forward", _cuda_forward, "CUDA")
    _LIB.impl("swiglu_lora_backward", _cuda_backward, "CUDA")


@torch.library.register_fake("efftune::swiglu_lora_forward", lib=_LIB)
def _(gu, bg, bu, ad):
    return [gu.new_empty(gu.shape[0], bg.shape[0]), gu.new_empty(gu.shape[0], ad.shape[0])]


@torch.library.register_fake("efftune::swiglu_lora_backward", lib=_LIB)
def _(dh, dzd, ad, gu, bg, bu):
    return [packing.aligned_rows(gu.shape[0], gu.shape[1], gu), gu.new_empty(gu.shape[0], bg.shape[0])]


class SwigluLora(torch.autograd.Function):
    """apply(x, a_gu, a_d, b_g, b_u, b_d, spare, kinds, *weights) -> y, all 2-D in one compute dtype;
    a_gu = [s_g A_g; s_u A_u], a_d = s_d A_d; `spare`: the spare rows of w_g and w_u's packing, or None
    (`packing`); `weights`: w_g, w_u, w_d flat with `kinds` (their three kinds, `quantize.operands`:
    a quantised one is dequantised inside the ops, never kept).
    Gradients for x, the A stacks and the B factors."""

    @staticmethod
    def forward(ctx, x, a_gu, a_d, b_g, b_u, b_d, spare, kinds, *weights):
        (k_g, g), (k_u, u), (k_d, d) = split(weights, kinds)
        w_gu, kinds_gu = flatten([(k_g, g), (k_u, u)])
        w_d, kinds_d = flatten([(k_d, d)])
        gu = torch.ops.efftune.rows_mm(x, w_gu, a_gu, spare, kinds_gu)  # [g0 | u0 | z] in one GEMM
        h, zd = torch.ops.efftune.swiglu_lora_forward(gu, b_g, b_u, a_d)
        ctx.save_for_backward(x, gu, zd, a_gu, a_d, b_g, b_u, b_d, spare, *weights)
        ctx.kinds = kinds
        return torch.ops.efftune.lora_output(h, w_d, None, zd, b_d, kinds_d)

    @staticmethod
    def backward(ctx, dy):
        x, gu, zd, a_gu, a_d, b_g, b_u, b_d, spare, *weights = ctx.saved_tensors
        (k_g, g), (k_u, u), (k_d, d) = split(weights, ctx.kinds)
        w_gu, kinds_gu = flatten([(k_g, g), (k_u, u)])
        dzd = dy @ b_d
        # the frozen down projection's input gradient, plain (a quantised W_d made dense for this GEMM
        # only): its LoRA term joins in the pass
        dh0 = dy @ materialize(k_d, d, dy.dtype)
        dgu, h = torch.ops.efftune.swiglu_lora_backward(dh0, dzd, a_d, gu, b_g, b_u)
        f, rg = b_g.shape
        z, dz = gu[:, 2 * f:], dgu[:, 2 * f:]
        # the reductions over tokens first, while the pass's last writes of h, dg and du are in L2
        da_d, db_g, db_u = dzd.t() @ h, dgu[:, :f].t() @ z[:, :rg], dgu[:, f:2 * f].t() @ z[:, rg:]
        # dx = [dg | du | dz] [W_g; W_u; Â_gu]: one plain GEMM where the weights are packed
        dx = torch.ops.efftune.rows_grad(dgu, w_gu, a_gu, spare, kinds_gu) if ctx.needs_input_grad[0] else None
        return (dx, dz.t() @ x, da_d, db_g, db_u, dy.t() @ zd, None, None) + (None,) * len(weights)


_STANDARD_FORWARD = re.compile(r"(\w+) = self\.down_proj\(self\.act_fn\(self\.gate_proj\(x\)\) \* self\.up_proj\(x\)\)"
                               r"return \1")
_SILU = ("SiLU", "SiLUActivation")


def is_swiglu_mlp(module: nn.Module) -> bool:
    """A module whose forward is exactly `down_proj(act_fn(gate_proj(x)) * up_proj(x))`, act SiLU."""
    if type(getattr(module, "act_fn", None)).__name__ not in _SILU:
        return False
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False
    lines = [ln.strip() for ln in source.splitlines()[1:] if ln.strip() and not ln.strip().startswith("#")]
    return bool(_STANDARD_FORWARD.fullmatch("".join(lines)))


class FusedSwiGLU(nn.Module):
    """Stands in for a SwiGLU MLP (see the module docstring); `original` gives the module back."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act_fn = mlp.act_fn
        self.__dict__["_original"] = mlp  # not a submodule: its children are registered here already
        # the spare rows after the gate and up weights, packed as one matrix (set by pack())
        self.register_buffer("gate_up_spare", None, persistent=False)
        # load_state_dict(assign=True) puts new tensors in place of the weights: pack those
        self.register_load_state_dict_post_hook(lambda module, keys: module.pack())

    def pack(self) -> None:
        """Store the gate and up projections' frozen weights as one matrix with spare rows for the
        widest pair of their adapters' A factors (`packing`); a packing that still fits is kept."""
        from .layer import LoraLinear
        gate, up = self.gate_proj, self.up_proj
        if not (isinstance(gate, LoraLinear) and isinstance(up, LoraLinear)) \
                or type(gate.base_layer) is not nn.Linear or type(up.base_layer) is not nn.Linear:
            self.gate_up_spare = None
            return
        rows = max((gate.adapters[n].r + up.adapters[n].r for n in gate.adapters if n in up.adapters), default=0)
        bases = [gate.base_layer, up.base_layer]
        if packing.matrix([b.weight for b in bases], self.gate_up_spare, rows) is None:
            self.gate_up_spare = packing.pack_rows(bases, rows)

    def _apply(self, fn, recurse=True):
        # weights on the meta device are not packed (they have no storage); `to_empty` gives them some
        unpacked_meta = self.gate_up_spare is None and any(p.is_meta for p in self.parameters())
        super()._apply(fn, recurse)
        if self.gate_up_spare is not None or (unpacked_meta and not any(p.is_meta for p in self.parameters())):
            self.pack()  # a move or a cast gave the weights storage of their own
        return self

    def original(self) -> nn.Module:
        """The replaced module, its children set to this one's current children, and the gate and
        up weights in storage of their own again."""
        mlp = self._original
        packing.unpack([m.base_layer if hasattr(m, "base_layer") else m for m in (self.gate_proj, self.up_proj)])
        self.gate_up_spare = None
        for name in ("gate_proj", "up_proj", "down_proj", "act_fn"):
            setattr(mlp, name, getattr(self, name))
        return mlp

    def forward(self, x: Tensor) -> Tensor:
        y = self._fused(x)
        if y is None:
            y = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return y

    def _fused(self, x: Tensor) -> Tensor | None:
        from .layer import LoraLinear
        gate, up, down = self.gate_proj, self.up_proj, self.down_proj
        if not all(isinstance(m, LoraLinear) and m.fused is not None for m in (gate, up, down)) \
                or gate.fused.layers != [gate, up] or down.fused.layers != [down] \
                or hooked(gate, up, down, self.act_fn):
            return None
        if any(m.base_layer.bias is not None for m in (gate, up, down)):
            return None
        gu, d = gate.fused.plan(x), down.fused.plan(x)
        if gu is None or d is None or (gu[0], gu[2]) != (d[0], d[2]):  # one adapter, one compute dtype
            return None
        if any(a.scales_output for a in gu[1] + d[1]):
            return None  # DoRA: the MLP's own code runs, each projection through `lora_linears` and DoRA's scale
        dtype = gu[2]
        (w_g, w_u), _, a_gu, (b_g, b_u) = gate.fused.operands(*gu[1:])
        (w_d,), _, a_d, (b_d,) = down.fused.operands(*d[1:])
        weights = [t for _, tensors in (w_g, w_u, w_d) for t in tensors]
        kinds = tuple(kind for kind, _ in (w_g, w_u, w_d))
        y = SwigluLora.apply(x.reshape(-1, x.shape[-1]).to(dtype), a_gu, a_d, b_g, b_u, b_d, self.gate_up_spare,
                             kinds, *weights)
        return y.view(*x.shape[:-1], y.shape[-1])


def wrap_swiglu_mlps(model: nn.Module) -> int:
    """Put a `FusedSwiGLU` in place of every SwiGLU MLP whose three projections are LoRA layers.
    Returns how many are wrapped now (earlier wrappers included)."""
    from .layer import LoraLinear
    count = 0
    for name, module in list(model.named_modules()):
        if is_swiglu_mlp(module) and all(isinstance(getattr(module, p, None), LoraLinear)
                                         for p in ("gate_proj", "up_proj", "down_proj")):
            module = FusedSwiGLU(module)
            replace_module(model, name, module)
        if isinstance(module, FusedSwiGLU):
            count += 1
    pack_swiglu_mlps(model)  # again after a new adapter: its A factors may need more spare rows
    return count


def pack_swiglu_mlps(model: nn.Module) -> None:
    """Bring every `FusedSwiGLU`'s packing up to date: after a new adapter, or after its base
    layers were swapped (`train.fp8_base`), which must not leave the old matrix held by its spare rows."""
    for module in model.modules():
        if isinstance(module, FusedSwiGLU):
            module.pack()


def unwrap_swiglu_mlps(model: nn.Module) -> None:
    """Put the original MLP modules back (with their current children)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, FusedSwiGLU):
            replace_module(model, name, module.original())

"""A SwiGLU MLP whose three projections carry LoRA, as one autograd function:

    g = x W_gᵀ + z_g B_gᵀ,  u = x W_uᵀ + z_u B_uᵀ  (z = x Â_guᵀ, Â the stacked, scaled A factors)
    h = silu(g) · u,        y = h W_dᵀ + (h Â_dᵀ) B_dᵀ

Why: at 8B shapes the MLP's middle tensors (tokens × 14336) dominate LoRA's memory traffic.
The `lora_linears` path writes the gate and up updates `z B_gᵀ`, `z B_uᵀ` at full width, reads h
again for the down projection's `z_d`, and backward reads dg and du again for dz. Here:
- forward adds the rank-r updates inside the SwiGLU pass (`swiglu_lora_forward`); the frozen
  GEMMs write g0 = x W_gᵀ and u0 = x W_uᵀ, which are kept instead of g and u;
- forward's pass also makes the down projection's `z_d = h Â_dᵀ` (no second read of h);
- backward runs one pass over (dh0, g0, u0) (`swiglu_lora_backward`) that adds the down
  projection's LoRA term to its frozen input gradient (dh = dh0 + dz_d Â_d, dh0 = dy W_d), recomputes
  g, u and makes dg, du, h and `dz = [dg B_g, du B_u]` together (no second read of dg and du for dz,
  no full-width dz_d Â_d);
- the input gradient `dx = dz Â_gu + dg W_g + du W_u` accumulates in place (`lora_ops`).
On CUDA the two passes are Triton kernels (`swiglu_triton`); elsewhere (CPU, float64 tests) the
same ops run in PyTorch.

`FusedSwiGLU` replaces a transformers MLP module whose forward is exactly
`down_proj(act_fn(gate_proj(x)) * up_proj(x))` with SiLU, keeping its children under their names
(state dicts and peft files are unchanged). It takes the fused path while all three projections
run one plain LoRA adapter under the rules of `lora.FusedLinears`, and the MLP's own formula
otherwise.
"""
from __future__ import annotations

import inspect
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attach import hooked
from .lora_ops import _LIB

_LIB.define("swiglu_lora_forward(Tensor g0, Tensor u0, Tensor z, Tensor bg, Tensor bu, Tensor ad) -> Tensor[]")
_LIB.define("swiglu_lora_backward(Tensor dh, Tensor dzd, Tensor ad, Tensor g0, Tensor u0, Tensor z, Tensor bg, "
            "Tensor bu) -> Tensor[]")


def _gate_up(g0: Tensor, u0: Tensor, z: Tensor, bg: Tensor, bu: Tensor) -> tuple[Tensor, Tensor]:
    """g and u with their LoRA updates, in fp32 at least (as the kernels add them)."""
    acc = torch.promote_types(g0.dtype, torch.float32)
    rg = bg.shape[1]
    g = torch.addmm(g0.to(acc), z[:, :rg].to(acc), bg.t().to(acc))
    u = torch.addmm(u0.to(acc), z[:, rg:].to(acc), bu.t().to(acc))
    return g, u


def swiglu_forward_reference(g0: Tensor, u0: Tensor, z: Tensor, bg: Tensor, bu: Tensor, ad: Tensor) -> list[Tensor]:
    """[h, z_d]: h = silu(g0 + z_g B_gᵀ) · (u0 + z_u B_uᵀ) rounded once to g0's dtype, z_d = h Â_dᵀ."""
    g, u = _gate_up(g0, u0, z, bg, bu)
    h = (F.silu(g) * u).to(g0.dtype)
    return [h, h @ ad.t()]


def swiglu_backward_reference(dh: Tensor, dzd: Tensor, ad: Tensor, g0: Tensor, u0: Tensor, z: Tensor, bg: Tensor,
                              bu: Tensor) -> list[Tensor]:
    """[dg, du, h, dz = [dg B_g, du B_u]] for the upstream gradient dh + dzd ad (summed in fp32 at least)."""
    g, u = _gate_up(g0, u0, z, bg, bu)
    s = torch.sigmoid(g)
    silu = g * s
    dhf = torch.addmm(dh.to(g.dtype), dzd.to(g.dtype), ad.to(g.dtype))
    dg = (dhf * u * s * (1 + g * (1 - s))).to(dh.dtype)
    du = (dhf * silu).to(dh.dtype)
    return [dg, du, (silu * u).to(dh.dtype), torch.cat([dg @ bg, du @ bu], dim=1)]


_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # float64 takes the PyTorch version


def _cuda_forward(g0, u0, z, bg, bu, ad):
    if g0.dtype not in _KERNEL_DTYPES:
        return swiglu_forward_reference(g0, u0, z, bg, bu, ad)
    from . import swiglu_triton
    return swiglu_triton.forward(g0, u0, z, bg, bu, ad)


def _cuda_backward(dh, dzd, ad, g0, u0, z, bg, bu):
    if g0.dtype not in _KERNEL_DTYPES:
        return swiglu_backward_reference(dh, dzd, ad, g0, u0, z, bg, bu)
    from . import swiglu_triton
    return swiglu_triton.backward(dh, dzd, ad, g0, u0, z, bg, bu)


_LIB.impl("swiglu_lora_forward", swiglu_forward_reference, "CompositeExplicitAutograd")
_LIB.impl("swiglu_lora_backward", swiglu_backward_reference, "CompositeExplicitAutograd")


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
def _(g0, u0, z, bg, bu, ad):
    return [torch.empty_like(g0), z.new_empty(z.shape[0], ad.shape[0])]


@torch.library.register_fake("efftune::swiglu_lora_backward", lib=_LIB)
def _(dh, dzd, ad, g0, u0, z, bg, bu):
    return [torch.empty_like(g0), torch.empty_like(u0), torch.empty_like(g0), torch.empty_like(z)]


class SwigluLora(torch.autograd.Function):
    """apply(x, a_gu, a_d, w_g, w_u, w_d, b_g, b_u, b_d) -> y, all 2-D in one compute dtype;
    a_gu = [s_g A_g; s_u A_u], a_d = s_d A_d. Gradients for x, the A stacks and the B factors."""

    @staticmethod
    def forward(ctx, x, a_gu, a_d, w_g, w_u, w_d, b_g, b_u, b_d):
        z = x @ a_gu.t()
        g0, u0 = x @ w_g.t(), x @ w_u.t()
        h, zd = torch.ops.efftune.swiglu_lora_forward(g0, u0, z, b_g, b_u, a_d)
        ctx.save_for_backward(x, g0, u0, z, zd, a_gu, a_d, w_g, w_u, w_d, b_g, b_u, b_d)
        return torch.ops.efftune.lora_output(h, w_d, None, zd, b_d)

    @staticmethod
    def backward(ctx, dy):
        x, g0, u0, z, zd, a_gu, a_d, w_g, w_u, w_d, b_g, b_u, b_d = ctx.saved_tensors
        dzd = dy @ b_d
        dh0 = dy @ w_d  # the frozen down projection's input gradient, plain: its LoRA term joins in the pass
        dg, du, h, dz = torch.ops.efftune.swiglu_lora_backward(dh0, dzd, a_d, g0, u0, z, b_g, b_u)
        rg = b_g.shape[1]
        dx = torch.ops.efftune.input_grad(dz, a_gu, [dg, du], [w_g, w_u]) if ctx.needs_input_grad[0] else None
        return (dx, dz.t() @ x, dzd.t() @ h, None, None, None, dg.t() @ z[:, :rg], du.t() @ z[:, rg:], dy.t() @ zd)


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

    def original(self) -> nn.Module:
        """The replaced module, its children set to this one's current children."""
        mlp = self._original
        for name in ("gate_proj", "up_proj", "down_proj", "act_fn"):
            setattr(mlp, name, getattr(self, name))
        return mlp

    def forward(self, x: Tensor) -> Tensor:
        y = self._fused(x)
        if y is None:
            y = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return y

    def _fused(self, x: Tensor) -> Tensor | None:
        from .lora import LoraLinear
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
        dtype = gu[2]
        (w_g, w_u), _, a_gu, (b_g, b_u) = gate.fused.operands(*gu[1:])
        (w_d,), _, a_d, (b_d,) = down.fused.operands(*d[1:])
        y = SwigluLora.apply(x.reshape(-1, x.shape[-1]).to(dtype), a_gu, a_d, w_g, w_u, w_d, b_g, b_u, b_d)
        return y.view(*x.shape[:-1], y.shape[-1])


def wrap_swiglu_mlps(model: nn.Module) -> int:
    """Put a `FusedSwiGLU` in place of every SwiGLU MLP whose three projections are LoRA layers.
    Returns how many are wrapped now (earlier wrappers included)."""
    from .lora import LoraLinear
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, FusedSwiGLU):
            count += 1
        elif is_swiglu_mlp(module) and all(isinstance(getattr(module, p, None), LoraLinear)
                                           for p in ("gate_proj", "up_proj", "down_proj")):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, FusedSwiGLU(module))
            count += 1
    return count


def unwrap_swiglu_mlps(model: nn.Module) -> None:
    """Put the original MLP modules back (with their current children)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, FusedSwiGLU):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.original())

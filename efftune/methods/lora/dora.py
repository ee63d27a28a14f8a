"""DoRA (Liu et al. 2024): `W' = m ⊙ (W0 + s B A) / n`, `n = ‖W0 + s B A‖` per output feature
(one norm per row of the (out × in) weight), `m` trainable, initialised to the row norms of W0.

As in the paper (section 4.3) and peft, n is a constant in backward, so

    y = g ⊙ (W0 x + s B A x) + bias,   g = m / n   (one value per output feature),

which is LoRA's output times a per-feature vector. Two things make that as cheap as LoRA:
- n never needs `B A` at full size: `n² = ‖W0‖² + 2s·rowsum(B ⊙ (W0 Aᵀ)) + s²·rowsum((B (A Aᵀ)) ⊙ B)`
  costs one skinny GEMM `W0 Aᵀ` (out × r) and r × r work per step (`norms`), and ‖W0‖² per row is
  cached while W0 does not change (`DoraAdapter.base_norm_sq`);
- the scale sits on top of LoRA's output, so the fused `lora_linears` op runs unchanged and
  `DoraScale` multiplies its result. DoraScale keeps its *output* for backward and recovers
  `v = (y - bias) / g` there, not v: where the next op keeps y anyway (SwiGLU's gate and up, the
  value projection for attention), DoRA then keeps nothing more than LoRA does.

The adapter's parameters are LoRA's plus `lora_magnitude_vector` (out,), peft's name; on disk it is
peft's DoRA (`use_dora: true`). With several active adapters each adds `scale(W0 x + its update) -
W0 x`, as peft's do. One difference from peft: with dropout, peft applies the dropped input to the
base term of a DoRA layer too while training (`(g - 1) ⊙ W0 drop(x)`); here dropout reaches the LoRA
branch only, `g ⊙ (W0 x + s B A drop(x))`, as it does in LoRA. Without dropout (the default) and in
evaluation the two are the same.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ...errors import EfftuneError
from ...quantize import bnb
from ...quantize.linear import QuantizedLinear
from .layer import LoraAdapter, LoraLayer, LoraLinear


def out_in_weight(layer: LoraLayer) -> Tensor:
    """The base weight as an (out, in) matrix (a transposed view for transformers' Conv1D); a
    quantised base's dequantised in its compute dtype (a new tensor, for this step's norms only)."""
    if isinstance(layer, LoraLinear) and isinstance(layer.base_layer, QuantizedLinear):
        return layer.base_layer.dequantize()
    if bnb.bnb_kind(layer.base_layer) is not None:
        raise EfftuneError(f"DoRA on {bnb.describe(layer.base_layer)} layers is not supported: load the model "
                           "in bf16 and use efftune's --quantize nf4 | int8, on which DoRA trains")
    if not isinstance(layer, LoraLinear) or not isinstance(getattr(layer.base_layer, "weight", None), Tensor):
        raise EfftuneError(f"DoRA needs a linear base layer with a plain or quantised weight; got "
                           f"{type(layer.base_layer).__name__} (DoRA on embeddings or on FP8 bases (train.fp8_base) "
                           "is not supported)")
    return layer.to_weight_layout(layer.base_layer.weight)


def stored_weight(layer: LoraLayer, w0: Tensor) -> Tensor:
    """The tensor that holds W0 (w0 from `out_in_weight`): its version and address say when W0
    changed. A quantised base's packed codes, not the dequantised copy that is new every call."""
    return layer.base_layer.quantized()[0] if isinstance(layer.base_layer, QuantizedLinear) else w0


def row_norms_sq(w0: Tensor) -> Tensor:
    """‖W0‖² per row (out,), in fp32 at least."""
    return w0.to(torch.promote_types(w0.dtype, torch.float32)).square().sum(dim=1)


@torch.no_grad()
def norms(w0: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, w0_norm_sq: Tensor | None = None) -> Tensor:
    """n = ‖W0 + s B A‖ per row (out,), without forming B A (see the module docstring), in fp32 at
    least. `w0_norm_sq`: ‖W0‖² per row when the caller has it cached. No gradient (n is a constant)."""
    acc = torch.promote_types(lora_A.dtype, torch.float32)
    if w0_norm_sq is None:
        w0_norm_sq = row_norms_sq(w0)
    # the one pass over W0 per step: (out × in)(in × r) in W0's dtype, fp32 accumulation inside the GEMM
    w0_at = (w0 @ lora_A.to(w0.dtype).t()).to(acc)
    a, b = lora_A.to(acc), lora_B.to(acc)
    cross = (b * w0_at).sum(dim=1)
    square = ((b @ (a @ a.t())) * b).sum(dim=1)
    n_sq = w0_norm_sq.to(acc) + (2 * scaling) * cross + (scaling * scaling) * square
    return n_sq.clamp_min(0).sqrt()  # clamp: rounding can take an (almost) zero row just below 0


class DoraScale(torch.autograd.Function):
    """apply(v, m, n, bias) -> y = (m / n) ⊙ v + bias, per output feature (v's last dimension).

    Gradients for v and m (n is a constant; bias is frozen). Keeps y, not v (module docstring):
    backward recovers `v = (y - bias) / g`; a feature whose g is exactly 0 (m = 0) gets no
    gradient for m, as v cannot be recovered from its output."""

    @staticmethod
    def forward(ctx, v: Tensor, m: Tensor, n: Tensor, bias: Tensor | None) -> Tensor:
        g = (m.detach() / n).to(v.dtype)
        y = v * g if bias is None else torch.addcmul(bias.to(v.dtype), v, g)
        ctx.save_for_backward(y, g, n, bias)
        ctx.m_dtype = m.dtype
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        y, g, n, bias = ctx.saved_tensors
        dv = dy * g if ctx.needs_input_grad[0] else None
        dm = None
        if ctx.needs_input_grad[1]:
            v = y if bias is None else y - bias.to(y.dtype)
            v = torch.where(g != 0, v / g, 0)
            dg = (dy * v).reshape(-1, v.shape[-1]).sum(dim=0, dtype=torch.promote_types(v.dtype, torch.float32))
            dm = (dg / n).to(ctx.m_dtype)
        return dv, dm, None, None


class DoraAdapter(LoraAdapter):
    """A LoRA adapter plus `lora_magnitude_vector` m (out,); the layer's output is `(m / n) ⊙ (W0 x +
    s B A x) + bias`. m starts at the row norms of the base weight (set in `attached`)."""

    scales_output = True

    def __init__(self, in_features: int, out_features: int, r: int, scaling: float, dropout: float = 0.0,
                 init: str = "kaiming", *, device=None, dtype=None):
        super().__init__(in_features, out_features, r, scaling, dropout, init, device=device, dtype=dtype)
        self.lora_magnitude_vector = nn.Parameter(torch.ones(out_features, device=device, dtype=dtype))
        # ‖W0‖² per row: W0 is frozen, so it is read once, not every step. Recomputed when W0 changes
        # (merge, unmerge, a load into it, a move), which the key tells; not in the state dict.
        self.register_buffer("base_norm_sq", None, persistent=False)
        self._norm_key: tuple | None = None

    def attached(self, layer: LoraLayer) -> None:
        with torch.no_grad():
            self.lora_magnitude_vector.copy_(self.norms(layer))

    def _base_norm_sq(self, w0: Tensor, stored: Tensor) -> Tensor:
        if torch.compiler.is_compiling() and self.base_norm_sq is not None:
            # W0 is frozen while training; compile_blocks refreshed the cache just before (a
            # version check here would break the compiled graph)
            return self.base_norm_sq
        key = (stored._version, stored.data_ptr(), w0.device, w0.dtype, tuple(w0.shape))
        if self.base_norm_sq is None or self._norm_key != key:
            self.base_norm_sq, self._norm_key = row_norms_sq(w0.detach()), key
        return self.base_norm_sq

    def norms(self, layer: LoraLayer) -> Tensor:
        """n = ‖W0 + s B A‖ per output feature, for the layer's current base weight."""
        w0 = out_in_weight(layer)
        return norms(w0, self.lora_A, self.lora_B, self.scaling, self._base_norm_sq(w0, stored_weight(layer, w0)))

    def refresh_caches(self, layer: LoraLayer) -> None:
        w0 = out_in_weight(layer)
        self._base_norm_sq(w0, stored_weight(layer, w0))

    def scale_output(self, layer: LoraLayer, v: Tensor, bias: Tensor | None) -> Tensor:
        return DoraScale.apply(v, self.lora_magnitude_vector, self.norms(layer), bias)

    @torch.no_grad()
    def merge_scale(self, layer: LoraLayer, w0: Tensor) -> Tensor:
        # merging is rare: the norms of the explicit W0 + ΔW, exact
        n = (w0 + self.delta_weight().to(w0.dtype)).norm(dim=1)
        return self.lora_magnitude_vector.to(w0.dtype) / n


"""int8 weight-only (LLM.int8()'s vector-wise form, without the fp16 outlier columns): each output
row is stored as int8 with one fp32 scale, its absolute maximum / 127, so every weight comes back
within half a step (scale / 2). No shape constraint. The outlier decomposition of LLM.int8()
matters for int8 *activations*; here only the frozen weight is int8 and the matmul runs in the
compute dtype after dequantisation."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Int8Weight:
    """A (out, in) weight as q: int8 (out, in) and scale: fp32 (out,), weight ≈ scale[:, None] · q."""
    q: Tensor
    scale: Tensor

    def tensors(self) -> tuple[Tensor, Tensor]:
        return self.q, self.scale


@torch.no_grad()
def quantize(weight: Tensor) -> Int8Weight:
    w = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
    scale = w.abs().amax(dim=1) / 127
    q = w / scale.clamp_min(torch.finfo(scale.dtype).tiny)[:, None]  # an all-zero row stays 0
    return Int8Weight(q.round().clamp(-127, 127).to(torch.int8), scale.float())


def dequantize(q: Tensor, scale: Tensor, dtype: torch.dtype, rows=None) -> Tensor:
    """The dense weight in `dtype` (the product in fp32 at least, rounded once): q (out, in) with its
    row scales (out,), or experts' stacked q (E, out, in) with theirs (E, out). `rows`: `scale_rows`
    or a compiled form of it (`linear.compiled_on_gpu`)."""
    return (rows or scale_rows)(q.reshape(-1), scale.reshape(-1), dtype).view(q.shape)


def scale_rows(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """Flat codes `q` whose rows (of len(q) / len(scale) codes) each take their scale, flat, in `dtype`.
    All flat, so a compiled form has one graph for every layer shape (see `nf4.decode_scaled`)."""
    work = torch.promote_types(dtype, torch.float32)
    return (q.to(work).view(scale.shape[0], -1) * scale.to(work)[:, None]).view(-1).to(dtype)

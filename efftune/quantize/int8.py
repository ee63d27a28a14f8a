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


def dequantize(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """The dense weight in `dtype` (the product in fp32 at least, rounded once)."""
    work = torch.promote_types(dtype, torch.float32)
    return (q.to(work) * scale.to(work)[:, None]).to(dtype)

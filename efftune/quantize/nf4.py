"""NF4 weights (QLoRA, Dettmers et al. 2023): 4-bit NormalFloat codes in blocks of 64, with the
block scales double-quantised to 8 bits.

- The 16 codes are quantiles of N(0, 1) scaled to [-1, 1] with an exact 0 (8 positive, 7 negative
  levels: an asymmetric code so that 0 is one of them). Weights of a trained layer are roughly
  Gaussian, so every code is used about equally often: the most information 4 bits can carry.
- A block is 64 consecutive weights of one row (so rows dequantise on their own: a kernel can
  dequantise any set of rows); its scale is its absolute maximum, and each weight stores the index
  of the code nearest to `w / scale`.
- Double quantisation: the scales (one fp32 per 64 weights = 0.5 bits a weight) lose their mean
  and are stored as int8 in blocks of 256 with one fp32 scale each: 8/64 + 32/(64·256) ≈ 0.127 bits
  a weight. The codes are then chosen against the *dequantised* scales, the ones that will
  multiply them, so the scale's rounding is partly absorbed by the choice of code.

Plain PyTorch, any device and float dtype. `dequantize` makes the dense weight of one layer in the
compute dtype, for the matmul that needs it; nothing keeps it (`efftune.quantize.linear`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

BLOCK = 64           # weights per scale
SCALE_BLOCK = 256    # scales per second-level scale (double quantisation)

# The NF4 code of QLoRA (Appendix E of the paper; bitsandbytes' table), fp32. `normal_float_code`
# rebuilds it from normal quantiles.
CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236206, 1.0)


def normal_float_code(offset: float = 0.9677083) -> Tensor:
    """The NF4 code from its definition (float64): 8 quantiles of N(0, 1) above the median and 7
    below, evenly spaced in probability from 1 - offset / offset to 0.5 (offset: the paper's
    (1 - 1/(2·15) + 1 - 1/(2·16)) / 2, so the extreme levels are finite), plus 0, divided by the
    largest. The asymmetry gives 0 a level of its own."""
    ppf = torch.special.ndtri
    pos = ppf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -ppf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    code = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return code / code.abs().max()


@dataclass
class Nf4Weight:
    """A (out, in) weight in NF4. codes: uint8 (out, in / 2), two 4-bit code indices a byte (the
    even column in the high nibble); scale_q: int8 (n), n = out · in / 64 padded to whole blocks of
    256; scale_scale: fp32 (n / 256); scale_mean: fp32 (), the mean the scales lost."""
    codes: Tensor
    scale_q: Tensor
    scale_scale: Tensor
    scale_mean: Tensor

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.codes, self.scale_q, self.scale_scale, self.scale_mean


def fits(out_features: int, in_features: int) -> bool:
    """Whether a weight of this shape splits into blocks (rows of a multiple of 64 weights)."""
    return in_features % BLOCK == 0 and out_features > 0


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def quantize_scales(scales: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Double quantisation: fp32 scales (n,) -> (int8 (m,), fp32 second-level scales (m / 256,),
    fp32 mean ()), m = n rounded up to a multiple of 256 (the padding holds zeros). Each scale comes
    back within half a step (its block's largest |scale - mean| / 254) of its value."""
    n = scales.numel()
    mean = scales.mean()
    centred = torch.zeros(-(-n // SCALE_BLOCK) * SCALE_BLOCK, dtype=scales.dtype, device=scales.device)
    centred[:n] = scales - mean
    blocks = centred.view(-1, SCALE_BLOCK)
    step = blocks.abs().amax(dim=1) / 127
    q = torch.where(step[:, None] > 0, blocks / step[:, None].clamp_min(torch.finfo(step.dtype).tiny), 0.0)
    return q.round().clamp(-127, 127).to(torch.int8).view(-1), step.float(), mean.float()


def dequantize_scales(scale_q: Tensor, scale_scale: Tensor, scale_mean: Tensor, n: int) -> Tensor:
    """The n block scales (fp32) back from their double quantisation; with leading dimensions (stacked
    experts: scale_q (E, m), scale_scale (E, m / 256), scale_mean (E,)), n for each -> (E, n)."""
    lead = scale_q.shape[:-1]
    blocks = scale_q.view(*lead, -1, SCALE_BLOCK).float() * scale_scale[..., None]
    return blocks.view(*lead, -1)[..., :n] + scale_mean[..., None]


@torch.no_grad()
def quantize(weight: Tensor) -> Nf4Weight:
    """weight (out, in), in % 64 == 0 -> its NF4 form."""
    out_f, in_f = weight.shape
    if not fits(out_f, in_f):
        raise ValueError(f"NF4 needs rows of a multiple of {BLOCK} weights; this weight is {out_f} x {in_f}")
    blocks = weight.detach().to(_work_dtype(weight.dtype)).reshape(-1, BLOCK)
    scale_q, scale_scale, scale_mean = quantize_scales(blocks.abs().amax(dim=1).float())
    scales = dequantize_scales(scale_q, scale_scale, scale_mean, blocks.shape[0]).to(blocks.dtype)
    code = torch.tensor(CODE, dtype=blocks.dtype, device=weight.device)
    # nearest code by the midpoints between neighbours (ties to the lower code); a scale that
    # rounded to 0 (an all-zero block among large ones) codes its block as 0
    x = torch.where(scales[:, None] != 0, blocks / torch.where(scales != 0, scales, 1.0)[:, None], 0.0)
    idx = torch.bucketize(x, (code[1:] + code[:-1]) / 2).to(torch.uint8).view(out_f, in_f)
    codes = (idx[:, 0::2] << 4) | idx[:, 1::2]
    return Nf4Weight(codes.contiguous(), scale_q, scale_scale, scale_mean)


def code_table(device: torch.device | str | None = None) -> Tensor:
    """CODE as an fp32 tensor (a layer keeps one on its device, so a dequantisation copies nothing)."""
    return torch.tensor(CODE, dtype=torch.float32, device=device)


def dequantize(codes: Tensor, scale_q: Tensor, scale_scale: Tensor, scale_mean: Tensor,
               dtype: torch.dtype, table: Tensor | None = None, decode=None) -> Tensor:
    """The dense (out, in) weight in `dtype` (computed in fp32 at least, rounded once); for stacked
    experts' tensors (codes (E, out, in / 2), each expert quantised on its own) all of them, (E, out, in).
    `table`: `code_table()` on the codes' device (made here when not given). `decode`: `decode_scaled`
    or a compiled form of it (`linear.compiled_on_gpu`), which does all but the block scales' few elements."""
    *lead, out_f, half = codes.shape
    work = _work_dtype(dtype)
    code = (code_table(codes.device) if table is None else table).to(work)
    scales = dequantize_scales(scale_q, scale_scale, scale_mean, out_f * half * 2 // BLOCK).to(work)
    return (decode or decode_scaled)(codes.reshape(-1), scales.reshape(-1), code, dtype).view(*lead, out_f, half * 2)


def decode_scaled(codes: Tensor, scales: Tensor, code: Tensor, dtype: torch.dtype) -> Tensor:
    """The weights of flat `codes` (uint8, two a byte) as a flat tensor in `dtype`: each code's value
    in `code`'s dtype (the work dtype) times its 64-weight block's scale (`scales`, one a block, in
    that dtype), rounded once. All tensors flat, so a compiled form has one graph for every layer
    shape (no size relations between dimensions to guard on)."""
    # scaled in place: the gather's output is a fresh buffer, so no second fp32 copy of the weight exists
    return decode_bytes(codes, code).view(-1, BLOCK).mul_(scales[:, None]).view(-1).to(dtype)


def decode_bytes(codes: Tensor, code: Tensor) -> Tensor:
    """Every byte of `codes` (uint8, any shape) as its two weights' code values, in order:
    (codes.numel(), 2) in `code`'s dtype (`code`: the 16 values)."""
    # byte b -> (code[b >> 4], code[b & 15]): one lookup per byte gives both of its weights. index_select
    # with 32-bit indices is the same gather as pairs[codes.long()] in a third of its time on the CPU
    # (the lookup is most of a dequantisation), with half the index bytes written and read
    pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)
    return torch.index_select(pairs, 0, codes.reshape(-1).to(torch.int32))

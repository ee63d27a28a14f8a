"""NF4 decoding as one Triton kernel on CUDA GPUs: `nf4.decode_scaled`'s work (each byte's two code
values times their 64-weight block's scale, rounded once to the compute dtype) in one pass that
reads the packed codes and writes the dense weight, nothing else.

Why a kernel of its own: the compiled form of `decode_scaled` (torch.compile of a gather from a
256-pair table, a multiply and a cast) reached at most 1,455 GB/s on an H100, 0.17-0.42x the GEMM it
feeds (bench/RESULTS.md, session 18), and an NF4 LoRA step dequantises every frozen weight twice (for
forward, and for backward's input gradient): 0.83x the bf16 step at the 8B shape (session 20). Here
each program reads a contiguous run of code bytes, looks both nibbles up in the 16-value table, scales
them by the block scale (a block is 32 bytes) and writes the weights interleaved, high nibble first,
as `nf4.quantize` packs them. Bits: the same products in fp32 and the same single rounding as
`decode_scaled`, so a dequantised weight is identical whichever path made it (tests check both).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .nf4 import BLOCK

BYTES = 2048  # code bytes a program decodes (4,096 weights, 64 blocks): a multiple of a block's 32 bytes
NUM_WARPS = 8
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _decode_kernel(codes_ptr, scales_ptr, code_ptr, out_ptr, n_bytes, BYTES: tl.constexpr,
                   BLOCK_BYTES: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BYTES  # 64-bit: weights of a large expert stack pass 2^31
    offs = start + tl.arange(0, BYTES)
    inside = offs < n_bytes
    b = tl.load(codes_ptr + offs, mask=inside, other=0).to(tl.int32)
    scale = tl.load(scales_ptr + offs // BLOCK_BYTES, mask=inside, other=0.)
    high = tl.load(code_ptr + (b >> 4)) * scale
    low = tl.load(code_ptr + (b & 15)) * scale
    # byte i holds weights 2i (high nibble) and 2i + 1: (BYTES, 2) row-major is the weights in order
    weights = tl.reshape(tl.join(high, low), (2 * BYTES,))
    out = 2 * start + tl.arange(0, 2 * BYTES)
    # rounded to nearest, ties to even, as torch casts (Triton's CPU interpreter truncates to bf16 all the same)
    tl.store(out_ptr + out, weights.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=out < 2 * n_bytes)


def decode_scaled(codes: Tensor, scales: Tensor, code: Tensor, dtype: torch.dtype) -> Tensor:
    """`nf4.decode_scaled` on a CUDA GPU: flat uint8 `codes`, fp32 `scales` (one a 64-weight block)
    and fp32 `code` (the 16 values) -> the flat weights in `dtype` (one of DTYPES)."""
    if dtype not in DTYPES or code.dtype != torch.float32 or scales.dtype != torch.float32:
        raise ValueError(f"the NF4 decoding kernel takes fp32 scales and code and writes one of {DTYPES}, "
                         f"got {scales.dtype} / {code.dtype} -> {dtype}")
    codes, scales, code = codes.contiguous(), scales.contiguous(), code.contiguous()
    n = codes.numel()
    out = torch.empty(2 * n, dtype=dtype, device=codes.device)
    if n:
        _decode_kernel[(triton.cdiv(n, BYTES),)](codes, scales, code, out, n, BYTES=BYTES,
                                                BLOCK_BYTES=BLOCK // 2, num_warps=NUM_WARPS)
    return out

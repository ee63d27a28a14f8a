"""NF4 dequantisation as one Triton kernel on CUDA GPUs: `nf4.dequantize`'s work (the double-quantised
block scales back to fp32, each byte's two code values times their 64-weight block's scale, rounded
once to the compute dtype) in one pass that reads the packed tensors and writes the dense weight.

Why a kernel of its own: the compiled form of `nf4.decode_scaled` (torch.compile of a gather from a
256-pair table, a multiply and a cast) reached at most 577 GB/s on an H100 at the 8B shapes, 0.42x the
GEMM it feeds (bench/RESULTS.md, session 20), after a few eager ops for the scales, and an NF4 LoRA step
dequantises every frozen weight twice (for forward, and for backward's input gradient; three times
with activation checkpointing): 0.83x the bf16 step at the 8B shape. Here each program reads a
contiguous run of code bytes (whole 32-byte blocks), makes each block's scale from its int8 code, its
256-block's fp32 step and the fp32 mean, looks both nibbles up in the 16-value table, scales them and
writes the weights interleaved, high nibble first, as `nf4.quantize` packs them. Stacked experts
(codes (E, out, in / 2), scales per expert) go through in the same pass.

Bits: the same fp32 operations in the same order as the eager functions, each rounded as torch rounds
it (no fused multiply-add: `enable_fp_fusion=False`), so a dequantised weight is identical whichever
path made it (tests check under Triton's CPU interpreter; bench/kernel_bench.py on the GPU).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .nf4 import BLOCK, SCALE_BLOCK

BYTES = 2048  # code bytes a program dequantises (4,096 weights, 64 whole blocks)
NUM_WARPS = 8
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _dequantize_kernel(codes_ptr, scale_q_ptr, scale_scale_ptr, mean_ptr, code_ptr, out_ptr, n_bytes,
                       blocks_per_expert, scales_per_expert, BYTES: tl.constexpr, BLOCK_BYTES: tl.constexpr,
                       SCALE_BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BYTES  # 64-bit: the weights of an expert stack pass 2^31
    offs = start + tl.arange(0, BYTES)
    inside = offs < n_bytes
    b = tl.load(codes_ptr + offs, mask=inside, other=0).to(tl.int32)
    block = offs // BLOCK_BYTES  # the byte's 64-weight block over the whole stack
    expert = block // blocks_per_expert
    j = block - expert * blocks_per_expert  # the block within its expert
    q = tl.load(scale_q_ptr + expert * scales_per_expert + j, mask=inside, other=0).to(tl.float32)
    step = tl.load(scale_scale_ptr + expert * (scales_per_expert // SCALE_BLOCK) + j // SCALE_BLOCK,
                   mask=inside, other=0.)
    scale = q * step + tl.load(mean_ptr + expert, mask=inside, other=0.)  # two roundings, as torch's
    high = tl.load(code_ptr + (b >> 4)) * scale
    low = tl.load(code_ptr + (b & 15)) * scale
    # byte i holds weights 2i (high nibble) and 2i + 1: (BYTES, 2) row-major is the weights in order
    weights = tl.reshape(tl.join(high, low), (2 * BYTES,))
    out = 2 * start + tl.arange(0, 2 * BYTES)
    # Triton rounds an fp32 downcast to nearest, ties to even, as torch casts (its CPU interpreter
    # truncates to bf16 instead: see the tests)
    tl.store(out_ptr + out, weights.to(out_ptr.dtype.element_ty), mask=out < 2 * n_bytes)


def dequantize(codes: Tensor, scale_q: Tensor, scale_scale: Tensor, scale_mean: Tensor, code: Tensor,
               dtype: torch.dtype) -> Tensor:
    """`nf4.dequantize(codes, scale_q, scale_scale, scale_mean, dtype, code)` on a CUDA GPU: the dense
    (out, in) weight, or (E, out, in) for stacked experts, in `dtype` (one of DTYPES); `code` the fp32
    16-value table."""
    if dtype not in DTYPES or code.dtype != torch.float32 or scale_scale.dtype != torch.float32:
        raise ValueError(f"the NF4 dequantisation kernel takes fp32 scales and code and writes one of {DTYPES}, "
                         f"got {scale_scale.dtype} / {code.dtype} -> {dtype}")
    *lead, out_f, half = codes.shape
    experts = math.prod(lead)
    out = torch.empty(*lead, out_f, 2 * half, dtype=dtype, device=codes.device)
    n = codes.numel()
    if n:
        _dequantize_kernel[(triton.cdiv(n, BYTES),)](
            codes.contiguous(), scale_q.contiguous(), scale_scale.contiguous(), scale_mean.contiguous(),
            code.contiguous(), out, n, n // experts // (BLOCK // 2), scale_q.shape[-1], BYTES=BYTES,
            BLOCK_BYTES=BLOCK // 2, SCALE_BLOCK=SCALE_BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False)
    return out

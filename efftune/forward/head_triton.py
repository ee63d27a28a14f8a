"""Triton kernels for the chunked LM-head loss (`logprobs.ChunkedTargetLogprob`: in forward for a
frozen head, in backward for a trainable one): from one chunk's logits (rows × vocabulary) and the rows' targets make

    logprob[n] = logits[n, t_n] − logsumexp(logits[n])
    dlogits[n] = onehot(t_n) − softmax(logits[n])   (rounded once to the output dtype)

in two passes over the logits, where `torch.compile` of the same maths runs three (a maximum, a
sum of exponentials, then the exponentials again for the gradient) in one program per row.
Each row is cut into a few segments, so a 1,024-row chunk of a 128k vocabulary gives thousands of
programs instead of 1,024 long ones:
- `_stats_kernel`: per segment, the maximum and the sum of exp(x − maximum), in one read (an
  online softmax kept per lane), and in the target's segment the target's logit;
- `_grad_kernel`: per segment, combines its row's segment statistics into the log-sum-exp, reads
  the logits again and writes the gradient; the target's entry is 1 − p made in fp32 and rounded
  once (as `logprobs._chunk_logprob_and_grad` does), and the first segment writes the log-prob
  from the target's logit kept by the first kernel.
The gradient may take the logits' place (same dtype): each element is read before it is written,
by the same program.
Offsets: a row's start (row × row stride) and the per-row statistics' are formed in 64 bits, so a
chunk may pass 2^31 elements (16,800 rows of a 128k vocabulary do); the columns inside a row are
32-bit (`kernel_limits.head_fits`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..kernel_limits import HEAD_MAX_OVERSHOOT, head_fits

_FLOOR = tl.constexpr(-1.0e30)  # a lane's running maximum before it has seen a logit (finite: exp(−inf − −inf) is nan)


@triton.jit
def _stats_kernel(x_ptr, t_ptr, m_ptr, l_ptr, pick_ptr, V, stride,
                  S: tl.constexpr, SEG: tl.constexpr, BLOCK: tl.constexpr):
    n, s = tl.program_id(0).to(tl.int64), tl.program_id(1)
    row = x_ptr + n * stride
    target = tl.load(t_ptr + n)
    m = tl.full((BLOCK,), _FLOOR, tl.float32)
    l = tl.zeros((BLOCK,), tl.float32)
    picked = tl.zeros((BLOCK,), tl.float32)
    for i in range(0, SEG // BLOCK):
        cols = s * SEG + i * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        l = l * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
        picked += tl.where(cols == target, x, 0.)
    top = tl.max(m, 0)
    tl.store(m_ptr + n * S + s, top)
    tl.store(l_ptr + n * S + s, tl.sum(l * tl.exp(m - top), 0))
    if target // SEG == s:  # the target's logit, kept apart: the gradient may overwrite the logits
        tl.store(pick_ptr + n, tl.sum(picked, 0))


@triton.jit
def _grad_kernel(x_ptr, t_ptr, m_ptr, l_ptr, pick_ptr, g_ptr, lp_ptr, V, stride, gstride,
                 S: tl.constexpr, SEG: tl.constexpr, BLOCK: tl.constexpr):
    n, s = tl.program_id(0).to(tl.int64), tl.program_id(1)
    seg = tl.arange(0, S)
    ms, ls = tl.load(m_ptr + n * S + seg), tl.load(l_ptr + n * S + seg)
    top = tl.max(ms, 0)
    lse = top + tl.log(tl.sum(ls * tl.exp(ms - top), 0))
    target = tl.load(t_ptr + n)
    row = x_ptr + n * stride
    grow = g_ptr + n * gstride
    for i in range(0, SEG // BLOCK):
        cols = s * SEG + i * BLOCK + tl.arange(0, BLOCK)
        mask = cols < V
        p = tl.exp(tl.load(row + cols, mask=mask, other=0.).to(tl.float32) - lse)
        g = tl.where(cols == target, 1.0 - p, -p)
        tl.store(grow + cols, g.to(g_ptr.dtype.element_ty), mask=mask)
    if s == 0:
        tl.store(lp_ptr + n, tl.load(pick_ptr + n) - lse)


def _layout(v: int, block: int, max_segments: int) -> tuple[int, int, int]:
    """(segments, segment length, block) for a vocabulary of v: blocks of up to `block` columns,
    up to `max_segments` segments of whole blocks (powers of two)."""
    block = min(block, triton.next_power_of_2(v))
    segments = min(max_segments, triton.next_power_of_2(triton.cdiv(v, block)))
    seg = triton.cdiv(triton.cdiv(v, segments), block) * block
    return segments, seg, block


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# from bench/kernel_bench.py --only head on an H100 (1,024 rows of a 128,256-token vocabulary, bf16)
CONFIG = dict(block=1024, max_segments=8, num_warps=4)


def logprob_and_grad(logits: Tensor, targets: Tensor, dtype: torch.dtype, **config) -> tuple[Tensor, Tensor]:
    """(log_softmax(logits)[n, targets[n]] in fp32, onehot − softmax in `dtype`) for 2-D CUDA
    logits in one of KERNEL_DTYPES with unit column stride and targets in [0, vocabulary).
    `logits` must be a temporary: the gradient takes its place when the dtypes agree."""
    c = {**CONFIG, **config}
    n, v = logits.shape
    if not head_fits(n, v) or c["block"] * c["max_segments"] > HEAD_MAX_OVERSHOOT:
        raise ValueError(f"{n} × {v} logits with {c['max_segments']} segments of {c['block']}-column blocks: "
                         f"column offsets pass 2^31 (logprobs routes such chunks to its PyTorch version)")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    segments, seg, block = _layout(v, c["block"], c["max_segments"])
    targets = targets.contiguous()
    stats = torch.empty(2, n, segments, dtype=torch.float32, device=logits.device)  # maxima, sums of exp
    picked = torch.empty(n, dtype=torch.float32, device=logits.device)  # the targets' logits
    grad = logits if logits.dtype == dtype else torch.empty(n, v, dtype=dtype, device=logits.device)
    logprob = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return logprob, grad
    grid = (n, segments)
    _stats_kernel[grid](logits, targets, stats[0], stats[1], picked, v, logits.stride(0),
                        S=segments, SEG=seg, BLOCK=block, num_warps=c["num_warps"])
    _grad_kernel[grid](logits, targets, stats[0], stats[1], picked, grad, logprob, v, logits.stride(0),
                       grad.stride(0), S=segments, SEG=seg, BLOCK=block, num_warps=c["num_warps"])
    return logprob, grad

"""AdamW with 8-bit moments, one parameter's whole update in one Triton kernel on a CUDA GPU.

`train.optimizer: adamw8bit` keeps torchao's state (`OptimState8bit`: uint8 codes of the parameter's
shape, one fp32 scale per block of 256, a 256-value dynamic code map) and torchao's arithmetic
(`torchao.optim.adam.single_param_adam`); this kernel replaces only how the update runs. torchao's
compiled update took 65 ms of GPU time a step for the 8B shape cut to 12 layers on an H100, ~64 bytes
of memory traffic a weight where the update needs 16 (read the fp32 weight and gradient and two code
bytes, write the weight and the codes): Inductor splits it into a reduction for each moment's new block
scales and passes that read the inputs again. Here each program owns whole blocks: it decodes both
moments, updates them and the weight in fp32, takes each block's new largest magnitude, encodes the
moments against it (torchao's branchless binary search over the code map, then rounding to the nearer
code) and writes everything once.

Arithmetic: torchao's operations in its order, each an IEEE fp32 operation (divisions and square roots
correctly rounded, no fused multiply-add but lerp's own, which torch's kernels fuse:
`enable_fp_fusion=False`), with the step's scalars (bias
corrections, lr x weight decay) made on the host as torchao's fp32 tensors make them. The codes and
scales equal torchao's eager update's, the weights too but where torch's CPU square root (not correctly
rounded) is a bit off (tests run the kernel under Triton's CPU interpreter); torchao's compiled update
may differ from either in the last bit where Inductor reorders or contracts operations.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

ROWS = 8  # 256-value blocks a program updates (2,048 weights)
NUM_WARPS = 4
SHARED = True  # the code map's lookups gathered from the program's copy of it (shared memory), not global


@triton.jit
def _look_up(table, map_ptr, codes, ROWS: tl.constexpr, BLOCK: tl.constexpr, SHARED: tl.constexpr):
    """The code map's values at `codes` (ROWS, BLOCK): from the 256 values held by the program
    (`table`, a gather through shared memory) or from the map in global memory (cached loads)."""
    if SHARED:
        return tl.gather(tl.broadcast_to(table[None, :], (ROWS, 256)), codes, 1)
    else:
        return tl.load(map_ptr + codes)


@triton.jit
def _encode(x, table, map_ptr, ROWS: tl.constexpr, BLOCK: tl.constexpr, SHARED: tl.constexpr):
    """The code of each value of x (already divided by its block's scale): the largest code whose map
    value is <= x, found in 8 halving steps, then the next code if x lies at or past the midpoint."""
    c = tl.where(x >= tl.load(map_ptr + 128), 128, 0)
    c += tl.where(x >= _look_up(table, map_ptr, c + 64, ROWS, BLOCK, SHARED), 64, 0)
    c += tl.where(x >= _look_up(table, map_ptr, c + 32, ROWS, BLOCK, SHARED), 32, 0)
    c += tl.where(x >= _look_up(table, map_ptr, c + 16, ROWS, BLOCK, SHARED), 16, 0)
    c += tl.where(x >= _look_up(table, map_ptr, c + 8, ROWS, BLOCK, SHARED), 8, 0)
    c += tl.where(x >= _look_up(table, map_ptr, c + 4, ROWS, BLOCK, SHARED), 4, 0)
    c += tl.where(x >= _look_up(table, map_ptr, c + 2, ROWS, BLOCK, SHARED), 2, 0)
    c += tl.where(x >= _look_up(table, map_ptr, c + 1, ROWS, BLOCK, SHARED), 1, 0)
    up = tl.minimum(c + 1, 255)
    down_value = _look_up(table, map_ptr, c, ROWS, BLOCK, SHARED)
    up_value = _look_up(table, map_ptr, up, ROWS, BLOCK, SHARED)
    return tl.where(x - down_value >= (up_value - down_value) * 0.5, up, c)


@triton.jit
def _larger(a, b):
    # tl.max's own combine function is made when Triton is imported: a kernel run by Triton's CPU
    # interpreter, switched on after that (the tests), cannot call it
    return tl.maximum(a, b)


@triton.jit
def _lerp(a, b, w):
    """torch.lerp(a, b, w) for a scalar weight, as torch computes it: two formulas split at 0.5, each
    one fused multiply-add (torch's CPU kernel calls fmadd; its CUDA kernel is compiled with contraction)."""
    return tl.where(w < 0.5, tl.fma(w, b - a, a), tl.fma(a - b, 1.0 - w, b))


@triton.jit
def _adamw8bit_kernel(p_ptr, g_ptr, m_codes_ptr, m_scale_ptr, v_codes_ptr, v_scale_ptr, m_map_ptr, v_map_ptr,
                      n_blocks, lr, lr_decay, w1, w2, bias1, bias2_sqrt, eps,
                      BLOCK: tl.constexpr, ROWS: tl.constexpr, SHARED: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    inside = rows < n_blocks
    offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    mask = inside[:, None]
    p = tl.load(p_ptr + offs, mask=mask, other=0.)
    g = tl.load(g_ptr + offs, mask=mask, other=0.).to(tl.float32)
    m_table = tl.load(m_map_ptr + tl.arange(0, 256))
    v_table = tl.load(v_map_ptr + tl.arange(0, 256))
    m = _look_up(m_table, m_map_ptr, tl.load(m_codes_ptr + offs, mask=mask, other=0).to(tl.int32), ROWS, BLOCK,
                 SHARED) * tl.load(m_scale_ptr + rows, mask=inside, other=0.)[:, None]
    v = _look_up(v_table, v_map_ptr, tl.load(v_codes_ptr + offs, mask=mask, other=0).to(tl.int32), ROWS, BLOCK,
                 SHARED) * tl.load(v_scale_ptr + rows, mask=inside, other=0.)[:, None]

    p = p - lr_decay * p  # decoupled weight decay: torchao's `p - lr * weight_decay * p`
    m = _lerp(m, g, w1)
    v = _lerp(v, g * g, w2)

    # the moments as codes against their blocks' new largest magnitudes (floored at 1e-12, as torchao)
    m_scale = tl.maximum(tl.reduce(tl.abs(m), 1, _larger), 1e-12)
    v_scale = tl.maximum(tl.reduce(tl.abs(v), 1, _larger), 1e-12)
    m_codes = _encode(tl.math.div_rn(m, m_scale[:, None]), m_table, m_map_ptr, ROWS, BLOCK, SHARED)
    v_codes = _encode(tl.math.div_rn(v, v_scale[:, None]), v_table, v_map_ptr, ROWS, BLOCK, SHARED)
    tl.store(m_codes_ptr + offs, m_codes.to(tl.uint8), mask=mask)
    tl.store(v_codes_ptr + offs, v_codes.to(tl.uint8), mask=mask)
    tl.store(m_scale_ptr + rows, m_scale, mask=inside)
    tl.store(v_scale_ptr + rows, v_scale, mask=inside)

    # the weight moves by the moments before encoding, as torchao's update
    denom = tl.math.div_rn(tl.sqrt_rn(v), bias2_sqrt) + eps
    p = p - tl.math.div_rn(lr * tl.math.div_rn(m, bias1), denom)
    tl.store(p_ptr + offs, p, mask=mask)


def step_scalars(step: Tensor, lr: float, beta1: float, beta2: float, weight_decay: float) -> dict[str, float]:
    """The update's scalars as torchao's fp32 tensors make them (`step` its fp32 step count, already
    advanced): lr and lr x weight decay, the two lerp weights, the first bias correction and the square
    root of the second. Each is an fp32 value, which a kernel's fp32 argument keeps exactly."""
    lr_t = torch.tensor(lr, dtype=torch.float32)
    step = step.detach().to(device="cpu", dtype=torch.float32)
    return {"lr": lr_t.item(), "lr_decay": (lr_t * weight_decay).item(), "w1": 1 - beta1, "w2": 1 - beta2,
            "bias1": (1 - beta1 ** step).item(), "bias2_sqrt": (1 - beta2 ** step).sqrt().item()}


def supported(p: Tensor, grad: Tensor, exp_avg, exp_avg_sq) -> bool:
    """Can the kernel update p: an fp32 tensor on a CUDA GPU, its gradient and both 8-bit moments
    (codes and scales) contiguous, on the same blocks of a power-of-two size."""
    moments = (exp_avg, exp_avg_sq)
    return (p.is_cuda and p.dtype == torch.float32 and grad.is_floating_point() and p.is_contiguous()
            and grad.is_contiguous() and grad.shape == p.shape
            and all(hasattr(s, "codes") and s.codes.is_contiguous() and s.scale.is_contiguous()
                    and s.codes.shape == p.shape for s in moments)
            and exp_avg.block_size == exp_avg_sq.block_size
            and exp_avg.block_size & (exp_avg.block_size - 1) == 0 and p.numel() % exp_avg.block_size == 0)


def update(p: Tensor, grad: Tensor, exp_avg, exp_avg_sq, step: Tensor, lr: float, beta1: float, beta2: float,
           weight_decay: float, eps: float, shared: bool | None = None, rows: int | None = None,
           num_warps: int | None = None) -> None:
    """One AdamW step of p in place (decoupled weight decay), its 8-bit moments `exp_avg` (signed
    codes) and `exp_avg_sq` (unsigned) updated in place; `step` counts this step. `supported` first.
    `shared`, `rows`, `num_warps`: other launch settings than the shipped ones (bench/kernel_bench.py)."""
    block = exp_avg.block_size
    n_blocks = p.numel() // block
    if not n_blocks:
        return
    rows = rows or ROWS
    _adamw8bit_kernel[(triton.cdiv(n_blocks, rows),)](
        p, grad, exp_avg.codes, exp_avg.scale, exp_avg_sq.codes, exp_avg_sq.scale, exp_avg.qmap, exp_avg_sq.qmap,
        n_blocks, eps=eps, BLOCK=block, ROWS=rows, SHARED=SHARED if shared is None else shared,
        num_warps=num_warps or NUM_WARPS, enable_fp_fusion=False,
        **step_scalars(step, lr, beta1, beta2, weight_decay))

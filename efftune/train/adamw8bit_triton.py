"""AdamW with 8-bit moments, one parameter's whole update in one Triton kernel on a CUDA GPU.

`train.optimizer: adamw8bit` keeps torchao's state (`OptimState8bit`: uint8 codes of the parameter's
shape, one fp32 scale per block of 256, a 256-value dynamic code map) and torchao's arithmetic
(`torchao.optim.adam.single_param_adam`); this kernel replaces only how the update runs. torchao's
compiled update took 65 ms of GPU time a step for the 8B shape cut to 12 layers on an H100 (2.6B
weights with 8-bit moments), where the 16 bytes a weight the update must move (read the fp32 weight and
gradient and two code bytes, write them back) take ~13 ms. Here each program owns whole blocks: it
decodes both moments, updates them and the weight in fp32, takes each block's new largest magnitude,
encodes the moments against it and writes everything once.

Encoding is where the time goes: torchao finds a code by a branchless binary search of the map (8
lookups, then 2 more to round to the nearer code), and each lookup is a gather whose lanes read
different addresses. Here (`TABLE`) one lookup does it: |x|'s binade and top 7 mantissa bits pick a
bucket, narrower than the spacing of the map's codes, so the code changes at most once inside it; the
bucket's word holds its first code and the low mantissa bits where the code steps (`encode_table`,
built with torchao's own encoder and a bisection over bit patterns, and checked). The map's values
for decoding are gathered from each program's copy of the map (`SHARED`: shared memory).

Arithmetic: torchao's operations in its order, each an IEEE fp32 operation (divisions and square roots
correctly rounded, no fused multiply-add but lerp's own, which torch's kernels fuse:
`enable_fp_fusion=False`), with the step's scalars (bias corrections, lr x weight decay) made on the
host as torchao's fp32 tensors make them. The codes and scales equal torchao's eager update's, the
weights too but where torch's CPU square root (not correctly rounded) is a bit off (tests run the
kernel under Triton's CPU interpreter); torchao's compiled update may differ from either in the last
bit where Inductor reorders or contracts operations.

Not yet on by default: the optimizer uses this kernel only with `optimizers.KERNEL_ON_CUDA` set, until
its GPU test and `bench/kernel_bench.py --only adamw8bit` have run (the first version, a search of the
map through global loads, ran on an H100: 49.6 ms of kernel time a step on the 12-layer 8B shape, the
optimizer phase 59.8 ms against 64.7 with torchao's update; bench/RESULTS.md session 22).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

ROWS = 8  # 256-value blocks a program updates (2,048 weights)
NUM_WARPS = 4
SHARED = True  # the code map's lookups gathered from the program's copy of it (shared memory), not global
TABLE = True  # codes made by one lookup in a table of buckets (`encode_table`), not a search of the map


@triton.jit
def _look_up(table, map_ptr, codes, ROWS: tl.constexpr, SHARED: tl.constexpr):
    """The code map's values at `codes` (ROWS, BLOCK): from the 256 values held by the program
    (`table`, a gather through shared memory) or from the map in global memory (cached loads)."""
    if SHARED:
        return tl.gather(tl.broadcast_to(table[None, :], (ROWS, 256)), codes, 1)
    else:
        return tl.load(map_ptr + codes)


@triton.jit
def _encode(x, table, map_ptr, ROWS: tl.constexpr, SHARED: tl.constexpr):
    """The code of each value of x (already divided by its block's scale): the largest code whose map
    value is <= x, found in 8 halving steps, then the next code if x lies at or past the midpoint."""
    c = tl.where(x >= tl.load(map_ptr + 128), 128, 0)
    c += tl.where(x >= _look_up(table, map_ptr, c + 64, ROWS, SHARED), 64, 0)
    c += tl.where(x >= _look_up(table, map_ptr, c + 32, ROWS, SHARED), 32, 0)
    c += tl.where(x >= _look_up(table, map_ptr, c + 16, ROWS, SHARED), 16, 0)
    c += tl.where(x >= _look_up(table, map_ptr, c + 8, ROWS, SHARED), 8, 0)
    c += tl.where(x >= _look_up(table, map_ptr, c + 4, ROWS, SHARED), 4, 0)
    c += tl.where(x >= _look_up(table, map_ptr, c + 2, ROWS, SHARED), 2, 0)
    c += tl.where(x >= _look_up(table, map_ptr, c + 1, ROWS, SHARED), 1, 0)
    up = tl.minimum(c + 1, 255)
    down_value = _look_up(table, map_ptr, c, ROWS, SHARED)
    up_value = _look_up(table, map_ptr, up, ROWS, SHARED)
    return tl.where(x - down_value >= (up_value - down_value) * 0.5, up, c)


@triton.jit
def _encode_by_table(x, table_ptr, SIGNED: tl.constexpr, E0: tl.constexpr, BINADES: tl.constexpr,
                     BITS: tl.constexpr):
    """`_encode`'s codes in one lookup (`encode_table` says how): the bucket of |x| (its binade and
    top mantissa bits) gives the code at the bucket's start and, where the code changes inside the
    bucket, the low mantissa bits of the first |x| with the next code (one step up, or down for x < 0)."""
    bits = tl.abs(x).to(tl.int32, bitcast=True)
    binade = tl.minimum(tl.maximum((bits >> 23) - E0, 0), BINADES - 1)
    bucket = (binade << BITS) | ((bits >> (23 - BITS)) & ((1 << BITS) - 1))
    if SIGNED:
        bucket += tl.where(x < 0, BINADES << BITS, 0)
    word = tl.load(table_ptr + bucket)
    low = bits & ((1 << (23 - BITS)) - 1)
    crossed = (((word >> 24) & 1) != 0) & (low >= (word & ((1 << (23 - BITS)) - 1)))
    if SIGNED:
        return ((word >> 16) & 255) + tl.where(crossed, tl.where(x < 0, -1, 1), 0)
    else:
        return ((word >> 16) & 255) + tl.where(crossed, 1, 0)


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
                      m_table_ptr, v_table_ptr, n_blocks, lr, lr_decay, w1, w2, bias1, bias2_sqrt, eps,
                      BLOCK: tl.constexpr, ROWS: tl.constexpr, SHARED: tl.constexpr, TABLE: tl.constexpr,
                      E0: tl.constexpr, BINADES: tl.constexpr, BITS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    inside = rows < n_blocks
    offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    mask = inside[:, None]
    p = tl.load(p_ptr + offs, mask=mask, other=0.)
    g = tl.load(g_ptr + offs, mask=mask, other=0.).to(tl.float32)
    m_table = tl.load(m_map_ptr + tl.arange(0, 256))
    v_table = tl.load(v_map_ptr + tl.arange(0, 256))
    m = _look_up(m_table, m_map_ptr, tl.load(m_codes_ptr + offs, mask=mask, other=0).to(tl.int32), ROWS,
                 SHARED) * tl.load(m_scale_ptr + rows, mask=inside, other=0.)[:, None]
    v = _look_up(v_table, v_map_ptr, tl.load(v_codes_ptr + offs, mask=mask, other=0).to(tl.int32), ROWS,
                 SHARED) * tl.load(v_scale_ptr + rows, mask=inside, other=0.)[:, None]

    p = p - lr_decay * p  # decoupled weight decay: torchao's `p - lr * weight_decay * p`
    m = _lerp(m, g, w1)
    v = _lerp(v, g * g, w2)

    # the moments as codes against their blocks' new largest magnitudes (floored at 1e-12, as torchao)
    m_scale = tl.maximum(tl.reduce(tl.abs(m), 1, _larger), 1e-12)
    v_scale = tl.maximum(tl.reduce(tl.abs(v), 1, _larger), 1e-12)
    if TABLE:
        m_codes = _encode_by_table(tl.math.div_rn(m, m_scale[:, None]), m_table_ptr, True, E0, BINADES, BITS)
        v_codes = _encode_by_table(tl.math.div_rn(v, v_scale[:, None]), v_table_ptr, False, E0, BINADES, BITS)
    else:
        m_codes = _encode(tl.math.div_rn(m, m_scale[:, None]), m_table, m_map_ptr, ROWS, SHARED)
        v_codes = _encode(tl.math.div_rn(v, v_scale[:, None]), v_table, v_map_ptr, ROWS, SHARED)
    tl.store(m_codes_ptr + offs, m_codes.to(tl.uint8), mask=mask)
    tl.store(v_codes_ptr + offs, v_codes.to(tl.uint8), mask=mask)
    tl.store(m_scale_ptr + rows, m_scale, mask=inside)
    tl.store(v_scale_ptr + rows, v_scale, mask=inside)

    # the weight moves by the moments before encoding, as torchao's update
    denom = tl.math.div_rn(tl.sqrt_rn(v), bias2_sqrt) + eps
    p = p - tl.math.div_rn(lr * tl.math.div_rn(m, bias1), denom)
    tl.store(p_ptr + offs, p, mask=mask)


# Buckets of |x| for `encode_table`: binades 2^-24 .. 2^0 (x is a value over its block's largest
# magnitude, so |x| <= 1; below 2^-23 every value has the code of 0, which the builder checks), each cut
# into 2^BITS by its top mantissa bits. 7 bits make every bucket narrower than the spacing of either
# map's codes, so the code changes at most once inside a bucket (checked too).
E0, BINADES, BITS = 103, 25, 7  # E0: the biased exponent of 2^-24
_TABLES: dict = {}


def encode_table(signed: bool, device: torch.device) -> Tensor:
    """The lookup table `_encode_by_table` reads for torchao's signed or unsigned code map, made once a
    device: for each bucket (positive x first, then x < 0 for the signed map) an int32 word holding the
    code of the bucket's first |x| (bits 16-23) and, where the code changes inside the bucket (bit 24
    set), the low 16 mantissa bits of the first |x| where it does. Made by torchao's own encoder over
    the buckets' ends and a bisection of their bit patterns, so the codes are exactly torchao's."""
    key = (signed, str(device))
    if key not in _TABLES:
        from torchao.optim.quant_utils import quantize_8bit_with_qmap
        from torchao.optim.subclass_8bit import get_qmap_signed, get_qmap_unsigned
        qmap = torch.tensor(get_qmap_signed() if signed else get_qmap_unsigned())
        words = [_table_half(qmap, lambda x: quantize_8bit_with_qmap(x, qmap).long(), sign)
                 for sign in ((1.0, -1.0) if signed else (1.0,))]
        _TABLES[key] = torch.cat(words).to(torch.int32).to(device)
    return _TABLES[key]


def _table_half(qmap: Tensor, encode, sign: float) -> Tensor:
    low_bits = 23 - BITS
    bucket = torch.arange(BINADES << BITS, dtype=torch.int64)
    first = (((bucket >> BITS) + E0) << 23) | ((bucket & ((1 << BITS) - 1)) << low_bits)
    end = first + (1 << low_bits)  # the next bucket's first bit pattern

    def code(pattern: Tensor) -> Tensor:
        return encode(pattern.to(torch.int32).view(torch.float32) * sign)
    start, last = code(first), code(end - 1)
    tiny = code(torch.tensor([0, ((E0 + 1) << 23) - 1]))  # 0 and the largest |x| below binade 1
    if not ((last - start).abs() <= 1).all() or not (tiny == start[0]).all() \
            or not (start[:1 << BITS] == start[0]).all() or not (last[:1 << BITS] == start[0]).all():
        raise AssertionError("the 8-bit code map changed: its codes no longer fit the lookup table's buckets")
    below, above = first.clone(), end.clone()  # the change, where there is one, lies in (below, above]
    for _ in range(low_bits):
        mid = (below + above) // 2
        changed = code(mid) != start
        above, below = torch.where(changed, mid, above), torch.where(changed, below, mid)
    crossing = last != start
    low = torch.where(crossing, above & ((1 << low_bits) - 1), 0)
    return (crossing.long() << 24) | (start << 16) | low


def step_scalars(step: Tensor, lr: float, beta1: float, beta2: float, weight_decay: float) -> dict[str, float]:
    """The update's scalars as torchao's fp32 tensors make them (`step` its fp32 step count, already
    advanced): lr and lr x weight decay, the two lerp weights, the first bias correction and the square
    root of the second. Each is an fp32 value, which a kernel's fp32 argument keeps exactly."""
    return _scalars(float(step), lr, beta1, beta2, weight_decay)


@functools.lru_cache(maxsize=16)  # the same for every weight of a group in a step: made once
def _scalars(step: float, lr: float, beta1: float, beta2: float, weight_decay: float) -> dict[str, float]:
    lr_t = torch.tensor(lr, dtype=torch.float32)
    step_t = torch.tensor(step, dtype=torch.float32)
    return {"lr": lr_t.item(), "lr_decay": (lr_t * weight_decay).item(), "w1": 1 - beta1, "w2": 1 - beta2,
            "bias1": (1 - beta1 ** step_t).item(), "bias2_sqrt": (1 - beta2 ** step_t).sqrt().item()}


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
           num_warps: int | None = None, table: bool | None = None) -> None:
    """One AdamW step of p in place (decoupled weight decay), its 8-bit moments `exp_avg` (signed
    codes) and `exp_avg_sq` (unsigned) updated in place; `step` counts this step. `supported` first.
    `shared`, `rows`, `num_warps`, `table`: other settings than the shipped ones (bench/kernel_bench.py)."""
    block = exp_avg.block_size
    n_blocks = p.numel() // block
    if not n_blocks:
        return
    rows = rows or ROWS
    table = TABLE if table is None else table
    m_table, v_table = (encode_table(True, p.device), encode_table(False, p.device)) if table else (p, p)
    _adamw8bit_kernel[(triton.cdiv(n_blocks, rows),)](
        p, grad, exp_avg.codes, exp_avg.scale, exp_avg_sq.codes, exp_avg_sq.scale, exp_avg.qmap, exp_avg_sq.qmap,
        m_table, v_table, n_blocks, eps=eps, BLOCK=block, ROWS=rows, SHARED=SHARED if shared is None else shared,
        TABLE=table, E0=E0, BINADES=BINADES, BITS=BITS,
        num_warps=num_warps or NUM_WARPS, enable_fp_fusion=False,
        **step_scalars(step, lr, beta1, beta2, weight_decay))

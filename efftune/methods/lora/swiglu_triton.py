"""Triton kernels for the fused SwiGLU op (`swiglu`: see there for the maths).

Both passes walk the MLP's middle tensors (tokens × intermediate) once. They read g0, u0 and z as
the column blocks of one matrix [g0 | u0 | z] (any row stride), and backward writes dg, du and dz
the same way, so the input gradient is one GEMM over them. A program owns BT tokens and
a group of COLS columns and loops over its (BT × BO) tiles; the rank-r products that reduce over
columns (forward `z_d = h Â_dᵀ`, backward `dz = [dg B_g, du B_u]`) accumulate in registers and are
written as one fp32 partial per column group, summed by the caller (deterministic, no atomics).
Backward also adds the down projection's LoRA term `dz_d Â_d` to each tile of its frozen input
gradient `dy W_d` as it loads it (a rank-r dot), so that GEMM runs plain instead of accumulating onto
a full-width product (14% slower at 8B shapes, plus the product's own write).
Reductions over tokens (dB_gate, dB_up, dÂ_down) are left to cuBLAS, which reads dg, du and h
again: done in-kernel they need transposed tiles, and a version that did ran at a third of the
memory bandwidth (bench/RESULTS.md, session 7).
Offsets: each program moves its pointers to its first token row in 64 bits (row × row stride passes
2^31 elements in long inputs: 131,072 tokens of Llama-3-8B's [g0 | u0 | z] hold 3.8e9) and indexes
inside its own rows in 32 bits, so the per-element address arithmetic is what it was;
`kernel_limits.swiglu_fits` says which shapes keep those in-tile offsets under 2^31.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from triton.runtime.errors import OutOfResources

from ...kernel_limits import SWIGLU_MAX_TILE_ROWS, SWIGLU_MIN_COLS, first_fitting, swiglu_fits
from .packing import aligned_rows


@triton.jit
def _rank_tile(ptr, idx, mask, stride, step, off, R, RP: tl.constexpr):
    """ptr[idx * stride + (off + k) * step] for k < R as a (len(idx), RP) tile, zero past R."""
    ks = tl.arange(0, RP)
    return tl.load(ptr + idx[:, None] * stride + (off + ks[None, :]) * step,
                   mask=mask[:, None] & (ks[None, :] < R), other=0.)


@triton.jit
def _plus_update(base, z, b_ptr, cols, cmask, stride, step, R, RP: tl.constexpr, PREC: tl.constexpr):
    """A frozen GEMM's output tile plus its LoRA update z b[cols]ᵀ, in fp32; and b[cols] (b's
    element (col, k) at col * stride + k * step)."""
    b = _rank_tile(b_ptr, cols, cmask, stride, step, 0, R, RP)
    return base.to(tl.float32) + tl.dot(z, tl.trans(b), input_precision=PREC), b


@triton.jit
def _token_block(z_ptr, N, ZS, RG, RU, BT: tl.constexpr, RP: tl.constexpr):
    """This program's first token row (int64: the callers move their pointers there), its rows
    counted from that one (int32), their mask, and their z_gate and z_up tiles."""
    row0 = tl.program_id(0).to(tl.int64) * BT
    rows = tl.arange(0, BT)
    rmask = rows < tl.minimum(N - row0, BT).to(tl.int32)  # a 32-bit compare per element
    z_ptr += row0 * ZS
    zg = _rank_tile(z_ptr, rows, rmask, ZS, 1, 0, RG, RP)
    return row0, rows, rmask, zg, _rank_tile(z_ptr, rows, rmask, ZS, 1, RG, RU, RP)


@triton.jit
def _forward_kernel(g0_ptr, u0_ptr, z_ptr, bg_ptr, bu_ptr, ad_ptr, h_ptr, zd_part,
                    N, F, S, RG, RU, RD, COLS: tl.constexpr, BT: tl.constexpr, BO: tl.constexpr,
                    RP: tl.constexpr, RPD: tl.constexpr, PREC: tl.constexpr):
    row0, rows, rmask, zg, zu = _token_block(z_ptr, N, S, RG, RU, BT, RP)
    g0_ptr += row0 * S
    u0_ptr += row0 * S
    h_ptr += row0 * F
    col0 = tl.program_id(1) * COLS
    acc = tl.zeros((BT, RPD), tl.float32)
    for ci in range(0, COLS // BO):
        cols = col0 + ci * BO + tl.arange(0, BO)
        cmask = cols < F
        tile = rmask[:, None] & cmask[None, :]
        offs = rows[:, None] * S + cols[None, :]
        g0, u0 = tl.load(g0_ptr + offs, mask=tile, other=0.), tl.load(u0_ptr + offs, mask=tile, other=0.)
        g, _ = _plus_update(g0, zg, bg_ptr, cols, cmask, RG, 1, RG, RP, PREC)
        u, _ = _plus_update(u0, zu, bu_ptr, cols, cmask, RU, 1, RU, RP, PREC)
        h = (g * tl.sigmoid(g) * u).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + rows[:, None] * F + cols[None, :], h, mask=tile)
        ad = _rank_tile(ad_ptr, cols, cmask, 1, F, 0, RD, RPD)  # Â_d[:, cols]ᵀ
        acc += tl.dot(h, ad, input_precision=PREC)
    kd = tl.arange(0, RPD)
    zd_part += (tl.program_id(1).to(tl.int64) * N + row0) * RD
    tl.store(zd_part + rows[:, None] * RD + kd[None, :], acc,
             mask=rmask[:, None] & (kd[None, :] < RD))


@triton.jit
def _backward_kernel(dh_ptr, dzd_ptr, ad_ptr, g0_ptr, u0_ptr, z_ptr, bg_ptr, bu_ptr, dg_ptr, du_ptr, h_ptr,
                     dz_part, N, F, S, DS, RG, RU, RD, COLS: tl.constexpr, BT: tl.constexpr, BO: tl.constexpr,
                     RP: tl.constexpr, RPD: tl.constexpr, PREC: tl.constexpr):
    row0, rows, rmask, zg, zu = _token_block(z_ptr, N, S, RG, RU, BT, RP)
    g0_ptr += row0 * S
    u0_ptr += row0 * S
    dh_ptr += row0 * F
    h_ptr += row0 * F
    dg_ptr += row0 * DS
    du_ptr += row0 * DS
    dzd = _rank_tile(dzd_ptr + row0 * RD, rows, rmask, RD, 1, 0, RD, RPD)  # the down projection's dz_d rows
    col0 = tl.program_id(1) * COLS
    acc_g = tl.zeros((BT, RP), tl.float32)
    acc_u = tl.zeros((BT, RP), tl.float32)
    dtype = dg_ptr.dtype.element_ty
    cols = col0 + tl.arange(0, BO)
    offs = rows[:, None] * S + cols[None, :]  # g0, u0 (row stride S)
    offs_f = rows[:, None] * F + cols[None, :]  # dh, h (row stride F)
    tile = rmask[:, None] & (cols < F)[None, :]
    g0, u0 = tl.load(g0_ptr + offs, mask=tile, other=0.), tl.load(u0_ptr + offs, mask=tile, other=0.)
    d = tl.load(dh_ptr + offs_f, mask=tile, other=0.)
    for ci in range(0, COLS // BO):
        cols = col0 + ci * BO + tl.arange(0, BO)
        cmask = cols < F
        tile = rmask[:, None] & cmask[None, :]
        offs = rows[:, None] * S + cols[None, :]
        offs_f = rows[:, None] * F + cols[None, :]
        # the next tile's loads go out before this tile's work: more bytes in flight (5% faster)
        nxt = tile & (ci + 1 < COLS // BO) & ((cols + BO) < F)[None, :]
        g0_next = tl.load(g0_ptr + offs + BO, mask=nxt, other=0.)
        u0_next = tl.load(u0_ptr + offs + BO, mask=nxt, other=0.)
        d_next = tl.load(dh_ptr + offs_f + BO, mask=nxt, other=0.)
        g, bg = _plus_update(g0, zg, bg_ptr, cols, cmask, RG, 1, RG, RP, PREC)
        u, bu = _plus_update(u0, zu, bu_ptr, cols, cmask, RU, 1, RU, RP, PREC)
        df, _ = _plus_update(d, dzd, ad_ptr, cols, cmask, 1, F, RD, RPD, PREC)  # dh = dh0 + dz_d Â_d
        s = tl.sigmoid(g)
        silu = g * s
        dg = (df * u * s * (1.0 + g * (1.0 - s))).to(dtype)
        du = (df * silu).to(dtype)
        offs_d = rows[:, None] * DS + cols[None, :]
        tl.store(dg_ptr + offs_d, dg, mask=tile)
        tl.store(du_ptr + offs_d, du, mask=tile)
        tl.store(h_ptr + offs_f, (silu * u).to(dtype), mask=tile)
        acc_g += tl.dot(dg, bg, input_precision=PREC)
        acc_u += tl.dot(du, bu, input_precision=PREC)
        g0, u0, d = g0_next, u0_next, d_next
    ks = tl.arange(0, RP)
    out = dz_part + (tl.program_id(1).to(tl.int64) * N + row0) * (RG + RU) + rows[:, None] * (RG + RU) + ks[None, :]
    tl.store(out, acc_g, mask=rmask[:, None] & (ks[None, :] < RG))
    tl.store(out + RG, acc_u, mask=rmask[:, None] & (ks[None, :] < RU))


def _pad(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs


# tile sizes, from bench/kernel_bench.py --only swiglu on an H100 (8B MLP shapes, [g0 | u0 | z] with aligned
# rows; the forward pass gains nothing from prefetching the next tile, which the backward pass does)
FORWARD_CONFIG = dict(bt=64, bo=64, cols=512, num_warps=4, num_stages=3)
BACKWARD_CONFIG = dict(bt=64, bo=64, cols=512, num_warps=4, num_stages=3)
# where the shipped config's tiles do not fit the GPU's shared memory (large ranks, fp32; see
# kernel_limits.first_fitting): a shallower pipeline first, then smaller tiles
SMALLER_TILES = (dict(num_stages=1), dict(bt=32, num_stages=1), dict(bt=32, bo=32, num_stages=1),
                 dict(bt=16, bo=16, num_stages=1))
_FITTING: dict[tuple, dict | None] = {}  # (kernel, device, dtype, padded ranks) -> the config that loaded


def _launch(name: str, default: dict, config: dict, gu: Tensor, rp: int, rpd: int, launch) -> list[Tensor]:
    """launch(config): the caller's config as given (bench/kernel_bench.py's sweeps), else the
    shipped one or the first smaller one that fits this GPU (NoFittingConfig when none does)."""
    if config:
        return launch({**default, **config})
    configs = [default] + [{**default, **change} for change in SMALLER_TILES]
    return first_fitting(launch, configs, (name, gu.device, gu.dtype, rp, rpd), _FITTING, OutOfResources)


def _grid(n: int, f: int, stride: int, c: dict) -> tuple[tuple[int, int], int]:
    """The launch grid and the column group, for n tokens of width f whose widest tensor has row
    stride `stride`; ValueError where the config leaves `kernel_limits`' bounds (offsets inside a
    tile past 2^31, or too many column groups for the grid), which `swiglu` routes around."""
    cols = min(c["cols"], triton.cdiv(f, c["bo"]) * c["bo"])  # a multiple of bo
    if c["bt"] > SWIGLU_MAX_TILE_ROWS or cols < min(f, SWIGLU_MIN_COLS) or not swiglu_fits(n, f, stride):
        raise ValueError(f"{n} tokens of width {f} (row stride {stride}) in {c['bt']} × {cols} tiles: offsets "
                         f"inside a tile pass 2^31 or the grid is too wide (kernel_limits.swiglu_fits)")
    return (triton.cdiv(n, c["bt"]), triton.cdiv(f, cols)), cols


def _split(gu: Tensor, f: int, rg: int, ru: int) -> tuple[Tensor, Tensor, Tensor]:
    """g0, u0, z: the column blocks of [g0 | u0 | z] (row stride gu.stride(0))."""
    if gu.dim() != 2 or gu.stride(1) != 1 or gu.shape[1] != 2 * f + rg + ru:
        raise ValueError(f"expected [g0 | u0 | z] of width {2 * f + rg + ru} with unit column stride, "
                         f"got shape {tuple(gu.shape)} strides {gu.stride()}")
    return gu[:, :f], gu[:, f:2 * f], gu[:, 2 * f:]


def forward(gu: Tensor, bg: Tensor, bu: Tensor, ad: Tensor, **config) -> list[Tensor]:
    """[h, z_d = h adᵀ] for gu = [g0 | u0 | z] (z_d in gu's dtype)."""
    (f, rg), ru, rd, n = bg.shape, bu.shape[1], ad.shape[0], gu.shape[0]
    g0, u0, z = _split(gu, f, rg, ru)
    rp, rpd = _pad(max(rg, ru)), _pad(rd)

    def launch(c: dict) -> list[Tensor]:
        grid, cols = _grid(n, f, gu.stride(0), c)
        h = gu.new_empty(n, f)
        zd_part = torch.empty(grid[1], n, rd, dtype=torch.float32, device=gu.device)
        _forward_kernel[grid](g0, u0, z, bg.contiguous(), bu.contiguous(), ad.contiguous(), h, zd_part, n, f,
                              gu.stride(0), rg, ru, rd, COLS=cols, BT=c["bt"], BO=c["bo"], RP=rp, RPD=rpd,
                              PREC=_precision(gu.dtype), num_warps=c["num_warps"], num_stages=c["num_stages"])
        return [h, zd_part.sum(0).to(gu.dtype)]
    return _launch("swiglu forward", FORWARD_CONFIG, config, gu, rp, rpd, launch)


def backward(dh: Tensor, dzd: Tensor, ad: Tensor, gu: Tensor, bg: Tensor, bu: Tensor, **config) -> list[Tensor]:
    """[dgu = [dg | du | dz], h] for the upstream gradient dh + dzd ad, dz = [dg B_g, du B_u]."""
    (f, rg), ru, rd, n = bg.shape, bu.shape[1], ad.shape[0], gu.shape[0]
    g0, u0, z = _split(gu, f, rg, ru)
    rp, rpd = _pad(max(rg, ru)), _pad(rd)

    def launch(c: dict) -> list[Tensor]:
        dgu, h = aligned_rows(n, gu.shape[1], gu), gu.new_empty(n, f)
        grid, cols = _grid(n, f, max(gu.stride(0), dgu.stride(0)), c)
        dg, du, dz = _split(dgu, f, rg, ru)
        dz_part = torch.empty(grid[1], n, rg + ru, dtype=torch.float32, device=gu.device)
        _backward_kernel[grid](dh.contiguous(), dzd.contiguous(), ad.contiguous(), g0, u0, z, bg.contiguous(),
                               bu.contiguous(), dg, du, h, dz_part, n, f, gu.stride(0), dgu.stride(0), rg, ru, rd,
                               COLS=cols, BT=c["bt"], BO=c["bo"], RP=rp, RPD=rpd, PREC=_precision(gu.dtype),
                               num_warps=c["num_warps"], num_stages=c["num_stages"])
        dz.copy_(dz_part.sum(0))
        return [dgu, h]
    return _launch("swiglu backward", BACKWARD_CONFIG, config, gu, rp, rpd, launch)

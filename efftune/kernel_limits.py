"""Which shapes the package's Triton kernels take; others run the PyTorch version of the same op.

Why: a kernel that forms an element offset as a 32-bit product wraps once a tensor passes 2^31
elements and reads or writes the wrong memory. At 131,072 tokens of Llama-3-8B's shape the fused
SwiGLU op's [g0 | u0 | z] holds 3.8e9 elements, and its kernel died with "an illegal memory
access" (issue 21). Every kernel now moves its pointers to its own first row in 64 bits and
indexes inside its tile in 32 bits (the per-element address arithmetic stays 32-bit, as fast as
before); what is left 32-bit is an offset inside one program's rows, and these functions say
whether that fits. They read shapes only, so they run on the CPU and on meta tensors.
"""
from __future__ import annotations

INT32_LIMIT = 2 ** 31  # offsets must stay below this
GRID_Y_LIMIT = 65535  # CUDA's largest grid size on the second axis

# The largest token block (`bt`) swiglu_triton runs with: its shipped configs use 64, and
# bench/kernel_bench.py's sweep goes up to 128. swiglu_triton refuses a larger one.
SWIGLU_MAX_TILE_ROWS = 128
SWIGLU_MIN_COLS = 256  # the narrowest column group (`cols`) they run with: the grid's second axis


def swiglu_fits(tokens: int, width: int, row_stride: int) -> bool:
    """Whether the SwiGLU kernels (`methods.lora.swiglu_triton`) take `tokens` rows of an MLP of
    intermediate size `width` whose widest tensor has row stride `row_stride` (that of
    [g0 | u0 | z] or its gradient, at least 2·width): a tile's rows × the stride plus a column must
    stay under 2^31, and the column groups within the grid's second axis. The token count itself
    may pass 2^31 / row_stride: rows are reached through 64-bit pointers."""
    inside = (SWIGLU_MAX_TILE_ROWS - 1) * max(row_stride, width) + 2 * width
    return 0 <= tokens < INT32_LIMIT and inside < INT32_LIMIT and -(-width // SWIGLU_MIN_COLS) <= GRID_Y_LIMIT


# forward.head_triton: a row is cut into at most 16 segments of blocks of at most 4,096 columns
# (bench/kernel_bench.py's sweep), and a program indexes its row's columns in 32 bits
HEAD_MAX_OVERSHOOT = 16 * 4096


def head_fits(rows: int, vocabulary: int) -> bool:
    """Whether the LM-head kernels (`forward.head_triton`) take a chunk of `rows` × `vocabulary`
    logits: one program per (row, segment), so rows up to the grid's first axis (2^31 − 1); the
    rows' offsets are 64-bit, the column index inside a row (past the vocabulary by at most one
    segment's last block) 32-bit."""
    return 0 <= rows < INT32_LIMIT and vocabulary + HEAD_MAX_OVERSHOOT < INT32_LIMIT


# Shared memory: a Triton kernel's tiles must fit the GPU's shared memory, which Triton checks only when it
# loads the compiled kernel, and the need depends on the Triton version and the GPU as well as the tiles
# (the SwiGLU kernels' rank-wide tiles of z and B grow with the LoRA rank, padded to a power of two, and
# double for fp32 inputs: fp32 at r=192 wanted 360 KiB of an H100's 227 KiB). So the launcher tries its
# configs in turn, largest first, and keeps the first that loads.
class NoFittingConfig(RuntimeError):
    """None of a kernel's configs fits this GPU's shared memory: the caller runs the PyTorch version."""


def first_fitting(launch, configs, key, chosen: dict, too_big: type[BaseException]):
    """launch(config) for the first of `configs` that does not raise `too_big` (Triton's
    OutOfResources), remembered in `chosen[key]` so every later call with the same key (kernel,
    device, dtype, padded sizes) runs that config straight away and a run's tiles, and so the
    order of its sums, never change mid-run. NoFittingConfig when none fits (also remembered)."""
    if key in chosen:
        if chosen[key] is None:
            raise NoFittingConfig(f"no config of {key[0]} fits this GPU's shared memory ({key})")
        return launch(chosen[key])
    for config in configs:
        try:
            out = launch(config)
        except too_big:
            continue
        chosen[key] = config
        return out
    chosen[key] = None
    raise NoFittingConfig(f"no config of {key[0]} fits this GPU's shared memory ({key})")

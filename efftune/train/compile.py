"""Regional compilation: `torch.compile` each decoder block of a transformers model.

Compiling block by block (not the whole model) keeps compile time to one block's graph — the
blocks share code, so one compilation serves them all — and leaves the loss, the tree attention
masks and the optimizer step in eager mode (the loss's per-chunk softmax work is compiled on its
own: `efftune.forward.logprobs`, chosen by `ForwardOptions.fused_head`, which train() sets with
`train.compile`). Inductor fuses the elementwise chains around the matmuls (RMSNorm, RoPE, SwiGLU,
the LoRA `y + delta` add) and its min-cut partitioner recomputes cheap pointwise results in backward
instead of saving them, which is where most of a LoRA step's non-matmul time and activation memory go. Results equal eager ones up to float rounding (tested,
ReLoRA restarts included), except that dropout draws its masks from Inductor's own random stream.
`cuda_graphs` additionally replays the compiled blocks as CUDA graphs, for steps too short to hide
the CPU's kernel launches (`train.cuda_graphs`).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from torch import nn

from ..errors import ConfigError
from ..attach import decoder_blocks


def compile_blocks(model: nn.Module, cuda_graphs: bool = False, autotune: bool = False,
                   checkpoint_fraction: float = 0.0) -> int:
    """Compile every decoder block in place (`nn.Module.compile`); returns how many.

    `checkpoint_fraction`: the share of the blocks (`checkpointed_layers`: spread evenly) whose
    compiled backward recomputes everything but the block's inputs (activation checkpointing done by
    the compiler, `RECOMPUTE_ALL`); the others keep what the partition in effect keeps (`partitioner`).
    Each kind compiles once: the checkpointed blocks through their own backend, whose partition
    Dynamo keeps apart from the others' (a compiled graph is reused only under the backend that made it).

    `autotune`: Inductor benchmarks Triton GEMM kernels against cuBLAS for each matmul shape and
    may fuse the neighbouring pointwise work into the chosen kernel (`max_autotune_gemm`). It
    costs minutes of compilation on the first step (`train.compile_autotune`).

    `cuda_graphs`: Inductor's "reduce-overhead" mode, which replays each block's compiled forward
    and backward as CUDA graphs, so the CPU no longer launches every kernel one by one. It pays
    where the CPU cannot keep up with the GPU (small models, short steps) and needs fixed input
    shapes: each new shape records (and keeps) new graphs. The caller marks where each training
    step begins (`torch.compiler.cudagraph_mark_step_begin()`): outputs of the step before,
    gradients included, may be overwritten from there on, and not before."""
    blocks = decoder_blocks(model, "train.compile")
    for module in model.modules():  # caches a compiled graph must not check (LoRA-FA's correction)
        if hasattr(module, "before_compile"):
            module.before_compile()
    options = {"triton.cudagraphs": cuda_graphs, "max_autotune_gemm": autotune}
    checkpointed = checkpointed_layers(len(blocks), checkpoint_fraction) if checkpoint_fraction else set()
    recomputing = _recomputing_backend(options) if checkpointed else None
    for i, block in enumerate(blocks):
        if i in checkpointed:
            block.compile(backend=recomputing)
        else:
            block.compile(options=options)
    return len(blocks)


def checkpointed_layers(n_layers: int, fraction: float) -> set[int]:
    """The indices of round(fraction x n_layers) layers (at least one), spread evenly from the first."""
    count = max(1, round(fraction * n_layers))
    return {i * n_layers // count for i in range(count)}


def _recomputing_backend(options: dict) -> Callable:
    """Inductor with `options`, its partition recomputing everything but a graph's inputs (`RECOMPUTE_ALL`)
    whatever budget the surrounding `partitioner` sets; its other settings (lean) stay the caller's."""
    import torch._functorch.config as functorch_config
    from torch._inductor.compile_fx import compile_fx

    def backend(graph, example_inputs):
        with functorch_config.patch(activation_memory_budget=RECOMPUTE_ALL):
            return compile_fx(graph, example_inputs, config_patches=dict(options))
    return backend


def uncompile_blocks(model: nn.Module) -> None:
    """Undo `compile_blocks`: the blocks run eagerly again. (`nn.Module.compile` keeps its compiled
    callable in `_compiled_call_impl` and offers no public way back.)"""
    for block in decoder_blocks(model):
        block._compiled_call_impl = None


# Activation checkpointing of compiled blocks, done by the compiler: an `activation_memory_budget` this
# small makes the partitioner keep only each block's inputs for backward (its aggressive min-cut, which
# recomputes everything else inside the compiled backward) — checkpointing's memory, with the recompute
# fused into backward's kernels and, being part of the compiled graphs, replayable as CUDA graphs, which
# torch.utils.checkpoint around a compiled block is not (its forward reruns outside the graphs). Not 0:
# torch returns the bare inputs for 0 without the min-cut, which would recompute random ops (dropout
# masks) instead of keeping them. 8B NF4 on an H100: 11,445 tokens/s at 7.78 GiB with CUDA graphs, where
# checkpointing around the compiled blocks ran 10,398 at 7.66 (bench/RESULTS.md session 21).
RECOMPUTE_ALL = 1e-6


def check_memory_budget(budget: float) -> None:
    if not 0 < budget <= 1:
        raise ConfigError(f"train.compile_memory_budget must be in (0, 1], got {budget!r}")


@contextmanager
def partitioner(budget: float | None = None, lean: bool = True) -> Iterator[None]:
    """How compiled graphs split the work between forward and backward, for blocks (re)compiled
    within the context, i.e. during the first forward passes.

    `lean`: recompute pointwise results in backward even where a backward matmul reads them
    (torch's default bans this). LoRA's `dA = dz^T x` reads each adapted linear's input, so the
    default keeps the RMSNorm outputs and SwiGLU's `silu(gate) * up` alive from forward to
    backward; lean recomputes them from the residual stream and from gate/up, which are kept
    anyway: about a third less activation memory for one more pointwise pass each.
    `budget`: keep about this fraction (0, 1] of the activations the speed-first partition keeps,
    recomputing the rest (torch's `activation_memory_budget`); None leaves torch's setting."""
    if budget is not None:
        check_memory_budget(budget)
    import torch._functorch.config as functorch_config
    settings = {"ban_recompute_materialized_backward": not lean}
    if budget is not None:
        settings["activation_memory_budget"] = budget
    with functorch_config.patch(**settings):
        yield

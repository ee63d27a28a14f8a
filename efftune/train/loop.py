"""The training loop: one function, read top to bottom.

Each optimizer step takes `batch_size` examples in a seeded order (a function of the step, so a
resumed run sees exactly the examples it would have seen), splits them into micro-batches of
`micro_batch_size`, lays each micro-batch out in rows without padding waste (a prompt prefix the
examples share runs once per row: `efftune.data.layout`), and accumulates gradients over the
micro-batches. The loss is the mean negative log-likelihood of the answer
tokens of the whole step, so accumulation gives the same gradient as one big batch.

The same loop trains k LoRA adapters at once (the module library's `--together k`): each adapter
is a lane (`efftune.train.together`) with its own examples, loss, clipping, metrics and
checkpoints, and the lanes' rows share each forward/backward, each row through its own adapter.
"""
from __future__ import annotations

import json
import math
import signal
import time
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..data.layout import collate, training_rows
from ..data.tokenize import IGNORE, Encoded
from ..errors import CheckpointError, ConfigError, EfftuneError, TrainingDiverged
from ..faults import fault_point
from ..files import write_text_atomically
from ..forward.logprobs import target_logprobs
from ..forward.options import ForwardOptions, check_attention_kernel, check_masked_attention
from ..methods.hooks import TrainHooks
from ..methods.lora.layer import mixed_adapter_batch
from ..moe.layer import collect_aux_losses, expert_loads, moe_layers
from ..moe.router_tap import hf_router_aux, router_taps
from ..progress import SideTime, note, progress_bar
from .checkpoint import (changed_keys, checkpoints, clear_staging, first_nonfinite, latest_checkpoint,
                         load_checkpoint, read_state, save_checkpoint, set_aside)
from .compile import check_memory_budget, checkpointed_layers, compile_blocks, partitioner, uncompile_blocks
from ..attach import decoder_blocks
from . import distributed
from .interrupt import RunInterrupted, StopSignals
from .optimizers import build_optimizer, check_optimizer, embedding_weights
from .plot import plot_metrics, plot_routing
from .together import Lane, lane_losses, lane_optimizer, make_lanes, take_lane_state


@dataclass
class TrainConfig:
    steps: int = 60
    batch_size: int = 16            # examples per optimizer step
    micro_batch_size: int = 0       # examples per forward pass (0: the whole batch)
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 6
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0          # max gradient norm (0: off)
    precision: str = "auto"         # auto | fp32 | bf16 (autocast)
    max_length: int = 512           # tokens per row when packing
    activation_checkpointing: bool = False  # recompute each layer's activations in backward
    activation_checkpointing_fraction: float = 1.0  # with it: the share of decoder layers checkpointed, spread evenly
    compile: bool = False           # torch.compile each decoder block (efftune.train.compile)
    compile_memory_budget: float | None = None  # with compile: torch's activation_memory_budget (below 1: all recomputed, today)
    compile_lean: bool = True       # with compile: recompute pointwise inputs of backward matmuls (less memory)
    cuda_graphs: bool = False       # with compile: replay the blocks as CUDA graphs (rows padded to max_length)
    compile_autotune: bool = False  # with compile: pick each GEMM's kernel by benchmarking (slow first step)
    fp8_base: bool = False          # frozen base linears in FP8 while training (efftune.train.fp8)
    optimizer: str = "adamw"        # adamw | adamw8bit | adamwfp8 (8-bit Adam moments, torchao: efftune.train.optimizers)
    attention: str = "sdpa"         # kernel for rows that are one causal sequence each: sdpa | flash4 (efftune.forward.flash4)
    masked_attention: str = "sdpa"  # kernel for rows with a mask (packing, trees): sdpa | flex (efftune.forward.flex)
    eval_every: int = 20            # steps between evaluations (0: only before and after)
    save_every: int = 20            # steps between checkpoints (0: only at the end)
    save_every_minutes: float = 10.0  # also a checkpoint once this long has passed since the last (0: off)
    keep_checkpoints: int = 2
    seed: int = 0
    distributed: str = "ddp"        # under torchrun: ddp (a whole model per rank) | fsdp (sharded; efftune.train.distributed)

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        if self.micro_batch_size < 0 or (self.micro_batch_size and self.batch_size % self.micro_batch_size):
            raise ConfigError(f"train.micro_batch_size ({self.micro_batch_size}) must divide "
                              f"train.batch_size ({self.batch_size})")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"train.precision must be auto, fp32 or bf16, got {self.precision!r}")
        if not 0 < self.lr < math.inf:
            raise ConfigError(f"train.lr must be a positive finite number, got {self.lr}")
        # negative counts used to be taken silently (save_every: -1 never saved)
        for name, low in (("save_every", 0), ("eval_every", 0), ("warmup_steps", 0), ("seed", 0),
                          ("keep_checkpoints", 1), ("max_length", 2)):
            if getattr(self, name) < low:
                raise ConfigError(f"train.{name} must be at least {low}, got {getattr(self, name)}")
        for name in ("weight_decay", "grad_clip"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ConfigError(f"train.{name} must be 0 or a positive finite number, got {getattr(self, name)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for option in ("cuda_graphs", "compile_autotune"):
            if getattr(self, option) and not self.compile:
                raise ConfigError(f"train.{option} needs train.compile: true")
        if not 0 < self.activation_checkpointing_fraction <= 1:
            raise ConfigError("train.activation_checkpointing_fraction must be in (0, 1], got "
                              f"{self.activation_checkpointing_fraction}")
        if self.activation_checkpointing_fraction != 1 and not self.activation_checkpointing:
            raise ConfigError("train.activation_checkpointing_fraction needs train.activation_checkpointing: true")
        if self.compiler_checkpoints and self.compile_memory_budget is not None:
            raise ConfigError("train.compile_memory_budget and train.activation_checkpointing both set what "
                              "compiled blocks recompute (checkpointing: everything but their inputs); set one")
        if not self.save_every_minutes >= 0:
            raise ConfigError(f"train.save_every_minutes must be 0 (off) or positive, got {self.save_every_minutes}")
        check_attention_kernel(self.attention)
        distributed.check_mode(self.distributed)
        check_masked_attention(self.masked_attention)
        check_optimizer(self.optimizer)
        if self.compile_memory_budget is not None:
            if not self.compile:
                raise ConfigError("train.compile_memory_budget needs train.compile: true")
            check_memory_budget(self.compile_memory_budget)

    @property
    def compiler_checkpoints(self) -> bool:
        """Activation checkpointing of compiled blocks is torch.compile's recomputation inside each
        checkpointed block's compiled backward (`compile.RECOMPUTE_ALL`, for the share of blocks
        `activation_checkpointing_fraction` picks), not a checkpoint wrapped around each block: the
        recompute is fused into backward's kernels and replays in CUDA graphs, where a block
        checkpointed from outside runs its compiled forward again inside backward, which torch's
        CUDA-graph trees do not record (2.11, H200: "graph recording observed an input tensor
        deallocate during graph recording that did not occur during replay")."""
        return self.activation_checkpointing and self.compile

    def compiled_checkpoint_fraction(self) -> float:
        """The share of compiled blocks whose backward recomputes them (`compile_blocks`): 0 without."""
        return self.activation_checkpointing_fraction if self.compiler_checkpoints else 0.0

    def forward_options(self) -> ForwardOptions:
        """The options of this run's forwards (`efftune.forward.options`): its attention kernels, block
        masks kept in place for CUDA graphs (`cuda_graphs`), the LM head's softmax work compiled with
        the blocks (`compile`), a trainable head's logit gradient kept from forward unless activation
        checkpointing is on (there it would outweigh the checkpointed activations many times: 256 KiB a
        target at a 128k vocabulary). Pass them to an `evaluate` that should run as the training forwards do."""
        return ForwardOptions(attention=self.attention, masked_attention=self.masked_attention,
                              static_masks=self.cuda_graphs, fused_head=self.compile,
                              keep_logit_grads=not self.activation_checkpointing)


@dataclass
class TrainResult:
    steps: int
    final_loss: float | None  # the last step's loss, from the run's metrics (a resumed run's too)
    train_seconds: float      # this call's time (a resumed run: since the resume)
    tokens: int
    evals: list[dict]
    start_step: int = 0       # the step a resumed run continued from (k adapters: the earliest)
    adapters: dict[str, "TrainResult"] = field(default_factory=dict)  # k adapters at once: each one's result


ZERO_GRAD_STEPS = 5  # consecutive steps with a zero gradient norm before the run warns


def strict_json(value, indent: int | None = None) -> str:
    """JSON text of `value` with every NaN or infinity written as null: valid JSON for any reader."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(value), allow_nan=False, indent=indent)


def read_metrics(path: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl. A torn last line (the write a kill interrupted) is dropped;
    a bad line before it is an error naming the line."""
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    last = max((i for i, l in enumerate(lines) if l.strip()), default=-1)
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not an object")
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if i == last:
                continue
            raise CheckpointError(f"{path}:{i + 1} is not a JSON object ({str(exc).splitlines()[0]}); only a torn "
                                  "last line is dropped on --resume, so fix or delete that line") from None
        rows.append(row)
    return rows


def example_order(n: int, seed: int, start: int, count: int) -> list[int]:
    """Indices of examples number start..start+count-1 of an endless seeded shuffle of n examples."""
    out = []
    for g in range(start, start + count):
        epoch, k = divmod(g, n)
        out.append(int(_epoch_order(n, seed, epoch)[k]))
    return out


@lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    # one shuffle of an epoch serves all its steps: drawn again for every example, a million examples'
    # shuffle (30 ms) cost each step a second at batch size 32
    order = np.random.default_rng([seed, epoch]).permutation(n)
    order.flags.writeable = False
    return order


def autocast_for(precision: str, device: torch.device):
    """The autocast context `train.precision` asks for on `device` (a no-op context for fp32)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def enable_activation_checkpointing(model: nn.Module, fraction: float = 1.0) -> None:
    """Non-reentrant checkpointing of the decoder layers (so gradients reach the adapters although
    the layer inputs are frozen), under whichever name this transformers version gives the switch.

    `fraction` < 1: only that share of the layers, spread evenly (`checkpointed_layers`); the others
    keep their activations, which buys back their recomputation (a third of a LoRA step's frozen matmul
    work) for their memory. Set through transformers' per-layer switch (`gradient_checkpointing` on
    each decoder layer), which every layer it checkpoints one by one has."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise ConfigError("train.activation_checkpointing needs a transformers model")
    if fraction == 1:
        return
    blocks = decoder_blocks(model)
    if not blocks or not all(hasattr(b, "gradient_checkpointing") for b in blocks):
        raise ConfigError("train.activation_checkpointing_fraction: this model's decoder layers are not "
                          "checkpointed one by one (transformers' GradientCheckpointingLayer); use 1")
    chosen = checkpointed_layers(len(blocks), fraction)
    for i, block in enumerate(blocks):
        block.gradient_checkpointing = i in chosen


def make_optimizer(parts: Sequence[list[torch.Tensor]], config: TrainConfig, device: torch.device,
                   fp32_moments: Sequence[torch.Tensor] = ()) -> torch.optim.Optimizer:
    """`config.optimizer` (AdamW, or AdamW with 8-bit moments: `efftune.train.optimizers`) over each
    part's parameters (a run's lanes: `efftune.train.together`), two groups a part in part order: its
    matrices with weight decay, the rest without (fused on CUDA). `fp32_moments`: parameters whose
    moments stay fp32 under 8-bit moments (the embeddings: `optimizers.embedding_weights`)."""
    groups = [g for params in parts for g in (
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0})]
    return build_optimizer(config.optimizer, groups, config.lr, device, fp32_moments)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """The gradients' total norm before clipping; clipped to `max_norm` when it is positive."""
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    if any(type(p.grad).__name__ == "DTensor" for p in params):  # sharded (FSDP): torch sums the shards' norms
        return float(torch.nn.utils.clip_grad_norm_(params, math.inf))  # (a factor of 1: nothing clipped)
    grads = [p.grad.norm() for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0


def check_shardable(config: TrainConfig, hooks: TrainHooks) -> None:
    """What cannot run with `train.distributed: fsdp`, refused before anything changes, with why."""
    if not hooks.keeps_base_weights:
        raise ConfigError(f"train.distributed fsdp cannot run {type(hooks).__name__}: it writes into the frozen "
                          "base weights (ReLoRA merges its LoRA into them at each restart and saves the whole "
                          "model), which FSDP keeps sharded across the ranks; use train.distributed ddp")
    if config.fp8_base:
        raise ConfigError("train.distributed fsdp cannot run with train.fp8_base: it swaps the base linears' "
                          "weights for FP8 copies, which FSDP shards; use train.distributed ddp")
    if config.cuda_graphs:
        raise ConfigError("train.distributed fsdp cannot run with train.cuda_graphs: FSDP gathers each block's "
                          "weights around its forward, outside a graph's fixed addresses; use train.compile alone")


def train(model: nn.Module, sequences: Sequence[Encoded] | Mapping[str, Sequence[Encoded]], config: TrainConfig,
          output_dir: str | Path, *, pad_id: int = 0, resume: bool = False,
          evaluate: Callable[..., dict] | None = None, hooks: TrainHooks | None = None,
          resume_changed: bool = False, on_checkpoint: Callable[[Path], None] | None = None,
          run_dirs: Mapping[str, str | Path] | None = None,
          on_metrics: Callable[[str | None, dict], None] | None = None, unshard: bool = True,
          measure: Callable[[nn.Module, str], None] | None = None) -> TrainResult:
    """Train the model's trainable parameters on `sequences` (tokenised, prompt masked).

    Writes `metrics.jsonl`, `training.png` and `checkpoints/` under `output_dir`. `evaluate(model,
    step=)` (optional) is called before the first step, every `eval_every` steps and after the last,
    with the number of steps done; its dicts are logged and returned in `TrainResult.evals`. `hooks` changes the schedule and
    acts after each step (e.g. `efftune.methods.relora.ReLoraHooks`). With `config.fp8_base` the
    frozen base linears run in FP8 for the whole run (evaluations inside it included) and the
    exact model is back when `train` returns or raises. With `config.cuda_graphs` evaluations
    inside the run are eager, and the blocks are eager again when `train` returns or raises.
    `config.attention` picks the kernel for rows that hold one causal sequence each (no mask
    needed), `config.masked_attention` the one for rows with a mask (packing, token trees): they
    travel with each forward call (`config.forward_options()`), nothing is set on the model.
    `evaluate` runs its own forwards: the library's evaluators take `options=config.forward_options()`
    to run with the same kernels (`efftune.finetune` passes them).

    **k LoRA adapters at once**: `sequences` a mapping {adapter name: its sequences} trains those
    adapters of the model together, each as a run of its own would train it (`efftune.train.together`):
    each step takes `batch_size` examples of every adapter in that adapter's seeded order, and every
    row goes through its own adapter only. Each adapter's run lives in `output_dir/<adapter>/` in
    the format of a one-adapter run (metrics.jsonl with its own loss and gradient norm, its
    checkpoints, training.png), or in `run_dirs[adapter]` where given, so it resumes with any other
    grouping; with `resume`, adapters that have a checkpoint continue from it (each from its own
    step) and the others start. `evaluate(model,
    names, step=)` returns {name: metrics} for the adapters named; `TrainResult.adapters` holds each
    adapter's result. Every trainable parameter must be one of the adapters'; `hooks` may change
    the schedule and act after steps, but not keep state of their own or change base weights.

    Never losing work: a checkpoint is written every `save_every` steps, after `save_every_minutes`,
    at the end, and when SIGINT/SIGTERM arrive (the step finishes first; then `RunInterrupted`).
    A checkpoint holds finite weights only; one whose weights give a non-finite loss (or gradient)
    in the next step is renamed `step-N.diverged` and `latest` names the one before. `resume`
    refuses a checkpoint made with a TrainConfig that computes differently (`checkpoint.FREE_KEYS`
    may change) unless `resume_changed`. `on_checkpoint(path)` is called after each checkpoint,
    `on_metrics(adapter, row)` after each row metrics.jsonl gains (TensorBoard takes them from there).

    Under `train.distributed: fsdp` the trained parameters are made whole on every rank when training
    ends (`unshard`: an adapter, saved and used as after any run); `unshard=False` leaves the model
    sharded (a full fine-tune, which `distributed.whole_state_dict` gathers for saving).

    `measure(model, when)` (optional: forgetting, `efftune.eval.retention`) is called on every rank with
    the model as an evaluation sees it (under fsdp inside the root's scope, every rank running every
    forward): `when` is "before" for the model as it came in, before a resume loads its checkpoint,
    and "after" once the last step is done (a resumed finished run too), before anything is unsharded.
    """
    hooks = hooks or TrainHooks()
    if isinstance(sequences, Mapping):
        if not hooks.keeps_base_weights or hooks.state():
            raise ConfigError(f"train: k adapters at once cannot run with {type(hooks).__name__}: it keeps state "
                              "of its own or changes the base weights, which the adapters share")
    # graphed blocks take the block masks' tensors at fixed addresses (static_masks: efftune.forward.flex.block_mask)
    options = config.forward_options()
    options.check(model, "train.")  # before anything is written
    with ExitStack() as scope:
        if config.fp8_base:
            if not hooks.keeps_base_weights:
                raise ConfigError(f"train.fp8_base cannot run with {type(hooks).__name__}: it changes the base "
                                  "weights, which are kept in FP8 during training")
            from .fp8 import Fp8Base
            scope.enter_context(Fp8Base(model))
        if config.cuda_graphs:  # graphs recorded for the training shapes would re-record for every later one
            scope.callback(uncompile_blocks, model)
        if config.compile:  # matters only under DDP (torchrun), which the blocks learn of as they compile
            scope.enter_context(distributed.ddp_compile_options())
        return _train(model, sequences, config, Path(output_dir), pad_id, resume, evaluate, hooks, resume_changed,
                      on_checkpoint, options, run_dirs, on_metrics, unshard, measure)


def _train(model: nn.Module, sequences: Sequence[Encoded] | Mapping[str, Sequence[Encoded]], config: TrainConfig,
           output_dir: Path, pad_id: int, resume: bool, evaluate: Callable[..., dict] | None, hooks: TrainHooks,
           resume_changed: bool, on_checkpoint: Callable[[Path], None] | None,
           options: ForwardOptions, run_dirs: Mapping[str, str | Path] | None = None,
           on_metrics: Callable[[str | None, dict], None] | None = None, unshard: bool = True,
           measure: Callable[[nn.Module, str], None] | None = None) -> TrainResult:
    device = next(model.parameters()).device
    here = distributed.init(str(device))  # under torchrun: this rank among the others (efftune.train.distributed)
    from_rank0 = distributed.filled_from_rank0(model)  # only rank 0 loaded the weights: DDP/FSDP send them
    if from_rank0:
        device = distributed.rank_device()  # the meta ranks' copies get storage there
    micro = distributed.check_batch(config.batch_size, config.micro_batch_size, here)
    local = config.batch_size // here.size  # this rank's examples of each step
    main = here.main  # rank 0 writes every file and prints; the others compute
    sharded = here.active and config.distributed == "fsdp"
    if sharded:
        check_shardable(config, hooks)  # at one rank too: a config that runs on one GPU runs on N
    alone = sharded and here.size == 1
    if alone:
        # A world of one has nothing to shard across: FSDP2 would only copy every block's weights into
        # its gather buffers and out again, forward and backward (8B, H100: 0.69x the speed at 1.33x
        # the memory, bench/RESULTS.md session 20), so one rank trains unwrapped, as torchtitan applies
        # FSDP only with more than one shard. Its checkpoints resume on N ranks under fsdp like any other.
        sharded, device = False, distributed.rank_device()
        model.to(device)  # where FSDP would have put the shards (a base loaded into host memory)
    if config.activation_checkpointing and not config.compiler_checkpoints:
        enable_activation_checkpointing(model, config.activation_checkpointing_fraction)
    if config.compile:
        compile_blocks(model, cuda_graphs=config.cuda_graphs, autotune=config.compile_autotune,
                       checkpoint_fraction=config.compiled_checkpoint_fraction())
    # the forward: plain, or through DDP/FSDP under torchrun (their hooks reduce the gradients); FSDP
    # replaces the parameters by sharded ones, so the optimizer is built over those
    if sharded:
        bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")  # autocast_for's
        forward = distributed.fully_sharded(model, decoder_blocks(model), torch.bfloat16 if bf16 else None,
                                            from_rank0=from_rank0)
    elif here.active and not alone:
        # DDP must look for parameters without a gradient: experts no token reached on this rank, and with
        # k adapters those of a lane that resumed further on and joins later
        unused = bool(moe_layers(model) or router_taps(model)) or isinstance(sequences, Mapping)
        forward = distributed.data_parallel(model, unused, from_rank0=from_rank0)
    else:
        forward = partial(target_logprobs, model)
    params = hooks.parameters(model)
    if not params:
        raise ConfigError("nothing to train: the model has no trainable parameters (attach a method first)")
    lanes = make_lanes(model, sequences, params, output_dir, run_dirs)
    together = lanes[0].name is not None  # k adapters at once (rows go through their own adapter)
    for lane in lanes:
        lane.directory.mkdir(parents=True, exist_ok=True)

    def outside_training():
        """Forwards that are not training steps (evaluations): CUDA graphs recorded for the training shapes
        would record again for every other shape, so they run eager; under fsdp the root's parameters
        (embeddings, final norm, LM head) are gathered for them (`distributed.gathered`)."""
        stack = ExitStack()
        if config.cuda_graphs:
            stack.enter_context(torch.compiler.set_stance("force_eager"))
        if sharded:
            stack.enter_context(distributed.gathered(forward))
        return stack

    if measure is not None:  # the untrained model (a resume loads its checkpoint later)
        with outside_training():
            measure(model, "before")
        model.train()
    torch.manual_seed(config.seed)  # after the measurement: whatever it draws, training draws the same
    optimizer = make_optimizer([lane.params for lane in lanes], config, device, embedding_weights(model))
    lr_at = lambda s: config.lr * hooks.lr_multiplier(s, config)
    # a lane's checkpoints hold its own part of the optimizer (the whole optimizer for a one-lane run)
    own_part = (lambda lane: lane_optimizer(optimizer, lane)) if together else (lambda lane: optimizer)
    only = (lambda lane: lane.param_names) if together else (lambda lane: None)

    if resume:
        found = {lane.name: latest_checkpoint(lane.ckpt_root) for lane in lanes}
        if not any(found.values()):
            where = lanes[0].ckpt_root if not together else \
                f"{output_dir}/*/checkpoints" if not run_dirs else " or ".join(str(lane.ckpt_root) for lane in lanes)
            raise CheckpointError(f"--resume: no checkpoint under {where}")
        for lane in lanes:  # every check before anything changes
            if found[lane.name] is None:
                continue
            changed = changed_keys(read_state(found[lane.name]).get("train_config", {}), asdict(config), "train.")
            if changed and not resume_changed:
                raise CheckpointError(f"--resume: checkpoint {found[lane.name]} was made with another "
                                      f"{', '.join(changed)}; a resume computes what the run would have (pass "
                                      "--resume-changed to accept the change)")
            lane.rows = read_metrics(lane.metrics_path)  # a bad file fails here, before the model changes
        for lane in lanes:  # shards a killed sharded save left behind (rank 0 removes them)
            distributed.on_main(partial(clear_staging, lane.ckpt_root))
        for lane in lanes:
            if found[lane.name] is None:
                lane.rows = []
                continue
            part = own_part(lane)
            state = load_checkpoint(found[lane.name], model, part, hooks.load_state, expected_extra=hooks.state(),
                                    only=only(lane))
            if together:
                take_lane_state(optimizer, lane, part)
            lane.start = state["step"]
            lane.rows = [r for r in lane.rows if r.get("step", 0) <= lane.start]  # what was logged up to it
            lane.last_ckpt, lane.unconfirmed = found[lane.name], lane.start < config.steps
        distributed.barrier()  # every rank has read the files before rank 0 rewrites metrics.jsonl
    for lane in lanes:
        if main:
            write_text_atomically(lane.metrics_path, "".join(strict_json(r) + "\n" for r in lane.rows))
        lane.evals = [{k: v for k, v in r.items() if k != "eval"} for r in lane.rows if r.get("eval")]
        for r in reversed([r for r in lane.rows if "grad_norm" in r]):  # zero-gradient steps carry over a resume
            if r["grad_norm"] != 0:
                break
            lane.zero_grad += 1

    def log(lane: Lane, row: dict) -> None:
        if main:
            line = strict_json(row) + "\n"
            with open(lane.metrics_path, "a") as f:
                start = f.tell()
                f.write(line)
                f.flush()
                fault_point("mid_metrics_append", tear=(lane.metrics_path, start + len(line) // 2))
        lane.rows.append(row)
        if on_metrics is not None:
            on_metrics(lane.name, row)

    def eval_due(step: int) -> bool:
        return step in (0, config.steps) or bool(config.eval_every and step % config.eval_every == 0)

    def run_eval(step: int, which: list[Lane]) -> None:
        if step == config.steps:
            fault_point("final_eval")
        with outside_training():
            results = {lanes[0].name: evaluate(model, step=step)} if not together else \
                evaluate(model, [l.name for l in which], step=step)
        for lane in which:  # an adapter the evaluation left out is logged with no metrics
            result = {"step": step, **results.get(lane.name, {})}
            lane.evals.append(result)
            log(lane, {"eval": True, **result})
        model.train()

    def diverged(lane: Lane, step: int, what: str) -> None:
        note = ""
        if lane.unconfirmed and lane.last_ckpt is not None:  # this step ran on its weights: it leads nowhere
            bad = lane.last_ckpt
            lane.last_ckpt = set_aside(bad) if main else ([c for c in checkpoints(bad.parent) if c != bad] or [None])[-1]
            note = f" (moved {bad.name}, whose weights gave it, to {bad.name}.diverged)"
        where = (f"the last good checkpoint is {lane.last_ckpt}: resume from it with a lower --lr and --resume-changed"
                 if lane.last_ckpt else "no good checkpoint was written: start again with a lower --lr")
        raise TrainingDiverged(f"{lane.label()}{what} at step {step}; stopped{note}, {where}")

    def checkpoint(done: int, which: list[Lane]) -> None:
        nonlocal last_save
        for lane in which:  # a checkpoint holds finite weights only (each rank checks its shards: fsdp)
            bad = distributed.first_nonfinite_everywhere(model, only(lane)) or first_nonfinite(hooks.state())
            if bad:
                diverged(lane, done, f"weight {bad!r} became NaN or infinite")
        for lane in which:
            directory = lane.ckpt_root / f"step-{done:06d}"
            save = partial(save_checkpoint, directory, model, own_part(lane), done, {"train_config": asdict(config)},
                           hooks.state(), only=only(lane), sharded=sharded)
            # under torchrun rank 0 writes the trainable state every rank holds (ddp); under fsdp every
            # rank writes its own shards and rank 0 the rest (efftune.train.sharded_state)
            save() if sharded else distributed.on_main(save)
            lane.last_ckpt = directory
            # The last checkpoint is not followed by a forward pass; every other is pruned after one.
            lane.unconfirmed = done < config.steps
        last_save = time.monotonic()
        fault_point("before_prune")
        for lane in which:
            if not main:
                continue
            if not lane.unconfirmed:
                prune_checkpoints(lane.ckpt_root, config.keep_checkpoints)
            if on_checkpoint:
                on_checkpoint(lane.last_ckpt)
            plot_metrics(lane.rows, lane.directory / "training.png")

    if evaluate:  # a fresh run's first evaluation, or one the interrupted run did not finish
        for start in sorted({lane.start for lane in lanes}):
            which = [l for l in lanes if l.start == start and eval_due(start)
                     and not any(e["step"] == start for e in l.evals)]
            if which:
                run_eval(start, which)
    attention = getattr(getattr(model, "config", None), "_attn_implementation", "sdpa")
    model.train()
    scale = float(here.size)  # DDP and FSDP average the ranks' gradients; the step's loss is their sum
    first = min(lane.start for lane in lanes)
    t_start, tokens_seen, last_save = time.perf_counter(), 0, time.monotonic()
    lane_tokens = {lane.name: 0 for lane in lanes}
    fault_point("before_first_step")
    bar = progress_bar(config.steps, f"train {len(lanes)} adapters" if together else "train", unit="step",
                       initial=first, enable=main)
    eval_time = SideTime(bar)  # evaluations stop the bar's clock: its time estimate counts steps only
    try:
        with StopSignals() as stop:
            for step in range(first, config.steps):
                t0 = time.perf_counter()
                if config.cuda_graphs:  # the last step's graph outputs (its gradients too) are dead from here
                    torch.compiler.cudagraph_mark_step_begin()
                live = [lane for lane in lanes if lane.start <= step]  # a lane resumed further on joins later
                batches = [[lane.sequences[i] for i in example_order(len(lane.sequences), config.seed,
                                                                     step * config.batch_size, config.batch_size)]
                           for lane in live]
                # the mean is over the whole (global) batch's answer tokens, whichever rank runs an example
                n_targets = [sum(sum(1 for t in s.labels if t != IGNORE) for s in batch) for batch in batches]
                mine = [batch[here.rank * local:(here.rank + 1) * local] for batch in batches]  # this rank's share
                for g in optimizer.param_groups:
                    g["lr"] = lr_at(step)
                totals, aux_logs = [0.0] * len(live), [{} for _ in live]
                for m0 in range(0, local, micro):
                    rows, owner = [], []  # a row holds one lane's examples only
                    for j, batch in enumerate(mine):
                        part = training_rows(batch[m0:m0 + micro], config.max_length)
                        rows += part
                        owner += [j] * len(part)
                        lane_tokens[live[j].name] += sum(len(r) for r in part)
                    # CUDA graphs are recorded per input shape: fixed-length rows keep it to one per row count
                    inputs = collate(rows, pad_id, attention,
                                     length=config.max_length if config.cuda_graphs else None).to(device)
                    partition = partitioner(config.compile_memory_budget, config.compile_lean) if config.compile \
                        else nullcontext()
                    # each row through its own adapter; backward inside too (checkpointed layers recompute)
                    with mixed_adapter_batch(model, [live[j].name for j in owner]) if together else nullcontext(), \
                            distributed.gradient_sync(forward, last=m0 + micro >= local):
                        with autocast_for(config.precision, device), partition:
                            logp = forward(inputs.input_ids, inputs.rows, inputs.sources, inputs.targets,
                                           inputs.position_ids, inputs.mask, options=options)
                        if together:  # each lane's answer NLL over its own answer tokens; summed over lanes
                            losses, reals = lane_losses(logp, inputs, owner, n_targets)
                        else:
                            losses, reals = (-logp.sum() / n_targets[0]).reshape(1), [inputs.real]
                        loss = losses.sum()
                        totals = [a + b for a, b in zip(totals, losses.tolist())]
                        # MoE: efftune's routed layers and transformers' own MoE blocks (RouterTap) report
                        # balance losses over each lane's real tokens (padding is routed too, but must not
                        # count); each is added with the micro-batch's share and logged
                        n_part = min(micro, local - m0)  # examples of each lane in this micro-batch
                        for j, real in enumerate(reals):
                            found_aux = False
                            for aux, aux_stats, loads in (collect_aux_losses(model, real)
                                                          + (expert_loads(model, real),),
                                                          hf_router_aux(model, real)):
                                if aux is None:
                                    continue
                                found_aux, lane = True, live[j]
                                lane.routing_load = loads if lane.routing_load is None else [
                                    [a + b for a, b in zip(r0, r1)] for r0, r1 in zip(lane.routing_load, loads)]
                                loss = loss + aux * (n_part / config.batch_size)
                                for k, v in aux_stats.items():
                                    aux_logs[j][k] = aux_logs[j].get(k, 0.0) + v * n_part / config.batch_size
                            if not found_aux:
                                break  # no MoE layers: no other lane has any either
                        (loss * scale if here.active else loss).backward()
                    tokens_seen += inputs.tokens
                if here.active:  # the step's loss and metrics over all ranks' examples; a stop signal any rank got
                    keys = [sorted(a) for a in aux_logs]
                    summed = distributed.all_sum([*totals, *(a[k] for a, ks in zip(aux_logs, keys) for k in ks),
                                                  float(stop.signum or 0)])
                    totals, rest = summed[:len(totals)], summed[len(totals):]
                    for a, ks in zip(aux_logs, keys):
                        for k in ks:
                            a[k], rest = rest[0], rest[1:]
                    if rest[0] and stop.signum is None:  # every rank stops after the same step
                        stop.signum = signal.SIGTERM
                for lane, total in zip(live, totals):
                    if not math.isfinite(total):
                        diverged(lane, step + 1, f"the loss became {total}")
                fault_point("mid_step")
                grad_norms = [clip_grad_norm(lane.params, config.grad_clip) for lane in live]
                for lane, grad_norm in zip(live, grad_norms):
                    if not math.isfinite(grad_norm):  # the optimizer step would make every weight NaN
                        diverged(lane, step + 1, f"the gradient norm became {grad_norm}")
                for lane in live:
                    if lane.unconfirmed:  # the newest checkpoint's weights gave a finite loss: it is good
                        lane.unconfirmed = False
                        prune_checkpoints(lane.ckpt_root, config.keep_checkpoints)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                fault_point("after_optimizer_step")
                extra = hooks.after_step(step + 1, optimizer)
                dt = time.perf_counter() - t0
                # tokens/s counts the examples' own tokens, so the shared-prefix saving shows as speed
                step_tokens = sum(len(s) for batch in batches for s in batch)
                for j, lane in enumerate(live):
                    row = {"step": step + 1, "loss": round(totals[j], 6), "lr": lr_at(step),
                           "grad_norm": round(grad_norms[j], 4), "tokens_per_s": round(step_tokens / dt, 1),
                           "seconds": round(dt, 3), **{k: round(v, 6) for k, v in aux_logs[j].items()}, **extra}
                    if together:
                        row.update(tokens=sum(len(s) for s in batches[j]), together=len(live))
                    lane.zero_grad = lane.zero_grad + 1 if grad_norms[j] < 1e-10 else 0
                    if lane.zero_grad >= ZERO_GRAD_STEPS:
                        row["zero_grad_steps"] = lane.zero_grad
                        if lane.zero_grad == ZERO_GRAD_STEPS and main:
                            note(f"efftune: warning: {lane.label()}the gradient norm has been 0 for "
                                 f"{lane.zero_grad} steps (since step {step + 2 - lane.zero_grad}), so the loss "
                                 f"cannot change: the weights may have saturated (is lr {config.lr:g} too "
                                 "high?) or nothing reaches the trainable parameters")
                    log(lane, row)
                bar.set_postfix(loss=f"{sum(totals) / len(totals):.4f}", lr=f"{lr_at(step):.2e}",
                                tok_s=f"{step_tokens / dt:.0f}", **eval_time.postfix())
                bar.update(1)
                done = step + 1
                minutes = config.save_every_minutes
                if (config.save_every and done % config.save_every == 0) or done == config.steps \
                        or (minutes and time.monotonic() - last_save >= 60 * minutes):
                    checkpoint(done, live)
                if evaluate and eval_due(done):
                    with eval_time:
                        run_eval(done, live)
                if stop.signum is not None:
                    behind = [l for l in live if l.last_ckpt is None or l.last_ckpt.name != f"step-{done:06d}"]
                    if behind:
                        checkpoint(done, behind)
                    written = f"checkpoint {lanes[0].last_ckpt}" if not together else \
                        f"checkpoints of step {done} under {output_dir}/*/checkpoints"
                    raise RunInterrupted(f"stopped after step {done}; {written} written: resume with --resume",
                                         stop.signum, checkpoint=lanes[0].last_ckpt)
    except OSError as exc:  # a full disk, a lost mount: the checkpoint before is whole (atomic writes)
        kept = [l.last_ckpt for l in lanes if l.last_ckpt]
        where = ("no checkpoint was written yet" if not kept else
                 f"the last checkpoint {kept[0]} is intact: free space and resume with --resume" if not together else
                 f"the last checkpoints under {output_dir}/*/checkpoints are intact: free space and resume with --resume")
        raise EfftuneError(f"could not write {exc.filename or 'to ' + str(output_dir)}: "
                           f"{exc.strerror or exc}; stopped, {where}") from None
    finally:
        bar.close()
    seconds = time.perf_counter() - t_start
    if measure is not None:  # before unsharding: a forward through FSDP's blocks would shard them again
        with outside_training():
            measure(model, "after")
    if sharded and unshard:  # the adapter whole on every rank, for saving and using it (the base stays sharded)
        distributed.unshard_trainable(model)
    tokens_seen = int(distributed.all_sum([tokens_seen])[0])  # the run's tokens, all ranks'
    results = {}
    for lane in lanes:
        if lane.routing_load and here.active:  # each rank routed its own tokens: the run's load is their sum
            flat = distributed.all_sum([v for layer in lane.routing_load for v in layer])
            lane.routing_load = [[flat.pop(0) for _ in layer] for layer in lane.routing_load]
        if main:
            plot_metrics(lane.rows, lane.directory / "training.png")
        if main and lane.routing_load:
            (lane.directory / "routing.json").write_text(json.dumps({"expert_load": lane.routing_load}))
            plot_routing(lane.routing_load, lane.directory / "routing.png")
        losses = [r["loss"] for r in lane.rows if "loss" in r]
        results[lane.name] = TrainResult(steps=config.steps, final_loss=losses[-1] if losses else None,
                                         train_seconds=seconds, tokens=lane_tokens[lane.name], evals=lane.evals,
                                         start_step=lane.start)
    if not together:
        return replace(results[None], tokens=tokens_seen)
    return TrainResult(steps=config.steps, final_loss=None, train_seconds=seconds, tokens=tokens_seen, evals=[],
                       start_step=first, adapters=results)


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` step-* checkpoints under `root`."""
    import shutil
    for old in checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)

"""Several processes training one model: torch.distributed under torchrun.

efftune launches nothing and shards nothing itself. `torchrun` (or `efftune train --nproc N`,
which runs torchrun) starts one process per device and sets RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous address; `init()` joins the process group from those (NCCL on GPUs, gloo on CPU).
Then the training loop (`efftune.train.loop`) runs in every process, each on its share of
every step's global batch, in one of two modes (`train.distributed`):

- `ddp`: every rank holds the whole model; torch's DistributedDataParallel all-reduces the
  gradients of the trainable parameters only (DDP leaves out parameters that need no gradient),
  in buckets overlapped with backward.
- `fsdp`: each decoder block and then the rest of the model is sharded with FSDP2's
  `fully_shard` (frozen base weights too, a quantised base's packed codes included: QLoRA under
  FSDP2, `efftune.quantize.linear.frozen_packed`), so a base that does not fit one device trains.
  A world of one rank has nothing to shard across and trains unwrapped (`efftune.train.loop`).

Both give each step the gradient one process computes over the whole batch: a rank's loss is
its examples' share of the step's mean answer NLL times the world size, and DDP and FSDP average
over ranks. Outputs (metrics, plots, checkpoints, the adapter, the progress bar, the final JSON
line) come from rank 0 only, but for the shards of an fsdp checkpoint, which each rank writes
(`efftune.train.sharded_state`); every rank reads checkpoints, so the output directory must be one
all ranks see (a shared filesystem across machines).
"""
from __future__ import annotations

import gc
import os
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Collection, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError, EfftuneError
from ..forward.logprobs import target_logprobs
from ..models import empty_model, load_model, resolve_device, resolve_dtype

MODES = ("ddp", "fsdp")
T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank among `size` processes, its device index on its machine."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes outputs and prints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """A process group is up (under torchrun, even with one process)."""
        return dist.is_available() and dist.is_initialized()


def launched() -> bool:
    """This process was started by torchrun (or anything that sets its environment)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def restarted() -> bool:
    """torchrun started this process again after a rank failed (`--max-restarts`): the run resumes."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0


def world() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return World()


def init(device: str = "auto", timeout_minutes: float = 30) -> World:
    """Join the process group torchrun's environment describes (nothing without it); idempotent.
    NCCL when this process trains on a GPU (`device` auto or cuda), each local rank on its own
    GPU; gloo on CPU. Returns this process's `World`."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return world()
    if not dist.is_available():
        raise EfftuneError("this torch is built without torch.distributed; it cannot run under torchrun")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if restarted() and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and local_rank == 0:
        from ..progress import note  # before joining: the join is what may hang
        note("efftune: warning: torchrun restarted the ranks on the store of its rendezvous, which keeps the "
             "previous attempt's keys: joining may fail ('connection refused') or hang (pytorch/pytorch#135712); "
             "start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (efftune train --nproc sets it)")
    on_gpu = torch.cuda.is_available() and not str(device).startswith("cpu")
    if on_gpu:
        if local_rank >= torch.cuda.device_count():
            raise EfftuneError(f"local rank {local_rank} has no GPU of its own: only {torch.cuda.device_count()} "
                               "are visible; start at most that many processes per machine")
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if on_gpu else "gloo", timeout=timedelta(minutes=timeout_minutes),
                            device_id=torch.device("cuda", local_rank) if on_gpu else None)
    return world()


def device_for(device: str, here: World) -> str:
    """The device this rank loads the model on: its own GPU where `device` says auto or cuda."""
    if not here.active or not torch.cuda.is_available() or device not in ("auto", "cuda"):
        return device
    return f"cuda:{here.local_rank}"


def finish() -> None:
    """Leave the process group (the end of a command that joined one).

    The cycle collector runs first. FSDP2 keeps a sharded model in reference cycles (its state, the
    parameter groups and the module's hooks point at one another), so the model, its DTensors and
    its collectives' state outlive the function that trained it until a collection runs; left to
    the interpreter's teardown, they would be destroyed after the process group and while the
    interpreter is half gone, where a gloo rank was seen to abort once in many runs ("terminate
    called without an active exception")."""
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# -- collectives on plain numbers -------------------------------------------------------------------
def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(values: Sequence[float]) -> list[float]:
    """Each value summed over the ranks (float64); the values themselves without a process group."""
    if not world().active or not values:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if world().active:
        dist.barrier()


def main_first(fn: Callable[[], T]) -> T:
    """`fn()` on rank 0, then on the other ranks (downloads, caches, a run directory: rank 0 makes
    them, the others find them made). An EfftuneError on rank 0 is raised on every rank with its
    message instead of leaving the others waiting."""
    here = world()
    if not here.active or here.size == 1:
        return fn()
    result = _rank0_runs(fn, here)
    return result if here.main else fn()


def on_main(fn: Callable[[], T]) -> T | None:
    """`fn()` on rank 0 only, the other ranks waiting for it; its failure reaches every rank (as an
    EfftuneError there). Rank 0 gets `fn`'s result, the others None."""
    here = world()
    if not here.active or here.size == 1:
        return fn()
    return _rank0_runs(fn, here)


def _rank0_runs(fn: Callable[[], T], here: World) -> T | None:
    """Rank 0 calls `fn`, then every rank learns whether it failed: rank 0 raises its own error, the
    others an EfftuneError naming it, so none is left waiting. `fn`'s result on rank 0, else None."""
    failure: list = [None]
    result = None
    if here.main:
        try:
            result = fn()
        except BaseException as exc:
            failure[0] = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__  # a Ctrl-C has no text
            dist.broadcast_object_list(failure, src=0)
            raise
    dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        raise EfftuneError(f"rank 0 failed ({failure[0]})")
    return result


def shard(items: Sequence[T], here: World) -> list[T]:
    """This rank's share of `items` (every size-th from its rank)."""
    return list(items[here.rank::here.size])


def sum_over_shares(score: Callable[..., Sequence[float]], *items: Sequence, here: World | None = None
                    ) -> list[float]:
    """Held-out examples scored in shares: each of `items` cut to this rank's share (`shard`), and the
    numbers `score(*shares)` returns (counts, sums: what adds up over examples) summed over the ranks,
    so every rank gets the whole set's numbers (float64). Every rank calls it (a collective), with
    `score` returning as many numbers on each. `here`: the world to shard over (this process's by
    default); without a process group `score` gets the whole of `items` and its numbers come back."""
    here = here or world()
    return all_sum(score(*(shard(part, here) for part in items)))


# -- the parallel forward ---------------------------------------------------------------------------
class Forward(nn.Module):
    """The loop's forward (`target_logprobs`) as a module over the model, so that DDP's and FSDP's
    hooks run around each call: DDP prepares its gradient reduction in `forward`, and FSDP's root
    gathers the parameters outside the blocks (embeddings, final norm, LM head) before it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return target_logprobs(self.model, *args, **kwargs)


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"train.distributed must be one of {', '.join(MODES)}, got {mode!r}")


def check_batch(batch_size: int, micro_batch_size: int, here: World) -> int:
    """Examples per forward on each rank; the global batch must split evenly into them."""
    if batch_size % here.size:
        raise ConfigError(f"train.batch_size {batch_size} (the global batch) does not split across {here.size} "
                          f"ranks: make it a multiple of {here.size}")
    local = batch_size // here.size
    micro = micro_batch_size or local
    if local % micro:
        raise ConfigError(f"train.batch_size {batch_size} is not divisible by {here.size} ranks x "
                          f"train.micro_batch_size {micro}: each rank takes {local} examples a step")
    return micro


def data_parallel(model: nn.Module, unused_parameters: bool, from_rank0: bool = False) -> nn.Module:
    """`Forward(model)` under DistributedDataParallel. Trainable parameters are made equal to rank
    0's first (they are already when every rank seeded the same, as efftune's runs do; a check
    costs one broadcast of the adapter); frozen weights and buffers are never sent.
    `unused_parameters`: some trainable parameters may get no gradient in a step (experts no token
    reached on this rank, a lane of k adapters that joins later), which DDP must look for.

    The gradients are views into DDP's buckets (`gradient_as_bucket_view`): no copy of each one into
    its bucket before the all-reduce and back after (448 of each a step for an 8B LoRA). With compiled
    blocks, see `ddp_compile_options`. DDP's `static_graph` is not used: torch 2.13's reducer fails an
    internal assertion in this loop's backward with it (gloo, CPU).

    `from_rank0`: only rank 0 loaded the model (the others hold it on the meta device): their copies
    get storage on their device, rank 0's buffers are sent to them (`buffers_from_rank0`), and DDP's
    initial synchronisation sends rank 0's parameters, the frozen base too, each tied one once."""
    from torch.nn.parallel import DistributedDataParallel
    if from_rank0:
        device = rank_device()
        to_empty_keeping_ties(model, device)
        model.to(device)  # rank 0's copy, where it was loaded elsewhere (host memory)
        buffers_from_rank0(model)
    else:
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    dist.broadcast(p.data, src=0)
    return DistributedDataParallel(Forward(model), init_sync=from_rank0, find_unused_parameters=unused_parameters,
                                   gradient_as_bucket_view=True,
                                   **_no_forward_buffer_sync())


def ddp_compile_options():
    """The torch.compile settings a DDP run's compiled blocks are compiled under: without dynamo's
    DDPOptimizer, which splits a compiled graph at DDP's bucket boundaries so that a bucket's
    all-reduce can start before the rest of that graph's backward. efftune compiles each decoder block
    on its own, so a block's gradients are ready, and DDP's hooks run, as its backward graph ends:
    the all-reduce already overlaps the backward of the blocks below, and a split (each block cut
    into two graphs, two CUDA graphs to replay) only adds work."""
    return torch._dynamo.config.patch(optimize_ddp=False)


def _no_forward_buffer_sync() -> dict:
    """DDP's switch for not broadcasting buffers at every forward: `forward_sync_buffers=False` where
    torch has it (2.13; there `broadcast_buffers` is deprecated), `broadcast_buffers=False` before
    (torch 2.11, the GPU machines'), which also skips the buffers at DDP's initial sync."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def fully_sharded(model: nn.Module, blocks: Sequence[nn.Module], param_dtype: torch.dtype | None,
                  from_rank0: bool = False) -> nn.Module:
    """`Forward(model)` with FSDP2: each decoder block a unit of `fully_shard` (frozen base weights
    sharded too), then the rest (embeddings, final norm, LM head) as the root unit. Compute in
    `param_dtype` (bf16 under autocast on GPUs), gradients reduced in fp32, and the sharded
    parameters the optimizer steps keep their own dtype (fp32 for what trains). Blocks compiled
    before (`train.compile`) are sharded as compiled: torch's order, compile per block, then shard.
    `from_rank0`: only rank 0 holds the weights (the others the model on the meta device): every
    rank's shards are cut from rank 0's (`fill_shards_from_rank0`)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from ..quantize.model import check_shardable
    if not blocks:
        raise ConfigError(f"train.distributed fsdp: found no decoder blocks in {type(model).__name__} to shard "
                          "(it lists none in _no_split_modules); use train.distributed ddp")
    check_shardable(model)  # a bitsandbytes-quantised base cannot shard; efftune's NF4 / int8 layers do
    full = model.state_dict() if from_rank0 and world().main else {}  # rank 0's whole weights, before sharding
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for i, block in enumerate(blocks):
        # the last block's backward starts right after its forward: kept gathered in between, it saves
        # one all-gather a step for one block's weights (torchtitan does the same)
        fully_shard(block, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1)
    root = Forward(model)
    fully_shard(root, mp_policy=policy)
    if from_rank0:  # before the first use, which refuses parameters still on the meta device
        fill_shards_from_rank0(model, full, rank_device())
        del full
    # The root must be the first unit to initialise, also where an evaluation before the first step
    # calls the blocks without going through it (`gathered`). FSDP2 does this on the root's first
    # forward; we do it now.
    root._get_fsdp_state()._lazy_init()
    return root


def gathered(wrapped: nn.Module):
    """Within it the model runs outside `wrapped`'s forward (evaluations): under FSDP the root's
    parameters (embeddings, final norm, LM head) are gathered; the blocks gather their own."""
    from contextlib import contextmanager
    from torch.distributed.fsdp import FSDPModule

    @contextmanager
    def scope():
        wrapped.unshard()
        try:
            yield
        finally:
            wrapped.reshard()
    return scope() if isinstance(wrapped, FSDPModule) else nullcontext()


def gradient_sync(wrapped: nn.Module, last: bool):
    """Accumulation: gradients of every micro-batch but a step's last stay local (DDP's no_sync,
    FSDP's set_requires_gradient_sync)."""
    from torch.distributed.fsdp import FSDPModule
    if isinstance(wrapped, FSDPModule):
        wrapped.set_requires_gradient_sync(last)
        return nullcontext()
    if last or not hasattr(wrapped, "no_sync"):
        return nullcontext()
    return wrapped.no_sync()


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded one (a collective: every rank calls it), else `t`."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def first_nonfinite_everywhere(model: nn.Module, names: Collection[str] | None = None) -> str | None:
    """The name of the first trainable parameter (of `names`, if given) that holds a NaN or an infinity
    on any rank, else None; every rank calls it. Each rank looks at its own part of a sharded one
    (FSDP), so nothing is gathered, and every rank gets the same answer."""
    from torch.distributed.tensor import DTensor
    found = [(n, p.to_local() if isinstance(p, DTensor) else p) for n, p in model.named_parameters()
             if p.requires_grad and (names is None or n in names)]
    bad = all_sum([0.0 if not t.is_floating_point() or bool(torch.isfinite(t.detach()).all()) else 1.0
                   for _, t in found])
    return next((n for (n, _), b in zip(found, bad) if b), None)


def like(t: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Whole tensor `t` (a checkpoint's) cut as `param` is sharded (this rank's part), else `t`."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if not isinstance(param, DTensor):
        return t
    mesh, placements = param.device_mesh, param.placements
    if t.is_floating_point() and t.element_size() == 1:
        # fp8 (adamwfp8's moment codes): gloo has no fp8 type to send ("Invalid scalar type"), so the
        # bytes go as uint8, which every backend sends, and are read as fp8 again: the same values
        local = distribute_tensor(t.view(torch.uint8).to(param.device), mesh, placements).to_local()
        return DTensor.from_local(local.view(t.dtype), mesh, placements, run_check=False, shape=t.shape,
                                  stride=t.stride())
    return distribute_tensor(t.to(param.device), mesh, placements)


def whole_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every sharded (FSDP) tensor gathered whole, one tensor at a time,
    into rank 0's host memory; every rank calls it, and the others get an empty dict. What saving a
    whole model trained under FSDP takes (a full fine-tune), with one copy of it on the machine of
    rank 0 and none on any GPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unshard_trainable(model: nn.Module) -> None:
    """After training under FSDP: every trainable parameter whole again on every rank (a plain
    tensor), so the adapter is saved and used as after any run; the frozen base stays sharded."""
    from torch.distributed.tensor import DTensor
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.requires_grad and isinstance(p, DTensor):
                setattr(module, name, nn.Parameter(p.full_tensor().detach(), requires_grad=True))


# -- a base read by rank 0 only ---------------------------------------------------------------------
# Under torchrun rank 0 reads the weights (`efftune.models.load_model`) and every other rank builds
# the same model on the meta device (`efftune.models.empty_model`: no storage, no weight file read),
# so a machine holds one copy of the base in host memory instead of one a rank. The method attaches
# to the meta model as to rank 0's real one, so each rank's modules match rank 0's; whatever it
# creates there (an adapter's initial values) is rank 0's too, as every value then comes from rank 0.
# The training loop fills the meta ranks' models when it wraps them: `data_parallel(...,
# from_rank0=True)`, `fully_sharded(..., from_rank0=True)`.
def load_base(source, dtype: str | torch.dtype | None, device: str, *, every_rank: bool = False,
              rank0_on_host: bool = False) -> tuple[nn.Module, object]:
    """The base model and its tokenizer for this rank (`efftune.models.load_model`'s arguments); every
    rank calls it, rank 0 first (`main_first`: a download or a cache is made once, and a failure on rank
    0 reaches every rank). With several ranks only rank 0 reads the weights; the others build the model
    on the meta device (`efftune.models.empty_model`) and the training loop sends them rank 0's
    (`data_parallel` / `fully_sharded` with `from_rank0`), so a machine holds one copy of the base in
    host memory instead of one a rank. `every_rank`: every rank reads the weights, as in one process
    (a base each rank converts after loading, quantised or kept in FP8; a method that runs the base
    while it attaches).
    `rank0_on_host` (fsdp): rank 0 loads into host memory, in the dtype training on `device` takes,
    and FSDP moves each rank's shards to its GPU, so a base larger than one GPU loads."""
    here = world()
    device = device_for(device, here)

    def load() -> tuple[nn.Module, object]:
        if here.size == 1 or every_rank:
            return load_model(source, dtype=dtype, device=device)
        if not here.main:
            return empty_model(source, dtype=dtype, device=device)
        dtype_on_device = resolve_dtype(dtype, resolve_device(device))  # the dtype training on `device` takes
        return load_model(source, dtype=dtype_on_device, device="cpu" if rank0_on_host else device)
    return main_first(load)


def on_meta(model: nn.Module) -> bool:
    """Some parameter or buffer of `model` has no storage (built on the meta device)."""
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def filled_from_rank0(model: nn.Module) -> bool:
    """Whether some rank holds `model` on the meta device, so that every rank's copy must come from
    rank 0 (a collective: every rank calls it; False without a process group)."""
    if not world().active:
        return False
    return all_sum([float(on_meta(model))])[0] > 0


def rank_device() -> torch.device:
    """The device this rank trains on: its own GPU under NCCL, else the CPU."""
    return _comm_device()


def to_empty_keeping_ties(model: nn.Module, device: torch.device) -> None:
    """`model.to_empty(device)` (storage, uninitialised) where the model is on the meta device.
    `to_empty` gives each module its own new tensor, which would untie a parameter two modules
    share (tied input and output embeddings): ties are found by identity first and made again."""
    if not on_meta(model):
        return
    shared: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(p), []).append(name)
    model.to_empty(device=device)
    for first, *others in (names for names in shared.values() if len(names) > 1):
        p = model.get_parameter(first)
        for name in others:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, p)


def fill_shards_from_rank0(model: nn.Module, full: dict[str, torch.Tensor], device: torch.device) -> None:
    """After `fully_shard`: every rank's shards cut from rank 0's whole state dict `full`, which
    torch.distributed.checkpoint broadcasts one tensor at a time (`broadcast_from_rank0`; the other
    ranks pass an empty dict). Buffers are not sharded, and non-persistent ones (rotary `inv_freq`) are
    not in a state dict: rank 0's are sent (`buffers_from_rank0`)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    if on_meta(model):
        model.to_empty(device=device)  # FSDP2 re-registers its shards (and shared parameters) itself
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    buffers_from_rank0(model)


def buffers_from_rank0(model: nn.Module) -> None:
    """Rank 0's buffers sent to every rank, the non-persistent ones too (rotary `inv_freq`, in no state
    dict), each once: those every rank has (a buffer efftune derives from the weights' layout, the
    LoRA SwiGLU packing, exists where the layout allows it). DDP's own initial sync would send them
    only on a torch that has `forward_sync_buffers` (`_no_forward_buffer_sync`)."""
    mine = dict(model.named_buffers())
    everyone: list = [None] * world().size
    dist.all_gather_object(everyone, sorted(mine))
    with torch.no_grad():
        for name in sorted(set.intersection(*map(set, everyone))):
            dist.broadcast(mine[name], src=0)

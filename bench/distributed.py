"""LoRA training over several GPUs: efftune's DDP and FSDP2 vs peft under torchrun (issue 23).

A launcher: for each case and each process count N it runs
`python -m torch.distributed.run --standalone --nproc-per-node N bench/distributed.py --worker CASE ...`
and collects the one JSON line rank 0 prints. Every process it starts has NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1 (NVLink multicast stays off) and the
repository root on PYTHONPATH. Each rank gets the random-init Llama of `--shape` (bf16, sdpa, no
download; see "The base" below), attaches LoRA r=16, alpha=32, dropout 0 to every linear layer but
lm_head (`--ckpt`: with activation checkpointing, efftune's train.activation_checkpointing and
transformers' non-reentrant gradient checkpointing for peft), and trains on random token ids,
`--batch` sequences of `--seq` tokens per rank and step. Cases:

  efftune-ddp   efftune.train.loop.train(TrainConfig(distributed="ddp")) itself: efftune.add_lora, the
                chunked-LM-head loss, DDP over the adapter's gradients, grad clip 1.0, efftune's AdamW
                (fused on CUDA), bf16 autocast; `--compile` / `--cuda-graphs` as train.compile / train.cuda_graphs
  efftune-fsdp  the same with TrainConfig(distributed="fsdp"): FSDP2 fully_shard per decoder block, then
                the root (frozen base sharded too); `--compile` applies, CUDA graphs never (train() refuses them);
                at one process train() shards nothing (a world of one), so `--nproc 1` times the unwrapped loop
  efftune-local the same train() without torchrun (no process group: the non-distributed loop), one
                process; the baseline for the cost of `ddp` and `fsdp` at one GPU (the final JSON's overhead)
  peft-ddp      peft.get_peft_model + torch DistributedDataParallel, a plain loop: bf16 autocast,
                loss = model(input_ids=ids, labels=ids).loss, backward, clip_grad_norm_ 1.0, AdamW (fused on CUDA)
  peft-fsdp     peft.get_peft_model prepared by accelerate with FullyShardedDataParallelPlugin(fsdp_version=2,
                LlamaDecoderLayer units), mixed_precision bf16 (accelerate upcasts the trainable adapter to
                fp32, the frozen base stays bf16); the same loop through accelerator.backward and
                accelerator.clip_grad_norm_. `--peft-fsdp torch`: torch's fully_shard on the peft model
                instead (each decoder layer, then the whole; MixedPrecisionPolicy bf16 / fp32 reduce); on
                CPU, where accelerate does not shard, always that (the JSON's fsdp_via says which ran)

Timing: `--warmup` untimed steps (compilation happens there), then `--steps` timed ones; rank 0's wall
clock from the end of the last warm-up step to the end of the last timed step (CUDA synchronised at
both ends). For the efftune cases that is train()'s own loop between its metrics rows, with its per-step
bookkeeping (collating rows, the loss all-reduce, clipping); its final checkpoint comes after the window.
Peak GiB: torch.cuda.max_memory_allocated over the timed steps (reset after warm-up), per rank; the JSON
gives the maximum and every rank's. Each (case, N) prints one JSON line: tokens/s in total and per GPU,
step seconds, peak GiB. A final JSON line gives, per case, the scaling tokens/s at N / (N x tokens/s at
1), and per N the efftune/peft ratios (efftune-ddp vs peft-ddp, efftune-fsdp vs peft-fsdp; tokens/s per
GPU and peak GiB).

The base. Ordinarily each rank builds it whole on its own GPU (on CPU: in host memory, gloo), with
transformers' random init (bench/throughput.py's build_model; the 8B numbers in bench/RESULTS.md were
made so). `--rank0-base` (the default where the bf16 base takes over half of one GPU: the 70B shape's
131 GiB does not fit one H200 beside its training, nor one copy a rank a host) makes it efftune's
multi-process loading instead: rank 0 alone builds the weights, in host memory for fsdp (its shards
go to its GPU from there) and on its GPU for ddp, while every other rank builds the model on the meta
device (parameters without storage; buffers computed, bench/base_init.py's empty_base). The efftune
cases hand that to train(), which fills the meta ranks from rank 0 as it wraps the model (DDP's
initial sync, or every rank's FSDP shards cut from rank 0's state dict, and rank 0's buffers sent:
efftune.train.distributed's from_rank0 path, as `efftune train` under torchrun loads a checkpoint).
peft-fsdp does the same with its own tools: through accelerate, its cpu_ram_efficient_loading
(accelerate shards on the meta device, then broadcasts rank 0's state dict); with torch's fully_shard,
torch.distributed.checkpoint's set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True);
peft-ddp, DDP's initial sync; and each broadcasts rank 0's buffers after (the rotary inv_freq is in
no state dict). `--init fast` (the default with --rank0-base) fills the weights without transformers'
init, whose serial per-weight draws would take longer than the run for a 70B base in host memory: one
N(0, 0.02) block tiled into every matrix, norms 1 (bench/base_init.py); throughput depends on the
values' scale, not on their randomness. `--init hf` keeps transformers' init on either path.
Each JSON line says which ran (rank0_base, init, ckpt) and, to check the build, base_weights: the sum
and sum of squares of the frozen weights every rank trained with (each whole) and whether every rank
holds rank 0's (its shard or copy, and its buffers); the loss is the last step's, the mean over the
ranks. tests/bench/test_distributed.py checks on CPU that a base from rank 0 trains as the same base
built on every rank does. accelerate's loading from rank 0 is not in that test (accelerate shards on
GPUs only); forced onto 2 gloo ranks by hand (accelerate 1.16) it gave the ordinary path's weights and
loss. If it fails on the GPUs, `--peft-fsdp torch` takes the torch path.

    PYTHONPATH=. python bench/distributed.py --nproc 1 8 --shape llama3-8b --cases efftune-ddp peft-ddp \\
        --compile --cuda-graphs
    PYTHONPATH=. python bench/distributed.py --nproc 2 8 --shape llama3-70b --cases efftune-fsdp peft-fsdp \\
        --rank0-base --ckpt   # rank 0 holds the 131 GiB base in host memory while it is sharded
    PYTHONPATH=. python bench/distributed.py --nproc 1 2 --shape llama3-8b --cases efftune-fsdp peft-fsdp
    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/distributed.py --shape tiny --nproc 1 2 --steps 2   # CPU smoke test (gloo)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Run as a script, bench/ comes first on sys.path and this file would shadow a top-level `distributed`
# (dask's package; see RESULTS.md on bench/kernels.py): drop bench/, import bench.throughput from the root.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.distributed.elastic.multiprocessing.errors import record  # noqa: E402

from bench.base_init import all_cores, base_gib, empty_base, filled_base  # noqa: E402
from bench.throughput import SHAPES, build_model, default_seq, run_worker  # noqa: E402

CASES = ("efftune-ddp", "efftune-fsdp", "peft-ddp", "peft-fsdp", "efftune-local")
PEERS = {"efftune-ddp": "peft-ddp", "efftune-fsdp": "peft-fsdp"}
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# --rank0-base by default where the bf16 base takes more than this share of one GPU: whole on every
# GPU it would leave too little for training (the 70B shape's 131 GiB does not fit beside it at all)
RANK0_BASE_GPU_SHARE = 0.5


# -- inside torchrun: one rank of one case -----------------------------------------------------------
def random_ids(vocab: int, rows: int, seq: int, seed: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, vocab, (rows, seq), generator=gen).to(device)


def peaks(device: torch.device) -> list[float] | None:
    """Every rank's peak GiB since the last reset (a collective under torchrun), or None on CPU."""
    import torch.distributed as dist
    if device.type != "cuda":
        return None
    mine = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30], device=device)
    if not dist.is_initialized():  # efftune-local: one process, no group
        return [round(mine.item(), 2)]
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [round(t.item(), 2) for t in every]


def settle_base(args: argparse.Namespace) -> None:
    """--rank0-base and --init as this run takes them, the same on every rank (they see the same GPUs
    and shape): auto rank0-base where the bf16 base exceeds RANK0_BASE_GPU_SHARE of one GPU; auto init
    fast where rank 0 alone builds the base (transformers' serial init of a base that large in host
    memory takes far longer than the run). One process has no rank to fill: rank0-base is off there."""
    if args.rank0_base is None:
        gpu_gib = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", 0))).total_memory / 2**30 \
            if torch.cuda.is_available() else None
        args.rank0_base = gpu_gib is not None and base_gib(args.shape) > RANK0_BASE_GPU_SHARE * gpu_gib
    if args.init == "auto":
        args.init = "fast" if args.rank0_base else "hf"
    args.rank0_base = args.rank0_base and int(os.environ.get("WORLD_SIZE", 1)) > 1


def base_for_rank(args: argparse.Namespace, mode: str, rank: int, device: torch.device) -> torch.nn.Module:
    """This rank's random-init base. Ordinarily each rank builds it whole on its own device. With
    --rank0-base rank 0 alone holds the weights (in host memory for fsdp, where each rank's shards go
    to its GPU from there; on its GPU for ddp) and every other rank builds the model on the meta
    device, to be filled from rank 0's when it is wrapped (efftune: train() itself; peft: run_peft)."""
    if not args.rank0_base:
        return build_base(args.init, args.shape, device)
    if rank != 0:
        return empty_base(args.shape)
    if mode != "fsdp":
        return build_base(args.init, args.shape, device)
    with all_cores():  # the other ranks wait for rank 0 meanwhile: their cores work on the host's base too
        return build_base(args.init, args.shape, torch.device("cpu"))


def build_base(init: str, shape: str, device: torch.device) -> torch.nn.Module:
    """`shape` whole on `device`: transformers' random init (`hf`, as the runs recorded before
    --init existed) or bench/base_init.py's fast fill (`fast`)."""
    return build_model(shape, device) if init == "hf" else filled_base(shape, device)


def base_weights(model: torch.nn.Module, device: torch.device) -> dict:
    """The frozen weights every rank trained with, for checking how the base was built: the sum of
    their values and of their squares (float64, each parameter whole: a sharded one summed over its
    ranks), and whether every rank holds the same base (those sums and the sum of its own buffers, the
    rotary inv_freq among them, equal rank 0's). A collective under torchrun."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    sharded = torch.zeros(2, dtype=torch.float64, device=device)  # this rank's shards: summed over the ranks
    own = torch.zeros(3, dtype=torch.float64, device=device)  # whole on each rank: parameters, then buffers
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad:
                local = (p.to_local() if isinstance(p, DTensor) else p).double()
                (sharded if isinstance(p, DTensor) else own[:2]).add_(torch.stack([local.sum(), local.square().sum()]))
        for b in model.buffers():
            own[2] += b.double().sum()
    every = [own]
    if dist.is_initialized():
        dist.all_reduce(sharded)
        every = [torch.zeros_like(own) for _ in range(dist.get_world_size())]
        dist.all_gather(every, own)
    whole = sharded + own[:2]
    return dict(sum=whole[0].item(), sum_squares=whole[1].item(),
                every_rank_same=all(torch.equal(t, every[0]) for t in every))


def run_efftune(args: argparse.Namespace, mode: str) -> dict:
    """train() itself under torchrun, timed between its metrics rows."""
    from efftune.data.tokenize import IGNORE, Encoded
    from efftune.methods.lora.config import LoraConfig
    from efftune.methods.lora.model import add_lora
    from efftune.train import distributed
    from efftune.train.loop import TrainConfig, train
    here = distributed.init("auto")
    device = torch.device(distributed.device_for("cuda", here) if torch.cuda.is_available() else "cpu")
    model = base_for_rank(args, mode, here.rank, device)
    add_lora(model, LoraConfig(r=16, alpha=32))
    cuda = device.type == "cuda"
    ranks, total = here.size, args.warmup + args.steps
    ids = random_ids(SHAPES[args.shape]["vocab_size"], 2 * args.batch * ranks, args.seq, 1, torch.device("cpu"))
    seqs = [Encoded(row, [IGNORE] + row[1:]) for row in ids.tolist()]  # every token a target but the first
    config = TrainConfig(steps=total, batch_size=args.batch * ranks, lr=1e-4, warmup_steps=0, precision="bf16",
                         max_length=args.seq, compile=args.compile, cuda_graphs=args.cuda_graphs and mode != "fsdp",
                         eval_every=0, save_every=0, save_every_minutes=0, keep_checkpoints=1,
                         activation_checkpointing=args.ckpt,
                         distributed="ddp" if mode == "local" else mode)  # local: no torchrun, so no group
    marks: dict[int, float] = {}
    prof = profiler(cuda) if args.profile else None

    def on_metrics(_, row: dict) -> None:
        if "loss" not in row:
            return
        if cuda:
            torch.cuda.synchronize(device)
        marks[row["step"]] = time.perf_counter()
        if row["step"] == args.warmup and cuda:
            torch.cuda.reset_peak_memory_stats(device)
        if prof is not None and row["step"] in (args.warmup, total):
            prof.start() if row["step"] == args.warmup else prof.stop()
    # train() sees the meta ranks (--rank0-base) and fills them from rank 0 as it wraps the model
    result = train(model, seqs, config, Path(args.out), on_metrics=on_metrics)  # one directory, as train() wants
    seconds = marks[total] - marks[args.warmup]
    out = dict(compile=args.compile, cuda_graphs=config.cuda_graphs, seconds=seconds, peaks=peaks(device),
               loss=result.final_loss, world=here.size, rank=here.rank, base_weights=base_weights(model, device))
    if prof is not None:
        from bench.profile_step import host_ops, summarize
        out["profile"] = {**summarize(prof, args.steps, seconds * 1000 / args.steps), "host": host_ops(prof, args.steps)}
    return out


def profiler(cuda: bool):
    """torch.profiler over the timed steps (`--profile`): kernels and the CPU ops around them."""
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    return torch.profiler.profile(activities=activities)


def run_peft(args: argparse.Namespace, mode: str) -> dict:
    """peft's LoRA in a plain loop: torch DDP, or FSDP2 through accelerate (or torch's fully_shard)."""
    import peft
    import torch.distributed as dist
    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
    on_accelerate = mode == "fsdp" and args.peft_fsdp == "accelerate" and torch.cuda.is_available()
    accelerator = peft_accelerator(args.rank0_base) if on_accelerate else None
    device = accelerator.device if accelerator is not None else join_group()
    rank, size, cuda = dist.get_rank(), dist.get_world_size(), device.type == "cuda"
    model = peft.get_peft_model(base_for_rank(args, mode, rank, device), lora)
    if args.ckpt:  # transformers' own switch (non-reentrant), as a peft user turns it on
        from efftune.train.loop import enable_activation_checkpointing  # 5.24+ renamed the switch
        enable_activation_checkpointing(model.get_base_model())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    via = None
    if accelerator is not None:
        wrapped, opt = prepare_with_accelerate(accelerator, model, args.rank0_base, cuda)
        params = [p for p in wrapped.parameters() if p.requires_grad]
        backward, clip = accelerator.backward, lambda: accelerator.clip_grad_norm_(params, 1.0)
        autocast = accelerator.autocast()
        via = f"accelerate {__import__('accelerate').__version__} FSDP2" + \
            (", from rank 0 by cpu_ram_efficient_loading" if args.rank0_base else "")
    else:
        if mode == "fsdp":
            wrapped = peft_fully_sharded(model, device, args.rank0_base)
            via = "torch fully_shard" + (", from rank 0 by set_model_state_dict(broadcast_from_rank0)"
                                         if args.rank0_base else "") + \
                ("" if torch.cuda.is_available() else " (accelerate shards on GPUs only)")
        else:
            wrapped = peft_data_parallel(model, device, args.rank0_base)
        params = [p for p in wrapped.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
        backward, clip = (lambda loss: loss.backward()), (lambda: torch.nn.utils.clip_grad_norm_(params, 1.0))
    ids = random_ids(SHAPES[args.shape]["vocab_size"], args.batch, args.seq, 1 + rank, device)
    wrapped.train()

    def step() -> torch.Tensor:
        with autocast:
            loss = wrapped(input_ids=ids, labels=ids).loss
        backward(loss)
        clip()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    seconds = time.perf_counter() - start
    loss = loss.float().clone()
    dist.all_reduce(loss)  # the mean over the ranks, as efftune's train() reports its step's loss
    return dict(compile=False, cuda_graphs=False, fsdp_via=via, seconds=seconds, peaks=peaks(device),
                loss=loss.item() / size, world=size, rank=rank, base_weights=base_weights(wrapped, device))


def join_group() -> torch.device:
    """This rank's device, its process group joined: NCCL on GPUs, gloo on CPU."""
    import torch.distributed as dist
    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return device


def peft_accelerator(rank0_base: bool):
    """accelerate's FSDP2 (LlamaDecoderLayer units, bf16 mixed precision). `rank0_base`: accelerate's
    own loading from rank 0 (cpu_ram_efficient_loading: it shards on the meta device, then broadcasts
    rank 0's state dict one tensor at a time), the same whether rank 0 read a checkpoint or built it."""
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
                                            reshard_after_forward=True, cpu_ram_efficient_loading=rank0_base)
    return Accelerator(mixed_precision="bf16", fsdp_plugin=plugin)


def prepare_with_accelerate(accelerator, model: torch.nn.Module, rank0_base: bool, cuda: bool):
    """The peft model and its AdamW prepared together by accelerate (FSDP2 needs both at once)."""
    from torch.distributed.fsdp import FSDPModule
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=cuda)
    wrapped, opt = accelerator.prepare(model, opt)
    if not isinstance(wrapped, FSDPModule):
        raise RuntimeError(f"accelerate did not shard the model (got {type(wrapped).__name__}, "
                           f"distributed_type {accelerator.distributed_type}); try --peft-fsdp torch")
    if rank0_base:  # accelerate puts back each rank's own non-persistent buffers: make sure they are rank 0's
        buffers_from_rank0(wrapped)
    return wrapped, opt


def peft_fully_sharded(model: torch.nn.Module, device: torch.device, rank0_base: bool) -> torch.nn.Module:
    """torch's fully_shard on the peft model: each decoder layer, then the whole (bf16 compute, fp32
    gradient reduction). `rank0_base`: only rank 0 holds the weights; every rank's shards are cut from
    rank 0's whole state dict, which torch.distributed.checkpoint broadcasts one tensor at a time, and
    rank 0's buffers are sent."""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    full = model.state_dict() if rank0_base and dist.get_rank() == 0 else {}  # whole, before sharding
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.get_base_model().model.layers:
        fully_shard(layer, mp_policy=policy)
    wrapped = fully_shard(model, mp_policy=policy)
    if rank0_base:  # efftune's own fill after fully_shard: storage for the meta shards, rank 0's values and buffers
        from efftune.train.distributed import fill_shards_from_rank0
        fill_shards_from_rank0(model, full, device)
    return wrapped


def peft_data_parallel(model: torch.nn.Module, device: torch.device, rank0_base: bool) -> torch.nn.Module:
    """torch's DistributedDataParallel on the peft model; its initial synchronisation sends rank 0's
    parameters, the frozen base too. `rank0_base`: the meta ranks' copies get storage first (tied
    weights kept tied) and rank 0's buffers are sent."""
    from torch.nn.parallel import DistributedDataParallel

    from efftune.train.distributed import to_empty_keeping_ties
    if rank0_base:
        to_empty_keeping_ties(model, device)  # nothing to do on rank 0
        buffers_from_rank0(model)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def buffers_from_rank0(model: torch.nn.Module) -> None:
    """Rank 0's buffers on every rank, the non-persistent ones too (the rotary inv_freq, in no state
    dict: no state-dict broadcast carries it): efftune's own, after a check that each has storage."""
    from efftune.train import distributed
    for name, b in model.named_buffers():
        if b.is_meta:
            raise RuntimeError(f"buffer {name} has no storage after the model was wrapped; try --peft-fsdp torch")
    distributed.buffers_from_rank0(model)


@record  # torchrun's failure report then carries the rank's exception (the launcher's stderr_tail)
def worker(args: argparse.Namespace) -> None:
    case = args.worker
    lib, mode = case.split("-")
    settle_base(args)
    r = (run_efftune if lib == "efftune" else run_peft)(args, mode)
    if r["rank"] == 0:
        tokens = args.batch * args.seq * r["world"] * args.steps
        tokens_s = tokens / r["seconds"]
        print(json.dumps(dict(
            shape=args.shape, case=case, nproc=r["world"], seq=args.seq, batch_per_gpu=args.batch, steps=args.steps,
            warmup=args.warmup, compile=r["compile"], cuda_graphs=r["cuda_graphs"], ckpt=args.ckpt,
            rank0_base=args.rank0_base, init=args.init, **({"fsdp_via": r["fsdp_via"]} if r.get("fsdp_via") else {}),
            tokens_s=round(tokens_s, 1), tokens_s_per_gpu=round(tokens_s / r["world"], 1),
            step_s=round(r["seconds"] / args.steps, 4), peak_gib=max(r["peaks"]) if r["peaks"] else None,
            peak_gib_ranks=r["peaks"], loss=r["loss"] if r["loss"] is None else round(r["loss"], 4),
            base_weights=r["base_weights"], **({"profile": r["profile"]} if r.get("profile") else {}),
            device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (gloo)")), flush=True)
    # efftune's way out of a process group: the cycle collector first, so that an FSDP-sharded model
    # (peft's too) goes while the group is alive, not in the interpreter's teardown, where a gloo rank
    # aborted ("terminate called without an active exception") after printing its result
    from efftune.train.distributed import finish
    finish()


# -- the launcher ------------------------------------------------------------------------------------
def launch(args: argparse.Namespace, case: str, nproc: int, out: Path) -> dict:
    if case == "efftune-local" and nproc != 1:
        return dict(shape=args.shape, case=case, nproc=nproc, error="efftune-local runs one process only")
    torchrun = [] if case == "efftune-local" else [
        "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    cmd = [sys.executable, *torchrun, str(Path(__file__).resolve()), "--worker", case, "--shape", args.shape, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--seq", str(args.seq), "--batch", str(args.batch),
           "--peft-fsdp", args.peft_fsdp, "--out", str(out / f"{case}-{nproc}")]
    cmd += ["--compile"] * args.compile + ["--cuda-graphs"] * args.cuda_graphs + ["--ckpt"] * args.ckpt + ["--profile"] * args.profile
    cmd += ["--init", args.init] + ([] if args.rank0_base is None else
                                    ["--rank0-base" if args.rank0_base else "--no-rank0-base"])
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, **NO_MULTICAST, "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)}
    return run_worker(cmd, dict(shape=args.shape, case=case, nproc=nproc), args.case_timeout, env)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def summarize(results: list[dict]) -> dict:
    """Per case, scaling at each N against one GPU; per N, each efftune case against its peft peer."""
    ok = {(r["case"], r["nproc"]): r for r in results if "error" not in r}
    scaling: dict[str, dict] = {}
    for (case, n), r in ok.items():
        one = ok.get((case, 1))
        if n != 1 and one:
            scaling.setdefault(case, {})[f"nproc {n}"] = _ratio(r["tokens_s"], n * one["tokens_s"])
    ratios: dict[str, dict] = {}
    for (case, n), r in ok.items():
        peer = ok.get((PEERS.get(case), n))
        if peer:
            ratios.setdefault(f"nproc {n}", {})[f"{case} vs {PEERS[case]}"] = dict(
                tokens_s_per_gpu=_ratio(r["tokens_s_per_gpu"], peer["tokens_s_per_gpu"]),
                peak_gib=_ratio(r["peak_gib"], peer["peak_gib"]))
    local = ok.get(("efftune-local", 1))
    overhead = {case: dict(tokens_s=_ratio(ok[(case, 1)]["tokens_s"], local["tokens_s"]),
                           peak_gib=_ratio(ok[(case, 1)]["peak_gib"], local["peak_gib"]))
                for case in ("efftune-ddp", "efftune-fsdp") if local and (case, 1) in ok}
    errors = {f"{r['case']} nproc {r['nproc']}": r["error"] for r in results if "error" in r}
    return dict(summary="scaling and efftune/peft ratios", shape=results[0]["shape"] if results else None,
                scaling=scaling, efftune_vs_peft=ratios, one_gpu_vs_local=overhead, errors=errors)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="process counts (GPUs), each a run")
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (at least 1)")
    ap.add_argument("--seq", type=int, default=None, help="default 4096 (128 for tiny)")
    ap.add_argument("--batch", type=int, default=1, help="sequences per GPU and step")
    ap.add_argument("--compile", action="store_true", help="efftune cases: train.compile")
    ap.add_argument("--cuda-graphs", action="store_true", help="efftune-ddp: train.cuda_graphs (needs --compile)")
    ap.add_argument("--peft-fsdp", choices=("accelerate", "torch"), default="accelerate",
                    help="peft-fsdp: accelerate's FSDP2 plugin, or torch's fully_shard directly")
    ap.add_argument("--ckpt", action="store_true",
                    help="activation checkpointing: efftune's train.activation_checkpointing, transformers' "
                         "non-reentrant gradient checkpointing for peft")
    ap.add_argument("--rank0-base", action=argparse.BooleanOptionalAction, default=None,
                    help="rank 0 alone builds the base (in host memory for fsdp), the other ranks on the meta "
                         "device, filled from rank 0's as the model is wrapped; default: where the bf16 base "
                         f"takes over {RANK0_BASE_GPU_SHARE:.0%} of one GPU (the 70B shape)")
    ap.add_argument("--init", choices=("auto", "hf", "fast"), default="auto",
                    help="the base's random values: transformers' init (hf) or one random block tiled into "
                         "every weight (fast, bench/base_init.py); auto: fast with --rank0-base, else hf")
    ap.add_argument("--profile", action="store_true",
                    help="efftune cases: profile the timed steps (kernel time per class, idle gaps, host ops); "
                         "the profiler slows them, so time without it")
    ap.add_argument("--case-timeout", type=int, default=900, help="seconds per (case, nproc) torchrun")
    ap.add_argument("--worker", choices=CASES, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.warmup < 1:
        ap.error("--warmup must be at least 1 (the timed window starts at the end of a step)")
    if args.cuda_graphs and not args.compile:
        ap.error("--cuda-graphs needs --compile")
    args.seq = args.seq or default_seq(args.shape)
    if args.worker:
        worker(args)
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="efftune-distbench-") as out:  # train()'s metrics and checkpoints
        for case in args.cases:
            for nproc in args.nproc:
                results.append(launch(args, case, nproc, Path(out)))
                print(json.dumps(results[-1]), flush=True)
    print(json.dumps(summarize(results)), flush=True)


if __name__ == "__main__":
    main()

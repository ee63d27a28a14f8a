"""LoRA training over several GPUs: efftune's DDP and FSDP2 vs peft under torchrun (issue 23).

A launcher: for each case and each process count N it runs
`python -m torch.distributed.run --standalone --nproc-per-node N bench/distributed.py --worker CASE ...`
and collects the one JSON line rank 0 prints. Every process it starts has NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1 (NVLink multicast stays off) and the
repository root on PYTHONPATH. Each rank builds the random-init Llama of `--shape` (bench/throughput.py's
build_model: bf16, sdpa, no download) whole on its own GPU (on CPU: in host memory, gloo), attaches
LoRA r=16, alpha=32, dropout 0 to every linear layer but lm_head, and trains on random token ids,
`--batch` sequences of `--seq` tokens per rank and step. Cases:

  efftune-ddp   efftune.train.loop.train(TrainConfig(distributed="ddp")) itself: efftune.add_lora, the
                chunked-LM-head loss, DDP over the adapter's gradients, grad clip 1.0, efftune's AdamW
                (fused on CUDA), bf16 autocast; `--compile` / `--cuda-graphs` as train.compile / train.cuda_graphs
  efftune-fsdp  the same with TrainConfig(distributed="fsdp"): FSDP2 fully_shard per decoder block, then
                the root (frozen base sharded too); `--compile` applies, CUDA graphs never (train() refuses them)
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

Not done: the model is built whole on every rank before anything is sharded (efftune's train() takes a
materialised model; meta-device init is issue 23's open item), so FSDP's peak over the timed steps is
the sharded one but building the 70B shape needs its whole bf16 base (131 GiB) on each GPU first.

    PYTHONPATH=. python bench/distributed.py --nproc 1 8 --shape llama3-8b --cases efftune-ddp peft-ddp \\
        --compile --cuda-graphs
    PYTHONPATH=. python bench/distributed.py --nproc 2 8 --shape llama3-70b --cases efftune-fsdp peft-fsdp
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

from bench.throughput import SHAPES, build_model, default_seq, run_worker  # noqa: E402

CASES = ("efftune-ddp", "efftune-fsdp", "peft-ddp", "peft-fsdp", "efftune-local")
PEERS = {"efftune-ddp": "peft-ddp", "efftune-fsdp": "peft-fsdp"}
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


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


def run_efftune(args: argparse.Namespace, mode: str) -> dict:
    """train() itself under torchrun, timed between its metrics rows."""
    from efftune.data.tokenize import IGNORE, Encoded
    from efftune.methods.lora.config import LoraConfig
    from efftune.methods.lora.model import add_lora
    from efftune.train import distributed
    from efftune.train.loop import TrainConfig, train
    here = distributed.init("auto")
    device = torch.device(distributed.device_for("cuda", here) if torch.cuda.is_available() else "cpu")
    model = build_model(args.shape, device)
    add_lora(model, LoraConfig(r=16, alpha=32))
    cuda = device.type == "cuda"
    ranks, total = here.size, args.warmup + args.steps
    ids = random_ids(SHAPES[args.shape]["vocab_size"], 2 * args.batch * ranks, args.seq, 1, torch.device("cpu"))
    seqs = [Encoded(row, [IGNORE] + row[1:]) for row in ids.tolist()]  # every token a target but the first
    config = TrainConfig(steps=total, batch_size=args.batch * ranks, lr=1e-4, warmup_steps=0, precision="bf16",
                         max_length=args.seq, compile=args.compile, cuda_graphs=args.cuda_graphs and mode != "fsdp",
                         eval_every=0, save_every=0, save_every_minutes=0, keep_checkpoints=1,
                         distributed="ddp" if mode == "local" else mode)  # local: no torchrun, so no group
    marks: dict[int, float] = {}

    def on_metrics(_, row: dict) -> None:
        if "loss" not in row:
            return
        if cuda:
            torch.cuda.synchronize(device)
        marks[row["step"]] = time.perf_counter()
        if row["step"] == args.warmup and cuda:
            torch.cuda.reset_peak_memory_stats(device)
    result = train(model, seqs, config, Path(args.out), on_metrics=on_metrics)  # one directory, as train() wants
    seconds = marks[total] - marks[args.warmup]
    return dict(compile=args.compile, cuda_graphs=config.cuda_graphs, seconds=seconds, peaks=peaks(device),
                loss=result.final_loss, world=here.size, rank=here.rank)


def run_peft(args: argparse.Namespace, mode: str) -> dict:
    """peft's LoRA in a plain loop: torch DDP, or FSDP2 through accelerate (or torch's fully_shard)."""
    import peft
    import torch.distributed as dist
    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
    via = None
    accelerator = None
    if mode == "fsdp" and args.peft_fsdp == "accelerate" and torch.cuda.is_available():
        from accelerate import Accelerator, FullyShardedDataParallelPlugin
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                                transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
                                                reshard_after_forward=True)
        accelerator = Accelerator(mixed_precision="bf16", fsdp_plugin=plugin)
        device, via = accelerator.device, f"accelerate {__import__('accelerate').__version__} FSDP2"
    else:
        local = int(os.environ.get("LOCAL_RANK", 0))
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local)
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    rank, size, cuda = dist.get_rank(), dist.get_world_size(), device.type == "cuda"
    model = peft.get_peft_model(build_model(args.shape, device), lora)
    params = [p for p in model.parameters() if p.requires_grad]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    if accelerator is not None:
        from torch.distributed.fsdp import FSDPModule
        opt = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
        wrapped, opt = accelerator.prepare(model, opt)
        if not isinstance(wrapped, FSDPModule):
            raise RuntimeError(f"accelerate did not shard the model (got {type(wrapped).__name__}, "
                               f"distributed_type {accelerator.distributed_type}); try --peft-fsdp torch")
        params = [p for p in wrapped.parameters() if p.requires_grad]
        backward, clip = accelerator.backward, lambda: accelerator.clip_grad_norm_(params, 1.0)
        autocast = accelerator.autocast()
    elif mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in model.get_base_model().model.layers:
            fully_shard(layer, mp_policy=policy)
        wrapped = fully_shard(model, mp_policy=policy)
        params = [p for p in wrapped.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
        backward, clip = (lambda loss: loss.backward()), (lambda: torch.nn.utils.clip_grad_norm_(params, 1.0))
        via = "torch fully_shard" + ("" if torch.cuda.is_available() else " (accelerate shards on GPUs only)")
    else:
        from torch.nn.parallel import DistributedDataParallel
        wrapped = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
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
    return dict(compile=False, cuda_graphs=False, fsdp_via=via, seconds=seconds, peaks=peaks(device),
                loss=round(loss.item(), 4), world=size, rank=rank)


@record  # torchrun's failure report then carries the rank's exception (the launcher's stderr_tail)
def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    case = args.worker
    lib, mode = case.split("-")
    r = (run_efftune if lib == "efftune" else run_peft)(args, mode)
    if r["rank"] == 0:
        tokens = args.batch * args.seq * r["world"] * args.steps
        tokens_s = tokens / r["seconds"]
        print(json.dumps(dict(
            shape=args.shape, case=case, nproc=r["world"], seq=args.seq, batch_per_gpu=args.batch, steps=args.steps,
            warmup=args.warmup, compile=r["compile"], cuda_graphs=r["cuda_graphs"],
            **({"fsdp_via": r["fsdp_via"]} if r.get("fsdp_via") else {}),
            tokens_s=round(tokens_s, 1), tokens_s_per_gpu=round(tokens_s / r["world"], 1),
            step_s=round(r["seconds"] / args.steps, 4), peak_gib=max(r["peaks"]) if r["peaks"] else None,
            peak_gib_ranks=r["peaks"], loss=r["loss"] if r["loss"] is None else round(r["loss"], 4),
            device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (gloo)")), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


# -- the launcher ------------------------------------------------------------------------------------
def launch(args: argparse.Namespace, case: str, nproc: int, out: Path) -> dict:
    if case == "efftune-local" and nproc != 1:
        return dict(shape=args.shape, case=case, nproc=nproc, error="efftune-local runs one process only")
    torchrun = [] if case == "efftune-local" else [
        "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    cmd = [sys.executable, *torchrun, str(Path(__file__).resolve()), "--worker", case, "--shape", args.shape, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--seq", str(args.seq), "--batch", str(args.batch),
           "--peft-fsdp", args.peft_fsdp, "--out", str(out / f"{case}-{nproc}")]
    cmd += ["--compile"] * args.compile + ["--cuda-graphs"] * args.cuda_graphs
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

"""Building a LoRA module library: k modules one by one (`train()` each) vs k at once (one `train()`).

Both modes train the same k LoRA modules (r=8, alpha=16, all linear layers) for the same steps on
the same per-task batches; one-by-one runs `efftune.train.loop.train` once per module (what
`efftune hub build --together 1` does), k-at-once runs all k in one forward/backward per step with
each row going through its own task's adapter (`--together k`: `train()` given {adapter: sequences}). Tokens/s counts the examples' own
tokens (as train()'s metrics do) over the timed steps, i.e. after `--warmup` steps of each run;
the time is the sum of the per-step times the loops log (no evaluation, checkpoints or plots).

Data: synthetic tasks shaped like BIG-bench multiple choice (a task instruction of `--instruction`
random tokens shared by the task's examples, `--prompt` tokens of example, `--answer` answer
tokens), or real BIG-bench tasks with `--tasks` (needs the tokenizer of a real model: `--shape default`).

    PYTHONPATH=. python bench/hub_build.py --shape tiny                # CPU smoke test, seconds
    PYTHONPATH=. python bench/hub_build.py --shape default --k 4 8     # GPU: SmolLM2-135M, synthetic data
    PYTHONPATH=. python bench/hub_build.py --shape default --tasks intent_recognition,navigate,...

One JSON line per case, then one with the k-at-once / one-by-one ratio per k.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import SHAPES, build_model  # noqa: E402  (the benchmark shapes, one definition)

import efftune.train.loop as loop  # noqa: E402
from efftune.compose.library import resolve_tasks  # noqa: E402
from efftune.data import Encoded, Formatter  # noqa: E402
from efftune.data.tokenize import IGNORE  # noqa: E402
from efftune.methods.lora.config import LoraConfig
from efftune.methods.lora.model import add_lora, delete_adapter, set_active_adapters, set_trainable_adapters
from efftune.train.loop import TrainConfig, train  # noqa: E402


def load(shape: str, device: torch.device):
    """(model, tokenizer or None, vocab size)."""
    if shape == "default":
        from efftune.models import load_model
        model, tok = load_model("default", device=device)
        return model, tok, model.config.vocab_size
    model = build_model(shape, device)
    if device.type == "cpu":
        model = model.float()  # bf16 matmuls are slow on CPU
    return model, None, SHAPES[shape]["vocab_size"]


def synthetic_tasks(k: int, n: int, vocab: int, instruction: int, prompt: int, answer: int) -> dict[str, list[Encoded]]:
    g = torch.Generator().manual_seed(0)
    rand = lambda m: torch.randint(10, vocab, (m,), generator=g).tolist()
    tasks = {}
    for t in range(k):
        head = rand(instruction)
        seqs = []
        for _ in range(n):
            p, a = head + rand(prompt), rand(answer)
            seqs.append(Encoded(p + a, [IGNORE] * len(p) + a))
        tasks[f"task{t}"] = seqs
    return tasks


def bigbench_tasks(names: list[str], tokenizer, max_length: int) -> dict[str, list[Encoded]]:
    f = Formatter(tokenizer, max_length=max_length)
    return {s.name: [f.encode(e) for e in s.train] for s in resolve_tasks(names)}


def timed(rows: list[dict], warmup: int) -> float:
    return sum(r["seconds"] for r in rows if "loss" in r and not r.get("eval") and r["step"] > warmup)


def step_tokens(seqs: list[Encoded], cfg: TrainConfig, warmup: int) -> int:
    order = loop.example_order(len(seqs), cfg.seed, warmup * cfg.batch_size, (cfg.steps - warmup) * cfg.batch_size)
    return sum(len(seqs[i]) for i in order)


def rows_of(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def run(model, tasks: dict[str, list[Encoded]], cfg: TrainConfig, lora: LoraConfig, mode: str, warmup: int,
        work: Path, pad_id: int) -> dict:
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    names = list(tasks)
    for n in names:
        torch.manual_seed(zlib.crc32(n.encode()))
        add_lora(model, lora, adapter=n)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    wall = time.perf_counter()
    if mode == "one-by-one":
        seconds = 0.0
        for n in names:
            set_active_adapters(model, n)
            set_trainable_adapters(model, [n])
            train(model, tasks[n], cfg, work / mode / n, pad_id=pad_id)
            seconds += timed(rows_of(work / mode / n / "metrics.jsonl"), warmup)
    else:
        set_trainable_adapters(model, names)
        train(model, tasks, cfg, work / mode, pad_id=pad_id)
        seconds = timed(rows_of(work / mode / names[0] / "metrics.jsonl"), warmup)
    wall = time.perf_counter() - wall
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    for n in names:
        delete_adapter(model, n)
    tokens = sum(step_tokens(s, cfg, warmup) for s in tasks.values())
    return dict(mode=mode, k=len(names), steps=cfg.steps, timed_steps=cfg.steps - warmup, batch=cfg.batch_size,
                tokens=tokens, tokens_s=round(tokens / seconds, 1), seconds=round(seconds, 3),
                wall_s=round(wall, 2), peak_gib=round(peak, 2) if peak is not None else None,
                device=torch.cuda.get_device_name() if cuda else "cpu")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="default", choices=["default", *sorted(SHAPES)])
    ap.add_argument("--k", type=int, nargs="+", default=[4, 8], help="modules per library (one or more)")
    ap.add_argument("--steps", type=int, help="optimizer steps per module (default 12; tiny: 5)")
    ap.add_argument("--warmup", type=int, default=2, help="steps of each run left out of the timing")
    ap.add_argument("--batch-size", type=int, help="examples per step per module (default 16; tiny: 4)")
    ap.add_argument("--examples", type=int, default=200, help="synthetic: examples per task")
    ap.add_argument("--instruction", type=int, default=50, help="synthetic: shared instruction tokens per task")
    ap.add_argument("--prompt", type=int, default=30, help="synthetic: tokens of each example's own prompt")
    ap.add_argument("--answer", type=int, default=3, help="synthetic: answer tokens")
    ap.add_argument("--tasks", help="BIG-bench tasks, comma-separated (at least max(--k) of them)")
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args(argv)
    tiny = args.shape == "tiny"
    args.steps = args.steps or (5 if tiny else 12)
    args.batch_size = args.batch_size or (4 if tiny else 16)
    if tiny:
        torch.set_num_threads(1)  # a tiny model: threads cost more than they give
    if args.warmup >= args.steps:
        ap.error("--warmup must be below --steps")
    loop.plot_metrics = lambda rows, path: path  # plots are not what we time (they run between steps)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, vocab = load(args.shape, device)
    pad_id = tokenizer.pad_token_id if tokenizer is not None else 0
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=1e-4, warmup_steps=1, save_every=0,
                      eval_every=0, precision=args.precision)
    lora = LoraConfig(r=8, alpha=16)
    if args.tasks:
        if tokenizer is None:
            ap.error("--tasks needs --shape default (a real tokenizer)")
        all_tasks = bigbench_tasks([t for t in args.tasks.split(",") if t], tokenizer, cfg.max_length)
    else:
        all_tasks = synthetic_tasks(max(args.k), args.examples, vocab, args.instruction, args.prompt, args.answer)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.k:
            names = list(all_tasks)[:k]
            if len(names) < k:
                ap.error(f"k={k} needs {k} tasks, have {len(all_tasks)}")
            tasks = {n: all_tasks[n] for n in names}
            for mode in ("one-by-one", "k-at-once"):
                r = dict(shape=args.shape, **run(model, tasks, cfg, lora, mode, args.warmup, Path(tmp) / f"k{k}", pad_id))
                results.append(r)
                print(json.dumps(r), flush=True)
    ratios = {}
    for k in args.k:
        by = {r["mode"]: r for r in results if r["k"] == k}
        ratios[f"k={k}"] = round(by["k-at-once"]["tokens_s"] / by["one-by-one"]["tokens_s"], 3)
    print(json.dumps({"summary": "k-at-once tokens/s over one-by-one", "shape": args.shape, "ratios": ratios}))


if __name__ == "__main__":
    main()

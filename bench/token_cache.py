"""Does a second run over a large conversation file start in seconds? (issue 27: "tokenisation is
cached, so a second run over 1M conversations starts in seconds").

Writes N synthetic multi-turn conversations (a shared system prompt, 1-3 user/assistant turns of a
few sentences) to a JSONL file, then times what `efftune train` does with them before its first
step, twice, each in a fresh process as a new run would: reading the file as a run does
(`efftune.data.options.load_for_run`: parsed and checked, or its parsed entry found in the data
cache), the held-out split (`load_examples`), tokenising with the default model's chat template
(`efftune.data.token_cache.encode_all`: the second time the cached arrays are mapped), the overflow
policy, and building the first step's batch rows. Prints one JSON line per run and a last line with
both. CPU is enough: this is tokenizer and disk work. The data cache goes to a temporary directory
unless --cache-dir is given (the model comes from efftune's usual cache).

    PYTHONPATH=. python bench/token_cache.py --conversations 1000000
    PYTHONPATH=. python bench/token_cache.py --data /tmp/chat-1m.jsonl --conversations 1000000 --cache-dir /tmp/c
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the river runs north through a valley of pine and granite where the old town keeps its bridge "
         "and every spring the water rises over the fields before the farmers plant barley wheat and rye").split()


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "."


def write_conversations(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            messages = [{"role": "system", "content": "You are a patient geography tutor."}]
            for _ in range(rng.randint(1, 3)):
                messages.append({"role": "user", "content": sentence(rng) + " " + sentence(rng)})
                messages.append({"role": "assistant", "content": " ".join(sentence(rng) for _ in range(3))})
            f.write(json.dumps({"messages": messages}) + "\n")


def one_run(data: str, model: str) -> dict:
    """In this process: what a run does with the data before its first step, timed."""
    from efftune.config import RunConfig
    from efftune.data.entries import take
    from efftune.data.layout import training_rows
    from efftune.data.loading import load_examples
    from efftune.data.options import DataConfig, apply_overflow, load_for_run
    from efftune.data.token_cache import encode_all
    from efftune.data.tokenize import Formatter, sequence_stats
    from efftune.models import load_model
    from efftune.train.loop import example_order
    _, tokenizer = load_model(model, dtype="fp32", device="cpu")
    cfg = RunConfig(data=DataConfig(path=data))
    say = lambda m: print(m, file=sys.stderr)  # noqa: E731
    t0 = time.perf_counter()
    train_set, eval_set = load_examples(data=data, eval_size=cfg.eval_size, seed=cfg.train.seed,
                                        read=lambda _, evaluation: load_for_run(cfg.data, evaluation, say))
    t1 = time.perf_counter()
    seqs = encode_all(Formatter(tokenizer, max_length=cfg.train.max_length), train_set, log=say)
    t2 = time.perf_counter()
    kept, _ = apply_overflow(train_set, seqs, cfg.data.overflow, cfg.train.max_length)
    if len(kept) < len(train_set):
        train_set, seqs = take(train_set, kept), take(seqs, kept)
    first = [seqs[i] for i in example_order(len(seqs), cfg.train.seed, 0, cfg.train.batch_size)]
    training_rows(first, cfg.train.max_length)
    t3 = time.perf_counter()
    return dict(conversations=len(train_set) + len(eval_set), tokens=int(sequence_stats(seqs)[0].sum()),
                read_s=round(t1 - t0, 2), tokenise_s=round(t2 - t1, 2), first_batch_s=round(t3 - t2, 2),
                total_s=round(t3 - t0, 2), max_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conversations", type=int, default=100_000)
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", help="a JSONL file to use (written with --conversations if it does not exist); "
                                   "default: a new one in a temporary directory")
    ap.add_argument("--cache-dir", help="the data cache ($EFFTUNE_DATA_CACHE; default: a temporary directory, "
                                        "so the first run finds nothing)")
    ap.add_argument("--runs", nargs="+", default=["first", "second"], help="labels of the runs, one process each")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(one_run(args.worker, args.model)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "chat.jsonl"
        if not data.exists():
            # new text every call (seeded by the clock): no cache entry of an earlier call fits it
            write_conversations(data, args.conversations, seed=time.time_ns())
        env = {**os.environ, "TQDM_DISABLE": "1", "EFFTUNE_DATA_CACHE": args.cache_dir or str(Path(tmp) / "cache")}
        runs = []
        for label in args.runs:
            out = subprocess.run([sys.executable, __file__, "--worker", str(data), "--model", args.model],
                                 env=env, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"the {label} run failed:\n{out.stderr[-3000:]}")
            row = {"run": label, **json.loads(out.stdout.strip().splitlines()[-1])}
            print(json.dumps(row), flush=True)
            runs.append(row)
        print(json.dumps({"conversations": runs[0]["conversations"],
                          **{f"{r['run']}_total_s": r["total_s"] for r in runs}}))


if __name__ == "__main__":
    main()

"""Do 8-bit Adam moments train as fp32 ones do? Full fine-tuning of the default model (or `--model`)
with each `train.optimizer` (adamw, adamw8bit, adamwfp8) on the same data, for several seeds; prints one
JSON line per run (held-out accuracy before and after, final loss, the loss curve's mean over its last
quarter) and a summary line per optimizer (means over the seeds).

Data: `--data FILE` (any file `efftune train --data` reads), or by default a task made here, offline
and seeded: "Is N an even or an odd number?" with choices even / odd (1,200 rows, 200 held out). The
default model starts near chance on it (0.52) and full fine-tuning learns it within 60 steps, so the
optimizers' differences show in accuracy as well as in loss. Any device: on a 2-core CPU one run
takes 2-4 minutes.

    PYTHONPATH=.. python optimizer_quality.py --seeds 0 1 2 --out /tmp/oq
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

from methods_compare import measured_run  # bench/ is this script's directory: first on sys.path

from efftune.train.optimizers import OPTIMIZERS


def parity_task(path: Path, rows: int = 1200, seed: int = 0) -> Path:
    """The default data: multiple-choice rows asking whether a number is even or odd."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(rows):
            n = rng.randint(100, 9999)
            f.write(json.dumps({"input": f"Is {n} an even or an odd number?", "choices": ["even", "odd"],
                                "answer": "even" if n % 2 == 0 else "odd"}) + "\n")
    return path


def one_run(optimizer: str, seed: int, data: Path, args: argparse.Namespace) -> dict:
    overrides = {"method": "full", "data": {"path": str(data)},
                 "output": str(Path(args.out) / f"{optimizer}-seed{seed}"),
                 "train": {"optimizer": optimizer, "seed": seed, "lr": args.lr, "steps": args.steps, "eval_every": 0,
                           "save_every": 0}}
    if args.model:
        overrides["model"] = args.model
    cfg, summary, measured = measured_run(overrides)
    losses = [json.loads(line)["loss"] for line in Path(summary["metrics"]).read_text().splitlines()
              if '"loss"' in line]
    tail = losses[-max(1, len(losses) // 4):]
    return dict(optimizer=optimizer, seed=seed, lr=cfg.train.lr, steps=cfg.train.steps,
                accuracy_before=summary.get("accuracy_before"), accuracy_after=summary.get("accuracy_after"),
                final_loss=summary.get("final_loss"), last_quarter_loss=round(statistics.mean(tail), 4), **measured)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--data", help="training data (default: the parity task, written to --out)")
    ap.add_argument("--model", help="default: the embedded default model")
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default="runs/optimizer_quality")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else parity_task(Path(args.out) / "parity.jsonl")
    results = []
    for seed in args.seeds:
        for optimizer in args.optimizers:
            results.append(one_run(optimizer, seed, data, args))
            print(json.dumps(results[-1]), flush=True)
    for optimizer in args.optimizers:
        runs = [r for r in results if r["optimizer"] == optimizer]
        print(json.dumps({"summary": optimizer, "seeds": len(runs),
                          "accuracy_after": round(statistics.mean(r["accuracy_after"] for r in runs), 4),
                          "accuracy_after_min": min(r["accuracy_after"] for r in runs),
                          "last_quarter_loss": round(statistics.mean(r["last_quarter_loss"] for r in runs), 4)}),
              flush=True)


if __name__ == "__main__":
    main()

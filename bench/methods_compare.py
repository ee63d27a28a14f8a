"""Every PEFT method side by side on the default model: accuracy, trainable parameters, memory, speed.

For each task and method, runs the main job (`efftune.finetune.run`: same data split, steps, batch and
seed; each method's own defaults) and records held-out accuracy before and after, trainable
parameters, peak GPU memory of the run (`max_memory_allocated`, reset before the model loads) and
training tokens/s (median of the logged steps after the first, the examples' own tokens). The
zero-shot row is the base model's accuracy (LoRA's "before": LoRA starts at the base model).
Per-method settings beyond the defaults are in `OVERRIDES` and printed with the results.

    PYTHONPATH=. python bench/methods_compare.py --tasks intent_recognition ... --out runs/compare
    PYTHONPATH=. python bench/methods_compare.py --tasks intent_recognition --steps 2 --eval-size 8 \\
        --methods lora ia3 --out /tmp/cmp      # smoke run
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from efftune.config import load_config
from efftune.finetune import run

METHODS = ("lora", "lora-fa", "prompt-tuning", "prefix-tuning", "bottleneck", "bitfit", "ia3")
# What each method needs beyond the shared recipe (the same as the README's method notes).
OVERRIDES: dict[str, dict] = {
    "bitfit": {"bitfit": {"add_biases": True}},      # Llama has no biases of its own
    "prompt-tuning": {"train": {"lr": 3e-2}},        # soft prompts want a far larger lr
}


def measured_run(overrides: dict) -> tuple:
    """The main job on `overrides` (output overwritten, quiet): (its config, its summary, what every
    bench table reports beside the scores: trainable parameters, peak GiB, the median tokens/s after
    the first step, training seconds, device). bench/learn_forget.py uses it too."""
    cfg = load_config(None, overrides)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    summary = run(cfg, overwrite=True, log=lambda *a: None)
    rows = [json.loads(line) for line in Path(summary["metrics"]).read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]
    return cfg, summary, dict(
        trainable=summary["trainable_parameters"],
        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        tokens_s=round(statistics.median(speeds), 1) if speeds else None,
        train_seconds=summary["train_seconds"], device=torch.cuda.get_device_name() if cuda else "cpu")


def one_run(task: str, method: str, args: argparse.Namespace) -> dict:
    overrides = {"model": args.model, "task": [task], "method": method, "eval_size": args.eval_size,
                 "output": str(Path(args.out) / task / method),
                 "train": {"steps": args.steps, "batch_size": args.batch_size, "eval_every": 0,
                           "save_every": 0}}
    for key, value in OVERRIDES.get(method, {}).items():
        overrides[key] = {**overrides.get(key, {}), **value} if isinstance(value, dict) else value
    cfg, summary, measured = measured_run(overrides)
    return dict(task=task, method=method, lr=cfg.train.lr, steps=cfg.train.steps,
                accuracy_before=summary.get("accuracy_before"), accuracy_after=summary.get("accuracy_after"),
                **measured)


def table(results: list[dict], tasks: list[str]) -> str:
    """Markdown: one row per method, accuracy per task and mean, params, memory, speed."""
    by = {(r["task"], r["method"]): r for r in results if "error" not in r}
    methods = list(dict.fromkeys(r["method"] for r in results))
    head = "| method | trainable params | " + " | ".join(tasks) + " | mean | peak GiB | tokens/s |"
    lines = [head, "|" + " --- |" * (len(tasks) + 5)]
    zero = [by.get((t, "lora"), {}).get("accuracy_before") for t in tasks]
    if all(z is not None for z in zero):
        lines.append("| zero-shot | 0 | " + " | ".join(f"{z:.3f}" for z in zero)
                     + f" | {statistics.mean(zero):.3f} | | |")
    for m in methods:
        accs = [by.get((t, m), {}).get("accuracy_after") for t in tasks]
        runs = [by[(t, m)] for t in tasks if (t, m) in by]
        if not runs:
            continue
        mean = f"{statistics.mean(accs):.3f}" if all(a is not None for a in accs) else "—"
        peak = max((r["peak_gib"] or 0) for r in runs)
        speed = statistics.median(r["tokens_s"] for r in runs if r["tokens_s"])
        lines.append(f"| {m} | {runs[0]['trainable']:,} | "
                     + " | ".join("—" if a is None else f"{a:.3f}" for a in accs)
                     + f" | {mean} | {peak:.2f} | {speed:,.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["intent_recognition", "epistemic_reasoning", "logical_fallacy_detection"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--model", default="default")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-size", type=int, default=200)
    ap.add_argument("--out", default="runs/methods_compare")
    args = ap.parse_args(argv)
    print(json.dumps({"overrides": OVERRIDES}), flush=True)
    results = []
    for task in args.tasks:
        for method in args.methods:
            try:
                results.append(one_run(task, method, args))
            except Exception as exc:  # one failing method must not lose the others' results
                results.append(dict(task=task, method=method, error=f"{type(exc).__name__}: {exc}"))
            print(json.dumps(results[-1]), flush=True)
    print(table(results, args.tasks), flush=True)


if __name__ == "__main__":
    main()

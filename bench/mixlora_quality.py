"""Multi-task quality: MixLoRA vs LoRA at about equal trainable parameters, same steps, same data.

The model (default: the embedded SmolLM2-135M-Instruct) is trained once per method on the union
of the training splits of several BIG-bench multiple-choice tasks (examples drawn uniformly from
the mix, as `efftune train --task a,b,...` does), then scored per task on the held-out split the
main job uses (`split_examples(load_task(t), eval_size, seed=0)`, log-likelihood of each choice).

  mixlora  E experts (default 8), top-k (2), rank r (8) on gate/up/down + LoRA r on q/k/v/o
  lora     LoRA on every linear layer; rank chosen so its trainable parameters come closest to
           MixLoRA's (`--lora-rank auto`), or given

Writes under `--output` (default runs/mixlora_quality): `<method>/` (the training loop's
metrics.jsonl, training.png and, for MixLoRA, routing.json + routing.png: the tokens each expert
took, per layer), `results.json` and `results.md` (accuracy per task, their mean, trainable
parameters, training seconds). The last stdout line is results.json's content.

    python bench/mixlora_quality.py                                  # the full run (GPU)
    python bench/mixlora_quality.py --steps 2 --tasks intent_recognition,navigate --eval-size 8 \
        --batch-size 4 --device cpu                                  # CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the checkout

from efftune.attach import find_targets, trainable_parameters
from efftune.data import Formatter, load_task, split_examples  # noqa: E402
from efftune.eval.multiple_choice import multiple_choice_accuracy  # noqa: E402
from efftune.methods.lora.config import LoraConfig
from efftune.methods.lora.model import add_lora
from efftune.methods.mixlora import MixLoraConfig, add_mixlora, unload_mixlora  # noqa: E402
from efftune.models import load_model  # noqa: E402
from efftune.train.loop import TrainConfig, train  # noqa: E402

TASKS = ["intent_recognition", "epistemic_reasoning", "implicatures", "metaphor_boolean",
         "presuppositions_as_nli", "sports_understanding", "logical_fallacy_detection", "winowhy"]


def lora_params_per_rank(model) -> int:
    """Trainable parameters of all-linear LoRA per unit of rank: Σ (in + out) over the targets."""
    return sum(m.in_features + m.out_features for m in map(model.get_submodule, find_targets(model, "all-linear")))


def mixlora_config(args) -> MixLoraConfig:
    return MixLoraConfig(num_experts=args.experts, top_k=args.top_k, r=args.rank, alpha=2.0 * args.rank,
                         attn_r=args.rank, attn_alpha=2.0 * args.rank, aux_loss_coef=args.aux_loss_coef,
                         dropout=args.dropout)


def load_data(tasks: list[str], eval_size: int, train_per_task: int):
    train_set, evals = [], {}
    for name in tasks:
        tr, ev = split_examples(load_task(name), eval_size, seed=0)  # the main job's held-out split
        train_set += tr[:train_per_task] if train_per_task else tr
        evals[name] = ev
    return train_set, evals


def evaluate_tasks(model, formatter, evals: dict) -> dict[str, float]:
    return {name: round(multiple_choice_accuracy(model, formatter, ex), 4) for name, ex in evals.items()}


def run_method(method: str, args, train_set, evals, lora_rank: int) -> dict:
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    if method == "mixlora":
        add_mixlora(model, mixlora_config(args))
    else:
        add_lora(model, LoraConfig(r=lora_rank, alpha=2.0 * lora_rank, dropout=args.dropout))
    trainable, total = trainable_parameters(model)
    formatter = Formatter(tokenizer, max_length=args.max_length)
    sequences = [formatter.encode(e) for e in train_set]
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                      lr=args.lr, warmup_steps=max(1, args.steps // 10), max_length=args.max_length,
                      eval_every=0, save_every=0, keep_checkpoints=1, seed=args.seed)
    print(f"{method}: {trainable:,} trainable of {total:,}; {len(sequences)} training examples", file=sys.stderr)
    result = train(model, sequences, cfg, Path(args.output) / method, pad_id=tokenizer.pad_token_id)
    accuracy = evaluate_tasks(model, formatter, evals)
    return {"accuracy": accuracy, "mean": round(sum(accuracy.values()) / len(accuracy), 4),
            "trainable_parameters": trainable, "train_seconds": round(result.train_seconds, 1),
            "final_loss": round(result.final_loss, 4),
            **({"lora_rank": lora_rank} if method == "lora" else {"config": vars(mixlora_config(args))})}


def markdown(results: dict, tasks: list[str]) -> str:
    cols = list(results["methods"])
    head = ["task"] + (["base"] if results.get("base") else []) + cols
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in tasks + ["**mean**"]:
        key = "mean" if t == "**mean**" else None
        row = [t]
        if results.get("base"):
            row.append(f"{results['base']['mean'] if key else results['base']['accuracy'][t]:.3f}")
        row += [f"{results['methods'][m]['mean'] if key else results['methods'][m]['accuracy'][t]:.3f}" for m in cols]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("| trainable params | " + ("— | " if results.get("base") else "")
                 + " | ".join(f"{results['methods'][m]['trainable_parameters']:,}" for m in cols) + " |")
    lines.append("| train seconds | " + ("— | " if results.get("base") else "")
                 + " | ".join(str(results["methods"][m]["train_seconds"]) for m in cols) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated BIG-bench multiple-choice tasks")
    ap.add_argument("--methods", default="mixlora,lora")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--micro-batch-size", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-size", type=int, default=200, help="held-out examples per task")
    ap.add_argument("--train-per-task", type=int, default=0, help="cap on training examples per task (0: all)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8, help="MixLoRA expert and attention rank (alpha = 2·rank)")
    ap.add_argument("--lora-rank", default="auto", help="'auto': match MixLoRA's trainable parameters")
    ap.add_argument("--aux-loss-coef", type=float, default=0.01)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--no-base", action="store_true", help="skip scoring the base model")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default="runs/mixlora_quality")
    args = ap.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not set(methods) <= {"mixlora", "lora"}:
        ap.error(f"--methods: mixlora and/or lora, got {args.methods}")
    Path(args.output).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train_set, evals = load_data(tasks, args.eval_size, args.train_per_task)

    # The base model's scores, and the LoRA rank whose size matches MixLoRA's.
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    base = None
    if not args.no_base:
        acc = evaluate_tasks(model, Formatter(tokenizer, max_length=args.max_length), evals)
        base = {"accuracy": acc, "mean": round(sum(acc.values()) / len(acc), 4)}
    add_mixlora(model, mixlora_config(args))
    mix_params = trainable_parameters(model)[0]
    unload_mixlora(model)
    lora_rank = (max(1, round(mix_params / lora_params_per_rank(model))) if args.lora_rank == "auto"
                 else int(args.lora_rank))
    del model

    results = {"tasks": tasks, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
               "eval_size": args.eval_size, "train_examples": len(train_set), "model": args.model,
               "base": base, "methods": {}}
    for method in methods:
        results["methods"][method] = run_method(method, args, train_set, evals, lora_rank)
    results["total_seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.output)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown(results, tasks)
    (out / "results.md").write_text(table)
    print(table, file=sys.stderr)
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()

"""Learning against forgetting ("LoRA Learns Less and Forgets Less", Biderman et al. 2024) on the default model.

Every setting runs the main job (`efftune.finetune.run`) on the same training set, steps, batch and
seed: by default the 8 BIG-bench multiple-choice tasks of bench/mixlora_quality.py (`TRAIN_TASKS`, none
in the panel; thousands of examples, held out as the main job holds them out), 200 steps of 16 (3,200
examples, the same budget for every setting), with the retention panel (`--retention default`: `efftune.eval.retention`) scored before and after,
and records: target-task held-out accuracy before and after (learning), panel accuracy and panel
cross-entropy before and after (forgetting: accuracy falling, cross-entropy rising), trainable
parameters, peak GPU memory (`max_memory_allocated`, reset before the model loads) and training
tokens/s (median of the logged steps after the first). Settings (`SETTINGS`): full fine-tuning at
three learning rates, LoRA on every linear at r = 8, 64, 192 (the largest rank the model's k/v projections
take), LoRA on attention only at r = 8, and the
other PEFT methods at their defaults. LoRA trains at the main job's lr 1e-3, 10x full fine-tuning's largest
("LoRA Without Regret": LoRA's best is about 10x full fine-tuning's).

The plot (`forgetting.png` in --out; `--figure` copies it to bench/figures/) has one point per
setting: target accuracy gain (y) against panel accuracy drop and against panel cross-entropy rise
(x, two panels). Points up and to the left learn more and forget less. (Sessions 16 and 18 ran one
target task, `--tasks intent_recognition --steps 60`.)

    PYTHONPATH=. python bench/learn_forget.py --out runs/learn_forget --figure          # GPU, ~minutes a setting
    PYTHONPATH=. python bench/learn_forget.py --model DIR --steps 2 --eval-size 8 \\
        --settings full-lr1e-5 lora-r8 --out /tmp/lf                                     # smoke run
    PYTHONPATH=. python bench/learn_forget.py --collect /tmp/lf1 /tmp/lf2 --out runs/learn_forget --figure
                                                    # settings run apart (one process each), joined and plotted
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


from methods_compare import measured_run  # bench/ is this script's directory: first on sys.path
from mixlora_quality import TASKS as MIXLORA_TASKS

from efftune.train.optimizers import OPTIMIZERS

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
# the training set: several tasks, none in the default retention panel (efftune.eval.retention)
TRAIN_TASKS = MIXLORA_TASKS
# name: config overrides beyond the shared recipe
SETTINGS: dict[str, dict] = {
    "full-lr1e-5": {"method": "full", "train": {"lr": 1e-5}},
    "full-lr3e-5": {"method": "full", "train": {"lr": 3e-5}},
    "full-lr1e-4": {"method": "full", "train": {"lr": 1e-4}},
    "lora-r8": {"method": "lora", "lora": {"r": 8, "alpha": 16}, "train": {"lr": 1e-3}},
    "lora-r64": {"method": "lora", "lora": {"r": 64, "alpha": 128}, "train": {"lr": 1e-3}},
    # the largest rank every linear of the default model takes (k_proj and v_proj have 192 outputs;
    # efftune refuses a rank above a layer's smaller side): the papers' r = 256 has no room here
    "lora-r192": {"method": "lora", "lora": {"r": 192, "alpha": 384}, "train": {"lr": 1e-3}},
    "lora-attn-r8": {"method": "lora", "lora": {"r": 8, "alpha": 16, "target_modules": ATTENTION},
                     "train": {"lr": 1e-3}},
    # the other methods at their defaults (the main job's lr 1e-3), as bench/methods_compare.py runs them
    "lora-fa": {"method": "lora-fa"},
    "ia3": {"method": "ia3"},
    "bitfit": {"method": "bitfit", "bitfit": {"add_biases": True}},
    "bottleneck": {"method": "bottleneck"},
    "prompt-tuning": {"method": "prompt-tuning", "train": {"lr": 3e-2}},
    "prefix-tuning": {"method": "prefix-tuning"},
}


def one_run(name: str, args: argparse.Namespace) -> dict:
    setting = SETTINGS[name]
    overrides = {"model": args.model, "task": list(args.tasks), "eval_size": args.eval_size, "retention": [args.panel],
                 "output": str(Path(args.out) / name),
                 "train": {"steps": args.steps, "batch_size": args.batch_size, "eval_every": 0, "save_every": 0,
                           "optimizer": args.optimizer if setting["method"] == "full" else "adamw"}}
    for key, value in setting.items():
        overrides[key] = {**overrides.get(key, {}), **value} if isinstance(value, dict) else value
    cfg, s, measured = measured_run(overrides)
    before, after = s["retention_before"], s["retention_after"]
    return dict(setting=name, method=cfg.method, lr=cfg.train.lr, steps=cfg.train.steps, task=",".join(args.tasks),
                target_before=s.get("accuracy_before"), target_after=s.get("accuracy_after"),
                panel=before["panel"], panel_acc_before=before.get("accuracy"), panel_acc_after=after.get("accuracy"),
                panel_ce_before=before.get("cross_entropy"), panel_ce_after=after.get("cross_entropy"),
                **measured)


def table(results: list[dict]) -> str:
    """Markdown: one row per setting."""
    head = ("| setting | lr | target acc (before → after) | panel acc | panel CE (nats/token) | trainable | "
            "peak GiB | tokens/s |\n|---|---:|---|---|---|---:|---:|---:|")
    lines = [head]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['setting']} | error: {r['error']} |||||||")
            continue
        lines.append(f"| {r['setting']} | {r['lr']:g} | {r['target_before']} → {r['target_after']} | "
                     f"{r['panel_acc_before']} → {r['panel_acc_after']} | {r['panel_ce_before']} → "
                     f"{r['panel_ce_after']} | {r['trainable']:,} | {r['peak_gib']} | {r['tokens_s']} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    """Learning (target accuracy gain) against forgetting (panel accuracy drop, panel CE rise)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in results if "error" not in r and r["target_after"] is not None]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, (x_label, drop) in zip(axes, (
            ("panel accuracy drop (before - after)", lambda r: r["panel_acc_before"] - r["panel_acc_after"]),
            ("panel cross-entropy rise (after - before, nats/token)",
             lambda r: r["panel_ce_after"] - r["panel_ce_before"]))):
        for r in ok:
            colour = "tab:red" if r["method"] == "full" else "tab:blue" if r["method"] == "lora" else "tab:gray"
            ax.scatter(drop(r), r["target_after"] - r["target_before"], color=colour)
            ax.annotate(r["setting"], (drop(r), r["target_after"] - r["target_before"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.axvline(0, color="black", linewidth=0.5)
        ax.set_xlabel(x_label)
    axes[0].set_ylabel(f"target accuracy gain ({ok[0]['task'] if ok else ''})")
    fig.suptitle("Learning vs forgetting (red: full fine-tuning, blue: LoRA, gray: other PEFT)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--tasks", nargs="+", default=TRAIN_TASKS, help="the training tasks (BIG-bench; held-out "
                    "accuracy over them is the target accuracy)")
    ap.add_argument("--panel", default="default", help="retention panel (efftune.eval.retention)")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-size", type=int, default=None)
    ap.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS, help="full fine-tuning's")
    ap.add_argument("--out", default="runs/learn_forget")
    ap.add_argument("--figure", action="store_true", help="copy forgetting.png to bench/figures/")
    ap.add_argument("--collect", nargs="+", metavar="DIR", default=None,
                    help="run nothing: join the results.json of runs made apart (settings split over processes) "
                         "into --out, in SETTINGS order, and plot them")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.collect:
        found = {r["setting"]: r for d in args.collect for r in json.loads((Path(d) / "results.json").read_text())}
        results = [found[name] for name in SETTINGS if name in found]
        (out / "results.json").write_text(json.dumps(results, indent=1))
        args.settings = []
    else:
        results = []
    for name in args.settings:
        try:
            results.append(one_run(name, args))
        except Exception as exc:  # an OOM or a method that cannot run here: the others still do
            results.append(dict(setting=name, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))
        print(json.dumps(results[-1]), flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "forgetting.png")
    if args.figure:
        shutil.copy(out / "forgetting.png", Path(__file__).parent / "figures" / "forgetting.png")
    print(table(results))


if __name__ == "__main__":
    main()

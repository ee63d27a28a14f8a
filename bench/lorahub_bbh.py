"""The LoraHub paper's BIG-Bench Hard table on the default model (SmolLM2-135M-Instruct).

For each BBH task (the BIG-bench 1.0.0 versions of the multiple-choice BBH tasks) this scores, on
one fixed held-out split, the same one the CLI evaluates on (`split_examples(load_task(t),
eval_size, seed=0)`, at most half the task):

- **zero-shot**: the base model;
- **ICL 5-shot**: the 5 shots (prompt + correct answer) in front of every held-out prompt
  (format: `icl_prompt` below);
- **LoraHub**: for each seed in `--seeds`, `efftune.compose.lorahub.lorahub` with
  `--max-modules` modules drawn at random (seeded) from the library, the 5 shots, `--budget`
  evaluations (paper defaults: 20 modules, 5 shots, budget 40, 5 seeds); average and best over seeds;
- **LoRA 5-shot**: a fresh LoRA (r=8, alpha=16, all linear layers, dropout 0) trained on the 5 shots
  only: `--lora-steps` 30 steps of batch 5 (all shots every step), lr 1e-3, warmup 3, then cosine to
  0.1x (efftune's loop). Chosen once, before looking at any held-out number; not tuned.

The 5 shots are drawn from the task's training split with `--shot-seed` (as `efftune hub compose
--task T --seed S` draws them) and are the same for ICL, every LoraHub seed and LoRA: the LoraHub
seeds vary which modules are drawn and nevergrad's search, not the examples. Library modules trained
on the task being evaluated (same name) are left out of its draw. Tokens per example: the average
prompt tokens of a held-out example as the model reads it (LoraHub and LoRA read the zero-shot
prompt; ICL reads the 5 shots too).

Evaluation runs in the model's dtype (bf16 on GPU, fp32 on CPU, as `efftune train` evaluates); the
LoRA baseline trains with efftune's loop (bf16 autocast on GPU). The library is loaded once; after
each LoraHub seed the composed adapter is deleted and after each task the model is the base model again.

    # build a library of 40 non-BBH BIG-bench tasks (resumes), then the whole table
    PYTHONPATH=. python bench/lorahub_bbh.py --library runs/lib --build-tasks auto:40 --together 8 \\
        --out runs/lorahub_bbh
    # CPU smoke test: a 3-module library, 1 task, tiny everything
    PYTHONPATH=. python bench/lorahub_bbh.py --library /tmp/lib --build-tasks \\
        intent_recognition,implicatures,anachronisms --build-steps 2 --build-eval-size 20 \\
        --tasks navigate --seeds 0 --eval-size 20 --max-modules 3 --budget 5 --out /tmp/lorahub_bbh
    # only resolve and extract the task files (BBH + library), e.g. to carry them to another machine
    PYTHONPATH=. python bench/lorahub_bbh.py --library runs/lib --build-tasks auto:40 --prepare-only

One JSON line per task as it finishes, then a markdown table; both also in `--out`
(`results.json`, `results.md`, rewritten after every task). `--max-tasks N --resume` runs the table
in pieces (e.g. under a per-command time limit): each call adds N tasks to the same `--out`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from efftune.data.examples import MultipleChoice

# The multiple-choice BBH tasks that BIG-bench 1.0.0 holds (BBH's other six are generative there or
# missing: boolean_expressions, dyck_languages, multistep_arithmetic_two, object_counting,
# web_of_lies, word_sorting).
BBH_TASKS = (
    "causal_judgment", "date_understanding", "disambiguation_qa", "formal_fallacies_syllogisms_negation",
    "geometric_shapes", "hyperbaton", "logical_deduction/three_objects", "logical_deduction/five_objects",
    "logical_deduction/seven_objects", "movie_recommendation", "navigate", "penguins_in_a_table",
    "reasoning_about_colored_objects", "ruin_names", "salient_translation_error_detection", "snarks",
    "sports_understanding", "temporal_sequences", "tracking_shuffled_objects/three_objects",
    "tracking_shuffled_objects/five_objects", "tracking_shuffled_objects/seven_objects",
)
# Every BIG-bench task BBH draws on (top-level names): never put into an `auto` library.
BBH_FAMILY = {t.split("/")[0] for t in BBH_TASKS} | {
    "boolean_expressions", "dyck_languages", "multistep_arithmetic", "object_counting", "web_of_lies",
    "word_sorting"}
COLUMNS = (("zero_shot", "zero-shot"), ("icl", "ICL 5-shot"), ("lorahub_avg", "LoraHub avg"),
           ("lorahub_best", "LoraHub best"), ("lora", "LoRA 5-shot"))
TOKEN_KEYS = (("zero_shot", "zero-shot"), ("icl", "ICL 5-shot"), ("lorahub", "LoraHub"))


# ---- pure helpers (no model; tests/compose/test_lorahub_bbh_helpers.py) -------------------------------

def shared_instruction(prompts: Sequence[str]) -> str:
    """The text all of a task's prompts start with, up to and including its last newline: the task's
    instruction (e.g. "If you follow these instructions, ...?\\n"), or "" when they share no line."""
    common = os.path.commonprefix(list(prompts)) if prompts else ""
    return common[:common.rfind("\n") + 1]


def icl_prompt(shots: Sequence[MultipleChoice], prompt: str, instruction: str = "") -> str:
    """The in-context prompt: `instruction` once, then each shot as the exact text it is scored as
    zero-shot (its prompt followed by its correct choice), shots separated by a blank line, then
    `prompt`. `instruction` is taken off the start of every prompt that has it, so it appears once:

        <instruction><shot 1 prompt><shot 1 answer>\\n\\n ... <shot 5 prompt><shot 5 answer>\\n\\n<prompt>
    """
    strip = lambda p: p[len(instruction):] if instruction and p.startswith(instruction) else p
    parts = [strip(s.prompt) + s.completion for s in shots]
    return instruction + "\n\n".join(parts + [strip(prompt)])


def icl_examples(shots: Sequence[MultipleChoice], examples: Sequence[MultipleChoice],
                 instruction: str = "") -> list[MultipleChoice]:
    """`examples` with the shots in front of each prompt (choices and correct answers unchanged)."""
    return [MultipleChoice(icl_prompt(shots, ex.prompt, instruction), ex.choices, ex.answer, ex.correct)
            for ex in examples]


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(kept) / len(kept) if kept else None


def average_row(rows: Sequence[dict]) -> dict:
    """Per column, the mean over the tasks that have a value (accuracies and tokens per example)."""
    out = {key: _mean([r.get(key) for r in rows]) for key, _ in COLUMNS}
    out["tokens"] = {key: _mean([r.get("tokens", {}).get(key) for r in rows]) for key, _ in TOKEN_KEYS}
    return out


def render_table(rows: Sequence[dict]) -> str:
    """Markdown: accuracy (%) per task and method, an average row, then average tokens per example."""
    pct = lambda v: "–" if v is None else f"{100 * v:.1f}"
    lines = ["| task | " + " | ".join(title for _, title in COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    for r in rows:
        lines.append(f"| {r['task']} | " + " | ".join(pct(r.get(k)) for k, _ in COLUMNS) + " |")
    avg = average_row(rows)
    lines.append(f"| **average ({len(rows)} tasks)** | " + " | ".join(f"**{pct(avg[k])}**" for k, _ in COLUMNS) + " |")
    tok = lambda v: "–" if v is None else f"{v:.1f}"
    lines += ["", "Tokens per example (average prompt tokens of a held-out example): "
              + ", ".join(f"{title} {tok(avg['tokens'][k])}" for k, title in TOKEN_KEYS) + "."]
    return "\n".join(lines) + "\n"


# ---- tasks ----------------------------------------------------------------------------------------------

def check_tasks(names: Sequence[str], index: dict) -> tuple[list[str], list[dict]]:
    """(multiple-choice tasks to run, notes on the skipped ones) by BIG-bench's index."""
    keep, skipped = [], []
    for name in names:
        entries = [name] if name in index else sorted(n for n in index if n.startswith(name + "/"))
        if not entries:
            skipped.append({"task": name, "skipped": "not in BIG-bench 1.0.0"})
        elif any(index[e].kind != "multiple_choice" for e in entries):
            kinds = sorted({index[e].kind for e in entries})
            skipped.append({"task": name, "skipped": f"not multiple choice ({', '.join(kinds)})"})
        else:
            keep.append(name)
    return keep, skipped


def auto_library_tasks(count: int, index: dict, exclude: Sequence[str]) -> list[str]:
    """`count` BIG-bench tasks for a library, one per task family (a family's subtasks, e.g. the
    16 `multiemo/*`, would crowd out other skills): families drawn with seed 0 among the
    multiple-choice tasks that are not BBH's (nor in `exclude`) with 100 to 5,000 examples (enough to
    train on; task files small enough to carry around), then one subtask of each drawn family."""
    excluded = BBH_FAMILY | {t.split("/")[0] for t in exclude}
    families: dict[str, list[str]] = {}
    for name in sorted(index):
        info = index[name]
        if info.kind == "multiple_choice" and name.split("/")[0] not in excluded and 100 <= info.examples <= 5000:
            families.setdefault(name.split("/")[0], []).append(name)
    if count > len(families):
        raise SystemExit(f"--build-tasks auto:{count}: only {len(families)} candidate task families")
    rng = random.Random(0)
    return sorted(rng.choice(families[f]) for f in sorted(rng.sample(sorted(families), count)))


def build_tasks(spec: str | None, index: dict, eval_tasks: Sequence[str]) -> list[str]:
    if not spec:
        return []
    if spec.startswith("auto"):
        return auto_library_tasks(int(spec.partition(":")[2] or 40), index, eval_tasks)
    return [t.strip() for t in spec.split(",") if t.strip()]


def split_task(task: str, eval_size: int) -> tuple[list, list[MultipleChoice]]:
    """(training pool, held-out multiple-choice examples): the split `efftune train/eval/hub compose
    --task` use (seed 0), so numbers are comparable and reproducible."""
    from efftune.data.loading import load_examples
    pool, held_out = load_examples(tasks=[task], eval_size=eval_size)
    return pool, [e for e in held_out if isinstance(e, MultipleChoice)]


# ---- model-side pieces --------------------------------------------------------------------------------------

def prompt_tokens(formatter, examples: Sequence[MultipleChoice]) -> float:
    return sum(len(formatter.encode_prompt(e.prompt)) for e in examples) / len(examples)


def row_tokens_for(formatter, examples: Sequence[MultipleChoice]) -> int:
    """Row length that holds every example's whole prompt and all its choices (scoring keeps only
    the end of a prompt that does not fit: long ICL prompts would lose their first shots)."""
    need = max(len(formatter.encode_prompt(e.prompt)) + sum(len(formatter.encode_pair(e.prompt, c)[1]) + 1
                                                             for c in e.choices) for e in examples)
    return max(512, -(-need // 64) * 64)


def accuracy(model, formatter, examples: Sequence[MultipleChoice]) -> float:
    from efftune.eval.multiple_choice import multiple_choice_accuracy
    return multiple_choice_accuracy(model, formatter, list(examples), row_tokens=row_tokens_for(formatter, examples))


def fewshot_lora(model, tokenizer, formatter, shots, held_out, args, work_dir: Path) -> float:
    """Train a fresh LoRA on the shots, score it, delete it; the model is the base model again."""
    import torch

    from efftune.methods.lora.config import LoraConfig
    from efftune.methods.lora.model import add_lora, delete_adapter, set_active_adapters
    from efftune.train.loop import TrainConfig, train

    name = "fewshot_lora"
    torch.manual_seed(args.shot_seed)
    add_lora(model, LoraConfig(r=8, alpha=16.0, dropout=0.0), adapter=name)  # freezes everything else
    try:
        set_active_adapters(model, name)
        cfg = TrainConfig(steps=args.lora_steps, batch_size=len(shots), lr=args.lora_lr,
                          warmup_steps=min(3, args.lora_steps - 1), eval_every=0, save_every=0,
                          keep_checkpoints=1, seed=args.shot_seed)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        with tempfile.TemporaryDirectory(dir=work_dir) as tmp:  # train() writes checkpoints and a plot
            train(model, [formatter.encode(s) for s in shots], cfg, tmp, pad_id=pad)
        return accuracy(model, formatter, held_out)
    finally:
        delete_adapter(model, name)
        set_active_adapters(model, None)


def lorahub_seed(model, formatter, shots, held_out, library: list[str], seed: int, args) -> dict:
    """One LoraHub run (efftune's search), scored on the held-out split; the composition is removed."""
    from efftune.compose.lorahub import lorahub
    from efftune.methods.lora.layer import adapter_names
    from efftune.methods.lora.model import delete_adapter, set_active_adapters

    t0 = time.perf_counter()
    try:
        hub, res = lorahub(model, formatter, shots, library, max_modules=args.max_modules, budget=args.budget,
                           seed=seed, name="lorahub")
        acc = accuracy(model, formatter, held_out)
    finally:
        if "lorahub" in adapter_names(model):
            delete_adapter(model, "lorahub")
        set_active_adapters(model, None)
    return {"seed": seed, "accuracy": acc, "objective": res.objective, "loss": res.loss,
            "base_objective": res.base_objective, "modules": res.modules,
            "weights": [round(w, 4) for w in res.weights], "seconds": round(time.perf_counter() - t0, 1)}


def library_for(task: str, library: list[str], index_file: Path) -> tuple[list[str], list[str]]:
    """(modules LoraHub may draw for `task`, modules left out because they were trained on it)."""
    from efftune.compose.library import module_name
    tasks = {}
    if index_file.is_file():
        tasks = {m: meta.get("task") for m, meta in json.loads(index_file.read_text()).get("modules", {}).items()}
    out = [m for m in library if m == module_name(task) or tasks.get(m) == task
           or (tasks.get(m) or "").startswith(task + "/")]
    return [m for m in library if m not in out], out


def run_task(task: str, model, tokenizer, formatter, library: list[str], args, out_dir: Path) -> dict:
    pool, held_out = split_task(task, args.eval_size)
    pool = [e for e in pool if isinstance(e, MultipleChoice)]
    if not held_out or len(pool) < args.shots:
        return {"task": task, "skipped": f"too few examples ({len(pool)} to train, {len(held_out)} held out)"}
    shots = random.Random(args.shot_seed).sample(pool, args.shots)
    usable, excluded = library_for(task, library, Path(args.library) / "library.json")
    instruction = shared_instruction([e.prompt for e in pool + held_out])
    icl = icl_examples(shots, held_out, instruction)
    row = {"task": task, "eval_examples": len(held_out), "train_pool": len(pool), "shots": len(shots)}
    seconds = {}

    t = time.perf_counter()
    row["zero_shot"] = accuracy(model, formatter, held_out)
    seconds["zero_shot"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    row["icl"] = accuracy(model, formatter, icl)
    seconds["icl"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    runs = [lorahub_seed(model, formatter, shots, held_out, usable, s, args) for s in args.seeds] if usable else []
    accs = [r["accuracy"] for r in runs]
    row["lorahub_avg"] = sum(accs) / len(accs) if accs else None
    row["lorahub_best"] = max(accs) if accs else None
    seconds["lorahub"] = round(time.perf_counter() - t, 1)

    if args.lora_steps > 0:
        t = time.perf_counter()
        row["lora"] = fewshot_lora(model, tokenizer, formatter, shots, held_out, args, out_dir)
        seconds["lora"] = round(time.perf_counter() - t, 1)

    zs_tokens = prompt_tokens(formatter, held_out)
    row["tokens"] = {"zero_shot": round(zs_tokens, 1), "icl": round(prompt_tokens(formatter, icl), 1),
                     "lorahub": round(zs_tokens, 1)}
    row["lorahub_runs"] = runs
    row["excluded_modules"] = excluded
    row["instruction_chars"] = len(instruction)
    row["seconds"] = seconds
    return row


# ---- main ------------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--library", required=True, help="module library directory (efftune hub build's --output)")
    p.add_argument("--build-tasks", help="build/resume the library first: task names comma-separated, or "
                                         "auto[:N] (N non-BBH multiple-choice BIG-bench tasks, seeded; default 40)")
    p.add_argument("--build-steps", type=int, default=60, help="library: steps per module (hub build's default)")
    p.add_argument("--build-batch-size", type=int, default=16, help="library: examples per step per module")
    p.add_argument("--build-eval-size", type=int, default=200, help="library: held-out examples per module task")
    p.add_argument("--together", type=int, default=1, help="library: modules trained at once")
    p.add_argument("--tasks", default=",".join(BBH_TASKS), help="BBH tasks, comma-separated (default: all 21)")
    p.add_argument("--max-tasks", type=int, default=0, help="run at most this many tasks in this call (0: all)")
    p.add_argument("--resume", action="store_true", help="keep the tasks already in --out/results.json, run the rest")
    p.add_argument("--eval-size", type=int, default=200, help="held-out examples per task (at most half the task)")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--shot-seed", type=int, default=0, help="seed drawing the shots from the training split")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="LoraHub runs")
    p.add_argument("--max-modules", type=int, default=20)
    p.add_argument("--budget", type=int, default=40)
    p.add_argument("--lora-steps", type=int, default=30, help="LoRA 5-shot baseline steps (0: skip it)")
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--chat-template", action="store_true")
    p.add_argument("--prepare-only", action="store_true", help="extract the task files (BBH + library) and stop")
    p.add_argument("--out", default="runs/lorahub_bbh")
    return p.parse_args(argv)


def write_results(out_dir: Path, args, rows: list[dict], skipped: list[dict], extra: dict) -> str:
    table = render_table(rows)
    result = {"config": {k: v for k, v in vars(args).items()}, **extra, "tasks": rows, "skipped": skipped,
              "average": average_row(rows)}
    for name, text in (("results.json", json.dumps(result, indent=2)), ("results.md", table)):
        tmp = out_dir / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out_dir / name)
    return table


def main(argv=None) -> None:
    args = parse_args(argv)
    from efftune.data import task_index
    from efftune.data.bigbench import extract_task_files

    index = task_index()
    tasks, skipped = check_tasks([t.strip() for t in args.tasks.split(",") if t.strip()], index)
    for s in skipped:
        print(json.dumps(s), flush=True)
    out_dir = Path(args.out)
    rows = []
    if args.resume and (out_dir / "results.json").is_file():  # a run cut short (e.g. by a time limit)
        rows = [r for r in json.loads((out_dir / "results.json").read_text())["tasks"] if r["task"] in tasks]
        print(json.dumps({"resumed": [r["task"] for r in rows]}), flush=True)
    done, order = {r["task"] for r in rows}, {t: i for i, t in enumerate(tasks)}
    lib_tasks = build_tasks(args.build_tasks, index, tasks)  # from the full list: the same on every call
    tasks = [t for t in tasks if t not in done]
    if args.max_tasks:
        tasks = tasks[:args.max_tasks]
    # one pass over the BIG-bench sdist for every task file not cached yet (instead of one per task)
    bb = [n for t in tasks + [t for t in lib_tasks if not t.endswith((".json", ".jsonl"))]
          for n in ([t] if t in index else sorted(i for i in index if i.startswith(t + "/")))]
    files = extract_task_files(bb)
    if args.prepare_only:
        print(json.dumps({"tasks": tasks, "library_tasks": lib_tasks, "task_files": sorted(map(str, files.values()))}))
        return

    import torch

    from efftune.compose.lorahub import load_library
    from efftune.data import Formatter
    from efftune.models import load_model

    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    device = next(model.parameters()).device
    extra = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
             "dtype": str(next(model.parameters()).dtype)}
    if lib_tasks:
        from efftune.compose.library import build_library
        from efftune.methods.lora.config import LoraConfig
        from efftune.train.loop import TrainConfig
        t = time.perf_counter()
        built = build_library((model, tokenizer), lib_tasks, args.library, LoraConfig(),
                              TrainConfig(steps=args.build_steps, batch_size=args.build_batch_size),
                              together=args.together, eval_size=args.build_eval_size,
                              chat_template=args.chat_template, log=lambda m: print(m, file=sys.stderr))
        extra["build"] = {**built, "seconds": round(time.perf_counter() - t, 1)}
        print(json.dumps({"library_build": extra["build"]}), flush=True)
    formatter = Formatter(tokenizer, chat_template=args.chat_template)
    t = time.perf_counter()
    library = load_library(model, args.library)
    extra["library"] = {"path": args.library, "modules": len(library), "load_seconds": round(time.perf_counter() - t, 1)}
    print(json.dumps({"library": extra["library"]}), flush=True)

    for task in tasks:
        t = time.perf_counter()
        row = run_task(task, model, tokenizer, formatter, library, args, out_dir)
        row["task_seconds"] = round(time.perf_counter() - t, 1)
        if "skipped" in row:
            skipped.append(row)
        else:
            rows.append(row)
            rows.sort(key=lambda r: order[r["task"]])  # resumed or not, the table follows --tasks
        print(json.dumps(row), flush=True)
        print(f"# {task}: {row['task_seconds']} s (total {time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        write_results(out_dir, args, rows, skipped, extra)
    table = write_results(out_dir, args, rows, skipped, extra)
    print(table, flush=True)
    print(f"# results: {out_dir / 'results.json'}, {out_dir / 'results.md'}; {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)


if __name__ == "__main__":
    main()

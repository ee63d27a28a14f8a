"""Build a LoraHub module library: one LoRA module per task, trained with one recipe.

`build_library` writes `OUTPUT/<module>/` (a peft LoRA adapter whose config carries the module's
metadata under "efftune") and `OUTPUT/library.json` (an index, rewritten atomically after every
module). Scratch state (metrics, checkpoints) lives in `OUTPUT/_runs/<module>/`, which holds no
adapter_config.json, so `load_library(model, OUTPUT)` sees only the modules.

Resuming is the default: a finished module is never retrained, and an unfinished one continues
from its last checkpoint. Checkpoints are per module and in `train()`'s format, so a build may
resume with another `together`.

**k modules at once** (`together=k`): every step takes each task's `batch_size` examples exactly
as `train()` alone would (same seeded order), lays each task's examples out in rows of its own,
and runs all rows in one forward/backward over the frozen base under `mixed_adapter_batch`, so a
row only goes through its task's adapter. The loss is `Σ_task (answer NLL of the task) / (answer
tokens of the task)`; adapters share no parameters, so each gets exactly its own loss's gradient.
Gradient clipping is per module and each module has its own AdamW (same hyperparameters as
`train()`), so with the same per-task batches and learning rate, k-at-once equals one-by-one up to
float rounding (reduction order and padding change the last bits). What is *not* equal: dropout
masks (drawn from one RNG stream in another order; use dropout 0 for equality), and wall-clock
metadata (`seconds` of a module trained with others is the shared time of those steps).
"""
from __future__ import annotations

import json
import math
import re
import shutil
import time
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm import tqdm

from ..data import Encoded, Example, Formatter, MultipleChoice, load_jsonl, load_task, split_examples
from ..data.layout import collate, training_rows
from ..data.tokenize import IGNORE, truncation_note
from ..errors import CheckpointError, ConfigError, DataError, EfftuneError, TrainingDiverged
from ..eval.logprobs import target_logprobs
from ..eval.multiple_choice import multiple_choice_accuracy, score_rows
from ..io import (CONFIG_FILE, WEIGHTS_FILE, base_model_name, read_adapter_config, save_adapter,
                  write_text_atomically)
from ..methods.attach import find_targets
from ..methods.lora import (LoraConfig, add_lora, check_ranks, delete_adapter, lora_layers, mixed_adapter_batch,
                            set_active_adapters, set_trainable_adapters)
from ..train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ..train.loop import (TrainConfig, TrainHooks, autocast_for, clip_grad_norm, enable_activation_checkpointing,
                          example_order, make_optimizer, prune_checkpoints, train)
from ..train.seed import seed_everything

INDEX_FILE = "library.json"
WORK_DIR = "_runs"
# the TrainConfig fields that change what a module learns (others change only speed or logging)
RECIPE_KEYS = ("steps", "batch_size", "lr", "weight_decay", "warmup_steps", "min_lr_ratio", "grad_clip",
               "precision", "seed")


@dataclass
class LibraryTask:
    name: str                     # module, adapter and directory name
    source: str                   # the BIG-bench task name or the JSONL path it came from
    train: list[Example]
    held_out: list[MultipleChoice]  # multiple-choice held-out examples (empty: no evaluation)


def module_name(entry: str) -> str:
    """A task entry -> a directory/adapter name: BIG-bench `parent/sub` -> `parent__sub`, a JSONL
    path (ending .jsonl or .json) -> its stem; other characters outside [A-Za-z0-9_-] become `_`."""
    name = Path(entry).stem if _is_jsonl(entry) else entry.replace("/", "__")
    return re.sub(r"[^\w-]", "_", name)


def _is_jsonl(entry: str) -> bool:
    return entry.endswith((".jsonl", ".json"))  # anything else is a BIG-bench name (`parent/sub` too)


def read_tasks_file(path: str | Path) -> list[str]:
    """One task (BIG-bench name or JSONL path) a line; blank lines and `#` comments skipped."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"hub build: tasks file {path} does not exist")
    return [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()
            if line.split("#", 1)[0].strip()]


def resolve_tasks(tasks: Sequence[str], eval_size: int | float | None = None, seed: int = 0) -> list[LibraryTask]:
    """Load every task's examples and held-out split before anything trains (bad names fail early).

    BIG-bench tasks use the split `efftune train` uses (seed 0, `eval_size` held out), so
    `efftune eval --task T` scores the same examples; JSONL files are split with `seed`.
    """
    tasks = [t.strip() for t in tasks if t and t.strip()]
    if not tasks:
        raise ConfigError("hub build: no tasks given (pass --tasks t1,t2 or --tasks-file FILE)")
    seen: dict[str, str] = {}
    for entry in tasks:  # name clashes first: they are cheaper to find than a missing task
        name = module_name(entry)
        if name in seen:
            raise ConfigError(f"hub build: tasks {seen[name]!r} and {entry!r} would both be module {name!r}")
        seen[name] = entry
    out = []
    for name, entry in seen.items():
        if _is_jsonl(entry):
            train_set, held_out = split_examples(load_jsonl(entry), eval_size, seed=seed, source=entry,
                                               strict=len(seen) == 1)
        else:
            try:
                train_set, held_out = split_examples(load_task(entry), eval_size, seed=0, source=f"task {entry}",
                                                   strict=len(seen) == 1)
            except DataError as exc:
                raise DataError(f"hub build: {exc}") from None
        if not train_set:
            raise DataError(f"hub build: task {entry!r} has no training examples")
        out.append(LibraryTask(name, entry, train_set, [e for e in held_out if isinstance(e, MultipleChoice)]))
    return out


def recipe(lora_cfg: LoraConfig, train_cfg: TrainConfig) -> dict:
    """What every module of a library must share; a resumed build must ask for the same."""
    both = {"lora": asdict(lora_cfg), "train": {k: getattr(train_cfg, k) for k in RECIPE_KEYS}}
    return json.loads(json.dumps(both))  # as library.json will hold it (tuples become lists)


def is_complete(directory: Path) -> bool:
    """A module directory is complete when both adapter files are there (they are written to a
    temporary directory and renamed into place, so never half-written)."""
    return (directory / CONFIG_FILE).is_file() and (directory / WEIGHTS_FILE).is_file()


def write_index(output_dir: Path, build: dict) -> dict:
    """Rewrite `library.json` from the module directories present (atomically): efftune modules
    with their metadata, adapters made elsewhere marked external."""
    modules = {}
    subs = [p for p in output_dir.iterdir() if p.is_dir() and not p.name.endswith((".tmp", ".old"))]
    for sub in sorted(p for p in subs if is_complete(p)):
        cfg = json.loads((sub / CONFIG_FILE).read_text())
        meta = (cfg.get("efftune") or {}).get("library")
        modules[sub.name] = {"path": sub.name, **meta} if meta else \
            {"path": sub.name, "external": True, "r": cfg.get("r"), "lora_alpha": cfg.get("lora_alpha")}
    index = {"format": "efftune-lora-library", "version": 1, **build, "modules": modules,
             "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_text_atomically(output_dir / INDEX_FILE, json.dumps(index, indent=2))
    return index


# ---- training k modules at once -------------------------------------------------------------------

def _adapter_params(model: nn.Module, name: str) -> list[torch.Tensor]:
    """The adapter's parameters in model order (the order train() builds its optimizer in)."""
    own = {id(p) for _, layer in lora_layers(model) if name in layer.adapters
           for p in layer.adapters[name].parameters()}
    return [p for p in model.parameters() if id(p) in own]


@contextmanager
def _only_trainable(model: nn.Module, name: str, everyone: list[str]):
    """Checkpoints hold 'the trainable parameters': narrow them to one module while saving/loading."""
    set_trainable_adapters(model, [name])
    try:
        yield
    finally:
        set_trainable_adapters(model, everyone)


def _read_rows(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.is_file() else []


def _append_row(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def train_together(model: nn.Module, sequences: dict[str, Sequence[Encoded]], config: TrainConfig,
                   work_dir: str | Path, *, pad_id: int = 0,
                   evaluate: Callable[[list[str]], dict[str, dict]] | None = None,
                   on_step: Callable[[list[str], int], None] | None = None) -> None:
    """Train the attached adapters named by `sequences`' keys at once, each on its own sequences.

    Each adapter's run lives in `work_dir/<name>/` (metrics.jsonl, checkpoints/) in `train()`'s
    format and resumes from its own latest checkpoint; adapters at different steps train
    together from the step each is at. `evaluate(names)` -> {name: metrics} runs before step 1
    (adapters starting fresh) and after the last step; `on_step(names, done)` after each step.
    """
    names = list(sequences)
    if not names:
        raise ConfigError("train_together: no adapters to train")
    work_dir = Path(work_dir)
    device = next(model.parameters()).device
    attention = getattr(getattr(model, "config", None), "_attn_implementation", "sdpa") or "sdpa"
    set_trainable_adapters(model, names)
    params = {n: _adapter_params(model, n) for n in names}
    # train()'s optimizer, one per module, so a module's checkpoints load in either
    optimizers = {n: make_optimizer(params[n], config, device) for n in names}
    if config.activation_checkpointing:
        enable_activation_checkpointing(model)
    torch.manual_seed(config.seed)

    start: dict[str, int] = {}
    for n in names:  # resume each module from its own checkpoint
        (work_dir / n).mkdir(parents=True, exist_ok=True)
        found = latest_checkpoint(work_dir / n / "checkpoints")
        start[n] = 0
        if found is not None:
            with _only_trainable(model, n, names):
                state = load_checkpoint(found, model, optimizers[n])
            if state.get("train_config", {}).get("seed") != config.seed:
                raise CheckpointError(f"checkpoint {found} was made with another seed; resume needs the same config")
            start[n] = state["step"]
        rows = [r for r in _read_rows(work_dir / n / "metrics.jsonl") if r.get("step", 0) <= start[n]]
        (work_dir / n / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def run_eval(which: list[str], step: int) -> None:
        if not evaluate or not which:
            return
        model.eval()
        for n, result in evaluate(which).items():
            _append_row(work_dir / n / "metrics.jsonl", {"eval": True, "step": step, **result})
        model.train()

    run_eval([n for n in names if start[n] == 0], 0)
    model.train()
    micro = config.micro_batch_size or config.batch_size
    first = min(start.values())
    bar = tqdm(total=config.steps, initial=first, desc=f"train {len(names)} modules", unit="step",
               dynamic_ncols=True)
    for step in range(first, config.steps):
        t0 = time.perf_counter()
        live = [n for n in names if start[n] <= step]
        batches = {n: [sequences[n][i] for i in example_order(len(sequences[n]), config.seed,
                                                              step * config.batch_size, config.batch_size)]
                   for n in live}
        n_targets = [sum(1 for s in batches[n] for t in s.labels if t != IGNORE) for n in live]
        lr = config.lr * TrainHooks().lr_multiplier(step, config)
        for n in live:
            for g in optimizers[n].param_groups:
                g["lr"] = lr
        totals = [0.0] * len(live)
        for m0 in range(0, config.batch_size, micro):
            rows, owner = [], []
            for j, n in enumerate(live):  # a row never mixes tasks: it goes through one adapter
                part = training_rows(batches[n][m0:m0 + micro], config.max_length)
                rows += part
                owner += [j] * len(part)
            inputs = collate(rows, pad_id, attention).to(device)
            task_of_row = torch.tensor(owner, device=device)
            with mixed_adapter_batch(model, [live[j] for j in owner]):
                with autocast_for(config.precision, device):
                    logp = target_logprobs(model, inputs.input_ids, inputs.rows, inputs.sources, inputs.targets,
                                           inputs.position_ids, inputs.mask)
                scale = torch.tensor([1.0 / t for t in n_targets], dtype=logp.dtype, device=device)
                per_task = torch.zeros(len(live), dtype=logp.dtype, device=device).index_add(
                    0, task_of_row[inputs.rows], -logp) * scale
                per_task.sum().backward()  # inside the context: checkpointed layers recompute here
            totals = [a + b for a, b in zip(totals, per_task.tolist())]
        bad = [n for n, t in zip(live, totals) if not math.isfinite(t)]
        if bad:
            bar.close()
            raise TrainingDiverged(f"loss of module(s) {', '.join(bad)} became non-finite at step {step + 1}; "
                                   f"stopped (checkpoints under {work_dir})")
        norms = {}
        for n in live:
            norms[n] = clip_grad_norm(params[n], config.grad_clip)
            optimizers[n].step()
            optimizers[n].zero_grad(set_to_none=True)
        done = step + 1
        if on_step is not None:
            on_step(live, done)
        dt = time.perf_counter() - t0
        step_tokens = sum(len(s) for n in live for s in batches[n])
        for j, n in enumerate(live):
            _append_row(work_dir / n / "metrics.jsonl", {
                "step": done, "loss": round(totals[j], 6), "lr": lr, "grad_norm": round(norms[n], 4),
                "tokens": sum(len(s) for s in batches[n]), "tokens_per_s": round(step_tokens / dt, 1),
                "seconds": round(dt, 3), "together": len(live)})
        bar.set_postfix(loss=f"{sum(totals) / len(totals):.4f}", lr=f"{lr:.2e}", tok_s=f"{step_tokens / dt:.0f}")
        bar.update(1)
        if (config.save_every and done % config.save_every == 0) or done == config.steps:
            for n in live:
                root = work_dir / n / "checkpoints"
                with _only_trainable(model, n, names):
                    save_checkpoint(root / f"step-{done:06d}", model, optimizers[n], done,
                                    {"train_config": asdict(config)})
                prune_checkpoints(root, config.keep_checkpoints)
    bar.close()
    run_eval(names, config.steps)


@torch.no_grad()
def accuracies_together(model: nn.Module, formatter: Formatter, examples: dict[str, Sequence[MultipleChoice]],
                        row_tokens: int = 512, rows_per_batch: int = 4) -> dict[str, float]:
    """Multiple-choice accuracy of each adapter on its own examples, every adapter in the same
    forward passes (`rows_per_batch` rows per adapter per pass); as `multiple_choice_accuracy`
    with that adapter alone active, up to rounding."""
    device = next(model.parameters()).device
    attention = getattr(getattr(model, "config", None), "_attn_implementation", "sdpa") or "sdpa"
    rows, owner = [], []
    for n, exs in examples.items():
        part = score_rows(formatter, list(exs), row_tokens)
        rows += part
        owner += [n] * len(part)
    totals: dict[tuple[str, int, int], float] = {}
    step = rows_per_batch * len(examples)
    for s in range(0, len(rows), step):
        batch = collate(rows[s:s + step], formatter.tokenizer.pad_token_id, attention).to(device)
        with mixed_adapter_batch(model, owner[s:s + step]):
            lp = target_logprobs(model, batch.input_ids, batch.rows, batch.sources, batch.targets,
                                 batch.position_ids, batch.mask).tolist()
        for r, (i, j), value in zip(batch.rows.tolist(), batch.tags, lp):
            key = (owner[s + r], i, j)
            totals[key] = totals.get(key, 0.0) + value
    out = {}
    for n, exs in examples.items():
        hits = 0
        for i, ex in enumerate(exs):
            scores = [totals[(n, i, j)] for j in range(len(ex.choices))]
            hits += max(range(len(scores)), key=scores.__getitem__) in ex.correct
        out[n] = round(hits / len(exs), 4) if exs else float("nan")
    return out


# ---- the build --------------------------------------------------------------------------------------

class _StepHook(TrainHooks):
    """train()'s plain schedule plus a callback after each step (progress, tests' interruptions)."""

    def __init__(self, names: list[str], on_step):
        self.names, self.on_step = names, on_step

    def after_step(self, done, optimizer):
        if self.on_step is not None:
            self.on_step(self.names, done)
        return {}


def _init_seed(seed: int, name: str) -> int:
    """Each module's initial A depends only on (seed, name), not on which modules train beside it."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**31


def _outcome(rows: list[dict], steps: int) -> dict:
    evals = [r for r in rows if r.get("eval")]
    before = next((r.get("accuracy") for r in evals if r["step"] == 0), None)
    after = next((r.get("accuracy") for r in reversed(evals) if r["step"] == steps), None)
    losses = [r for r in rows if "loss" in r and not r.get("eval")]
    return {"accuracy_before": before, "accuracy_after": after,
            "final_loss": losses[-1]["loss"] if losses else None,
            "seconds": round(sum(r.get("seconds", 0.0) for r in losses), 2)}


def _training_tokens(seqs: Sequence[Encoded], config: TrainConfig) -> int:
    """Tokens of the examples every step trains on (the same with any `together` or resume)."""
    order = example_order(len(seqs), config.seed, 0, config.steps * config.batch_size)
    return sum(len(seqs[i]) for i in order)


def build_library(model_source, tasks: Sequence[str], output_dir: str | Path,
                  lora_cfg: LoraConfig | None = None, train_cfg: TrainConfig | None = None, *,
                  together: int = 1, eval_size: int | float | None = None, chat_template: bool = False,
                  dtype: str = "auto", device: str = "auto",
                  on_step: Callable[[list[str], int], None] | None = None, log=print) -> dict:
    """Train one LoRA module per task into `output_dir` (see the module docstring); returns a summary.

    `model_source`: a model name/path for `efftune.models.load_model`, or a `(model, tokenizer)`
    pair (its adapters are removed again afterwards). `tasks`: BIG-bench names and/or JSONL paths.
    `together`: modules trained at once (1: each with `train()`). Evaluation is before and after
    training only (`train_cfg.eval_every` is ignored); `eval_size=0` skips it.
    """
    lora_cfg = lora_cfg or LoraConfig()
    train_cfg = replace(train_cfg or TrainConfig(), eval_every=0)
    if not isinstance(together, int) or together < 1:
        raise ConfigError(f"hub build: together must be a positive integer, got {together!r}")
    specs = resolve_tasks(tasks, eval_size, train_cfg.seed)  # all data errors before any training
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise EfftuneError(f"hub build: --output {output_dir} is a file, not a directory; name a directory "
                           "for the library")
    want = recipe(lora_cfg, train_cfg)
    pending, skipped = [], []
    for spec in specs:
        d = output_dir / spec.name
        if is_complete(d):
            meta = (read_adapter_config(d).get("efftune") or {}).get("library")
            if meta and meta.get("recipe") != want:
                raise ConfigError(f"hub build: module {d} was built with another recipe ({meta.get('recipe')}); "
                                  "use another --output or delete that module")
            skipped.append(spec.name)
        elif d.exists():
            raise EfftuneError(f"hub build: {d} exists but is not a LoRA module; move it away")
        else:
            pending.append(spec)
    if skipped:
        log(f"hub build: {len(skipped)} module(s) already built, skipped: {', '.join(skipped)}")

    t0 = time.perf_counter()
    index_path = output_dir / INDEX_FILE
    previous = json.loads(index_path.read_text()).get("base_model") if index_path.is_file() else None
    if not pending:  # nothing to train: no need to load the model
        index = write_index(output_dir, {"base_model": previous, "recipe": want})
        return {"output": str(output_dir), "index": str(index_path), "built": [], "skipped": skipped,
                "modules": len(index["modules"]), "together": together, "seconds": 0.0}
    if isinstance(model_source, tuple):
        model, tokenizer = model_source
    else:
        from ..models import load_model
        model, tokenizer = load_model(model_source, dtype=dtype, device=device)
    build = {"base_model": base_model_name(model), "recipe": want}
    if previous and skipped and previous != build["base_model"]:
        raise ConfigError(f"hub build: {output_dir} holds modules of base model {previous!r}, not "
                          f"{build['base_model']!r}; use another --output")
    # what the model cannot take (a rank above a target's smaller side) fails before the first write
    check_ranks(model, find_targets(model, lora_cfg.target_modules) if lora_cfg.target_modules else [], lora_cfg.r,
                {})
    output_dir.mkdir(parents=True, exist_ok=True)
    write_index(output_dir, build)
    with _model_state_kept(model):
        built = _build_pending(model, tokenizer, pending, output_dir, build, want, lora_cfg, train_cfg,
                               together, chat_template, on_step, log)
    index = write_index(output_dir, build)
    return {"output": str(output_dir), "index": str(output_dir / INDEX_FILE), "built": built,
            "skipped": skipped, "modules": len(index["modules"]), "together": together,
            "seconds": round(time.perf_counter() - t0, 1)}


@contextmanager
def _model_state_kept(model: nn.Module):
    """A model passed in keeps its own adapters as they were: which are active, which train."""
    active = list(dict.fromkeys(n for _, layer in lora_layers(model) for n in layer.active))
    trains = {id(p): p.requires_grad for p in model.parameters()}
    try:
        yield
    finally:
        set_active_adapters(model, active)
        for p in model.parameters():
            if id(p) in trains:
                p.requires_grad_(trains[id(p)])


def _build_pending(model, tokenizer, pending, output_dir: Path, build: dict, want: dict, lora_cfg, train_cfg,
                   together: int, chat_template: bool, on_step, log) -> list[str]:
    """Train and save every pending module, `together` at a time; returns their names."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    formatter = Formatter(tokenizer, chat_template=chat_template, max_length=train_cfg.max_length)
    work = output_dir / WORK_DIR
    built = []
    for g in range(0, len(pending), together):
        group = pending[g:g + together]
        names = [s.name for s in group]
        log(f"hub build: training {', '.join(names)} ({g + len(group)}/{len(pending)})")
        seqs = {s.name: [formatter.encode(e) for e in s.train] for s in group}
        for n in names:
            if note := truncation_note(seqs[n], train_cfg.max_length, f"training examples of {n}"):
                log(f"hub build: {note}")
        for n in names:
            seed_everything(_init_seed(train_cfg.seed, n))
            add_lora(model, lora_cfg, adapter=n)
        try:
            _train_group(model, group, seqs, formatter, train_cfg, work, pad_id, on_step)
            for s in group:
                rows = _read_rows(work / s.name / "metrics.jsonl")
                out = _outcome(rows, train_cfg.steps)
                if s.held_out and out["accuracy_after"] is None:  # stopped between last checkpoint and eval
                    set_active_adapters(model, s.name)
                    out["accuracy_after"] = round(multiple_choice_accuracy(model, formatter, s.held_out), 4)
                meta = {"task": s.source, "steps": train_cfg.steps, "examples": len(s.train),
                        "eval_examples": len(s.held_out), **out,
                        "tokens": _training_tokens(seqs[s.name], train_cfg),
                        "trained_with": names, "recipe": want}
                save_adapter(model, output_dir / s.name, lora_cfg, adapter=s.name,
                             metadata={"tasks": [s.source], "steps": train_cfg.steps, "library": meta})
                shutil.rmtree(work / s.name / "checkpoints", ignore_errors=True)  # the module is the result
                write_index(output_dir, build)
                built.append(s.name)
                log(f"hub build: {s.name}: accuracy {out['accuracy_before']} -> {out['accuracy_after']}, "
                    f"loss {out['final_loss']}, {out['seconds']} s")
        finally:
            for n in names:
                delete_adapter(model, n)
    return built


def _train_group(model, group: list[LibraryTask], seqs: dict, formatter: Formatter, cfg: TrainConfig,
                 work: Path, pad_id: int, on_step) -> None:
    names = [s.name for s in group]
    if len(group) == 1:  # one module: the plain training loop, as `efftune train` runs it
        s = group[0]
        set_active_adapters(model, s.name)
        evaluate = (lambda m: {"accuracy": round(multiple_choice_accuracy(m, formatter, s.held_out), 4)}) \
            if s.held_out else None
        resume = latest_checkpoint(work / s.name / "checkpoints") is not None
        train(model, seqs[s.name], cfg, work / s.name, pad_id=pad_id, resume=resume, evaluate=evaluate,
              hooks=_StepHook(names, on_step))
        return
    set_active_adapters(model, names)
    held_out = {s.name: s.held_out for s in group if s.held_out}
    evaluate = (lambda which: {n: {"accuracy": a} for n, a in accuracies_together(
        model, formatter, {n: held_out[n] for n in which if n in held_out}).items()}) if held_out else None
    train_together(model, seqs, cfg, work, pad_id=pad_id, evaluate=evaluate, on_step=on_step)


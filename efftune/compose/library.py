"""Build a LoraHub module library: one LoRA module per task, trained with one recipe.

`build_library` writes `OUTPUT/<module>/` (a peft LoRA adapter whose config carries the module's
metadata under "efftune") and `OUTPUT/library.json` (an index, rewritten atomically after every
module). Scratch state (metrics, checkpoints) lives in `OUTPUT/_runs/<module>/`, which holds no
adapter_config.json, so `load_library(model, OUTPUT)` sees only the modules.

Resuming is the default: a finished module is never retrained, and an unfinished one continues
from its last checkpoint. Checkpoints are per module and in `train()`'s format, so a build may
resume with another `together`.

**k modules at once** (`together=k`) is `efftune.train.loop.train`'s k-adapter mode (everything
the loop does applies: compile, CUDA graphs, FP8 base, attention kernels, MoE balance losses,
checkpoints, signals): every step takes each task's `batch_size` examples exactly as training the
module alone would (same seeded order), lays each task's examples out in rows of its own, and
runs all rows in one forward/backward over the frozen base, each row through its own task's
adapter. The loss is `Σ_task (answer NLL of the task) / (answer tokens of the task)`; adapters
share no parameters, so each gets exactly its own loss's gradient, and gradient clipping and
AdamW act per module, so k-at-once equals one-by-one up to float rounding (reduction order and
padding change the last bits). What is *not* equal: dropout masks (drawn from one RNG stream in
another order; use dropout 0 for equality), and wall-clock metadata (`seconds` of a module
trained with others is the shared time of those steps).

**Under torchrun** (`efftune hub build --nproc N`, or `torchrun ... -m efftune hub build`) every rank
runs the build and each group of modules trains through `train()` across the ranks as `efftune train`
does (`train.distributed: ddp`: each step's global batch split over the ranks, rank 0's model sent to
the others, which build theirs on the meta device). Evaluations are sharded as `efftune train`'s under
ddp (each rank scores every N-th held-out example, the hits are summed), and rank 0 alone writes the
index, the modules, the runs' files and the log. `train.distributed: fsdp` is refused
(`check_distributed`): FSDP2 shards the model in place (its blocks become FSDP modules, the base
weights shards), and there is no undoing that for the next group, whose adapters would attach to
the sharded model.
"""
from __future__ import annotations

import itertools
import json
import re
import shutil
import time
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from ..attach import find_targets
from ..data import Encoded, Example, Formatter, MultipleChoice, load_jsonl, load_task, split_examples
from ..data.layout import collate
from ..data.tokenize import truncation_note
from ..errors import CheckpointError, ConfigError, DataError, EfftuneError
from ..eval.multiple_choice import multiple_choice_accuracy, score_rows
from ..files import CONFIG_FILE, WEIGHTS_FILE, base_model_name, write_text_atomically
from ..forward.logprobs import target_logprobs
from ..forward.options import DEFAULT, ForwardOptions
from ..methods.hooks import TrainHooks
from ..methods.lora.config import LoraConfig
from ..methods.lora.layer import adapter_names, lora_layers, mixed_adapter_batch
from ..methods.lora.model import add_lora, check_ranks, delete_adapter, set_active_adapters, set_trainable_adapters
from ..methods.lora.peft_format import read_adapter_config, save_adapter
from ..train.checkpoint import changed_keys, latest_checkpoint, read_state
from ..train import distributed
from ..train.loop import TrainConfig, example_order, read_metrics, train
from ..train.seed import seed_everything

INDEX_FILE = "library.json"
WORK_DIR = "_runs"
# the TrainConfig fields that change what a module learns (others change only speed or logging)
RECIPE_KEYS = ("steps", "batch_size", "lr", "weight_decay", "warmup_steps", "min_lr_ratio", "grad_clip",
               "precision", "seed")


@dataclass
class LibraryTask:
    name: str                     # module and directory name (it trains as a slot's adapter: SLOT)
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


# ---- evaluating k modules at once -------------------------------------------------------------------

def accuracies_together(model: nn.Module, formatter: Formatter, examples: dict[str, Sequence[MultipleChoice]],
                        row_tokens: int = 512, rows_per_batch: int = 4,
                        options: ForwardOptions = DEFAULT) -> dict[str, float]:
    """Multiple-choice accuracy of each adapter on its own examples, every adapter in the same
    forward passes (`rows_per_batch` rows per adapter per pass); as `multiple_choice_accuracy`
    with that adapter alone active, up to rounding. `options`: the forwards' kernels."""
    hits = hits_together(model, formatter, examples, row_tokens, rows_per_batch, options)
    return {n: round(hits[n] / len(exs), 4) if exs else float("nan") for n, exs in examples.items()}


@torch.no_grad()
def hits_together(model: nn.Module, formatter: Formatter, examples: dict[str, Sequence[MultipleChoice]],
                  row_tokens: int = 512, rows_per_batch: int = 4, options: ForwardOptions = DEFAULT) -> dict[str, int]:
    """`accuracies_together`'s counts: {adapter: examples whose best-scored choice is a correct one}."""
    was_training = model.training
    model.eval()  # no dropout
    try:
        return _hits_together(model, formatter, examples, row_tokens, rows_per_batch, options)
    finally:
        model.train(was_training)


def _hits_together(model: nn.Module, formatter: Formatter, examples: dict[str, Sequence[MultipleChoice]],
                   row_tokens: int, rows_per_batch: int, options: ForwardOptions) -> dict[str, int]:
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
                                 batch.position_ids, batch.mask, options=options).tolist()
        for r, (i, j), value in zip(batch.rows.tolist(), batch.tags, lp):
            key = (owner[s + r], i, j)
            totals[key] = totals.get(key, 0.0) + value
    out = {}
    for n, exs in examples.items():
        hits = 0
        for i, ex in enumerate(exs):
            scores = [totals[(n, i, j)] for j in range(len(ex.choices))]
            hits += max(range(len(scores)), key=scores.__getitem__) in ex.correct
        out[n] = hits
    return out


# Under torchrun (ddp: every rank holds the whole model) each rank scores every size-th held-out
# example and the hits are summed over the ranks, as `efftune train`'s evaluator does; every rank
# gets the accuracy over the whole set. Without a process group these score everything.
def _accuracy(model: nn.Module, formatter: Formatter, examples: Sequence[MultipleChoice],
              options: ForwardOptions) -> float:
    """The active adapter's multiple-choice accuracy on `examples` (the ranks' shares summed)."""
    def hits(mine: list[MultipleChoice]) -> list[float]:
        return [round(multiple_choice_accuracy(model, formatter, mine, options=options) * len(mine)) if mine else 0]
    return round(distributed.sum_over_shares(hits, examples)[0] / len(examples), 4)


def _accuracies(model: nn.Module, formatter: Formatter, examples: dict[str, Sequence[MultipleChoice]],
                options: ForwardOptions) -> dict[str, float]:
    """`accuracies_together` over the ranks' shares of each adapter's examples, summed."""
    names = list(examples)

    def hits(*mine: list[MultipleChoice]) -> list[float]:
        found = hits_together(model, formatter, dict(zip(names, mine)), options=options)
        return [found[n] for n in names]
    summed = distributed.sum_over_shares(hits, *examples.values())
    return {n: round(h / len(examples[n]), 4) for n, h in zip(names, summed)}


# ---- the build --------------------------------------------------------------------------------------

class _StepHook(TrainHooks):
    """train()'s plain schedule plus `on_step(modules, done)` after each step, naming the modules
    that trained in it (progress, tests' interruptions); `starts`: each module's first step. Under
    torchrun `on_step` runs on rank 0 only, every rank waiting for it (`distributed.on_main`), so what
    it raises stops every rank after the same step (see `build_library`); `_rank0_on_step` gives the
    other ranks a stand-in where rank 0 has a callback, so that all ranks take part or none."""

    def __init__(self, starts: dict[str, int], on_step):
        self.starts, self.on_step = starts, on_step

    def after_step(self, done, optimizer):
        if self.on_step is not None:
            names = [n for n, start in self.starts.items() if start < done]
            distributed.on_main(lambda: self.on_step(names, done))
        return {}


def _rank0_on_step(on_step: Callable[[list[str], int], None] | None) -> Callable[[list[str], int], None] | None:
    """Rank 0's `on_step` on rank 0; on the other ranks a stand-in that is never called where rank 0
    has one (they learn whether it does: a collective), else None. Without a process group: `on_step`."""
    here = distributed.world()
    if not here.active:
        return on_step
    rank0_has_one = distributed.all_sum([float(here.main and on_step is not None)])[0] > 0
    if here.main:
        return on_step
    return (lambda names, done: None) if rank0_has_one else None  # `distributed.on_main` calls rank 0's only


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
                  dtype: str = "auto", device: str = "auto", resume_changed: bool = False,
                  on_step: Callable[[list[str], int], None] | None = None, log=print) -> dict:
    """Train one LoRA module per task into `output_dir` (see the module docstring); returns a summary.

    `model_source`: a model name/path for `efftune.models.load_model`, or a `(model, tokenizer)`
    pair (its adapters are removed again afterwards). `tasks`: BIG-bench names and/or JSONL paths.
    `together`: modules trained at once (1: each with `train()`). Evaluation is before and after
    training only (`train_cfg.eval_every` is ignored); `eval_size=0` skips it. An unfinished
    module resumes only with the settings its checkpoint was made with (those that change what it
    computes), unless `resume_changed` (as `efftune train --resume-changed`).

    `on_step(modules, done)`: called after each training step with the modules that trained in it and
    the step count (progress); what it raises stops the build after that step (a KeyboardInterrupt: the
    modules' checkpoints are kept and the next build resumes them).

    Under torchrun every rank calls this (see the module docstring; `train_cfg.distributed` must be
    ddp) and gets the summary. `on_step` is rank 0's, as the log is: it runs on rank 0 only (the other
    ranks' `on_step` is never called), the others waiting for it at each step, so an exception it
    raises stops every rank after the same step instead of leaving them waiting in the next one's
    collectives: rank 0 raises it, the others an EfftuneError naming it. The output directory must be
    one every rank sees, as `efftune train`'s: the ranks read the runs' checkpoints and metrics from it.
    """
    lora_cfg = lora_cfg or LoraConfig()
    train_cfg = replace(train_cfg or TrainConfig(), eval_every=0)
    if distributed.launched():
        check_distributed(train_cfg)
    here = distributed.init(device)  # under torchrun: this rank among the others (nothing without it)
    if not here.main:
        log = lambda message: None  # noqa: E731 - one voice: rank 0's
    if not isinstance(together, int) or together < 1:
        raise ConfigError(f"hub build: together must be a positive integer, got {together!r}")
    # all data errors before any training; rank 0 first (a BIG-bench download), the others find it cached
    specs = distributed.main_first(lambda: resolve_tasks(tasks, eval_size, train_cfg.seed))
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
        index = _on_main_index(output_dir, {"base_model": previous, "recipe": want})
        return {"output": str(output_dir), "index": str(index_path), "built": [], "skipped": skipped,
                "modules": len(index["modules"]), "together": together, "seconds": 0.0}
    # every rank's checks above are done before rank 0 writes anything: load_base's main_first waits for
    # them all. As `efftune train` under ddp, only rank 0 reads the weights, but for an FP8 base (every rank)
    model, tokenizer = model_source if isinstance(model_source, tuple) else \
        distributed.load_base(model_source, dtype, device, every_rank=train_cfg.fp8_base)
    build = {"base_model": base_model_name(model), "recipe": want}
    if previous and skipped and previous != build["base_model"]:
        raise ConfigError(f"hub build: {output_dir} holds modules of base model {previous!r}, not "
                          f"{build['base_model']!r}; use another --output")
    # what the model cannot take (a rank above a target's smaller side) fails before the first write
    check_ranks(model, find_targets(model, lora_cfg.target_modules) if lora_cfg.target_modules else [], lora_cfg.r,
                {})
    _on_main_index(output_dir, build)
    on_step = _rank0_on_step(on_step)  # progress from rank 0 only, as the log
    with _model_state_kept(model):
        built = _build_pending(model, tokenizer, pending, output_dir, build, want, lora_cfg, train_cfg,
                               together, chat_template, resume_changed, on_step, log)
    index = _on_main_index(output_dir, build)
    return {"output": str(output_dir), "index": str(output_dir / INDEX_FILE), "built": built,
            "skipped": skipped, "modules": len(index["modules"]), "together": together,
            "seconds": round(time.perf_counter() - t0, 1)}


def check_distributed(train_cfg: TrainConfig) -> None:
    """What a build cannot run under torchrun, refused from the config alone (before any process
    starts under `--nproc`)."""
    if train_cfg.distributed == "fsdp":
        raise ConfigError("hub build cannot run train.distributed fsdp: fsdp shards the model in place for one "
                          "group of modules and cannot undo it, so the next group's adapters would attach to the "
                          "sharded model; use train.distributed ddp (every rank holds the base), or train a module "
                          "whose base needs sharding with efftune train --distributed fsdp")


def _on_main_index(output_dir: Path, build: dict) -> dict:
    """`write_index` by rank 0 (its failure raised on every rank); the other ranks read what it wrote."""
    def write() -> dict:
        output_dir.mkdir(parents=True, exist_ok=True)
        return write_index(output_dir, build)
    return distributed.on_main(write) or json.loads((output_dir / INDEX_FILE).read_text())


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
                   together: int, chat_template: bool, resume_changed: bool, on_step, log) -> list[str]:
    """Train and save every pending module, `together` at a time; returns their names."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    formatter = Formatter(tokenizer, chat_template=chat_template, max_length=train_cfg.max_length)
    work = output_dir / WORK_DIR
    found = {s.name: latest_checkpoint(work / s.name / "checkpoints") for s in pending}
    _check_resumable(found, train_cfg, resume_changed)  # every unfinished module before any trains
    held = {n: _checkpoint_adapter(c) for n, c in found.items()}
    built, done = [], 0
    for group, slots in _slot_groups(pending, held, together, set(adapter_names(model))):
        names = [s.name for s in group]
        done += len(group)
        log(f"hub build: training {', '.join(names)} ({done}/{len(pending)})")
        seqs = {s.name: [formatter.encode(e) for e in s.train] for s in group}
        for n in names:
            if note := truncation_note(seqs[n], train_cfg.max_length, f"training examples of {n}"):
                log(f"hub build: {note}")
        added = []
        try:
            for n in names:
                seed_everything(_init_seed(train_cfg.seed, n))  # the module's name, not its slot's
                add_lora(model, lora_cfg, adapter=slots[n])
                added.append(slots[n])
            _train_group(model, group, slots, seqs, formatter, train_cfg, work, pad_id, resume_changed, on_step)
            for s in group:
                # every rank reads rank 0's metrics (the loop's last collective came after its last row),
                # so all agree on whether the evaluation below, a collective under torchrun, runs
                rows = read_metrics(work / s.name / "metrics.jsonl")
                out = _outcome(rows, train_cfg.steps)
                if s.held_out and out["accuracy_after"] is None:  # stopped between last checkpoint and eval
                    set_active_adapters(model, slots[s.name])
                    out["accuracy_after"] = _accuracy(model, formatter, s.held_out, train_cfg.forward_options())
                meta = {"task": s.source, "steps": train_cfg.steps, "examples": len(s.train),
                        "eval_examples": len(s.held_out), **out,
                        "tokens": _training_tokens(seqs[s.name], train_cfg),
                        "trained_with": names, "recipe": want}
                distributed.on_main(partial(_save_module, model, output_dir, build, s, slots[s.name], lora_cfg,
                                            train_cfg.steps, meta))
                built.append(s.name)
                log(f"hub build: {s.name}: accuracy {out['accuracy_before']} -> {out['accuracy_after']}, "
                    f"loss {out['final_loss']}, {out['seconds']} s")
        finally:
            for a in added:
                delete_adapter(model, a)
    return built


def _save_module(model: nn.Module, output_dir: Path, build: dict, spec: LibraryTask, adapter: str,
                 lora_cfg: LoraConfig, steps: int, meta: dict) -> None:
    """A trained module into `output_dir/<module>/` (rank 0's job), its scratch checkpoints removed and
    the index rewritten."""
    save_adapter(model, output_dir / spec.name, lora_cfg, adapter=adapter,
                 metadata={"tasks": [spec.source], "steps": steps, "library": meta})
    shutil.rmtree(output_dir / WORK_DIR / spec.name / "checkpoints", ignore_errors=True)  # the module is the result
    write_index(output_dir, build)


# A module trains under a slot's adapter name ("slot0", "slot1", ...), not its own: compiled blocks
# (--compile) guard on the adapter names they read (LoraLayer's adapters and active lists), so
# names that changed with every group would compile new graphs for each group until Dynamo's
# recompile limit sends the blocks back to eager. With slots, group after group sees the same
# names and runs the graphs compiled for the first. A module with a checkpoint keeps the adapter
# name its checkpoint holds (its parameters are saved by name), whatever `together` made it then.
SLOT = "slot{}"


def _checkpoint_adapter(checkpoint: Path | None) -> str | None:
    """The adapter name the parameters of a module's checkpoint carry (None: no checkpoint)."""
    if checkpoint is None:
        return None
    for name in itertools.chain.from_iterable(read_state(checkpoint).get("param_names", [])):
        if m := re.search(r"(?:^|\.)adapters\.([^.]+)\.", name):
            return m.group(1)
    raise CheckpointError(f"hub build: checkpoint {checkpoint} holds no LoRA adapter's parameters; "
                          f"move {checkpoint.parent.parent} away to train that module afresh")


def _slot_groups(pending: list[LibraryTask], held: dict[str, str | None], together: int, taken: set[str]
                 ) -> Iterator[tuple[list[LibraryTask], dict[str, str]]]:
    """Groups of up to `together` modules in task order, each with {module: adapter name}: the name
    its checkpoint holds (`held`), else the first slot free in the group and not among the model's
    own adapters (`taken`). Two modules whose checkpoints hold the same name train in different groups."""
    left = list(pending)
    while left:
        group, used = [], set()
        for s in left:
            if len(group) < together and held[s.name] not in used:
                group.append(s)
                if held[s.name] is not None:
                    used.add(held[s.name])
        left = [s for s in left if s not in group]
        free = (SLOT.format(i) for i in itertools.count() if SLOT.format(i) not in used | taken)
        yield group, {s.name: held[s.name] or next(free) for s in group}


def _check_resumable(found: dict[str, Path | None], cfg: TrainConfig, resume_changed: bool) -> None:
    """Refuse to resume a module's checkpoint made with settings that compute differently (as train's
    resume does), unless `resume_changed`; named for hub build, whose resume is the default."""
    for name, checkpoint in found.items():
        if checkpoint is None or resume_changed:
            continue
        changed = changed_keys(read_state(checkpoint).get("train_config", {}), asdict(cfg), "train.")
        if changed:
            raise CheckpointError(f"hub build: module {name}'s checkpoint {checkpoint} was made with another "
                                  f"{', '.join(changed)}; the build resumes a module as it would have run (pass "
                                  "--resume-changed to accept the change, or use another --output)")


def _train_group(model, group: list[LibraryTask], slots: dict[str, str], seqs: dict, formatter: Formatter,
                 cfg: TrainConfig, work: Path, pad_id: int, resume_changed: bool, on_step) -> None:
    """Train the group's modules (module `n` as adapter `slots[n]`), each with its run in
    `work/<module>/`, resuming those that have a checkpoint: one module as `efftune train` trains
    it, several at once (train()'s k-adapter mode)."""
    names = [s.name for s in group]
    set_trainable_adapters(model, [slots[n] for n in names])  # and nothing else: a passed model's own adapters stay
    found = {n: latest_checkpoint(work / n / "checkpoints") for n in names}
    starts = {n: read_state(c)["step"] if c else 0 for n, c in found.items()}
    hooks, resume = _StepHook(starts, on_step), any(found.values())
    options = cfg.forward_options()  # evaluations run with the training forwards' kernels
    if len(group) == 1:
        s = group[0]
        set_active_adapters(model, slots[s.name])
        evaluate = (lambda m, step: {"accuracy": _accuracy(m, formatter, s.held_out, options)}) \
            if s.held_out else None
        train(model, seqs[s.name], cfg, work / s.name, pad_id=pad_id, resume=resume, evaluate=evaluate, hooks=hooks,
              resume_changed=resume_changed)
        return
    held_out = {slots[s.name]: s.held_out for s in group if s.held_out}
    evaluate = (lambda m, which, step: {a: {"accuracy": acc} for a, acc in _accuracies(
        m, formatter, {a: held_out[a] for a in which if a in held_out}, options).items()}) \
        if held_out else None
    train(model, {slots[n]: seqs[n] for n in names}, cfg, work, pad_id=pad_id, resume=resume, evaluate=evaluate,
          hooks=hooks, resume_changed=resume_changed, run_dirs={slots[n]: work / n for n in names})

"""`efftune` on the command line: train, eval, generate, merge, hub build, hub compose, tasks.

Flags override the config file; each flag's help names its config key. Errors print one line
(`--debug` shows the traceback). `train` and `eval` end with one JSON object on stdout.
"""
from __future__ import annotations

import argparse
import difflib
import json
import math
import signal
import sys
import threading
import traceback

from .errors import EfftuneError


def model_flags(p: argparse.ArgumentParser, adapter: bool = True) -> None:
    """The flags that choose the model (and, where one is loaded, the adapter) for the commands
    that take no run config (eval, generate, merge, hub compose); help texts as train's."""
    from .flags import HELP
    p.add_argument("--model", default="default", help=HELP["model"])
    if adapter:
        p.add_argument("--adapter", help="adapter directory of any method (efftune's, or peft's LoRA, IA3, "
                                         "prompt tuning)")
        p.add_argument("--allow-pickle", action="store_true", help="allow loading adapter_model.bin (pickle)")
    p.add_argument("--chat-template", action="store_true", help=HELP["chat_template"])
    p.add_argument("--dtype", default="auto", help=HELP["dtype"])
    p.add_argument("--device", default="auto", help=HELP["device"])


def _eval_size_help(what: str) -> str:
    from .data.examples import DEFAULT_EVAL_SIZE
    return f"{what} (as in training; default {DEFAULT_EVAL_SIZE}, at most half a task)"


# `hub build` takes these config keys (the training part of a run config) from the same flag table;
# train.eval_every is left out: a build evaluates before and after training only
BUILD_KEYS = ("model", "chat_template", "dtype", "device", "eval_size", "lora", "train")
BUILD_LEAVES_OUT = ("train.eval_every",)
BUILD_HELP = {  # what the key means for a library of modules
    "train.steps": "optimizer steps per module",
    "train.batch_size": "examples per step per module",
    "train.micro_batch_size": "examples per module per forward pass (gradient accumulation; 0: the whole batch)",
    "lora.dropout": "LoRA dropout (0 keeps --together k equal to one by one)",
}


def build_flags():
    """The config flags of `efftune hub build`: the `Flag`s of BUILD_KEYS."""
    from .flags import config_flags
    return [f for f in config_flags(BUILD_KEYS) if f.key not in BUILD_LEAVES_OUT]


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (exit status 2, as argparse's own): its usage block
    would add several. Subcommands get this class too (add_subparsers uses the parent's).

    `populate(parser)` adds flags when this parser is first used: the config flags need the config
    dataclasses, whose modules import torch and transformers (seconds), which `efftune tasks` or
    `efftune --help` need not wait for."""

    def __init__(self, *args, populate=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._populate = populate

    def populated(self) -> "Parser":
        """This parser with all its flags."""
        if self._populate is not None:
            populate, self._populate = self._populate, None
            populate(self)
        return self

    def parse_known_args(self, args=None, namespace=None):
        return super(Parser, self.populated()).parse_known_args(args, namespace)

    def format_help(self) -> str:
        return super(Parser, self.populated()).format_help()

    def error(self, message: str):
        self.exit(2, f"efftune: error: {message} (see `{self.prog} --help`)\n")

    def parse_args(self, args=None, namespace=None):
        # argparse reports a subcommand's unknown flags from the top parser; report them from the
        # subcommand's, with the flag meant where one is close ("--stpes": did you mean --steps?)
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            chosen = self._chosen(ns)
            flags = [o for a in chosen._actions for o in a.option_strings]
            guesses = [m for e in extras if e.startswith("-")
                       for m in difflib.get_close_matches(e.split("=", 1)[0], flags, n=1)]
            hint = f"; did you mean {', '.join(guesses)}?" if guesses else ""
            chosen.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return ns

    def _chosen(self, ns) -> argparse.ArgumentParser:
        """The (sub)command parser the parsed arguments ended in (`efftune hub build`'s, ...)."""
        parser = self
        while True:
            subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
            name = getattr(ns, subs[0].dest, None) if subs else None
            if name not in (subs[0].choices if subs else {}):
                return parser
            parser = subs[0].choices[name]


def add_config_flags(p: argparse.ArgumentParser, flags, help_overrides=None, notes=None) -> None:
    from .flags import add_config_flags
    add_config_flags(p, flags, help_overrides, notes)


def config_flags(keys=None):
    from .flags import config_flags
    return config_flags(keys)


def parser() -> Parser:
    """The command line. Each subcommand's flags are added when it is parsed (Parser.populate)."""
    p = Parser(prog="efftune", description="Efficient fine-tuning of causal language models.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command")
    sub.add_parser("train", help="fine-tune (no arguments: LoRA on the embedded default model and task)",
                   populate=_train_flags,
                   usage="efftune train [--config FILE] [--resume | --resume-changed] [--overwrite] [--debug] "
                         "[--KEY VALUE ...]",
                   description="Fine-tune a model. Every config key is a flag (--KEY, --SECTION.KEY; train.* "
                               "keys without their section: --steps; data.* as --data-KEY: --data-train-on) that overrides the --config YAML file; "
                               "each flag's help ends with its key and default.")
    sub.add_parser("eval", help="accuracy (multiple choice) or perplexity of a model, with an adapter or not",
                   populate=_eval_flags)
    sub.add_parser("generate", help="greedy generation", populate=_generate_flags)
    sub.add_parser("merge", help="merge LoRA adapters (linear, TIES, DARE) into one adapter or a full model",
                   populate=_merge_flags)
    h = sub.add_parser("hub", help="LoraHub: build a library of LoRA modules (one per task) and compose it "
                                   "for a new task from a few examples")
    hsub = h.add_subparsers(dest="hub_command", required=True)
    hsub.add_parser("compose", help="search weights for the library's modules on a few examples (gradient-free) "
                                    "and save the composition as one LoRA adapter", populate=_compose_flags)
    hsub.add_parser("build", help="train a library of LoRA modules, one per task (k at once), for hub compose; "
                                  "resumes an interrupted build", populate=_build_flags,
                    usage="efftune hub build (--tasks T1,T2,... | --tasks-file FILE) --output LIB [--together K] "
                          "[--resume-changed] [--nproc N] [--debug] [--KEY VALUE ...]",
                    description="Train a library of LoRA modules, one per task. The training flags are "
                                "`efftune train`'s, with the same defaults; the config key is given in brackets.")
    k = sub.add_parser("tasks", help="list BIG-bench tasks with their kind and size")
    k.add_argument("--kind", choices=["multiple_choice", "generative", "mixed"], help="only this kind")
    k.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _train_flags(t: argparse.ArgumentParser) -> None:
    from .flags import add_config_flags, config_flags
    t.add_argument("--config", help="YAML run config (keys as in the brackets below)")
    t.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    t.add_argument("--resume-changed", action="store_true",
                   help="like --resume, but accept config values that change what the run computes (--lr, "
                        "--data, --steps, ...); the summary lists them")
    t.add_argument("--overwrite", action="store_true",
                   help="replace an existing run in --output (it is kept until the new run's first checkpoint)")
    t.add_argument("--debug", action="store_true", help="show tracebacks")
    from .launch import add_flags
    add_flags(t)  # --nproc, and torchrun's flags for several machines
    add_config_flags(t, config_flags())


def _eval_flags(e: argparse.ArgumentParser) -> None:
    model_flags(e)
    e.add_argument("--task", help="BIG-bench task(s), comma-separated: scored on the held-out split")
    e.add_argument("--data", help="JSONL file to score (all rows)")
    e.add_argument("--eval-size", type=int, help=_eval_size_help("held-out examples per task"))
    e.add_argument("--retention", help="a retention panel to score (forgetting): default (= default-v1) or "
                                       "BIG-bench task names, comma-separated")
    e.add_argument("--debug", action="store_true", help="show tracebacks")


def _generate_flags(g: argparse.ArgumentParser) -> None:
    model_flags(g)
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (at least 1)")
    g.add_argument("--task", help="with a prompt-tuning adapter holding a prompt per task: the task whose prompt "
                                  "leads the text")
    g.add_argument("prompt")
    g.add_argument("--debug", action="store_true", help="show tracebacks")


def _merge_flags(m: argparse.ArgumentParser) -> None:
    model_flags(m, adapter=False)
    m.add_argument("--allow-pickle", action="store_true", help="allow loading adapter_model.bin (pickle)")
    m.add_argument("--adapters", required=True, help="adapter directories, comma-separated")
    m.add_argument("--weights", help="one weight per adapter, comma-separated (default: all 1)")
    m.add_argument("--combine", default="linear", choices=["linear", "ties", "dare_linear", "dare_ties"],
                   help="how the updates are combined")
    m.add_argument("--rank", type=int, help="rank of the merged adapter (default: the largest input rank)")
    m.add_argument("--density", type=float, default=0.5, help="TIES: fraction of entries kept per update")
    m.add_argument("--drop", type=float, default=0.5, help="DARE: drop probability")
    m.add_argument("--seed", type=int, default=0, help="DARE: random seed")
    m.add_argument("--output", required=True, help="directory for the merged adapter (or model)")
    m.add_argument("--overwrite", action="store_true", help="replace a non-empty --output directory (once the "
                                                            "new output is completely written)")
    m.add_argument("--full-model", action="store_true",
                   help="write a whole transformers model with the merge folded in")
    m.add_argument("--debug", action="store_true", help="show tracebacks")


def _compose_flags(c: argparse.ArgumentParser) -> None:
    model_flags(c, adapter=False)
    c.add_argument("--library", required=True,
                   help="directory whose subdirectories are LoRA adapters (efftune's or peft's), one per module")
    c.add_argument("--examples", help="JSONL file of few-shot examples (all rows are used)")
    c.add_argument("--task", help="BIG-bench task: --shots examples drawn from its training split")
    c.add_argument("--shots", type=int, default=5, help="with --task: few-shot examples drawn (seeded)")
    c.add_argument("--eval-data", help="JSONL multiple-choice examples to report held-out accuracy on "
                                       "(default with --task: its held-out split)")
    c.add_argument("--eval-size", type=int, help=_eval_size_help("with --task: held-out examples"))
    c.add_argument("--max-modules", type=int, default=20, help="modules sampled from the library (seeded)")
    c.add_argument("--budget", type=int, default=40, help="objective evaluations (forward passes) of the search")
    c.add_argument("--optimizer", default="NGOpt", help="nevergrad optimizer name")
    c.add_argument("--regularization", type=float, default=0.05, help="weight of mean|w| in the objective")
    c.add_argument("--seed", type=int, default=0, help="module sampling, shot sampling and optimizer seed")
    c.add_argument("--output", required=True, help="directory for the composed adapter (or model)")
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty --output directory (once the "
                                                            "new output is completely written)")
    c.add_argument("--full-model", action="store_true", help="write a whole transformers model with it merged in")
    c.add_argument("--debug", action="store_true", help="show tracebacks")


def _build_flags(b: argparse.ArgumentParser) -> None:
    """`efftune hub build` (run by _hub_build): its own flags, then train's for the training part."""
    from .flags import add_config_flags
    tasks = b.add_mutually_exclusive_group(required=True)
    tasks.add_argument("--tasks", help="BIG-bench task names and/or JSONL files, comma-separated")
    tasks.add_argument("--tasks-file", help="file with one task (BIG-bench name or JSONL path) a line")
    b.add_argument("--output", required=True, help="library directory: one LoRA module per task + library.json")
    b.add_argument("--together", type=int, default=1,
                   help="modules trained at once in one forward/backward (each example through its own module)")
    b.add_argument("--resume-changed", action="store_true",
                   help="resume unfinished modules even where a setting that changes what they compute (--lr, "
                        "--max-length, ...) differs from their checkpoint's (a build resumes by default)")
    b.add_argument("--debug", action="store_true", help="show tracebacks")
    from .launch import add_flags
    add_flags(b)  # --nproc, and torchrun's flags for several machines, as train's
    add_config_flags(b, build_flags(), BUILD_HELP, notes={})


def train_config(args: argparse.Namespace):
    """`efftune train`'s run config: the --config file with the flags given over it."""
    from .config import load_config
    from .flags import config_flags, overrides_from

    # the LoRA aliases (--rank, ...) set the section of the method in use (lora_fa.r with --method lora-fa)
    method = getattr(args, "method", None) or load_config(args.config).method
    return load_config(args.config, overrides_from(args, config_flags(), method))


def build_config(args: argparse.Namespace):
    """`efftune hub build`'s run config (model, eval_size, lora, train): its flags, checked as train's."""
    from .config import load_config
    from .flags import overrides_from
    return load_config(None, overrides_from(args, build_flags()))


def _train(args) -> dict | None:
    """The run's summary; None on the ranks other than 0 under torchrun (rank 0 prints it)."""
    from .finetune import run
    from .train import distributed
    try:
        summary = run(train_config(args), overwrite=args.overwrite, resume=args.resume,
                      resume_changed=args.resume_changed, log=lambda m: print(m, file=sys.stderr))
        return summary if distributed.world().main else None
    finally:
        distributed.finish()


def _launches(args, command: str) -> bool:
    """The commands that run under torchrun and take --nproc: train and hub build."""
    return command == "train" or (command == "hub" and args.hub_command == "build")


def _launch(args, argv: list[str]) -> int:
    """`efftune train --nproc N ...` (or `hub build --nproc N ...`): the same command in N processes
    through torchrun (`efftune.launch`), after the config is checked here. One GPU a process where
    CUDA is visible and the run's device is not cpu; else N CPU processes over gloo, the cores shared."""
    import os

    import torch

    from .launch import launch
    n = args.nproc
    if n < 1:
        raise EfftuneError(f"--nproc must be at least 1, got {n}")
    # a bad flag fails here, once, before any process starts
    if args.command == "train":
        from .finetune import check_distributed, check_prefix_tasks
        cfg = train_config(args)
        check_distributed(cfg)
        check_prefix_tasks(cfg)
    else:
        from .compose.library import check_distributed as check_build
        cfg = build_config(args)
        check_build(cfg.train)
    on_gpu = torch.cuda.is_available() and not cfg.device.startswith("cpu")
    if on_gpu and n > torch.cuda.device_count():
        raise EfftuneError(f"--nproc {n}: only {torch.cuda.device_count()} GPU(s) are visible; one process a GPU "
                           f"(pass --nproc {torch.cuda.device_count()} or fewer)")
    cores = os.cpu_count() or 1
    if not on_gpu and n > cores:
        raise EfftuneError(f"--nproc {n}: no GPU here and only {cores} CPU core(s); CPU processes (gloo) need a "
                           f"core each (pass --nproc {cores} or fewer)")
    return launch(args, argv, on_gpu)


def _hub_build(args) -> dict | None:
    """The build's summary; None on the ranks other than 0 under torchrun (rank 0 prints it)."""
    from .compose.library import build_library, read_tasks_file
    from .train import distributed

    cfg = build_config(args)
    tasks = read_tasks_file(args.tasks_file) if args.tasks_file else [t for t in args.tasks.split(",") if t.strip()]
    try:
        summary = build_library(cfg.model, tasks, args.output, cfg.lora, cfg.train, together=args.together,
                                eval_size=cfg.eval_size, chat_template=cfg.chat_template, dtype=cfg.dtype,
                                device=cfg.device, resume_changed=args.resume_changed,
                                log=lambda m: print(m, file=sys.stderr))
        return summary if distributed.world().main else None
    finally:
        distributed.finish()


def check_output_dir(path: str, overwrite: bool) -> None:
    """Before any work: --output may be a new or empty directory, or (with --overwrite) a full one;
    never a file. The writers replace it only once the new output is complete (replace_dir_atomically)."""
    from pathlib import Path
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise EfftuneError(f"--output {p} is a file, not a directory; name a directory (--overwrite replaces "
                           "only a directory)")
    if p.is_dir() and any(p.iterdir()) and not overwrite:
        raise EfftuneError(f"--output {p} already exists and is not empty; pass --overwrite to replace it")


def _load_for_inference(args):
    """The model, with the adapter of any method attached, and a Formatter that feeds it (with a
    prefix per task where the adapter holds one per task: prompt tuning's several prompts)."""
    from .data import Formatter
    from .methods.lora.peft_format import load_adapter
    from .methods.registry import detect_method
    from .models import load_model

    method = detect_method(args.adapter) if args.adapter else None  # a bad path fails before the model loads
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    prefix = None
    if method is not None:
        if method.name == "lora":
            load_adapter(model, args.adapter, allow_pickle=args.allow_pickle)
        else:
            cfg = method.load(model, args.adapter)
            prefix = method.prefix(model, cfg) if method.prefix else None
    return model, Formatter(tokenizer, chat_template=args.chat_template, prefix_ids=prefix)


def _held_prompts(args, formatter) -> str:
    return f"adapter {args.adapter} holds a prompt per task ({', '.join(formatter.task_prefixes)})"


def _check_task_prompts(args, formatter, tasks: list[str], untasked: str | None) -> None:
    """With an adapter holding a prompt per task, each example takes its task's: every task of `tasks`
    (eval's --task) must have one, and text whose task has none is refused (`untasked` says why)."""
    if not formatter.task_prefixes:
        return
    if untasked:
        raise EfftuneError(f"eval: {_held_prompts(args, formatter)}, and {untasked}")
    if missing := [t for t in tasks if t not in formatter.task_prefixes]:
        raise EfftuneError(f"eval: task {', '.join(missing)} has no prompt: {_held_prompts(args, formatter)}")


def _generate_prefix(args, formatter) -> list[int] | None:
    """generate's prefix: --task's prompt, where the adapter holds one per task (None: the formatter's own)."""
    if not formatter.task_prefixes:
        if args.task:
            raise EfftuneError("generate: --task picks one prompt of an adapter holding a prompt per task (prompt "
                               f"tuning); {args.adapter or 'the bare model'} holds no such prompts")
        return None
    if args.task not in formatter.task_prefixes:
        which = f"--task {args.task} names none of them" if args.task else "pick one with --task"
        raise EfftuneError(f"generate: {_held_prompts(args, formatter)}: {which}")
    return formatter.task_prefixes[args.task]


def _eval(args) -> dict:
    from .data.loading import load_examples
    from .data.sources import load_data
    from .eval.retention import load_panel, measure_retention
    from .finetune import evaluator

    if args.task and args.data or not (args.task or args.data or args.retention):
        raise EfftuneError("eval: pass exactly one of --task or --data (or --retention alone)")
    examples = None
    if args.task:
        _, examples = load_examples(tasks=_task_list(args.task), eval_size=args.eval_size)
    elif args.data:
        examples = load_data(args.data)  # any format --data takes (conversations: perplexity of the assistant turns)
    if examples is not None and not examples:
        raise EfftuneError(f"eval: --eval-size {args.eval_size} holds out no examples of {args.task} to score")
    panel = load_panel(args.retention) if args.retention else None  # a bad panel fails before the model loads
    model, formatter = _load_for_inference(args)
    untasked = None  # why some text here has no prompt, for an adapter holding one per task
    if args.data:
        untasked = "the rows of --data carry no task to pick one by; score tasks named as the prompts with --task"
    elif panel:
        untasked = "the retention panel's tasks have none, so no one prompt is there to score them; drop --retention"
    _check_task_prompts(args, formatter, _task_list(args.task), untasked)
    result = {**evaluator(formatter, examples)(model), "examples": len(examples)} if examples else {}
    if panel:
        result["retention"] = measure_retention(model, formatter, panel)
    return {**result, "adapter": args.adapter}


def _generate(args) -> str:
    from .eval.generate import generate
    if args.max_new_tokens < 1:
        raise EfftuneError(f"generate: --max-new-tokens must be at least 1, got {args.max_new_tokens}")
    model, formatter = _load_for_inference(args)
    return generate(model, formatter, args.prompt, args.max_new_tokens, prefix_ids=_generate_prefix(args, formatter))


def _task_list(text: str | None) -> list[str]:
    """--task's comma-separated names."""
    return [t for t in (text or "").split(",") if t]


def _merge_weights(text: str | None, n: int) -> list[float]:
    """--weights: one finite number per adapter (default: all 1)."""
    if not n:
        raise EfftuneError("merge: --adapters names no adapter directory")
    if text is None:
        return [1.0] * n
    parts = [w.strip() for w in text.split(",")]
    weights = []
    for w in parts:
        try:
            weights.append(float(w))
        except ValueError:
            raise EfftuneError(f"merge: --weights {text!r}: {w!r} is not a number") from None
        if not math.isfinite(weights[-1]):
            raise EfftuneError(f"merge: --weights {text!r}: {w!r} is not a finite number")
    if len(weights) != n:
        raise EfftuneError(f"merge: --weights gives {len(weights)} weight(s) for {n} adapter(s) in --adapters; "
                           "give one per adapter")
    return weights


def _merge(args) -> dict:
    from .compose.merge import merge_adapters, merge_notes
    from .methods.lora.model import export_merged
    from .methods.lora.peft_format import load_adapter, read_adapter_config, save_adapter
    from .models import load_model

    check_output_dir(args.output, args.overwrite)
    dirs = [d for d in args.adapters.split(",") if d]
    weights = _merge_weights(args.weights, len(dirs))
    for d in dirs:  # every adapter's config read before the model loads: a bad path fails in a second
        read_adapter_config(d)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    names = [f"a{i}" for i in range(len(dirs))]
    for name, d in zip(names, dirs):
        load_adapter(model, d, adapter=name, allow_pickle=args.allow_pickle)
    for note in merge_notes(model, names, dirs, args.combine, args.rank):
        print(note, file=sys.stderr)
    cfg = merge_adapters(model, names, weights, args.combine, new_adapter="merged", r=args.rank,
                         density=args.density, drop=args.drop, seed=args.seed)
    if args.full_model:
        export_merged(model, tokenizer, args.output, inplace=True)
    else:
        save_adapter(model, args.output, cfg, adapter="merged",
                     metadata={"merge": {"combine": args.combine, "adapters": dirs, "weights": weights}})
    return {"output": args.output, "combine": args.combine, "adapters": dirs, "weights": weights,
            "kind": "model" if args.full_model else "adapter"}


def _hub_compose(args) -> dict:
    import random

    from .compose.lorahub import load_library, lorahub
    from .data import Formatter, MultipleChoice, load_jsonl
    from .data.loading import load_examples
    from .methods.lora.model import export_merged
    from .models import load_model

    if bool(args.task) == bool(args.examples):
        raise EfftuneError("hub compose: pass exactly one of --task or --examples")
    check_output_dir(args.output, args.overwrite)
    held_out = []
    if args.task:
        pool, held_out = load_examples(tasks=[t for t in args.task.split(",") if t], eval_size=args.eval_size)
        if not 1 <= args.shots <= len(pool):
            raise EfftuneError(f"hub compose: --shots must be in [1, {len(pool)}], got {args.shots}")
        shots = random.Random(args.seed).sample(pool, args.shots)
    else:
        shots = load_jsonl(args.examples)
    if args.eval_data:
        held_out = load_jsonl(args.eval_data)
    held_out = [e for e in held_out if isinstance(e, MultipleChoice)]
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    formatter = Formatter(tokenizer, chat_template=args.chat_template)
    library = load_library(model, args.library)
    hub, res = lorahub(model, formatter, shots, library, max_modules=args.max_modules, budget=args.budget,
                       optimizer=args.optimizer, regularization=args.regularization, seed=args.seed,
                       eval_examples=held_out or None)
    if args.full_model:
        export_merged(model, tokenizer, args.output, inplace=True)  # the composition is the only active adapter
    else:
        hub.save(args.output, metadata={"objective": res.objective, "base_objective": res.base_objective,
                                        "library": str(args.library), "shots": len(shots),
                                        "optimizer": args.optimizer, "budget": args.budget, "seed": args.seed})
    return {"output": args.output, "kind": "model" if args.full_model else "adapter", "modules": res.modules,
            "weights": res.weights, "objective": res.objective, "loss": res.loss,
            "base_objective": res.base_objective, "losses": res.losses, "accuracy": res.accuracy,
            "shots": len(shots), "eval_examples": len(held_out)}


def _tasks(args) -> None:
    from .data import task_index
    for info in sorted(task_index().values(), key=lambda i: i.name):
        if args.kind is None or info.kind == args.kind:
            print(f"{info.name}\t{info.kind}\t{info.examples}")


def _terminate(signum, frame):
    from .train.interrupt import RunInterrupted
    raise RunInterrupted("terminated", signum)


def describe_os_error(exc: OSError) -> str:
    """An OSError as one line naming the path: `PATH: Permission denied`."""
    if exc.filename is None:
        return exc.strerror or str(exc)
    paths = f"{exc.filename} -> {exc.filename2}" if exc.filename2 else str(exc.filename)
    return f"{paths}: {exc.strerror or type(exc).__name__}"


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
        command = args.command or "train"
        if args.command is None:  # `efftune` alone runs the main job
            args = parser().parse_args(["train"] + (["--debug"] if args.debug else []))
    except SystemExit as exc:  # a flag refused (one line printed) or --help: main returns the status
        return exc.code if isinstance(exc.code, int) else 2
    # SIGTERM as an exception, like Ctrl-C: a run cleans up (or checkpoints) and exits 143
    if _launches(args, command) and args.nproc is None:
        from .launch import passed_flags
        if given := passed_flags(args):
            print(f"efftune: error: {next(iter(given))} is for several processes: add --nproc N (processes on "
                  "this machine)", file=sys.stderr)
            return 2
    if _launches(args, command) and args.nproc is not None:
        try:
            return _launch(args, list(sys.argv[1:] if argv is None else argv))
        except EfftuneError as exc:
            print(f"efftune: error: {' '.join(str(exc).split())}", file=sys.stderr)
            return 2
    previous = signal.signal(signal.SIGTERM, _terminate) \
        if threading.current_thread() is threading.main_thread() else None
    try:
        if command == "train":
            summary = _train(args)
            if summary is not None:
                print(json.dumps(summary))
        elif command == "eval":
            print(json.dumps(_eval(args)))
        elif command == "generate":
            print(_generate(args))
        elif command == "merge":
            print(json.dumps(_merge(args)))
        elif command == "hub" and args.hub_command == "build":
            summary = _hub_build(args)
            if summary is not None:
                print(json.dumps(summary))
        elif command == "hub":
            print(json.dumps(_hub_compose(args)))
        elif command == "tasks":
            _tasks(args)
        return 0
    except EfftuneError as exc:
        if args.debug:
            traceback.print_exc()
        # one line, whatever a message quoted (a library's several-line text, a path with a newline)
        print(f"efftune: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C (130) or SIGTERM (143): the run said what it kept
        if args.debug:
            traceback.print_exc()
        what = str(exc) if command == "train" and str(exc) else "interrupted"
        if command == "hub" and args.hub_command == "build":
            what += "; run the same command again to continue (finished modules are kept)"
        print(f"efftune: {what}", file=sys.stderr)
        return getattr(exc, "exit_code", 130)
    except OSError as exc:  # a path that cannot be read or written: permissions, a read-only disk, ...
        if args.debug:
            traceback.print_exc()
        print(f"efftune: error: {' '.join(describe_os_error(exc).split())}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())

"""`efftune` on the command line: train, eval, generate, merge, hub build, hub compose, tasks.

Flags override the config file; each flag's help names its config key. Errors print one line
(`--debug` shows the traceback). `train` and `eval` end with one JSON object on stdout.
"""
from __future__ import annotations

import argparse
import difflib
import json
import math
import re
import signal
import sys
import threading
import traceback

from .errors import EfftuneError

# flag -> (config section or None, key, type, help)
TRAIN_FLAGS = {
    "model": (None, "model", str, "hub id, local directory or .gguf file (default: embedded SmolLM2-135M-Instruct)"),
    "task": (None, "task", str, "BIG-bench task name(s), comma-separated"),
    "data": (None, "data", str, "JSONL training data instead of BIG-bench"),
    "eval-data": (None, "eval_data", str, "JSONL evaluation data (default: a held-out split)"),
    "eval-size": (None, "eval_size", int, "held-out examples per task (default 200, at most half a task)"),
    "method": (None, "method", str, "fine-tuning method: lora | lora-fa | relora | ia3 | bitfit | bottleneck | prompt-tuning | prefix-tuning | expert-lora | esft | mixlora"),
    "output": (None, "output", str, "run directory"),
    "chat-template": (None, "chat_template", bool, "wrap prompts in the tokenizer's chat template"),
    "dtype": (None, "dtype", str, "auto | fp32 | bf16 | fp16 (auto: bf16 on GPU, fp32 on CPU)"),
    "device": (None, "device", str, "auto | cpu | cuda | cuda:N"),
    "rank": ("lora", "r", int, "LoRA rank r"),
    "alpha": ("lora", "alpha", float, "LoRA alpha (scaling = alpha / r)"),
    "dropout": ("lora", "dropout", float, "LoRA dropout"),
    "target-modules": ("lora", "target_modules", str,
                       "all-linear, comma-separated module-name suffixes, or a regex (full match)"),
    "rslora": ("lora", "use_rslora", bool, "rsLoRA scaling alpha / sqrt(r)"),
    "no-fa-correction": ("lora", "correction", "off", "LoRA-FA: plain B gradient, no (A Aᵀ + δI)⁻¹ / s² correction"),
    "restart-every": ("relora", "restart_every", int, "ReLoRA: steps between merge-and-restart"),
    "steps": ("train", "steps", int, "optimizer steps"),
    "batch-size": ("train", "batch_size", int, "examples per optimizer step"),
    "micro-batch-size": ("train", "micro_batch_size", int, "examples per forward pass (gradient accumulation)"),
    "lr": ("train", "lr", float, "peak learning rate"),
    "warmup-steps": ("train", "warmup_steps", int, "linear warmup steps"),
    "max-length": ("train", "max_length", int, "tokens per packed row"),
    "precision": ("train", "precision", str, "auto | fp32 | bf16 autocast"),
    "activation-checkpointing": ("train", "activation_checkpointing", bool,
                                 "recompute activations in backward (less memory, slower)"),
    "compile": ("train", "compile", bool, "torch.compile each decoder block (faster on GPU, less memory)"),
    "compile-memory-budget": ("train", "compile_memory_budget", float,
                              "with --compile: fraction (0, 1] of activations to keep; the rest is recomputed"),
    "compile-speed-first": ("train", "compile_lean", "off",
                            "with --compile: keep torch's own recompute rules (a few %% faster on small models, "
                            "about a third more activation memory)"),
    "compile-autotune": ("train", "compile_autotune", bool,
                         "with --compile: benchmark GEMM kernels per shape and keep the fastest (GPU; "
                         "minutes of compilation on the first step)"),
    "cuda-graphs": ("train", "cuda_graphs", bool,
                    "with --compile: replay each block as CUDA graphs, rows padded to --max-length (GPU; "
                    "pays where the CPU cannot keep up)"),
    "fp8-base": ("train", "fp8_base", bool, "run the frozen base linears in FP8 while training (H100/Ada GPUs)"),
    "attention": ("train", "attention", str,
                  "sdpa | flash4: attention kernel for rows holding one causal sequence each (flash4: "
                  "FlashAttention-4, needs the flash-attn-4 package and a Hopper/Blackwell GPU)"),
    "masked-attention": ("train", "masked_attention", str,
                         "sdpa | flex: attention kernel for rows with a mask, i.e. packed sequences and "
                         "token trees (flex: FlexAttention, skips masked blocks; CUDA)"),
    "eval-every": ("train", "eval_every", int, "evaluate every N steps (0: before and after only)"),
    "save-every": ("train", "save_every", int, "checkpoint every N steps"),
    "save-every-minutes": ("train", "save_every_minutes", float,
                           "also checkpoint when this many minutes have passed since the last (0: off)"),
    "seed": ("train", "seed", int, "random seed"),
}


def model_flags(p: argparse.ArgumentParser, adapter: bool = True) -> None:
    """The flags that choose the model (and, where one is loaded, the adapter)."""
    p.add_argument("--model", default="default", help=TRAIN_FLAGS["model"][3])
    if adapter:
        p.add_argument("--adapter", help="adapter directory of any method (efftune's, or peft's LoRA, IA3, "
                                         "prompt tuning)")
        p.add_argument("--allow-pickle", action="store_true", help="allow loading adapter_model.bin (pickle)")
    p.add_argument("--chat-template", action="store_true", help=TRAIN_FLAGS["chat-template"][3])
    p.add_argument("--dtype", default="auto", help=TRAIN_FLAGS["dtype"][3])
    p.add_argument("--device", default="auto", help=TRAIN_FLAGS["device"][3])


BUILD_FLAGS = (  # flag(s), type, default, help
    ("--together", int, 1, "modules trained at once in one forward/backward (each example through its own module)"),
    ("--eval-size", int, None, "held-out examples per task (default 200, at most half a task; 0: no evaluation)"),
    ("--rank --r", int, 8, "LoRA rank r"),
    ("--alpha", float, 16.0, "LoRA alpha (scaling = alpha / r)"),
    ("--dropout", float, 0.0, "LoRA dropout (0 keeps --together k equal to one by one)"),
    ("--target-modules", str, "all-linear", "all-linear, comma-separated module-name suffixes, or a regex"),
    ("--steps", int, 60, "optimizer steps per module"),
    ("--batch-size", int, 16, "examples per step per module"),
    ("--micro-batch-size", int, 0, "examples per module per forward pass (gradient accumulation)"),
    ("--lr", float, 1e-3, "peak learning rate"),
    ("--warmup-steps", int, 6, "linear warmup steps"),
    ("--max-length", int, 512, "tokens per packed row"),
    ("--precision", str, "auto", "auto | fp32 | bf16 autocast"),
    ("--save-every", int, 20, "checkpoint every N steps"),
    ("--seed", int, 0, "random seed (data order, adapter init)"),
)


def add_build_parser(subparsers) -> None:
    """Add `build` to the `efftune hub` subcommands (run by efftune.compose.library.run_build)."""
    b = subparsers.add_parser("build", help="train a library of LoRA modules, one per task (k at once), "
                                            "for hub compose; resumes an interrupted build")
    model_flags(b, adapter=False)
    tasks = b.add_mutually_exclusive_group(required=True)
    tasks.add_argument("--tasks", help="BIG-bench task names and/or JSONL files, comma-separated")
    tasks.add_argument("--tasks-file", help="file with one task (BIG-bench name or JSONL path) a line")
    b.add_argument("--output", required=True, help="library directory: one LoRA module per task + library.json")
    for flag, typ, default, text in BUILD_FLAGS:
        b.add_argument(*flag.split(), type=typ, default=default, help=text)
    b.add_argument("--debug", action="store_true", help="show tracebacks")


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (exit status 2, as argparse's own): its usage block
    would add several. Subcommands get this class too (add_subparsers uses the parent's)."""

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


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="efftune", description="Efficient fine-tuning of causal language models.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command")

    t = sub.add_parser("train", help="fine-tune (no arguments: LoRA on the embedded default model and task)",
                       description="Fine-tune a model. Flags override keys of the --config YAML file; "
                                   "the config key is given in brackets (lora.* keys live under "
                                   "lora_fa.* with --method lora-fa).")
    t.add_argument("--config", help="YAML run config (keys as in the brackets below)")
    t.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    t.add_argument("--resume-changed", action="store_true",
                   help="like --resume, but accept config values that change what the run computes (--lr, "
                        "--data, --steps, ...); the summary lists them")
    t.add_argument("--overwrite", action="store_true",
                   help="replace an existing run in --output (it is kept until the new run's first checkpoint)")
    t.add_argument("--debug", action="store_true", help="show tracebacks")
    for flag, (section, key, typ, text) in TRAIN_FLAGS.items():
        name = f"{section}.{key}" if section else key
        if typ is bool:
            t.add_argument(f"--{flag}", action="store_true", default=None, help=f"{text} [{name}]")
        elif typ == "off":
            where = f"lora_fa.{key}" if section == "lora" else name
            t.add_argument(f"--{flag}", action="store_false", default=None, help=f"{text} [{where}: false]")
        else:
            t.add_argument(f"--{flag}", type=typ, help=f"{text} [{name}]")

    e = sub.add_parser("eval", help="accuracy (multiple choice) or perplexity of a model, with an adapter or not")
    model_flags(e)
    e.add_argument("--task", help="BIG-bench task(s), comma-separated: scored on the held-out split")
    e.add_argument("--data", help="JSONL file to score (all rows)")
    e.add_argument("--eval-size", type=int, help="held-out examples per task (as in training; default 200, at "
                                                 "most half a task)")
    e.add_argument("--debug", action="store_true", help="show tracebacks")

    g = sub.add_parser("generate", help="greedy generation")
    model_flags(g)
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (at least 1)")
    g.add_argument("prompt")
    g.add_argument("--debug", action="store_true", help="show tracebacks")

    m = sub.add_parser("merge", help="merge LoRA adapters (linear, TIES, DARE) into one adapter or a full model")
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
    m.add_argument("--full-model", action="store_true", help="write a whole transformers model with the merge folded in")
    m.add_argument("--debug", action="store_true", help="show tracebacks")

    h = sub.add_parser("hub", help="LoraHub: build a library of LoRA modules (one per task) and compose it "
                                   "for a new task from a few examples")
    hsub = h.add_subparsers(dest="hub_command", required=True)
    c = hsub.add_parser("compose", help="search weights for the library's modules on a few examples (gradient-free) "
                                        "and save the composition as one LoRA adapter")
    model_flags(c, adapter=False)
    c.add_argument("--library", required=True,
                   help="directory whose subdirectories are LoRA adapters (efftune's or peft's), one per module")
    c.add_argument("--examples", help="JSONL file of few-shot examples (all rows are used)")
    c.add_argument("--task", help="BIG-bench task: --shots examples drawn from its training split")
    c.add_argument("--shots", type=int, default=5, help="with --task: few-shot examples drawn (seeded)")
    c.add_argument("--eval-data", help="JSONL multiple-choice examples to report held-out accuracy on "
                                       "(default with --task: its held-out split)")
    c.add_argument("--eval-size", type=int, help="with --task: held-out examples (as in training; default 200, "
                                                 "at most half a task)")
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

    add_build_parser(hsub)

    k = sub.add_parser("tasks", help="list BIG-bench tasks with their kind and size")
    k.add_argument("--kind", choices=["multiple_choice", "generative", "mixed"], help="only this kind")
    k.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _train(args) -> dict:
    from .config import load_config
    from .finetune import run

    overrides: dict = {}
    for flag, (section, key, typ, _) in TRAIN_FLAGS.items():
        value = getattr(args, flag.replace("-", "_"))
        if value is None:
            continue
        if key == "target_modules" and value != "all-linear" and re.fullmatch(r"[\w.,\s-]+", value):
            value = [v.strip() for v in value.split(",") if v.strip()]  # suffixes; anything else is a regex
        if section:
            overrides.setdefault(section, {})[key] = value
        else:
            overrides[key] = value
    # LoRA flags set the section of the method in use (lora_fa.r with --method lora-fa)
    method = overrides.get("method") or load_config(args.config).method
    if method == "lora-fa" and "lora" in overrides:
        overrides["lora_fa"] = overrides.pop("lora")
    cfg = load_config(args.config, overrides)
    return run(cfg, overwrite=args.overwrite, resume=args.resume, resume_changed=args.resume_changed,
               log=lambda m: print(m, file=sys.stderr))


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
    """The model, with the adapter of any method attached, and a Formatter that feeds it."""
    from .data import Formatter
    from .io import load_adapter
    from .methods import detect_method
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


def _eval(args) -> dict:
    from .config import RunConfig
    from .data import load_jsonl
    from .finetune import evaluator, load_examples

    if bool(args.task) == bool(args.data):
        raise EfftuneError("eval: pass exactly one of --task or --data")
    if args.task:
        cfg = RunConfig(task=[t for t in args.task.split(",") if t], eval_size=args.eval_size)
        _, examples = load_examples(cfg)
    else:
        examples = load_jsonl(args.data)
    if not examples:
        raise EfftuneError(f"eval: --eval-size {args.eval_size} holds out no examples of {args.task} to score")
    model, formatter = _load_for_inference(args)
    result = evaluator(formatter, examples)(model)
    return {**result, "examples": len(examples), "adapter": args.adapter}


def _generate(args) -> str:
    from .eval.generate import generate
    if args.max_new_tokens < 1:
        raise EfftuneError(f"generate: --max-new-tokens must be at least 1, got {args.max_new_tokens}")
    model, formatter = _load_for_inference(args)
    return generate(model, formatter, args.prompt, args.max_new_tokens)


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
    from .compose.merge import export_merged, merge_adapters, merge_notes
    from .io import load_adapter, read_adapter_config, save_adapter
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
    from .compose.merge import export_merged
    from .config import RunConfig
    from .data import Formatter, MultipleChoice, load_jsonl
    from .finetune import load_examples
    from .models import load_model

    if bool(args.task) == bool(args.examples):
        raise EfftuneError("hub compose: pass exactly one of --task or --examples")
    check_output_dir(args.output, args.overwrite)
    held_out = []
    if args.task:
        pool, held_out = load_examples(RunConfig(task=[t for t in args.task.split(",") if t],
                                                 eval_size=args.eval_size))
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
    previous = signal.signal(signal.SIGTERM, _terminate) \
        if threading.current_thread() is threading.main_thread() else None
    try:
        if command == "train":
            print(json.dumps(_train(args)))
        elif command == "eval":
            print(json.dumps(_eval(args)))
        elif command == "generate":
            print(_generate(args))
        elif command == "merge":
            print(json.dumps(_merge(args)))
        elif command == "hub" and args.hub_command == "build":
            from .compose.library import run_build
            print(json.dumps(run_build(args)))
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

"""Command-line flags generated from the run config's dataclasses: the one flag table of
`efftune train` and `efftune hub build`.

Every config key is a flag: `--` and the key with `_` written `-`. The top-level keys and the
`train` section go without their section (`--eval-size`, `--steps` for `train.steps`); the `data`
section's keys are `--data-KEY` (`--data-train-on` for `data.train_on`; `--data`, `--eval-data` and
`--eval-split` for its paths and evaluation split: the names they had as top-level keys); every
other section keeps it (`--lora.r`, `--mixlora.num-experts`, `--prompt-tuning.init-text`). A boolean
key has two forms, `--KEY` and `--no-KEY` (`--SECTION.no-KEY` in a section, `--no-data-KEY` in data). A few short names are
aliases (`--rank` for `lora.r`, `--no-fa-correction`, `--compile-speed-first`, ...; `ALIASES`).
Each flag's help ends with its config key and default.

A flag only turns its text into the field's type (its own error names the flag); ranges and
choices are checked where a YAML file's values are, by the config dataclasses (`efftune.config`),
so those errors name the key.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Iterable

from .config import RunConfig
from .data.examples import DEFAULT_EVAL_SIZE

UNSECTIONED = ("train",)  # sections whose keys are flags without the section name (`--steps`)
DASHED = ("data",)        # sections whose keys are flags `--SECTION-KEY` (`--data-split`), as before the section
NAMES = {"data.path": "data", "data.eval_path": "eval-data", "data.eval_split": "eval-split"}  # key -> its flag

# the text of each key's help; the generator appends "[key; default: ...]". A key of lora_fa that it
# shares with lora (LoraFAConfig extends LoraConfig) takes lora's text.
HELP: dict[str, str] = {
    # -- the run
    "model": "hub id, local directory or .gguf file ('default': the embedded SmolLM2-135M-Instruct)",
    "task": "BIG-bench task name(s), comma-separated",
    "data.path": "training data instead of BIG-bench: .jsonl, .json, .parquet or .csv file, a datasets.save_to_disk "
                 "directory, or a Hugging Face dataset id",
    "data.eval_path": "evaluation data, the same kinds (default: a held-out split)",
    "data.split": "split of a hub dataset or saved DatasetDict (none: train)",
    "data.eval_split": "split of --eval-data (none: --data-split's)",
    "data.columns": "read fields from other columns: FIELD=COLUMN,... (e.g. prompt=question,completion=answer)",
    "data.train_on": "conversations' tokens the loss covers: assistant | last_assistant | all",
    "data.overflow": "rows longer than --max-length: truncate | drop | error (each counted on stderr)",
    "data.cache": "keep parsed and tokenised training data in efftune's cache, keyed by data, tokenizer, template "
                  "and options",
    "eval_samples": "greedy replies to this many held-out conversations at each evaluation, in samples.jsonl",
    "log": "also log metrics to: tensorboard (events under OUTPUT/tensorboard) | wandb, comma-separated",
    "eval_size": f"held-out examples per task, split off before training (none: {DEFAULT_EVAL_SIZE}, at most "
                 "half a task; a number asked for must fit in half; 0: no evaluation)",
    "method": "fine-tuning method: lora | dora | lora-fa | relora | ia3 | bitfit | bottleneck | prompt-tuning | "
              "prefix-tuning | expert-lora | esft | mixlora | full",
    "output": "run directory",
    "chat_template": "wrap prompts in the tokenizer's chat template",
    "dtype": "auto | fp32 | bf16 | fp16 (auto: bf16 on GPU, fp32 on CPU)",
    "device": "auto | cpu | cuda | cuda:N",
    "retention": "a retention panel scored before and after training to measure forgetting: default (= "
                 "default-v1) or BIG-bench task names, comma-separated, none of them trained on",
    "quantize": "none | nf4 | int8: store the frozen linears of the decoder blocks in 4-bit NF4 (QLoRA) or int8",
    # -- LoRA (lora_fa shares these)
    "lora.r": "LoRA rank r",
    "lora.alpha": "LoRA alpha (scaling = alpha / r)",
    "lora.dropout": "LoRA dropout",
    "lora.target_modules": "all-linear, comma-separated module-name suffixes, or a regex (full match)",
    "lora.use_rslora": "rsLoRA scaling alpha / sqrt(r)",
    "lora.init": "A's initialisation: kaiming (as nn.Linear) | gaussian (std 1/r); B starts at zero",
    "lora.embeddings": "nn.Embedding modules to adapt too: comma-separated suffixes or a regex",
    "lora.use_dora": "DoRA: LoRA plus a trained magnitude per output feature (what --method dora sets)",
    "lora_fa.correction": "LoRA-FA: precondition B's gradient by (A Aᵀ + δI)⁻¹ / s² (--no-fa-correction: the "
                          "plain B gradient)",
    "lora_fa.delta": "LoRA-FA: the δ of the correction",
    # -- ReLoRA
    "relora.restart_every": "ReLoRA: steps between merge-and-restart",
    "relora.rewarmup_steps": "ReLoRA: learning-rate re-warmup steps after each restart",
    "relora.optimizer_reset": "ReLoRA: optimizer state at a restart: zero | magnitude | random",
    "relora.prune_fraction": "ReLoRA: fraction of each LoRA moment removed at a restart (magnitude, random)",
    "relora.full_rank": "ReLoRA: module suffixes trained at full rank, comma-separated",
    "relora.warm_start_steps": "ReLoRA: full-rank steps (base weights train, LoRA waits) before LoRA",
    # -- BitFit
    "bitfit.target_modules": "BitFit: linears whose biases train: all-linear, suffixes or a regex "
                             "(empty: norms only)",
    "bitfit.norms": "BitFit: train the normalisation layers' biases too",
    "bitfit.add_biases": "BitFit: give targeted linears without a bias a zero-initialised one",
    # -- IA3
    "ia3.target_modules": "IA3: modules whose activations are scaled: suffixes, a regex or all-linear",
    "ia3.feedforward_modules": "IA3: targets whose input (not output) is scaled; among the targets",
    # -- bottleneck adapters
    "bottleneck.bottleneck_size": "bottleneck adapter width",
    "bottleneck.placement": "houlsby (after attention and FFN) | pfeiffer (after the FFN only)",
    "bottleneck.activation": "relu | gelu | silu",
    "bottleneck.attn_module": "the attention sublayer's module name in a decoder layer (Llama: self_attn)",
    "bottleneck.ffn_module": "the FFN sublayer's module name in a decoder layer (Llama: mlp)",
    # -- prompt tuning
    "prompt_tuning.num_virtual_tokens": "prompt tuning: virtual tokens k per task",
    "prompt_tuning.init": "prompt tuning: start from sampled vocabulary embeddings (vocab), from "
                          "--prompt-tuning.init-text (text) or from noise (random)",
    "prompt_tuning.init_text": "prompt tuning: text whose tokens (repeated or cut to k) start the prompt",
    "prompt_tuning.tasks": "prompt tuning: task names, one prompt each, comma-separated",
    "prompt_tuning.init_from": "prompt tuning: adapter directory whose trained prompt starts every task "
                               "(SPoT; overrides init)",
    # -- prefix tuning
    "prefix_tuning.num_virtual_tokens": "prefix tuning: prefix length P",
    "prefix_tuning.prefix_projection": "prefix tuning: train the prefix through an MLP (folded away when saved)",
    "prefix_tuning.projection_hidden_size": "prefix tuning: the MLP's width (none: the model's hidden size)",
    "prefix_tuning.init": "prefix tuning: start from the keys and values of sampled vocabulary tokens "
                          "(vocab) or from small noise (random)",
    # -- expert LoRA (MoE models)
    "expert_lora.r": "expert LoRA: rank",
    "expert_lora.alpha": "expert LoRA: alpha (scaling = alpha / r)",
    "expert_lora.targets": "expert LoRA: fused expert projections adapted: gate_up_proj,down_proj or one",
    "expert_lora.experts": "expert LoRA: expert ids adapted in every MoE layer, comma-separated (none: all)",
    "expert_lora.target_modules": "expert LoRA: linears that get plain LoRA too (e.g. q_proj,v_proj)",
    "expert_lora.use_rslora": "expert LoRA: rsLoRA scaling alpha / sqrt(r)",
    "expert_lora.impl": "expert LoRA: expert path: auto (grouped GEMM on CUDA bf16, else a loop) | "
                        "grouped_mm (torch's grouped GEMM on any device, bf16) | loop",
    "expert_lora.aux_loss": "expert LoRA: record router logits for the router's load-balancing loss",
    # -- ESFT (MoE models)
    "esft.mode": "ESFT: train the chosen experts in full | with LoRA (lora)",
    "esft.score": "ESFT: rank experts by average gate score (gate) or token-selection ratio (token)",
    "esft.threshold": "ESFT: cumulative share p of the experts' scores kept (none: 0.2 unless "
                      "--esft.top-fraction is set)",
    "esft.top_fraction": "ESFT: fraction of experts kept instead of a threshold",
    "esft.selection": "ESFT: JSON file {experts path: [ids]} used instead of measuring",
    "esft.data": "ESFT: JSONL file to measure expert affinity on (esft needs this or --esft.selection)",
    "esft.max_examples": "ESFT: rows measured at most",
    "esft.r": "ESFT: LoRA rank (mode lora)",
    "esft.alpha": "ESFT: LoRA alpha (mode lora)",
    "esft.impl": "ESFT: expert path: auto | grouped_mm | loop",
    # -- MixLoRA
    "mixlora.num_experts": "MixLoRA: LoRA experts per FFN",
    "mixlora.top_k": "MixLoRA: experts per token",
    "mixlora.r": "MixLoRA: expert rank",
    "mixlora.alpha": "MixLoRA: expert alpha (scaling = alpha / r)",
    "mixlora.dropout": "MixLoRA: dropout of experts and attention LoRA",
    "mixlora.aux_loss_coef": "MixLoRA: weight of the router's load-balancing loss",
    "mixlora.z_loss_coef": "MixLoRA: weight of the router's z-loss",
    "mixlora.jitter": "MixLoRA: multiplicative input jitter of the router in training",
    "mixlora.attn_r": "MixLoRA: rank of the attention LoRA",
    "mixlora.attn_alpha": "MixLoRA: alpha of the attention LoRA",
    "mixlora.attn_targets": "MixLoRA: attention projections with plain LoRA, comma-separated (empty: none)",
    "mixlora.ffn_targets": "MixLoRA: FFN projections the experts adapt (of gate_proj,up_proj,down_proj)",
    "mixlora.ffn_module": "MixLoRA: the FFN's module-name suffix",
    "mixlora.dense": "MixLoRA: run the blocks in the dense masked form (no host sync; same result)",
    # -- full fine-tuning
    "full.target_modules": "full fine-tuning: what trains: all (every weight), all-linear, module-name suffixes "
                           "(mlp) or a regex over module names; every parameter inside a chosen module trains",
    # -- training
    "train.steps": "optimizer steps",
    "train.batch_size": "examples per optimizer step",
    "train.micro_batch_size": "examples per forward pass (gradient accumulation; 0: the whole batch)",
    "train.lr": "peak learning rate",
    "train.weight_decay": "AdamW weight decay (of the matrices; biases and vectors get none)",
    "train.warmup_steps": "linear warmup steps",
    "train.min_lr_ratio": "the cosine schedule ends at this fraction of the peak learning rate",
    "train.grad_clip": "max gradient norm (0: off)",
    "train.precision": "auto | fp32 | bf16 autocast",
    "train.max_length": "tokens per packed row",
    "train.activation_checkpointing": "recompute activations in backward (less memory, slower; with --compile "
                                      "the compiler recomputes inside the compiled blocks)",
    "train.activation_checkpointing_fraction": "with --activation-checkpointing: the share (0, 1] of decoder "
                                               "layers checkpointed, spread evenly (the rest keep their "
                                               "activations: faster, more memory)",
    "train.compile": "torch.compile each decoder block (faster on GPU, less memory)",
    "train.compile_memory_budget": "with --compile: fraction (0, 1] of activations to keep, torch's "
                                   "activation_memory_budget (with efftune's fused ops any value below 1 "
                                   "recomputes all but the blocks' inputs, as --activation-checkpointing)",
    "train.compile_lean": "with --compile: recompute the pointwise inputs of backward matmuls (less memory); "
                          "--compile-speed-first keeps torch's own recompute rules (a few % faster on small "
                          "models, about a third more activation memory)",
    "train.cuda_graphs": "with --compile: replay each block as CUDA graphs, rows padded to --max-length (GPU; "
                         "pays where the CPU cannot keep up)",
    "train.compile_autotune": "with --compile: benchmark GEMM kernels per shape and keep the fastest (GPU; "
                              "minutes of compilation on the first step)",
    "train.fp8_base": "run the frozen base linears in FP8 while training (H100/Ada GPUs)",
    "train.optimizer": "adamw | adamw8bit | adamwfp8 (Adam moments in 8 bits, 2 bytes a weight instead of 8: "
                       "dynamic-tree codes, or fp8 numbers with a cheaper update; needs pip install "
                       "\"efftune[optim]\")",
    "train.attention": "sdpa | flash4: attention kernel for rows holding one causal sequence each (flash4: "
                       "FlashAttention-4, needs the flash-attn-4 package and a Hopper/Blackwell GPU)",
    "train.masked_attention": "sdpa | flex: attention kernel for rows with a mask, i.e. packed sequences and "
                              "token trees (flex: FlexAttention, skips masked blocks; CUDA)",
    "train.eval_every": "evaluate every N steps (0: before and after only)",
    "train.save_every": "checkpoint every N steps (0: at the end only)",
    "train.save_every_minutes": "also checkpoint when this many minutes have passed since the last (0: off)",
    "train.keep_checkpoints": "checkpoints kept (the oldest are deleted)",
    "train.seed": "random seed (data order, adapter init, dropout)",
    "train.distributed": "ddp | fsdp: under torchrun (or --nproc), ddp keeps the whole model on every rank; fsdp "
                         "shards each decoder block across the ranks (FSDP2), for bases that do not fit one device",
}

# short names kept from before the table was generated: key -> (flags that set it, flags that set
# it false). The LoRA ones follow the method: with --method lora-fa they set lora_fa.*.
ALIASES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "lora.r": (("--rank", "--r"), ()),
    "lora.alpha": (("--alpha",), ()),
    "lora.dropout": (("--dropout",), ()),
    "lora.target_modules": (("--target-modules",), ()),
    "lora.use_rslora": (("--rslora",), ()),
    "lora_fa.correction": ((), ("--no-fa-correction",)),
    "relora.restart_every": (("--restart-every",), ()),
    "train.compile_lean": ((), ("--compile-speed-first",)),
}
FOLLOW_METHOD = {"lora-fa": ("lora", "lora_fa")}  # method -> (section its LoRA aliases leave, section they set)

SECTION_TITLES: dict[str | None, str] = {
    None: "the run", "data": "your data (data.*)", "train": "training (train.*)", "lora": "LoRA (lora.*)", "lora_fa": "LoRA-FA (lora_fa.*)",
    "relora": "ReLoRA (relora.*)", "bitfit": "BitFit (bitfit.*)", "ia3": "IA3 (ia3.*)",
    "bottleneck": "bottleneck adapters (bottleneck.*)", "prompt_tuning": "prompt tuning (prompt_tuning.*)",
    "prefix_tuning": "prefix tuning (prefix_tuning.*)", "expert_lora": "expert LoRA (expert_lora.*)",
    "esft": "ESFT (esft.*)", "mixlora": "MixLoRA (mixlora.*)", "full": "full fine-tuning (full.*)",
}
SECTION_NOTES: dict[str | None, str] = {  # `efftune train`'s word on when a section is used
    "lora": "--method lora and --method dora, and relora's adapter. With --method lora-fa, --rank, --alpha, --dropout, "
            "--target-modules and --rslora set lora_fa.* instead.",
    "lora_fa": "--method lora-fa", "relora": "--method relora (its adapter from lora.*)",
    "bitfit": "--method bitfit", "ia3": "--method ia3", "bottleneck": "--method bottleneck",
    "prompt_tuning": "--method prompt-tuning", "prefix_tuning": "--method prefix-tuning",
    "expert_lora": "--method expert-lora (MoE models)", "esft": "--method esft (MoE models)",
    "mixlora": "--method mixlora", "full": "--method full",
}


@dataclass(frozen=True)
class Flag:
    """One config key as a command-line flag."""
    key: str                # the config key: "eval_size", "train.steps", "mixlora.num_experts"
    section: str | None     # RunConfig's field holding it (None: a top-level key)
    name: str               # the field's name in its dataclass
    hint: Any               # the field's annotation
    default: Any            # the field's default (as the dataclass declares it)
    options: tuple[str, ...]    # flags that set it (a boolean: to true)
    negatives: tuple[str, ...]  # a boolean's flags that set it false

    @property
    def dest(self) -> str:
        return self.key

    @property
    def follows_method(self) -> tuple[str, ...]:
        """The aliases that set the method's LoRA section rather than `lora` (--rank, ...)."""
        return ALIASES.get(self.key, ((), ()))[0] if self.section == "lora" else ()


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _dashed(name: str) -> str:
    return name.replace("_", "-")


def config_flags(keys: Iterable[str] | None = None) -> list[Flag]:
    """Every config key of RunConfig as a Flag (or only `keys`: config keys and whole sections)."""
    wanted = set(keys) if keys is not None else None
    flags = []
    hints = typing.get_type_hints(RunConfig)
    for top in dataclasses.fields(RunConfig):
        cls = hints[top.name]
        if dataclasses.is_dataclass(cls):
            inner = typing.get_type_hints(cls)
            fields = [(top.name, f, inner[f.name]) for f in dataclasses.fields(cls)]
        else:
            fields = [(None, top, cls)]
        for section, f, hint in fields:
            key = f"{section}.{f.name}" if section else f.name
            if wanted is not None and key not in wanted and section not in wanted:
                continue
            aliases, negative_aliases = ALIASES.get(key, ((), ()))
            if section in DASHED:  # --data-split, --no-data-cache: the names of the keys before the section
                name = NAMES.get(key) or f"{_dashed(section)}-{_dashed(f.name)}"
                options, negatives = (f"--{name}",), (f"--no-{name}",)
            else:
                prefix = "" if section is None or section in UNSECTIONED else _dashed(section) + "."
                options, negatives = (f"--{prefix}{_dashed(f.name)}",), (f"--{prefix}no-{_dashed(f.name)}",)
            options += aliases
            negatives = negatives + negative_aliases if hint is bool else ()
            flags.append(Flag(key, section, f.name, hint, _field_default(f), options, negatives))
    # help order: the run's own keys, its data, training, then the methods' sections in RunConfig's order
    first = DASHED + UNSECTIONED
    return sorted(flags, key=lambda flag: (flag.section is not None, flag.section not in first,
                                           first.index(flag.section) if flag.section in first else 0))


def help_text(flag: Flag) -> str:
    """The flag's help: what it does, then its config key and default."""
    text = HELP.get(flag.key)
    if text is None and flag.section == "lora_fa":
        text = HELP.get(f"lora.{flag.name}")
    if text is None:
        raise KeyError(f"efftune.flags.HELP has no text for config key {flag.key!r}")
    return f"{text} [{flag.key}; default: {show_default(flag.default)}]"


def show_default(value: Any) -> str:
    """A default as one would write it on the command line."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(str, value)) if value else "empty"
    return str(value)


# ---- text -> the field's type (argparse `type=`): an error here names the flag --------------------------

def _split(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _patterns(text: str) -> str | list[str]:
    """`str | list[str]` module patterns: all-linear, comma-separated suffixes, or a regex."""
    if text == "all-linear" or not re.fullmatch(r"[\w.,\s-]*", text):
        return text  # anything but names, dots and commas is a regex
    return _split(text)


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in _split(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _optional(parse, what: str):
    """`X | None`: the word none, or an X."""
    def convert(text: str):
        if text.strip().lower() == "none":
            return None
        try:
            return parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {what} value: {text!r} (or none)") from None
    return convert


def _converter(hint: Any):
    """The argparse `type=` for a field annotation."""
    if hint in (int, float, str):
        return hint
    if typing.get_origin(hint) is list:
        return _int_list if typing.get_args(hint) == (int,) else _split
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if set(options) == {str, list[str]}:
            return _patterns
        if len(options) == 1 and type(None) in typing.get_args(hint):
            if options[0] is str:
                return str  # a path or a text: "none" is a name like any other
            inner = _converter(options[0])
            return _optional(inner, getattr(options[0], "__name__", "list"))
    raise TypeError(f"no command-line form for a config field of type {hint}")


def _metavar(flag: "Flag") -> str:
    hint = flag.hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = list[str] if set(options) == {str, list[str]} else options[0]
    if typing.get_origin(hint) is list:
        return "A,B"
    return {int: "N", float: "X"}.get(hint, flag.name.upper())


class _Store(argparse.Action):
    """Stores the value; remembers whether a method-following alias (`--rank`) gave it."""

    def __init__(self, option_strings, dest, follows=(), **kwargs):
        self.follows = follows
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        _mark(namespace, self.dest, option_string in self.follows)


class _Switch(argparse.Action):
    """A boolean key: its positive flags set true, its negative ones (`--no-…`) false."""

    def __init__(self, option_strings, dest, negatives=(), follows=(), **kwargs):
        self.negatives, self.follows = negatives, follows
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, option_string not in self.negatives)
        _mark(namespace, self.dest, option_string in self.follows)


FOLLOWING = "_efftune_alias_keys"  # namespace attribute: keys last set through a method-following alias


def _mark(namespace, dest: str, follows: bool) -> None:
    marked = set(getattr(namespace, FOLLOWING, ()))
    marked = marked | {dest} if follows else marked - {dest}
    setattr(namespace, FOLLOWING, marked)


def add_config_flags(parser: argparse.ArgumentParser, flags: list[Flag],
                     help_overrides: dict[str, str] | None = None,
                     notes: dict[str | None, str] | None = None) -> None:
    """Add `flags` to `parser`, one argument group per config section (described by `notes`,
    default SECTION_NOTES). A flag not given leaves its key out of the namespace (so `none` can be
    given, and a config file's value stays)."""
    notes = SECTION_NOTES if notes is None else notes
    groups: dict[str | None, argparse._ArgumentGroup] = {}
    for flag in flags:
        if flag.section not in groups:
            groups[flag.section] = parser.add_argument_group(SECTION_TITLES.get(flag.section, flag.section),
                                                             notes.get(flag.section))
        text = help_text(flag)
        if help_overrides and flag.key in help_overrides:
            text = f"{help_overrides[flag.key]} [{flag.key}; default: {show_default(flag.default)}]"
        text = text.replace("%", "%%")  # argparse formats help with %
        common = dict(dest=flag.dest, default=argparse.SUPPRESS, help=text, follows=flag.follows_method)
        if flag.hint is bool:
            groups[flag.section].add_argument(*flag.options, *flag.negatives, action=_Switch,
                                              negatives=flag.negatives, **common)
        else:
            groups[flag.section].add_argument(*flag.options, action=_Store, type=_converter(flag.hint),
                                              metavar=_metavar(flag), **common)


def overrides_from(args: argparse.Namespace, flags: list[Flag], method: str | None = None) -> dict:
    """The config values the flags gave, as `load_config` overrides ({"train": {"steps": 5}, ...}).
    With `method` lora-fa, values given through the LoRA aliases (--rank, ...) go to lora_fa."""
    given = vars(args)
    following = getattr(args, FOLLOWING, set())
    leave, into = FOLLOW_METHOD.get(method or "", (None, None))
    out: dict = {}
    for flag in flags:
        if flag.dest not in given:
            continue
        section = into if flag.section == leave and flag.dest in following else flag.section
        if section is None:
            out[flag.name] = given[flag.dest]
        else:
            out.setdefault(section, {})[flag.name] = given[flag.dest]
    return out

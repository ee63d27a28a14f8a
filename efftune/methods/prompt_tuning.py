"""Prompt tuning (Lester et al. 2021): k trainable soft-prompt vectors before the input; model frozen.

Soft prompts are addressed by *virtual token ids* above the vocabulary: the input embedding is
wrapped in a `PromptEmbedding`, where id V + t·k + i (V: the base table's size) is row i of task
t's prompt. A sequence starting with `virtual_ids(model, task)` is prompt-tuned and nothing else
changes: the training loop, the shared-prefix tree layout (a common soft prompt runs once per
row), scoring and `model.generate` work as they are, and a batch may mix tasks row by row. The
LM head keeps its V outputs: virtual tokens are never predicted.

On disk, one task: peft's format (`adapter_config.json` with `"peft_type": "PROMPT_TUNING"`,
`adapter_model.safetensors` holding `prompt_embeddings` (k, hidden)); peft loads it and prepends
the prompt itself. Several tasks, efftune's own: `prompt_tuning_config.json` {"method":
"prompt-tuning", "format_version": 1, "num_virtual_tokens", "token_dim", "tasks", "init",
"init_text", "base_model_name_or_path", "efftune": run metadata} and
`prompt_tuning_model.safetensors` with `prompt_embeddings.<task>` (k, hidden) per task.
SPoT (Vu et al. 2022): `init_from` copies a trained prompt (`dir#task` picks one of several)
into every task slot.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..attach import freeze_base, master_dtype, replace_module
from ..errors import AdapterError, ConfigError, EfftuneError, TargetError
from ..files import (AdapterFormat, base_model_name, checked_field, first_mismatch, is_str_list, load_all_or_nothing,
                     read_adapter_dir, write_adapter_dir)
from .registry import Method

PEFT_CONFIG, PEFT_WEIGHTS, PEFT_KEY = "adapter_config.json", "adapter_model.safetensors", "prompt_embeddings"
CONFIG_FILE, WEIGHTS_FILE = "prompt_tuning_config.json", "prompt_tuning_model.safetensors"
FORMAT = AdapterFormat("prompt-tuning", CONFIG_FILE, WEIGHTS_FILE)  # several tasks: efftune's own files
SHAPE_HINT = " (another base model, or another prompt length?)"
INITS = ("vocab", "text", "random")
# peft's TEXT demands a tokenizer path and re-initialises from it when loaded trainable
TO_PEFT_INIT = {"vocab": "SAMPLE_VOCAB", "random": "RANDOM", "text": "RANDOM"}
FROM_PEFT_INIT = {"SAMPLE_VOCAB": "vocab", "RANDOM": "random", "TEXT": "text"}


@dataclass
class PromptTuningConfig:
    """`num_virtual_tokens` k per task; `init`: embeddings of sampled vocabulary tokens ("vocab"),
    of `init_text`'s tokens repeated / cut to k ("text"), or normal noise with the embedding's std
    ("random"); `tasks`: one prompt each; `init_from`: an adapter directory whose trained prompt
    starts every task (SPoT; overrides `init`)."""
    num_virtual_tokens: int = 20
    init: str = "vocab"
    init_text: str | None = None
    tasks: list[str] = field(default_factory=lambda: ["default"])
    init_from: str | None = None

    def __post_init__(self):
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            raise ConfigError(f"prompt_tuning.num_virtual_tokens must be a positive integer, "
                              f"got {self.num_virtual_tokens!r}")
        if self.init not in INITS:
            raise ConfigError(f"prompt_tuning.init must be one of {INITS}, got {self.init!r}")
        if self.init == "text" and not self.init_text and not self.init_from:
            raise ConfigError("prompt_tuning.init_text is required with init: text")
        if not self.tasks or not all(isinstance(t, str) and t for t in self.tasks):
            raise ConfigError(f"prompt_tuning.tasks must be a non-empty list of names, got {self.tasks!r}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"prompt_tuning.tasks names a task twice: {self.tasks!r}")


class PromptEmbedding(nn.Module):
    """The input embedding plus soft prompts: ids (...,) -> vectors (..., hidden).

    id < V: `base_layer(id)`; V + t·k <= id < V + (t+1)·k: `prompts[t, id - V - t·k]`. `prompts`
    (tasks, k, hidden) holds output-space vectors (after any scaling the base embedding applies)."""

    def __init__(self, base_layer: nn.Embedding, tasks: list[str], num_virtual_tokens: int):
        super().__init__()
        self.base_layer = base_layer
        self.tasks = list(tasks)
        w = base_layer.weight
        dtype = master_dtype(w.dtype)
        self.prompts = nn.Parameter(torch.zeros(len(tasks), num_virtual_tokens, w.shape[1],
                                                device=w.device, dtype=dtype))

    @property
    def vocab_size(self) -> int:
        return self.base_layer.num_embeddings

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompts.shape[1]

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight  # the vocabulary table, for weight tying and its readers

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        virtual = input_ids >= self.vocab_size
        out = self.base_layer(input_ids.masked_fill(virtual, 0))
        where = virtual.nonzero(as_tuple=True)
        if where[0].numel() == 0:
            return out
        # Only the virtual positions gather a prompt row (and get a gradient); an id past the
        # last task's range fails here as an out-of-vocabulary id fails in the base table.
        soft = self.prompts.flatten(0, 1)[input_ids[where] - self.vocab_size]
        return out.index_put(where, soft.to(out.dtype))


def prompt_embedding(model: nn.Module) -> PromptEmbedding:
    emb = model.get_input_embeddings()
    if not isinstance(emb, PromptEmbedding):
        raise EfftuneError("the model has no soft prompts (attach prompt tuning first)")
    return emb


def virtual_ids(model: nn.Module, task: str = "default") -> list[int]:
    """The k virtual token ids that stand for `task`'s soft prompt; put them first in a sequence."""
    emb = prompt_embedding(model)
    if task not in emb.tasks:
        raise EfftuneError(f"prompt tuning: unknown task {task!r} (have: {', '.join(emb.tasks)})")
    start = emb.vocab_size + emb.tasks.index(task) * emb.num_virtual_tokens
    return list(range(start, start + emb.num_virtual_tokens))


# ---- initialisation: each returns (tasks, k, hidden) vectors --------------------------------------

def _vocab_init(emb: nn.Embedding, config: PromptTuningConfig, tokenizer) -> torch.Tensor:
    """Embeddings of tokens sampled with torch's RNG (special and padding-only ids left out)."""
    n, k = len(config.tasks), config.num_virtual_tokens
    usable = torch.arange(emb.num_embeddings)
    if tokenizer is not None:  # the table may be padded past the tokenizer, and specials are odd starts
        keep = usable < len(tokenizer)
        keep[[i for i in tokenizer.all_special_ids if i < len(keep)]] = False
        usable = usable[keep] if keep.any() else usable
    ids = usable[torch.randint(len(usable), (n * k,))].to(emb.weight.device)
    return emb(ids).reshape(n, k, -1)


def _text_init(emb: nn.Embedding, config: PromptTuningConfig, tokenizer) -> torch.Tensor:
    if tokenizer is None:
        raise ConfigError("prompt_tuning.init: text needs the tokenizer: add_prompt_tuning(model, config, tokenizer)")
    ids = tokenizer(config.init_text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError(f"prompt_tuning.init_text {config.init_text!r} gives no tokens")
    k = config.num_virtual_tokens
    ids = (ids * math.ceil(k / len(ids)))[:k]  # as peft: repeat a short text, cut a long one
    vectors = emb(torch.tensor(ids, device=emb.weight.device))
    return vectors.expand(len(config.tasks), -1, -1)


def _random_init(emb: nn.Embedding, config: PromptTuningConfig, tokenizer) -> torch.Tensor:
    std = emb.weight.float().std()
    return torch.randn(len(config.tasks), config.num_virtual_tokens, emb.embedding_dim) * std


INIT_FNS = {"vocab": _vocab_init, "text": _text_init, "random": _random_init}


def _spot_init(emb: nn.Embedding, config: PromptTuningConfig) -> torch.Tensor:
    """SPoT: a source task's trained prompt, in every task slot."""
    source, task = config.init_from, None
    if not Path(source).is_dir() and "#" in source:
        source, _, task = source.rpartition("#")
    _, tensors, keys, weights = _read_prompts(Path(source))
    if task is None and len(keys) > 1:
        raise ConfigError(f"prompt_tuning.init_from: {source} holds prompts for tasks {', '.join(keys)}; "
                          f"pick one as {source}#<task>")
    task = task if task is not None else next(iter(keys))
    if task not in keys:
        raise ConfigError(f"prompt_tuning.init_from: {source} has no task {task!r} (have: {', '.join(keys)})")
    key = keys[task]
    _check_shapes({n: t for n, t in tensors.items() if n == key}, [key], config.num_virtual_tokens, emb.embedding_dim, Path(source) / weights)
    return tensors[key].to(emb.weight.device).expand(len(config.tasks), -1, -1)


# ---- attach -----------------------------------------------------------------------------------------

def _input_embedding(model: nn.Module) -> tuple[str, nn.Embedding]:
    """(module path, module) of the plain input embedding that prompt tuning wraps."""
    emb = model.get_input_embeddings()
    if isinstance(emb, PromptEmbedding):
        raise EfftuneError("the model already has soft prompts; load or attach them once")
    if not isinstance(emb, nn.Embedding):
        raise TargetError(f"prompt tuning needs an nn.Embedding input embedding, the model has a {type(emb).__name__}")
    return next(name for name, module in model.named_modules() if module is emb), emb


def _attach(model: nn.Module, path: str, emb: nn.Embedding, tasks: list[str], init: torch.Tensor) -> None:
    freeze_base(model)
    wrapper = PromptEmbedding(emb, tasks, init.shape[1])
    with torch.no_grad():
        wrapper.prompts.copy_(init.to(wrapper.prompts.dtype))
    replace_module(model, path, wrapper)


def add_prompt_tuning(model: nn.Module, config: PromptTuningConfig | None = None, tokenizer=None) -> list[str]:
    """Freeze the model and wrap its input embedding in a PromptEmbedding whose `prompts` train.
    `tokenizer` is needed for init "text" (for "vocab" it keeps special tokens out of the sample).
    Returns the wrapped module's path."""
    config = config or PromptTuningConfig()
    path, emb = _input_embedding(model)
    with torch.no_grad():  # computed before anything changes, so a bad init leaves the model alone
        init = _spot_init(emb, config) if config.init_from else INIT_FNS[config.init](emb, config, tokenizer)
    _attach(model, path, emb, config.tasks, init)
    return [path]


# ---- save / load --------------------------------------------------------------------------------

def prompt_tuning_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The prompts under their file keys: peft's one key for one task, one key per task for several."""
    emb = prompt_embedding(model)
    if len(emb.tasks) == 1:
        return {PEFT_KEY: emb.prompts[0]}
    return {f"{PEFT_KEY}.{task}": emb.prompts[i] for i, task in enumerate(emb.tasks)}


def save_prompt_tuning(model: nn.Module, directory: str | os.PathLike, config: PromptTuningConfig | None = None,
                       metadata: dict | None = None) -> Path:
    """Write the prompts (atomically): peft's format for one task, efftune's for several.
    `config` only records how the prompts began; what is written comes from the model."""
    emb = prompt_embedding(model)
    config = config or PromptTuningConfig(num_virtual_tokens=emb.num_virtual_tokens, tasks=emb.tasks)
    mcfg = getattr(model, "config", None)
    base = base_model_name(model)
    k, hidden = emb.prompts.shape[1:]
    ours = {"num_virtual_tokens": k, "token_dim": hidden, "tasks": emb.tasks, "init": config.init,
            "init_text": config.init_text}
    if len(emb.tasks) == 1:
        cfg = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
               "num_virtual_tokens": k, "token_dim": hidden, "num_transformer_submodules": 1,
               "num_attention_heads": getattr(mcfg, "num_attention_heads", None),
               "num_layers": getattr(mcfg, "num_hidden_layers", None),
               "prompt_tuning_init": TO_PEFT_INIT[config.init], "prompt_tuning_init_text": None,
               "tokenizer_name_or_path": None, "tokenizer_kwargs": None, "inference_mode": True,
               "modules_to_save": None, "revision": None,
               "efftune": {**(metadata or {}), "prompt_tuning": ours}}
        return write_adapter_dir(directory, cfg, prompt_tuning_state_dict(model), PEFT_CONFIG, PEFT_WEIGHTS)
    return FORMAT.save(model, directory, ours, prompt_tuning_state_dict(model), metadata)


def _read_prompts(directory: Path) -> tuple[PromptTuningConfig, dict[str, torch.Tensor], dict[str, str], str]:
    """(config, tensors, {task: key}, weights file name) of a prompt directory in either format;
    every field used is checked and a bad one named."""
    def text_or_none(v) -> bool:
        return v is None or isinstance(v, str)
    if (directory / CONFIG_FILE).is_file():
        where = directory / CONFIG_FILE
        cfg, tensors = FORMAT.read(directory)
        tasks = checked_field(cfg, "tasks", is_str_list, "a list of task names", where, [])
        weights, keys = WEIGHTS_FILE, {t: f"{PEFT_KEY}.{t}" for t in tasks}
        init = checked_field(cfg, "init", text_or_none, "a string", where)
        init_text = checked_field(cfg, "init_text", text_or_none, "a string", where)
    else:
        where = directory / PEFT_CONFIG
        cfg, tensors = read_adapter_dir(directory, PEFT_CONFIG, PEFT_WEIGHTS, kind=("peft_type", "PROMPT_TUNING"))
        if checked_field(cfg, "num_transformer_submodules", lambda v: isinstance(v, int), "an integer", where, 1) != 1:
            raise AdapterError(f"adapter: {where} is an encoder-decoder prompt "
                               f"(num_transformer_submodules={cfg['num_transformer_submodules']})")
        ours = checked_field(cfg, "efftune", lambda v: isinstance(v, dict), "an object", where, {})
        ours = checked_field(ours, "prompt_tuning", lambda v: isinstance(v, dict), "an object", where, {})
        tasks = checked_field(ours, "tasks", is_str_list, "a list of task names", where, ["default"])[:1]
        weights, keys = PEFT_WEIGHTS, {t: PEFT_KEY for t in tasks}
        init = checked_field(ours, "init", text_or_none, "a string", where) \
            or FROM_PEFT_INIT.get(str(cfg.get("prompt_tuning_init")))
        init_text = checked_field(ours, "init_text", text_or_none, "a string", where) \
            or checked_field(cfg, "prompt_tuning_init_text", text_or_none, "a string", where)
    if not tasks:
        raise AdapterError(f"adapter: {where} lists no tasks")
    first = next(iter(tensors.values()), None)
    k = checked_field(cfg, "num_virtual_tokens", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                      "a positive integer", where, first.shape[0] if first is not None and first.ndim else None)
    if init not in INITS or (init == "text" and not init_text):
        init = "random"  # only a record of how training began
    config = PromptTuningConfig(num_virtual_tokens=k, init=init, init_text=init_text, tasks=tasks)
    return config, tensors, keys, weights


def _check_shapes(tensors: dict[str, torch.Tensor], keys, k: int, hidden: int, where: Path) -> None:
    """`tensors` must be exactly `keys`, each (k, hidden); the first misfit is named with shapes."""
    problem = first_mismatch(tensors, {key: torch.empty(k, hidden, device="meta") for key in keys})
    if problem:
        raise AdapterError(f"adapter: {where} {problem}{SHAPE_HINT}")


def load_prompt_tuning(model: nn.Module, directory: str | os.PathLike) -> PromptTuningConfig:
    """Attach the prompts saved in `directory` (by efftune, either format, or by peft), all or
    nothing; they train if training follows. Every key and shape is checked, the first misfit named."""
    directory = Path(directory)
    config, tensors, keys, weights = _read_prompts(directory)
    path, emb = _input_embedding(model)
    zeros = torch.zeros(len(config.tasks), config.num_virtual_tokens, emb.embedding_dim)
    load_all_or_nothing(model, lambda: _attach(model, path, emb, config.tasks, zeros), tensors,
                        lambda: {keys[t]: prompt_embedding(model).prompts[i] for i, t in enumerate(config.tasks)},
                        directory / weights, SHAPE_HINT)
    return config


def prompt_ids(model: nn.Module, config: PromptTuningConfig) -> list[int] | dict[str, list[int]]:
    """The virtual token ids prompts start with: one task's, for every prompt; with several tasks,
    {task: its ids}, each example taking its own task's (`efftune.data.Formatter`)."""
    if len(config.tasks) == 1:
        return virtual_ids(model, config.tasks[0])
    return {task: virtual_ids(model, task) for task in config.tasks}


def prompt_tasks(config: PromptTuningConfig) -> list[str] | None:
    """The tasks with a prompt each, when there are several (None for one: it serves every prompt)."""
    return list(config.tasks) if len(config.tasks) > 1 else None


# Soft prompts are addressed by virtual token ids prompts start with (`prompt_ids`); a prompt without
# them runs the base exactly (ids below V go to the base table alone), so no bypass is needed.
METHOD = Method("prompt-tuning", "prompt_tuning", attach=add_prompt_tuning, save=save_prompt_tuning,
                load=load_prompt_tuning, prefix=prompt_ids, prefix_tasks=prompt_tasks)

"""The methods `--method` names, and the one record each method module exports as `METHOD`: how it
attaches to a model, how its result is saved and loaded, and (optionally) how it changes the
training loop or the prompts.

Every method's functions take the same arguments, called by keyword where a method may not need
one (a tokenizer): `attach(model, config, tokenizer=...)`, `save(model, directory, config,
metadata=...)`, `load(model, directory)`. A method's module is imported only when it is asked for.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from contextlib import AbstractContextManager
from typing import Callable

from torch import nn

from ..errors import AdapterError, ConfigError
from ..files import read_json_object


@dataclass(frozen=True)
class Method:
    name: str
    config_key: str                                             # its section in the run config
    attach: Callable[..., list[str]]                            # (model, config, tokenizer=) -> adapted modules
    save: Callable[..., object]                                 # (model, directory, config, metadata=)
    load: Callable[[nn.Module, str], object]                    # (model, directory) -> config
    hooks: Callable[[nn.Module, object], object] | None = None  # (model, run config) -> TrainHooks
    artifact: str = "adapter"                                   # what `save` writes: adapter | model
    # (model, config) -> the ids every prompt starts with, or {task: ids} where `prefix_tasks` names tasks
    prefix: Callable[[nn.Module, object], list[int] | dict[str, list[int]]] | None = None
    # (config) -> the tasks with a prefix each (an example takes its own task's: prompt tuning with several
    # prompts); None: one prefix for every prompt. Read from the config alone, so a run whose examples
    # would meet no prefix of their task is refused before the model loads (efftune.finetune)
    prefix_tasks: Callable[[object], list[str] | None] = lambda config: None
    writes_base: bool = False  # it changes the base weights (a quantised or FP8 base cannot take that)
    not_shardable: str | None = None  # why train.distributed fsdp cannot run it (None: it can)
    runs_base: Callable[[object], bool] = lambda config: False  # (config) -> attach runs the base (ESFT on data)
    # (model) -> a context in which the attached model computes what its base does, for a method whose
    # freshly attached state is not the base (prefix tuning's prefixes are attended to from the start);
    # with prompts built without `prefix`'s ids it gives the base's "before" numbers (efftune.finetune)
    bypass: Callable[[nn.Module], AbstractContextManager] | None = None


# --method name -> the module whose METHOD it is
METHOD_MODULES: dict[str, str] = {
    "lora": "efftune.methods.lora", "dora": "efftune.methods.dora", "lora-fa": "efftune.methods.lora_fa", "relora": "efftune.methods.relora",
    "bitfit": "efftune.methods.bitfit", "ia3": "efftune.methods.ia3", "bottleneck": "efftune.methods.bottleneck",
    "prompt-tuning": "efftune.methods.prompt_tuning", "prefix-tuning": "efftune.methods.prefix_tuning",
    "expert-lora": "efftune.methods.expert_lora", "esft": "efftune.methods.esft", "mixlora": "efftune.methods.mixlora",
    "full": "efftune.methods.full",
}


def get_method(name: str) -> Method:
    if name not in METHOD_MODULES:
        raise ConfigError(f"method: unknown method {name!r} (available: {', '.join(METHOD_MODULES)})")
    method = importlib.import_module(METHOD_MODULES[name]).METHOD
    assert method.name == name, (name, method.name)
    return method


# What a saved directory holds, by its config file: peft's adapter_config.json names its type.
_PEFT_TYPES = {"LORA": "lora", "IA3": "ia3", "PROMPT_TUNING": "prompt-tuning", "PREFIX_TUNING": "prefix-tuning"}
_OWN_FORMATS = {"bitfit_config.json": "bitfit", "bottleneck_config.json": "bottleneck",
                "prompt_tuning_config.json": "prompt-tuning", "expert_lora_config.json": "expert-lora",
                "esft_config.json": "esft", "mixlora_config.json": "mixlora",
                "full_config.json": "full"}


def detect_method(directory) -> Method:
    """The method whose files `directory` holds (efftune's or peft's), for loading it."""
    d = Path(directory)
    if d.is_file():
        raise AdapterError(f"adapter: {d} is a file; pass the adapter's directory")
    if not d.is_dir():
        raise AdapterError(f"adapter: directory {d} does not exist")
    if (d / "adapter_config.json").is_file():
        kind = read_json_object(d / "adapter_config.json").get("peft_type", "LORA")
        if not isinstance(kind, str) or kind not in _PEFT_TYPES:
            raise AdapterError(f"adapter: {d} holds a peft {kind} adapter; efftune loads "
                               f"{', '.join(_PEFT_TYPES)}")
        return get_method(_PEFT_TYPES[kind])
    for file, name in _OWN_FORMATS.items():
        if (d / file).is_file():
            return get_method(name)
    raise AdapterError(f"adapter: {d} has no adapter_config.json (nor an efftune method's config file)")

"""Run configuration: flat dataclasses, loaded from YAML and overridden by command-line flags.

Every key is checked: an unknown key or a value of the wrong type is an error that names it.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, EfftuneError
from .methods.bitfit import BitFitConfig
from .methods.bottleneck import BottleneckConfig
from .methods.esft import EsftConfig
from .methods.expert_lora import ExpertLoraConfig
from .methods.ia3 import IA3Config
from .methods.lora import LoraConfig
from .methods.lora_fa import LoraFAConfig
from .methods.mixlora import MixLoraConfig
from .methods.prefix_tuning import PrefixTuningConfig
from .methods.prompt_tuning import PromptTuningConfig
from .train.relora import ReLoraConfig
from .train.loop import TrainConfig

DEFAULT_TASK = "intent_recognition"


@dataclass
class RunConfig:
    model: str = "default"            # "default", a hub id, a local directory or a .gguf file
    task: list[str] = field(default_factory=lambda: [DEFAULT_TASK])  # BIG-bench task(s)
    data: str | None = None           # a JSONL file instead of BIG-bench
    eval_data: str | None = None      # a JSONL file to evaluate on (default: held-out split)
    eval_size: int | None = None      # held-out examples per task, split off before training (None:
                                      # data.examples.DEFAULT_EVAL_SIZE, at most half a task; a number
                                      # asked for must fit in half)
    method: str = "lora"
    output: str = "runs/efftune"
    chat_template: bool = False
    dtype: str = "auto"
    device: str = "auto"
    lora: LoraConfig = field(default_factory=LoraConfig)
    lora_fa: LoraFAConfig = field(default_factory=LoraFAConfig)   # used with method: lora-fa
    relora: ReLoraConfig = field(default_factory=ReLoraConfig)     # method: relora (LoRA from `lora`)
    bitfit: BitFitConfig = field(default_factory=BitFitConfig)     # used with method: bitfit
    ia3: IA3Config = field(default_factory=IA3Config)              # used with method: ia3
    bottleneck: BottleneckConfig = field(default_factory=BottleneckConfig)  # used with method: bottleneck
    prompt_tuning: PromptTuningConfig = field(default_factory=PromptTuningConfig)  # method: prompt-tuning
    prefix_tuning: PrefixTuningConfig = field(default_factory=PrefixTuningConfig)  # method: prefix-tuning
    expert_lora: ExpertLoraConfig = field(default_factory=ExpertLoraConfig)  # method: expert-lora (MoE models)
    esft: EsftConfig = field(default_factory=EsftConfig)                      # method: esft (MoE models)
    mixlora: MixLoraConfig = field(default_factory=MixLoraConfig)             # method: mixlora
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        # what can be checked without loading anything is checked here, before a run touches the disk
        if self.eval_size is not None and self.eval_size < 0:
            raise ConfigError(f"eval_size must be 0 or more, got {self.eval_size}")
        from .models import check_device, resolve_dtype
        try:
            check_device(self.device)
            if self.dtype != "auto":
                resolve_dtype(self.dtype, None)
        except EfftuneError as exc:
            raise ConfigError(str(exc)) from None
        for section in dataclasses.fields(self):
            value = getattr(self, section.name)
            if dataclasses.is_dataclass(value):
                for key in PATTERN_KEYS:
                    check_pattern(getattr(value, key, None), f"{section.name}.{key}")


PATTERN_KEYS = ("target_modules", "feedforward_modules", "embeddings")  # a string there is a regex


def check_pattern(value: Any, key: str) -> None:
    """A module pattern given as a string is a regex (full match): it must compile."""
    if isinstance(value, str) and value != "all-linear":
        try:
            re.compile(value)
        except re.error as exc:
            raise ConfigError(f"{key}: {value!r} is not a valid regex ({exc})") from None


def _check_type(value: Any, hint: Any, key: str) -> Any:
    """Coerce YAML scalars to the field's type (int -> float, str -> [str]) or raise."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check_type(value, option, key)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0] if errors else ConfigError(f"{key}: unexpected value {value!r}")
    if origin is list:
        (inner,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_check_type(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def build(cls, values: dict, section: str = ""):
    """Make dataclass `cls` from a dict, checking every key and type."""
    if not isinstance(values, dict):
        raise ConfigError(f"{section or 'config'}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = f"{section}.{key}" if section else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"unknown config key {name!r} ({hint}known: {', '.join(fields)})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = build(hint, value, name)
        else:
            kwargs[key] = _check_type(value, hint, name)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        named = not section or str(exc).startswith((f"{section}.", f"{section}:"))  # the key is in the message
        raise ConfigError(f"{'' if named else section + ': '}{exc}") from None


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: the problem and where."""
    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(exc).split())


def load_config(path: str | Path | None, overrides: dict | None = None) -> RunConfig:
    """Read a YAML file (optional) and apply `overrides` ({"train": {"steps": 5}, "model": ...})."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a directory; pass a YAML file")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            values = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path}: byte offset {exc.start} is not UTF-8") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(exc)}") from None
        except RecursionError:
            raise ConfigError(f"config file {path} is nested too deeply") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level")
    for key, value in (overrides or {}).items():
        if isinstance(value, dict):
            values[key] = {**(values.get(key) or {}), **value}
        else:
            values[key] = value
    try:
        return build(RunConfig, values)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None

"""Run configuration: flat dataclasses, loaded from YAML and overridden by command-line flags.

Every key is checked: an unknown key or a value of the wrong type is an error that names it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .checks import build, check_pattern
from .data.options import DataConfig, moved_key
from .errors import ConfigError, EfftuneError
from .methods.bitfit import BitFitConfig
from .methods.bottleneck import BottleneckConfig
from .methods.esft import EsftConfig
from .methods.expert_lora import ExpertLoraConfig
from .methods.full import FullConfig
from .methods.ia3 import IA3Config
from .methods.lora.config import LoraConfig
from .methods.lora_fa import LoraFAConfig
from .methods.mixlora import MixLoraConfig
from .methods.prefix_tuning import PrefixTuningConfig
from .methods.prompt_tuning import PromptTuningConfig
from .methods.registry import get_method
from .methods.relora import ReLoraConfig
from .train.loop import TrainConfig

DEFAULT_TASK = "intent_recognition"


@dataclass
class RunConfig:
    model: str = "default"            # "default", a hub id, a local directory or a .gguf file
    task: list[str] = field(default_factory=lambda: [DEFAULT_TASK])  # BIG-bench task(s)
    data: DataConfig = field(default_factory=DataConfig)  # your data instead of BIG-bench, and how it is read
    eval_samples: int = 3             # greedy replies to held-out conversations per evaluation (samples.jsonl)
    log: list[str] = field(default_factory=list)  # metrics also to: tensorboard, wandb (efftune.train.log_sinks)
    eval_size: int | None = None      # held-out examples per task, split off before training (None:
                                      # data.examples.DEFAULT_EVAL_SIZE, at most half a task; a number
                                      # asked for must fit in half)
    method: str = "lora"
    output: str = "runs/efftune"
    chat_template: bool = False
    dtype: str = "auto"
    device: str = "auto"
    quantize: str = "none"            # nf4 | int8: the frozen decoder-block linears, quantised at load
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
    full: FullConfig = field(default_factory=FullConfig)                      # method: full (every weight)
    retention: list[str] = field(default_factory=list)  # a retention panel (efftune.eval.retention): scored
                                                        # before and after training; empty: none
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        # what can be checked without loading anything is checked here, before a run touches the disk
        if self.eval_size is not None and self.eval_size < 0:
            raise ConfigError(f"eval_size must be 0 or more, got {self.eval_size}")
        if self.eval_samples < 0:
            raise ConfigError(f"eval_samples must be 0 or more, got {self.eval_samples}")
        from .train.log_sinks import check_sinks
        check_sinks(self.log)
        from .models import check_device, resolve_dtype
        try:
            check_device(self.device)
            if self.dtype != "auto":
                resolve_dtype(self.dtype, None)
        except EfftuneError as exc:
            raise ConfigError(str(exc)) from None
        from .quantize.model import check_quantize
        check_quantize(self.quantize, self.train.fp8_base)
        check_combination(self)
        for section in dataclasses.fields(self):
            value = getattr(self, section.name)
            if dataclasses.is_dataclass(value):
                for key in PATTERN_KEYS:
                    check_pattern(getattr(value, key, None), f"{section.name}.{key}")


def check_combination(cfg: "RunConfig") -> None:
    """Settings that cannot run together, refused before anything loads, naming both."""
    if get_method(cfg.method).writes_base:  # the method's own record says so (ReLoRA, full)
        if cfg.train.fp8_base:
            raise ConfigError(f"method {cfg.method} writes into the base weights, so train.fp8_base (the frozen "
                              "base linears in FP8) cannot run with it: drop --fp8-base or pick an adapter method")
        if cfg.quantize != "none":
            raise ConfigError(f"quantize: {cfg.quantize} cannot run with method: {cfg.method}, which writes into the "
                              "base weights; a quantised base cannot take them (drop --quantize or use method: lora)")
    if cfg.method == "esft" and cfg.esft.mode == "full" and cfg.quantize != "none":
        raise ConfigError(f"quantize: {cfg.quantize} cannot run with method: esft and esft.mode: full, which trains "
                          "the selected experts' own weights; a quantised base cannot take them (use esft.mode: lora)")
    if cfg.method == "relora" and cfg.train.optimizer != "adamw":
        raise ConfigError("method relora prunes Adam's moments in place at each restart, which train.optimizer "
                          f"{cfg.train.optimizer}'s 8-bit moments do not support: use train.optimizer adamw")


PATTERN_KEYS = ("target_modules", "feedforward_modules", "embeddings")  # a string there is a regex


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
    for where, given in ((f"{path}: ", values), ("", overrides or {})):
        moved = moved_key(given)  # written before the data section: say where the key went
        if moved:
            raise ConfigError(where + moved)
    for key, value in (overrides or {}).items():
        if isinstance(value, dict):
            values[key] = {**(values.get(key) or {}), **value}
        else:
            values[key] = value
    try:
        return build(RunConfig, values)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None

"""Fine-tuning methods. Each is a small module; `METHODS` maps `--method` names to how a method
attaches to a model, how its result is saved and loaded, and (optionally) how it changes the
training loop."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn


@dataclass(frozen=True)
class Method:
    name: str
    config_key: str                                             # its section in the run config
    attach: Callable[[nn.Module, object, object], list[str]]    # (model, config, tokenizer) -> adapted modules
    save: Callable[[nn.Module, str, object, dict], object]      # (model, dir, config, metadata)
    load: Callable[[nn.Module, str], object]                    # (model, dir) -> config
    hooks: Callable[[nn.Module, object], object] | None = None  # (model, run config) -> TrainHooks
    artifact: str = "adapter"                                   # what `save` writes: adapter | model
    prefix: Callable[[nn.Module, object], list[int]] | None = None  # ids every prompt starts with


def _lora() -> Method:
    from .. import io
    from .lora import add_lora
    return Method("lora", "lora", attach=lambda model, cfg, tok: add_lora(model, cfg),
                  save=lambda model, d, cfg, meta: io.save_adapter(model, d, cfg, metadata=meta),
                  load=lambda model, d: io.load_adapter(model, d))


def _lora_fa() -> Method:
    from .. import io
    from .lora_fa import add_lora_fa, load_lora_fa
    return Method("lora-fa", "lora_fa", attach=lambda model, cfg, tok: add_lora_fa(model, cfg),
                  save=lambda model, d, cfg, meta: io.save_adapter(
                      model, d, cfg, metadata={"method": "lora-fa", "correction": cfg.correction, **meta}),
                  load=lambda model, d: load_lora_fa(model, d))


def _relora() -> Method:
    # ReLoRA changes the base weights at every restart, so its result is a whole model.
    from ..compose.merge import export_merged
    from ..train.relora import relora_hooks
    from .lora import add_lora
    return Method("relora", "lora", attach=lambda model, cfg, tok: add_lora(model, cfg),
                  save=lambda model, d, cfg, meta: export_merged(model, None, d),
                  load=lambda model, d: None, hooks=relora_hooks, artifact="model")


def _bitfit() -> Method:
    from .bitfit import add_bitfit, load_bitfit, save_bitfit
    return Method("bitfit", "bitfit", attach=lambda model, cfg, tok: add_bitfit(model, cfg),
                  save=save_bitfit, load=load_bitfit)


def _ia3() -> Method:
    from .ia3 import add_ia3, load_ia3, save_ia3
    return Method("ia3", "ia3", attach=lambda model, cfg, tok: add_ia3(model, cfg), save=save_ia3, load=load_ia3)


def _bottleneck() -> Method:
    from .bottleneck import add_bottleneck, load_bottleneck, save_bottleneck
    return Method("bottleneck", "bottleneck", attach=lambda model, cfg, tok: add_bottleneck(model, cfg),
                  save=save_bottleneck, load=load_bottleneck)


def _prompt_tuning() -> Method:
    # Soft prompts are addressed by virtual token ids every prompt starts with (see the module).
    from .prompt_tuning import add_prompt_tuning, load_prompt_tuning, save_prompt_tuning, virtual_ids
    return Method("prompt-tuning", "prompt_tuning", attach=add_prompt_tuning, save=save_prompt_tuning,
                  load=load_prompt_tuning, prefix=lambda model, cfg: virtual_ids(model, cfg.tasks[0]))


def _prefix_tuning() -> Method:
    # The prefixes live in the wrapped decoder body's attention cache: prompts need no special ids.
    from .prefix_tuning import add_prefix_tuning, load_prefix_tuning, save_prefix_tuning
    return Method("prefix-tuning", "prefix_tuning", attach=add_prefix_tuning, save=save_prefix_tuning,
                  load=load_prefix_tuning)


def _expert_lora() -> Method:
    from .expert_lora import add_expert_lora, load_expert_lora, save_expert_lora
    return Method("expert-lora", "expert_lora", attach=lambda model, cfg, tok: add_expert_lora(model, cfg),
                  save=save_expert_lora, load=load_expert_lora)


def _esft() -> Method:
    # selects experts from esft.selection (JSON) or by routing esft.data through the model
    from .esft import add_esft, load_esft, save_esft
    return Method("esft", "esft", attach=add_esft, save=save_esft, load=load_esft)


def _mixlora() -> Method:
    # Experts and routers are token-routed (not mergeable): the result is efftune's own format.
    from .mixlora import add_mixlora, load_mixlora, save_mixlora
    return Method("mixlora", "mixlora", attach=add_mixlora, save=save_mixlora, load=load_mixlora)


METHODS: dict[str, Callable[[], Method]] = {
    "lora": _lora, "lora-fa": _lora_fa, "relora": _relora,
    "bitfit": _bitfit, "ia3": _ia3, "bottleneck": _bottleneck, "prompt-tuning": _prompt_tuning,
    "prefix-tuning": _prefix_tuning, "expert-lora": _expert_lora, "esft": _esft,
    "mixlora": _mixlora,
}


def get_method(name: str) -> Method:
    from ..errors import ConfigError
    if name not in METHODS:
        raise ConfigError(f"method: unknown method {name!r} (available: {', '.join(METHODS)})")
    return METHODS[name]()


# What a saved directory holds, by its config file: peft's adapter_config.json names its type.
_PEFT_TYPES = {"LORA": "lora", "IA3": "ia3", "PROMPT_TUNING": "prompt-tuning", "PREFIX_TUNING": "prefix-tuning"}
_OWN_FORMATS = {"bitfit_config.json": "bitfit", "bottleneck_config.json": "bottleneck",
                "prompt_tuning_config.json": "prompt-tuning", "expert_lora_config.json": "expert-lora",
                "esft_config.json": "esft", "mixlora_config.json": "mixlora"}


def detect_method(directory) -> Method:
    """The method whose files `directory` holds (efftune's or peft's), for loading it."""
    from ..errors import AdapterError
    from ..io import read_json_object
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

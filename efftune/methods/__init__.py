"""Fine-tuning methods. Each is a small module; `METHODS` maps `--method` names to how a method
attaches to a model, how its result is saved and loaded, and (optionally) how it changes the
training loop."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn


@dataclass(frozen=True)
class Method:
    name: str
    config_key: str                                             # its section in the run config
    attach: Callable[[nn.Module, object], list[str]]            # (model, config) -> adapted modules
    save: Callable[[nn.Module, str, object, dict], object]      # (model, dir, config, metadata)
    load: Callable[[nn.Module, str], object]                    # (model, dir) -> config
    hooks: Callable[[nn.Module, object], object] | None = None  # (model, run config) -> TrainHooks
    artifact: str = "adapter"                                   # what `save` writes: adapter | model


def _lora() -> Method:
    from .. import io
    from .lora import add_lora
    return Method("lora", "lora", attach=lambda model, cfg: add_lora(model, cfg),
                  save=lambda model, d, cfg, meta: io.save_adapter(model, d, cfg, metadata=meta),
                  load=lambda model, d: io.load_adapter(model, d))


def _lora_fa() -> Method:
    from .. import io
    from .lora_fa import add_lora_fa, load_lora_fa
    return Method("lora-fa", "lora_fa", attach=add_lora_fa,
                  save=lambda model, d, cfg, meta: io.save_adapter(
                      model, d, cfg, metadata={"method": "lora-fa", "correction": cfg.correction, **meta}),
                  load=lambda model, d: load_lora_fa(model, d))


def _relora() -> Method:
    # ReLoRA changes the base weights at every restart, so its result is a whole model.
    from ..compose.merge import export_merged
    from ..train.relora import relora_hooks
    from .lora import add_lora
    return Method("relora", "lora", attach=lambda model, cfg: add_lora(model, cfg),
                  save=lambda model, d, cfg, meta: export_merged(model, None, d),
                  load=lambda model, d: None, hooks=relora_hooks, artifact="model")


def _bitfit() -> Method:
    from .bitfit import add_bitfit, load_bitfit, save_bitfit
    return Method("bitfit", "bitfit", attach=add_bitfit, save=save_bitfit, load=load_bitfit)


def _ia3() -> Method:
    from .ia3 import add_ia3, load_ia3, save_ia3
    return Method("ia3", "ia3", attach=add_ia3, save=save_ia3, load=load_ia3)


def _bottleneck() -> Method:
    from .bottleneck import add_bottleneck, load_bottleneck, save_bottleneck
    return Method("bottleneck", "bottleneck", attach=add_bottleneck, save=save_bottleneck, load=load_bottleneck)


METHODS: dict[str, Callable[[], Method]] = {
    "lora": _lora, "lora-fa": _lora_fa, "relora": _relora,
    "bitfit": _bitfit, "ia3": _ia3, "bottleneck": _bottleneck,
}


def get_method(name: str) -> Method:
    from ..errors import ConfigError
    if name not in METHODS:
        raise ConfigError(f"method: unknown method {name!r} (available: {', '.join(METHODS)})")
    return METHODS[name]()

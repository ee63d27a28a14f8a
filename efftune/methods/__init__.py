"""Fine-tuning methods. Each is a small module; `METHODS` maps `--method` names to how a method
attaches to a model and how its result is saved and loaded."""
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


METHODS: dict[str, Callable[[], Method]] = {"lora": _lora, "lora-fa": _lora_fa}


def get_method(name: str) -> Method:
    from ..errors import ConfigError
    if name not in METHODS:
        raise ConfigError(f"method: unknown method {name!r} (available: {', '.join(METHODS)})")
    return METHODS[name]()

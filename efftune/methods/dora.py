"""`--method dora`: LoRA's adapters with DoRA's magnitude (`lora.dora` holds the method itself).

DoRA takes LoRA's config section (`lora.*`, `--rank`, `--alpha`, ...) and sets `use_dora`, so
`--method dora` and `--method lora --lora.use-dora` are the same run. Saved and loaded as peft's
DoRA adapter (`use_dora: true`, `lora_magnitude_vector`)."""
from __future__ import annotations

import dataclasses

from torch import nn

from .lora.config import LoraConfig
from .lora.model import add_lora
from .lora.peft_format import load_adapter, save_adapter
from .registry import Method


def add_dora(model: nn.Module, config: LoraConfig | None = None, adapter: str = "default", *,
             tokenizer=None) -> list[str]:
    """Attach a DoRA adapter to every module `config` targets (`add_lora` with `use_dora`).
    (`tokenizer`: unused, as every method's attach takes one.)"""
    return add_lora(model, dataclasses.replace(config or LoraConfig(), use_dora=True), adapter)


METHOD = Method("dora", "lora", attach=add_dora, save=save_adapter, load=load_adapter)

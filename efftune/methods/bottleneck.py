"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021): `h + W_up f(W_down h)`.

`h` (batch, seq, hidden) is the output of a decoder layer's attention and/or FFN sublayer, before
the residual add; `W_down` (size, hidden) and `W_up` (hidden, size) carry biases. `placement`
"houlsby" adapts both sublayers, "pfeiffer" the FFN only. `W_up` and its bias start at zero, so
training starts exactly at the base model. An adapter wraps the sublayer module itself (Llama's
`model.layers.N.self_attn` / `.mlp`); attention returns a tuple, of which only the first element
(the hidden states) is adapted. Not mergeable: the nonlinearity `f` keeps the adapter out of any
weight, so it stays a module at inference too.

On disk (efftune's own format, safetensors only):
- `bottleneck_config.json`: {"method": "bottleneck", "format_version": 1, "bottleneck_size",
  "placement", "activation", "attn_module", "ffn_module", "base_model_name_or_path",
  "efftune": run metadata}.
- `bottleneck_model.safetensors`: per adapted sublayer `<module path>.adapter_down.weight`
  (size, hidden), `.adapter_down.bias` (size,), `.adapter_up.weight` (hidden, size) and
  `.adapter_up.bias` (hidden,) — the parameters' names in the adapted model.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..attach import find_targets, freeze_base, master_dtype, replace_module, wrappers
from ..errors import AdapterError, ConfigError, EfftuneError
from ..files import AdapterFormat, config_from
from .registry import Method

CONFIG_FILE = "bottleneck_config.json"
WEIGHTS_FILE = "bottleneck_model.safetensors"
FORMAT = AdapterFormat("bottleneck", CONFIG_FILE, WEIGHTS_FILE)
FIELDS = ("bottleneck_size", "placement", "activation", "attn_module", "ffn_module")  # saved, in this order
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
PLACEMENTS = ("houlsby", "pfeiffer")


@dataclass
class BottleneckConfig:
    """`attn_module` / `ffn_module`: the sublayers' module names in a decoder layer (Llama's
    `self_attn` / `mlp`; GPT-2's `attn` / `mlp`)."""
    bottleneck_size: int = 64
    placement: str = "houlsby"
    activation: str = "relu"
    attn_module: str = "self_attn"
    ffn_module: str = "mlp"

    def __post_init__(self):
        if not isinstance(self.bottleneck_size, int) or self.bottleneck_size < 1:
            raise ConfigError(f"bottleneck.bottleneck_size must be a positive integer, got {self.bottleneck_size!r}")
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"bottleneck.placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"bottleneck.activation must be one of {tuple(ACTIVATIONS)}, got {self.activation!r}")

    def sublayers(self) -> list[str]:
        return [self.attn_module, self.ffn_module] if self.placement == "houlsby" else [self.ffn_module]


class BottleneckAdapter(nn.Module):
    """A sublayer followed by a residual bottleneck on its (first) output."""

    def __init__(self, base_layer: nn.Module, hidden_size: int, bottleneck_size: int, activation: str,
                 *, device=None, dtype=None):
        super().__init__()
        self.base_layer = base_layer
        self.adapter_down = nn.Linear(hidden_size, bottleneck_size, device=device, dtype=dtype)
        self.act = ACTIVATIONS[activation]()
        self.adapter_up = nn.Linear(bottleneck_size, hidden_size, device=device, dtype=dtype)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def adapt(self, h: torch.Tensor) -> torch.Tensor:
        """(..., hidden) -> (..., hidden): `h + W_up f(W_down h)`."""
        x = h.to(self.adapter_down.weight.dtype) if not torch.is_autocast_enabled(h.device.type) else h
        return h + self.adapter_up(self.act(self.adapter_down(x))).to(h.dtype)

    def forward(self, *args, **kwargs):
        out = self.base_layer(*args, **kwargs)
        if isinstance(out, tuple):  # attention: (hidden states, attention weights, ...)
            return (self.adapt(out[0]), *out[1:])
        return self.adapt(out)


def _hidden_size(model: nn.Module) -> int:
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(size, int):
        raise ConfigError("bottleneck: the model's config has no hidden_size, so the adapter width is unknown")
    return size


def bottleneck_adapters(model: nn.Module) -> Iterator[tuple[str, BottleneckAdapter]]:
    return wrappers(model, BottleneckAdapter)


def add_bottleneck(model: nn.Module, config: BottleneckConfig | None = None, *, tokenizer=None) -> list[str]:
    """Freeze the model and wrap each targeted sublayer in a trainable BottleneckAdapter.
    Returns the wrapped module paths. (`tokenizer`: unused, as every method's attach takes one.)"""
    config = config or BottleneckConfig()
    if any(True for _ in bottleneck_adapters(model)):
        raise EfftuneError("the model already has bottleneck adapters; unload them first")
    hidden = _hidden_size(model)
    names = find_targets(model, config.sublayers(), accept=lambda m: True)
    freeze_base(model)
    for name in names:
        base = model.get_submodule(name)
        # the sublayer's floating-point weights give the adapter's dtype and device; one whose linears
        # are all quantised (integer packed parameters, efftune.quantize) has none: the embeddings' then
        p = next((q for q in base.parameters() if q.is_floating_point()), None)
        p = model.get_input_embeddings().weight if p is None else p
        dtype = master_dtype(p.dtype)
        replace_module(model, name, BottleneckAdapter(base, hidden, config.bottleneck_size, config.activation,
                                                      device=p.device, dtype=dtype))
    return names


def unload_bottleneck(model: nn.Module) -> nn.Module:
    """Put the plain sublayers back (the adapters are dropped: they cannot be merged)."""
    for name, adapter in list(bottleneck_adapters(model)):
        replace_module(model, name, adapter.base_layer)
    return model


def bottleneck_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter parameter under its file key (its name in the adapted model), in model order."""
    state = {}
    for path, adapter in bottleneck_adapters(model):
        for name, p in adapter.named_parameters():
            if not name.startswith("base_layer."):
                state[f"{path}.{name}"] = p
    return state


def save_bottleneck(model: nn.Module, directory: str | os.PathLike, config: BottleneckConfig,
                    metadata: dict | None = None) -> Path:
    """Write the adapters and `config` to `directory` (atomically)."""
    state = bottleneck_state_dict(model)
    if not state:
        raise AdapterError("the model has no bottleneck adapters to save")
    return FORMAT.save(model, directory, {f: getattr(config, f) for f in FIELDS}, state, metadata)


def load_bottleneck(model: nn.Module, directory: str | os.PathLike) -> BottleneckConfig:
    """Attach the bottleneck adapters saved in `directory`, all or nothing; returns their config.
    Every key and shape is checked against the model; the first misfit is named."""
    directory = Path(directory)
    cfg, tensors = FORMAT.read(directory)
    config = config_from(BottleneckConfig, cfg, FIELDS, directory / CONFIG_FILE)
    FORMAT.load(model, directory, tensors, lambda: add_bottleneck(model, config), lambda: bottleneck_state_dict(model))
    return config


METHOD = Method("bottleneck", "bottleneck", attach=add_bottleneck, save=save_bottleneck, load=load_bottleneck)

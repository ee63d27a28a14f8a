"""BitFit (Ben-Zaken et al. 2022): train only bias terms; every weight stays frozen.

Trained: the biases of the targeted linears (default "all-linear": every linear but the output
head) and, with `norms`, of every normalisation layer that has one. Targeted linears without a
bias are skipped — unless `add_biases`, which wraps each in an `AddedBias` holding a zero-initialised
trainable bias (out,), so training starts exactly at the base model. Llama-style models have no
biases at all, so there `add_biases` is required. Merging folds an added bias into the `bias` of
a new nn.Linear; the model's own biases are trained in place and need no merge.

On disk (efftune's own format, safetensors only):
- `bitfit_config.json`: {"method": "bitfit", "format_version": 1, "target_modules", "norms",
  "add_biases", "added": [paths of the linears that got a new bias], "base_model_name_or_path",
  "efftune": run metadata}.
- `bitfit_model.safetensors`: one tensor per trained bias, keyed `<module path>.bias` (exactly the
  parameter's name in the merged model), shape (out_features,) or the norm's (hidden,). The
  values are whole biases, not differences: loading overwrites the model's biases with them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..attach import find_targets, freeze_base, master_dtype, replace_module, wrappers
from ..errors import AdapterError, ConfigError, EfftuneError
from ..files import AdapterFormat, config_from
from .registry import Method

CONFIG_FILE = "bitfit_config.json"
WEIGHTS_FILE = "bitfit_model.safetensors"
FORMAT = AdapterFormat("bitfit", CONFIG_FILE, WEIGHTS_FILE)


@dataclass
class BitFitConfig:
    """`target_modules`: linears whose biases train ("all-linear", suffixes, or a full-match regex;
    empty for norms only). `norms`: train normalisation-layer biases too. `add_biases`: give
    targeted linears that lack a bias a zero-initialised one."""
    target_modules: str | list[str] = "all-linear"
    norms: bool = True
    add_biases: bool = False

    def __post_init__(self):
        if not self.target_modules and not self.norms:
            raise ConfigError("bitfit.target_modules is empty and bitfit.norms is false: no bias would train")


class AddedBias(nn.Module):
    """A bias-free linear plus a trainable bias: `y = W x + bias`, bias (out,) starting at zero."""

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        w = base_layer.weight
        dtype = master_dtype(w.dtype)
        self.bias = nn.Parameter(torch.zeros(w.shape[0], device=w.device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        return y + self.bias.to(y.dtype)

    def merged_linear(self) -> nn.Linear:
        """A new nn.Linear sharing the base weight, with this bias as its real `bias`."""
        w = self.base_layer.weight
        new = nn.Linear(w.shape[1], w.shape[0], bias=True, device="meta")  # no throwaway allocation
        new.weight = w
        new.bias = nn.Parameter(self.bias.detach().to(w.dtype).clone(), requires_grad=self.bias.requires_grad)
        return new


def _is_norm(module: nn.Module) -> bool:
    # Norm classes share no base class across architectures (LlamaRMSNorm, T5LayerNorm, ...).
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.endswith("Norm")


def _targets(model: nn.Module, config: BitFitConfig) -> tuple[list[str], list[str]]:
    """(targeted linear paths, paths of norms with a bias)."""
    linears = find_targets(model, config.target_modules) if config.target_modules else []
    norms = [n for n, m in model.named_modules()
             if config.norms and _is_norm(m) and isinstance(getattr(m, "bias", None), nn.Parameter)]
    return linears, norms


def _bias_paths(model: nn.Module, config: BitFitConfig) -> list[str]:
    """Modules whose `bias` BitFit trains, in model order."""
    linears, norms = _targets(model, config)
    have = [p for p in linears if getattr(model.get_submodule(p), "bias", None) is not None]
    return have + norms


def add_bitfit(model: nn.Module, config: BitFitConfig | None = None, *, tokenizer=None) -> list[str]:
    """Freeze the model and switch on the biases `config` selects (adding them first where
    `add_biases`). Returns the module paths whose bias trains. (`tokenizer`: unused, as
    every method's attach takes one.)"""
    config = config or BitFitConfig()
    if any(True for _ in wrappers(model, AddedBias)):
        raise EfftuneError("the model already has BitFit biases added; unload them first")
    linears, norms = _targets(model, config)
    lacking = [p for p in linears if getattr(model.get_submodule(p), "bias", None) is None]
    if config.add_biases:
        for path in lacking:
            replace_module(model, path, AddedBias(model.get_submodule(path)))
    elif len(lacking) == len(linears) and not norms:
        raise ConfigError("bitfit: none of the targeted modules has a bias (Llama-style models have "
                          "none); set bitfit.add_biases=true to give the targeted linears "
                          "zero-initialised trainable biases")
    freeze_base(model)
    paths = _bias_paths(model, config)
    for path in paths:
        model.get_submodule(path).bias.requires_grad_(True)
    return paths


def unload_bitfit(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace each AddedBias by a plain nn.Linear whose bias is the learned one (`merge`), or by
    the bias-free base linear (`merge=False`, dropping the added biases)."""
    for path, layer in list(wrappers(model, AddedBias)):
        replace_module(model, path, layer.merged_linear() if merge else layer.base_layer)
    return model


def bitfit_state_dict(model: nn.Module, config: BitFitConfig) -> dict[str, torch.Tensor]:
    """The biases BitFit trains, under their file keys (`<module path>.bias`), in model order."""
    return {f"{p}.bias": model.get_submodule(p).bias for p in _bias_paths(model, config)}


def save_bitfit(model: nn.Module, directory: str | os.PathLike, config: BitFitConfig,
                metadata: dict | None = None) -> Path:
    """Write the trained biases and `config` to `directory` (atomically)."""
    state = bitfit_state_dict(model, config)
    if not state:
        raise AdapterError("the model has no biases for this BitFit config to save")
    fields = {"target_modules": config.target_modules, "norms": config.norms, "add_biases": config.add_biases,
              "added": [p for p, _ in wrappers(model, AddedBias)]}
    return FORMAT.save(model, directory, fields, state, metadata)


def load_bitfit(model: nn.Module, directory: str | os.PathLike) -> BitFitConfig:
    """Set up BitFit as saved in `directory` and load its biases, all or nothing; returns the
    saved config. Every key and shape is checked against the model; the first misfit is named."""
    directory = Path(directory)
    cfg, tensors = FORMAT.read(directory)
    config = config_from(BitFitConfig, cfg, ("target_modules", "norms", "add_biases"), directory / CONFIG_FILE)
    modules = dict(model.named_modules())
    for key in tensors:
        if not key.endswith(".bias") or key.removesuffix(".bias") not in modules:
            raise AdapterError(f"adapter: key {key!r} in {directory / WEIGHTS_FILE} names no module of this model")
    FORMAT.load(model, directory, tensors, lambda: add_bitfit(model, config), lambda: bitfit_state_dict(model, config))
    return config


METHOD = Method("bitfit", "bitfit", attach=add_bitfit, save=save_bitfit, load=load_bitfit)

"""(IA)³ (Liu et al. 2022): learned vectors that rescale activations, everything else frozen.

A non-feedforward target (k_proj, v_proj) has its OUTPUT scaled, `y = l ⊙ (W x + b)` with
`ia3_l` of shape (out, 1); a feedforward target (down_proj) has its INPUT scaled, `y = W (l ⊙ x) + b`
with `ia3_l` of shape (1, in) — so the FFN's intermediate activation is what gets rescaled. The
vectors start at ones, i.e. at the base model. Merging multiplies weight rows (and the bias) or
weight columns; unmerging divides back.

On disk this is peft's IA3 format: `adapter_config.json` (`"peft_type": "IA3"`) and
`adapter_model.safetensors` with keys `base_model.model.<module path>.ia3_l` of the shapes above,
so `peft.PeftModel.from_pretrained` reads what we write and we read what peft writes.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..attach import _conv1d_class, find_targets, freeze_base, master_dtype, name_matches, replace_module, wrappers
from ..errors import AdapterError, ConfigError, EfftuneError
from ..files import (base_model_name, checked_field, is_str_list, load_all_or_nothing, read_adapter_dir,
                     write_adapter_dir)
from .registry import Method

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


@dataclass
class IA3Config:
    """`target_modules`: module-name suffixes, a regex (full match on the path) or "all-linear".
    `feedforward_modules`: which targets get their input scaled (must be among the targets)."""
    target_modules: str | list[str] = field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    feedforward_modules: str | list[str] = field(default_factory=lambda: ["down_proj"])

    def __post_init__(self):
        if not self.target_modules:
            raise ConfigError("ia3.target_modules is empty: name the modules to scale")
        if isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list):
            extra = [m for m in self.feedforward_modules if m not in self.target_modules]
            if extra:
                raise ConfigError(f"ia3.feedforward_modules must be a subset of ia3.target_modules; "
                                  f"{extra[0]!r} is not a target")


class IA3Layer(nn.Module):
    """A linear (nn.Linear or Conv1D) whose output — or, if `is_feedforward`, input — is scaled
    by the learned vector `ia3_l`: shape (out, 1), or (1, in) for a feedforward layer (peft's)."""

    def __init__(self, base_layer: nn.Module, is_feedforward: bool):
        super().__init__()
        self.base_layer = base_layer
        self.is_feedforward = is_feedforward
        self.merged = False
        w = base_layer.weight
        in_f, out_f = w.shape if self.fan_in_fan_out else w.shape[::-1]  # nn.Linear: (out, in)
        dtype = master_dtype(w.dtype)
        shape = (1, in_f) if is_feedforward else (out_f, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, device=w.device, dtype=dtype))

    @property
    def fan_in_fan_out(self) -> bool:
        return isinstance(self.base_layer, _conv1d_class())  # Conv1D stores its weight (in, out)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        scale = self.ia3_l.flatten()
        if self.is_feedforward:
            return self.base_layer((x * scale).to(x.dtype), *args, **kwargs)
        y = self.base_layer(x, *args, **kwargs)
        return (y * scale).to(y.dtype)

    def merge(self) -> None:
        if not self.merged:
            self._rescale(inverse=False)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            if (self.ia3_l == 0).any():
                raise EfftuneError("cannot unmerge an (IA)³ vector with a zero entry (the weights it "
                                   "scaled to zero are lost)")
            self._rescale(inverse=True)
            self.merged = False

    @torch.no_grad()
    def _rescale(self, inverse: bool) -> None:
        """Multiply (or divide back) weight rows and the bias for output scaling, weight columns
        for input scaling (the bias is added after `W x`, so input scaling leaves it alone)."""
        op = torch.div if inverse else torch.mul
        w, b = self.base_layer.weight, getattr(self.base_layer, "bias", None)
        w.copy_(op(w, self.ia3_l.T if self.fan_in_fan_out else self.ia3_l).to(w.dtype))
        if b is not None and not self.is_feedforward:
            b.copy_(op(b, self.ia3_l.flatten()).to(b.dtype))


# ---- model-level API ---------------------------------------------------------------------------

def ia3_layers(model: nn.Module) -> Iterator[tuple[str, IA3Layer]]:
    return wrappers(model, IA3Layer)


def add_ia3(model: nn.Module, config: IA3Config | None = None, *, tokenizer=None) -> list[str]:
    """Freeze the model and wrap every targeted linear in an IA3Layer whose `ia3_l` trains.
    Returns the wrapped module paths. (`tokenizer`: unused, as every method's attach takes one.)"""
    config = config or IA3Config()
    if any(True for _ in ia3_layers(model)):
        raise EfftuneError("the model already has (IA)³ vectors; unload them first")
    names = find_targets(model, config.target_modules)
    freeze_base(model)
    for name in names:
        layer = IA3Layer(model.get_submodule(name), name_matches(name, config.feedforward_modules))
        replace_module(model, name, layer)
    return names


def merge_ia3(model: nn.Module) -> None:
    for _, layer in ia3_layers(model):
        layer.merge()


def unmerge_ia3(model: nn.Module) -> None:
    for _, layer in ia3_layers(model):
        layer.unmerge()


def unload_ia3(model: nn.Module, merge: bool = True) -> nn.Module:
    """Put the base linears back, with the vectors folded in unless `merge=False`."""
    for name, layer in list(ia3_layers(model)):
        layer.merge() if merge else layer.unmerge()
        replace_module(model, name, layer.base_layer)
    return model


def _suffixes_or_regex(paths: list[str], selects) -> list[str] | str:
    """Leaf names when they select exactly `paths` (readable, as peft writes), else an exact regex."""
    suffixes = list(dict.fromkeys(p.rsplit(".", 1)[-1] for p in paths))
    return suffixes if selects(suffixes) else "|".join(re.escape(p) for p in paths)


def ia3_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every (IA)³ vector under its peft key, in model order."""
    return {f"{PREFIX}{p}.ia3_l": layer.ia3_l for p, layer in ia3_layers(model)}


def save_ia3(model: nn.Module, directory: str | os.PathLike, config: IA3Config | None = None,
             metadata: dict | None = None) -> Path:
    """Write the vectors as a peft IA3 adapter directory (atomically). `config` is accepted for
    the registry's signature; what is written comes from the attached layers themselves."""
    layers = list(ia3_layers(model))
    if not layers:
        raise AdapterError("the model has no (IA)³ vectors to save")
    if any(layer.merged for _, layer in layers):
        raise AdapterError("unmerge the (IA)³ vectors before saving them")
    paths = [p for p, _ in layers]
    ff = [p for p, layer in layers if layer.is_feedforward]
    targets = _suffixes_or_regex(paths, lambda s: find_targets(model, s) == paths)
    feedforward = _suffixes_or_regex(ff, lambda s: all(name_matches(p, s) == (p in ff) for p in paths)) if ff else []
    base = base_model_name(model)
    cfg = {"peft_type": "IA3", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
           "target_modules": targets, "feedforward_modules": feedforward, "fan_in_fan_out":
           any(layer.fan_in_fan_out for _, layer in layers), "init_ia3_weights": True,
           "inference_mode": True, "modules_to_save": None, "exclude_modules": None}
    if metadata:
        cfg["efftune"] = metadata
    return write_adapter_dir(directory, cfg, ia3_state_dict(model), CONFIG_FILE, WEIGHTS_FILE)


def load_ia3(model: nn.Module, directory: str | os.PathLike) -> IA3Config:
    """Attach the (IA)³ vectors saved in `directory` (by efftune or peft), all or nothing; returns their config.
    Every key and shape is checked against the model; the first misfit is named."""
    directory = Path(directory)
    cfg, tensors = read_adapter_dir(directory, CONFIG_FILE, WEIGHTS_FILE, kind=("peft_type", "IA3"))
    modules, paths = dict(model.named_modules()), {}
    for key in tensors:  # peft files may carry the adapter name: `...ia3_l.default`
        m = re.fullmatch(r"base_model\.model\.(.+)\.ia3_l(?:\.[^.]+)?", key)
        if not m:
            raise AdapterError(f"adapter: key {key!r} in {directory / WEIGHTS_FILE} is not an (IA)³ vector")
        if m.group(1) not in modules:
            raise AdapterError(f"adapter: key {key!r} names module {m.group(1)!r}, which this model lacks")
        paths[m.group(1)] = key
    def patterns(v) -> bool:
        return isinstance(v, str) or is_str_list(v)
    feedforward = checked_field(cfg, "feedforward_modules", patterns, "a string or a list of strings",
                                directory / CONFIG_FILE, [])
    targets = checked_field(cfg, "target_modules", patterns, "a string or a list of strings", directory / CONFIG_FILE,
                            [])
    for pattern in (feedforward, targets):
        if isinstance(pattern, str) and pattern != "all-linear":
            try:
                re.compile(pattern)
            except re.error as exc:
                raise AdapterError(f"adapter: {directory / CONFIG_FILE}: {pattern!r} is not a valid regex ({exc})") \
                    from None
    exact = "|".join(re.escape(p) for p in paths)
    exact_ff = "|".join(re.escape(p) for p in paths if name_matches(p, feedforward)) or []
    targets = targets or exact
    config = IA3Config(target_modules=targets if isinstance(targets, str) else list(targets),
                       feedforward_modules=feedforward)  # checked before anything attaches
    load_all_or_nothing(model, lambda: add_ia3(model, IA3Config(target_modules=exact, feedforward_modules=exact_ff)),
                        tensors, lambda: {paths[p]: layer.ia3_l for p, layer in ia3_layers(model)},
                        directory / WEIGHTS_FILE, " (another base model, or feedforward_modules differ?)")
    return config


METHOD = Method("ia3", "ia3", attach=add_ia3, save=save_ia3, load=load_ia3)

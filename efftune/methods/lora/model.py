"""LoRA on a whole model: attach adapters, switch which are active or train, merge, unload, and
export a merged model directory. The model stays the user's transformers model throughout.
"""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from torch import nn

from ...attach import _conv1d_class, find_targets, freeze_base, replace_module
from ...errors import ConfigError, EfftuneError
from ...files import replace_dir_atomically
from ...quantize import base_dtype, dequantize_model, quantized_layers
from .config import LoraConfig
from .dora import DoraAdapter
from .layer import LoraAdapter, LoraEmbedding, LoraLayer, LoraLinear, adapter_names, link_fused_linears, lora_layers
from .swiglu import unwrap_swiglu_mlps, wrap_swiglu_mlps


def add_lora(model: nn.Module, config: LoraConfig | None = None, adapter: str = "default",
             rank_of: dict[str, int] | None = None, alpha_of: dict[str, float] | None = None,
             adapter_cls: type[LoraAdapter] | None = None, *, tokenizer=None) -> list[str]:
    """Attach a LoRA adapter named `adapter` to every module `config` targets.

    Everything else is frozen (earlier adapters too: `set_trainable_adapters` trains several);
    the new adapter trains and becomes active beside any adapters already active. `rank_of` / `alpha_of` override r / alpha per module path (as
    peft's rank_pattern does); `adapter_cls` picks a LoRA variant's adapter class (LoRA-FA);
    `config.use_dora` makes DoRA adapters (`dora.DoraAdapter`).
    (`tokenizer`: unused, as every method's attach takes one.)
    Returns the adapted module paths.
    """
    config = config or LoraConfig()
    if adapter in adapter_names(model):
        raise EfftuneError(f"adapter {adapter!r} already exists; delete it or choose another name")
    if not config.target_modules and not config.embeddings:
        raise ConfigError("lora.target_modules is empty: name the modules to adapt")
    if config.use_dora:
        if adapter_cls is not None and adapter_cls is not DoraAdapter:
            raise ConfigError(f"{config.SECTION}.use_dora: DoRA on top of this LoRA variant "
                              f"({getattr(adapter_cls, '__name__', adapter_cls)}) is not supported")
        adapter_cls = DoraAdapter
    names = find_targets(model, config.target_modules) if config.target_modules else []
    if config.embeddings:
        names += find_targets(model, config.embeddings, accept=lambda m: isinstance(m, nn.Embedding))
    check_ranks(model, names, config.r, rank_of or {})
    freeze_base(model)  # only once nothing can fail: a refused attach leaves the model as it was
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, LoraLayer):
            wrapper = LoraEmbedding(module) if isinstance(module, nn.Embedding) else LoraLinear(module)
            replace_module(model, name, wrapper)
            module = wrapper
        r = (rank_of or {}).get(name, config.r)
        scaling = config.scaling(r, (alpha_of or {}).get(name))
        module.add_adapter(adapter, r, scaling, config.dropout, config.init, adapter_cls).requires_grad_(True)
    link_fused_linears(model)
    wrap_swiglu_mlps(model)
    return names


def matrix_sides(module: nn.Module) -> tuple[int, int]:
    """(in, out) of the matrix an adapter on `module` updates."""
    base = getattr(module, "base_layer", module)
    if isinstance(base, nn.Embedding):
        return base.num_embeddings, base.embedding_dim
    if isinstance(base, nn.Linear):  # a quantised one's `weight` is dequantised or packed: its sizes say it
        return base.in_features, base.out_features
    w = base.weight
    return (w.shape[0], w.shape[1]) if isinstance(base, _conv1d_class()) else (w.shape[1], w.shape[0])


def check_ranks(model: nn.Module, names: list[str], r: int, rank_of: dict[str, int]) -> None:
    """Refuse a configured rank above a target's smaller side: B @ A cannot exceed that rank, so
    the extra rows only add parameters (r = 1000 on a 576-wide model trains more than the model).
    Ranks given per module (`rank_of`: a loaded adapter's own tensors) are taken as they are."""
    sides = {name: matrix_sides(model.get_submodule(name)) for name in names if name not in rank_of}
    if sides and r > (limit := min(min(s) for s in sides.values())):
        name, (n_in, n_out) = next((n, s) for n, s in sides.items() if min(s) == limit)
        raise ConfigError(f"LoRA rank r={r} is larger than {name}'s smaller side ({n_in} in, {n_out} out): "
                          f"it adds parameters but no expressiveness; use r <= {limit} (--rank, lora.r)")


def set_active_adapters(model: nn.Module, names: str | Sequence[str] | None) -> None:
    """Which adapters run: a name, several (their updates add up), or None for the base model."""
    names = [names] if isinstance(names, str) else list(names or [])
    known = adapter_names(model)
    for n in names:
        if n not in known:
            raise EfftuneError(f"no adapter named {n!r} (have: {', '.join(known) or 'none'})")
    for _, layer in lora_layers(model):
        if layer.merged:
            raise EfftuneError("unmerge adapters before switching which are active")
        layer.active = [n for n in names if n in layer.adapters]


def set_trainable_adapters(model: nn.Module, names: str | Sequence[str]) -> None:
    names = [names] if isinstance(names, str) else list(names)
    for _, layer in lora_layers(model):
        for n, adapter in layer.adapters.items():
            adapter.requires_grad_(n in names)


def delete_adapter(model: nn.Module, name: str) -> None:
    if name not in adapter_names(model):
        raise EfftuneError(f"no adapter named {name!r}")
    for _, layer in lora_layers(model):
        if name in layer.adapters:
            layer.delete_adapter(name)


def merge_lora(model: nn.Module) -> None:
    """Fold the active adapters into the base weights (forward then skips them). Every layer is
    checked first, so a refused merge changes none."""
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        layer.check_mergeable()
    for layer in layers:
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.unmerge()


def unload_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Put the base modules back, merging the active adapters first unless `merge=False`."""
    for name, layer in list(lora_layers(model)):
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        replace_module(model, name, layer.base_layer)
    unwrap_swiglu_mlps(model)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    return unload_lora(model, merge=True)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def export_merged(model: nn.Module, tokenizer, directory: str | os.PathLike, inplace: bool = False,
                  log: Callable[[str], None] | None = None) -> Path:
    """Fold the active adapters into the base weights and write a plain transformers model
    directory (`save_pretrained` of model and `tokenizer`, if given), which
    `AutoModelForCausalLM.from_pretrained` loads without efftune or peft.

    The caller's model is left as it was: the merge runs on a deep copy, which costs one more
    copy of the whole model (base weights included) in the memory it lives in — GPU memory for
    a model on GPU. `inplace=True` avoids that by merging and unloading `model` itself (it loses
    its LoRA layers). The directory is written as `<directory>.tmp` and then renamed into place,
    so an interrupted export never leaves a half-written model under `directory`.

    On a quantised base (efftune's NF4 / int8, or bitsandbytes'), merging into the 4- or 8-bit
    codes would round the update away: the copy (or `model`, inplace) is made dense first
    (`quantize.dequantize_model`, in the base's own dtype) and the update merged into that, which
    one line through `log` (default: standard error) says.
    """
    layers = [layer for _, layer in lora_layers(model)]
    if layers and not any(layer.active for layer in layers):
        raise EfftuneError("export: no adapter is active, so the export would be the base model; "
                           "call set_active_adapters first")
    target = model if inplace else copy.deepcopy(model)
    if quantized := quantized_layers(target):
        dtype = base_dtype(target)
        dequantize_model(target)
        (log or _stderr)(f"export: the base is quantised ({len(quantized)} layers), so the adapter is merged into a "
                         f"dequantised copy in {str(dtype).removeprefix('torch.')}: the written model is that "
                         "dense model, not the original weights")
    merge_and_unload(target)

    def write(tmp: Path) -> None:
        target.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return replace_dir_atomically(directory, write)

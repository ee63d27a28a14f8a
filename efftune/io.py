"""Adapters on disk in peft's format: `adapter_config.json` + `adapter_model.safetensors`.

Keys are `base_model.model.<module path>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r);
embeddings use `.lora_embedding_A` (r, vocab) and `.lora_embedding_B` (dim, r). So
`peft.PeftModel.from_pretrained` reads what we write, and we read what peft writes. Only
safetensors are read unless the caller allows pickle explicitly.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import AdapterError
from .methods.lora import LoraConfig, LoraEmbedding, LoraLayer, add_lora, lora_layers

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
PREFIX = "base_model.model."


def _keys(path: str, layer: LoraLayer) -> tuple[str, str]:
    if isinstance(layer, LoraEmbedding):
        return f"{PREFIX}{path}.lora_embedding_A", f"{PREFIX}{path}.lora_embedding_B"
    return f"{PREFIX}{path}.lora_A.weight", f"{PREFIX}{path}.lora_B.weight"


def adapter_state_dict(model: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's key names."""
    state = {}
    for path, layer in lora_layers(model):
        if adapter in layer.adapters:
            a = layer.adapters[adapter]
            key_a, key_b = _keys(path, layer)
            state[key_a] = a.lora_A.detach().contiguous()
            state[key_b] = a.lora_B.detach().contiguous()
    if not state:
        raise AdapterError(f"the model has no adapter named {adapter!r}")
    return state


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write `path` through a temporary file and a rename: readers see the old or the new text, whole."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def replace_dir_atomically(directory: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Let `write` fill `directory.tmp`, then swap it in for `directory`: a crash never leaves a
    half-written directory, and an old one stays whole until the new one is complete."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if directory.exists():
        old = directory.with_name(directory.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old)
    else:
        os.replace(tmp, directory)
    return directory


def write_adapter_dir(directory: str | os.PathLike, config: dict, tensors: dict[str, torch.Tensor],
                      config_file: str = CONFIG_FILE, weights_file: str = WEIGHTS_FILE) -> Path:
    """A config JSON + a safetensors file, written atomically: every method's on-disk shape."""
    def write(tmp: Path) -> None:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp / weights_file),
                  metadata={"format": "pt"})
        (tmp / config_file).write_text(json.dumps(config, indent=2))
    return replace_dir_atomically(directory, write)


def read_adapter_dir(directory: str | os.PathLike, config_file: str = CONFIG_FILE,
                     weights_file: str = WEIGHTS_FILE, kind: tuple[str, str] | None = None
                     ) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of a directory `write_adapter_dir` made; names the missing or bad file.
    `kind` = (field, value) the config must hold, e.g. ("peft_type", "IA3")."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError(f"adapter: directory {directory} does not exist")
    for name in (config_file, weights_file):
        if not (directory / name).is_file():
            raise AdapterError(f"adapter: {directory} has no {name}")
    try:
        config = json.loads((directory / config_file).read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"adapter: {directory / config_file} is not valid JSON ({exc.msg})") from None
    if kind and config.get(kind[0]) != kind[1]:
        raise AdapterError(f"adapter: {directory / config_file} has {kind[0]}={config.get(kind[0])!r}, "
                           f"expected {kind[1]!r}")
    return config, load_file(str(directory / weights_file))


def first_mismatch(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str | None:
    """The first key that is missing, of the wrong shape, or unexpected, described; else None."""
    for key, param in expected.items():
        if key not in tensors:
            return f"lacks key {key!r}"
        if tensors[key].shape != param.shape:
            return f"has key {key!r} of shape {tuple(tensors[key].shape)}, the model expects {tuple(param.shape)}"
    extra = [k for k in tensors if k not in expected]
    return f"has key {extra[0]!r}, which fits nothing in this model" if extra else None


def base_model_name(model: nn.Module) -> str | None:
    """What an adapter file records as its base model: the name efftune loaded it by, else the
    model config's own path."""
    return getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None) \
        or None


def peft_config_dict(model: nn.Module, adapter: str, config: LoraConfig, extra: dict | None = None) -> dict:
    layers = [(p, l) for p, l in lora_layers(model) if adapter in l.adapters]
    suffixes = sorted({p.rsplit(".", 1)[-1] for p, _ in layers})
    # Modules whose rank or scaling differ from the config's go into peft's per-module patterns,
    # keyed by the escaped module path (peft matches a key against the end of the path).
    rank_pattern, alpha_pattern = {}, {}
    for path, layer in layers:
        a = layer.adapters[adapter]
        if a.r != config.r:
            rank_pattern[re.escape(path)] = a.r
        alpha = a.scaling * (a.r ** 0.5 if config.use_rslora else a.r)
        if abs(alpha - config.alpha) > 1e-6 * max(1.0, abs(alpha)):
            alpha_pattern[re.escape(path)] = alpha
    base = base_model_name(model)
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": suffixes, "use_rslora": config.use_rslora, "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "use_dora": False,
    }
    if extra:
        cfg["efftune"] = extra
    return cfg


def save_adapter(model: nn.Module, directory: str | os.PathLike, config: LoraConfig,
                 adapter: str = "default", metadata: dict | None = None) -> Path:
    """Write `adapter` of `model` as a peft LoRA adapter directory (atomically). `metadata`
    goes under the config's "efftune" key (peft ignores unknown keys)."""
    state = adapter_state_dict(model, adapter)
    return write_adapter_dir(directory, peft_config_dict(model, adapter, config, metadata), state)


def read_adapter_config(directory: str | os.PathLike) -> dict:
    directory = Path(directory)
    cfg_path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise AdapterError(f"adapter: directory {directory} does not exist")
    if not cfg_path.is_file():
        raise AdapterError(f"adapter: {directory} has no {CONFIG_FILE}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"adapter: {cfg_path} is not valid JSON ({exc.msg})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter: {cfg_path} holds a {cfg.get('peft_type')} adapter, not LORA")
    if cfg.get("use_dora"):
        raise AdapterError(f"adapter: {cfg_path} is a DoRA adapter, which efftune does not load")
    return cfg


def _read_tensors(directory: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if (directory / WEIGHTS_FILE).is_file():
        return load_file(str(directory / WEIGHTS_FILE))
    if (directory / PICKLE_FILE).is_file():
        if not allow_pickle:
            raise AdapterError(f"adapter: {directory} holds only {PICKLE_FILE}, a pickle file that can run "
                               "code when loaded; pass allow_pickle=True (--allow-pickle) if you trust it")
        return torch.load(directory / PICKLE_FILE, map_location="cpu", weights_only=True)
    raise AdapterError(f"adapter: {directory} has no {WEIGHTS_FILE}")


def _pattern_value(patterns: dict, path: str, default):
    """peft's rank/alpha patterns: a key is a regex that must match the end of the module path."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return default


def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter: str = "default",
                 allow_pickle: bool = False, adapter_cls=None) -> LoraConfig:
    """Attach the LoRA adapter saved in `directory` (by efftune or peft) as `adapter`.

    Checks every key and shape against the model and names the first that does not fit.
    """
    directory = Path(directory)
    cfg = read_adapter_config(directory)
    tensors = _read_tensors(directory, allow_pickle)
    # Which modules the file covers, and their ranks, come from the tensors themselves.
    found: dict[str, tuple[str, str]] = {}
    for key in tensors:
        m = re.fullmatch(r"base_model\.model\.(.+)\.(lora_A|lora_embedding_A)(?:\.[^.]+)?(\.weight)?", key)
        if m:
            found[m.group(1)] = (m.group(2), key)
        elif not re.fullmatch(r"base_model\.model\.(.+)\.(lora_B|lora_embedding_B)(?:\.[^.]+)?(\.weight)?", key):
            raise AdapterError(f"adapter: {directory / WEIGHTS_FILE} has key {key!r}, which is not a LoRA "
                               "factor (modules_to_save and bias training are not supported)")
    if not found:
        raise AdapterError(f"adapter: {directory / WEIGHTS_FILE} holds no LoRA tensors")
    modules = dict(model.named_modules())
    missing = [p for p in found if p not in modules]
    if missing:
        raise AdapterError(f"adapter: key for module {missing[0]!r} does not fit this model (no such "
                           f"module; base model of the adapter: {cfg.get('base_model_name_or_path')})")
    def exact(paths: list[str]) -> str | list[str]:
        return "|".join(re.escape(p) for p in paths) if paths else []

    r, alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    attach_cfg = LoraConfig(
        r=r, alpha=alpha, dropout=float(cfg.get("lora_dropout", 0.0)), use_rslora=bool(cfg.get("use_rslora", False)),
        target_modules=exact([p for p, (kind, _) in found.items() if kind == "lora_A"]),
        embeddings=exact([p for p, (kind, _) in found.items() if kind == "lora_embedding_A"]))
    rank_of = {p: tensors[k].shape[0] for p, (_, k) in found.items()}
    alpha_of = {p: float(_pattern_value(cfg.get("alpha_pattern") or {}, p, alpha)) for p in found}
    add_lora(model, attach_cfg, adapter, rank_of=rank_of, alpha_of=alpha_of, adapter_cls=adapter_cls)
    _copy_tensors(model, tensors, adapter, directory)
    targets = cfg.get("target_modules") or "all-linear"
    return LoraConfig(r=r, alpha=alpha, dropout=attach_cfg.dropout, use_rslora=attach_cfg.use_rslora,
                      target_modules=targets if isinstance(targets, str) else list(targets))


def _copy_tensors(model, tensors, adapter, directory) -> None:
    used = set()
    for path, layer in lora_layers(model):
        if adapter not in layer.adapters:
            continue
        a = layer.adapters[adapter]
        key_a, key_b = _keys(path, layer)
        for key, param in ((key_a, a.lora_A), (key_b, a.lora_B)):
            src = tensors.get(key)
            if src is None:  # peft files written with the adapter name inside the key
                alt = [k for k in tensors if k.startswith(key.rsplit(".weight", 1)[0] + ".")]
                src = tensors[alt[0]] if len(alt) == 1 else None
                key = alt[0] if src is not None else key
            if src is None:
                raise AdapterError(f"adapter: {directory / WEIGHTS_FILE} lacks key {key!r}")
            if tuple(src.shape) != tuple(param.shape):
                raise AdapterError(f"adapter: key {key!r} has shape {tuple(src.shape)}, the model expects "
                                   f"{tuple(param.shape)} (was the adapter made for another base model?)")
            with torch.no_grad():
                param.copy_(src.to(param.dtype))
            used.add(key)
    unused = sorted(set(tensors) - used)
    if unused:
        raise AdapterError(f"adapter: key {unused[0]!r} in {directory / WEIGHTS_FILE} was not used")

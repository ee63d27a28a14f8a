"""LoRA adapters on disk in peft's format: `adapter_config.json` + `adapter_model.safetensors`.

Keys are `base_model.model.<module path>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r);
embeddings use `.lora_embedding_A` (r, vocab) and `.lora_embedding_B` (dim, r). A DoRA adapter
(`use_dora: true`) adds `.lora_magnitude_vector` (out,) for each linear module. So
`peft.PeftModel.from_pretrained` reads what we write, and we read what peft writes. Only
safetensors are read unless the caller allows pickle explicitly.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from ...attach import is_linear
from ...checks import is_number
from ...errors import AdapterError
from ...files import (CONFIG_FILE, PICKLE_FILE, PREFIX, WEIGHTS_FILE, base_model_name, check_adapter_directory,
                      checked_field, is_str_list, load_all_or_nothing, read_json_object, read_safetensors,
                      write_adapter_dir)
from .config import LoraConfig
from .dora import DoraAdapter
from .layer import LoraEmbedding, LoraLayer, lora_layers
from .model import add_lora, matrix_sides

_FACTOR = re.compile(r"base_model\.model\.(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
                     r"(?:\.[^.]+)?(?:\.weight)?")


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
            if isinstance(a, DoraAdapter):
                state[f"{PREFIX}{path}.lora_magnitude_vector"] = a.lora_magnitude_vector.detach().contiguous()
    if not state:
        raise AdapterError(f"the model has no adapter named {adapter!r}")
    return state


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
        "use_dora": any(isinstance(layer.adapters[adapter], DoraAdapter) for _, layer in layers),
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
    check_adapter_directory(directory)
    if not cfg_path.is_file():
        raise AdapterError(f"adapter: {directory} has no {CONFIG_FILE}")
    cfg = read_json_object(cfg_path)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter: {cfg_path} holds a {cfg.get('peft_type')} adapter, not LORA")
    return cfg


def _read_tensors(directory: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if (directory / WEIGHTS_FILE).is_file():
        return read_safetensors(directory / WEIGHTS_FILE)
    if (directory / PICKLE_FILE).is_file():
        if not allow_pickle:
            raise AdapterError(f"adapter: {directory} holds only {PICKLE_FILE}, a pickle file that can run "
                               "code when loaded; pass allow_pickle=True (--allow-pickle) if you trust it")
        try:
            tensors = torch.load(directory / PICKLE_FILE, map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling fails in whatever way the torn bytes lead it to
            raise AdapterError(f"adapter: {directory / PICKLE_FILE} cannot be read ({type(exc).__name__})") from None
        if not isinstance(tensors, dict) or not all(isinstance(k, str) and torch.is_tensor(v)
                                                    for k, v in tensors.items()):
            raise AdapterError(f"adapter: {directory / PICKLE_FILE} does not hold a dict of named tensors")
        return tensors
    raise AdapterError(f"adapter: {directory} has no {WEIGHTS_FILE}")


def _pattern_value(patterns: dict, path: str, default):
    """peft's rank/alpha patterns: a key is a regex that must match the end of the module path."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return default


def _is_rank(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _lora_fields(cfg: dict, where: Path) -> dict:
    """The fields of a peft LoRA config that loading uses, each checked (peft's defaults when absent)."""
    checks = {  # key: (default, test, what it must be)
        "r": (8, _is_rank, "a positive integer"),
        "lora_alpha": (8, lambda v: is_number(v) and v > 0, "a positive number"),
        "lora_dropout": (0.0, lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
        "use_rslora": (False, lambda v: isinstance(v, bool), "true or false"),
        "use_dora": (False, lambda v: isinstance(v, bool), "true or false"),
        "rank_pattern": ({}, lambda v: isinstance(v, dict) and all(map(_is_rank, v.values())),
                         "an object of positive integers"),
        "alpha_pattern": ({}, lambda v: isinstance(v, dict) and all(is_number(x) and x > 0 for x in v.values()),
                          "an object of positive numbers"),
        "target_modules": (None, lambda v: v is None or isinstance(v, str) or is_str_list(v),
                           "a string or a list of strings"),
    }
    out = {key: checked_field(cfg, key, test, want, where, default) for key, (default, test, want) in checks.items()}
    for key in ("rank_pattern", "alpha_pattern"):
        for pattern in out[key]:
            try:
                re.compile(rf"(.*\.)?({pattern})$")
            except re.error as exc:
                raise AdapterError(f"adapter: {where}: {key} key {pattern!r} is not a valid regex ({exc})") from None
    return out


_ROLE = {"lora_A": "A", "lora_embedding_A": "A", "lora_B": "B", "lora_embedding_B": "B", "lora_magnitude_vector": "M"}


def _factors(tensors: dict[str, torch.Tensor], where: Path, use_dora: bool) -> dict[str, dict[str, str]]:
    """module path -> {"A": key, "B": key, "M": key (DoRA's magnitude), "kind": "linear" | "embedding"};
    every key must be one factor."""
    found: dict[str, dict[str, str]] = {}
    for key in tensors:
        m = _FACTOR.fullmatch(key)
        if not m:
            raise AdapterError(f"adapter: {where} has key {key!r}, which is not a LoRA factor "
                               "(modules_to_save and bias training are not supported)")
        path, name = m.group(1), m.group(2)
        if name == "lora_magnitude_vector" and not use_dora:
            raise AdapterError(f"adapter: {where} has DoRA's {key!r}, but its config says use_dora: false")
        entry = found.setdefault(path, {"kind": "embedding" if "embedding" in name else "linear"})
        if "embedding" in name and entry["kind"] != "embedding":
            raise AdapterError(f"adapter: {where} mixes embedding and linear factors for module {path!r}")
        if "embedding" not in name and name != "lora_magnitude_vector" and entry["kind"] != "linear":
            raise AdapterError(f"adapter: {where} mixes embedding and linear factors for module {path!r}")
        role = _ROLE[name]
        if role in entry:
            raise AdapterError(f"adapter: {where} has two {name} tensors for module {path!r}: "
                               f"{entry[role]!r} and {key!r}")
        entry[role] = key
    if not found:
        raise AdapterError(f"adapter: {where} holds no LoRA tensors")
    for path, entry in found.items():
        for factor in ("A", "B"):
            if factor not in entry:
                other = entry.get("B" if factor == "A" else "A") or entry["M"]
                raise AdapterError(f"adapter: {where} has {other!r} but no lora_{factor} for module {path!r}")
        if use_dora and entry["kind"] == "embedding":
            raise AdapterError(f"adapter: {where} is a DoRA adapter on embedding {path!r}; efftune's DoRA "
                               "adapts linear layers only")
        if use_dora and "M" not in entry:
            raise AdapterError(f"adapter: {where} is a DoRA adapter (use_dora: true) but has no "
                               f"lora_magnitude_vector for module {path!r}")
    return found


def _check_factors(model: nn.Module, tensors: dict[str, torch.Tensor], found: dict, fields: dict,
                   cfg: dict, directory: Path) -> dict[str, int]:
    """Every factor against the model and the config (kind, shape, rank, dtype, finite values),
    before anything is attached: a load that fails leaves the model as it was. Returns the ranks."""
    weights, cfg_path = directory / WEIGHTS_FILE, directory / CONFIG_FILE
    modules = dict(model.named_modules())
    order = {name: i for i, name in enumerate(modules)}  # report misfits in model order, not key order
    ranks = {}
    for path, entry in sorted(found.items(), key=lambda item: order.get(item[0], -1)):
        if path not in modules:
            raise AdapterError(f"adapter: key {entry['A']!r} is for module {path!r}, but this model has no such module "
                               f"(base model of the adapter: {cfg.get('base_model_name_or_path')})")
        base = getattr(modules[path], "base_layer", modules[path])
        fits = isinstance(base, nn.Embedding) if entry["kind"] == "embedding" else is_linear(base)
        if not fits:
            raise AdapterError(f"adapter: key {entry['A']!r} is a {entry['kind']} factor, but {path!r} is a "
                               f"{type(base).__name__}")
        A, B = tensors[entry["A"]], tensors[entry["B"]]
        for key, t in ((entry["A"], A), (entry["B"], B)):
            if t.ndim != 2 or not t.is_floating_point():
                raise AdapterError(f"adapter: key {key!r} in {weights} is a {t.ndim}-d {t.dtype} tensor, "
                                   "expected a 2-d floating-point matrix")
            if not bool(torch.isfinite(t).all()):
                raise AdapterError(f"adapter: key {key!r} in {weights} holds NaN or infinite values")
        n_in, n_out = matrix_sides(modules[path])
        r = A.shape[0]
        shapes = [(entry["A"], A, (r, n_in)), (entry["B"], B, (n_out, r))]
        if "M" in entry:
            M = tensors[entry["M"]]
            if not M.is_floating_point() or not bool(torch.isfinite(M).all()):
                raise AdapterError(f"adapter: key {entry['M']!r} in {weights} is a {M.dtype} tensor or holds NaN "
                                   "or infinite values, expected finite floating-point values")
            shapes.append((entry["M"], M, (n_out,)))
        for key, t, want in shapes:
            if r < 1 or tuple(t.shape) != want:
                raise AdapterError(f"adapter: key {key!r} has shape {tuple(t.shape)}, the model expects "
                                   f"{want} (was the adapter made for another base model?)")
        said = _pattern_value(fields["rank_pattern"], path, fields["r"])
        if said != r:
            raise AdapterError(f"adapter: {cfg_path} says r={said} for {path!r}, but its tensors have rank {r} "
                               f"({entry['A']!r} is {tuple(A.shape)})")
        ranks[path] = r
    return ranks


def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter: str = "default",
                 allow_pickle: bool = False, adapter_cls=None) -> LoraConfig:
    """Attach the LoRA adapter saved in `directory` (by efftune or peft) as `adapter`.

    Checks the config's fields and every key, shape, rank and value against the model and the
    config, and names the first that does not fit; a refused adapter leaves the model as it was.
    """
    directory = Path(directory)
    cfg = read_adapter_config(directory)
    fields = _lora_fields(cfg, directory / CONFIG_FILE)
    tensors = _read_tensors(directory, allow_pickle)
    found = _factors(tensors, directory / WEIGHTS_FILE, fields["use_dora"])
    rank_of = _check_factors(model, tensors, found, fields, cfg, directory)

    def exact(paths: list[str]) -> str | list[str]:
        return "|".join(re.escape(p) for p in paths) if paths else []

    r, alpha = fields["r"], float(fields["lora_alpha"])
    attach_cfg = LoraConfig(
        r=r, alpha=alpha, dropout=float(fields["lora_dropout"]), use_rslora=fields["use_rslora"],
        use_dora=fields["use_dora"], target_modules=exact([p for p, e in found.items() if e["kind"] == "linear"]),
        embeddings=exact([p for p, e in found.items() if e["kind"] == "embedding"]))
    alpha_of = {p: float(_pattern_value(fields["alpha_pattern"], p, alpha)) for p in found}

    def factors() -> dict[str, torch.Tensor]:
        out = {}
        for path in rank_of:  # model order
            entry, a = found[path], model.get_submodule(path).adapters[adapter]
            out[entry["A"]], out[entry["B"]] = a.lora_A, a.lora_B
            if "M" in entry:
                out[entry["M"]] = a.lora_magnitude_vector
        return out
    targets = fields["target_modules"] or "all-linear"
    config = LoraConfig(r=r, alpha=alpha, dropout=attach_cfg.dropout, use_rslora=attach_cfg.use_rslora,
                        use_dora=attach_cfg.use_dora,
                        target_modules=targets if isinstance(targets, str) else list(targets))  # before attaching
    load_all_or_nothing(model, lambda: add_lora(model, attach_cfg, adapter, rank_of=rank_of, alpha_of=alpha_of,
                                                adapter_cls=adapter_cls),
                        tensors, factors, directory / WEIGHTS_FILE)
    return config

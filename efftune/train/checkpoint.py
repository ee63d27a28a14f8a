"""Training checkpoints: trainable weights, optimizer, step and RNG, written atomically.

Everything is safetensors + JSON (no pickle). A checkpoint directory is written under a
temporary name and renamed into place, and `latest` is updated by an atomic rename too, so an
interrupted run always leaves the previous checkpoint intact and loadable.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError
from ..io import replace_dir_atomically, write_text_atomically
from ..methods.packing import owns_storage

FILES = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors", "extra.safetensors", "state.json")


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> tuple[dict, dict]:
    """Optimizer state keyed by parameter name (robust to parameter order)."""
    tensors, scalars = {}, {}
    for p, state in optimizer.state.items():
        name = names[id(p)]
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"{name}::{k}"] = v.detach().contiguous()
            else:
                scalars[f"{name}::{k}"] = v
    return tensors, scalars


def _saveable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor detached, contiguous and with storage of its own. Packed base weights
    (`efftune.methods.packing`: ReLoRA's merged weights, a warm start's trainable ones) are views into
    one matrix, which older safetensors releases refuse to save side by side; those are copied to
    host memory apart (where safetensors copies every tensor anyway)."""
    out = {}
    for name, t in tensors.items():
        t = t.detach()
        if not owns_storage(t):
            t = t.to("cpu", copy=True)
        out[name] = t.contiguous()
    return out


def save_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    extra: dict, extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint `directory` (e.g. run/checkpoints/step-000100) and point `latest` at it.

    `extra_tensors`: state a training mode keeps outside the trainable parameters (ReLoRA's
    merged base weights), restored through `load_checkpoint`'s `load_extra`.
    """
    names = {id(p): n for n, p in model.named_parameters()}

    def write(tmp: Path) -> None:
        save_file(_saveable(trainable_state(model)), str(tmp / "trainable.safetensors"))
        opt_tensors, opt_scalars = _optimizer_tensors(optimizer, names)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / "rng.safetensors"))
        save_file(_saveable(extra_tensors or {}), str(tmp / "extra.safetensors"))
        state = {"step": step, "optimizer_scalars": opt_scalars,
                 "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
                 **extra}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))

    replace_dir_atomically(directory, write)
    write_text_atomically(directory.parent / "latest", directory.name)
    return directory


def latest_checkpoint(root: Path) -> Path | None:
    pointer = root / "latest"
    if not pointer.exists():
        return None
    directory = root / pointer.read_text().strip()
    missing = [f for f in FILES if not (directory / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {directory} is incomplete: missing {', '.join(missing)}")
    return directory


def load_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    load_extra=None) -> dict:
    """Restore trainable weights, optimizer state, RNG and (through `load_extra`) the extra
    tensors; returns state.json's content."""
    missing = [f for f in FILES if not (directory / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {directory} is incomplete: missing {', '.join(missing)}")
    state = json.loads((directory / "state.json").read_text())
    weights = load_file(str(directory / "trainable.safetensors"))
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != expected:
        diff = sorted(set(weights) ^ expected)
        raise CheckpointError(f"checkpoint {directory} does not match the model's trainable parameters "
                              f"(first difference: {diff[0]!r}); was the method or its config changed?")
    with torch.no_grad():
        for n, t in weights.items():
            if params[n].shape != t.shape:
                raise CheckpointError(f"checkpoint {directory}: {n!r} has shape {tuple(t.shape)}, "
                                      f"the model has {tuple(params[n].shape)}")
            params[n].copy_(t)
    # Rebuild a regular optimizer state dict and let torch place each tensor where it belongs.
    opt = load_file(str(directory / "optimizer.safetensors"))
    per_param: dict[str, dict] = {}
    for key, value in list(opt.items()) + list(state.get("optimizer_scalars", {}).items()):
        name, field = key.split("::", 1)
        per_param.setdefault(name, {})[field] = value
    names = {id(p): n for n, p in params.items()}
    current = optimizer.state_dict()
    restored = {"state": {}, "param_groups": []}
    for group, saved, cur in zip(optimizer.param_groups, state["param_groups"], current["param_groups"]):
        for p, idx in zip(group["params"], cur["params"]):
            if names[id(p)] in per_param:
                restored["state"][idx] = per_param[names[id(p)]]
        restored["param_groups"].append({**saved, "params": cur["params"]})
    optimizer.load_state_dict(restored)
    if load_extra is not None:
        load_extra(load_file(str(directory / "extra.safetensors")))
    rng = load_file(str(directory / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state

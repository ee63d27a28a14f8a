"""Training checkpoints: trainable weights, optimizer, step and RNG, written atomically.

Everything is safetensors + JSON (no pickle). A checkpoint directory is written under a
temporary name, flushed to disk and renamed into place, and `latest` is updated by an atomic
rename too, so an interrupted run (a kill, a full disk) always leaves the previous checkpoint
intact and loadable. Loading reads and checks every file before it changes the model or the
optimizer, so a bad checkpoint changes nothing.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Collection

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError
from ..faults import fault_point
from ..files import replace_dir_atomically, write_text_atomically
from ..methods.lora.packing import owns_storage
from .distributed import full, like
from .optimizers import SCALE, state_tensors

FILES = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors", "extra.safetensors", "state.json")


def trainable_state(model: nn.Module, names: Collection[str] | None = None) -> dict[str, torch.Tensor]:
    """The trainable parameters by name; `names`: only those (one adapter of several trained at once).
    Sharded ones (FSDP) whole: every rank must call it then."""
    return {n: full(p.detach()).contiguous() for n, p in model.named_parameters()
            if p.requires_grad and (names is None or n in names)}


def first_nonfinite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, else None."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def _optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> tuple[dict, dict]:
    """Optimizer state keyed by parameter name (robust to parameter order); an 8-bit moment as its
    codes and block scales (`efftune.train.optimizers.state_tensors`)."""
    tensors, scalars = {}, {}
    for p, state in optimizer.state.items():
        name = names[id(p)]
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors.update({f"{name}::{f}": t for f, t in state_tensors(k, full(v)).items()})
            else:
                scalars[f"{name}::{k}"] = v
    return tensors, scalars


def _saveable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor detached, contiguous and with storage of its own. Packed base weights
    (`efftune.methods.lora.packing`: ReLoRA's merged weights, a warm start's trainable ones) are views into
    one matrix, which older safetensors releases refuse to save side by side; those are copied to
    host memory apart (where safetensors copies every tensor anyway)."""
    out = {}
    for name, t in tensors.items():
        t = t.detach()
        if not owns_storage(t):
            t = t.to("cpu", copy=True)
        out[name] = t.contiguous()
    return out


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file, with a failed write (a full disk) raised as the OSError it is: the
    Rust writer reports it as its own error type, "... IoError(Os { code: 28, ... })"."""
    try:
        save_file(tensors, str(path))
    except Exception as exc:
        code = re.search(r"Os \{ code: (\d+)", str(exc))
        if isinstance(exc, OSError) or not code:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from exc


def save_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    extra: dict, extra_tensors: dict[str, torch.Tensor] | None = None,
                    only: Collection[str] | None = None, writer: bool = True) -> Path:
    """Write checkpoint `directory` (e.g. run/checkpoints/step-000100) and point `latest` at it.

    `extra_tensors`: state a training mode keeps outside the trainable parameters (ReLoRA's
    merged base weights), restored through `load_checkpoint`'s `load_extra`. `only`: the names of
    the trainable parameters it holds (default: all), those `optimizer` covers. An OSError (a
    full disk) leaves no trace of the new checkpoint and `latest` naming the previous one.

    Sharded parameters and optimizer state (FSDP) are written whole, so that any number of ranks,
    or one process, resumes from the checkpoint: every rank calls this (they gather), and only the
    `writer` (rank 0) writes.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    weights = _saveable(trainable_state(model, only))
    opt_tensors, opt_scalars = _optimizer_tensors(optimizer, names)
    if not writer:
        return directory

    def write(tmp: Path) -> None:
        _save(weights, tmp / "trainable.safetensors")
        fault_point("checkpoint_after_weights")
        _save(opt_tensors, tmp / "optimizer.safetensors")
        fault_point("checkpoint_mid_optimizer",
                    tear=(tmp / "optimizer.safetensors", (tmp / "optimizer.safetensors").stat().st_size // 2))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        _save(rng, tmp / "rng.safetensors")
        _save(_saveable(extra_tensors or {}), tmp / "extra.safetensors")
        state = {"step": step, "optimizer_scalars": opt_scalars,
                 "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
                 "param_names": [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups],
                 **extra}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        fault_point("checkpoint_before_rename")

    replace_dir_atomically(directory, write)
    fault_point("checkpoint_before_latest")
    write_text_atomically(directory.parent / "latest", directory.name)
    return directory


def checkpoints(root: Path) -> list[Path]:
    """The complete-by-name step-* checkpoint directories under `root`, oldest first (not .tmp/.old)."""
    return sorted(p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit())


def latest_checkpoint(root: Path) -> Path | None:
    pointer = root / "latest"
    if not pointer.exists():
        return None
    directory = root / pointer.read_text().strip()
    missing = [f for f in FILES if not (directory / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {directory} is incomplete: missing {', '.join(missing)}")
    return directory


def set_aside(directory: Path) -> Path | None:
    """Rename checkpoint `directory` (one found bad) to `<name>.diverged`, replacing an earlier one of
    that name, and point `latest` at the newest checkpoint left; returns that one, or None (then
    `latest` is removed)."""
    root = directory.parent
    aside = directory.with_name(directory.name + ".diverged")
    shutil.rmtree(aside, ignore_errors=True)
    directory.rename(aside)
    left = checkpoints(root)
    if left:
        write_text_atomically(root / "latest", left[-1].name)
        return left[-1]
    (root / "latest").unlink(missing_ok=True)
    return None


def read_state(directory: Path) -> dict:
    """state.json of checkpoint `directory` (step, config, optimizer scalars), checked."""
    missing = [f for f in FILES if not (directory / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {directory} is incomplete: missing {', '.join(missing)}")
    try:
        state = json.loads((directory / "state.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {directory}: state.json is not valid JSON (truncated or corrupt: "
                              f"{str(exc).splitlines()[0]})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) \
            or not isinstance(state.get("param_groups"), list):
        raise CheckpointError(f"checkpoint {directory}: state.json lacks the step or the optimizer's groups")
    return state


def _read_tensors(directory: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(directory / name))
    except Exception as exc:  # safetensors raises its own error type for a torn or garbage file
        raise CheckpointError(f"checkpoint {directory}: {name} cannot be read (truncated or corrupt: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def _mismatch(where: Path, what: str, found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    if set(found) != set(expected):
        diff = sorted(set(found) ^ set(expected))
        raise CheckpointError(f"checkpoint {where} does not match the model's {what} (first difference: "
                              f"{diff[0]!r}); was the method or its config changed?")
    for n, t in found.items():
        if t.shape != expected[n].shape:
            raise CheckpointError(f"checkpoint {where}: {n!r} has shape {tuple(t.shape)}, "
                                  f"the model has {tuple(expected[n].shape)}")


def load_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    load_extra=None, expected_extra: dict[str, torch.Tensor] | None = None,
                    only: Collection[str] | None = None) -> dict:
    """Restore trainable weights, optimizer state, RNG and (through `load_extra`) the extra
    tensors; returns state.json's content. `only`: as for `save_checkpoint`.

    Every file is read and checked first (readable, keys and shapes of the weights, of the
    optimizer state and, given `expected_extra`, of the extra tensors): a checkpoint that does not
    fit raises CheckpointError before anything is changed.
    """
    state = read_state(directory)
    weights = _read_tensors(directory, "trainable.safetensors")
    opt = _read_tensors(directory, "optimizer.safetensors")
    extra = _read_tensors(directory, "extra.safetensors")
    rng = _read_tensors(directory, "rng.safetensors")

    params = dict(model.named_parameters())
    _mismatch(directory, "trainable parameters", weights,
              {n: p for n, p in params.items() if p.requires_grad and (only is None or n in only)})
    if expected_extra is not None:
        _mismatch(directory, "training-mode state (extra.safetensors)", extra, expected_extra)
    names = {id(p): n for n, p in params.items()}
    groups = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    if len(state["param_groups"]) != len(groups) or state.get("param_names", groups) != groups:
        raise CheckpointError(f"checkpoint {directory}: its optimizer groups do not match this run's "
                              "trainable parameters; was the method or its config changed?")
    # Optimizer state, keyed "<param>::<field>": every param one of the optimizer's, every tensor
    # but the step counter of the param's shape.
    per_param: dict[str, dict] = {}
    scalars = state.get("optimizer_scalars", {})
    optimized = {n for g in groups for n in g}
    for key, value in list(opt.items()) + list(scalars.items()):
        name, _, field = key.partition("::")
        if name not in optimized or not field:
            raise CheckpointError(f"checkpoint {directory}: optimizer.safetensors has key {key!r}, which fits "
                                  "no trainable parameter of this run")
        if field.endswith(SCALE) and not getattr(optimizer, "quantized_states", False):
            raise CheckpointError(f"checkpoint {directory}: optimizer state {key!r} is an 8-bit moment's; "
                                  "resume with train.optimizer adamw8bit")
        if torch.is_tensor(value) and field != "step" and not field.endswith(SCALE) \
                and value.shape != params[name].shape:
            raise CheckpointError(f"checkpoint {directory}: optimizer state {key!r} has shape "
                                  f"{tuple(value.shape)}, the parameter has {tuple(params[name].shape)}")
        per_param.setdefault(name, {})[field] = like(value, params[name]) if torch.is_tensor(value) \
            and field != "step" else value
    cpu_rng = torch.get_rng_state()
    if "torch" not in rng or rng["torch"].dtype != cpu_rng.dtype or rng["torch"].shape != cpu_rng.shape:
        raise CheckpointError(f"checkpoint {directory}: rng.safetensors holds no valid random-number state")

    # Everything fits: now change the model and the optimizer.
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(like(t, params[n]))  # this rank's part of a sharded parameter (FSDP)
    current = optimizer.state_dict()
    restored = {"state": {}, "param_groups": []}
    for group, saved, cur in zip(optimizer.param_groups, state["param_groups"], current["param_groups"]):
        for p, idx in zip(group["params"], cur["params"]):
            if names[id(p)] in per_param:
                restored["state"][idx] = per_param[names[id(p)]]
        restored["param_groups"].append({**saved, "params": cur["params"]})
    optimizer.load_state_dict(restored)
    if load_extra is not None:
        load_extra(extra)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state


# Config keys that only change speed, memory or bookkeeping: a resume may change them freely.
# Every other key changes what the run computes, and a resume refuses to change it unless told.
FREE_KEYS = frozenset({
    "output", "device", "data_cache", "log", "eval_samples",
    "train.eval_every", "train.save_every", "train.save_every_minutes", "train.keep_checkpoints",
    "train.micro_batch_size", "train.activation_checkpointing", "train.compile", "train.compile_memory_budget",
    "train.compile_lean", "train.cuda_graphs", "train.compile_autotune", "train.attention",
    "train.masked_attention", "train.distributed",
})


def flatten_config(values: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}: a config's keys as the errors name them."""
    out = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(flatten_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changed_keys(saved: dict, new: dict, prefix: str = "") -> list[str]:
    """Keys (dotted, e.g. "train.lr") whose value differs between the run's saved config and the
    new one, leaving out FREE_KEYS. A key the saved config lacks (an older efftune) is not compared."""
    old, cur = flatten_config(saved, prefix), flatten_config(new, prefix)
    return [k for k in cur if k in old and k not in FREE_KEYS and old[k] != cur[k]
            and not (isinstance(old[k], list) and isinstance(cur[k], (list, tuple)) and list(old[k]) == list(cur[k]))]

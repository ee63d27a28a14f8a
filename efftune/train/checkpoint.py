"""Training checkpoints: trainable weights, optimizer, step and RNG, written atomically.

Everything is safetensors + JSON (no pickle). A checkpoint directory is written under a
temporary name, flushed to disk and renamed into place, and `latest` is updated by an atomic
rename too, so an interrupted run (a kill, a full disk) always leaves the previous checkpoint
intact and loadable. Loading reads and checks every file before it changes the model or the
optimizer, so a bad checkpoint changes nothing.

Under `train.distributed: fsdp` the trainable weights and the optimizer state are sharded, and a
checkpoint holds them as torch.distributed.checkpoint (DCP) shards, one file a rank, in its
`sharded/` directory (`efftune.train.sharded_state`) instead of trainable.safetensors and
optimizer.safetensors; the rest is the same. Either kind resumes under any mode and any number of
ranks, or in one process.
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
from . import distributed
from .distributed import full, like
from .optimizers import QUANTIZED, SCALE, state_tensors
from .sharded_state import METADATA, SHARDS, load_shards, save_shards, shard_index

COMMON = ("rng.safetensors", "extra.safetensors", "state.json")
WHOLE = ("trainable.safetensors", "optimizer.safetensors")  # weights and optimizer state, unsharded
FILES = WHOLE + COMMON


def is_sharded(directory: Path) -> bool:
    """Was checkpoint `directory` written with DCP shards (`train.distributed: fsdp`)?"""
    return (directory / SHARDS).is_dir()


def missing_files(directory: Path) -> list[str]:
    """The files checkpoint `directory` lacks to be complete (of its kind: whole or sharded)."""
    needed = (f"{SHARDS}/{METADATA}",) + COMMON if is_sharded(directory) else FILES
    return [f for f in needed if not (directory / f).is_file()]


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
                    only: Collection[str] | None = None, sharded: bool = False) -> Path:
    """Write checkpoint `directory` (e.g. run/checkpoints/step-000100) and point `latest` at it.

    `extra_tensors`: state a training mode keeps outside the trainable parameters (ReLoRA's
    merged base weights), restored through `load_checkpoint`'s `load_extra`. `only`: the names of
    the trainable parameters it holds (default: all), those `optimizer` covers. An OSError (a
    full disk) leaves no trace of the new checkpoint and `latest` naming the previous one.

    `sharded` (FSDP, under a process group): every rank calls this and writes its own shards of the
    trainable parameters and the optimizer state through DCP, into a staging directory beside
    `directory`; then rank 0 writes the rest and moves the shards in with it, atomically as always.
    Otherwise one process (rank 0) calls it and writes everything.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    if not sharded:
        weights = _saveable(trainable_state(model, only))
        opt_tensors, opt_scalars = _optimizer_tensors(optimizer, names)

        def write_tensors(tmp: Path) -> None:
            _save(weights, tmp / "trainable.safetensors")
            fault_point("checkpoint_after_weights")
            _save(opt_tensors, tmp / "optimizer.safetensors")
            fault_point("checkpoint_mid_optimizer",
                        tear=(tmp / "optimizer.safetensors", (tmp / "optimizer.safetensors").stat().st_size // 2))
        return _write(directory, write_tensors, optimizer, names, step, extra, extra_tensors, opt_scalars)

    main = distributed.world().main
    staging = directory.with_name(directory.name + STAGING_SUFFIX)

    def make_staging() -> None:  # rank 0 makes it, the others find it made
        clear_staging(directory.parent)  # a crash's, this step's included
        staging.mkdir(parents=True)
    distributed.on_main(make_staging)
    try:
        save_shards(staging, model, optimizer, only)  # a failure on any rank is raised on every rank
    except BaseException:
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        raise

    def move_shards(tmp: Path) -> None:
        os.replace(staging, tmp / SHARDS)
        fault_point("checkpoint_after_weights")

    def write() -> Path:
        try:
            return _write(directory, move_shards, optimizer, names, step, extra, extra_tensors, {})
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    distributed.on_main(write)
    return directory


STAGING_SUFFIX = ".shards"  # step-N.shards: a sharded save's DCP shards before they move into step-N
_STAGING = re.compile(r"step-\d+" + re.escape(STAGING_SUFFIX))
_DCP_FILE = re.compile(r"__\d+_\d+\.distcp|(__\d+)?\.metadata(\.tmp)?")  # what DCP's FileSystemWriter writes


def clear_staging(root: Path) -> list[Path]:
    """Remove the staging directories a sharded save left under checkpoint root `root` when it was killed
    before moving them into place (`step-N.shards`); only those whose name and every file are the ones
    such a save makes (DCP's shard files and index), so nothing else is touched. Returns what it removed.
    Rank 0 calls it, at the start of a sharded save and of a resume."""
    removed = []
    for path in sorted(root.glob(f"step-*{STAGING_SUFFIX}")):
        if not _STAGING.fullmatch(path.name) or path.is_symlink() or not path.is_dir():
            continue
        if all(f.is_file() and not f.is_symlink() and _DCP_FILE.fullmatch(f.name) for f in path.iterdir()):
            shutil.rmtree(path)
            removed.append(path)
    return removed


def _write(directory: Path, write_tensors, optimizer: torch.optim.Optimizer, names: dict[int, str], step: int,
           extra: dict, extra_tensors: dict[str, torch.Tensor] | None, opt_scalars: dict) -> Path:
    """Checkpoint `directory`, atomically: `write_tensors(tmp)` puts in the weights and optimizer state,
    then the RNG, the extra tensors and state.json; then `latest` names it."""
    def write(tmp: Path) -> None:
        write_tensors(tmp)
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
    missing = missing_files(directory)
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
    missing = missing_files(directory)
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


def _shapes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {n: tuple(t.shape) for n, t in tensors.items()}


def _mismatch(where: Path, what: str, found: dict[str, tuple], expected: dict[str, tuple]) -> None:
    """Same names and, name by name, the same shapes, or a CheckpointError naming the first difference."""
    if set(found) != set(expected):
        diff = sorted(set(found) ^ set(expected))
        raise CheckpointError(f"checkpoint {where} does not match the model's {what} (first difference: "
                              f"{diff[0]!r}); was the method or its config changed?")
    for n, shape in found.items():
        if tuple(shape) != tuple(expected[n]):
            raise CheckpointError(f"checkpoint {where}: {n!r} has shape {tuple(shape)}, "
                                  f"the model has {tuple(expected[n])}")


def _check_optimizer_key(where: Path, key: str, name: str, field: str, shape: tuple | None,
                         params: dict[str, torch.Tensor], optimized: set[str], optimizer, file: str,
                         dtype: torch.dtype | None = None) -> None:
    """One optimizer state entry fits this run: a parameter the optimizer covers, an 8-bit moment's
    scales only for an 8-bit optimizer and its codes only of this optimizer's kind (`dtype`: the
    entry's), every tensor but the step counter of the parameter's shape."""
    if name not in optimized or not field:
        raise CheckpointError(f"checkpoint {where}: {file} has key {key!r}, which fits "
                              "no trainable parameter of this run")
    codes = getattr(optimizer, "code_dtype", None)  # an 8-bit optimizer's (optimizers.QUANTIZED)
    if field.endswith(SCALE) and codes is None:
        raise CheckpointError(f"checkpoint {where}: optimizer state {key!r} is an 8-bit moment's; "
                              "resume with the train.optimizer that wrote it (adamw8bit or adamwfp8)")
    wrote = next((n for n, (_, d) in QUANTIZED.items() if d == dtype), None)
    if wrote is not None and dtype != codes:
        # the other 8-bit optimizer's codes (map indices vs fp8 numbers) would load as other values
        raise CheckpointError(f"checkpoint {where}: optimizer state {key!r} holds train.optimizer {wrote}'s "
                              f"{dtype} codes; resume with train.optimizer {wrote}")
    if shape is not None and field != "step" and not field.endswith(SCALE) and tuple(shape) != tuple(params[name].shape):
        raise CheckpointError(f"checkpoint {where}: optimizer state {key!r} has shape "
                              f"{tuple(shape)}, the parameter has {tuple(params[name].shape)}")


def load_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    load_extra=None, expected_extra: dict[str, torch.Tensor] | None = None,
                    only: Collection[str] | None = None) -> dict:
    """Restore trainable weights, optimizer state, RNG and (through `load_extra`) the extra
    tensors; returns state.json's content. `only`: as for `save_checkpoint`.

    Every file is read and checked first (readable, keys and shapes of the weights, of the
    optimizer state and, given `expected_extra`, of the extra tensors): a checkpoint that does not
    fit raises CheckpointError before anything is changed.

    Either kind of checkpoint loads whether the model is sharded (FSDP: each rank takes its part),
    whole on several ranks (DDP) or in one process; a sharded one (DCP) is read by every rank, which
    must all call this then.
    """
    state = read_state(directory)
    extra = _read_tensors(directory, "extra.safetensors")
    rng = _read_tensors(directory, "rng.safetensors")
    params = dict(model.named_parameters())
    trainable = {n: tuple(p.shape) for n, p in params.items() if p.requires_grad and (only is None or n in only)}
    if expected_extra is not None:
        _mismatch(directory, "training-mode state (extra.safetensors)", _shapes(extra), _shapes(expected_extra))
    names = {id(p): n for n, p in params.items()}
    groups = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    if len(state["param_groups"]) != len(groups) or state.get("param_names", groups) != groups:
        raise CheckpointError(f"checkpoint {directory}: its optimizer groups do not match this run's "
                              "trainable parameters; was the method or its config changed?")
    optimized = {n for g in groups for n in g}
    cpu_rng = torch.get_rng_state()
    if "torch" not in rng or rng["torch"].dtype != cpu_rng.dtype or rng["torch"].shape != cpu_rng.shape:
        raise CheckpointError(f"checkpoint {directory}: rng.safetensors holds no valid random-number state")

    if is_sharded(directory):
        index, dtypes = shard_index(directory / SHARDS)
        _mismatch(directory, "trainable parameters",
                  {k.removeprefix("model."): s for k, s in index.items() if k.startswith("model.")}, trainable)
        with_state = set()
        for key, shape in index.items():
            if key.startswith("optim."):  # "optim.<param>.<field>"; fields have no dot, names do
                name, _, field = key.removeprefix("optim.").rpartition(".")
                _check_optimizer_key(directory, key, name, field, shape, params, optimized, optimizer, SHARDS,
                                     dtypes.get(key))
                with_state.add(name)
        # Everything fits: the shards are read into fresh tensors, then into the model and the optimizer.
        load_shards(directory / SHARDS, model, optimizer, state["param_groups"], with_state, only)
    else:
        _load_whole(directory, state, model, optimizer, params, trainable, optimized)
    if load_extra is not None:
        load_extra(extra)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state


def _load_whole(directory: Path, state: dict, model: nn.Module, optimizer: torch.optim.Optimizer,
                params: dict[str, torch.Tensor], trainable: dict[str, tuple], optimized: set[str]) -> None:
    """`load_checkpoint` of a checkpoint with unsharded tensors (trainable.safetensors, optimizer.safetensors):
    checked, then copied in (this rank's part of each, where the model is sharded)."""
    weights = _read_tensors(directory, "trainable.safetensors")
    opt = _read_tensors(directory, "optimizer.safetensors")
    _mismatch(directory, "trainable parameters", _shapes(weights), trainable)
    # Optimizer state, keyed "<param>::<field>".
    per_param: dict[str, dict] = {}
    for key, value in list(opt.items()) + list(state.get("optimizer_scalars", {}).items()):
        name, _, field = key.partition("::")
        tensor = torch.is_tensor(value)
        _check_optimizer_key(directory, key, name, field, tuple(value.shape) if tensor else None,
                             params, optimized, optimizer, "optimizer.safetensors", value.dtype if tensor else None)
        per_param.setdefault(name, {})[field] = like(value, params[name]) if tensor and field != "step" else value

    # Everything fits: now change the model and the optimizer.
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(like(t, params[n]))  # this rank's part of a sharded parameter (FSDP)
    names = {id(p): n for n, p in params.items()}
    current = optimizer.state_dict()
    restored = {"state": {}, "param_groups": []}
    for group, saved, cur in zip(optimizer.param_groups, state["param_groups"], current["param_groups"]):
        for p, idx in zip(group["params"], cur["params"]):
            if names[id(p)] in per_param:
                restored["state"][idx] = per_param[names[id(p)]]
        restored["param_groups"].append({**saved, "params": cur["params"]})
    optimizer.load_state_dict(restored)


# Config keys that only change speed, memory or bookkeeping: a resume may change them freely.
# Every other key changes what the run computes, and a resume refuses to change it unless told.
FREE_KEYS = frozenset({
    "output", "device", "data.cache", "log", "eval_samples",
    "train.eval_every", "train.save_every", "train.save_every_minutes", "train.keep_checkpoints",
    "train.micro_batch_size", "train.activation_checkpointing", "train.activation_checkpointing_fraction",
    "train.compile", "train.compile_memory_budget",
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

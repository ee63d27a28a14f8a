"""The trainable weights and the optimizer state of an FSDP run, saved and loaded through
torch.distributed.checkpoint (DCP): each rank writes its own shard, and a load reshards them to
whatever reads them (another number of ranks, DDP ranks that each hold everything, or one process
without a process group).

Only tensors go through DCP: {"model": trainable parameters by name, "optim": each parameter's
optimizer state by name} (torch's `get_state_dict` names, which are `named_parameters`' names under
FSDP2 too). The optimizer's hyperparameters stay in the checkpoint's state.json, as in the
one-process format (`efftune.train.checkpoint`), so nothing but DCP's own index is pickled. An
8-bit moment (`train.optimizer: adamw8bit` or `adamwfp8`) goes in as plain tensors too, its codes and its block
scales (`efftune.train.optimizers.state_tensors`), and is rebuilt from them on load.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Collection

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ..errors import CheckpointError
from .optimizers import SCALE, state_tensors

SHARDS = "sharded"  # the DCP directory inside a checkpoint directory
METADATA = ".metadata"  # DCP's index of the shards, written by rank 0 last
# Frozen weights stay out (they are the base model's); so do buffers, which the checks below leave out.
_OPTIONS = StateDictOptions(ignore_frozen_params=True)
_LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextmanager
def _one_process_quiet():
    """DCP warns when it runs without a process group; one process reading or writing is what we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _cause(exc: BaseException) -> BaseException:
    """The first rank's own error inside DCP's CheckpointException (which gathers every rank's), else `exc`."""
    failures = getattr(exc, "failures", None) if isinstance(exc, CheckpointException) else None
    return next(iter(failures.values()))[0] if failures else exc


def _trainable(model: nn.Module, state: dict, only: Collection[str] | None = None) -> dict[str, torch.Tensor]:
    """`state`'s trainable parameters; `only`: just these names (one adapter of k trained at once)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad and (only is None or n in only)}
    return {n: t for n, t in state.items() if n in names}


def save_shards(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                only: Collection[str] | None = None) -> None:
    """Write the trainable parameters and the optimizer state into DCP directory `path`: every rank
    calls it and writes its shards; rank 0 writes the index. A failure on any rank is raised on
    every rank (DCP gathers them). `only`: just these parameters (one adapter of k trained at once;
    `optimizer` then covers those alone)."""
    weights, optim = get_state_dict(model, optimizer, options=_OPTIONS)
    params = dict(model.named_parameters())
    state = {name: {f: t for k, v in fields.items()
                    for f, t in (state_tensors(k, v, params[name]) if torch.is_tensor(v) else {k: v}).items()}
             for name, fields in optim["state"].items()}
    try:
        with _one_process_quiet():
            dcp.save({"model": _trainable(model, weights, only), "optim": state},
                     storage_writer=dcp.FileSystemWriter(str(path), overwrite=False), no_dist=not _active())
    except CheckpointException as exc:  # a full disk is the OSError it is, on every rank (the loop reports it)
        cause = _cause(exc)
        if isinstance(cause, OSError):
            raise cause from None
        raise


def shard_index(path: Path) -> tuple[dict[str, tuple[int, ...] | None], dict[str, torch.dtype]]:
    """The tensors DCP directory `path` holds: "model.<name>" and "optim.<name>.<field>" keys, each
    with its whole (unsharded) shape, and each tensor's dtype. A missing or unreadable index is a
    CheckpointError."""
    if not (path / METADATA).is_file():
        raise CheckpointError(f"checkpoint {path.parent} is incomplete: missing {SHARDS}/{METADATA}")
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as exc:  # a torn or garbage index: pickle's and DCP's own errors
        raise CheckpointError(f"checkpoint {path.parent}: {SHARDS}/{METADATA} cannot be read (truncated or "
                              f"corrupt: {type(exc).__name__})") from None
    entries = metadata.state_dict_metadata.items()
    return ({k: tuple(m.size) if hasattr(m, "size") else None for k, m in entries},
            {k: m.properties.dtype for k, m in entries if hasattr(m, "properties")})


def load_shards(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, param_groups: list[dict],
                optimized: set[str], only: Collection[str] | None = None) -> None:
    """Load DCP directory `path` into the model's trainable parameters (this rank's part of each) and
    the optimizer; every rank calls it. `param_groups`: the checkpoint's optimizer hyperparameters, in
    the optimizer's group order; `optimized`: the parameters that have optimizer state in it (one that
    received no gradient before the checkpoint has none, as in one process); `only`: as for
    `save_shards` (the other trainable parameters are left as they are).

    DCP reads into fresh tensors first, so a shard that cannot be read (CheckpointError) leaves the
    model as it was and the optimizer without state, as it was before a resume."""
    had_state = bool(optimizer.state)
    weights, optim = get_state_dict(model, optimizer, options=_OPTIONS)  # gives a fresh optimizer zero state
    weights = _trainable(model, weights, only)
    target = {"model": {n: torch.empty_like(t) for n, t in weights.items()},
              "optim": _optimizer_targets(path, weights, optim["state"], optimized)}
    try:
        with _one_process_quiet():
            dcp.load(target, storage_reader=dcp.FileSystemReader(str(path)), no_dist=not _active())
    except (Exception, CheckpointException) as exc:  # DCP's own is a BaseException
        if not had_state:
            optimizer.state.clear()
        cause = _cause(exc)
        first = next((line for line in str(cause).splitlines() if line.strip()), type(cause).__name__)
        raise CheckpointError(f"checkpoint {path.parent}: its {SHARDS}/ shards cannot be read (truncated, corrupt "
                              f"or missing: {first.strip()[:200]})") from None
    # parameters without saved state get none (torch's optimizer load keeps only what it is given)
    groups = [{**saved, "params": current["params"]} for saved, current in zip(param_groups, optim["param_groups"])]
    set_state_dict(model, optimizer, model_state_dict=target["model"],
                   optim_state_dict={"state": target["optim"], "param_groups": groups}, options=_LOAD_OPTIONS)


def _optimizer_targets(path: Path, params: dict[str, torch.Tensor], live: dict, optimized: set[str]) -> dict:
    """Fresh tensors for the optimizer state DCP directory `path` holds, {param: {field: tensor}}, of the
    kinds it holds them (a plain moment, or an 8-bit moment's codes and `::scale`, which need not be
    those this run would make: `efftune.train.optimizers` rebuilds them) and laid out as this run's
    parameters (each rank's part of a sharded one: its rows; of a scale vector, its `Shard(0)` part)."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor import empty as sharded_empty
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    targets: dict[str, dict] = {}
    for key, meta in metadata.items():
        name, _, field = key.removeprefix("optim.").rpartition(".")
        if not key.startswith("optim.") or name not in optimized:
            continue
        param, size = params[name], getattr(meta, "size", None)
        if size is None:  # a non-tensor value (none of ours): the kind the optimizer has
            targets.setdefault(name, {})[field] = live.get(name, {}).get(field)
            continue
        dtype = meta.properties.dtype
        if tuple(size) == tuple(param.shape) and field != "step":
            target = torch.empty_like(param, dtype=dtype)
        elif field.endswith(SCALE) and isinstance(param, DTensor):
            target = sharded_empty(tuple(size), dtype=dtype, device_mesh=param.device_mesh, placements=(Shard(0),))
        else:
            target = torch.empty(tuple(size), dtype=dtype, device="cpu" if field == "step" else param.device)
        targets.setdefault(name, {})[field] = target
    return targets

"""Fault injection for the never-lose-work tests: `fault_point(name)` marks a place where a run
may die, and dies there when the environment variable EFFTUNE_FAULT names it.

    EFFTUNE_FAULT=checkpoint_after_weights        die (os._exit, like kill -9) the first time
    EFFTUNE_FAULT=checkpoint_after_weights@2      ... the second time the point is reached
    EFFTUNE_FAULT=final_eval:raise                raise FaultInjected instead (in-process tests)
    EFFTUNE_FAULT_RANK=1                          under torchrun: only rank 1 dies, and only in torchrun's
                                                  first attempt (a restart runs through)

`tear=(path, keep)` first cuts `path` to its first `keep` bytes: a write the crash interrupted
halfway. Unset (the normal case) a call costs one dictionary lookup. The points are listed in
POINTS; tests/test_faults.py crashes a run at each and checks that resuming loses nothing.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ENV = "EFFTUNE_FAULT"
EXIT_CODE = 86  # what a process killed at a fault point exits with (a made-up, recognisable number)

POINTS = (
    "before_first_step",         # train loop: model, data and first evaluation done, no step yet
    "mid_step",                  # after the backward pass, before the optimizer step
    "after_optimizer_step",      # weights updated, nothing logged or saved for the step yet
    "mid_metrics_append",        # a metrics.jsonl row half written
    "checkpoint_after_weights",  # checkpoint: trainable.safetensors written, nothing else
    "checkpoint_mid_optimizer",  # checkpoint: optimizer.safetensors half written
    "checkpoint_before_rename",  # checkpoint: every file in <step>.tmp, not yet renamed into place
    "checkpoint_before_latest",  # checkpoint: renamed into place, `latest` still names the previous one
    "before_prune",              # checkpoint complete, older ones not yet pruned
    "final_eval",                # during the evaluation after the last step
    "after_adapter_save",        # the adapter (or model) saved, summary.json not yet written
    "summary_write",             # summary.json half written (to its temporary file)
    "overwrite_before_commit",   # --overwrite: previous run moved aside, the new one has no checkpoint yet
)

_seen: dict[str, int] = {}


class FaultInjected(BaseException):
    """Raised at a fault point in `:raise` mode; a BaseException so no `except Exception` hides it."""


def fault_point(name: str, tear: tuple[Path, int] | None = None) -> None:
    """Die here if EFFTUNE_FAULT names this point (see the module docstring); else do nothing."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    point, _, mode = wanted.partition(":")
    point, _, nth = point.partition("@")
    if point != name:
        return
    rank = os.environ.get("EFFTUNE_FAULT_RANK")
    if rank is not None and (os.environ.get("RANK") != rank or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"):
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] != int(nth or 1):
        return
    if tear is not None:
        path, keep = tear
        os.truncate(path, max(0, keep))
    if mode == "raise":
        raise FaultInjected(name)
    sys.stderr.flush()
    os._exit(EXIT_CODE)


def reset() -> None:
    """Forget how often each point was reached (in-process tests run many runs in one process)."""
    _seen.clear()

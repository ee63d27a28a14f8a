"""A run's output directory: what counts as a run, and replacing one without losing it.

A run counts once it has written its first checkpoint. Until then its directory holds a marker
file (MARKER), and a later `efftune train` into it clears what the unfinished attempt wrote (only
the files a run writes) instead of refusing with "already holds a run".

`--overwrite` moves the previous run aside (to the hidden sibling `.<name>.efftune-previous`)
instead of deleting it, and deletes it only when the new run writes its first checkpoint. A new
run that fails before that puts the previous one back; one that was killed (nothing runs on
kill -9) is put back by the next command on that directory, which looks for the sibling first.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from ..data.options import upgrade_saved
from ..errors import EfftuneError
from ..faults import fault_point
from ..files import write_text_atomically
from .checkpoint import changed_keys, flatten_config, latest_checkpoint

MARKER = ".efftune-incomplete"
# What a run writes into its directory before its first checkpoint (and their temporary names)
RUN_FILES = frozenset({"config.json", "metrics.jsonl", "training.png", "routing.json", "routing.png",
                       "summary.json", "checkpoints", MARKER})


def previous_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.efftune-previous"


def _is_run_file(name: str) -> bool:
    return name in RUN_FILES or name.removesuffix(".tmp") in RUN_FILES


class RunDir:
    """The output directory of one `efftune train` call (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, log: Callable[[str], None] = print):
        self.path = Path(path)
        self.log = log
        self.committed = False
        self.restored = False          # abandon() put a previous run back
        self._config_on_commit: str | None = None

    # -- what an earlier, killed command left half done ------------------------------------------
    def _clear_unfinished(self) -> None:
        """Remove what a run without a checkpoint wrote (its own files only), and the directories
        that run created (the output and the parents it made), those left empty."""
        out = self.path
        if not out.is_dir():
            return
        try:
            created = int(json.loads((out / MARKER).read_text()).get("created", 0))
        except (OSError, ValueError, AttributeError, TypeError):
            created = 0
        for entry in out.iterdir():
            if not _is_run_file(entry.name):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        for d in [out, *out.parents][:created]:  # deepest first
            if any(d.iterdir()):
                break
            d.rmdir()

    def recover(self, clear_unfinished: bool = True) -> None:
        """Finish what a killed command left: a committed run's leftovers are removed, an --overwrite
        that did not commit is undone, and (`clear_unfinished`) a run without a checkpoint is cleared."""
        out, prev = self.path, previous_dir(self.path)
        committed = out.is_dir() and ((out / "checkpoints" / "latest").exists()
                                      or (not (out / MARKER).exists() and any(out.iterdir())))
        if committed:
            (out / MARKER).unlink(missing_ok=True)  # a kill between the first checkpoint and commit()
            if prev.is_dir():
                shutil.rmtree(prev)
            return
        if prev.is_dir():
            self._clear_unfinished()
            if out.exists() and any(out.iterdir()):
                raise EfftuneError(f"{out} holds files a run did not write, and the run it replaced is in "
                                   f"{prev}; move one of them away")
            if out.exists():
                out.rmdir()
            os.replace(prev, out)
            self.log(f"restored the previous run in {out}: the --overwrite run that replaced it stopped "
                     "before its first checkpoint")
        elif clear_unfinished and (out / MARKER).exists():
            self._clear_unfinished()

    # -- a fresh run ------------------------------------------------------------------------------
    def start(self, config: dict, overwrite: bool) -> None:
        """Make the directory ready for a new run and write its config.json."""
        out = self.path
        self.recover()
        if out.exists() and not out.is_dir():
            raise EfftuneError(f"output {out} is a file, not a directory; name a directory for the run")
        # how many directories this run creates: the output and any missing parents (removed again
        # if the run never gets to a checkpoint)
        created = next(i for i, d in enumerate([out, *out.parents]) if d.exists())
        if out.exists() and any(out.iterdir()):
            if not overwrite:
                raise EfftuneError(f"output directory {out} already holds a run; pass --overwrite to replace "
                                   "it or --resume to continue it")
            os.replace(out, previous_dir(out))  # kept until the new run writes its first checkpoint
            created = 1
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomically(out / MARKER, json.dumps({"created": created}))
        write_text_atomically(out / "config.json", json.dumps(config, indent=2))
        if previous_dir(out).exists():
            fault_point("overwrite_before_commit")

    # -- a resumed run ----------------------------------------------------------------------------
    def resume(self, config: dict, allow_changed: bool) -> list[str]:
        """Check that the run can be resumed with `config`; returns the keys it changes (allowed
        only with `allow_changed`). config.json is rewritten only at commit()."""
        out = self.path
        self.recover(clear_unfinished=False)  # a failed --resume changes nothing in the directory
        if not out.is_dir():
            raise EfftuneError(f"--resume: {out} does not exist")
        if latest_checkpoint(out / "checkpoints") is None:
            if (out / MARKER).exists():
                raise EfftuneError(f"--resume: {out} has no checkpoint to resume from (its run stopped before the "
                                   "first one); run without --resume to start it")
            raise EfftuneError(f"--resume: {out} has no good checkpoint to resume from; start the run again "
                               "with --overwrite")
        try:
            saved = json.loads((out / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise EfftuneError(f"--resume: cannot read {out / 'config.json'} ({exc.__class__.__name__}); "
                               "the run's config is needed to resume it") from None
        saved = upgrade_saved(saved)  # a run saved before the data section: its data keys where the new config has them
        changed = changed_keys(saved, config)
        if changed and not allow_changed:
            old, new = flatten_config(saved), flatten_config(config)
            shown = "; ".join(f"{k} {old[k]!r} -> {new[k]!r}" for k in changed[:4])
            raise EfftuneError(f"--resume: the run was started with other values of {', '.join(changed)} ({shown}); "
                               "resuming would not continue the same run: pass --resume-changed to accept that")
        self.committed = True  # a run with a checkpoint counts already
        if changed:
            self._config_on_commit = json.dumps(config, indent=2)
        return changed

    # -- the run's outcome ------------------------------------------------------------------------
    def commit(self, _checkpoint: Path | None = None) -> None:
        """The run has a checkpoint: it counts now. Idempotent; a train() on_checkpoint callback."""
        out = self.path
        if self._config_on_commit is not None:
            write_text_atomically(out / "config.json", self._config_on_commit)
            self._config_on_commit = None
        if (out / MARKER).exists():
            (out / MARKER).unlink()
        if previous_dir(out).exists():
            shutil.rmtree(previous_dir(out))
        self.committed = True

    def abandon(self) -> None:
        """The run failed: undo what it did if it has no checkpoint (a resume: nothing to undo)."""
        if self.committed:
            return
        try:
            self.recover()
        except OSError:
            pass  # the next command's recover() tries again
        self.restored = self.path.is_dir() and not (self.path / MARKER).exists() and any(self.path.iterdir())


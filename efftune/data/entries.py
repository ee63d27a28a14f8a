"""A data-cache entry: a directory of named numpy arrays (`.npy`, read back memory-mapped) and a small
`entry.json`, written whole or not at all.

The parsed examples (`efftune.data.stored`) and the tokenised sequences (`efftune.data.token_cache`)
are both kept this way. Memory-mapping is what lets a second run over a million conversations start
at once: opening an entry reads the headers only, and a row's numbers are read from the page cache
when a batch asks for them. An entry that cannot be read back (cut short, overwritten, another
format) raises `DamagedEntry`; the caller says so in one line and builds it again.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

META_FILE = "entry.json"


class DamagedEntry(Exception):
    """A cache entry that exists but cannot be used; the message says why."""


def write_entry(path: Path, arrays: Mapping[str, np.ndarray], meta: dict) -> None:
    """Write `arrays` (as `<name>.npy`) and `meta` (as entry.json) into the directory `path`, through a
    temporary directory of this call's own, renamed into place when complete: readers see a whole
    entry or none. A damaged entry at `path` is moved aside and removed first; when another process
    (another rank) puts the same entry in place meanwhile, its entry is kept and this one dropped."""
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp"))
    try:
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)
        (tmp / META_FILE).write_text(json.dumps(meta))
        for f in tmp.iterdir():  # on disk before the rename that publishes them (power loss)
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{path.name}.", suffix=".old"))
            os.replace(path, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, path)
        except OSError:
            if not path.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_entry(path: Path, names: Sequence[str], format: str) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays `names` of the entry at `path`, memory-mapped read-only, and its meta. Raises
    DamagedEntry when its entry.json is missing, unreadable or of another `format`, or an array
    cannot be mapped (a file cut short, not an .npy file)."""
    try:
        meta = json.loads((path / META_FILE).read_text())
        if not isinstance(meta, dict) or meta.get("format") != format:
            raise DamagedEntry(f"written in another format ({meta.get('format') if isinstance(meta, dict) else meta!r})")
        arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in names}
    except (OSError, ValueError, UnicodeDecodeError) as exc:  # json's and numpy's errors are ValueErrors
        raise DamagedEntry(f"{type(exc).__name__}: {exc}") from None
    for name, array in arrays.items():
        if array.ndim != 1:
            raise DamagedEntry(f"{name}.npy holds a {array.ndim}-d array, not a 1-d one")
    return arrays, meta


def check_offsets(offsets: np.ndarray, rows: int, total: int, what: str) -> None:
    """`offsets` (rows + 1 of them) must start at 0, never fall, and end at `total`: else DamagedEntry."""
    if len(offsets) != rows + 1 or offsets[0] != 0 or offsets[-1] != total or bool((np.diff(offsets) < 0).any()):
        raise DamagedEntry(f"{what}: its offsets do not cover its {total} values in {rows} rows")


def take(seq: Sequence, indices: Sequence[int]) -> Sequence:
    """`seq` at `indices`, in that order: a view where `seq` is one of the cache's lazy sequences
    (they have `take`), else a list."""
    if hasattr(seq, "take"):
        return seq.take(indices)
    return [seq[int(i)] for i in indices]

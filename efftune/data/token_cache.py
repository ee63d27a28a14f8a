"""Tokenised training data kept on disk, so a second run over the same data starts at once.

Rendering a conversation with its chat template, turn by turn, costs far more than reading the
file; a million conversations take minutes. The cache key is a hash of everything the tokens
depend on: the examples themselves (their text, in order), the tokenizer (its whole vocabulary and
merges, special tokens), the chat template, and the Formatter's options (max_length, train_on,
chat_template, prefix ids). Any change gives another key, so an entry is never stale; entries are
`$EFFTUNE_CACHE/tokens/<key>.npz`, written under a temporary name and renamed into place.
"""
from __future__ import annotations

import gc
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..cache import cache_dir
from ..progress import QUIET_SECONDS, progress_bar
from .examples import Example
from .tokenize import Encoded, Formatter

FORMAT = "efftune-tokens-1"  # bump when Formatter's output changes for the same inputs


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides the tokenizer's output: its full serialisation where it has one (a fast
    tokenizer's tokenizer.json), else its vocabulary; its special tokens and chat template."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr(sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items())).encode())
    h.update(repr(getattr(tokenizer, "chat_template", None)).encode())
    return h.hexdigest()


def cache_key(formatter: Formatter, examples: Sequence[Example]) -> str:
    h = hashlib.sha256(FORMAT.encode())
    h.update(tokenizer_fingerprint(formatter.tokenizer).encode())
    h.update(repr((formatter.max_length, formatter.chat_template, formatter.train_on, formatter.prefix_ids)).encode())
    h.update(str(len(examples)).encode())
    for e in examples:  # dataclass reprs: the type, every field; never a row's location
        h.update(repr(e).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def _save(path: Path, seqs: Sequence[Encoded]) -> None:
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    ids = np.fromiter((t for s in seqs for t in s.input_ids), dtype=np.int64, count=int(lengths.sum()))
    labels = np.fromiter((t for s in seqs for t in s.labels), dtype=np.int64, count=int(lengths.sum()))
    dropped = np.array([s.dropped for s in seqs], dtype=np.int64)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, ids=ids, labels=labels, lengths=lengths, dropped=dropped)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load(path: Path) -> list[Encoded] | None:
    # The cyclic garbage collector is paused while the lists are built: they hold no cycles, and with
    # tens of millions of new ints its passes would cost more than the building (3x at 100k rows).
    paused = gc.isenabled()
    gc.disable()
    try:
        with np.load(path) as z:
            ids, labels, lengths, dropped = (z[k].tolist() for k in ("ids", "labels", "lengths", "dropped"))
        out, at = [], 0
        for n, d in zip(lengths, dropped):
            out.append(Encoded(ids[at:at + n], labels[at:at + n], d))
            at += n
        return out
    except Exception:  # a damaged entry is tokenised again and rewritten
        return None
    finally:
        if paused:
            gc.enable()


def encode_all(formatter: Formatter, examples: Sequence[Example], use_cache: bool = True,
               log: Callable[[str], None] | None = None, what: str = "training examples") -> list[Encoded]:
    """`formatter.encode` of every example, from the cache when it holds them."""
    path = None
    if use_cache:
        path = cache_dir("tokens") / f"{cache_key(formatter, examples)}.npz"
        if path.is_file() and (seqs := _load(path)) is not None and len(seqs) == len(examples):
            if log:
                log(f"data: {len(seqs)} {what} tokenised before, read from the cache ({path})")
            return seqs
    seqs = []
    with progress_bar(len(examples), f"tokenising {what}", unit="ex", leave=False, delay=QUIET_SECONDS) as bar:
        for e in examples:
            seqs.append(formatter.encode(e))
            bar.update(1)
    if path is not None:
        try:
            _save(path, seqs)
        except OSError as exc:  # a full or read-only cache costs the next run time, not this one
            if log:
                log(f"data: could not write the tokenisation cache {path}: {exc.strerror or exc}")
    return seqs

"""Tokenised training data kept on disk, so a second run over the same data starts at once.

Rendering a conversation with its chat template, turn by turn, costs far more than reading the
file; a million conversations take many minutes. The cache key is a hash of everything the tokens
depend on: the examples (for a data file read through `efftune.data.stored`, the key of its parsed
entry, itself a hash of the file's bytes, split and column mapping; otherwise the examples' text, in
order), the tokenizer (its whole vocabulary and merges, special tokens), the chat template, and the
Formatter's options (max_length, train_on, chat_template, prefix ids; with a prefix per task, those
and each example's task). Any change gives another key, so an entry is never stale.

An entry, `$EFFTUNE_DATA_CACHE/tokens/<key>/`, holds flat arrays (`efftune.data.entries`): every
token id, a target mask, offsets, and per sequence the tokens cut and the target count; a run maps
them (`TokenArrays`) and builds a batch's sequences when the loop asks. A file's entry holds all of
its examples, so another seed or held-out size takes its training set from the same entry.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ..cache import data_cache_dir
from ..progress import QUIET_SECONDS, progress_bar
from .entries import DamagedEntry, check_offsets, read_entry, write_entry
from .examples import Example
from .stored import StoredExamples
from .tokenize import Encoded, Formatter, TokenArrays

FORMAT = "efftune-tokens-2"  # bump when Formatter's output (or the arrays) change for the same inputs


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
    per_task = bool(formatter.task_prefixes)  # a prefix per task: each example's task picks its tokens too
    if per_task:
        h.update(repr(sorted(formatter.task_prefixes.items())).encode())
    if isinstance(examples, StoredExamples):  # the parsed file's own key: nothing to decode
        h.update(f"stored {examples.base.key}".encode())
        return h.hexdigest()[:32]
    h.update(str(len(examples)).encode())
    for e in examples:  # dataclass reprs: the type, every field; never a row's location (nor its task)
        h.update(repr(e).encode())
        h.update(b"\0")
        if per_task:
            h.update(e.task.encode())
            h.update(b"\0")
    return h.hexdigest()[:32]


def _open(path: Path, count: int, id_bound: int) -> TokenArrays:
    """The entry at `path`, mapped; DamagedEntry unless it holds `count` sequences whose arrays agree
    and whose ids are token ids (below `id_bound`): a damaged entry must not reach the model."""
    arrays, meta = read_entry(path, TokenArrays.ARRAYS, FORMAT)
    ids, mask, offsets, dropped, targets = (arrays[name] for name in TokenArrays.ARRAYS)
    if (ids.dtype, mask.dtype, offsets.dtype, dropped.dtype, targets.dtype) != \
            (np.int32, np.bool_, np.int64, np.int32, np.int32):
        raise DamagedEntry("its arrays are not of the types written")
    if meta.get("sequences") != count or len(dropped) != count or len(targets) != count:
        raise DamagedEntry(f"it holds {len(dropped)} sequences, not {count}")
    if len(mask) != len(ids):
        raise DamagedEntry(f"{len(mask)} mask values for {len(ids)} token ids")
    check_offsets(offsets, count, len(ids), "the token ids")
    if len(ids) and not 0 <= int(ids.min()) <= int(ids.max()) < id_bound:
        raise DamagedEntry(f"it holds token ids outside 0..{id_bound - 1}")
    return TokenArrays(ids, mask, offsets, dropped, targets)


def _id_bound(formatter: Formatter) -> int:
    prefixes = [formatter.prefix_ids, *formatter.task_prefixes.values()]
    return max([len(formatter.tokenizer), *(p + 1 for ids in prefixes for p in ids)])  # prompt tuning's ids lie above


def encode_all(formatter: Formatter, examples: Sequence[Example], use_cache: bool = True,
               log: Callable[[str], None] | None = None, what: str = "training examples") -> TokenArrays:
    """`formatter.encode` of every example, as TokenArrays, from the cache when it holds them. For
    StoredExamples (a view of a parsed file) the whole file's examples are tokenised and kept, and
    the view's sequences returned. A damaged entry is said in one line and tokenised again."""
    say = log or (lambda line: None)
    source = examples.base if isinstance(examples, StoredExamples) else examples

    def view(arrays: TokenArrays) -> TokenArrays:
        index = examples.index if isinstance(examples, StoredExamples) else None
        return arrays if index is None else arrays.take(index)

    path = data_cache_dir("tokens") / cache_key(formatter, source) if use_cache else None
    if path is not None and path.exists():
        try:
            arrays = _open(path, len(source), _id_bound(formatter))
            say(f"data: {what} tokenised before, read from the cache ({len(source)} sequences, {path})")
            return view(arrays)
        except DamagedEntry as exc:
            say(f"data: the tokenisation cache entry {path} cannot be used ({exc}); tokenising again")
    arrays = TokenArrays.build(_encoded(formatter, source, what))
    if path is not None:
        try:
            write_entry(path, arrays.arrays(), {"format": FORMAT, "sequences": len(source)})
        except OSError as exc:  # a full or read-only cache costs the next run time, not this one
            say(f"data: could not write the tokenisation cache {path}: {exc.strerror or exc}")
    return view(arrays)


def _encoded(formatter: Formatter, examples: Sequence[Example], what: str) -> Iterator[Encoded]:
    with progress_bar(len(examples), f"tokenising {what}", unit="ex", leave=False, delay=QUIET_SECONDS) as bar:
        for e in examples:
            yield formatter.encode(e)
            bar.update(1)

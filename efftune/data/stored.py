"""The examples of a data file, parsed once and kept on disk, so that a second run over the same file
parses nothing.

A run over a million conversations spends tens of seconds reading and checking the JSON and building
a million Python objects before it tokenises anything (`efftune.data.token_cache` keeps the tokens).
Here the examples of a file (or of a `save_to_disk` directory) are kept as one byte array of their
JSON texts with offsets (`efftune.data.entries`), under `$EFFTUNE_DATA_CACHE/examples/<key>/`. The key
is a hash of the file's bytes (sha256: about half a second a gigabyte), of the path as given (error
messages name rows by it), of the split and of the column mapping, so a changed byte, split or
mapping is another entry and an entry is never stale. `StoredExamples` decodes an example only when
it is asked for (a batch's, the held-out set's, a row named in an error), never all of them up front.
Hugging Face dataset ids are read through `datasets` every time (their own cache keeps them).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence, overload

import numpy as np

from ..cache import data_cache_dir
from .entries import DamagedEntry, check_offsets, read_entry, write_entry
from .examples import Completion, Conversation, Example, MultipleChoice
from .sources import load_data

FORMAT = "efftune-examples-1"  # bump when an Example's fields or their encoding change
_ARRAYS = ("text", "offsets", "replied")


def _encode(e: Example) -> bytes:
    if isinstance(e, Conversation):
        row = ["conversation", e.messages, e.where]
    elif isinstance(e, MultipleChoice):
        row = ["choice", e.prompt, e.choices, e.answer, e.correct]
    elif isinstance(e, Completion):
        row = ["completion", e.prompt, e.completion]
    else:
        raise TypeError(f"not an example: {e!r}")
    return json.dumps(row, ensure_ascii=False).encode()


def _decode(data: bytes) -> Example:
    kind, *fields = json.loads(data)
    if kind == "conversation":
        return Conversation(tuple((role, content) for role, content in fields[0]), where=fields[1])
    if kind == "choice":
        return MultipleChoice(fields[0], tuple(fields[1]), fields[2], tuple(fields[3]))
    return Completion(*fields)


def replied(e: Example) -> bool:
    """False for a conversation without an assistant turn (nothing in it is trained on unless
    train_on: all); True for every other example."""
    return not isinstance(e, Conversation) or any(role == "assistant" for role, _ in e.messages)


class StoredExamples(Sequence[Example]):
    """Examples decoded one at a time from a cache entry; `take` gives a view of some of them.

    `key` names the whole entry (the file's examples, in file order): the token cache keys on it
    instead of on the examples' text, which would mean decoding them all."""

    def __init__(self, key: str, text: np.ndarray, offsets: np.ndarray, replied: np.ndarray,
                 index: np.ndarray | None = None):
        self.key, self._text, self._offsets, self._replied, self.index = key, text, offsets, replied, index

    @classmethod
    def open(cls, path: Path, key: str) -> "StoredExamples":
        arrays, meta = read_entry(path, _ARRAYS, FORMAT)
        text, offsets, has_reply = (arrays[name] for name in _ARRAYS)
        n = meta.get("examples")
        if text.dtype != np.uint8 or offsets.dtype != np.int64 or has_reply.dtype != np.bool_:
            raise DamagedEntry("its arrays are not of the types written")
        if not isinstance(n, int) or len(has_reply) != n:
            raise DamagedEntry(f"it holds {len(has_reply)} flags for {n!r} examples")
        check_offsets(offsets, n, len(text), "the examples' text")
        return cls(key, text, offsets, has_reply)

    @property
    def base(self) -> "StoredExamples":
        """Every example of the entry, in file order."""
        return self if self.index is None else StoredExamples(self.key, self._text, self._offsets, self._replied)

    def __len__(self) -> int:
        return len(self._replied) if self.index is None else len(self.index)

    @overload
    def __getitem__(self, i: int) -> Example: ...
    @overload
    def __getitem__(self, i: slice) -> "StoredExamples": ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        n, i = len(self), int(i)
        if not -n <= i < n:
            raise IndexError(f"example {i} of {n}")
        j = int(self.index[i]) if self.index is not None else i % n  # (i % n: a negative index counts back)
        return _decode(bytes(self._text[self._offsets[j]:self._offsets[j + 1]]))

    def take(self, indices: Sequence[int]) -> "StoredExamples":
        """The examples at `indices` (of this view), in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        index = indices if self.index is None else self.index[indices]
        return StoredExamples(self.key, self._text, self._offsets, self._replied, index)

    def replied(self) -> np.ndarray:
        """Per example of this view: `replied(example)`, without decoding it."""
        return np.asarray(self._replied if self.index is None else self._replied[self.index])

    def __repr__(self) -> str:
        return f"StoredExamples({len(self)} examples of entry {self.key})"


def source_key(path: Path, split: str | None, columns: dict[str, str] | None) -> str:
    """A hash of what a file's (or a saved dataset directory's) examples depend on: every byte of
    it, the path as given, the split and the column mapping."""
    h = hashlib.sha256(FORMAT.encode())
    h.update(repr((str(path), split, sorted((columns or {}).items()))).encode())
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(repr((str(f.relative_to(path)) if f != path else "", f.stat().st_size)).encode())
        with open(f, "rb") as stream:
            h.update(hashlib.file_digest(stream, "sha256").digest())
    return h.hexdigest()[:32]


def _write(path: Path, examples: Sequence[Example]) -> None:
    texts = [_encode(e) for e in examples]
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum([len(t) for t in texts], out=offsets[1:])
    write_entry(path, {"text": np.frombuffer(b"".join(texts), dtype=np.uint8), "offsets": offsets,
                       "replied": np.array([replied(e) for e in examples], dtype=np.bool_)},
                {"format": FORMAT, "examples": len(texts)})


def read_source(spec: str | Path, split: str | None = None, columns: dict[str, str] | None = None, *,
                use_cache: bool = True, log: Callable[[str], None] | None = None) -> Sequence[Example]:
    """`load_data(spec, split, columns)`, from the cache when `spec` is a local file or directory
    parsed before (then a StoredExamples, also the first time, so that both runs key their tokens
    alike). A damaged entry is said in one line and parsed again; a cache that cannot be written
    costs the next run time, not this one."""
    path = Path(spec).expanduser()
    say = log or (lambda line: None)
    if not use_cache or not (path.is_file() or path.is_dir()):
        return load_data(spec, split, columns)
    key = source_key(path, split, columns)
    entry = data_cache_dir("examples") / key
    if entry.exists():
        try:
            stored = StoredExamples.open(entry, key)
            say(f"data: {len(stored)} examples of {spec} parsed before, read from the cache ({entry})")
            return stored
        except DamagedEntry as exc:
            say(f"data: the cache entry {entry} cannot be used ({exc}); reading {spec} again")
    examples = load_data(spec, split, columns)
    try:
        _write(entry, examples)
        return StoredExamples.open(entry, key)
    except (OSError, DamagedEntry) as exc:
        say(f"data: could not keep the examples of {spec} in the cache {entry}: "
            f"{getattr(exc, 'strerror', None) or exc}")
        return examples


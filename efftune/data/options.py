"""The run config's `data` section (`DataConfig`): where the training and evaluation data come
from and how they are read; and the overflow policy for rows longer than train.max_length
(`data.overflow: truncate | drop | error`), applied after tokenising."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ..errors import ConfigError, DataError
from .chat import TRAIN_ON
from .entries import take
from .examples import Example
from .stored import StoredExamples, read_source, replied
from .tokenize import Encoded, sequence_stats

OVERFLOW = ("truncate", "drop", "error")


@dataclass
class DataConfig:
    """The `data` section: your data instead of BIG-bench (`path`; none: the run's `task`), and how it
    is read. Checked when made, so a bad value is refused before anything loads, naming `data.<field>`."""
    path: str | None = None          # a data file, saved dataset or hub id (efftune.data.sources)
    eval_path: str | None = None     # the same, to evaluate on (none: a held-out split of `path`)
    split: str | None = None         # split of a hub dataset or saved DatasetDict (none: train)
    eval_split: str | None = None    # split of eval_path (none: `split`)
    columns: list[str] = field(default_factory=list)  # FIELD=COLUMN: read field from column
    train_on: str = "assistant"      # conversations' targets: assistant | last_assistant | all
    overflow: str = "truncate"       # rows over train.max_length: truncate | drop | error
    cache: bool = True               # keep parsed and tokenised data in the cache (efftune.data.token_cache)

    def __post_init__(self):
        from .sources import parse_columns
        if self.train_on not in TRAIN_ON:
            raise ConfigError(f"data.train_on must be one of {', '.join(TRAIN_ON)}, got {self.train_on!r}")
        if self.overflow not in OVERFLOW:
            raise ConfigError(f"data.overflow must be one of {', '.join(OVERFLOW)}, got {self.overflow!r}")
        parse_columns(self.columns)


# The keys a run config had at its top level before the `data` section: old key -> the section's field.
MOVED = {"data": "path", "eval_data": "eval_path", "data_split": "split", "eval_split": "eval_split",
         "data_columns": "columns", "data_train_on": "train_on", "data_overflow": "overflow", "data_cache": "cache"}


def moved_key(values: dict) -> str | None:
    """The one-line refusal of a config mapping that still writes a data option at its top level
    (`data_train_on: all`, `data: file.jsonl`), naming the key to write instead; None if it has none."""
    for old, new in MOVED.items():
        if old not in values or old == "data" and isinstance(values[old], dict):
            continue
        if old == "data":
            example = f" (data: {{path: {values[old]}}})" if isinstance(values[old], str) else ""
            return f"data is a section now: write data.path for the data file{example}"
        return f"{old} moved: write data.{new} (data: {{{new}: ...}})"
    return None


def upgrade_saved(values: dict) -> dict:
    """A run config saved before the `data` section (a run's config.json), its data options moved
    into the section, so that a resume compares them with the new config's."""
    if all(old not in values or (old == "data" and isinstance(values[old], dict)) for old in MOVED):
        return values
    out = {k: v for k, v in values.items() if k not in MOVED}
    out["data"] = {new: values[old] for old, new in MOVED.items() if old in values}
    return out


def where_of(example: Example, index: int, source: str) -> str:
    return getattr(example, "where", "") or f"{source} example {index}"


def apply_overflow(examples: Sequence[Example], seqs: Sequence[Encoded], policy: str, max_length: int,
                   source: str = "the training data") -> tuple[list[int], list[str]]:
    """The indices of the sequences kept under `policy`, and the lines to log about the rest.

    truncate: keep cut sequences (a prompt loses its start, an answer or a conversation its end),
    but drop those the cut left without a target; drop: leave out every sequence that was cut;
    error: refuse the first one, naming its row. Nothing is left out without a count. Counted on
    arrays (`sequence_stats`): a million mapped sequences are never built one by one."""
    lengths, dropped, targets = sequence_stats(seqs)
    cut, empty = dropped > 0, targets == 0
    if policy == "error" and (cut | empty).any():
        i = int(np.flatnonzero(cut | empty)[0])
        if cut[i]:
            raise DataError(f"{where_of(examples[i], i, source)}: {int(lengths[i] + dropped[i])} tokens, more than "
                            f"train.max_length {max_length} (data.overflow: error; raise --max-length, or "
                            "data.overflow: truncate | drop)")
        raise DataError(f"{where_of(examples[i], i, source)}: no target token is left after cutting to "
                        f"train.max_length {max_length}")
    gone = (cut | empty) if policy == "drop" else empty
    lines = []
    if policy == "drop" and cut.any():
        lines.append(f"data: {int(cut.sum())} of {len(seqs)} training examples are longer than max_length {max_length} "
                     "tokens and were dropped (data.overflow: drop)")
    emptied = int((empty & ~cut).sum()) if policy == "drop" else int(empty.sum())
    if emptied:
        lines.append(f"data: {emptied} of {len(seqs)} training examples have no target token within max_length "
                     f"{max_length} tokens and were dropped")
    return np.flatnonzero(~gone).tolist(), lines


def drop_without_assistant(examples: Sequence[Example], policy: str, train_on: str,
                           source: str) -> tuple[Sequence[Example], int]:
    """Conversations with no assistant turn train nothing (unless train_on: all): skipped with a count,
    or refused under data.overflow: error. Examples kept on disk (StoredExamples) are read from their
    flags, not decoded."""
    if train_on == "all":
        return examples, 0
    ok = examples.replied() if isinstance(examples, StoredExamples) else np.array([replied(e) for e in examples],
                                                                                  dtype=np.bool_)
    if ok.all():
        return examples, 0
    if policy == "error":
        i = int(np.flatnonzero(~ok)[0])
        raise DataError(f"{where_of(examples[i], i, source)}: the conversation has no assistant turn, so nothing in it "
                        "is trained on (data.overflow: error refuses it; truncate or drop skip it)")
    return take(examples, np.flatnonzero(ok)), int((~ok).sum())


def load_for_run(data: DataConfig, evaluation: bool = False,
                 log: Callable[[str], None] | None = None) -> Sequence[Example]:
    """A run's data (`data.path`, or `data.eval_path`) read as its `data` section says: split, column
    mapping, conversations without an assistant turn skipped with a count (refused under
    data.overflow: error). With `data.cache` a local file is parsed once (`efftune.data.stored`): a
    second run decodes only the examples it uses."""
    from .sources import parse_columns
    spec = data.eval_path if evaluation else data.path
    split = (data.eval_split or data.split) if evaluation else data.split
    examples = read_source(spec, split, parse_columns(data.columns), use_cache=data.cache, log=log)
    kept, skipped = drop_without_assistant(examples, data.overflow, data.train_on, str(spec))
    if skipped and log:
        log(f"data: {skipped} of {len(examples)} conversations in {spec} have no assistant turn and were skipped")
    if not kept:
        raise DataError(f"{spec}: no row has anything to train on")
    return kept

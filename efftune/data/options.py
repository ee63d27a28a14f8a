"""The run's data_* keys: their checks, and the overflow policy for rows longer than
train.max_length (`data_overflow: truncate | drop | error`), applied after tokenising."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..errors import ConfigError, DataError
from .chat import TRAIN_ON
from .entries import take
from .examples import Example
from .stored import StoredExamples, read_source, replied
from .tokenize import Encoded, sequence_stats

OVERFLOW = ("truncate", "drop", "error")


def check_data_options(cfg) -> None:
    """Check a RunConfig's data_* keys (before anything is loaded)."""
    from .sources import parse_columns
    if cfg.data_train_on not in TRAIN_ON:
        raise ConfigError(f"data_train_on must be one of {', '.join(TRAIN_ON)}, got {cfg.data_train_on!r}")
    if cfg.data_overflow not in OVERFLOW:
        raise ConfigError(f"data_overflow must be one of {', '.join(OVERFLOW)}, got {cfg.data_overflow!r}")
    if cfg.eval_samples < 0:
        raise ConfigError(f"eval_samples must be 0 or more, got {cfg.eval_samples}")
    parse_columns(cfg.data_columns)


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
                            f"train.max_length {max_length} (data_overflow: error; raise --max-length, or "
                            "data_overflow: truncate | drop)")
        raise DataError(f"{where_of(examples[i], i, source)}: no target token is left after cutting to "
                        f"train.max_length {max_length}")
    gone = (cut | empty) if policy == "drop" else empty
    lines = []
    if policy == "drop" and cut.any():
        lines.append(f"data: {int(cut.sum())} of {len(seqs)} training examples are longer than max_length {max_length} "
                     "tokens and were dropped (data_overflow: drop)")
    emptied = int((empty & ~cut).sum()) if policy == "drop" else int(empty.sum())
    if emptied:
        lines.append(f"data: {emptied} of {len(seqs)} training examples have no target token within max_length "
                     f"{max_length} tokens and were dropped")
    return np.flatnonzero(~gone).tolist(), lines


def drop_without_assistant(examples: Sequence[Example], policy: str, train_on: str,
                           source: str) -> tuple[Sequence[Example], int]:
    """Conversations with no assistant turn train nothing (unless train_on: all): skipped with a count,
    or refused under data_overflow: error. Examples kept on disk (StoredExamples) are read from their
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
                        "is trained on (data_overflow: error refuses it; truncate or drop skip it)")
    return take(examples, np.flatnonzero(ok)), int((~ok).sum())


def load_for_run(cfg, evaluation: bool = False, log: Callable[[str], None] | None = None) -> Sequence[Example]:
    """A RunConfig's `data` (or `eval_data`) read as its data_* keys say: split, column mapping,
    conversations without an assistant turn skipped with a count (refused under data_overflow: error).
    With `data_cache` a local file is parsed once (`efftune.data.stored`): a second run decodes only
    the examples it uses."""
    from .sources import parse_columns
    spec = cfg.eval_data if evaluation else cfg.data
    split = (cfg.eval_split or cfg.data_split) if evaluation else cfg.data_split
    examples = read_source(spec, split, parse_columns(cfg.data_columns), use_cache=cfg.data_cache, log=log)
    kept, skipped = drop_without_assistant(examples, cfg.data_overflow, cfg.data_train_on, str(spec))
    if skipped and log:
        log(f"data: {skipped} of {len(examples)} conversations in {spec} have no assistant turn and were skipped")
    if not kept:
        raise DataError(f"{spec}: no row has anything to train on")
    return kept

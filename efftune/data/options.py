"""The run's data_* keys: their checks, and the overflow policy for rows longer than
train.max_length (`data_overflow: truncate | drop | error`), applied after tokenising."""
from __future__ import annotations

from typing import Callable, Sequence

from ..errors import ConfigError, DataError
from .chat import TRAIN_ON
from .examples import Conversation, Example
from .tokenize import IGNORE, Encoded

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
    error: refuse the first one, naming its row. Nothing is left out without a count."""
    kept, cut, emptied = [], 0, 0
    for i, (example, seq) in enumerate(zip(examples, seqs)):
        if seq.dropped and policy == "error":
            raise DataError(f"{where_of(example, i, source)}: {len(seq) + seq.dropped} tokens, more than "
                            f"train.max_length {max_length} (data_overflow: error; raise --max-length, or "
                            "data_overflow: truncate | drop)")
        if seq.dropped and policy == "drop":
            cut += 1
            continue
        if all(label == IGNORE for label in seq.labels):
            if policy == "error":
                raise DataError(f"{where_of(example, i, source)}: no target token is left after cutting to "
                                f"train.max_length {max_length}")
            emptied += 1
            continue
        cut += bool(seq.dropped)
        kept.append(i)
    lines = []
    if cut and policy == "drop":
        lines.append(f"data: {cut} of {len(seqs)} training examples are longer than max_length {max_length} tokens "
                     "and were dropped (data_overflow: drop)")
    if emptied:
        lines.append(f"data: {emptied} of {len(seqs)} training examples have no target token within max_length "
                     f"{max_length} tokens and were dropped")
    return kept, lines


def drop_without_assistant(examples: Sequence[Example], policy: str, train_on: str,
                           source: str) -> tuple[list[Example], int]:
    """Conversations with no assistant turn train nothing (unless train_on: all): skipped with a count,
    or refused under data_overflow: error."""
    if train_on == "all":
        return list(examples), 0
    kept = []
    for i, e in enumerate(examples):
        if isinstance(e, Conversation) and not any(role == "assistant" for role, _ in e.messages):
            if policy == "error":
                raise DataError(f"{where_of(e, i, source)}: the conversation has no assistant turn, so nothing in it "
                                "is trained on (data_overflow: error refuses it; truncate or drop skip it)")
            continue
        kept.append(e)
    return kept, len(examples) - len(kept)


def load_for_run(cfg, evaluation: bool = False, log: Callable[[str], None] | None = None) -> list[Example]:
    """A RunConfig's `data` (or `eval_data`) read as its data_* keys say: split, column mapping,
    conversations without an assistant turn skipped with a count (refused under data_overflow: error)."""
    from .sources import load_data, parse_columns
    spec = cfg.eval_data if evaluation else cfg.data
    split = (cfg.eval_split or cfg.data_split) if evaluation else cfg.data_split
    examples = load_data(spec, split, parse_columns(cfg.data_columns))
    kept, skipped = drop_without_assistant(examples, cfg.data_overflow, cfg.data_train_on, str(spec))
    if skipped and log:
        log(f"data: {skipped} of {len(examples)} conversations in {spec} have no assistant turn and were skipped")
    if not kept:
        raise DataError(f"{spec}: no row has anything to train on")
    return kept

"""The user's own data: one JSON object a line.

Row shapes: `{"prompt": ..., "completion": ...}` (trained on the completion),
`{"input": ..., "choices": [...], "answer": index or choice text}` (multiple choice),
`{"text": ...}` (plain text, trained on all of it), and conversations: `{"messages": [...]}` or
ShareGPT's `{"conversations": [...]}` (`efftune.data.chat`). Other file formats and Hugging Face
datasets: `efftune.data.sources`, which hands each row to `parse_row`.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import DataError
from .chat import is_conversation_row, parse_conversation
from .examples import Completion, Example, MultipleChoice


def parse_row(obj, where: str) -> Example:
    """One row (a dict) as an Example; a bad row raises DataError naming `where` and the field."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, found {type(obj).__name__}")
    if is_conversation_row(obj):
        return parse_conversation(obj, where)
    if "choices" in obj or "answer" in obj:
        for key in ("input", "choices", "answer"):
            if key not in obj:
                raise DataError(f"{where}: multiple-choice row is missing field {key!r}")
        choices = obj["choices"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{where}: field 'choices' must be a list of at least two strings")
        if "" in choices:  # an empty continuation has log-likelihood 0 and would win every comparison
            raise DataError(f"{where}: field 'choices' holds an empty string (choice {choices.index('')})")
        answer = obj["answer"]
        if isinstance(answer, str):
            if answer not in choices:
                raise DataError(f"{where}: field 'answer' {answer!r} is not one of the choices")
            answer = choices.index(answer)
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise DataError(f"{where}: field 'answer' must be a choice or an index below {len(choices)}")
        if not isinstance(obj["input"], str):
            raise DataError(f"{where}: field 'input' must be a string")
        return MultipleChoice(obj["input"], tuple(choices), answer)
    if set(obj) == {"text"}:
        if not isinstance(obj["text"], str):
            raise DataError(f"{where}: field 'text' must be a string")
        if not obj["text"]:
            raise DataError(f"{where}: field 'text' is empty: there is nothing to train on")
        return Completion("", obj["text"])
    for key in ("prompt", "completion"):
        if key not in obj:
            raise DataError(f"{where}: row is missing field {key!r} (rows need prompt+completion "
                            "or input+choices+answer)")
        if not isinstance(obj[key], str):
            raise DataError(f"{where}: field {key!r} must be a string")
    if not obj["completion"]:
        raise DataError(f"{where}: field 'completion' is empty: the loss covers only the completion, so the "
                        "row would train nothing")
    return Completion(obj["prompt"], obj["completion"])


def rename_columns(obj: dict, columns: dict[str, str], where: str) -> dict:
    """The row with each mapped field read from its column ({"prompt": "question"}: "question"
    becomes "prompt"); a mapped column the row lacks is named."""
    out = {k: v for k, v in obj.items() if k not in columns.values()}
    for field, column in columns.items():
        if column not in obj:
            raise DataError(f"{where}: no column {column!r} (mapped to {field!r}); the row has "
                            f"{', '.join(map(repr, obj)) or 'no columns'}")
        out[field] = obj[column]
    return out


def _decode(raw: bytes, where: str, offset: int, first: bool) -> str:
    """One line's bytes as text; a byte that is not UTF-8 is named with its offset in the file."""
    skip = 3 if first and raw.startswith(b"\xef\xbb\xbf") else 0  # a UTF-8 byte-order mark, as some editors write
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        at = skip + exc.start
        raise DataError(f"{where}: byte 0x{raw[at]:02x} at offset {offset + at} of the file (byte {at + 1} of the "
                        "line) is not UTF-8; save the file as UTF-8") from None


def load_jsonl(path: str | Path, columns: dict[str, str] | None = None) -> list[Example]:
    """Every row of a JSONL file as an Example; the first bad row raises DataError naming file:line.
    `columns` maps a row field to the key it is read from ({"prompt": "question"})."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a directory; pass a JSONL file (one JSON object a line)")
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    examples = []
    offset = 0
    # bytes, not text: a decoding error must name the line, which text mode cannot
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            line = _decode(raw, where, offset, lineno == 1)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            except RecursionError:
                raise DataError(f"{where}: JSON nested too deeply") from None
            if columns and isinstance(obj, dict):
                obj = rename_columns(obj, columns, where)
            examples.append(parse_row(obj, where))
    if not examples:
        raise DataError(f"data file {path} holds no rows")
    return examples

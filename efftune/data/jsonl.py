"""The user's own data: one JSON object a line.

Row shapes: `{"prompt": ..., "completion": ...}` (trained on the completion),
`{"input": ..., "choices": [...], "answer": index or choice text}` (multiple choice), and
`{"text": ...}` (plain text, trained on all of it).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import DataError
from .examples import Completion, Example, MultipleChoice


def _row(obj, where: str) -> Example:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, found {type(obj).__name__}")
    if "choices" in obj or "answer" in obj:
        for key in ("input", "choices", "answer"):
            if key not in obj:
                raise DataError(f"{where}: multiple-choice row is missing field {key!r}")
        choices = obj["choices"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{where}: field 'choices' must be a list of at least two strings")
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
        return Completion("", obj["text"])
    for key in ("prompt", "completion"):
        if key not in obj:
            raise DataError(f"{where}: row is missing field {key!r} (rows need prompt+completion "
                            "or input+choices+answer)")
        if not isinstance(obj[key], str):
            raise DataError(f"{where}: field {key!r} must be a string")
    return Completion(obj["prompt"], obj["completion"])


def load_jsonl(path: str | Path) -> list[Example]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data: file {path} does not exist")
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
            examples.append(_row(obj, where))
    if not examples:
        raise DataError(f"data: {path} holds no rows")
    return examples

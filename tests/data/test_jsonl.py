import json

import pytest

from efftune.data import Completion, MultipleChoice, load_jsonl
from efftune.errors import DataError


def write(tmp_path, rows):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return p


def test_both_row_shapes(tmp_path):
    p = write(tmp_path, [{"prompt": "2+2=", "completion": "4"},
                         {"input": "sky?", "choices": ["red", "blue"], "answer": "blue"},
                         {"input": "x", "choices": ["a", "b", "c"], "answer": 2}, "", {"text": "hello"}])
    rows = load_jsonl(p)
    assert rows == [Completion("2+2=", "4"), MultipleChoice("sky?", ("red", "blue"), 1),
                    MultipleChoice("x", ("a", "b", "c"), 2), Completion("", "hello")]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "x"}, r"d.jsonl:2: row is missing field 'completion'"),
    ({"input": "x", "choices": ["a", "b"]}, r"d.jsonl:2: multiple-choice row is missing field 'answer'"),
    ({"input": "x", "choices": ["a", "b"], "answer": "c"}, r"d.jsonl:2: field 'answer' 'c' is not one of"),
    ({"input": "x", "choices": ["a", "b"], "answer": 5}, r"d.jsonl:2: field 'answer' must be"),
    ({"input": "x", "choices": "ab", "answer": 0}, r"d.jsonl:2: field 'choices' must be a list"),
    ("{not json", r"d.jsonl:2: not valid JSON"),
    ([1, 2], r"d.jsonl:2: expected a JSON object"),
])
def test_bad_rows_name_file_and_line(tmp_path, row, message):
    p = write(tmp_path, [{"prompt": "ok", "completion": "ok"}, row])
    with pytest.raises(DataError, match=message):
        load_jsonl(p)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_jsonl(tmp_path / "none.jsonl")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="holds no rows"):
        load_jsonl(tmp_path / "e.jsonl")


def test_a_byte_that_is_not_utf8_is_named_by_line_and_offset(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: byte 0xe9 at offset 50 of the file \(byte 16 of the line\) "
                                        r"is not UTF-8"):
        load_jsonl(p)


def test_a_byte_order_mark_is_read_and_a_directory_is_named(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "completion": "b"}\n')
    assert load_jsonl(p) == [Completion("a", "b")]
    with pytest.raises(DataError, match="is a directory; pass a JSONL file"):
        load_jsonl(tmp_path)


@pytest.mark.parametrize("row, message", [
    ({"prompt": "x", "completion": ""}, "field 'completion' is empty"),
    ({"text": ""}, "field 'text' is empty"),
    ({"input": "x", "choices": ["a", ""], "answer": 0}, "field 'choices' holds an empty string \\(choice 1\\)"),
    ("[" * 100_000, "JSON nested too deeply"),
])
def test_rows_that_would_train_or_score_nothing(tmp_path, row, message):
    p = write(tmp_path, [row])
    with pytest.raises(DataError, match=f"d.jsonl:1: {message}"):
        load_jsonl(p)

"""--data's sources: JSONL, JSON, Parquet, CSV and save_to_disk directories give the same examples;
column mapping; the errors name the file, the row and the field."""
import csv
import json
import os
import subprocess
import sys

import pytest

from efftune.data.examples import Completion, Conversation, MultipleChoice
from efftune.data.sources import load_data, parse_columns
from efftune.errors import ConfigError, DataError

datasets = pytest.importorskip("datasets")

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is the sky blue?"},
        {"role": "assistant", "content": "yes"}]
ROWS = [{"question": "Translate to French: cat", "answer": "chat"},
        {"question": "Translate to French: dog", "answer": "chien"},
        {"question": "Translate to French: bird", "answer": "oiseau"}]
EXPECTED = [Completion("Translate to French: cat", "chat"), Completion("Translate to French: dog", "chien"),
            Completion("Translate to French: bird", "oiseau")]
MAPPING = {"prompt": "question", "completion": "answer"}


def write_all(tmp_path, rows) -> dict:
    """The rows in every format --data reads."""
    paths = {"jsonl": tmp_path / "d.jsonl", "json": tmp_path / "d.json", "parquet": tmp_path / "d.parquet",
             "csv": tmp_path / "d.csv", "saved": tmp_path / "saved", "saved_dict": tmp_path / "saved_dict"}
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["json"].write_text(json.dumps(rows))
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(paths["parquet"]))
    with open(paths["csv"], "w", newline="") as f:  # lists as JSON text, as people write them into CSV
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: v if isinstance(v, str) else json.dumps(v) for k, v in r.items()} for r in rows)
    ds.save_to_disk(str(paths["saved"]))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(paths["saved_dict"]))
    return paths


def test_every_format_gives_the_same_examples_with_column_mapping(tmp_path):
    for kind, path in write_all(tmp_path, ROWS).items():
        assert load_data(path, columns=MAPPING) == EXPECTED, kind
    assert load_data(tmp_path / "saved_dict", split="test", columns=MAPPING) == EXPECTED[:1]


def test_conversations_and_multiple_choice_from_parquet_and_csv(tmp_path):
    rows = [{"messages": CHAT}, {"messages": CHAT[1:]}]
    expected = [Conversation(tuple((m["role"], m["content"]) for m in r["messages"])) for r in rows]
    for kind, path in write_all(tmp_path, rows).items():
        assert load_data(path) == expected, kind
    mc = [{"input": "Sky?", "choices": ["blue", "red"], "answer": 0}, {"input": "Grass?", "choices": ["blue", "green"],
                                                                        "answer": 1}]
    for kind, path in write_all(tmp_path, mc).items():
        assert load_data(path) == [MultipleChoice("Sky?", ("blue", "red"), 0),
                                   MultipleChoice("Grass?", ("blue", "green"), 1)], kind


def test_a_mapped_column_that_is_missing_is_named_with_the_columns_that_exist(tmp_path):
    paths = write_all(tmp_path, ROWS)
    with pytest.raises(DataError, match=r"d.parquet: no column 'query' \(mapped to 'prompt'.*'question', 'answer'"):
        load_data(paths["parquet"], columns={"prompt": "query", "completion": "answer"})
    with pytest.raises(DataError, match=r"d.jsonl:1: no column 'query' \(mapped to 'prompt'\)"):
        load_data(paths["jsonl"], columns={"prompt": "query", "completion": "answer"})
    with pytest.raises(DataError, match=r"d.parquet: its columns \('question', 'answer'\) hold none of the row shapes.*--data-columns"):
        load_data(paths["parquet"])


def test_bad_rows_name_the_file_row_and_field(tmp_path):
    bad = [{"messages": CHAT}, {"messages": [{"role": "robot", "content": "x"}]}]
    paths = write_all(tmp_path, bad)
    with pytest.raises(DataError, match=r"d.parquet row 1: messages\[0\]\.role: unknown role 'robot'"):
        load_data(paths["parquet"])
    with pytest.raises(DataError, match=r"d.json row 1: messages\[0\]\.role"):
        load_data(paths["json"])
    with pytest.raises(DataError, match=r"d.jsonl:2: messages\[0\]\.role"):
        load_data(paths["jsonl"])
    with pytest.raises(DataError, match=r"saved_dict has no split 'dev' \(it has 'train', 'test'\)"):
        load_data(paths["saved_dict"], split="dev")


@pytest.mark.parametrize("entries, message", [
    (["prompt=q", "completion=q"], r"column 'q' is named twice"),
    (["prompt=q", "prompt=r"], r"field 'prompt' is mapped twice"),
    (["question"], r"'question' is not FIELD=COLUMN"),
    (["promt=q"], r"unknown field 'promt'"),
])
def test_bad_column_mappings(entries, message):
    with pytest.raises(ConfigError, match=message):
        parse_columns(entries)


def test_missing_files_and_directories_that_are_not_datasets(tmp_path):
    with pytest.raises(DataError, match=r"data file .*nope.parquet does not exist"):
        load_data(tmp_path / "nope.parquet")
    with pytest.raises(DataError, match=r"is a directory but not one written by datasets.save_to_disk"):
        load_data(tmp_path)


def test_without_datasets_jsonl_works_and_parquet_names_the_extra(tmp_path, monkeypatch):
    paths = write_all(tmp_path, ROWS)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now fails
    assert load_data(paths["jsonl"], columns=MAPPING) == EXPECTED
    with pytest.raises(DataError, match=r"needs the 'datasets' library.*efftune\[data\]"):
        load_data(paths["parquet"], columns=MAPPING)


def test_a_hub_id_missing_from_the_offline_cache_is_one_clear_line(tmp_path):
    # a process of its own: datasets reads HF_HUB_OFFLINE when imported
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": os.getcwd()}
    code = "from efftune.data.sources import load_data; load_data('someone/absent-dataset')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert ("DataError: dataset someone/absent-dataset is not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 "
            "forbids downloading it") in proc.stderr
    assert "HF_HUB_OFFLINE is set: reading dataset someone/absent-dataset from the local cache" in proc.stderr


def test_every_format_is_parsed_once_by_the_data_cache(tmp_path, monkeypatch):
    """read_source (what a run reads --data with) keeps each local format's examples: the second read
    of a file or a saved dataset parses nothing and gives the same examples; another split or a
    changed file of a saved dataset is another entry."""
    from efftune.data import stored
    monkeypatch.setenv("EFFTUNE_DATA_CACHE", str(tmp_path / "cache"))
    paths = write_all(tmp_path, ROWS)
    for kind, path in paths.items():
        assert list(stored.read_source(path, columns=MAPPING)) == EXPECTED, kind
    assert list(stored.read_source(paths["saved_dict"], split="test", columns=MAPPING)) == EXPECTED[:1]
    assert len(list((tmp_path / "cache" / "examples").iterdir())) == len(paths) + 1
    with monkeypatch.context() as m:
        m.setattr(stored, "load_data", lambda *a, **k: pytest.fail("parsed again"))
        for kind, path in paths.items():
            assert list(stored.read_source(path, columns=MAPPING)) == EXPECTED, kind
    datasets.Dataset.from_list(ROWS[:2]).save_to_disk(str(paths["saved"]))  # the directory's files change
    assert list(stored.read_source(paths["saved"], columns=MAPPING)) == EXPECTED[:2]

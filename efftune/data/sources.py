"""Where `--data` reads from: a JSONL, JSON, Parquet or CSV file, a directory written by
`datasets.save_to_disk`, or a Hugging Face dataset id.

JSONL and JSON are read here with the standard library (the core needs nothing more); Parquet,
CSV, saved datasets and hub ids go through the `datasets` library, an optional extra
(`pip install "efftune[data]"`). Every row, wherever it comes from, becomes an Example through
`jsonl.parse_row`, so the row shapes and their errors are the same for all formats; a bad row is
named by file:line (JSONL) or by its row index.

`columns` maps efftune's field names to the source's column names (`--data-columns
prompt=question,completion=answer`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Sequence

from ..errors import ConfigError, DataError
from ..progress import note
from .examples import Example
from .jsonl import load_jsonl, parse_row, rename_columns

FIELDS = ("prompt", "completion", "input", "choices", "answer", "text", "messages", "conversations")
SHAPES = ({"messages"}, {"conversations"}, {"prompt", "completion"}, {"input", "choices", "answer"}, {"text"})
DATASETS_SUFFIXES = {".parquet": "parquet", ".csv": "csv"}
EXTRA = 'pip install "efftune[data]"'
_JSON_CELLS = ("choices", "messages", "conversations")  # CSV cells of these fields may hold JSON text


def parse_columns(entries: Sequence[str] | None) -> dict[str, str]:
    """["prompt=question", ...] -> {"prompt": "question"}; a field or a column named twice, an
    unknown field or an entry without `=` is a ConfigError naming the entry."""
    mapping: dict[str, str] = {}
    for entry in entries or []:
        field, sep, column = (part.strip() for part in entry.partition("="))
        if not sep or not field or not column:
            raise ConfigError(f"data.columns: {entry!r} is not FIELD=COLUMN (e.g. prompt=question)")
        if field not in FIELDS:
            raise ConfigError(f"data.columns: {entry!r}: unknown field {field!r} (fields: {', '.join(FIELDS)})")
        if field in mapping:
            raise ConfigError(f"data.columns: field {field!r} is mapped twice ({field}={mapping[field]}, {entry})")
        if column in mapping.values():
            other = next(f for f, c in mapping.items() if c == column)
            raise ConfigError(f"data.columns: column {column!r} is named twice ({other}={column}, {entry})")
        mapping[field] = column
    return mapping


def load_data(spec: str | Path, split: str | None = None, columns: dict[str, str] | None = None) -> list[Example]:
    """Every row of `spec` (file, saved dataset directory or hub id) as an Example. `split` picks a
    split of a hub dataset or of a saved DatasetDict (default: train)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return _from_dataset(_load_from_disk(path, split), str(path), columns)
    if path.is_file():
        kind = DATASETS_SUFFIXES.get(path.suffix.lower())
        if kind:
            return _from_dataset(_load_file(kind, path), str(path), columns)
        if path.suffix.lower() == ".json":
            return _load_json(path, columns)
        return load_jsonl(path, columns)  # .jsonl, and any other name (the format efftune always took)
    if _looks_like_a_path(str(spec)):
        raise DataError(f"data file {spec} does not exist")
    return _from_dataset(_load_hub(str(spec), split), str(spec), columns)


def _looks_like_a_path(spec: str) -> bool:
    """A name that is meant as a file, never looked up on the hub: it starts like a path or ends
    in a data file's suffix. A hub id is `name` or `owner/name`."""
    suffix = Path(spec).suffix.lower()
    return (spec.startswith(("./", "../", "/", "~")) or spec.count("/") > 1
            or suffix in (".jsonl", ".json", ".txt", *DATASETS_SUFFIXES))


# ---- JSON ------------------------------------------------------------------------------------------------

def _load_json(path: Path, columns: dict[str, str] | None) -> list[Example]:
    """A JSON array of row objects (or {"data"|"rows": [...]}); a JSONL file named .json is read as one."""
    text = path.read_bytes()
    try:
        obj = json.loads(text)
    except UnicodeDecodeError:
        return load_jsonl(path, columns)  # names the line and byte
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # one object a line: JSON lines under a .json name
            return load_jsonl(path, columns)
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply") from None
    if isinstance(obj, dict):  # one row, or the rows under a key
        key = next((k for k in ("data", "rows", "train") if isinstance(obj.get(k), list)), None)
        if key is None and not any(k in obj for k in (*FIELDS, *(columns or {}).values())):
            raise DataError(f"{path}: expected a JSON array of rows (or an object with a 'data' list), found an "
                            f"object with keys {', '.join(map(repr, obj)) or 'none'}")
        obj = obj[key] if key else [obj]
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON array of rows, found {type(obj).__name__}")
    if not obj:
        raise DataError(f"data file {path} holds no rows")
    examples = []
    for i, row in enumerate(obj):
        where = f"{path} row {i}"
        if columns and isinstance(row, dict):
            row = rename_columns(row, columns, where)
        examples.append(parse_row(row, where))
    return examples


# ---- the datasets library --------------------------------------------------------------------------------

def _datasets(what: str):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{what} needs the 'datasets' library, an optional extra: {EXTRA}") from None
    return datasets


def _load_file(kind: str, path: Path):
    datasets = _datasets(f"{path} ({kind})")
    try:
        return datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as exc:  # pyarrow's and pandas' parse errors, of many classes
        raise DataError(f"{path}: could not read it as {kind}: {' '.join(str(exc).split())[:300]}") from None


def _load_from_disk(path: Path, split: str | None):
    if not any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise DataError(f"{path} is a directory but not one written by datasets.save_to_disk; pass a data file "
                        "(.jsonl, .json, .parquet, .csv) or such a directory")
    datasets = _datasets(f"{path} (a saved dataset)")
    try:
        data = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"{path}: could not load the saved dataset: {' '.join(str(exc).split())[:300]}") from None
    return _pick_split(data, split, str(path))


def _load_hub(name: str, split: str | None):
    datasets = _datasets(f"--data {name} (a Hugging Face dataset id)")
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or \
        os.environ.get("HF_DATASETS_OFFLINE", "") not in ("", "0")
    if offline:
        note(f"data: HF_HUB_OFFLINE is set: reading dataset {name} from the local cache")
    try:
        data = datasets.load_dataset(name)
    except Exception as exc:
        if offline:
            raise DataError(f"dataset {name} is not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids "
                            "downloading it (unset HF_HUB_OFFLINE once to fetch it, or pass a local file)") from None
        raise DataError(f"dataset {name}: neither a local file nor a dataset that could be loaded from the "
                        f"Hugging Face hub ({' '.join(str(exc).split())[:300]})") from None
    return _pick_split(data, split, name)


def _pick_split(data, split: str | None, source: str):
    if not hasattr(data, "keys"):  # one Dataset: there are no splits to pick from
        if split not in (None, "train"):
            raise DataError(f"{source} holds one split, not a {split!r} split (leave --data-split out)")
        return data
    split = split or "train"
    if split not in data:
        raise DataError(f"{source} has no split {split!r} (it has {', '.join(map(repr, data))}); pass --data-split")
    return data[split]


def _from_dataset(ds, source: str, columns: dict[str, str] | None) -> list[Example]:
    names = list(ds.column_names)
    for field, column in (columns or {}).items():
        if column not in names:
            raise DataError(f"{source}: no column {column!r} (mapped to {field!r} by --data-columns); its columns "
                            f"are {', '.join(map(repr, names))}")
    columns = columns or {}
    # column -> field: the columns named like a field, unless that field is read from another column
    mapped = {c: c for c in names if c in FIELDS and c not in columns}
    mapped.update({c: f for f, c in columns.items()})
    if not any(shape <= set(mapped.values()) for shape in SHAPES):
        raise DataError(f"{source}: its columns ({', '.join(map(repr, names))}) hold none of the row shapes efftune "
                        f"reads ({'; '.join('+'.join(sorted(s)) for s in SHAPES)}); map them with --data-columns, "
                        "e.g. prompt=question,completion=answer")
    examples = [parse_row(row, f"{source} row {i}") for i, row in enumerate(_rows(ds, mapped))]
    if not examples:
        raise DataError(f"{source} holds no rows")
    return examples


def _rows(ds, mapped: dict[str, str]) -> Iterator[dict]:
    """The rows as dicts of efftune's field names; a column that is None in a row is left out (a
    dataset holding rows of several shapes has every column in every row)."""
    ds = ds.select_columns(list(mapped))
    for batch in ds.iter(batch_size=4096):  # column batches: far faster than row by row
        n = len(next(iter(batch.values())))
        for i in range(n):
            row = {}
            for column, field in mapped.items():
                value = batch[column][i]
                if value is None:
                    continue
                if field in _JSON_CELLS and isinstance(value, str) and value.lstrip().startswith("["):
                    try:
                        value = json.loads(value)
                    except json.JSONDecodeError:
                        pass  # parse_row names the field and its type
                row[field] = value
            yield row

"""BIG-bench tasks, read from the `task.json` files in the `bigbench==1.0.0` sdist.

The sdist (350 MB) is fetched once with `pip download --no-deps` and never installed. An index of
all tasks (kind, size) is built in one pass over it; a task's files are extracted only when asked
for, so the cache holds a few MB instead of the 1.7 GB the whole benchmark unpacks to.
"""
from __future__ import annotations

import difflib
import json
import os
import tarfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..cache import cache_dir, pip_download
from ..errors import DataError, EfftuneError
from ..progress import QUIET_SECONDS, progress_bar
from .examples import Completion, Example, MultipleChoice

SDIST = "bigbench==1.0.0"
_TASK_ROOT = "bigbench/benchmark_tasks/"


@dataclass(frozen=True)
class TaskInfo:
    name: str
    kind: str  # "multiple_choice", "generative" or "mixed"
    examples: int
    description: str


def sdist_path() -> Path:
    """The bigbench==1.0.0 sdist in the cache, fetched there first if it is not."""
    root = cache_dir("bigbench")
    found = sorted(root.glob("bigbench-1.0.0*.tar.gz"))
    if found:
        return found[0]
    try:
        return pip_download(SDIST, root)
    except EfftuneError as e:
        # seen on 2026-12-05: pypi.org here lists only a placeholder 0.0.1 of `bigbench`; a copy of the
        # sdist put into the cache is then the way to the default data
        raise DataError(f"{e}; the BIG-bench tasks come from that sdist: put a copy of bigbench-1.0.0.tar.gz "
                        f"into {root}, or train on your own data with --data FILE") from None


class _CountingReader:
    """A binary file whose reads advance a progress bar (tarfile reads the sdist through gzip,
    front to back, so the compressed bytes read measure how far a pass has come)."""

    def __init__(self, raw, bar):
        self.raw, self.bar = raw, bar

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.bar.update(len(data))
        return data

    def __getattr__(self, name):  # seek, tell, close, ... as the file has them
        return getattr(self.raw, name)


@contextmanager
def _open_sdist(desc: str, *, leave: bool, delay: float = 0.0) -> Iterator[tarfile.TarFile]:
    """The sdist as a tar archive, read with a progress bar over its compressed size."""
    path = sdist_path()
    with open(path, "rb") as raw, progress_bar(path.stat().st_size, desc, unit="B", unit_scale=True,
                                               unit_divisor=1024, leave=leave, delay=delay) as bar, \
            tarfile.open(fileobj=_CountingReader(raw, bar), mode="r:gz") as tf:
        yield tf


def _task_name(member_name: str) -> str | None:
    """`bigbench-1.0.0/bigbench/benchmark_tasks/navigate/task.json` -> `navigate`."""
    if not member_name.endswith("/task.json") or _TASK_ROOT not in member_name:
        return None
    return member_name.split(_TASK_ROOT, 1)[1][: -len("/task.json")]


def _kind(examples: list[dict]) -> str:
    mc = sum("target_scores" in e for e in examples)
    gen = sum("target" in e for e in examples)
    if mc == len(examples) and mc:
        return "multiple_choice"
    if gen == len(examples) and gen:
        return "generative"
    return "mixed"


def task_index() -> dict[str, TaskInfo]:
    """Every task and subtask in BIG-bench with its kind and number of examples (built once)."""
    index_file = cache_dir("bigbench") / "index.json"
    if not index_file.exists():
        rows = {}
        with _open_sdist("indexing BIG-bench tasks (once)", leave=True) as tf:
            for member in tf:
                name = _task_name(member.name)
                if name is None:
                    continue
                try:
                    spec = json.load(tf.extractfile(member))
                except (ValueError, UnicodeDecodeError):
                    continue
                examples = spec.get("examples", [])
                if examples:
                    rows[name] = {"kind": _kind(examples), "examples": len(examples),
                                  "description": str(spec.get("description", ""))[:200]}
        tmp = index_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=0, sort_keys=True))
        os.replace(tmp, index_file)
    rows = json.loads(index_file.read_text())
    return {name: TaskInfo(name=name, **row) for name, row in rows.items()}


def _resolve(name: str, index: dict[str, TaskInfo]) -> list[str]:
    """A task name -> the index entries that hold its examples (the task itself or its subtasks)."""
    if name in index:
        return [name]
    subtasks = sorted(n for n in index if n.startswith(name + "/"))
    if subtasks:
        return subtasks
    tops = [n for n in index if "/" not in n]
    # names holding the given one (or held in it), then near spellings (a typo: "intent_recogniton")
    close = sorted(n for n in tops if name in n or n in name)[:8] or difflib.get_close_matches(name, tops, n=5)
    hint = f" (similar: {', '.join(close)})" if close else " (run `efftune tasks` for the list)"
    raise DataError(f"task: no BIG-bench task named {name!r}{hint}")


def extract_task_files(entries: list[str]) -> dict[str, Path]:
    """Extract the task.json of each entry into the cache (one pass over the sdist for all missing)."""
    root = cache_dir("bigbench", "tasks")
    paths = {e: root / e / "task.json" for e in entries}
    missing = {e for e, p in paths.items() if not p.exists()}
    if missing:
        # a pass that may read up to the whole sdist (~10 s); shown only when it takes a while
        with _open_sdist(f"extracting {', '.join(sorted(missing))}", leave=False, delay=QUIET_SECONDS) as tf:
            for member in tf:
                name = _task_name(member.name)
                if name in missing:
                    target = paths[name]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    tmp = target.with_suffix(".tmp")
                    tmp.write_bytes(tf.extractfile(member).read())
                    os.replace(tmp, target)
                    missing.discard(name)
                    if not missing:
                        break
    return paths


def _as_bool(value) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() != "false"


def _examples_from_spec(spec: dict, source: str, task: str) -> list[Example]:
    """Turn BIG-bench's example dicts into prompts formatted as the benchmark does, each labelled `task`."""
    prefix = spec.get("task_prefix", "") or ""
    in_prefix = spec.get("example_input_prefix", "\nQ: ")
    out_prefix = spec.get("example_output_prefix", "\nA: ")
    choice_prefix = spec.get("choice_prefix", "\n  choice: ")
    append_choices = _as_bool(spec.get("append_choices_to_input", True))
    examples: list[Example] = []
    for i, ex in enumerate(spec.get("examples", [])):
        if "input" not in ex:
            raise DataError(f"{source}: example {i} has no 'input'")
        if "target_scores" in ex:
            choices = [str(c) for c in ex["target_scores"]]
            scores = [float(s) for s in ex["target_scores"].values()]
            body = ex["input"]
            if append_choices:
                body += "".join(choice_prefix + c for c in choices)
            prompt = (prefix + in_prefix + body + out_prefix).lstrip()
            best = max(scores)
            correct = tuple(j for j, s in enumerate(scores) if s == best)
            examples.append(MultipleChoice(prompt, tuple(choices), correct[0], correct, task=task))
        else:
            target = ex.get("target")
            if isinstance(target, list):
                target = target[0] if target else None
            if target is None:
                raise DataError(f"{source}: example {i} has neither 'target_scores' nor 'target'")
            prompt = (prefix + in_prefix + ex["input"] + out_prefix).lstrip()
            examples.append(Completion(prompt, str(target), task=task))
    return examples


def load_task(name: str) -> list[Example]:
    """All examples of a BIG-bench task (a task with subtasks yields them all, in name order), each with
    `task` = `name` as given (a subtask's examples are the parent's when the parent is named)."""
    entries = _resolve(name, task_index())
    examples: list[Example] = []
    for entry, path in extract_task_files(entries).items():
        examples.extend(_examples_from_spec(json.loads(path.read_text()), f"bigbench:{entry}", name))
    return examples

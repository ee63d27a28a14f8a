"""The examples a run trains and evaluates on: the user's JSONL, or BIG-bench tasks split into a
training pool and a fixed held-out set."""
from __future__ import annotations

from typing import Sequence

from ..errors import ConfigError
from .bigbench import load_task
from .examples import Example, split_examples
from .jsonl import load_jsonl


def load_examples(*, tasks: Sequence[str] = (), data: str | None = None, eval_data: str | None = None,
                  eval_size: int, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train, eval) examples: `data` (a JSONL file) split at random by `seed` unless `eval_data`
    is given, or a deterministic split of each BIG-bench task in `tasks` (always seed 0, so every
    run and every command holds out the same examples)."""
    if data:
        examples = load_jsonl(data)
        if eval_data:
            return examples, load_jsonl(eval_data)
        return split_examples(examples, eval_size, seed=seed, source=data)
    if not tasks:
        raise ConfigError("task: name at least one BIG-bench task, or pass data: FILE.jsonl")
    train_set, eval_set = [], []
    for name in tasks:
        # with several tasks, at most half of each is held out
        tr, ev = split_examples(load_task(name), eval_size, seed=0, source=f"task {name}",
                                strict=len(tasks) == 1)
        train_set += tr
        eval_set += ev
    if eval_data:
        eval_set = load_jsonl(eval_data)
    return train_set, eval_set

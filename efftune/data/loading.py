"""The examples a run trains and evaluates on: the user's data (`efftune.data.sources`: JSONL,
JSON, Parquet, CSV, saved or hub datasets), or BIG-bench tasks split into a training pool and a
fixed held-out set."""
from __future__ import annotations

from typing import Callable, Sequence

from ..errors import ConfigError
from .bigbench import load_task
from .examples import Example, split_examples
from .sources import load_data


def load_examples(*, tasks: Sequence[str] = (), data: str | None = None, eval_data: str | None = None,
                  eval_size: int, seed: int = 0, read: Callable[[str, bool], Sequence[Example]] | None = None
                  ) -> tuple[Sequence[Example], Sequence[Example]]:
    """(train, eval) examples: `data` (a file, saved dataset or hub id) split at random by `seed`
    unless `eval_data` is given, or a deterministic split of each BIG-bench task in `tasks` (always
    seed 0, so every run and every command holds out the same examples). `read(source, is_eval)`
    reads `data` / `eval_data` (default: `load_data` with no split or column mapping; a run passes
    one that applies its `data` section, `efftune.data.options.load_for_run`)."""
    read = read or (lambda source, _: load_data(source))
    if data:
        examples = read(data, False)
        if eval_data:
            return examples, read(eval_data, True)
        return split_examples(examples, eval_size, seed=seed, source=data)
    if not tasks:
        raise ConfigError("task: name at least one BIG-bench task, or pass your data (--data FILE, data.path)")
    train_set, eval_set = [], []
    for name in tasks:
        # with several tasks, at most half of each is held out
        tr, ev = split_examples(load_task(name), eval_size, seed=0, source=f"task {name}",
                                strict=len(tasks) == 1)
        train_set += tr
        eval_set += ev
    if eval_data:
        eval_set = read(eval_data, True)
    return train_set, eval_set

"""The two kinds of example every loader produces and every trainer/evaluator consumes."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence, Union


@dataclass(frozen=True)
class MultipleChoice:
    """A prompt, its candidate continuations, and which of them are right.

    `answer` is the index trained on; `correct` holds every index that counts as right
    (BIG-bench marks several choices with the top score in some tasks).
    """
    prompt: str
    choices: tuple[str, ...]
    answer: int
    correct: tuple[int, ...] = field(default=())

    def __post_init__(self):
        if not self.correct:
            object.__setattr__(self, "correct", (self.answer,))

    @property
    def completion(self) -> str:
        return self.choices[self.answer]


@dataclass(frozen=True)
class Completion:
    """A prompt and the text the model should continue it with (the loss covers only this)."""
    prompt: str
    completion: str


Example = Union[MultipleChoice, Completion]


def split_examples(examples: Sequence[Example], eval_size: int | float, seed: int = 0
                   ) -> tuple[list[Example], list[Example]]:
    """Deterministic train/eval split: shuffle with `seed`, the first `eval_size` go to eval.

    `eval_size` is a count, or a fraction when below 1. The split depends only on the order of
    `examples` and the seed, so the held-out set is the same across runs and machines.
    """
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = int(round(eval_size * len(order))) if 0 < eval_size < 1 else int(eval_size)
    n_eval = min(n_eval, len(order) // 2) if len(order) > 1 else 0
    eval_set = [examples[i] for i in order[:n_eval]]
    train_set = [examples[i] for i in order[n_eval:]]
    return train_set, eval_set

"""The kinds of example every loader produces and every trainer/evaluator consumes.

Each kind carries `task`: the BIG-bench task it was loaded from ("" for the user's data). It picks
the example's prefix where a run has one per task (prompt tuning with several prompts, `Formatter`);
like a conversation's `where`, it labels the example rather than being part of it, so it is left
out of equality and repr.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence, Union

from ..errors import DataError
from .entries import take


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
    task: str = field(default="", compare=False, repr=False)

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
    task: str = field(default="", compare=False, repr=False)


@dataclass(frozen=True)
class Conversation:
    """A chat: (role, content) turns, rendered with the model's chat template
    (`efftune.data.chat`); the loss covers the assistant turns. Roles: system, user, assistant, tool.
    `where` (file:line or file row i) names the row when its rendering fails; not part of equality."""
    messages: tuple[tuple[str, str], ...]
    where: str = field(default="", compare=False, repr=False)
    task: str = field(default="", compare=False, repr=False)

    def as_dicts(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]


Example = Union[MultipleChoice, Completion, Conversation]


DEFAULT_EVAL_SIZE = 200  # held out per task when no size is given (at most half the task)


def split_examples(examples: Sequence[Example], eval_size: int | float | None, seed: int = 0,
                   source: str = "the data", strict: bool = True) -> tuple[Sequence[Example], Sequence[Example]]:
    """Deterministic train/eval split: shuffle with `seed`, the first `eval_size` go to eval.

    `eval_size` is a count, a fraction when below 1, or None: DEFAULT_EVAL_SIZE. At most half of
    the examples are held out: asking for more is an error naming `source` (a task or file) when
    `strict`, and is cut to half otherwise (one size for several tasks of different sizes). The
    split depends only on the order of `examples` and the seed, so the held-out set is the same
    across runs and machines.
    """
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    half = len(order) // 2
    if eval_size is None:
        n_eval = min(DEFAULT_EVAL_SIZE, half)
    elif eval_size < 0:
        raise DataError(f"eval_size must be 0 or more, got {eval_size}")
    else:
        n_eval = int(round(eval_size * len(order))) if 0 < eval_size < 1 else int(eval_size)
        if n_eval > half and not strict:
            n_eval = half
        elif n_eval > half:
            raise DataError(f"eval_size {eval_size}: {source} has {len(order)} examples, so at most {half} "
                            "(half) can be held out")
    # lists stay lists; examples kept on disk (efftune.data.stored) give views, decoding nothing
    return take(examples, order[n_eval:]), take(examples, order[:n_eval])

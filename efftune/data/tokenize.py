"""Turn examples into token ids with the prompt masked out of the loss; group them into rows.

How a row's tokens attend to each other (packing, shared prefixes) is `layout.py`'s job.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence as Seq, overload

import numpy as np

from ..errors import ConfigError
from .chat import encode_conversation
from .examples import Completion, Conversation, Example, MultipleChoice

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    """One training sequence: `labels` is IGNORE on the prompt, the token id on the answer.
    `dropped`: tokens cut to fit `max_length` (0 for most), so a run can say how many were cut."""
    input_ids: list[int]
    labels: list[int]
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


class Formatter:
    """Turns prompt and continuation text into ids, the same way for training and scoring.

    A trailing space of the prompt moves to the front of the continuation, because BPE
    vocabularies hold " yes" as one token: "A: " + "yes" would otherwise be scored as
    an unusual split. With `chat_template`, the prompt becomes a user turn and the continuation
    the assistant's reply.

    `prefix_ids` (e.g. prompt tuning's virtual token ids) go at the very start of every prompt,
    before BOS and any chat template, as peft places soft prompts; `encode`, `encode_pair` and
    `encode_prompt` take a per-call `prefix_ids` too (mixed-task batches), [] for none. A mapping
    task -> ids instead (prompt tuning with one prompt per task) starts each example with its own
    task's ids (`Example.task`, `prefix_for`); `encode_pair` and `encode_prompt`, which see text
    rather than an example, then need the ids passed.

    A Conversation is always rendered with the tokenizer's chat template (`efftune.data.chat`);
    `train_on` says which of its tokens are targets (assistant | last_assistant | all).
    """

    def __init__(self, tokenizer, chat_template: bool = False, max_length: int = 512,
                 prefix_ids: Seq[int] | Mapping[str, Seq[int]] | None = None, train_on: str = "assistant"):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.train_on = train_on
        self.max_length = max_length
        per_task = isinstance(prefix_ids, Mapping)
        self.prefix_ids: list[int] = [] if per_task else list(prefix_ids or [])  # every prompt's
        self.task_prefixes: dict[str, list[int]] = \
            {task: list(ids) for task, ids in prefix_ids.items()} if per_task else {}  # or each task's
        self._bos = [tokenizer.bos_token_id] if self._adds_bos(tokenizer) else []
        if chat_template and not getattr(tokenizer, "chat_template", None):
            raise ConfigError("chat_template: this model's tokenizer has no chat template; drop --chat-template")

    @staticmethod
    def _adds_bos(tokenizer) -> bool:
        ids = tokenizer("a")["input_ids"]
        return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id

    def split(self, prompt: str, continuation: str) -> tuple[str, str]:
        if self.chat_template:
            messages = [{"role": "user", "content": prompt.strip()}]
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return text, continuation.lstrip()
        stripped = prompt.rstrip(" ")
        if stripped != prompt and not continuation.startswith((" ", "\n")):
            continuation = " " + continuation
        return stripped, continuation

    def prefix_for(self, example: Example) -> list[int]:
        """The ids `example`'s prompt starts with: the one prefix, or its task's where each task has
        its own (a task without one is a ConfigError naming it)."""
        if not self.task_prefixes:
            return self.prefix_ids
        if example.task not in self.task_prefixes:
            what = f"task {example.task!r}" if example.task else "an example without a task (the user's data)"
            raise ConfigError(f"no prompt for {what}: the prompts are for tasks {', '.join(self.task_prefixes)}")
        return self.task_prefixes[example.task]

    def _prefix(self, prefix_ids: list[int] | None) -> list[int]:
        if prefix_ids is not None:
            return list(prefix_ids)
        if self.task_prefixes:  # text alone names no task: guessing one would be the first task's, silently
            raise ValueError("this Formatter has a prefix per task: pass prefix_ids (Formatter.prefix_for(example))")
        return self.prefix_ids

    def encode_pair(self, prompt: str, continuation: str,
                    prefix_ids: list[int] | None = None) -> tuple[list[int], list[int]]:
        prompt_text, cont_text = self.split(prompt, continuation)
        tok = self.tokenizer
        if self.chat_template:
            prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
        else:
            prompt_ids = self._bos + tok(prompt_text, add_special_tokens=False)["input_ids"]
        cont_ids = tok(cont_text, add_special_tokens=False)["input_ids"]
        return self._prefix(prefix_ids) + prompt_ids, cont_ids

    def encode_prompt(self, prompt: str, prefix_ids: list[int] | None = None) -> list[int]:
        return self.encode_pair(prompt, "", prefix_ids)[0]

    def encode(self, example: Example, prefix_ids: list[int] | None = None) -> Encoded:
        """The training sequence of an example: prompt + answer (MC), prompt + completion + EOS, or a
        conversation with its assistant turns as targets. `prefix_ids` (default: `prefix_for(example)`)
        goes first."""
        prefix = self.prefix_for(example) if prefix_ids is None else list(prefix_ids)
        if len(prefix) >= self.max_length - 1:
            raise ConfigError(f"max_length {self.max_length} leaves no room after the {len(prefix)} prefix "
                              "tokens (prompt tuning's virtual tokens)")
        if isinstance(example, Conversation):
            ids, labels, dropped = encode_conversation(self.tokenizer, example, self.train_on, self.max_length,
                                                       prefix, example.where or "a conversation")
            return Encoded(ids, labels, dropped)
        if isinstance(example, MultipleChoice):
            prompt_ids, answer_ids = self.encode_pair(example.prompt, example.completion, prefix)
        elif isinstance(example, Completion):
            prompt_ids, answer_ids = self.encode_pair(example.prompt, example.completion, prefix)
            if self.tokenizer.eos_token_id is not None:
                answer_ids = answer_ids + [self.tokenizer.eos_token_id]
        else:
            raise TypeError(f"not an example: {example!r}")
        if not prompt_ids:  # plain text: the first token has nothing to be predicted from
            prompt_ids, answer_ids = answer_ids[:1], answer_ids[1:]
        full = len(prompt_ids) + len(answer_ids)
        answer_ids = answer_ids[: self.max_length - len(prefix) - 1]
        # keep the prefix and the end of a long prompt
        rest = prompt_ids[len(prefix):]
        prompt_ids = prefix + rest[max(0, len(rest) - (self.max_length - len(prefix) - len(answer_ids))):]
        ids = prompt_ids + answer_ids
        return Encoded(ids, [IGNORE] * len(prompt_ids) + answer_ids, dropped=full - len(ids))


class TokenArrays(Seq[Encoded]):
    """Encoded sequences held as flat numpy arrays (the token ids one after another, a target mask
    beside them, offsets), so a million of them are a few arrays rather than a million lists; the
    token cache maps them from disk (`efftune.data.token_cache`). Indexing builds one `Encoded`
    (what a batch asks for); `take` gives a view of some sequences, in a given order.

    `dropped` and `targets` (per sequence: tokens cut by max_length, target tokens) let a run count
    and filter without building any sequence."""

    ARRAYS = ("ids", "mask", "offsets", "dropped", "targets")

    def __init__(self, ids: np.ndarray, mask: np.ndarray, offsets: np.ndarray, dropped: np.ndarray,
                 targets: np.ndarray, index: np.ndarray | None = None):
        self.ids, self.mask, self.offsets, self._dropped, self._targets = ids, mask, offsets, dropped, targets
        self.index = index

    @classmethod
    def build(cls, seqs: Iterable[Encoded]) -> "TokenArrays":
        """Arrays of `seqs` (an iterable: each sequence is appended as it comes, and no list of them
        is kept, so tokenising a million conversations holds a few arrays, not a million lists)."""
        ids, mask, lengths, dropped, targets = array("i"), array("b"), array("q"), array("i"), array("i")
        for s in seqs:
            ids.extend(s.input_ids)
            on = [label != IGNORE for label in s.labels]
            mask.extend(on)
            lengths.append(len(s.input_ids))
            dropped.append(s.dropped)
            targets.append(sum(on))
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(np.frombuffer(lengths, dtype=np.int64), out=offsets[1:])
        return cls(np.frombuffer(ids, dtype=np.int32), np.frombuffer(mask, dtype=np.int8).astype(np.bool_), offsets,
                   np.frombuffer(dropped, dtype=np.int32), np.frombuffer(targets, dtype=np.int32))

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays of every sequence (not only this view's), by name: what the cache writes."""
        return dict(zip(self.ARRAYS, (self.ids, self.mask, self.offsets, self._dropped, self._targets)))

    def __len__(self) -> int:
        return len(self._dropped) if self.index is None else len(self.index)

    @overload
    def __getitem__(self, i: int) -> Encoded: ...
    @overload
    def __getitem__(self, i: slice) -> "TokenArrays": ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        n, i = len(self), int(i)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} of {n}")
        j = int(self.index[i]) if self.index is not None else i % n  # (i % n: a negative index counts back)
        start, end = self.offsets[j], self.offsets[j + 1]
        ids = np.asarray(self.ids[start:end])
        labels = np.where(self.mask[start:end], ids, IGNORE)
        return Encoded(ids.tolist(), labels.tolist(), int(self._dropped[j]))

    def take(self, indices: Seq[int]) -> "TokenArrays":
        indices = np.asarray(indices, dtype=np.int64)
        index = indices if self.index is None else self.index[indices]
        return TokenArrays(self.ids, self.mask, self.offsets, self._dropped, self._targets, index)

    def _per_sequence(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values if self.index is None else values[self.index])

    def lengths(self) -> np.ndarray:
        return self._per_sequence(np.diff(self.offsets))

    def dropped(self) -> np.ndarray:
        return self._per_sequence(self._dropped)

    def targets(self) -> np.ndarray:
        return self._per_sequence(self._targets)

    def __repr__(self) -> str:
        return f"TokenArrays({len(self)} sequences)"


def sequence_stats(sequences: Seq[Encoded]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lengths, tokens dropped, target tokens) of each sequence, as arrays: read from TokenArrays
    without building a sequence, counted for a list."""
    if isinstance(sequences, TokenArrays):
        return sequences.lengths(), sequences.dropped(), sequences.targets()
    return (np.array([len(s) for s in sequences], dtype=np.int64),
            np.array([s.dropped for s in sequences], dtype=np.int64),
            np.array([sum(1 for t in s.labels if t != IGNORE) for s in sequences], dtype=np.int64))


def truncation_note(sequences: Seq[Encoded], max_length: int, what: str = "training examples") -> str | None:
    """One line saying how many sequences were cut to `max_length` tokens (None when none were)."""
    dropped = sequence_stats(sequences)[1]
    cut = dropped[dropped > 0]
    if not len(cut):
        return None
    return (f"data: {len(cut)} of {len(sequences)} {what} are longer than max_length {max_length} tokens and were "
            f"cut ({int(cut.sum()):,} tokens dropped: a prompt loses its start, an answer its end; raise --max-length "
            "to keep them)")


def pack(lengths: Seq[int], row_length: int) -> list[list[int]]:
    """Group sequence indices into rows of at most `row_length` tokens (first fit, longest first)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(row_length - lengths[i])
    return rows

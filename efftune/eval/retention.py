"""Forgetting, measured: a fixed panel of BIG-bench tasks a run does not train on, scored before and
after training ("LoRA Learns Less and Forgets Less", Biderman et al. 2024, measures learning against
forgetting the same way, on tasks outside the target domain).

A panel's multiple-choice tasks give accuracy (the mean over tasks of each task's accuracy); the
targets of its generative tasks serve as general text, scored as plain text without their prompts,
and give the per-token cross-entropy of the model on it (the mean over tasks of each task's nats per
token, end-of-text token included). Forgetting shows as accuracy falling and cross-entropy rising.

Panels are fixed and versioned, so runs are comparable: a name ("default-v1") stands for a task list,
an example count per task and a seed that never change; a changed panel gets a new name. The examples
of a task are the first `choice_examples` multiple-choice (or `text_examples` text) examples of its
list shuffled with the panel's seed. A list of task names is a panel too, with default-v1's counts and
seed (named "tasks:<names>").

default-v1 was picked on SmolLM2-135M-Instruct, the default model: multiple-choice tasks with short
prompts on which it scores above chance (zero-shot, 30 examples each: general_knowledge 0.43 vs
chance 0.15, emoji_movie 0.70 vs 0.20, phrase_relatedness 0.40 vs 0.25, date_understanding 0.27 vs
0.17, human_organs_senses 0.33 vs 0.25, social_iqa 0.40 vs 0.33, anachronisms 0.57 vs 0.50,
fantasy_reasoning 0.57 vs 0.50), so a drop is visible; and four generative tasks whose targets are
ordinary English sentences (dialogue turns, restaurant-booking replies, rephrased sentences,
science headlines). None is a default training task (intent_recognition) or one of the experiments'
targets. For that model it should score in about 45 s on 2 idle CPU cores, extrapolated from the
picking run (30 examples of each of the 8 multiple-choice tasks: 32 s); measured with the machine
shared five ways it took 204 s of CPU time (7.6 min wall).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Sequence

from torch import nn

from ..data.bigbench import load_task
from ..data.examples import Completion, MultipleChoice
from ..data.tokenize import IGNORE, Formatter
from ..errors import ConfigError, DataError
from ..forward.options import DEFAULT, ForwardOptions
from .multiple_choice import multiple_choice_accuracy
from .perplexity import perplexity


@dataclass(frozen=True)
class Panel:
    """A versioned panel: its tasks, examples per task (multiple-choice / text) and the seed that picks them."""
    name: str
    tasks: tuple[str, ...]
    choice_examples: int = 40
    text_examples: int = 50
    seed: int = 0


PANELS: dict[str, Panel] = {
    "default-v1": Panel("default-v1", (
        "general_knowledge", "emoji_movie", "phrase_relatedness", "date_understanding", "human_organs_senses",
        "social_iqa", "anachronisms", "fantasy_reasoning",                               # multiple choice
        "topical_chat", "few_shot_nlg", "rephrase", "scientific_press_release")),        # text
}
LATEST = {"default": "default-v1"}  # a name without its version: the newest panel of that name


@dataclass(frozen=True)
class PanelExamples:
    """A panel with its examples loaded: multiple-choice examples and texts, by task."""
    panel: Panel
    choice: dict[str, list[MultipleChoice]]
    text: dict[str, list[Completion]]


def resolve_panel(spec: str | Sequence[str]) -> Panel:
    """A panel by name (`default`, `default-v1`) or a list of BIG-bench task names (comma-separated)."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        raise ConfigError("retention: name a panel (default, " + ", ".join(PANELS) + ") or BIG-bench tasks")
    if len(names) == 1 and (names[0] in PANELS or names[0] in LATEST):
        return PANELS[LATEST.get(names[0], names[0])]
    if len(set(names)) != len(names):
        raise ConfigError(f"retention: task {next(n for n in names if names.count(n) > 1)!r} is named twice")
    base = PANELS[LATEST["default"]]
    return Panel("tasks:" + ",".join(names), tuple(names), base.choice_examples, base.text_examples, base.seed)


def _same_task(a: str, b: str) -> bool:
    """One task, or a task and one of its subtasks ("parent" and "parent/one")."""
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def load_panel(spec: str | Sequence[str], trained: Sequence[str] = ()) -> PanelExamples:
    """The panel `spec` names, with its examples. Refuses a panel holding a task of `trained` (the run's
    training tasks: its numbers would measure learning, not forgetting) and names the task; a task
    BIG-bench lacks is an error naming it."""
    panel = resolve_panel(spec)
    overlap = [t for t in panel.tasks if any(_same_task(t, x) for x in trained)]
    if overlap:
        raise ConfigError(f"retention: panel {panel.name} holds {', '.join(overlap)}, which this run trains on; "
                          "a retention panel must hold tasks the run does not train on (name other tasks with "
                          "--retention T1,T2,...)")
    choice, text = {}, {}
    for task in panel.tasks:
        try:
            examples = load_task(task)
        except DataError as exc:
            raise DataError(f"retention: panel {panel.name}: {exc}") from None
        order = list(range(len(examples)))
        random.Random(panel.seed).shuffle(order)
        mc = [examples[i] for i in order if isinstance(examples[i], MultipleChoice)][:panel.choice_examples]
        # the targets alone, as plain text (an empty prompt: every token after the first is scored)
        texts = [Completion("", examples[i].completion) for i in order
                 if isinstance(examples[i], Completion) and examples[i].completion.strip()][:panel.text_examples]
        if mc:
            choice[task] = mc
        if texts:
            text[task] = texts
        if not mc and not texts:
            raise DataError(f"retention: panel {panel.name}: task {task} has no examples to score")
    return PanelExamples(panel, choice, text)


def measure_retention(model: nn.Module, formatter: Formatter, panel: PanelExamples,
                      options: ForwardOptions = DEFAULT, part: tuple[int, int] = (0, 1),
                      sum_over: Callable[[list[float]], list[float]] | None = None) -> dict:
    """{"panel", "accuracy" (mean over the multiple-choice tasks), "cross_entropy" (mean over the text
    tasks, nats per token), "tasks": {task: {"accuracy": ...} and/or {"cross_entropy": ...}}}; a part the
    panel lacks is left out. Rounded to 4 places, as the run's other evaluations.

    Several processes, each with the whole model (`train.distributed: ddp`), share the work: `part`
    (index, count) makes this one score every count-th example of each task from its index, and
    `sum_over` sums a list of numbers over the processes (every one calls it once), so each returns
    the whole panel's numbers."""
    index, count = part
    counts: list[float] = []  # per multiple-choice task its hits; per text task its NLL and its tokens
    for examples in panel.choice.values():
        mine = examples[index::count]
        counts.append(round(multiple_choice_accuracy(model, formatter, mine, options=options) * len(mine))
                      if mine else 0)
    for texts in panel.text.values():
        mine = texts[index::count]
        tokens = sum(sum(1 for t in formatter.encode(e).labels if t != IGNORE) for e in mine)
        nll = math.log(perplexity(model, formatter, mine, options=options)) * tokens if mine else 0.0
        counts += [nll, tokens]
    if sum_over is not None:
        counts = sum_over(counts)
    tasks: dict[str, dict] = {}
    for (task, examples), hits in zip(panel.choice.items(), counts):
        tasks[task] = {"accuracy": hits / len(examples)}
    rest = counts[len(panel.choice):]
    for j, task in enumerate(panel.text):
        tasks.setdefault(task, {})["cross_entropy"] = rest[2 * j] / max(rest[2 * j + 1], 1)
    out: dict = {"panel": panel.panel.name}
    for key in ("accuracy", "cross_entropy"):
        values = [t[key] for t in tasks.values() if key in t]
        if values:
            out[key] = round(sum(values) / len(values), 4)
    out["tasks"] = {task: {k: round(v, 4) for k, v in t.items()} for task, t in tasks.items()}
    return out


def retention_change(before: dict, after: dict) -> dict:
    """after - before of the panel's accuracy and cross-entropy (forgetting: accuracy < 0, cross-entropy > 0)."""
    return {k: round(after[k] - before[k], 4) for k in ("accuracy", "cross_entropy") if k in before and k in after}


def describe(before: dict, after: dict | None = None) -> str:
    """One line for the log: the panel's numbers (and their change)."""
    parts = []
    for key, label in (("accuracy", "accuracy"), ("cross_entropy", "cross-entropy")):
        if key in before:
            parts.append(f"{label} {before[key]}" if after is None else
                         f"{label} {before[key]} -> {after[key]} ({after[key] - before[key]:+.4f})")
    return f"retention ({before['panel']}): {', '.join(parts)}"

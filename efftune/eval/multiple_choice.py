"""Multiple-choice accuracy by the log-likelihood of each choice, sharing every common prefix.

Each example is laid out as a token tree (`efftune.data.layout`): the instruction all prompts
share runs once per row, each prompt's remainder branches off it, and the choices branch off
their prompt. Each choice attends to its own prompt (and the shared part) and to itself only, so
its score is exactly what scoring `prompt + choice` alone gives, at a fraction of the tokens.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..data.examples import MultipleChoice
from ..data.layout import MIN_SHARED, Row, collate, common_prefix
from ..data.tokenize import Formatter, pack
from ..forward.logprobs import target_logprobs
from ..forward.options import DEFAULT, ForwardOptions
from ..progress import QUIET_SECONDS, progress_bar


def _encode(formatter: Formatter, ex: MultipleChoice) -> tuple[list[int], list[list[int]]]:
    prefix = formatter.prefix_for(ex)  # its task's, where each task has a prompt of its own
    pairs = [formatter.encode_pair(ex.prompt, c, prefix) for c in ex.choices]
    eos = formatter.tokenizer.eos_token_id
    return pairs[0][0], [c or [eos] for _, c in pairs]


def score_rows(formatter: Formatter, examples: Sequence[MultipleChoice], row_tokens: int) -> list[Row]:
    """Rows of (shared prefix) -> prompt remainder -> choices; targets tagged (example, choice).

    Rows hold at most `row_tokens` tokens; an over-long prompt keeps its end. An example whose
    choices alone exceed `row_tokens` gets a longer row of its own (its choices + up to
    `row_tokens` prompt tokens)."""
    encoded = [_encode(formatter, ex) for ex in examples]
    prompts = [p for p, _ in encoded]
    shared = min(common_prefix(prompts), min(len(p) for p in prompts) - 1)
    shared = shared if shared >= MIN_SHARED and len(examples) > 1 else 0
    trunk = prompts[0][:shared]
    room = row_tokens - shared
    sizes = []
    for k, (p, choices) in enumerate(encoded):
        keep = room - sum(len(c) for c in choices)
        if keep < 1:  # long choices (e.g. whole paragraphs): a row of its own, over row_tokens,
            keep = room  # with as much prompt as a normal row holds, rather than no prompt at all
        rest = p[shared:][-keep:]  # an over-long prompt keeps its end, next to the answer
        encoded[k] = (rest, choices)
        sizes.append(len(rest) + sum(len(c) for c in choices))
    rows = []
    for group in pack(sizes, room):
        row = Row()
        root = row.add(trunk) if shared else -1
        for i in group:
            rest, choices = encoded[i]
            prompt_seg = row.add(rest, parent=root)
            for j, c in enumerate(choices):
                row.add(c, parent=prompt_seg, labels=c, tag=(i, j))
        rows.append(row)
    return rows


@torch.no_grad()
def choice_scores(model: nn.Module, formatter: Formatter, examples: Sequence[MultipleChoice],
                  row_tokens: int = 512, rows_per_batch: int = 4, normalize: str = "sum",
                  progress: bool = True, options: ForwardOptions = DEFAULT) -> list[list[float]]:
    """Log-likelihood of every choice of every example (`normalize="mean"`: per token).
    `progress`: a bar over the examples on stderr, once scoring takes over a second (it closes
    without a trace). `options`: the forwards' kernels (`efftune.forward.options`)."""
    device = next(model.parameters()).device
    attention = getattr(model.config, "_attn_implementation", "sdpa")
    rows = score_rows(formatter, examples, row_tokens)
    totals: dict[tuple[int, int], list[float]] = {}
    with progress_bar(len(examples), "eval", unit="example", leave=False, enable=progress,
                      delay=QUIET_SECONDS) as bar:
        for start in range(0, len(rows), rows_per_batch):
            batch = collate(rows[start:start + rows_per_batch], formatter.tokenizer.pad_token_id,
                            attention).to(device)
            lp = target_logprobs(model, batch.input_ids, batch.rows, batch.sources, batch.targets,
                                 batch.position_ids, batch.mask, options=options).tolist()
            for tag, value in zip(batch.tags, lp):
                totals.setdefault(tag, []).append(value)
            bar.update(len({i for i, _ in batch.tags}))  # a row holds whole examples
    scores: list[list[float]] = [[] for _ in examples]
    for (i, _choice), values in sorted(totals.items()):
        scores[i].append(sum(values) / (len(values) if normalize == "mean" else 1))
    return scores


def multiple_choice_accuracy(model: nn.Module, formatter: Formatter, examples: Sequence[MultipleChoice],
                             **kwargs) -> float:
    """Fraction of examples whose highest-scoring choice is a correct one (`kwargs`: `choice_scores`'s,
    `options` among them)."""
    if not examples:
        return float("nan")
    was_training = model.training
    model.eval()
    try:
        scores = choice_scores(model, formatter, examples, **kwargs)
    finally:
        model.train(was_training)
    hits = sum(max(range(len(s)), key=s.__getitem__) in ex.correct for s, ex in zip(scores, examples))
    return hits / len(examples)

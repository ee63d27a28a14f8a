"""Multiple-choice accuracy by the log-likelihood of each choice, sharing the prompt.

An example's prompt is run once and all its choices after it in the same row: each choice
attends to the prompt and to itself, never to the other choices, and its position ids continue
from the prompt's end as if it stood alone. Several examples share a row the same way. This
makes scoring k choices cost about one pass over the prompt instead of k.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..data.examples import MultipleChoice
from ..data.tokenize import Formatter, pack
from .logprobs import target_logprobs


@dataclass
class _Laid:
    """One example laid out as prompt + choices."""
    ids: list[int]
    part: list[int]      # 0 = prompt, j = choice j (1-based)
    pos: list[int]       # position ids
    prompt_len: int
    choice_lens: list[int]


def _lay_out(formatter: Formatter, ex: MultipleChoice, max_tokens: int) -> _Laid:
    pairs = [formatter.encode_pair(ex.prompt, c) for c in ex.choices]
    prompt = pairs[0][0]
    choices = [c or [formatter.tokenizer.eos_token_id] for _, c in pairs]
    room = max_tokens - sum(len(c) for c in choices)
    if room < 1:
        raise ValueError("choices alone exceed the row length; raise eval_row_tokens")
    prompt = prompt[-room:]
    ids, part, pos = list(prompt), [0] * len(prompt), list(range(len(prompt)))
    for j, c in enumerate(choices, 1):
        ids += c
        part += [j] * len(c)
        pos += range(len(prompt), len(prompt) + len(c))
    return _Laid(ids, part, pos, len(prompt), [len(c) for c in choices])


def shared_prefix_mask(example: torch.Tensor, part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask (rows, 1, L, L): token i sees token j <= i of the same example
    when j is in the prompt or in i's own choice."""
    L = example.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=example.device).tril()
    same_ex = example[:, :, None] == example[:, None, :]
    visible = (part[:, None, :] == 0) | (part[:, :, None] == part[:, None, :])
    allowed = causal & same_ex & visible
    mask = torch.zeros(allowed.shape, dtype=dtype, device=example.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


@torch.no_grad()
def choice_scores(model: nn.Module, formatter: Formatter, examples: Sequence[MultipleChoice],
                  row_tokens: int = 1024, rows_per_batch: int = 4, normalize: str = "sum") -> list[list[float]]:
    """Log-likelihood of every choice of every example (`normalize="mean"`: per token)."""
    device = next(model.parameters()).device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    laid = [_lay_out(formatter, ex, row_tokens) for ex in examples]
    rows = pack([len(x.ids) for x in laid], row_tokens)
    scores: list[list[float]] = [[] for _ in examples]
    pad = formatter.tokenizer.pad_token_id
    for start in range(0, len(rows), rows_per_batch):
        batch = rows[start:start + rows_per_batch]
        L = max(sum(len(laid[i].ids) for i in row) for row in batch)
        ids = torch.full((len(batch), L), pad, dtype=torch.long)
        pos = torch.zeros((len(batch), L), dtype=torch.long)
        ex_of = torch.full((len(batch), L), -1, dtype=torch.long)
        part = torch.zeros((len(batch), L), dtype=torch.long)
        r_idx, src, tgt, owner = [], [], [], []  # owner: (example, choice) of each target token
        for r, row in enumerate(batch):
            at = 0
            for i in row:
                x = laid[i]
                n = len(x.ids)
                ids[r, at:at + n] = torch.tensor(x.ids)
                pos[r, at:at + n] = torch.tensor(x.pos)
                ex_of[r, at:at + n] = i
                part[r, at:at + n] = torch.tensor(x.part)
                c_at = at + x.prompt_len
                for j, c_len in enumerate(x.choice_lens):
                    for t in range(c_len):
                        r_idx.append(r)
                        src.append(at + x.prompt_len - 1 if t == 0 else c_at + t - 1)
                        tgt.append(x.ids[c_at - at + t])
                        owner.append((i, j))
                    c_at += c_len
                at += n
            pos[r, at:] = torch.arange(L - at)
        mask = shared_prefix_mask(ex_of, part, dtype)
        lp = target_logprobs(model, ids.to(device), torch.tensor(r_idx, device=device),
                             torch.tensor(src, device=device), torch.tensor(tgt, device=device),
                             pos.to(device), mask.to(device)).tolist()
        totals: dict[tuple[int, int], list[float]] = {}
        for key, value in zip(owner, lp):
            totals.setdefault(key, []).append(value)
        for (i, j), values in sorted(totals.items()):
            scores[i].append(sum(values) / (len(values) if normalize == "mean" else 1))
    return scores


def multiple_choice_accuracy(model: nn.Module, formatter: Formatter, examples: Sequence[MultipleChoice],
                             **kwargs) -> float:
    """Fraction of examples whose highest-scoring choice is a correct one."""
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

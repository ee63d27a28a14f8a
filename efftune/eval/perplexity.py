"""Perplexity of completions given their prompts (or of whole texts, when the prompt is empty)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..data.examples import Completion
from ..data.tokenize import Formatter, collate_packed, pack
from .logprobs import labelled_logprobs


@torch.no_grad()
def perplexity(model: nn.Module, formatter: Formatter, examples: Sequence[Completion],
               row_tokens: int = 1024) -> float:
    """exp(mean negative log-likelihood per completion token), over packed rows."""
    device = next(model.parameters()).device
    seqs = [formatter.encode(e) for e in examples]
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        rows = pack([len(s) for s in seqs], max(row_tokens, max(len(s) for s in seqs)))
        for start in range(0, len(rows), 4):
            batch = collate_packed(seqs, rows[start:start + 4], formatter.tokenizer.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            lp = labelled_logprobs(model, batch["input_ids"], batch["labels"], batch["position_ids"])
            total -= float(lp.sum())
            count += lp.numel()
    finally:
        model.train(was_training)
    return math.exp(total / max(count, 1))

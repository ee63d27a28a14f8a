"""Perplexity of completions given their prompts (or of whole texts, when the prompt is empty)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..data.examples import Completion
from ..data.layout import collate, training_rows
from ..data.tokenize import Formatter
from ..forward.logprobs import target_logprobs
from ..forward.options import DEFAULT, ForwardOptions
from ..progress import QUIET_SECONDS, progress_bar


@torch.no_grad()
def perplexity(model: nn.Module, formatter: Formatter, examples: Sequence[Completion],
               row_tokens: int = 1024, progress: bool = True, options: ForwardOptions = DEFAULT) -> float:
    """exp(mean negative log-likelihood per completion token), over packed rows (a shared prompt
    prefix runs once per row). `progress`: a bar over the rows on stderr, once it takes over a
    second (it closes without a trace). `options`: the forwards' kernels (`efftune.forward.options`)."""
    device = next(model.parameters()).device
    seqs = [formatter.encode(e) for e in examples]
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    attention = getattr(model.config, "_attn_implementation", "sdpa")
    try:
        rows = training_rows(seqs, max(row_tokens, max(len(s) for s in seqs)))
        with progress_bar(len(rows), "eval perplexity", unit="row", leave=False, enable=progress,
                          delay=QUIET_SECONDS) as bar:
            for start in range(0, len(rows), 4):
                batch = collate(rows[start:start + 4], formatter.tokenizer.pad_token_id, attention).to(device)
                lp = target_logprobs(model, batch.input_ids, batch.rows, batch.sources, batch.targets,
                                     batch.position_ids, batch.mask, options=options)
                total -= float(lp.sum())
                count += lp.numel()
                bar.update(len(rows[start:start + 4]))
    finally:
        model.train(was_training)
    return math.exp(total / max(count, 1))

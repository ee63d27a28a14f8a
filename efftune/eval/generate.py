"""Greedy generation with whatever method is attached (adapters are ordinary modules)."""
from __future__ import annotations

import torch
from torch import nn

from ..data.tokenize import Formatter


@torch.no_grad()
def generate(model: nn.Module, formatter: Formatter, prompt: str, max_new_tokens: int = 64,
             prefix_ids: list[int] | None = None) -> str:
    """The greedy continuation of `prompt`, after `prefix_ids` (default: the formatter's one prefix)."""
    device = next(model.parameters()).device
    ids = torch.tensor([formatter.encode_prompt(prompt, prefix_ids)], device=device)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=formatter.tokenizer.pad_token_id)
    finally:
        model.train(was_training)
    return formatter.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

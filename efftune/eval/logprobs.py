"""Log-probabilities of chosen tokens only: the LM head runs where a target needs it.

Training (loss on answer tokens) and scoring (log-likelihood of each choice) both need the
log-probability of a few tokens per sequence. Computing logits only at those positions skips
most of the LM head, the largest single matrix of a small model (vocab × hidden), and the
full-vocabulary fp32 logits that would otherwise be kept for the backward pass.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.tokenize import IGNORE


def target_logprobs(model: nn.Module, input_ids: torch.Tensor, rows: torch.Tensor, sources: torch.Tensor,
                    targets: torch.Tensor, position_ids: torch.Tensor | None = None,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """log p(targets[n] | output at (rows[n], sources[n])) for every n, in float32 (or float64).

    Extra keyword arguments a model reports (e.g. an MoE router's auxiliary loss) are ignored
    here; the training loop reads them from the model.
    """
    keep = torch.unique(sources)  # sorted positions whose outputs are needed
    out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                logits_to_keep=keep, use_cache=False)
    logits = out.logits[rows, torch.searchsorted(keep, sources)]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least, fp64 kept
    return -F.cross_entropy(logits, targets, reduction="none")


def labelled_logprobs(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                      position_ids: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probability of every labelled token (label at t = token at t, predicted from t-1),
    in row-major order of `labels != IGNORE`."""
    rows, cols = (labels != IGNORE).nonzero(as_tuple=True)
    return target_logprobs(model, input_ids, rows, cols - 1, labels[rows, cols], position_ids, attention_mask)

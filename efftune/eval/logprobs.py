"""Log-probabilities of chosen tokens only, without materialising full-vocabulary logits.

Training (loss on answer tokens, or on every token) and scoring (log-likelihood of each choice)
both need log p(target | position) for some positions. We run the model's body to get hidden
states, keep only the positions that predict a target, and apply the LM head and the log-softmax
chunk by chunk inside one autograd function that recomputes each chunk's logits in backward:
peak memory holds one chunk of logits instead of (targets × vocab) in bf16 and fp32 plus the
softmax kept for backward — about 5 GB at sequence 4096 and a 128k vocabulary.

Models whose head does more than one matrix product (logit soft-capping, logit scaling, a
bias) take the plain path: `logits_to_keep` through the model's own forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.tokenize import IGNORE

CHUNK = 1024  # target positions per chunk of logits


class ChunkedTargetLogprob(torch.autograd.Function):
    """log_softmax(hidden @ weightᵀ)[n, targets[n]] for hidden (N, d), weight (V, d) -> (N,)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, fused: bool = False):
        acc = torch.promote_types(hidden.dtype, torch.float32)
        out = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        w = weight.to(hidden.dtype)
        pick = _fused("logprob") if fused else _chunk_logprob
        for i in range(0, hidden.shape[0], chunk):
            out[i:i + chunk] = pick(hidden[i:i + chunk] @ w.T, targets[i:i + chunk])
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk, ctx.fused = chunk, fused
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets = ctx.saved_tensors
        acc = torch.promote_types(hidden.dtype, torch.float32)
        w = weight.to(hidden.dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if ctx.needs_input_grad[1] else None
        fused = ctx.fused and grad_weight is None  # the fused kernel returns dlogits rounded to h's dtype
        for i in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[i:i + ctx.chunk]
            logits, t, g = h @ w.T, targets[i:i + ctx.chunk], grad_out[i:i + ctx.chunk]
            if fused:
                grad_hidden[i:i + ctx.chunk] = _fused("dlogits")(logits, t, g, h.dtype) @ w
                continue
            # d/dlogits of (logit[target] - logsumexp) = onehot(target) - softmax
            dlogits = -torch.softmax(logits.to(acc), dim=-1)
            dlogits[torch.arange(h.shape[0], device=h.device), t] += 1
            dlogits *= g[:, None].to(acc)
            if grad_hidden is not None:
                grad_hidden[i:i + ctx.chunk] = (dlogits.to(h.dtype) @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += dlogits.T @ h.to(acc)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def _chunk_logprob(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[n, targets[n]], in fp32 at least."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return logits.gather(1, targets[:, None])[:, 0] - logits.logsumexp(-1)


def _chunk_dlogits(logits: torch.Tensor, targets: torch.Tensor, grad: torch.Tensor,
                   dtype: torch.dtype) -> torch.Tensor:
    """grad[n] · (onehot(targets[n]) − softmax(logits[n])), computed in fp32, rounded to `dtype`:
    written as one expression (no in-place index update) so that Inductor makes it one kernel."""
    acc = torch.promote_types(logits.dtype, torch.float32)
    onehot = torch.arange(logits.shape[-1], device=logits.device)[None, :] == targets[:, None]
    return ((onehot.to(acc) - torch.softmax(logits.to(acc), dim=-1)) * grad[:, None].to(acc)).to(dtype)


_FUSED: dict[str, object] = {}


def _fused(name: str):
    """The per-chunk softmax work compiled (once, shape-dynamic): one pass over the chunk's logits
    instead of a cast, a log-sum-exp, a softmax, a negation, an index update, a scale and a cast,
    each over the whole (chunk × vocabulary) fp32 array. Used when the model's blocks are compiled
    (`efftune.train.compile.compile_blocks` sets `FUSED_HEAD`)."""
    if name not in _FUSED:
        fn = _chunk_logprob if name == "logprob" else _chunk_dlogits
        _FUSED[name] = torch.compile(fn, dynamic=True)
    return _FUSED[name]


FUSED_HEAD = "efftune_fused_head"  # model attribute: True -> the LM-head loss chunks run compiled


def _plain_head(model: nn.Module) -> nn.Linear | None:
    """The LM head when it is a bare matrix product we may apply ourselves, else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    if type(head) is not nn.Linear or head.bias is not None:
        return None
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) \
            or getattr(config, "logits_scaling", None):
        return None
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return head if isinstance(body, nn.Module) and body is not model else None


def target_logprobs(model: nn.Module, input_ids: torch.Tensor, rows: torch.Tensor, sources: torch.Tensor,
                    targets: torch.Tensor, position_ids: torch.Tensor | None = None,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """log p(targets[n] | output at (rows[n], sources[n])) for every n, in float32 (or float64)."""
    head = _plain_head(model)
    if head is not None:
        body = getattr(model, model.base_model_prefix)
        hidden = body(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                      use_cache=False).last_hidden_state
        return ChunkedTargetLogprob.apply(hidden[rows, sources], head.weight, targets, CHUNK,
                                          bool(getattr(model, FUSED_HEAD, False)))
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

"""Log-probabilities of chosen tokens only, without materialising full-vocabulary logits.

Training (loss on answer tokens, or on every token) and scoring (log-likelihood of each choice)
both need log p(target | position) for some positions. We run the model's body to get hidden
states, keep only the positions that predict a target, and apply the LM head and the log-softmax
chunk by chunk inside one autograd function: peak memory holds one chunk of logits instead of
(targets × vocab) in bf16 and fp32 plus the softmax kept for backward — about 5 GB at sequence
4096 and a 128k vocabulary. With a frozen head the input gradient is made in the same pass (no
second head matmul in backward); a trainable head keeps each chunk's logit gradient for backward
(`ForwardOptions.keep_logit_grads`), or recomputes each chunk's logits there.

Models whose head does more than one matrix product (logit soft-capping, logit scaling, a
bias) take the plain path: `logits_to_keep` through the model's own forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.tokenize import IGNORE
from .causal import masked_rows, plain_causal
from .options import DEFAULT, ForwardOptions

CHUNK = 1024  # target positions per chunk of logits


class ChunkedTargetLogprob(torch.autograd.Function):
    """log_softmax(hidden @ weightᵀ)[n, targets[n]] for hidden (N, d), weight (V, d) -> (N,).

    With a frozen head (the usual case: LoRA and the other methods leave it alone) the input
    gradient is made in forward, while each chunk's logits are at hand: `G[n] = (onehot(t_n) −
    softmax(logits_n)) W`, an (N, d) tensor kept instead of `hidden`, and backward is just
    `grad[n] · G[n]`. That saves the head's matmul that backward would otherwise rerun to rebuild
    the logits. A trainable head (full fine-tuning) takes the general path, which recomputes the logits
    in backward; with `keep` (`ForwardOptions.keep_logit_grads`) it too makes G in forward and keeps
    each chunk's logit gradient `onehot − softmax` (targets × vocabulary, in the products' dtype), so
    backward is the weight gradient's one matmul: the head's three products, as a plain loop runs them,
    instead of four, and one softmax pass fewer, for (targets × vocabulary × 2) bytes held between
    forward and backward (1 GiB at 4096 targets and a 128k vocabulary; a plain loop holds ~5).
    The per-chunk softmax work runs as Triton kernels on a CUDA GPU (`head_triton`); elsewhere
    `fused` (`ForwardOptions.fused_head`) runs it compiled (one pass over the logits instead of several).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, fused: bool = False, keep: bool = False):
        acc = torch.promote_types(hidden.dtype, torch.float32)
        out = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        ctx.compute = compute = _compute_dtype(hidden)
        w = weight.to(compute)
        ctx.early = ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
        ctx.kept = keep and ctx.needs_input_grad[1]
        ctx.chunk = chunk
        if ctx.early or ctx.kept:
            grad_rows = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
            kept = torch.empty(hidden.shape[0], w.shape[0], dtype=compute, device=hidden.device) if ctx.kept else None
            pick = _logprob_and_grad_for(hidden, fused, min(chunk, hidden.shape[0]), w.shape[0])
            for i in range(0, hidden.shape[0], chunk):
                out[i:i + chunk], dlogits = pick(hidden[i:i + chunk].to(compute) @ w.T, targets[i:i + chunk], compute)
                if grad_rows is not None:
                    grad_rows[i:i + chunk] = dlogits @ w
                if kept is not None:
                    kept[i:i + chunk] = dlogits
            if ctx.kept:
                ctx.save_for_backward(grad_rows, kept, hidden, weight)
            else:
                ctx.save_for_backward(grad_rows)
            return out
        pick = _fused("logprob") if fused else _chunk_logprob
        for i in range(0, hidden.shape[0], chunk):
            out[i:i + chunk] = pick(hidden[i:i + chunk].to(compute) @ w.T, targets[i:i + chunk])
        ctx.save_for_backward(hidden, weight, targets)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.early:
            (grad_rows,) = ctx.saved_tensors
            return _scaled_rows(grad_out, grad_rows), None, None, None, None, None
        if ctx.kept:
            grad_rows, kept, hidden, weight = ctx.saved_tensors
            # sum_n g_n dlogits_nᵀ h_n = dlogitsᵀ (g ⊙ h): the upstream factors scale the (N, d) hidden
            # states, not the (N, V) gradients, and the whole sum is one matmul (its accumulation in
            # fp32 inside the GEMM, as a plain loop's head gradient): no fp32 (N, V) temporaries and no
            # per-chunk fp32 partial sums of the (V, d) gradient, ~24 GB of memory traffic a step at 4096
            # targets, a 128k vocabulary and hidden size 2048 (by arithmetic; ~2 GB this way)
            acc = torch.promote_types(hidden.dtype, torch.float32)
            scaled = (hidden.to(acc) * grad_out[:, None].to(acc)).to(ctx.compute)
            grad_weight = (kept.T @ scaled).to(weight.dtype)
            grad_hidden = None if grad_rows is None else _scaled_rows(grad_out, grad_rows)
            return grad_hidden, grad_weight, None, None, None, None
        hidden, weight, targets = ctx.saved_tensors
        # the matrix products in the forward's dtype (autocast's, where it was on): backward runs outside
        # autocast, and fp32 masters (full fine-tuning) would otherwise make the head's three products fp32
        # GEMMs, which halved full fine-tuning's tokens/s at a 128k vocabulary (bench/RESULTS.md, session 18)
        compute, acc = ctx.compute, torch.promote_types(hidden.dtype, torch.float32)
        w = weight.to(compute)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if ctx.needs_input_grad[1] else None
        pick = _logprob_and_grad_for(hidden, False, min(ctx.chunk, hidden.shape[0]), w.shape[0])
        for i in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[i:i + ctx.chunk].to(compute)
            _, dlogits = pick(h @ w.T, targets[i:i + ctx.chunk], torch.promote_types(compute, torch.float32))
            dlogits *= grad_out[i:i + ctx.chunk, None].to(dlogits.dtype)
            d = dlogits.to(compute)
            if grad_hidden is not None:
                grad_hidden[i:i + ctx.chunk] = (d @ w).to(hidden.dtype)
            if grad_weight is not None:  # each chunk's product summed in fp32 (or wider)
                grad_weight += d.T @ h
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def _scaled_rows(grad_out: torch.Tensor, grad_rows: torch.Tensor) -> torch.Tensor:
    """Each row of the input gradient made in forward times its target's upstream gradient."""
    acc = torch.promote_types(grad_rows.dtype, torch.float32)
    return (grad_out[:, None].to(acc) * grad_rows).to(grad_rows.dtype)


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype of the head's matrix products: autocast's where it is on for hidden's device (as it
    would cast a plain `hidden @ weightᵀ`; it leaves fp64 alone), else hidden's own."""
    device = hidden.device.type
    if hidden.dtype != torch.float64 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


def _chunk_logprob(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[n, targets[n]], in fp32 at least."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return logits.gather(1, targets[:, None])[:, 0] - logits.logsumexp(-1)


def _chunk_logprob_and_grad(logits: torch.Tensor, targets: torch.Tensor,
                            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(log_softmax(logits)[n, targets[n]] in fp32 at least, d/dlogits of it = onehot − softmax
    rounded to `dtype`). `logits` must be a temporary: the softmax is formed in its place when it
    is already fp32 (no second chunk-sized array)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lse = logits.logsumexp(-1, keepdim=True)
    picked = targets[:, None]
    logprob = logits.gather(1, picked)[:, 0] - lse[:, 0]
    p = logits.sub_(lse).exp_()  # softmax
    one_minus_p = 1 - p.gather(1, picked)  # the targets' entries, in fp32
    # −softmax rounded to `dtype` in one go (compiled: one pass with the exponential, no fp32 array
    # written), then the targets' entries put in: rounded once, as if added before the cast
    return logprob, p.neg_().to(dtype).scatter_(1, picked, one_minus_p.to(dtype))


def _logprob_and_grad_for(hidden: torch.Tensor, fused: bool, rows: int, vocabulary: int):
    """The per-chunk softmax work (log-probs and logit gradient) for chunks of up to `rows` ×
    `vocabulary` logits: on a CUDA GPU with Triton the two-pass kernels (`head_triton`) where
    their offsets fit (`kernel_limits.head_fits`), else compiled when `fused`, else eager."""
    from ..kernel_limits import head_fits
    from ..methods.lora.swiglu import triton_available
    if hidden.is_cuda and head_fits(rows, vocabulary) and triton_available():
        from . import head_triton
        if hidden.dtype in head_triton.KERNEL_DTYPES:
            return head_triton.logprob_and_grad
    return _fused("logprob_grad") if fused else _chunk_logprob_and_grad


_FUSED: dict[str, object] = {}


def _fused(name: str):
    """The per-chunk softmax work compiled (once, shape-dynamic): a few fused passes over the chunk's
    logits instead of a cast, a log-sum-exp, a subtraction, an exponential, a negation, an index
    update and a cast, each over the whole (chunk × vocabulary) fp32 array. Chosen per call by
    `ForwardOptions.fused_head` (train() sets it with compiled blocks); compiled once, kept here."""
    if name not in _FUSED:
        fn = _chunk_logprob if name == "logprob" else _chunk_logprob_and_grad
        _FUSED[name] = torch.compile(fn, dynamic=True)
    return _FUSED[name]


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
                    attention_mask: torch.Tensor | None = None, *,
                    options: ForwardOptions = DEFAULT) -> torch.Tensor:
    """log p(targets[n] | output at (rows[n], sources[n])) for every n, in float32 (or float64).
    Without position ids and mask the rows are plain causal sequences (see `causal.plain_causal`);
    a boolean mask may run through FlexAttention (`causal.masked_rows`). `options` chooses the
    attention kernels and the head's mode (`ForwardOptions`)."""
    head = _plain_head(model)
    if head is not None:
        body = getattr(model, model.base_model_prefix)
        with plain_causal(model, position_ids, attention_mask, options), \
                masked_rows(model, attention_mask, options) as mask:
            hidden = body(input_ids=input_ids, position_ids=position_ids, attention_mask=mask,
                          use_cache=False).last_hidden_state
        return ChunkedTargetLogprob.apply(hidden[rows, sources], head.weight, targets, CHUNK, options.fused_head,
                                          options.keep_logit_grads)
    keep = torch.unique(sources)  # sorted positions whose outputs are needed
    with plain_causal(model, position_ids, attention_mask, options), \
            masked_rows(model, attention_mask, options) as mask:
        out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask,
                    logits_to_keep=keep, use_cache=False)
    logits = out.logits[rows, torch.searchsorted(keep, sources)]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least, fp64 kept
    return -F.cross_entropy(logits, targets, reduction="none")


def labelled_logprobs(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                      position_ids: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None, *,
                      options: ForwardOptions = DEFAULT) -> torch.Tensor:
    """Log-probability of every labelled token (label at t = token at t, predicted from t-1),
    in row-major order of `labels != IGNORE`."""
    rows, cols = (labels != IGNORE).nonzero(as_tuple=True)
    return target_logprobs(model, input_ids, rows, cols - 1, labels[rows, cols], position_ids, attention_mask,
                           options=options)

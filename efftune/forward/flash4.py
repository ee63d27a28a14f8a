"""FlashAttention-4 (the optional `flash-attn-4` package, CuTe DSL kernels) for causal attention
over whole sequences.

Opt-in, for the maskless causal path only (`causal.plain_causal`: no mask, no position ids);
everything else keeps SDPA. On one H100 at Llama-3-8B's attention shape (32 query and 8 KV heads,
head dim 128, 4,096 tokens, bf16) its forward and backward take 0.97-0.99 ms against 1.07-1.11 ms
for the cuDNN kernel SDPA picks; at head dim 64 (Llama-3.2-1B) it is not reliably faster and often
slower (bench/RESULTS.md, session 10).

The kernels run as two torch custom ops, forward and backward, so `torch.compile` keeps each as
one opaque call, and Inductor's CUDA graphs (`train.cuda_graphs`) record and replay them. (A
hand-made `torch.cuda.graph` capture of forward and backward through autograd fails with this
package release; the backward op called in the capturing thread captures fine.) Inputs use the
[batch, tokens, heads, head_dim] layout, which is how the projections wrote them: no transposing
copies. Fewer KV heads than query heads (GQA) is handled by the kernels themselves.

Install: `pip install "efftune[flash4]"` and, with a CUDA 13 build of torch,
`pip install "nvidia-cutlass-dsl[cu13]"`. The first call at each shape compiles its kernels
(about 5 s). Checked with flash-attn-4 4.0.0b36 and nvidia-cutlass-dsl 4.8.1 on torch 2.11
(CUDA 13), H100. torch's own switch (`torch.nn.attention.activate_flash_attention_impl("FA4")`)
expects the package's private forward to return two values (this release returns five) and fails,
so efftune calls the kernels itself, here and nowhere else.
"""
from __future__ import annotations

import functools
import importlib

import torch
from torch.utils.flop_counter import register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

KERNEL_MODULE = "flash_attn.cute.interface"
HEAD_DIMS = (64, 96, 128)  # head sizes with tuned Hopper kernels; 64 and 128 checked on an H100


@functools.cache
def _import_error() -> str | None:
    try:
        importlib.import_module(KERNEL_MODULE)
    except Exception as e:  # ImportError, or the DSL's native libraries failing to load
        return f"{type(e).__name__}: {e}"
    return None


def unavailable_reason(device: torch.device) -> str | None:
    """Why flash4 cannot run on `device` (None: it can)."""
    if device.type != "cuda":
        return f"needs a CUDA GPU (the model is on {device.type})"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in (9, 10):
        return f"needs a Hopper or Blackwell GPU, compute capability 9.x or 10.x (this one is {major}.{minor})"
    error = _import_error()
    if error:
        return ("needs the flash-attn-4 package: pip install flash-attn-4 \"nvidia-cutlass-dsl[cu13]\" "
                f"(importing {KERNEL_MODULE} failed: {error})")
    return None


def supports(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Whether these [batch, heads, tokens, head_dim] inputs are ones the kernels take."""
    return (query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and key.dtype == query.dtype
            and query.shape[-1] in HEAD_DIMS and key.shape[-1] == query.shape[-1]
            and query.shape[1] % key.shape[1] == 0)


def _kernels():
    """The package's forward and backward entry points (tests put reference versions here)."""
    module = importlib.import_module(KERNEL_MODULE)
    return module._flash_attn_fwd, module._flash_attn_bwd


@torch.library.custom_op("efftune::flash4_causal", mutates_args=())
def flash4_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, T, H, D], k/v [B, T, H_kv, D] -> out [B, T, H, D], log-sum-exp [B, H, T] (fp32)."""
    forward, _ = _kernels()
    out, lse = forward(q, k, v, softmax_scale=scale, causal=True, return_lse=True)[:2]
    return out, lse


@flash4_causal.register_fake
def _(q, k, v, scale):
    b, t, h, _ = q.shape
    return q.new_empty(b, t, h, v.shape[-1]), q.new_empty(b, h, t, dtype=torch.float32)


@torch.library.custom_op("efftune::flash4_causal_backward", mutates_args=())
def flash4_causal_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           out: torch.Tensor, lse: torch.Tensor,
                           scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, backward = _kernels()
    # contiguous inputs (no copies on the usual path) make the kernels' gradients contiguous too,
    # the strides the fake below promises
    q, k, v, out, dout = (t.contiguous() for t in (q, k, v, out, dout))
    dq, dk, dv = backward(q, k, v, out, dout, lse, scale, True)[:3]
    return dq, dk, dv


@flash4_causal_backward.register_fake
def _(dout, q, k, v, out, lse, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# Flop counts as torch counts SDPA's (whole score matrix, causal or not), so FlopCounterMode and
# torch.compile's memory-budget search weigh this op as they would SDPA's.
def _bhtd(t: torch.Tensor) -> tuple[int, ...]:
    b, t_, h, d = t.shape
    return (b, h, t_, d)


@register_flop_formula(torch.ops.efftune.flash4_causal, get_raw=True)
def _(q, k, v, scale, out_val=None, **_):
    return sdpa_flop_count(_bhtd(q), _bhtd(k), _bhtd(v))


@register_flop_formula(torch.ops.efftune.flash4_causal_backward, get_raw=True)
def _(dout, q, k, v, out, lse, scale, out_val=None, **_):
    return sdpa_backward_flop_count(_bhtd(dout), _bhtd(q), _bhtd(k), _bhtd(v))


def _save(ctx, inputs, output) -> None:
    q, k, v, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = flash4_causal_backward(dout, q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


flash4_causal.register_autograd(_backward, setup_context=_save)


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of [batch, heads, tokens, head_dim] inputs (transformers' layout), returned
    as [batch, tokens, heads, head_dim], the layout transformers' attention functions return."""
    out, _ = flash4_causal(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), float(scale))
    return out

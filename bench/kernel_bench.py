"""Kernel microbenchmarks behind a LoRA step: SDPA attention backends and the step's GEMM shapes.

For one model shape (bench/throughput.py's SHAPES) and sequence length, times on the GPU:
  attention  causal GQA `scaled_dot_product_attention`, forward + backward, per SDPA backend, and
             FlashAttention-4 through efftune's op (efftune.forward.flash4) where the package is installed
  gemm       every base projection's forward (x @ W^T) and input-gradient (dy @ W) GEMM, plus the
             fused forms a model could use instead (q/k/v in one, gate/up in one), in bf16
  lora-add   ways to add a rank-16 LoRA term to those GEMMs: the frozen GEMM accumulating onto the
             LoRA product (beta = 1, what efftune's lora_linears does), the LoRA product
             accumulating onto the frozen GEMM's output, or both apart plus an add; and the sibling
             groups (q/k/v, gate/up) one GEMM per member, as efftune runs them, against their
             weights stored as one matrix
  swiglu     the fused SwiGLU-with-LoRA kernels (efftune.methods.lora.swiglu_triton) at the MLP's shape:
             each pass's bandwidth over a sweep of tile sizes, and a compiled MLP forward + backward
             with the fused op against the lora_linears ops with SwiGLU left to Inductor
             (`--shipped`: the shipped settings only, median of 7 repeats)
  head       the chunked LM-head loss's softmax work on one 1,024-token chunk of logits (log-prob and
             onehot − softmax in bf16): the Triton kernels (efftune.forward.head_triton) against the
             compiled PyTorch version, with the bandwidth each reaches counting one read and one write
  dequant    making a quantised frozen weight dense for one GEMM (efftune.quantize: NF4, int8), at each
             projection's shape: the eager PyTorch dequantisation, its elementwise work compiled
             (efftune.quantize.linear.compiled_on_gpu), the one the fused ops run on a GPU (NF4: the
             Triton kernel, efftune.quantize.nf4_triton; int8: the compiled one), and the
             projection's forward GEMM it precedes, with the bandwidth each dequantisation reaches
             (packed tensors read once, the bf16 weight written once) and its time as a fraction of
             the GEMM's: what `--quantize` costs a step
  adamw8bit  one AdamW step with 8-bit moments (train.optimizer adamw8bit) of an fp32 weight of each
             projection's shape: torchao's compiled update (what efftune runs) against bitsandbytes'
             blockwise kernel, with how far the latter's codes, scales and weights land from torchao's
             and the bandwidth each reaches counting the 16 bytes a weight the update must move (fp32
             weight read and written, fp32 gradient read, two code bytes read and written); beside
             them torchao's compiled update with fp8 moments (train.optimizer adamwfp8, the same 16
             bytes; its weights' distance from the 8-bit step's) and torch's fused fp32 AdamW (28 bytes)
  floor      the work no bf16 LoRA implementation can skip, one training step's worth back to back
             (frozen GEMMs both ways, cuDNN attention, LM head): time and, with NVML, joules per step,
             to set against a real step's (bench/throughput.py prints those too); not in the default run
Prints one JSON line per measurement with its TFLOP/s (GB/s for the SwiGLU passes).

    PYTHONPATH=. python bench/kernel_bench.py --shape llama3-8b
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.throughput import SHAPES  # noqa: E402


def cuda_time_ms(fn, iters: int = 20, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def attention(cfg: dict, seq: int) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    dim = cfg["hidden_size"] // heads
    # [batch, heads, tokens, dim] views of [batch, tokens, heads, dim] memory: the layout transformers
    # passes (its projections write tokens-major); flash4 takes that memory as it is
    q = torch.randn(1, seq, heads, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    k = torch.randn(1, seq, kv_heads, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    v = torch.randn(1, seq, kv_heads, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    grad = torch.randn(1, seq, heads, dim, device="cuda", dtype=torch.bfloat16)  # o_proj's input gradient
    flops = 4 * seq * seq * dim * heads / 2 * 3.5  # causal; backward ~2.5x forward
    rows = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        def fwd_bwd():
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            out.backward(grad.transpose(1, 2))
        try:
            ms = cuda_time_ms(fwd_bwd)
        except RuntimeError as e:
            rows.append(dict(kind="attention", backend=backend.name, error=str(e)[:200]))
            continue
        rows.append(dict(kind="attention", backend=backend.name, ms=round(ms, 3), tflops=round(flops / ms / 1e9, 1)))
    from efftune.forward import flash4
    reason = flash4.unavailable_reason(q.device)
    if reason:
        return rows + [dict(kind="attention", backend="flash4", error=reason[:200])]

    def flash4_fwd_bwd():
        flash4.causal_attention(q, k, v, dim ** -0.5).backward(grad)
    ms = cuda_time_ms(flash4_fwd_bwd)
    rows.append(dict(kind="attention", backend="flash4", ms=round(ms, 3), tflops=round(flops / ms / 1e9, 1)))
    return rows


def gemms(cfg: dict, seq: int) -> list[dict]:
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    projections = {"q/o": (h, h), "k/v": (h, kv), "gate/up": (h, inter), "down": (inter, h),
                   "qkv fused": (h, h + 2 * kv), "gate+up fused": (h, 2 * inter)}
    rows = []
    for name, (fan_in, fan_out) in projections.items():
        x = torch.randn(seq, fan_in, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(fan_out, fan_in, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(seq, fan_out, device="cuda", dtype=torch.bfloat16)
        flops = 2 * seq * fan_in * fan_out
        for direction, fn in (("forward x@W^T", lambda: x @ w.T), ("input grad dy@W", lambda: dy @ w)):
            ms = cuda_time_ms(fn)
            rows.append(dict(kind="gemm", projection=name, direction=direction, m=seq, k=fan_in if "forward" in direction
                             else fan_out, n=fan_out if "forward" in direction else fan_in, ms=round(ms, 3),
                             tflops=round(flops / ms / 1e9, 1)))
    return rows


def lora_adds(cfg: dict, seq: int, r: int = 16) -> list[dict]:
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    rows = []
    for name, (fan_in, fan_out) in {"q/o": (h, h), "k/v": (h, kv), "gate/up": (h, inter), "down": (inter, h)}.items():
        bf = dict(device="cuda", dtype=torch.bfloat16)
        x, w = torch.randn(seq, fan_in, **bf), torch.randn(fan_out, fan_in, **bf)
        z, b = torch.randn(seq, r, **bf), torch.randn(fan_out, r, **bf)  # forward: z = A x, B
        dy, dz, a = torch.randn(seq, fan_out, **bf), torch.randn(seq, r, **bf), torch.randn(r, fan_in, **bf)
        ways = {
            ("forward", "frozen GEMM onto the LoRA product"): lambda: (z @ b.T).addmm_(x, w.T),
            ("forward", "LoRA product onto the frozen GEMM"): lambda: (x @ w.T).addmm_(z, b.T),
            ("forward", "apart, then add"): lambda: x @ w.T + z @ b.T,
            ("forward", "frozen GEMM alone"): lambda: x @ w.T,
            ("input grad", "frozen GEMM onto the LoRA product"): lambda: (dz @ a).addmm_(dy, w),
            ("input grad", "LoRA product onto the frozen GEMM"): lambda: (dy @ w).addmm_(dz, a),
            ("input grad", "apart, then add"): lambda: dy @ w + dz @ a,
            ("input grad", "frozen GEMM alone"): lambda: dy @ w,
        }
        for (direction, way), fn in ways.items():
            rows.append(dict(kind="lora-add", projection=name, direction=direction, way=way,
                             ms=round(cuda_time_ms(fn, iters=50), 4)))
    return rows + packed_groups(cfg, seq, r)


def packed_groups(cfg: dict, seq: int, r: int = 16) -> list[dict]:
    """Siblings that read one input (q/k/v; gate/up) as efftune runs them, one frozen GEMM per member
    accumulating onto the LoRA term, against their weights stored as one matrix: one GEMM each way
    (the LoRA products against a block-diagonal B), and the copy that joins the members' output
    gradients for it when they arrive apart. Both ways run lora_ops' own functions."""
    from efftune.methods.lora.ops import linears_input_grad, lora_output
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    bf = dict(device="cuda", dtype=torch.bfloat16)
    rows = []
    for name, outs, lora_first in (("q/k/v", (h, kv, kv), True), ("gate/up", (inter, inter), False)):
        x, a = torch.randn(seq, h, **bf), torch.randn(r * len(outs), h, **bf)
        ws = [torch.randn(o, h, **bf) for o in outs]
        bs = [torch.randn(o, r, **bf) for o in outs]
        dys = [torch.randn(seq, o, **bf) for o in outs]
        z, dz = torch.randn(seq, r * len(outs), **bf), torch.randn(seq, r * len(outs), **bf)
        w_cat, b_diag, dy_cat = torch.cat(ws), torch.block_diag(*bs), torch.cat(dys, 1)

        def forward_apart():
            if lora_first:  # lora_linears: each member's frozen GEMM onto its LoRA product
                return [lora_output(x, w, None, z[:, i * r:(i + 1) * r], b) for i, (w, b) in enumerate(zip(ws, bs))]
            return [x @ w.T for w in ws]  # swiglu_lora: plain GEMMs, the updates join in the Triton pass

        ways = {("forward", "apart (efftune now)"): forward_apart,
                ("forward", "one matrix"): (lambda: lora_output(x, w_cat, None, z, b_diag)) if lora_first
                else (lambda: x @ w_cat.T),
                ("input grad", "apart (efftune now)"): lambda: linears_input_grad(dz, a, dys, ws),
                ("input grad", "one matrix"): lambda: linears_input_grad(dz, a, [dy_cat], [w_cat]),
                ("input grad", "joining the output gradients"): lambda: torch.cat(dys, 1)}
        for (direction, way), fn in ways.items():
            rows.append(dict(kind="packed", group=name, direction=direction, way=way,
                             ms=round(cuda_time_ms(fn, iters=50), 4)))
    return rows


SHIPPED = False  # --shipped: only the shipped tile settings, timed in repeats (before/after comparisons)


def _repeated_ms(fn, repeats: int = 7, iters: int = 50) -> dict:
    """Median and range of `repeats` timings of `iters` calls each (ms per call)."""
    times = sorted(cuda_time_ms(fn, iters=iters, warmup=5) for _ in range(repeats))
    return dict(ms=round(times[len(times) // 2], 4), ms_min=round(times[0], 4), ms_max=round(times[-1], 4))


def swiglu(cfg: dict, seq: int, r: int = 16) -> list[dict]:
    from efftune.methods.lora import swiglu_triton
    from efftune.methods.lora.ops import fused_lora_linears
    from efftune.methods.lora.swiglu import SwigluLora
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    bf = dict(device="cuda", dtype=torch.bfloat16)
    from efftune.methods.lora.packing import aligned_rows
    gu, dh = aligned_rows(seq, 2 * f + 2 * r, torch.empty(0, **bf)), torch.randn(seq, f, **bf)  # [g0 | u0 | z]
    gu.normal_()
    ad, dzd = torch.randn(r, f, **bf), torch.randn(seq, r, **bf)
    bg, bu = torch.randn(f, r, **bf), torch.randn(f, r, **bf)
    rows = []
    if SHIPPED:
        for part, fn, tensors, c in (
                ("forward", lambda: swiglu_triton.forward(gu, bg, bu, ad), 3, swiglu_triton.FORWARD_CONFIG),
                ("backward", lambda: swiglu_triton.backward(dh, dzd, ad, gu, bg, bu), 6, swiglu_triton.BACKWARD_CONFIG)):
            t = _repeated_ms(fn)
            rows.append(dict(kind="swiglu", part=part, config=c, **t, gb_s=round(tensors * seq * f * 2 / t["ms"] / 1e6, 1)))
        return rows
    sweep = [dict(num_warps=w, bt=bt, bo=bo, cols=co, num_stages=st) for w in (4, 8)
             for bt, bo in ((32, 64), (64, 64), (32, 128), (128, 64)) for co in (256, 512, 1024) for st in (1, 3)
             if (w, bt, bo) not in ((8, 32, 64), (8, 32, 128))]
    # bytes: forward reads g0, u0, writes h; backward reads dh, g0, u0, writes dg, du, h
    for part, fn, tensors, configs in (
            ("forward", lambda c: swiglu_triton.forward(gu, bg, bu, ad, **c), 3, sweep),
            ("backward", lambda c: swiglu_triton.backward(dh, dzd, ad, gu, bg, bu, **c), 6, sweep)):
        for c in configs:
            try:
                ms = cuda_time_ms(lambda: fn(c), iters=10, warmup=2)
            except Exception as e:  # a tile size the chip cannot hold (shared memory, registers)
                rows.append(dict(kind="swiglu", part=part, config=c, error=str(e)[:120]))
                continue
            rows.append(dict(kind="swiglu", part=part, config=c, ms=round(ms, 4),
                             gb_s=round(tensors * seq * f * 2 / ms / 1e6, 1)))
    # the compiled MLP, forward + backward: fused op vs lora_linears ops with SwiGLU to Inductor
    x = torch.randn(seq, h, **bf, requires_grad=True)
    w_g, w_u, w_d = torch.randn(f, h, **bf) * 0.02, torch.randn(f, h, **bf) * 0.02, torch.randn(h, f, **bf) * 0.02
    a_gu, a_d = torch.randn(2 * r, h, **bf, requires_grad=True), torch.randn(r, f, **bf, requires_grad=True)
    b_g, b_u, b_d = (torch.randn(n, r, **bf, requires_grad=True) for n in (f, f, h))

    def fused():  # w_g and w_u apart (not packed): the op multiplies them one by one
        return SwigluLora.apply(x, a_gu, a_d, w_g, w_u, w_d, b_g, b_u, b_d, None)

    def apart():
        g, u = fused_lora_linears(x, [w_g, w_u], [None, None], a_gu, [b_g, b_u])
        return fused_lora_linears(F.silu(g) * u, [w_d], [None], a_d, [b_d])[0]

    grad = torch.randn(seq, h, **bf)
    for name, fn in (("fused swiglu_lora", fused), ("lora_linears + Inductor SwiGLU", apart)):
        compiled = torch.compile(fn)
        ms = cuda_time_ms(lambda: compiled().backward(grad), iters=20)
        rows.append(dict(kind="swiglu", part="compiled MLP forward + backward", way=name, ms=round(ms, 4)))
    return rows


def head(cfg: dict, seq: int, chunk: int = 1024) -> list[dict]:
    from efftune.forward import head_triton, logprobs
    logits = torch.randn(chunk, cfg["vocab_size"], device="cuda", dtype=torch.bfloat16) * 3
    targets = torch.randint(0, cfg["vocab_size"], (chunk,), device="cuda")
    compiled = logprobs._fused("logprob_grad")
    # each call gets a fresh copy, as the real chunk is a temporary the gradient may overwrite;
    # the copy's time is measured once and taken off every way's
    copy = cuda_time_ms(lambda: logits.clone(), iters=20)
    rows = []
    if SHIPPED:
        t = _repeated_ms(lambda: head_triton.logprob_and_grad(logits.clone(), targets, torch.bfloat16))
        ms = t["ms"] - copy
        return [dict(kind="head", way=f"triton {head_triton.CONFIG}", chunk=chunk, **t, copy_ms=round(copy, 4),
                     gb_s=round(2 * logits.numel() * 2 / ms / 1e6, 1))]
    sweep = [dict(block=b, max_segments=sg, num_warps=w) for b in (1024, 2048, 4096) for sg in (4, 8, 16)
             for w in (4, 8, 16) if b // (32 * w) >= 4]
    ways = [(f"triton {c}", lambda *a, c=c: head_triton.logprob_and_grad(*a, **c)) for c in sweep]
    for way, fn in ways + [("torch.compile", compiled)]:
        ms = cuda_time_ms(lambda: fn(logits.clone(), targets, torch.bfloat16), iters=20) - copy
        rows.append(dict(kind="head", way=way, chunk=chunk, ms=round(ms, 4),
                         gb_s=round(2 * logits.numel() * 2 / ms / 1e6, 1)))
    return rows


def dequant(cfg: dict, seq: int) -> list[dict]:
    from efftune.quantize import int8, linear, nf4
    from efftune.quantize.linear import DENSE, Int8Linear, Nf4Linear, compiled_on_gpu
    # the eager functions without the compiled decode that DENSE (what the ops call) takes on a GPU
    eager_of = {"nf4": lambda t, dtype: nf4.dequantize(*t[:4], dtype, t[4]),
                "int8": lambda t, dtype: int8.dequantize(*t, dtype)}
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    rows = []
    for name, (fan_in, fan_out) in {"q/o": (h, h), "k/v": (h, kv), "gate/up": (h, inter), "down": (inter, h)}.items():
        dense = torch.nn.Linear(fan_in, fan_out, bias=False, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(seq, fan_in, device="cuda", dtype=torch.bfloat16)
        gemm = cuda_time_ms(lambda: x @ dense.weight.T)
        for layer in (Nf4Linear(dense), Int8Linear(dense)):
            tensors = tuple(layer.quantized())
            packed = sum(t.numel() * t.element_size() for t in tensors)
            eager, shipped = eager_of[layer.KIND], DENSE[layer.KIND]
            assert torch.equal(shipped(tensors, torch.bfloat16), eager(tensors, torch.bfloat16))
            ways = [("eager", eager), ("shipped (compiled)", shipped)]
            if layer.KIND == "nf4":  # the shipped one is the Triton kernel (nf4_triton); the compiled one beside it
                compiled = compiled_on_gpu(nf4.decode_scaled, x.device)
                ways[1:] = [("compiled", lambda t, dtype: nf4.dequantize(*t[:4], dtype, t[4], decode=compiled)),
                            ("shipped (" + linear.nf4_kernel(x.device, torch.bfloat16).__module__ + ")", shipped)]
            for way, fn in ways:
                ms = cuda_time_ms(lambda: fn(tensors, torch.bfloat16))
                rows.append(dict(kind="dequant", format=layer.KIND, way=way, projection=name, out=fan_out,
                                 inp=fan_in, ms=round(ms, 4), gemm_ms=round(gemm, 4),
                                 of_gemm=round(ms / gemm, 3),
                                 gb_s=round((packed + fan_out * fan_in * 2) / ms / 1e6, 1)))
    return rows


def adamw8bit(cfg: dict, seq: int) -> list[dict]:
    from torchao.optim.adam import single_param_adam
    from torchao.optim.subclass_8bit import OptimState8bit
    from torchao.optim.subclass_fp8 import OptimStateFp8

    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    compiled = torch.compile(single_param_adam, fullgraph=True, dynamic=False)
    lr, wd, step = 1e-4, 0.01, torch.tensor(3.0)
    ways = {"torchao compiled": lambda p, g, m, v: compiled(p, g, step, m, v, None, torch.tensor(lr), 0.9, 0.999, wd,
                                                            1e-8, True, False)}
    try:
        import bitsandbytes.functional as bnbf
        ways["bitsandbytes blockwise kernel"] = lambda p, g, m, v: bnbf.optimizer_update_8bit_blockwise(
            "adam", g, p, m.codes, v.codes, 0.9, 0.999, 0.0, 0.0, 1e-8, 3, lr, m.qmap, v.qmap, m.scale, v.scale,
            weight_decay=wd)
    except ImportError:
        pass
    fp8_way, fused_way = "torchao compiled, fp8 moments (adamwfp8)", "torch fused AdamW, fp32 moments"
    ways[fp8_way] = ways["torchao compiled"]
    fused = {}  # weight's address -> torch's fused AdamW over it with the given moments, built once

    def fused_step(p, g, m, v):
        if p.data_ptr() not in fused:
            param = torch.nn.Parameter(p)  # p's own storage: the step moves the caller's weight
            param.grad = g
            opt = torch.optim.AdamW([param], lr=lr, weight_decay=wd, fused=True)
            opt.state[param] = {"step": step.clone().cuda(), "exp_avg": m, "exp_avg_sq": v}
            fused[p.data_ptr()] = opt
        fused[p.data_ptr()].step()
    ways[fused_way] = fused_step
    rows = []
    for name, shape in {"q/o": (h, h), "k/v": (kv, h), "gate/up": (inter, h), "down": (h, inter)}.items():
        torch.manual_seed(0)
        p0 = torch.randn(shape, device="cuda")
        grad = torch.randn(shape, device="cuda") * 1e-2

        def fresh(way="torchao compiled"):  # a weight and moments as a few steps leave them, the same for every way
            if way == fp8_way:
                m, v = (OptimStateFp8.zeros(shape, 256, "cuda") for _ in range(2))
            elif way == fused_way:
                m, v = (torch.zeros(shape, device="cuda") for _ in range(2))
            else:
                m = OptimState8bit.zeros(shape, signed=True, block_size=256, device="cuda")
                v = OptimState8bit.zeros(shape, signed=False, block_size=256, device="cuda")
            torch.manual_seed(1)
            m.copy_(torch.randn(shape, device="cuda") * 1e-3)
            v.copy_(torch.rand(shape, device="cuda") * 1e-6)
            return p0.clone(), m, v
        p_ref, m_ref, v_ref = fresh()
        ways["torchao compiled"](p_ref, grad, m_ref, v_ref)
        moved = (p_ref - p0).abs().max()
        for way, fn in ways.items():
            p, m, v = fresh(way)
            fn(p, grad, m, v)  # one step from the same state: how far from torchao's
            differs = {"weights vs its move": float((p - p_ref).abs().max() / moved)}
            if way not in (fp8_way, fused_way):
                differs.update({"m codes": float((m.codes != m_ref.codes).float().mean()),
                                "v codes": float((v.codes != v_ref.codes).float().mean()),
                                "scales rel": float(max(((m.scale - m_ref.scale).abs() / m_ref.scale).max(),
                                                        ((v.scale - v_ref.scale).abs() / v_ref.scale).max()))})
            ms = cuda_time_ms(lambda: fn(p, grad, m, v))
            moved_bytes = 28 if way == fused_way else 16
            rows.append(dict(kind="adamw8bit", way=way, projection=name, weight_shape=list(shape), ms=round(ms, 4),
                             bytes_per_weight=moved_bytes, gb_s=round(moved_bytes * p.numel() / ms / 1e6, 1),
                             vs_torchao=differs))
        fused.clear()
    return rows


def floor(cfg: dict, seq: int, repeats: int = 15) -> list[dict]:
    """The work no LoRA implementation can skip in bf16, run back to back as a training step runs it:
    every frozen projection's forward and input-gradient GEMM in every layer (none for the first
    layer's q/k/v, whose input needs no gradient), causal GQA attention forward and backward (cuDNN),
    and the LM head both ways in 1,024-token chunks. Time and, with NVML, the GPU's energy per step:
    what is left of a real step's time and joules is what LoRA, norms, RoPE, the loss and the
    optimizer cost. 15 steps (over 3 s at 8B): the power limiter lets the first second run above the
    limit, so fewer steps read too fast and too hot."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from bench.throughput import EnergyMeter
    h, inter, layers, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    dim, bf = h // heads, dict(device="cuda", dtype=torch.bfloat16)
    projections = [(h, h), (h, dim * kv_heads), (h, dim * kv_heads), (h, h), (h, inter), (h, inter), (inter, h)]
    weights = [[torch.randn(o, i, **bf) * 0.02 for i, o in projections] for _ in range(layers)]
    head = torch.randn(vocab, h, **bf) * 0.02
    acts = {n: torch.randn(seq, n, **bf) for n in {n for p in projections for n in p}}
    q = torch.randn(1, heads, seq, dim, **bf, requires_grad=True)
    k, v = (torch.randn(1, kv_heads, seq, dim, **bf, requires_grad=True) for _ in range(2))
    grad_o, chunk = torch.randn_like(q), 1024

    def step() -> int:
        """One step's unavoidable work; returns its GEMM FLOPs."""
        flops = 0
        for layer, ws in enumerate(weights):
            for slot, ((fan_in, fan_out), w) in enumerate(zip(projections, ws)):
                acts[fan_in] @ w.t()
                flops += 2 * seq * fan_in * fan_out
                if layer or slot >= 3:  # the first layer's q/k/v input gradient is never needed
                    acts[fan_out] @ w
                    flops += 2 * seq * fan_in * fan_out
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            torch.autograd.grad(out, (q, k, v), grad_o)
        for i in range(0, seq, chunk):
            (acts[h][i:i + chunk] @ head.t()) @ head
            flops += 4 * chunk * h * vocab
        return flops

    step()  # warm-up (cuDNN plans, cuBLAS heuristics)
    torch.cuda.synchronize()
    meter, start = EnergyMeter(torch.device("cuda")), time.perf_counter()
    for _ in range(repeats):
        flops = step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return [dict(kind="floor", what="frozen GEMMs + attention + LM head, one step", ms=round(seconds / repeats * 1e3, 1),
                 gemm_tflop=round(flops / 1e12, 1), **meter.read(seconds, repeats))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--seq", type=int, default=4096)
    kinds = {"attention": attention, "gemm": gemms, "lora-add": lora_adds, "swiglu": swiglu, "head": head,
             "dequant": dequant, "adamw8bit": adamw8bit, "floor": floor}
    ap.add_argument("--only", choices=list(kinds), help="one kind of measurement")
    ap.add_argument("--shipped", action="store_true",
                    help="swiglu and head: only the shipped tile settings, median of 7 repeats of 50 calls "
                         "(with their range), for comparing two versions of a kernel")
    args = ap.parse_args()
    global SHIPPED
    SHIPPED = args.shipped
    cfg = SHAPES[args.shape]
    # floor holds a whole model's weights; adamw8bit needs torchao
    chosen = [args.only] if args.only else [k for k in kinds if k not in ("floor", "adamw8bit")]
    for row in (row for kind in chosen for row in kinds[kind](cfg, args.seq)):
        print(json.dumps(dict(shape=args.shape, seq=args.seq, **row)), flush=True)


if __name__ == "__main__":
    main()

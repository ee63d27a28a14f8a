"""Kernel microbenchmarks behind a LoRA step: SDPA attention backends and the step's GEMM shapes.

For one model shape (bench/throughput.py's SHAPES) and sequence length, times on the GPU:
  attention  causal GQA `scaled_dot_product_attention`, forward + backward, per SDPA backend
  gemm       every base projection's forward (x @ W^T) and input-gradient (dy @ W) GEMM, plus the
             fused forms a model could use instead (q/k/v in one, gate/up in one), in bf16
  lora-add   ways to add a rank-16 LoRA term to those GEMMs: the frozen GEMM accumulating onto the
             LoRA product (beta = 1, what efftune's lora_linears does), the LoRA product
             accumulating onto the frozen GEMM's output, or both apart plus an add
Prints one JSON line per measurement with its TFLOP/s.

    PYTHONPATH=. python bench/kernels.py --shape llama3-8b
"""
from __future__ import annotations

import argparse
import json
import os
import sys

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
    q = torch.randn(1, heads, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, kv_heads, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    grad = torch.randn_like(q)
    flops = 4 * seq * seq * dim * heads / 2 * 3.5  # causal; backward ~2.5x forward
    rows = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        def fwd_bwd():
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            out.backward(grad)
        try:
            ms = cuda_time_ms(fwd_bwd)
        except RuntimeError as e:
            rows.append(dict(kind="attention", backend=backend.name, error=str(e)[:200]))
            continue
        rows.append(dict(kind="attention", backend=backend.name, ms=round(ms, 3), tflops=round(flops / ms / 1e9, 1)))
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
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--only", choices=("attention", "gemm", "lora-add"), help="one kind of measurement")
    args = ap.parse_args()
    cfg = SHAPES[args.shape]
    kinds = {"attention": attention, "gemm": gemms, "lora-add": lora_adds}
    for row in (row for kind, run in kinds.items() if args.only in (None, kind) for row in run(cfg, args.seq)):
        print(json.dumps(dict(shape=args.shape, seq=args.seq, **row)), flush=True)


if __name__ == "__main__":
    main()

"""Where a LoRA training step spends its GPU time: a profile of one step, grouped by op class.

Uses bench/throughput.py's model and cases (random-init Llama shape, bf16 autocast, LoRA r=16 on all
linear layers, seq 4096, batch 1), warms up, then profiles a few steps with torch.profiler and sums
CUDA kernel time per op class (matmul, attention, elementwise/norm, loss, optimizer, copies).

    PYTHONPATH=. python bench/profile_step.py --shape llama3-8b --case efftune
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.throughput import SHAPES, attach, build_model, loss_fn, make_optimizer  # noqa: E402

CLASSES = [  # first match wins; patterns are on CUDA kernel names
    ("attention", r"flash|fmha|attention|sdpa|efficient_attention"),
    ("matmul", r"gemm|cutlass|sm90|sm80|xmma|matmul|ampere|hopper|cublas|triton_tem"),
    ("fused (inductor)", r"^triton_(poi|red|per)"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("loss/softmax", r"softmax|logsumexp|log_softmax|cross_entropy|nll"),
    ("reduce", r"reduce|norm|sum|mean"),
    ("copy/cast", r"copy|cast|convert|cat|index|gather|scatter|fill"),
    ("elementwise", r"elementwise|vectorized|unrolled|silu|mul|add|pow|rsqrt|neg"),
]


def op_class(name: str) -> str:
    lowered = name.lower()
    return next((cls for cls, pattern in CLASSES if re.search(pattern, lowered)), "other")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--case", default="efftune")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    device = torch.device("cuda")
    model = attach(build_model(args.shape, device), args.case)
    opt = make_optimizer(model, args.case)
    ids = torch.randint(0, SHAPES[args.shape]["vocab_size"], (1, args.seq), device=device)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model, args.case, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    print(json.dumps({"shape": args.shape, "case": args.case, "seq": args.seq, **profile(step, args.steps)},
                     indent=1))


def profile(step, steps: int, warmup: int = 3, top_n: int = 12) -> dict:
    """Run `step` `warmup` times, then profile `steps` calls: CUDA kernel time per op class and
    the `top_n` kernels, in ms per step."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1000 / steps  # vs GPU time: how long the GPU sat idle
    totals: dict[str, float] = {}
    top: list[tuple[float, str]] = []
    for event in prof.key_averages():
        t = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if t <= 0:
            continue
        totals[op_class(event.key)] = totals.get(op_class(event.key), 0.0) + t
        top.append((t, event.key))
    all_us = sum(totals.values())
    table = {cls: {"ms_per_step": round(us / 1000 / steps, 2), "share": round(us / all_us, 3)}
             for cls, us in sorted(totals.items(), key=lambda kv: -kv[1])}
    kernels = [{"kernel": k[:90], "ms_per_step": round(t / 1000 / steps, 2)} for t, k in sorted(top)[-top_n:][::-1]]
    return {"gpu_ms_per_step": round(all_us / 1000 / steps, 1), "wall_ms_per_step": round(wall_ms, 1),
            "by_class": table, "top_kernels": kernels}

if __name__ == "__main__":
    main()

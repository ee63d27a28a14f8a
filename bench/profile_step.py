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
from bench.throughput import SHAPES, attach, build_model, loss_fn, make_optimizer, train_step  # noqa: E402

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
    ap.add_argument("--top", type=int, default=12, help="list this many of the slowest kernels")
    ap.add_argument("--syncs", action="store_true",
                    help="also list the host-device synchronisations of one step, with where they happen")
    ap.add_argument("--lead", action="store_true",
                    help="also measure, unprofiled, how far the CPU runs ahead of the GPU at each phase of a step")
    ap.add_argument("--by-shape", action="store_true",
                    help="also list matmul time per operand shapes, with the TFLOP/s each reached")
    ap.add_argument("--layers", type=int, default=None,
                    help="the shape with only this many decoder layers (bench/throughput.py --layers)")
    args = ap.parse_args()
    import bench.throughput
    bench.throughput.LAYERS = args.layers
    device = torch.device("cuda")
    model = attach(build_model(args.shape, device), args.case)
    opt = make_optimizer(model, args.case)
    ids = torch.randint(0, SHAPES[args.shape]["vocab_size"], (1, args.seq), device=device)
    step = train_step(lambda: loss_fn(model, args.case, ids), opt, device, cuda_graphs=args.case.endswith("-cg"))
    from efftune.train.compile import partitioner
    with partitioner():  # what train() compiles under
        result = profile(step, args.steps, top_n=args.top, by_shape=args.by_shape)
        if args.syncs:
            result["host_syncs"] = host_syncs(step)
        if args.lead:
            result["host_lead"] = host_lead(lambda mark: train_step(
                lambda: loss_fn(model, args.case, ids), opt, device, args.case.endswith("-cg"), mark))
    print(json.dumps({"shape": args.shape, "layers": args.layers, "case": args.case, "seq": args.seq, **result},
                     indent=1))


def host_lead(make_step, steps: int = 5) -> dict:
    """How far the CPU runs ahead of the GPU at each phase boundary of a step (unprofiled), in ms.

    `make_step(mark)` gives the benchmark's step with `mark(phase)` called at each boundary; there
    the CPU records an event and notes its own clock, and after the step the event's GPU time is
    compared with it. lead = GPU time − CPU time: positive means work was queued ahead when the
    CPU got there. Near zero or below means the GPU had drained its queue and waited for the CPU.
    Also the wall-clock step and each phase's CPU time."""
    marks = ("forward", "backward", "optimizer")
    rows = []
    for _ in range(steps):
        cpu, events = [], []

        def mark(phase: str) -> None:
            cpu.append(time.perf_counter() - t0)
            events.append(torch.cuda.Event(enable_timing=True))
            events[-1].record()

        step = make_step(mark)
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        gpu = [start.elapsed_time(e) for e in events]
        rows.append((wall * 1e3, [c * 1e3 for c in cpu], gpu))
    mean = lambda xs: round(sum(xs) / len(xs), 2)
    return {"wall_ms": mean([r[0] for r in rows]),
            **{f"{m}_cpu_ms": mean([r[1][i] for r in rows]) for i, m in enumerate(marks)},
            **{f"{m}_gpu_ms": mean([r[2][i] for r in rows]) for i, m in enumerate(marks)},
            **{f"{m}_lead_ms": mean([r[2][i] - r[1][i] for r in rows]) for i, m in enumerate(marks)}}


def host_syncs(step) -> list[dict]:
    """Run one step with CUDA sync debugging on: each synchronising call, with the innermost
    frames of its Python stack (a sync stalls the CPU until the GPU has drained its queue)."""
    import traceback
    import warnings
    found: dict[str, dict] = {}

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f"{f.filename.split('/site-packages/')[-1]}:{f.lineno} {f.name}" for f in traceback.extract_stack()[:-1]]
        key = " < ".join(frames[-4:][::-1])
        found.setdefault(key, {"count": 0, "message": str(message)[:120], "stack": key})["count"] += 1

    with warnings.catch_warnings():  # restores the filters and showwarning on exit
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sorted(found.values(), key=lambda r: -r["count"])


MATMULS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::_scaled_mm")


def matmul_shapes(prof, steps: int, top_n: int = 30) -> list[dict]:
    """Device time of each matmul op per operand shapes (needs record_shapes), slowest first,
    with the TFLOP/s it reached: which GEMMs are slow for their work, and the LoRA factors' share."""
    rows = []
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key not in MATMULS or not event.input_shapes:
            continue
        t_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        # operands: addmm(_)'s come after its bias (its self); mm.out / bmm.out list the output last
        a, b = event.input_shapes[1:3] if event.key.startswith("aten::addmm") else event.input_shapes[:2]
        if t_us <= 0 or len(a) < 2 or len(b) < 2:
            continue
        flops = 2 * a[-2] * a[-1] * b[-1] * (a[0] if len(a) == 3 else 1) * event.count
        rows.append({"op": event.key, "shapes": [a, b], "calls_per_step": event.count / steps,
                     "ms_per_step": round(t_us / 1000 / steps, 2), "tflops": round(flops / t_us / 1e6, 1)})
    return sorted(rows, key=lambda r: -r["ms_per_step"])[:top_n]


def profile(step, steps: int, warmup: int = 3, top_n: int = 12, by_shape: bool = False) -> dict:
    """Run `step` `warmup` times, then profile `steps` calls: CUDA kernel time per op class and
    the `top_n` kernels, in ms per step; `by_shape`: matmul time per operand shapes too."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    activities = [torch.profiler.ProfilerActivity.CUDA] + ([torch.profiler.ProfilerActivity.CPU] if by_shape else [])
    with torch.profiler.profile(activities=activities, record_shapes=by_shape) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1000 / steps  # vs GPU time: how long the GPU sat idle
    return summarize(prof, steps, wall_ms, top_n=top_n, by_shape=by_shape)


def summarize(prof, steps: int, wall_ms: float, top_n: int = 12, by_shape: bool = False) -> dict:
    """A finished profile of `steps` steps that took `wall_ms` each: CUDA kernel time per op class,
    the `top_n` slowest kernels, where the GPU sat idle; `by_shape`: matmul time per operand shapes."""
    totals: dict[str, float] = {}
    top: list[tuple[float, str]] = []
    for event in prof.key_averages():
        t = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        # kernels only: not CPU ops (by_shape records them) nor annotations spanning kernels
        if t <= 0 or event.key.startswith("## ") or event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        totals[op_class(event.key)] = totals.get(op_class(event.key), 0.0) + t
        top.append((t, event.key, event.count))
    all_us = sum(totals.values())
    table = {cls: {"ms_per_step": round(us / 1000 / steps, 2), "share": round(us / all_us, 3)}
             for cls, us in sorted(totals.items(), key=lambda kv: -kv[1])}
    kernels = [{"kernel": k[:90], "ms_per_step": round(t / 1000 / steps, 2), "calls_per_step": n / steps}
               for t, k, n in sorted(top)[-top_n:][::-1]]
    out = {"gpu_ms_per_step": round(all_us / 1000 / steps, 1), "wall_ms_per_step": round(wall_ms, 1),
           "kernels_per_step": sum(n for _, _, n in top) / steps,
           "by_class": table, "top_kernels": kernels}
    if by_shape:
        out["matmuls_by_shape"] = matmul_shapes(prof, steps)
    out["gpu_idle"] = idle_gaps(prof, steps)
    return out


def host_ops(prof, steps: int, top_n: int = 15) -> list[dict]:
    """The CPU ops with the most self time per step (needs the CPU activity): where a host-bound
    step spends its time (hooks, copies launched one by one, Python around the kernels)."""
    rows = [(e.self_cpu_time_total, e.key, e.count) for e in prof.key_averages()
            if e.device_type == torch.autograd.DeviceType.CPU and e.self_cpu_time_total > 0]
    return [{"op": k[:90], "self_cpu_ms_per_step": round(t / 1000 / steps, 2), "calls_per_step": n / steps}
            for t, k, n in sorted(rows)[-top_n:][::-1]]


def idle_gaps(prof, steps: int, top_n: int = 12) -> dict:
    """Where the GPU sat idle between kernels (all streams merged), per step: the total and the
    longest gaps with the kernels either side, to find host syncs and launch-bound stretches."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith("## ")
                   and e.time_range.end > e.time_range.start)
    gaps, busy_until, last = [], None, None
    for start, end, name in spans:
        if busy_until is not None and start > busy_until:
            gaps.append((start - busy_until, last, name))
        if busy_until is None or end > busy_until:
            busy_until, last = end, name
    total_us = sum(g for g, _, _ in gaps)
    longest = [{"us": round(g, 1), "after": a[:70], "before": b[:70]} for g, a, b in sorted(gaps, reverse=True)[:top_n]]
    return {"idle_ms_per_step": round(total_us / 1000 / steps, 2), "gaps_over_50us_per_step":
            round(sum(1 for g, _, _ in gaps if g > 50) / steps, 1), "longest": longest}

if __name__ == "__main__":
    main()

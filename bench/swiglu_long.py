"""The fused SwiGLU-with-LoRA op (efftune.methods.lora.swiglu.SwigluLora) at a long input, against
the `lora_linears` ops (cuBLAS GEMMs, SwiGLU in PyTorch): forward and backward of one MLP in fp32 and
bf16, and the relative error ||a − b|| / ||b|| of the output and of every gradient against the fp32
`lora_linears` run. The default shape is the one whose [g0 | u0 | z] (3.8e9 elements) crashed the
Triton forward before its offsets were 64-bit: 131,072 tokens of Llama-3-8B's MLP, r = 16.
Needs a CUDA GPU (about 60 GiB at the default shape).

    PYTHONPATH=. python bench/swiglu_long.py --tokens 131072
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
from efftune.methods.lora.ops import fused_lora_linears
from efftune.methods.lora.swiglu import SwigluLora

TRAINED = ("x", "a_gu", "a_d", "b_g", "b_u", "b_d")


def operands(tokens: int, hidden: int, inter: int, r: int) -> tuple[dict, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, device="cuda", generator=g) * scale
    ops = dict(x=rnd(tokens, hidden), w_g=rnd(inter, hidden, scale=0.02), w_u=rnd(inter, hidden, scale=0.02),
               w_d=rnd(hidden, inter, scale=0.02), a_gu=rnd(2 * r, hidden, scale=0.02), a_d=rnd(r, inter, scale=0.02),
               b_g=rnd(inter, r, scale=0.02), b_u=rnd(inter, r, scale=0.02), b_d=rnd(hidden, r, scale=0.02))
    return ops, rnd(tokens, hidden)


def run(ops: dict, dy: torch.Tensor, way: str, dtype: torch.dtype) -> tuple[dict, dict]:
    """(output and gradients in fp32, timing and peak memory) of one forward + backward."""
    t = {k: v.to(dtype, copy=True).requires_grad_(k in TRAINED) for k, v in ops.items()}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if way == "fused":
        y = SwigluLora.apply(t["x"], t["a_gu"], t["a_d"], t["w_g"], t["w_u"], t["w_d"], t["b_g"], t["b_u"],
                             t["b_d"], None)
    else:
        g, u = fused_lora_linears(t["x"], [t["w_g"], t["w_u"]], [None, None], t["a_gu"], [t["b_g"], t["b_u"]])
        y = fused_lora_linears(F.silu(g) * u, [t["w_d"]], [None], t["a_d"], [t["b_d"]])[0]
    y.backward(dy.to(dtype))
    torch.cuda.synchronize()
    info = dict(way=way, dtype=str(dtype).removeprefix("torch."), seconds_first_call=round(time.perf_counter() - start, 3),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
    return {"y": y.detach().float(), **{k: t[k].grad.float() for k in TRAINED}}, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    ops, dy = operands(args.tokens, args.hidden, args.intermediate, args.rank)
    ref, info = run(ops, dy, "lora_linears", torch.float32)
    print(json.dumps(info), flush=True)
    for way, dtype in (("fused", torch.float32), ("fused", torch.bfloat16), ("lora_linears", torch.bfloat16)):
        out, info = run(ops, dy, way, dtype)
        info["rel_err_vs_fp32_lora_linears"] = {k: f"{float((out[k] - ref[k]).norm() / ref[k].norm()):.2e}" for k in ref}
        print(json.dumps(info), flush=True)
        del out
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

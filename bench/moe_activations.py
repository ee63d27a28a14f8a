"""What one MoE decoder layer keeps for backward, per token: eager and compiled, any device.

Activation memory is a property of the graph, not of the device: this builds one decoder layer of
the Qwen3-30B-A3B shape (bench/moe_lora.py's, random init, bf16) with expert LoRA on both expert
projections and LoRA on the attention linears (r=16, as moe_lora's `efftune` cases), runs its
forward on T tokens under `torch.autograd.graph.saved_tensors_hooks` (bf16 autocast, as a training step), and sums the distinct tensors
kept for backward (by storage; the layer's own weights left out), at T and 2T tokens: the difference
over T is what a token costs (tensors of a fixed size, such as the LoRA factors cast to bf16, cancel).
The experts run through
`torch._grouped_mm` (`expert_lora.impl: grouped_mm`), CUDA's path; on a CPU, torch's CPU kernel of
it, so the compiled graph (Inductor, efftune's lean partition as train() uses it) is the GPU's.
`--nf4`: the experts and attention linears quantised first (`quantize: nf4`).

    PYTHONPATH=. python bench/moe_activations.py                  # eager and compiled, T = 1024, CPU
    PYTHONPATH=. python bench/moe_activations.py --nf4 --tokens 512

Prints one JSON line per mode: KB kept per token, KB kept in all at T tokens, and the largest kept
tensors at T (shape, dtype, KB).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.moe_lora import ATTN, SHAPES, build_model  # noqa: E402


def layer_model(nf4: bool, device: torch.device) -> torch.nn.Module:
    """The Qwen3-30B-A3B shape with one decoder layer, adapted as moe_lora's `efftune` cases."""
    from efftune.methods.expert_lora import ExpertLoraConfig, add_expert_lora
    SHAPES["qwen3-30b-a3b-layer"] = dict(SHAPES["qwen3-30b-a3b"], num_hidden_layers=1, vocab_size=1024)
    model = build_model("qwen3-30b-a3b-layer", device)
    if nf4:
        from efftune.quantize import quantize_model
        quantize_model(model, "nf4")
    add_expert_lora(model, ExpertLoraConfig(r=16, alpha=32, target_modules=ATTN, impl="grouped_mm"))
    return model


def kept(model: torch.nn.Module, tokens: int, device: torch.device) -> tuple[int, list[tuple]]:
    """Bytes of the distinct tensors one forward of the layer keeps for backward (weights left out),
    and the tensors by size."""
    layer = model.model.layers[0]
    hidden = model.config.hidden_size
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, tokens, hidden, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_(True)
    positions = torch.arange(tokens, device=device)[None]
    rope = model.model.rotary_emb(x, positions)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weights |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen: dict[int, tuple] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights and ptr not in seen:
            seen[ptr] = (tuple(t.shape), str(t.dtype).removeprefix("torch."), t.untyped_storage().nbytes())
        return t

    with torch.autocast(device.type, dtype=torch.bfloat16):  # as every benchmark's training step
        layer(x, position_embeddings=rope)  # a compiled layer compiles here, outside the hooks
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = layer(x, position_embeddings=rope)
    out = out[0] if isinstance(out, tuple) else out
    out.float().square().mean().backward()  # what was kept suffices
    return sum(n for *_, n in seen.values()), sorted(seen.values(), key=lambda v: -v[2])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--nf4", action="store_true")
    ap.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from efftune.train.compile import compile_blocks, partitioner
    for mode in args.modes:
        model = layer_model(args.nf4, device)
        if mode == "compiled":
            compile_blocks(model)
        with partitioner(None):
            total, tensors = kept(model, args.tokens, device)
            total_2t, _ = kept(model, 2 * args.tokens, device)
        print(json.dumps(dict(mode=mode, nf4=args.nf4, tokens=args.tokens, device=str(device),
                              kept_kb_per_token=round((total_2t - total) / args.tokens / 1024, 2),
                              kept_kb=round(total / 1024), largest=[[list(s), d, round(n / 1024)] for s, d, n in tensors[:8]])),
              flush=True)


if __name__ == "__main__":
    main()

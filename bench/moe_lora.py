"""LoRA on a MoE model's experts: efftune's grouped expert path vs peft's target_parameters.

Builds a random-init Qwen3-MoE (bf16, sdpa attention, no downloads) and times full training steps
(forward under bf16 autocast, loss, backward, fused AdamW step, zero_grad) on random token ids.
LoRA is r=16, alpha=32, dropout 0 everywhere. Cases:

  peft          peft.LoraConfig(target_modules=[q,k,v,o]_proj, target_parameters=["gate_up_proj",
                "down_proj"]): peft adds s·B A to the fused 3-D weights of all experts in every
                forward (ParamWrapper); experts run transformers' own path; loss = model(labels).loss
  peft-attn     peft LoRA on the attention linears only (experts frozen, transformers' path)
  efftune       ExpertLora on gate_up_proj + down_proj (grouped per-expert LoRA, efftune's expert
                path) + efftune LoRA on the attention linears; loss through efftune's chunked target_logprobs
  efftune-base  efftune's expert path without expert LoRA (use_grouped_experts) + attention LoRA
  efftune-compile  `efftune` with each decoder block compiled (efftune.train.compile, train.compile)
  efftune-nf4   `efftune` on an NF4 base: experts and attention linears quantised first
                (efftune.quantize.quantize_model, as `quantize: nf4` does); efftune-compile-nf4: compiled;
                efftune-compile-nf4-ckpt: and with activation checkpointing (train.activation_checkpointing:
                compiled, that is the compiler's recomputation, as train() does it)

Like bench/throughput.py (whose helpers it imports), each case runs in its own subprocess and
prints one JSON line (tokens/s, step seconds, peak GiB = max_memory_allocated, trainable params);
a table and the ratios to `peft` follow, and for NF4 cases a JSON line with issue 24's MoE bar (`nf4_bar`:
peak <= 0.4x the bf16 run's at >= 0.8x its tokens/s).

    PYTHONPATH=. python bench/moe_lora.py                           # qwen3-30b-a3b shape, all cases
    PYTHONPATH=. python bench/moe_lora.py --shape tiny --steps 2    # CPU smoke test (seconds)
    PYTHONPATH=. python bench/moe_lora.py --cases peft efftune-compile --profile   # + GPU time per op class
    PYTHONPATH=. python bench/moe_lora.py --cases efftune-compile-nf4 --memory-budget 0.5  # compiled cases
        # warm up (compile) under train.compile_memory_budget; they use efftune's lean partition as train() does
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.throughput import (_ratio, loss_fn, meets, param_counts, run_worker, timed_steps, train_config,  # noqa: E402
                              train_step)

SHAPES: dict[str, dict] = {
    # Qwen3-30B-A3B's per-layer shape, 12 of its 48 layers
    "qwen3-30b-a3b": dict(hidden_size=2048, num_hidden_layers=12, num_experts=128, num_experts_per_tok=8,
                          moe_intermediate_size=768, intermediate_size=6144, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, vocab_size=151936),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
                 moe_intermediate_size=32, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=1000),
}
CASES = ("peft", "peft-attn", "efftune", "efftune-base", "efftune-compile", "efftune-nf4", "efftune-compile-nf4",
         "efftune-compile-nf4-ckpt")
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def default_seq(shape: str) -> int:
    return 128 if shape == "tiny" else 4096


def build_model(shape: str, device: torch.device) -> torch.nn.Module:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    config = Qwen3MoeConfig(**SHAPES[shape], norm_topk_prob=True, tie_word_embeddings=False,
                            max_position_embeddings=40960, use_cache=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3MoeForCausalLM._from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():  # the router init is zeros: give it some spread, as a trained one has
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(std=0.02)
    return model.train()


def attach(model: torch.nn.Module, case: str) -> torch.nn.Module:
    if case.startswith("peft"):
        import peft
        extra = dict(target_parameters=["gate_up_proj", "down_proj"]) if case == "peft" else {}
        return peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                          target_modules=ATTN, **extra))
    from efftune.methods.expert_lora import ExpertLoraConfig, add_expert_lora
    from efftune.methods.lora.config import LoraConfig
    from efftune.methods.lora.model import add_lora
    from efftune.moe.experts import use_grouped_experts
    if "-nf4" in case:  # issue 24: NF4 experts and linears under expert LoRA, quantised at load as
        from efftune.quantize import quantize_model  # `quantize: nf4` does (before the method attaches)
        quantize_model(model, "nf4")
        torch.cuda.empty_cache() if torch.cuda.is_available() else None  # the bf16 weights are gone
    if case in ("efftune", "efftune-compile", "efftune-nf4", "efftune-compile-nf4", "efftune-compile-nf4-ckpt"):
        add_expert_lora(model, ExpertLoraConfig(r=16, alpha=32, target_modules=ATTN))
        config = train_config(case, None)
        if config.activation_checkpointing and not config.compiler_checkpoints:  # as train() would
            from efftune.train.loop import enable_activation_checkpointing
            enable_activation_checkpointing(model)
        if config.compile:
            from efftune.train.compile import compile_blocks
            compile_blocks(model, checkpoint_fraction=config.compiled_checkpoint_fraction())
    else:
        use_grouped_experts(model)
        add_lora(model, LoraConfig(r=16, alpha=32, target_modules=ATTN))
    return model


def run_case(shape: str, case: str, steps: int, warmup: int, seq: int, batch: int, profile: bool = False,
             memory_budget: float | None = None) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = attach(build_model(shape, device), case)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            fused=device.type == "cuda")
    frozen, trainable = param_counts(model)
    gen = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(0, SHAPES[shape]["vocab_size"], (batch, seq), device=device, generator=gen)
    cuda = device.type == "cuda"
    loss_case = "efftune" if case.startswith("efftune") else "peft"  # which loss path (throughput.py's)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    from efftune.forward.options import ForwardOptions
    options = ForwardOptions(fused_head=case.startswith("efftune-compile"))  # as train() with train.compile
    step = train_step(lambda: loss_fn(model, loss_case, ids, options), opt, device)
    from efftune.train.compile import partitioner
    budget = train_config(case, memory_budget).compile_memory_budget
    with partitioner(budget):  # compiles in warm-up, as train() would (efftune's lean partition)
        step_s, loss, _ = timed_steps(step, steps, warmup, device)
    extra = {}
    if profile and cuda:  # after the timing, so the profiler does not slow the timed steps
        from bench.profile_step import profile as profile_steps
        extra["profile"] = profile_steps(step, steps=2, warmup=0, top_n=30)
    return dict(shape=shape, case=case, seq=seq, batch=batch, steps=steps,
                memory_budget=budget, tokens_s=round(batch * seq / step_s, 1), step_s=round(step_s, 4),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                trainable=trainable, frozen=frozen, loss=round(loss.item(), 4),
                device=torch.cuda.get_device_name() if cuda else "cpu", **extra)


def spawn(args: argparse.Namespace, shape: str, case: str) -> dict:
    """One case in a fresh interpreter (clean peak memory; an OOM kills only that case)."""
    cmd = [sys.executable, __file__, "--worker", case, "--shape", shape, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--seq", str(args.seq), "--batch", str(args.batch)]
    if args.profile:
        cmd.append("--profile")
    if args.memory_budget is not None:
        cmd += ["--memory-budget", str(args.memory_budget)]
    head = dict(shape=shape, case=case, batch=args.batch)
    return run_worker(cmd, head, args.case_timeout)


def table(results: list[dict]) -> str:
    base = next((r for r in results if r["case"] == "peft" and "error" not in r), None)
    lines = [f"{'case':<14}{'tokens/s':>12}{'step s':>9}{'peak GiB':>10}{'trainable':>13}{'vs peft':>9}"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['case']:<14}{r['error']:>12}")
            continue
        ratio = _ratio(r, base, "tokens_s")
        lines.append(f"{r['case']:<14}{r['tokens_s']:>12.1f}{r['step_s']:>9.3f}{str(r['peak_gib']):>10}"
                     f"{r['trainable']:>13,}{'' if ratio is None else f'{ratio:.2f}x':>9}")
    return "\n".join(lines)


def nf4_bar(results: list[dict]) -> dict | None:
    """Issue 24's MoE bar per efftune NF4 case run: peak <= 0.4x the bf16 expert-LoRA run's at >= 0.8x its
    tokens/s, the bf16 run being the same case without NF4 and without checkpointing (efftune-compile for
    efftune-compile-nf4 and efftune-compile-nf4-ckpt)."""
    ok = {r["case"]: r for r in results if "error" not in r}
    bar = {}
    for case, r in ok.items():
        if "-nf4" not in case:
            continue
        bf16 = ok.get(case.replace("-nf4", "").replace("-ckpt", ""))
        bar[case] = dict(speed_vs_bf16=_ratio(r, bf16, "tokens_s"), peak_vs_bf16=_ratio(r, bf16, "peak_gib"),
                         passes=meets(r, bf16, 0.8, 0.4))
    return bar or None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(SHAPES))
    ap.add_argument("--cases", "--case", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seq", type=int, default=None, help="default 4096 (128 for tiny)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--case-timeout", type=int, default=400, help="seconds per case subprocess")
    ap.add_argument("--profile", action="store_true", help="also profile 2 steps per case (GPU time per op class)")
    ap.add_argument("--memory-budget", type=float, default=None,
                    help="compiled cases: train.compile_memory_budget in (0, 1] (efftune.train.compile)")
    ap.add_argument("--worker", choices=CASES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.seq = args.seq or default_seq(args.shape)
    if args.worker:
        print(json.dumps(run_case(args.shape, args.worker, args.steps, args.warmup, args.seq, args.batch, args.profile,
                                  args.memory_budget)))
        return
    results = []
    for case in args.cases:
        results.append(spawn(args, args.shape, case))
        print(json.dumps(results[-1]), flush=True)
    print(table(results), flush=True)
    if bar := nf4_bar(results):
        print(json.dumps({"nf4_bar": bar}), flush=True)


if __name__ == "__main__":
    main()

"""ReLoRA's pre-training comparison at small scale: full-rank, LoRA, LoRA + warm start, ReLoRA.

A Llama-style model (hidden 512, 8 layers, 8 heads, MLP 1376, SmolLM2 vocabulary of 49152 with
tied embeddings, sequences of 256) is trained from random init on BIG-bench text, the same
tokens in the same order four ways, and its validation perplexity reported:

  full       every parameter trains (lr --lr-full)
  lora       LoRA (r=128, alpha=32) on every linear layer; embeddings and norms full-rank
  lora_ws    the same after a full-rank warm start (the first 25% of steps)
  relora     the same warm start, then merge-and-restart every N steps (magnitude reset 0.9),
             jagged cosine with re-warmups

All four use efftune's pieces (`add_lora`, `train_full_rank`, `ReLoraHooks`, `TrainHooks`) in the
compact loop below rather than `efftune.train.loop.train`, which is built for fine-tuning
(per-example shuffles, prefix trees, checkpoints each run); the hooks are called as `train`
calls them (`parameters` builds AdamW, `lr_multiplier` before each step, `after_step` after).
The token budget is set on the GPU: a short calibration times a full-rank and a LoRA step, and
the steps are chosen so the four runs fit `--train-seconds`.

  python bench/relora_pretrain.py --prepare          # once, here: BIG-bench text -> .carry_relora/
  python bench/relora_pretrain.py --tiny             # CPU smoke run (tiny model, a few steps)
  # on the GPU machine (run tool, carry [".carry_relora"]):
  PYTHONPATH=. PYTHONUNBUFFERED=1 python bench/relora_pretrain.py 2>&1 | tee $OUT/log.txt
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

CARRY = Path(__file__).resolve().parent.parent / ".carry_relora"
TOKENIZER_DIR = Path.home() / ".cache/efftune/models/SmolLM2-135M-Instruct"
SEQ = 256
FULL_RANK = ["embed_tokens", "input_layernorm", "post_attention_layernorm", "norm"]  # head is tied


# ---- --prepare: BIG-bench inputs and targets -> token ids -----------------------------------------

def _texts(spec: dict):
    for ex in spec.get("examples", []):
        parts = [ex.get("input")]
        target = ex.get("target")
        parts += target if isinstance(target, list) else [target]
        parts += list(ex.get("target_scores", {}) or {})
        parts = [p.strip() for p in parts if isinstance(p, str) and p.strip()]
        if parts:
            yield "\n".join(parts)


def prepare(max_mb: float, val_fraction: float) -> None:
    from transformers import AutoTokenizer
    from efftune.data.bigbench import _sdist_path, _task_name
    seen, docs = set(), []
    with tarfile.open(_sdist_path(), "r:gz") as tf:
        for member in tf:
            if _task_name(member.name) is None:
                continue
            try:
                spec = json.load(tf.extractfile(member))
            except (ValueError, UnicodeDecodeError):
                continue
            for text in _texts(spec):
                key = hashlib.blake2b(text.encode(), digest_size=16).digest()
                if key not in seen:
                    seen.add(key)
                    docs.append(text)
    total_mb = sum(len(d.encode()) for d in docs) / 2**20
    random.Random(0).shuffle(docs)
    kept, size = [], 0
    for d in docs:
        if size + len(d.encode()) > max_mb * 2**20:
            break
        kept.append(d)
        size += len(d.encode())
    n_val = int(len(kept) * val_fraction)
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    eos = tok.eos_token_id
    CARRY.mkdir(exist_ok=True)
    stats = {"documents_unique": len(docs), "unique_text_mb": round(total_mb, 1), "kept_documents": len(kept),
             "kept_text_mb": round(size / 2**20, 1), "val_documents": n_val, "tokenizer": str(TOKENIZER_DIR)}
    for split, part in (("val", kept[:n_val]), ("train", kept[n_val:])):
        ids = []
        for i in range(0, len(part), 2000):
            for row in tok(part[i:i + 2000], add_special_tokens=False)["input_ids"]:
                ids.extend(row)
                ids.append(eos)  # documents separated by end-of-text
        arr = np.asarray(ids, dtype=np.uint16)
        np.save(CARRY / f"{split}.npy", arr)
        stats[f"{split}_tokens"] = int(arr.size)
    (CARRY / "stats.json").write_text(json.dumps(stats, indent=1))
    print(json.dumps(stats, indent=1))


# ---- training ------------------------------------------------------------------------------

def windows(split: str, device, limit: int | None = None) -> torch.Tensor:
    ids = torch.from_numpy(np.load(CARRY / f"{split}.npy").astype(np.int64))
    n = ids.numel() // SEQ if limit is None else min(limit, ids.numel() // SEQ)
    return ids[:n * SEQ].view(n, SEQ).to(device)


def build(args, mode: str, hooks_cfg: dict):
    from transformers import LlamaConfig, LlamaForCausalLM
    from efftune.methods.lora import LoraConfig, add_lora
    from efftune.train.loop import TrainHooks
    from efftune.train.relora import ReLoraConfig, ReLoraHooks, train_full_rank
    torch.manual_seed(0)  # the same initial weights for every run
    cfg = LlamaConfig(vocab_size=49152, hidden_size=args.hidden, intermediate_size=args.mlp,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                      max_position_embeddings=SEQ, tie_word_embeddings=True, attn_implementation="sdpa",
                      bos_token_id=1, eos_token_id=0, pad_token_id=None)
    model = LlamaForCausalLM(cfg).to(args.device)
    if mode == "full":
        return model, TrainHooks()
    add_lora(model, LoraConfig(r=args.rank, alpha=args.alpha, target_modules="all-linear"))
    train_full_rank(model, FULL_RANK)
    if mode == "lora":
        return model, TrainHooks()
    return model, ReLoraHooks(model, ReLoraConfig(**hooks_cfg, full_rank=FULL_RANK))


@torch.no_grad()
def val_ppl(model, val: torch.Tensor, batch: int) -> float:
    model.eval()
    nll, count = 0.0, 0
    for i in range(0, val.shape[0], batch):
        x = val[i:i + batch]
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.is_cuda):
            loss = model(input_ids=x, labels=x).loss  # mean over the (SEQ - 1) predicted tokens
        nll += float(loss) * x.shape[0] * (SEQ - 1)
        count += x.shape[0] * (SEQ - 1)
    model.train()
    return math.exp(nll / count)


def run(args, mode: str, steps: int, train: torch.Tensor, val: torch.Tensor, evals: int = 4) -> dict:
    from efftune.train.loop import TrainConfig
    warm = int(steps * args.warm_fraction) if mode in ("lora_ws", "relora") else 0
    cycle = max(1, (steps - warm) // args.cycles)  # ReLoRA's cycle; re-warmup a tenth of it
    every = cycle if mode == "relora" else 10**9      # lora_ws: the switch's re-warmup, no restarts
    hooks_cfg = dict(warm_start_steps=warm, restart_every=every, rewarmup_steps=max(1, cycle // 10),
                     optimizer_reset="magnitude", prune_fraction=0.9)
    model, hooks = build(args, mode, hooks_cfg)
    params = hooks.parameters(model)
    lr = args.lr_full if mode == "full" else args.lr_lora
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0, fused=train.is_cuda)
    tcfg = TrainConfig(steps=steps, lr=lr, warmup_steps=max(1, steps // 20), min_lr_ratio=0.1)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    order = torch.Generator().manual_seed(1)
    if train.is_cuda:
        torch.cuda.reset_peak_memory_stats()
    perm, pos, curve, t0 = torch.randperm(train.shape[0], generator=order), 0, [], time.perf_counter()
    for step in range(steps):
        if pos + args.batch > perm.numel():
            perm, pos = torch.randperm(train.shape[0], generator=order), 0
        x = train[perm[pos:pos + args.batch].to(train.device)]
        pos += args.batch
        for g in opt.param_groups:
            g["lr"] = lr * hooks.lr_multiplier(step, tcfg)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.is_cuda):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        extra = hooks.after_step(step + 1, opt)
        if (step + 1) % max(1, steps // evals) == 0 or step + 1 == steps or extra.get("relora_switch"):
            curve.append({"step": step + 1, "train_loss": round(loss.item(), 4),
                          "val_ppl": round(val_ppl(model, val, args.batch), 2), **extra})
            print(f"  {mode:8s} {curve[-1]}", flush=True)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if train.is_cuda else 0.0
    ppl = val_ppl(model, val, args.batch)
    return {"mode": mode, "steps": steps, "warm_start_steps": warm, "restart_every": every if mode == "relora" else None,
            "rewarmup_steps": hooks_cfg["rewarmup_steps"] if warm else None, "lr": lr,
            "params": total, "trainable_params": trainable, "val_ppl": round(ppl, 2), "seconds": round(seconds, 1), "peak_gib": round(peak, 1),
            "restarts": getattr(hooks, "restarts", 0), "curve": curve}


def step_seconds(args, mode: str, train: torch.Tensor, n: int = 6) -> float:
    """Seconds per step of `mode` (after two warm-up steps), timed on a throwaway model."""
    model, hooks = build(args, mode, dict(restart_every=10**9))
    params = hooks.parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=train.is_cuda)
    for i in range(n + 2):
        if i == 2:
            torch.cuda.synchronize() if train.is_cuda else None
            t0 = time.perf_counter()
        x = train[i * args.batch:(i + 1) * args.batch]
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.is_cuda):
            model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize() if train.is_cuda else None
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prepare", action="store_true", help="build .carry_relora/ from BIG-bench (here)")
    ap.add_argument("--max-mb", type=float, default=30.0)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny model, a few steps")
    ap.add_argument("--steps", type=int, default=0, help="steps per run (0: fit --train-seconds)")
    ap.add_argument("--train-seconds", type=float, default=330.0, help="time for the four runs together")
    ap.add_argument("--batch", type=int, default=128, help="sequences of 256 tokens per step")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--lr-full", type=float, default=1e-3)
    ap.add_argument("--lr-lora", type=float, default=2e-3)
    ap.add_argument("--warm-fraction", type=float, default=0.25)
    ap.add_argument("--cycles", type=int, default=5, help="ReLoRA cycles after the warm start")
    ap.add_argument("--modes", default="full,lora,lora_ws,relora")
    args = ap.parse_args()
    if args.prepare:
        return prepare(args.max_mb, val_fraction=0.02)
    args.device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    args.hidden, args.layers, args.heads, args.mlp = (64, 2, 4, 160) if args.tiny else (512, 8, 8, 1376)
    if args.tiny:  # the same path as on the GPU, calibration included, in about a minute of steps
        args.batch, args.rank, args.train_seconds = 8, 8, min(args.train_seconds, 60.0)
    train = windows("train", args.device, 2000 if args.tiny else None)
    val = windows("val", args.device, 64 if args.tiny else None)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device {device}, torch {torch.__version__}; train {train.numel():,} tokens, val {val.numel():,}")
    modes = args.modes.split(",")
    steps = args.steps
    if not steps:  # warm-start runs spend warm_fraction of their steps at full-rank speed
        t_full, t_lora = step_seconds(args, "full", train), step_seconds(args, "lora", train)
        per_step = sum(t_full if m == "full" else t_lora if m == "lora" else
                       args.warm_fraction * t_full + (1 - args.warm_fraction) * t_lora for m in modes)
        steps = max(8, int(args.train_seconds / per_step))
        steps = steps // 10 * 10 if steps >= 100 else steps
        print(f"calibration: full {t_full * 1e3:.1f} ms/step, lora {t_lora * 1e3:.1f} ms/step -> {steps} steps")
    tokens = steps * args.batch * SEQ
    print(f"{steps} steps x {args.batch} x {SEQ} = {tokens / 1e6:.1f}M tokens per run "
          f"({tokens / train.numel():.2f} epochs)")
    results = [run(args, m, steps, train, val) for m in modes]
    print("\n| run | trainable params | val perplexity | seconds | peak GiB |\n| --- | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['mode']} | {r['trainable_params'] / 1e6:.1f}M of {r['params'] / 1e6:.1f}M "
              f"| {r['val_ppl']:.2f} | {r['seconds']:.0f} | {r['peak_gib']:.1f} |")
    out = {"device": device, "torch": torch.__version__, "steps": steps, "batch": args.batch, "seq": SEQ,
           "tokens_per_run": tokens, "args": {k: v for k, v in vars(args).items()}, "results": results}
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""ReLoRA's pre-training comparison at small scale: full-rank, LoRA, LoRA + warm start, ReLoRA.

A Llama-style model (hidden 512, 8 layers, 8 heads, MLP 1376, SmolLM2 vocabulary of 49152 with
tied embeddings, sequences of 256) is trained from random init on BIG-bench text, the same
tokens in the same order four ways, and its validation perplexity reported:

  full       every parameter trains (lr --lr-full)
  lora       LoRA (r=128, alpha=32) on every linear layer; embeddings and norms full-rank
  lora_ws    the same after a full-rank warm start of W = round(--warm-fraction x steps) steps
  relora     the same warm start, then merge-and-restart every (steps - W) / --cycles steps
             (magnitude reset 0.9), jagged cosine with re-warmups

Warm start (--warm-start):
  checkpoint (default, as in the paper) the full run keeps a CPU copy of its weights at step W;
             lora_ws and relora start from it and train only steps W+1..steps, on the same batches
             the full run saw there, at --lr-lora with their own schedule over those steps (warmup,
             cosine; ReLoRA's restarts) and fresh optimizer state. So `full` must run first.
  in-run     the old way: each warm-started run does its own W full-rank steps (at --lr-lora)
             via `ReLoraConfig.warm_start_steps`, then switches to LoRA, one schedule over all steps.
Either way every run sees the same tokens in the same order over its whole life (steps x batch
sequences, counting the shared warm phase), and the val perplexity is reported at the same steps.

All four use efftune's pieces (`add_lora`, `train_full_rank`, `ReLoraHooks`, `TrainHooks`) in the
compact loop below rather than `efftune.train.loop.train`, which is built for fine-tuning
(per-example shuffles, prefix trees, checkpoints each run); the hooks are called as `train`
calls them (`parameters` builds AdamW, `lr_multiplier` before each step, `after_step` after).
The token budget is set on the GPU: a short calibration times a full-rank and a LoRA step, and
the steps are chosen so the four runs fit `--train-seconds` (warm-started runs from a checkpoint
count only their steps - W low-rank steps).

  python bench/relora_pretrain.py --prepare          # once, here: BIG-bench text -> .carry_relora/
  python bench/relora_pretrain.py --tiny             # CPU smoke run (tiny model, ~1 min of steps)
  python bench/relora_pretrain.py --tiny --steps 20  # CPU smoke run, seconds
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
MODES = ("full", "lora", "lora_ws", "relora")
WARM = {"lora_ws", "relora"}  # the warm-started runs


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

    from efftune.data.bigbench import _task_name, sdist_path
    seen, docs = set(), []
    with tarfile.open(sdist_path(), "r:gz") as tf:
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


def batch_order(n: int, batch: int, steps: int) -> torch.Tensor:
    """The window indices of every step, (steps, batch), shared by all runs: epochs of a fresh
    shuffle (seed 1), each dropping its last partial batch."""
    g, per_epoch = torch.Generator().manual_seed(1), n // batch
    epochs = [torch.randperm(n, generator=g)[:per_epoch * batch] for _ in range(-(-steps // per_epoch))]
    return torch.cat(epochs).view(-1, batch)[:steps]


def build(args, mode: str, hooks_cfg: dict, init: dict | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    from efftune.methods.hooks import TrainHooks
    from efftune.methods.lora.config import LoraConfig
    from efftune.methods.lora.model import add_lora
    from efftune.methods.relora import ReLoraConfig, ReLoraHooks, train_full_rank
    torch.manual_seed(0)  # the same initial weights for every run
    cfg = LlamaConfig(vocab_size=49152, hidden_size=args.hidden, intermediate_size=args.mlp,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                      max_position_embeddings=SEQ, tie_word_embeddings=True, attn_implementation="sdpa",
                      bos_token_id=1, eos_token_id=0, pad_token_id=None)
    model = LlamaForCausalLM(cfg).to(args.device)
    if init is not None:
        model.load_state_dict(init)  # the full run's weights at the warm-start step
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


def run(args, mode: str, steps: int, order: torch.Tensor, train: torch.Tensor, val: torch.Tensor,
        points: set[int], snapshot: dict) -> dict:
    """One run over steps `order[start:]`; `full` fills `snapshot` at the warm-start step, from
    which the warm-started runs start with --warm-start checkpoint."""
    from efftune.train.loop import TrainConfig
    W = args.warm_steps
    start = W if mode in WARM and args.warm_start == "checkpoint" else 0  # first step this run trains
    in_run = W if mode in WARM and args.warm_start == "in-run" else 0     # full-rank steps inside it
    cycle = max(1, (steps - W) // args.cycles)  # ReLoRA's cycle; re-warmup a tenth of it
    every = cycle if mode == "relora" else 10**9  # lora_ws: no restarts
    hooks_cfg = dict(warm_start_steps=in_run, restart_every=every, rewarmup_steps=max(1, cycle // 10),
                     optimizer_reset="magnitude", prune_fraction=0.9)
    model, hooks = build(args, mode, hooks_cfg, init=snapshot["state"] if start else None)
    params = hooks.parameters(model)
    lr = args.lr_full if mode == "full" else args.lr_lora
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0, fused=train.is_cuda)
    n = steps - start  # the schedule (warmup, cosine, restarts) spans the steps this run trains
    tcfg = TrainConfig(steps=n, lr=lr, warmup_steps=max(1, n // 20), min_lr_ratio=0.1)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    curve = []
    if start:  # measured again on the loaded low-rank model: equals the full run's value (B = 0)
        curve.append({"step": W, "train_loss": snapshot["train_loss"],
                      "val_ppl": round(val_ppl(model, val, args.batch), 2), "from_full_run": True})
        print(f"  {mode:8s} {curve[-1]}", flush=True)
    if train.is_cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for step in range(start, steps):
        x = train[order[step].to(train.device)]
        for g in opt.param_groups:
            g["lr"] = lr * hooks.lr_multiplier(step - start, tcfg)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.is_cuda):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        extra = hooks.after_step(step - start + 1, opt)
        if step + 1 in points or extra.get("relora_switch"):
            curve.append({"step": step + 1, "train_loss": round(loss.item(), 4),
                          "val_ppl": round(val_ppl(model, val, args.batch), 2), **extra})
            print(f"  {mode:8s} {curve[-1]}", flush=True)
        if mode == "full" and step + 1 == W and W in points:
            snapshot.update(state={k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
                            train_loss=curve[-1]["train_loss"], val_ppl=curve[-1]["val_ppl"])
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if train.is_cuda else 0.0
    ppl = val_ppl(model, val, args.batch)
    return {"mode": mode, "steps": steps, "trained_steps": n, "warm_start": args.warm_start if mode in WARM else None,
            "warm_start_steps": W if mode in WARM else 0, "restart_every": every if mode == "relora" else None,
            "rewarmup_steps": hooks_cfg["rewarmup_steps"] if mode in WARM else None, "lr": lr,
            "params": total, "trainable_params": trainable, "val_ppl": round(ppl, 2), "seconds": round(seconds, 1), "peak_gib": round(peak, 1),
            "restarts": getattr(hooks, "restarts", 0), "val_ppl_at": {c["step"]: c["val_ppl"] for c in curve if c["step"] in points},
            "curve": curve}


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
    ap.add_argument("--train-seconds", type=float, default=330.0, help="training time of the four runs together (warm-started runs: their low-rank steps)")
    ap.add_argument("--batch", type=int, default=128, help="sequences of 256 tokens per step")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--lr-full", type=float, default=1e-3)
    ap.add_argument("--lr-lora", type=float, default=2e-3)
    ap.add_argument("--warm-fraction", type=float, default=0.25, help="W = round(this x steps) full-rank steps")
    ap.add_argument("--warm-start", choices=("checkpoint", "in-run"), default="checkpoint",
                    help="checkpoint: lora_ws/relora start from the full run's weights at step W (full must "
                         "run before them); in-run: each does its own W full-rank steps at --lr-lora")
    ap.add_argument("--cycles", type=int, default=5, help="ReLoRA cycles after the warm start")
    ap.add_argument("--modes", default="full,lora,lora_ws,relora", help=f"comma-separated, of {', '.join(MODES)}")
    args = ap.parse_args()
    modes = args.modes.split(",")
    if set(modes) - set(MODES):
        ap.error(f"--modes: unknown {sorted(set(modes) - set(MODES))}, expected some of {MODES}")
    full_at = modes.index("full") if "full" in modes else len(modes)
    if args.warm_start == "checkpoint" and WARM & set(modes[:full_at]):
        ap.error("--warm-start checkpoint: lora_ws and relora start from the full run's weights at step W, "
                 "so --modes must have 'full' before them (or use --warm-start in-run)")
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
    steps = args.steps
    if not steps:  # warm-started runs: (1 - warm_fraction) of the steps at LoRA speed, plus in-run
        t_full, t_lora = step_seconds(args, "full", train), step_seconds(args, "lora", train)  # their full-rank phase
        warm = args.warm_fraction * t_full if args.warm_start == "in-run" else 0.0
        per_step = sum(t_full if m == "full" else t_lora if m == "lora" else
                       warm + (1 - args.warm_fraction) * t_lora for m in modes)
        steps = max(8, int(args.train_seconds / per_step))
        steps = steps // 10 * 10 if steps >= 100 else steps
        print(f"calibration: full {t_full * 1e3:.1f} ms/step, lora {t_lora * 1e3:.1f} ms/step -> {steps} steps")
    tokens = steps * args.batch * SEQ
    print(f"{steps} steps x {args.batch} x {SEQ} = {tokens / 1e6:.1f}M tokens per run "
          f"({tokens / train.numel():.2f} epochs)")
    args.warm_steps = W = round(args.warm_fraction * steps)
    if WARM & set(modes) and not 0 < W < steps:
        raise SystemExit(f"--warm-fraction {args.warm_fraction} gives a warm start of {W} of {steps} steps")
    if WARM & set(modes):
        print(f"warm start ({args.warm_start}): {W} full-rank steps; lora_ws and relora then {steps - W} "
              f"low-rank steps" + (" from the full run's step-%d weights" % W if args.warm_start == "checkpoint" else ""))
    every = max(1, steps // 4)  # val perplexity at every quarter, at W and at the end
    points = set(range(every, steps + 1, every)) | {steps} | ({W} if WARM & set(modes) else set())
    order, snapshot = batch_order(train.shape[0], args.batch, steps), {}
    results = [run(args, m, steps, order, train, val, points, snapshot) for m in modes]
    cols = sorted(points)
    print("\n| run | trainable params | " + " | ".join(f"val ppl @{p}" for p in cols) + " | seconds | peak GiB |")
    print("| --- | ---: | " + " | ".join("---:" for _ in cols) + " | ---: | ---: |")
    for r in results:
        at = " | ".join(f"{r['val_ppl_at'][p]:.2f}" if p in r["val_ppl_at"] else "-" for p in cols)
        print(f"| {r['mode']} | {r['trainable_params'] / 1e6:.1f}M of {r['params'] / 1e6:.1f}M "
              f"| {at} | {r['seconds']:.0f} | {r['peak_gib']:.1f} |")
    if args.warm_start == "checkpoint" and WARM & set(modes):
        print(f"(lora_ws, relora: seconds and peak of their {steps - W} low-rank steps; @{W} is the full run's weights)")
    out = {"device": device, "torch": torch.__version__, "steps": steps, "batch": args.batch, "seq": SEQ,
           "tokens_per_run": tokens, "args": {k: v for k, v in vars(args).items()}, "results": results}
    print(json.dumps(out))


if __name__ == "__main__":
    main()

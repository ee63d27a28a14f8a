"""Do efftune and peft train the same? bf16 loss curves on the default model, same data and init.

Loads the default model (SmolLM2-135M-Instruct) twice, attaches LoRA (r=8, alpha=16, all linear
layers, dropout 0) with efftune to one and peft to the other, and copies efftune's initial `A`
factors into peft's (`B` starts at zero in both), so both start from the same adapter. Then:

  efftune  `efftune.train.loop.train` as the main job runs it (tree layout with the shared prompt
           prefix, answer-only log-probs through the chunked LM head, bf16 autocast on GPU)
  peft     a plain loop over the same batches (`example_order`), right-padded, answer-only
           cross-entropy from `model(input_ids, attention_mask).logits`, the same AdamW (fused on
           GPU), warmup + cosine schedule, gradient clipping 1.0, bf16 autocast on GPU
  noise    efftune again with another LoRA init seed: how far two equally valid runs drift
  fp8      (--fp8) efftune with the frozen base linears in FP8 (train.fp8_base), efftune's init

Prints one JSON line with the three loss curves, the per-step |efftune - peft| (max, mean, first
step) and the same statistics for |efftune - noise|, the scale "within noise" is judged by.

    PYTHONPATH=. python bench/loss_curve.py --steps 50 --out runs/loss_curve
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from efftune.data import Formatter, load_task, split_examples
from efftune.data.tokenize import IGNORE
from efftune.methods.lora.config import LoraConfig
from efftune.methods.lora.layer import lora_layers
from efftune.methods.lora.model import add_lora
from efftune.models import load_model
from efftune.schedule import warmup_cosine
from efftune.train.loop import TrainConfig, example_order, train


def efftune_run(sequences, cfg: TrainConfig, init_seed: int, out: Path, args) -> tuple[list[float], dict]:
    model, tok = load_model(args.model)
    torch.manual_seed(init_seed)
    add_lora(model, LoraConfig(r=8, alpha=16))
    init = {name: layer.adapters["default"].lora_A.detach().clone() for name, layer in lora_layers(model)}
    train(model, sequences, cfg, out, pad_id=tok.pad_token_id)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], init


def peft_run(sequences, cfg: TrainConfig, init: dict, args) -> list[float]:
    import peft
    model, tok = load_model(args.model)
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                       target_modules="all-linear"))
    with torch.no_grad():
        for name, module in model.base_model.model.named_modules():
            if name in init:
                module.lora_A["default"].weight.copy_(init[name])
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay,
                            fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    losses = []
    model.train()
    for step in range(cfg.steps):
        batch = [sequences[i] for i in example_order(len(sequences), cfg.seed, step * cfg.batch_size, cfg.batch_size)]
        L = max(len(s) for s in batch)
        ids = torch.full((len(batch), L), tok.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), L), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), L), dtype=torch.long)
        for i, s in enumerate(batch):
            ids[i, :len(s)] = torch.tensor(s.input_ids)
            labels[i, :len(s)] = torch.tensor(s.labels)
            mask[i, :len(s)] = 1
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * warmup_cosine(step, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
        with autocast:
            logits = model(input_ids=ids, attention_mask=mask).logits
        target = labels[:, 1:]
        nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                              ignore_index=IGNORE, reduction="sum")
        loss = nll / (target != IGNORE).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 6))
    return losses


def gaps(a: list[float], b: list[float]) -> dict:
    d = [abs(x - y) for x, y in zip(a, b)]
    return {"first": round(d[0], 6), "max": round(max(d), 6), "mean": round(statistics.mean(d), 6),
            "mean_last10": round(statistics.mean(d[-10:]), 6)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--task", default="intent_recognition")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default="runs/loss_curve")
    ap.add_argument("--fp8", action="store_true", help="also run efftune with train.fp8_base (FP8 GPU)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    _, tok = load_model(args.model)
    formatter = Formatter(tok)
    train_set, _ = split_examples(load_task(args.task), 200, seed=0)
    sequences = [formatter.encode(e) for e in train_set]
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, eval_every=0, save_every=0, warmup_steps=5)
    eff, init = efftune_run(sequences, cfg, 0, out / "efftune", args)
    ref = peft_run(sequences, cfg, init, args)
    noise, _ = efftune_run(sequences, cfg, 1, out / "efftune-seed1", args)
    fp8 = {}
    if args.fp8:
        from dataclasses import replace
        curve, _ = efftune_run(sequences, replace(cfg, fp8_base=True), 0, out / "efftune-fp8", args)
        fp8 = {"fp8_vs_peft": gaps(curve, ref), "fp8_vs_efftune": gaps(curve, eff), "efftune_fp8": curve}
    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(json.dumps({"task": args.task, "steps": args.steps, "batch_size": args.batch_size, "device": device,
                      "efftune_vs_peft": gaps(eff, ref), "efftune_vs_other_init": gaps(eff, noise),
                      **{k: v for k, v in fp8.items() if k != "efftune_fp8"},
                      "efftune": eff, "peft": ref, "efftune_other_init": noise, **fp8}), flush=True)


if __name__ == "__main__":
    main()

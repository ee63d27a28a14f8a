"""`--seed` decides everything: the adapter's initial weights as well as the data order.

torch seeds its generator differently in every process, so before the fix (the seed was set in
`train()`, after the method had attached its weights) two runs of one command started from two
different adapters.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import torch
from safetensors.torch import load_file

from efftune.methods.lora.config import LoraConfig
from efftune.methods.lora.layer import lora_layers
from efftune.methods.lora.model import add_lora
from efftune.train.seed import seed_everything
from tests.conftest import make_tokenizer, tiny_llama

TIMING = {"tokens_per_s", "seconds"}  # the only fields of metrics.jsonl that may differ between runs


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {f"{name}.{n}.{k}": p.detach().clone() for name, layer in lora_layers(model)
            for n, a in layer.adapters.items() for k, p in a.named_parameters()}


def test_attach_after_seeding_is_deterministic():
    weights = []
    for noise in (3, 11):  # a different random state before seeding each time
        torch.rand(noise), random.random(), np.random.rand(noise)
        model = tiny_llama()
        seed_everything(5)
        add_lora(model, LoraConfig(r=2, init="gaussian", dropout=0.1))
        weights.append((lora_weights(model), random.random(), float(np.random.rand())))
    (a, ra, na), (b, rb, nb) = weights
    assert a and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert ra == rb and na == nb  # Python's and numpy's generators are seeded too
    model = tiny_llama()
    seed_everything(6)
    add_lora(model, LoraConfig(r=2, init="gaussian"))
    other = lora_weights(model)
    assert not all(torch.equal(a[k], other[k]) for k in a if "lora_A" in k)  # the seed matters


def _train_in_a_process(model_dir, data, out, hash_seed: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "efftune.cli", "train", "--model", str(model_dir), "--data", str(data),
         "--steps", "3", "--batch-size", "4", "--eval-size", "6", "--eval-every", "2", "--rank", "2",
         "--dropout", "0.1", "--lr", "1e-2", "--seed", "7", "--output", str(out)],
        capture_output=True, text=True, timeout=300, env=env)


def test_two_processes_give_bit_identical_runs(tmp_path):
    model_dir = tmp_path / "tiny"
    tiny_llama().save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    rows = [{"input": f"Q: Is {w} blue?", "choices": ["yes", "no"], "answer": int(w != "sky")}
            for w in ["sky", "grass", "fox", "dog"] * 5]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = []
    for i, hash_seed in enumerate(("1", "2")):  # one after the other, never at once
        out = tmp_path / f"run{i}"
        proc = _train_in_a_process(model_dir, data, out, hash_seed)
        assert proc.returncode == 0, proc.stderr[-3000:]
        metrics = [{k: v for k, v in json.loads(line).items() if k not in TIMING}
                   for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs.append((load_file(out / "adapter" / "adapter_model.safetensors"), metrics))
    (w0, m0), (w1, m1) = runs
    assert w0 and w0.keys() == w1.keys()
    for key in w0:
        assert torch.equal(w0[key], w1[key]), key
    assert any(w0[k].abs().sum() > 0 for k in w0 if "lora_B" in k)  # it trained
    assert len(m0) >= 5 and m0 == m1  # 3 steps and 3 evaluations (0, 2, 3), losses and grad norms exact

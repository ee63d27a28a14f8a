"""MoE balance losses, router statistics and expert loads count a batch's real tokens only: padding is
routed too (the layers see it), but it must not pull the balance. References: the same tokens run
without padding, and the losses written out by hand in float64 (plain Python, no torch)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from efftune.data.layout import Row, collate, training_rows
from efftune.data.tokenize import IGNORE, Encoded
from efftune.moe.layer import SparseMoE, collect_aux_losses, expert_loads, upcycle_mlp
from efftune.moe.router_tap import add_router_taps, hf_router_aux, router_taps
from efftune.moe.routing import RouterConfig
from tests.conftest import tiny_llama
from tests.moe.test_expert_lora import tiny_moe

H, E = 8, 4
LENGTHS = (6, 3)  # real tokens of the two rows; the second is padded to 6


def real_mask(lengths=LENGTHS, width: int | None = None) -> torch.Tensor:
    width = width or max(lengths)
    return torch.tensor([[t < n for t in range(width)] for n in lengths])


def softmax(row: list[float]) -> list[float]:
    top = max(row)
    ex = [math.exp(v - top) for v in row]
    return [e / sum(ex) for e in ex]


def top(p: list[float], k: int) -> list[int]:
    return sorted(range(len(p)), key=lambda e: -p[e])[:k]


def hand_switch_balance(logits: list[list[float]], k: int, coef: float) -> float:
    """Switch's α · E · Σ_i f_i · P_i over these tokens' logits: f_i the share of all top-k picks
    that go to i, P_i the mean probability of i."""
    probs = [softmax(r) for r in logits]
    n_e = len(probs[0])
    counts = [0] * n_e
    for p in probs:
        for e in top(p, k):
            counts[e] += 1
    f = [c / sum(counts) for c in counts]
    mean_p = [sum(p[e] for p in probs) / len(probs) for e in range(n_e)]
    return coef * n_e * sum(f[e] * mean_p[e] for e in range(n_e))


def hand_z_loss(logits: list[list[float]], coef: float) -> float:
    lse = [max(r) + math.log(sum(math.exp(v - max(r)) for v in r)) for r in logits]
    return coef * sum(v * v for v in lse) / len(lse)


def hand_entropy(logits: list[list[float]]) -> float:
    probs = [softmax(r) for r in logits]
    return sum(-sum(q * math.log(q) for q in p) for p in probs) / len(probs)


def two_moe_layers(mode: str = "top_k", **kw) -> nn.Module:
    torch.manual_seed(0)
    cfg = RouterConfig(num_experts=E, mode=mode, top_k=2, aux_loss_coef=0.5, z_loss_coef=0.1, **kw)
    model = nn.Sequential(SparseMoE(H, cfg, intermediate_size=16), SparseMoE(H, cfg, intermediate_size=16)).double()
    for layer in model:
        nn.init.normal_(layer.router.W_r.weight, std=1.0)  # decisive routing, not near-ties
    return model


def padded_input() -> torch.Tensor:
    x = torch.randn(len(LENGTHS), max(LENGTHS), H, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x[~real_mask()] = 50.0  # padding: whatever the embedding of the pad id gives, here far from the real tokens
    return x


def test_efftune_routed_layers_count_real_tokens_as_if_unpadded():
    """Top-k routing is per token, so the padded batch routes its real tokens exactly as the same
    tokens without padding: the masked losses, statistics, loads and the router gradients agree."""
    x, real = padded_input(), real_mask()
    model = two_moe_layers()
    model(x)
    total, stats = collect_aux_losses(model, real)
    loads = expert_loads(model, real)
    padded_grads = torch.autograd.grad(total, [layer.router.W_r.weight for layer in model])
    model(x[real])  # the same tokens, no padding
    unpadded_total, unpadded_stats = collect_aux_losses(model)
    unpadded_loads = expert_loads(model)
    unpadded_grads = torch.autograd.grad(unpadded_total, [layer.router.W_r.weight for layer in model])
    torch.testing.assert_close(total, unpadded_total, rtol=1e-12, atol=0)
    assert stats == pytest.approx(unpadded_stats, rel=1e-12)
    assert loads == unpadded_loads and [sum(r) for r in loads] == [2 * sum(LENGTHS)] * 2  # k = 2 slots a token
    for a, b in zip(padded_grads, unpadded_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    # and the padding did matter: counted over every token the numbers differ
    model(x)
    assert float(collect_aux_losses(model)[0].detach()) != pytest.approx(float(total.detach()), rel=1e-3)


def test_routed_layer_losses_equal_the_hand_written_formulas_over_real_tokens():
    x, real = padded_input(), real_mask()
    model = two_moe_layers()
    model(x)
    _, stats = collect_aux_losses(model, real)
    # the first layer's input is x itself: its router logits by hand from W_r, real tokens only
    w = model[0].router.W_r.weight.detach().tolist()
    tokens = x[real].tolist()
    logits0 = [[sum(a * b for a, b in zip(t, w[e])) for e in range(E)] for t in tokens]
    r0 = model[0].last_routing.over(real.reshape(-1))
    assert float(r0.load_balancing_loss) == pytest.approx(hand_switch_balance(logits0, 2, 0.5), rel=1e-12)
    assert float(r0.z_loss) == pytest.approx(hand_z_loss(logits0, 0.1), rel=1e-12)
    assert float(r0.router_entropy) == pytest.approx(hand_entropy(logits0), rel=1e-12)
    counts = [0.0] * E
    for row in logits0:
        for e in top(softmax(row), 2):
            counts[e] += 1
    assert r0.expert_load.tolist() == counts and float(r0.dropped_fraction) == 0.0
    r1 = model[1].last_routing.over(real.reshape(-1))
    assert stats["load_balancing_loss"] == pytest.approx(
        (float(r0.load_balancing_loss) + float(r1.load_balancing_loss)) / 2, rel=1e-12)


def test_switch_capacity_drops_are_counted_over_real_tokens():
    """Switch keeps its decision (padding still takes queue places), but the statistics and the
    balance loss count the real tokens only."""
    torch.manual_seed(0)
    cfg = RouterConfig(num_experts=E, mode="switch", capacity_factor_train=1.0)
    moe = SparseMoE(H, cfg, intermediate_size=16).double()
    with torch.no_grad():
        moe.router.W_r.weight.zero_()
        moe.router.W_r.weight[0, 0] = 10.0  # feature 0 positive -> expert 0: capacity bites
    x = padded_input()
    x[..., 0] = x[..., 0].abs() + 0.5
    real = real_mask().reshape(-1)
    moe(x)
    r = moe.last_routing
    masked = r.over(real)
    kept = r.kept[:, 0].tolist()
    choice = r.expert_index[:, 0].tolist()
    want_load = [float(sum(1 for t in range(len(kept)) if kept[t] and real[t] and choice[t] == e)) for e in range(E)]
    n_real = int(real.sum())
    assert masked.expert_load.tolist() == want_load
    assert float(masked.dropped_fraction) == pytest.approx(
        sum(1 for t in range(len(kept)) if real[t] and not kept[t]) / n_real, rel=1e-6)  # a float32 share
    logits = x.reshape(-1, H)[real] @ moe.router.W_r.weight.detach().t()
    assert float(masked.load_balancing_loss) == pytest.approx(hand_switch_balance(logits.tolist(), 1, 1e-2),
                                                              rel=1e-12)
    with pytest.raises(ValueError, match="mask of"):
        r.over(real[:-1])


def tap_logits(model: nn.Module) -> list[list[list[float]]]:
    return [t.last_logits.double().tolist() for t in router_taps(model)]


def hand_hf_balance(per_layer_logits: list[list[list[float]]], k: int) -> tuple[float, list[list[float]]]:
    """transformers' balance loss E · Σ_e (picks of e / tokens) · (mean probability of e), tokens
    pooled over all layers, and the picks per layer and expert."""
    n_e = len(per_layer_logits[0][0])
    counts, psum, n = [0] * n_e, [0.0] * n_e, 0
    loads = []
    for layer in per_layer_logits:
        layer_load = [0.0] * n_e
        for row in layer:
            p = softmax(row)
            for e in top(p, k):
                counts[e] += 1
                layer_load[e] += 1
            for e in range(n_e):
                psum[e] += p[e]
            n += 1
        loads.append(layer_load)
    return n_e * sum(counts[e] / n * psum[e] / n for e in range(n_e)), loads


def test_transformers_moe_balance_loss_leaves_padding_out():
    """A tiny Qwen3-MoE: the padded batch's loss, loads and entropy equal the hand-computed ones
    over each row run alone (no padding); the right padding cannot change the real tokens (causal)."""
    model = tiny_moe("qwen3")
    add_router_taps(model)
    lengths, pad = (12, 7), 0
    g = torch.Generator().manual_seed(4)
    rows = [torch.randint(1, 64, (n,), generator=g) for n in lengths]
    ids = torch.full((2, 12), pad)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
    alone = [[], []]  # per layer: the logits of each row run alone
    with torch.no_grad():
        for r in rows:
            model(r[None])
            for layer, logits in enumerate(tap_logits(model)):
                alone[layer] += logits
        model(ids)
    want_loss, want_loads = hand_hf_balance(alone, k=2)
    aux, stats, loads = hf_router_aux(model, real_mask(lengths))
    coef = model.config.router_aux_loss_coef
    assert float(aux) == pytest.approx(coef * want_loss, rel=1e-6)  # the tap sums in float32
    assert stats["load_balancing_loss"] == pytest.approx(coef * want_loss, rel=1e-6)
    assert loads == want_loads and [sum(r) for r in loads] == [2 * sum(lengths)] * 2
    want_entropy = sum(hand_entropy(layer) for layer in alone) / len(alone)
    assert stats["router_entropy"] == pytest.approx(want_entropy, rel=1e-6)  # float32 softmax in the tap
    unmasked, _, unmasked_loads = hf_router_aux(model)
    assert [sum(r) for r in unmasked_loads] == [2 * 24] * 2 and float(unmasked) != pytest.approx(float(aux), rel=1e-3)


def test_collate_marks_the_real_tokens():
    a, b = Row(), Row()
    a.add([5, 6, 7, 8])
    b.add([1, 2])
    b.add([3], parent=0)  # a tree row: still three real tokens
    batch = collate([a, b], pad_id=0, length=6)
    assert batch.real.tolist() == [[True] * 4 + [False] * 2, [True] * 3 + [False] * 3]
    assert batch.to("cpu").real.tolist() == batch.real.tolist()


def test_training_loop_counts_real_tokens_only(tmp_path):
    """One step on a tiny Qwen3-MoE with expert LoRA (B = 0: the step's forward is the base model's)
    over rows of 12, 9 and 5 tokens padded to 12: the logged balance loss and routing.json's loads
    equal the hand-computed ones over each sequence run alone."""
    from efftune.methods.expert_lora import ExpertLoraConfig, add_expert_lora
    from efftune.train.loop import TrainConfig, train
    model = tiny_moe("qwen3", dtype=torch.float32)
    model.config.router_aux_loss_coef = 1.0  # the log keeps 6 decimals: make them count
    add_expert_lora(model, ExpertLoraConfig(r=2))
    g = torch.Generator().manual_seed(7)
    seqs = []
    for n in (12, 9, 5):
        ids = torch.randint(1, 64, (n,), generator=g).tolist()
        seqs.append(Encoded(ids, [IGNORE] * (n - 2) + ids[n - 2:]))
    rows = training_rows(seqs, max_length=12)
    assert [len(r) for r in rows] == [12, 9, 5]  # one sequence a row: two rows padded
    alone = [[], []]
    with torch.no_grad():
        for s in seqs:
            model(torch.tensor([s.input_ids]))
            for layer, logits in enumerate(tap_logits(model)):
                alone[layer] += logits
    want_loss, want_loads = hand_hf_balance(alone, k=2)
    train(model, seqs, TrainConfig(steps=1, batch_size=3, lr=1e-2, warmup_steps=0, eval_every=0, max_length=12),
          tmp_path, pad_id=0)
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert row["load_balancing_loss"] == pytest.approx(want_loss, abs=2e-6)
    assert json.loads((tmp_path / "routing.json").read_text())["expert_load"] == want_loads


def test_training_loop_loads_of_efftune_routed_layers_count_real_tokens(tmp_path):
    """An upcycled tiny Llama (top-2 of 4 experts): each layer's loads add up to 2 × the real tokens."""
    from efftune.attach import replace_module
    from efftune.train.loop import TrainConfig, train
    m = tiny_llama()
    for i, layer in enumerate(m.model.layers):
        replace_module(m, f"model.layers.{i}.mlp", upcycle_mlp(layer.mlp, 4, RouterConfig(num_experts=4)))
    for name, p in m.named_parameters():
        p.requires_grad_("router" in name)
    g = torch.Generator().manual_seed(8)
    seqs = []
    for n in (10, 7, 4):
        ids = torch.randint(3, 300, (n,), generator=g).tolist()
        seqs.append(Encoded(ids, [IGNORE] * (n - 1) + ids[n - 1:]))
    train(m, seqs, TrainConfig(steps=1, batch_size=3, lr=1e-2, warmup_steps=0, eval_every=0, max_length=10),
          tmp_path, pad_id=1)
    loads = json.loads((tmp_path / "routing.json").read_text())["expert_load"]
    assert [sum(r) for r in loads] == [2 * 21.0] * 2  # not 2 × 3 rows × 10
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    # the router starts at zero: uniform probabilities, so the balance loss is exactly α, the z-loss
    # c_z · log(4)² and the entropy log(4), whatever the tokens
    assert row["load_balancing_loss"] == pytest.approx(1e-2, abs=1e-6)
    assert row["z_loss"] == pytest.approx(round(1e-3 * math.log(4) ** 2, 6), abs=1e-9)
    assert row["router_entropy"] == pytest.approx(math.log(4), abs=1e-6)

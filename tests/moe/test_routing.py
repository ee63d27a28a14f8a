"""Routers and SparseMoE against hand-written references (CPU, tiny sizes)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from efftune.errors import ConfigError
from efftune.moe.layer import SparseMoE, SwiGLU, upcycle_mlp
from efftune.moe.routing import Router, RouterConfig, capacity, load_balancing_loss, z_loss

H, I, E = 8, 16, 4


def make_moe(mode: str, dtype=torch.float32, seed: int = 0, **kw) -> SparseMoE:
    torch.manual_seed(seed)
    cfg = RouterConfig(num_experts=E, mode=mode, **kw)
    moe = SparseMoE(H, cfg, intermediate_size=I).to(dtype)
    nn.init.normal_(moe.router.W_r.weight, std=1.0)  # decisive routing, not near-ties
    return moe


def skewed_moe(**kw) -> SparseMoE:
    """A Switch MoE whose router sends almost every token to expert 0, so capacity bites."""
    moe = make_moe("switch", **kw)
    with torch.no_grad():
        moe.router.W_r.weight.zero_()
        moe.router.W_r.weight[0, 0] = 10.0
    return moe


def skewed_input(tokens: int = 32) -> torch.Tensor:
    x = torch.randn(tokens, H)
    x[:, 0] = x[:, 0].abs() + 0.5  # feature 0 positive -> expert 0 wins
    return x


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="router.mode"):
        RouterConfig(num_experts=4, mode="soft")
    with pytest.raises(ConfigError, match="router.top_k"):
        RouterConfig(num_experts=2, top_k=3)
    with pytest.raises(ConfigError, match="router.num_experts"):
        RouterConfig(num_experts=0)
    with pytest.raises(ConfigError, match="router.capacity_factor_eval"):
        RouterConfig(num_experts=2, capacity_factor_eval=0)


def test_switch_respects_capacity_and_drops_to_zero():
    moe = skewed_moe().train()
    x = skewed_input(32)
    y = moe(x)
    r = moe.last_routing
    cap = capacity(32, E, 1.25)
    assert cap == 10
    assert r.expert_load.max() <= cap and r.expert_load[0] == cap
    dropped = ~r.kept[:, 0]
    # each expert keeps its first `cap` tokens: the rest of the 32 are dropped
    sent = torch.bincount(r.expert_index[:, 0], minlength=E).tolist()
    assert sent[0] > cap and r.dropped_fraction.item() == pytest.approx(sum(max(0, n - cap) for n in sent) / 32)
    # the first `cap` tokens sent to expert 0 are kept, in token order
    to_zero = (r.expert_index[:, 0] == 0).nonzero().flatten()
    assert r.kept[to_zero[:cap], 0].all() and not r.kept[to_zero[cap:], 0].any()
    assert (r.weight[dropped] == 0).all()
    assert torch.equal(y[dropped], torch.zeros_like(y[dropped]))
    assert (y[~dropped].abs().sum(-1) > 0).all()


def test_switch_residual_dropped_returns_input():
    moe = skewed_moe()
    moe.residual_dropped = True
    x = skewed_input(32)
    y = moe.train()(x)
    dropped = ~moe.last_routing.kept[:, 0]
    assert dropped.any() and torch.equal(y[dropped], x[dropped])


def test_switch_capacity_differs_between_train_and_eval():
    moe = skewed_moe()
    x = skewed_input(32)
    moe.train()(x)
    train_load = moe.last_routing.expert_load[0]
    moe.eval()(x)
    eval_load = moe.last_routing.expert_load[0]
    assert train_load == capacity(32, E, 1.25) == 10
    assert eval_load == capacity(32, E, 2.0) == 16


def test_expert_choice_each_expert_takes_exactly_c_tokens():
    moe = make_moe("expert_choice", capacity_factor_train=2.0, capacity_factor_eval=1.0)
    x = torch.randn(2, 10, H)  # (batch, seq, hidden): 20 tokens
    for training, c in ((True, math.ceil(20 * 2.0 / E)), (False, math.ceil(20 * 1.0 / E))):
        y = moe.train(training)(x)
        r = moe.last_routing
        assert y.shape == x.shape
        assert r.kept.shape == (20, E)
        assert torch.equal(r.kept.sum(0), torch.full((E,), c))
        assert torch.equal(r.expert_load, torch.full((E,), float(c)))
        # slot e is expert e, and each expert chose its highest-scoring tokens
        assert torch.equal(r.expert_index[0], torch.arange(E))
        for e in range(E):
            chosen = r.probs[r.kept[:, e], e]
            assert chosen.min() >= r.probs[~r.kept[:, e], e].max()


def naive_moe(moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """Per token, per slot: the reference the grouped dispatch must match."""
    r = moe.last_routing
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(r.expert_index.shape[1]):
            if r.kept[t, j]:
                out[t] += r.weight[t, j] * moe.experts[int(r.expert_index[t, j])](x[t])
    return out


@pytest.mark.parametrize("mode", ["top_k", "switch", "expert_choice"])
def test_output_equals_naive_loop_float64(mode):
    moe = make_moe(mode, dtype=torch.float64).train()
    x = torch.randn(24, H, dtype=torch.float64)
    y = moe(x)
    assert moe.last_routing.logits.dtype == torch.float64
    torch.testing.assert_close(y, naive_moe(moe, x), rtol=1e-12, atol=1e-12)


def test_top_k_renormalised_weights_sum_to_one():
    moe = make_moe("top_k", top_k=2)
    moe(torch.randn(16, H))
    r = moe.last_routing
    assert r.expert_index.shape == (16, 2) and r.kept.all()
    torch.testing.assert_close(r.weight.sum(-1), torch.ones(16))
    torch.testing.assert_close(r.weight, r.probs.gather(1, r.expert_index)
                               / r.probs.gather(1, r.expert_index).sum(-1, keepdim=True))
    moe.router.config.renormalize = False
    moe(torch.randn(16, H))
    assert (moe.last_routing.weight.sum(-1) < 1).all()


def test_router_logits_fp32_for_bf16_input():
    moe = make_moe("top_k").to(torch.bfloat16)
    x = torch.randn(5, H, dtype=torch.bfloat16)
    y = moe(x)
    assert y.dtype == torch.bfloat16 and moe.last_routing.logits.dtype == torch.float32


def test_load_balancing_loss_is_alpha_when_uniform_and_grows_with_imbalance():
    alpha, T = 1e-2, 12
    # zero logits: P_i = 1/E, so the loss is α whatever the assignments
    probs = torch.full((T, E), 1 / E)
    assigned = torch.nn.functional.one_hot(torch.arange(T) % E, E)
    assert load_balancing_loss(probs, assigned, alpha).item() == pytest.approx(alpha, abs=1e-9)
    # a balanced but confident router: token t prefers expert t % E -> f_i = P_i = 1/E
    logits = 5.0 * assigned.float()
    assert load_balancing_loss(logits.softmax(-1), assigned, alpha).item() == pytest.approx(alpha, rel=1e-6)
    # every token leaning ever harder towards expert 0
    losses = []
    for s in (0.0, 0.5, 1.0, 2.0, 4.0):
        logits = torch.zeros(T, E)
        logits[:, 0] = s
        logits[:, 1:] = -torch.linspace(0, 0.1, E - 1)  # break ties away from uniform f when s = 0
        probs = logits.softmax(-1)
        top1 = torch.nn.functional.one_hot(probs.argmax(-1), E)
        losses.append(load_balancing_loss(probs, top1, alpha).item())
    assert losses[0] > alpha  # all top-1 on expert 0 while P is near uniform: already above α
    assert all(a < b for a, b in zip(losses, losses[1:]))
    assert losses[-1] == pytest.approx(alpha * E * (1 / (1 + 3 * math.exp(-4))), rel=0.05)


def test_router_losses_through_router():
    cfg = RouterConfig(num_experts=E, mode="switch", aux_loss_coef=0.02, z_loss_coef=0.003)
    router = Router(H, cfg)
    nn.init.zeros_(router.W_r.weight)
    x = torch.randn(16, H)
    r = router(x)
    assert r.load_balancing_loss.item() == pytest.approx(0.02)
    # zero logits: logsumexp = log E for every token
    assert r.z_loss.item() == pytest.approx(0.003 * math.log(E) ** 2)
    assert r.router_entropy.item() == pytest.approx(math.log(E))
    assert r.aux_loss.item() == pytest.approx(0.02 + 0.003 * math.log(E) ** 2)


def test_z_loss_on_given_logits():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 5.0]])
    expected = 1e-3 * ((math.log(math.e + math.e ** 2 + math.e ** 3)) ** 2
                       + (math.log(1 + math.e ** -1 + math.e ** 5)) ** 2) / 2
    assert z_loss(logits, 1e-3).item() == pytest.approx(expected, rel=1e-6)


def test_jitter_only_in_training():
    cfg = RouterConfig(num_experts=E, jitter=0.5)
    router = Router(H, cfg)
    x = torch.randn(16, H)
    router.eval()
    assert torch.equal(router(x).logits, router(x).logits)
    router.train()
    assert not torch.equal(router(x).logits, router(x).logits)


def test_upcycle_one_expert_equals_dense():
    torch.manual_seed(0)
    dense = SwiGLU(H, I)
    moe = upcycle_mlp(dense, 1, RouterConfig(num_experts=1, top_k=1))
    x = torch.randn(3, 5, H)
    torch.testing.assert_close(moe(x), dense(x))


def test_upcycle_identical_experts_renormalised_top_k_equals_dense():
    from tests.conftest import tiny_llama
    mlp = tiny_llama(layers=1).model.layers[0].mlp  # a transformers LlamaMLP
    moe = upcycle_mlp(mlp, E)
    assert torch.equal(moe.router.W_r.weight, torch.zeros(E, 32))
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), mlp(x))
    assert moe.experts[0] is not mlp and moe.experts[0].gate_proj.weight is not mlp.gate_proj.weight
    with pytest.raises(ConfigError, match="num_experts"):
        upcycle_mlp(mlp, 3, RouterConfig(num_experts=4))


@pytest.mark.parametrize("mode", ["top_k", "switch", "expert_choice"])
def test_gradients_reach_router_and_experts(mode):
    moe = make_moe(mode).train()
    x = torch.randn(24, H)
    y = moe(x)
    (y.square().sum() + moe.aux_loss).backward()
    assert moe.router.W_r.weight.grad is not None and moe.router.W_r.weight.grad.abs().sum() > 0
    used = moe.last_routing.expert_load > 0
    for e, expert in enumerate(moe.experts):
        grad = expert.down_proj.weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == bool(used[e])

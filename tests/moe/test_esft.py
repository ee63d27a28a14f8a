"""ESFT: expert affinity, selection, full-weight training of selected experts only, save/load."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from efftune.errors import AdapterError, ConfigError
from efftune.methods.esft import (EsftConfig, EsftExperts, add_esft, add_esft_full, expert_affinity, load_esft,
                                  save_esft, save_selection, select_experts, selection, unload_esft)
from efftune.methods.expert_lora import ExpertLora

from .test_expert_lora import ids, naive_experts, routed_inputs, tiny_moe

L0 = "model.layers.0.mlp.experts"
L1 = "model.layers.1.mlp.experts"


def steered_model(vocab: int = 64):
    """Layer 0's router strongly prefers expert 3, then expert 2, for every token: every
    embedding has a large positive feature 0, and only router rows 3 and 2 read it."""
    model = tiny_moe(vocab=vocab)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 10.0
        gate = model.model.layers[0].mlp.gate.weight
        gate.zero_()
        gate[3, 0], gate[2, 0] = 5.0, 2.5
    return model


def test_config_errors_name_the_field():
    for kwargs, field in [(dict(mode="half"), "esft.mode"), (dict(score="loss"), "esft.score"),
                          (dict(threshold=0.0), "esft.threshold"), (dict(top_fraction=1.5), "esft.top_fraction"),
                          (dict(threshold=0.3, top_fraction=0.2), "esft.threshold"), (dict(r=0), "esft.r"),
                          (dict(max_examples=0), "esft.max_examples")]:
        with pytest.raises(ConfigError, match=field):
            EsftConfig(**kwargs)
    assert EsftConfig().threshold == 0.2 and EsftConfig(top_fraction=0.25).threshold is None


def test_select_experts_threshold_rule_and_top_fraction():
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.25, 0.25, 0.25, 0.25]])
    assert select_experts(scores, threshold=0.5) == [[1], [0, 1]]
    assert select_experts(scores, threshold=0.6) == [[1, 2], [0, 1, 2]]
    assert select_experts(scores * 7, threshold=0.6) == [[1, 2], [0, 1, 2]]  # scores are normalised per layer
    assert select_experts(scores, threshold=1.0) == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert select_experts(scores, top_fraction=0.25) == [[1], [0]]
    with pytest.raises(ConfigError):
        select_experts(scores)


def test_affinity_finds_the_dominant_expert():
    model = steered_model()
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :5] = 0
    aff = expert_affinity(model, [ids(), {"input_ids": ids(seed=2), "attention_mask": mask}])
    assert aff.layers == [L0, L1] and aff.tokens == 24 + 19
    assert aff.token[0, 3] == pytest.approx(0.5) and aff.token[0, 2] == pytest.approx(0.5)
    assert aff.gate[0, 3] > 0.99 and aff.gate[0].sum() == pytest.approx(1.0)  # top-k renormalised
    assert torch.allclose(aff.token.sum(-1), torch.ones(2, dtype=torch.float64))
    chosen = selection(aff, EsftConfig(threshold=0.9))
    assert chosen[L0] == [3]
    assert not any(type(m).__name__ == "RouterTap" for m in model.modules())  # taps removed again


def test_full_mode_trains_only_selected_experts(tmp_path):
    model = tiny_moe()
    x = ids()
    with torch.no_grad():
        ref = model(x).logits
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    chosen = {L0: [1, 6], L1: [0]}
    add_esft_full(model, chosen)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref, rtol=1e-10, atol=1e-10)  # starts unchanged
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{L0}.gate_up_proj", f"{L0}.down_proj", f"{L1}.gate_up_proj", f"{L1}.down_proj"}
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        model(x).logits.square().mean().backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():  # every fused base weight (and everything else) untouched
        if not p.requires_grad:
            assert torch.equal(p, before[n.replace(".base_layer", "")]), n
    layer = model.get_submodule(L0)
    assert not torch.equal(layer.gate_up_proj, before[f"{L0}.gate_up_proj"][[1, 6]])  # the selected moved
    with torch.no_grad():
        trained = model(x).logits
    save_esft(model, tmp_path / "e", EsftConfig())
    tensors = load_file(str(tmp_path / "e" / "esft_model.safetensors"))
    assert tensors[f"{L0}.gate_up_proj"].shape == (2, 32, 32) and tensors[f"{L1}.down_proj"].shape == (1, 32, 16)
    fresh = tiny_moe()
    load_esft(fresh, tmp_path / "e")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, trained, rtol=0, atol=0)
        unload_esft(fresh, merge=True)  # written back into the fused weights
        torch.testing.assert_close(fresh(x).logits, trained, rtol=1e-10, atol=1e-10)
    assert not any(isinstance(m, EsftExperts) for m in fresh.modules())
    cfg = json.loads((tmp_path / "e" / "esft_config.json").read_text())
    cfg["experts"][L0] = [1, 2, 6]
    (tmp_path / "e" / "esft_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="gate_up_proj.*shape"):
        load_esft(tiny_moe(), tmp_path / "e")


@pytest.mark.parametrize("experts", [[1, 5, 6], list(range(8))])
def test_trained_experts_gradients_equal_a_per_expert_loop(experts):
    """Values and gradients (input, routing weights, the trained experts' weights) against the experts
    one matrix at a time, float64: the trained experts' rows of gate_up are gathered again in backward."""
    from types import SimpleNamespace
    base = tiny_moe().model.layers[0].mlp.experts.requires_grad_(False)
    layer = EsftExperts(base, experts)
    x, idx, w, dy = routed_inputs()
    params = [x, w, layer.gate_up_proj, layer.down_proj]
    grads = torch.autograd.grad((layer(x, idx, w) * dy).sum(), params)
    ids_ = torch.tensor(experts)
    full = SimpleNamespace(act_fn=base.act_fn, **{name: getattr(base, name).index_copy(0, ids_, getattr(layer, name))
                                                  for name in ("gate_up_proj", "down_proj")})
    ref = naive_experts(full, x, idx, w, {}, experts)
    for g, r in zip(grads, torch.autograd.grad((ref * dy).sum(), params)):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10)


def test_lora_mode_from_selection_file(tmp_path):
    save_selection({L0: [3], L1: [0, 2]}, tmp_path / "sel.json")
    model = tiny_moe()
    add_esft(model, EsftConfig(mode="lora", r=2, selection=str(tmp_path / "sel.json")))
    layer = model.get_submodule(L1)
    assert isinstance(layer, ExpertLora) and layer.experts == [0, 2]
    assert layer.lora["gate_up_proj"].lora_A.shape == (2, 2, 32)
    with pytest.raises(ConfigError, match="esft.selection"):
        add_esft(tiny_moe(), EsftConfig(selection=str(tmp_path / "missing.json")))


def test_attach_measures_affinity_on_data(tmp_path, tokenizer):
    rows = [{"prompt": "Q: Is the sky blue?\nA:", "completion": " yes"}, {"text": "The quick brown fox."}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    model = steered_model(vocab=300)
    add_esft(model, EsftConfig(threshold=0.9, data=str(tmp_path / "d.jsonl")), tokenizer)
    assert model.get_submodule(L0).experts == [3]


def test_dense_model_is_refused_with_a_clear_error():
    from tests.conftest import tiny_llama
    with pytest.raises(ConfigError, match="no fused-experts module"):
        add_esft(tiny_llama(), EsftConfig())

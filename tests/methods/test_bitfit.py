import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from efftune.attach import wrappers
from efftune.errors import AdapterError, ConfigError, TargetError
from efftune.methods.bitfit import AddedBias, BitFitConfig, add_bitfit, load_bitfit, save_bitfit, unload_bitfit
from tests.conftest import tiny_llama

IDS = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
ADD = BitFitConfig(add_biases=True)


def logits(m, ids=IDS):
    with torch.no_grad():
        return m(input_ids=ids).logits


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=4, n_positions=64)).eval()


def randomize_biases(model, std: float = 0.2, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def test_llama_has_no_biases_unless_added(model):
    with pytest.raises(ConfigError, match="none of the targeted modules has a bias.*bitfit.add_biases"):
        add_bitfit(model)
    assert all(p.requires_grad for p in model.parameters())  # left untouched


def test_added_biases_start_at_base(model):
    base = logits(model)
    paths = add_bitfit(model, ADD)
    assert len(paths) == 2 * 7 and not any("lm_head" in p for p in paths)
    assert isinstance(model.model.layers[0].mlp.up_proj, AddedBias)
    assert torch.equal(logits(model), base)


@pytest.mark.parametrize("make, cfg", [(tiny_llama, ADD), (tiny_gpt2, BitFitConfig())])
def test_only_biases_get_gradients(make, cfg):
    model = make()
    add_bitfit(model, cfg)
    randomize_biases(model)
    model.train()
    model(input_ids=IDS).logits.sum().backward()
    trained = set()
    for name, p in model.named_parameters():
        mine = name.endswith(".bias")
        assert p.requires_grad == mine, name
        if mine:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            trained.add(name)
        else:
            assert p.grad is None, name
    if make is tiny_gpt2:  # the model's own linear and LayerNorm biases, no wrappers needed
        assert "transformer.h.0.ln_1.bias" in trained and "transformer.ln_f.bias" in trained
        assert "transformer.h.0.attn.c_attn.bias" in trained and not list(wrappers(model, AddedBias))


def test_norms_off_and_partial_targets_on_gpt2():
    model = tiny_gpt2()
    paths = add_bitfit(model, BitFitConfig(target_modules=["c_attn"], norms=False))
    assert paths == ["transformer.h.0.attn.c_attn"]


def test_merge_folds_added_bias_into_a_linear(model):
    base = logits(model)
    add_bitfit(model, ADD)
    randomize_biases(model)
    adapted = logits(model)
    assert not torch.allclose(adapted, base)
    bias = model.model.layers[1].self_attn.o_proj.bias.detach().clone()
    unload_bitfit(model)
    layer = model.model.layers[1].self_attn.o_proj
    assert type(layer) is nn.Linear and torch.equal(layer.bias, bias)
    torch.testing.assert_close(logits(model), adapted, atol=1e-6, rtol=0)


def test_unload_without_merge_restores_base(model):
    base = logits(model)
    add_bitfit(model, ADD)
    randomize_biases(model)
    unload_bitfit(model, merge=False)
    assert model.model.layers[0].self_attn.q_proj.bias is None
    assert torch.equal(logits(model), base)


@pytest.mark.parametrize("make, cfg", [(tiny_llama, ADD), (tiny_gpt2, BitFitConfig())])
def test_save_load_round_trip(tmp_path, make, cfg):
    m = make()
    add_bitfit(m, cfg)
    randomize_biases(m)
    save_bitfit(m, tmp_path / "bf", cfg, metadata={"step": 2})
    saved = json.loads((tmp_path / "bf" / "bitfit_config.json").read_text())
    assert saved["method"] == "bitfit" and saved["efftune"] == {"step": 2}
    assert set(load_file(str(tmp_path / "bf" / "bitfit_model.safetensors"))) == {
        n for n, p in m.named_parameters() if p.requires_grad}
    m2 = make()
    assert load_bitfit(m2, tmp_path / "bf") == cfg
    torch.testing.assert_close(logits(m2), logits(m), atol=0, rtol=0)


def test_target_matching_nothing(model):
    with pytest.raises(TargetError, match="query"):
        add_bitfit(model, BitFitConfig(target_modules=["query"], add_biases=True))


def test_config_error_names_the_field():
    with pytest.raises(ConfigError, match="bitfit.target_modules"):
        BitFitConfig(target_modules=[], norms=False)


def test_bad_shape_and_unknown_key_are_named(tmp_path, model):
    add_bitfit(model, ADD)
    save_bitfit(model, tmp_path / "bf", ADD)
    path = tmp_path / "bf" / "bitfit_model.safetensors"
    tensors = load_file(str(path))
    key = "model.layers.0.self_attn.k_proj.bias"
    tensors[key] = torch.zeros(32)
    save_file(tensors, str(path))
    m = tiny_llama()
    with pytest.raises(AdapterError, match=r"k_proj\.bias.*\(32,\).*\(16,\)"):
        load_bitfit(m, tmp_path / "bf")
    assert not list(wrappers(m, AddedBias))
    tensors["model.layers.0.self_attn.nope.bias"] = tensors.pop(key)
    save_file(tensors, str(path))
    with pytest.raises(AdapterError, match="nope.bias"):
        load_bitfit(tiny_llama(), tmp_path / "bf")

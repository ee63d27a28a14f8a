import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from efftune.errors import AdapterError, ConfigError, TargetError
from efftune.methods.bottleneck import (BottleneckAdapter, BottleneckConfig, add_bottleneck, bottleneck_adapters,
                                        load_bottleneck, save_bottleneck, unload_bottleneck)
from tests.conftest import tiny_llama

IDS = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))


def logits(m, ids=IDS):
    with torch.no_grad():
        return m(input_ids=ids).logits


def randomize_up(model, std: float = 0.3, seed: int = 1) -> None:
    """Give every W_up a non-zero value so the adapters change the output (and W_down gets a gradient)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, adapter in bottleneck_adapters(model):
            for p in adapter.adapter_up.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * std)


def test_init_equals_base_and_placements():
    model = tiny_llama()
    base = logits(model)
    assert add_bottleneck(model, BottleneckConfig(bottleneck_size=4)) == [
        f"model.layers.{i}.{s}" for i in range(2) for s in ("self_attn", "mlp")]
    assert torch.equal(logits(model), base)
    pfeiffer = tiny_llama()
    assert add_bottleneck(pfeiffer, BottleneckConfig(bottleneck_size=4, placement="pfeiffer")) == [
        "model.layers.0.mlp", "model.layers.1.mlp"]
    assert torch.equal(logits(pfeiffer), base)


def test_adapter_is_residual_bottleneck_on_first_output():
    class Attn(nn.Module):  # returns (hidden, weights) like attention modules
        def forward(self, hidden_states):
            return hidden_states * 2, "weights"
    torch.manual_seed(0)
    adapter = BottleneckAdapter(Attn(), hidden_size=6, bottleneck_size=3, activation="gelu").double()
    nn.init.normal_(adapter.adapter_up.weight)
    h = torch.randn(2, 5, 6, dtype=torch.float64)
    out, weights = adapter(hidden_states=h)
    down, up = adapter.adapter_down, adapter.adapter_up
    expected = 2 * h + nn.functional.gelu(2 * h @ down.weight.T + down.bias) @ up.weight.T + up.bias
    torch.testing.assert_close(out, expected)
    assert weights == "weights"


def test_only_adapter_parameters_get_gradients(model):
    add_bottleneck(model, BottleneckConfig(bottleneck_size=4, activation="silu"))
    randomize_up(model)
    model.train()
    model(input_ids=IDS).logits.sum().backward()
    for name, p in model.named_parameters():
        mine = ".adapter_down." in name or ".adapter_up." in name
        assert p.requires_grad == mine, name
        if mine:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_generate_with_cache_and_unload(model):
    base = logits(model)
    add_bottleneck(model, BottleneckConfig(bottleneck_size=4))
    randomize_up(model)
    assert not torch.allclose(logits(model), base)
    out = model.generate(IDS[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)
    unload_bottleneck(model)
    assert not list(bottleneck_adapters(model))
    assert torch.equal(logits(model), base)


def test_save_load_round_trip(tmp_path, model):
    cfg = BottleneckConfig(bottleneck_size=4, placement="pfeiffer", activation="gelu")
    add_bottleneck(model, cfg)
    randomize_up(model)
    save_bottleneck(model, tmp_path / "b", cfg, metadata={"step": 1})
    saved = json.loads((tmp_path / "b" / "bottleneck_config.json").read_text())
    assert saved["placement"] == "pfeiffer" and saved["efftune"] == {"step": 1}
    tensors = load_file(str(tmp_path / "b" / "bottleneck_model.safetensors"))
    assert tensors["model.layers.1.mlp.adapter_down.weight"].shape == (4, 32) and len(tensors) == 2 * 4
    m2 = tiny_llama()
    assert load_bottleneck(m2, tmp_path / "b") == cfg
    torch.testing.assert_close(logits(m2), logits(model), atol=0, rtol=0)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="bottleneck.placement"):
        BottleneckConfig(placement="middle")
    with pytest.raises(ConfigError, match="bottleneck.activation"):
        BottleneckConfig(activation="tanh")
    with pytest.raises(ConfigError, match="bottleneck.bottleneck_size"):
        BottleneckConfig(bottleneck_size=0)


def test_target_matching_nothing(model):
    with pytest.raises(TargetError, match="ffn"):
        add_bottleneck(model, BottleneckConfig(placement="pfeiffer", ffn_module="ffn"))


def test_bad_shape_and_unknown_key_are_named(tmp_path, model):
    cfg = BottleneckConfig(bottleneck_size=4)
    add_bottleneck(model, cfg)
    save_bottleneck(model, tmp_path / "b", cfg)
    torch.manual_seed(0)
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(AdapterError, match=r"layers\.0\.self_attn\.adapter_down\.weight.*\(4, 32\).*\(4, 48\)"):
        load_bottleneck(wider, tmp_path / "b")
    assert not list(bottleneck_adapters(wider))
    path = tmp_path / "b" / "bottleneck_model.safetensors"
    tensors = load_file(str(path))
    tensors["model.layers.0.mlp.adapter_side.weight"] = torch.zeros(2)
    save_file(tensors, str(path))
    with pytest.raises(AdapterError, match="adapter_side.weight"):
        load_bottleneck(tiny_llama(), tmp_path / "b")

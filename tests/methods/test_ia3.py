import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from efftune.errors import AdapterError, ConfigError, TargetError
from efftune.methods.ia3 import (IA3Config, IA3Layer, add_ia3, ia3_layers, load_ia3, merge_ia3, save_ia3, unload_ia3,
                                 unmerge_ia3)
from tests.conftest import tiny_llama

IDS = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))


def logits(m, ids=IDS):
    with torch.no_grad():
        return m(input_ids=ids).logits


def randomize_ia3(model, std: float = 0.3, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in ia3_layers(model):
            layer.ia3_l.copy_(1 + torch.randn(layer.ia3_l.shape, generator=g) * std)


def trained(tmp_path, cfg=None):
    m = tiny_llama()
    add_ia3(m, cfg)
    randomize_ia3(m)
    save_ia3(m, tmp_path / "ia3", cfg, metadata={"step": 3})
    return m, tmp_path / "ia3"


def test_init_equals_base_and_default_targets(model):
    base = logits(model)
    names = add_ia3(model)
    assert names == [f"model.layers.{i}.{p}" for i in range(2)
                     for p in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")]
    assert torch.equal(logits(model), base)
    shapes = {n.rsplit(".", 1)[-1]: tuple(layer.ia3_l.shape) for n, layer in ia3_layers(model)}
    assert shapes == {"k_proj": (16, 1), "v_proj": (16, 1), "down_proj": (1, 64)}  # peft's shapes


def test_scales_output_or_input_as_written():
    torch.manual_seed(0)
    base = nn.Linear(5, 3).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    out, ff = IA3Layer(base, is_feedforward=False), IA3Layer(base, is_feedforward=True)
    nn.init.normal_(out.ia3_l)
    nn.init.normal_(ff.ia3_l)
    torch.testing.assert_close(out(x), (x @ base.weight.T + base.bias) * out.ia3_l.T)
    torch.testing.assert_close(ff(x), (x * ff.ia3_l) @ base.weight.T + base.bias)


def test_only_ia3_vectors_get_gradients(model):
    add_ia3(model)
    randomize_ia3(model)
    model.train()
    model(input_ids=IDS).logits.sum().backward()
    for name, p in model.named_parameters():
        mine = name.endswith(".ia3_l")
        assert p.requires_grad == mine, name
        if mine:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_merged_equals_unmerged_and_unmerge_restores(model):
    w0 = {n: p.clone() for n, p in model.named_parameters()}
    add_ia3(model)
    randomize_ia3(model)
    adapted = logits(model)
    assert not torch.allclose(adapted, logits(tiny_llama()))
    merge_ia3(model)
    torch.testing.assert_close(logits(model), adapted, atol=1e-5, rtol=0)
    unmerge_ia3(model)
    torch.testing.assert_close(logits(model), adapted, atol=1e-5, rtol=0)
    for name, layer in ia3_layers(model):
        torch.testing.assert_close(layer.base_layer.weight, w0[name + ".weight"], atol=1e-6, rtol=0)
    unload_ia3(model)
    assert not list(ia3_layers(model)) and isinstance(model.model.layers[0].mlp.down_proj, nn.Linear)
    torch.testing.assert_close(logits(model), adapted, atol=1e-5, rtol=0)


def test_merge_with_bias_and_conv1d_on_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=4, n_positions=64)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
    b0 = m.transformer.h[0].attn.c_attn.bias.clone()
    add_ia3(m, IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"]))
    randomize_ia3(m)
    ids = torch.randint(0, 100, (2, 8))
    adapted = logits(m, ids)
    merge_ia3(m)
    torch.testing.assert_close(logits(m, ids), adapted, atol=1e-5, rtol=0)
    unmerge_ia3(m)
    torch.testing.assert_close(m.transformer.h[0].attn.c_attn.base_layer.bias, b0, atol=1e-6, rtol=0)


def test_save_load_round_trip(tmp_path):
    m, d = trained(tmp_path)
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "IA3" and cfg["feedforward_modules"] == ["down_proj"]
    assert cfg["target_modules"] == ["k_proj", "v_proj", "down_proj"] and cfg["efftune"] == {"step": 3}
    assert load_file(str(d / "adapter_model.safetensors"))[
        "base_model.model.model.layers.1.mlp.down_proj.ia3_l"].shape == (1, 64)
    m2 = tiny_llama()
    loaded = load_ia3(m2, d)
    assert loaded == IA3Config()
    torch.testing.assert_close(logits(m2), logits(m), atol=0, rtol=0)


@pytest.mark.parametrize("cfg", [None, IA3Config(target_modules=r"model\.layers\.1\.(self_attn\.v_proj|mlp\.down_proj)",
                                                 feedforward_modules=r".*down_proj")])
def test_peft_loads_our_adapter(tmp_path, cfg, peft):
    m, d = trained(tmp_path, cfg)
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(d)).eval()
    torch.testing.assert_close(logits(pm), logits(m), atol=1e-5, rtol=0)


def test_we_load_peft_adapter(tmp_path, peft):
    pcfg = peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    pm = peft.get_peft_model(tiny_llama(), pcfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    pm.eval()
    pm.save_pretrained(str(tmp_path / "p"))
    m = tiny_llama()
    assert load_ia3(m, tmp_path / "p").feedforward_modules == ["down_proj"]
    torch.testing.assert_close(logits(m), logits(pm), atol=1e-5, rtol=0)


def test_target_matching_nothing(model):
    with pytest.raises(TargetError, match="query"):
        add_ia3(model, IA3Config(target_modules=["query"], feedforward_modules=[]))


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="ia3.feedforward_modules.*'up_proj'"):
        IA3Config(target_modules=["k_proj"], feedforward_modules=["up_proj"])
    with pytest.raises(ConfigError, match="ia3.target_modules"):
        IA3Config(target_modules=[])


def test_bad_shape_names_the_key(tmp_path):
    _, d = trained(tmp_path)
    path = d / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = "base_model.model.model.layers.0.self_attn.k_proj.ia3_l"
    tensors[key] = torch.ones(1, 32)  # as if k_proj were feedforward
    save_file(tensors, str(path))
    m = tiny_llama()
    with pytest.raises(AdapterError, match=r"k_proj\.ia3_l.*\(1, 32\).*\(16, 1\)"):
        load_ia3(m, d)
    assert not list(ia3_layers(m))
    tensors["base_model.model.model.layers.0.mlp.up_proj.weight"] = tensors.pop(key)
    save_file(tensors, str(path))
    with pytest.raises(AdapterError, match="up_proj.weight.*not an"):
        load_ia3(tiny_llama(), d)

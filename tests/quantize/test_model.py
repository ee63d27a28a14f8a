"""quantize_model on tiny Llamas: LoRA on a quantised base against the dequantised base in float64,
no gradient into the base, adapters saved and loaded across bases, refusals."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from efftune.config import load_config
from efftune.errors import ConfigError, EfftuneError
from efftune.attach import trainable_parameters
from efftune.methods.lora import LoraConfig, add_lora, load_adapter, lora_layers, merge_lora, save_adapter
from efftune.quantize import (Int8Linear, Nf4Linear, QuantizedLinear, dequantize_model, quantize_model,
                              quantized_layers)
from tests.conftest import randomize_lora, tiny_llama


def llama64(dtype=torch.float64, seed: int = 0) -> LlamaForCausalLM:
    """A tiny Llama whose linears all take NF4 (inputs of 64 and 128)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, attn_implementation="sdpa", initializer_range=0.2)
    return LlamaForCausalLM(cfg).to(dtype).eval()


IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
KINDS = [("nf4", Nf4Linear), ("int8", Int8Linear)]


@pytest.mark.parametrize("kind,cls", KINDS)
def test_quantize_model_replaces_the_block_linears_only(kind, cls):
    model = llama64(torch.float32)
    total = trainable_parameters(model)[1]
    report = quantize_model(model, kind)
    assert len(report.quantized) == 2 * 7 and not report.skipped
    assert trainable_parameters(model)[1] == total  # a quantised weight still counts as its elements
    assert all(isinstance(model.get_submodule(p), cls) for p in report.quantized)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert report.bytes_after < report.bytes_before / (3.5 if kind == "nf4" else 1.9)
    assert "14 linear layers" in report.summary()
    assert model(IDS).logits.isfinite().all()


def test_layers_that_do_not_divide_into_blocks_stay_and_are_named():
    model = tiny_llama()  # hidden 32: only down_proj (input 64) takes NF4's blocks of 64
    report = quantize_model(model, "nf4")
    assert sorted(p.rsplit(".", 1)[-1] for p in report.quantized) == ["down_proj", "down_proj"]
    assert "model.layers.0.self_attn.q_proj" in report.skipped
    assert "not a multiple of 64" in report.summary() and "model.layers.0.self_attn.q_proj" in report.summary()
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert len(quantize_model(tiny_llama(), "int8").quantized) == 14  # int8: any shape


def dense_twin(model: nn.Module) -> nn.Module:
    """The same model with every quantised linear a plain nn.Linear of its dequantised weight: the
    float64 reference."""
    twin = copy.deepcopy(model)
    assert dequantize_model(twin) == len(quantized_layers(model))
    return twin


@pytest.mark.parametrize("kind,cls", KINDS)
def test_lora_on_a_quantised_base_equals_lora_on_its_dequantised_weights(kind, cls):
    model = llama64()
    quantize_model(model, kind)
    add_lora(model, LoraConfig(r=4, alpha=8))
    randomize_lora(model)
    twin = dense_twin(model)
    assert not quantized_layers(twin)
    out, ref = model(IDS).logits, twin(IDS).logits
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    out.square().mean().backward()
    ref.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    ref_grads = {n: p.grad for n, p in twin.named_parameters() if p.requires_grad}
    assert grads.keys() == ref_grads.keys() and all("lora_" in n for n in grads) and len(grads) == 2 * 2 * 7
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-9, atol=1e-12, msg=name)
        assert g.abs().sum() > 0, name
    # nothing of a quantised layer is a parameter that trains, or holds a gradient
    for _, layer in lora_layers(model):
        assert isinstance(layer.base_layer, cls)
        assert all(not p.requires_grad and p.grad is None for p in layer.base_layer.parameters())
        assert all(b.grad is None for b in layer.base_layer.buffers())


def test_backward_keeps_no_dense_weight():
    """The matmul's autograd node holds the quantised tensors only (the dense weight is made again
    in backward): its saved tensors are uint8/int8 and fp32 scales, none of the weight's shape in
    the compute dtype."""
    layer = Nf4Linear(nn.Linear(128, 64, bias=False))
    x = torch.randn(5, 128, requires_grad=True)
    y = layer(x)
    saved = [t for t in y.grad_fn.saved_tensors]
    assert {t.dtype for t in saved} <= {torch.uint8, torch.int8, torch.float32}
    assert not any(t.shape == (64, 128) for t in saved)
    y.sum().backward()
    torch.testing.assert_close(x.grad, layer.dequantize().sum(0).expand(5, -1))


def test_the_weight_reads_dequantised_and_refuses_writes():
    linear = nn.Linear(64, 32).double()
    layer = Int8Linear(linear)
    assert layer.weight.shape == (32, 64) and layer.weight.dtype == torch.float64
    torch.testing.assert_close(layer.weight, linear.weight.detach(), rtol=0, atol=linear.weight.abs().max().item() / 254)
    with pytest.raises(RuntimeError, match="nference"):
        layer.weight.add_(1.0)
    # a cast moves the compute dtype, never the scales
    layer.to(torch.bfloat16)
    assert layer.dtype == torch.bfloat16 and layer.scale.dtype == torch.float32 and layer.q.dtype == torch.int8
    assert layer(torch.randn(3, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_merging_into_a_quantised_base_fails_loudly_and_dequantize_model_makes_it_mergeable():
    model = llama64()
    quantize_model(model, "nf4")
    add_lora(model, LoraConfig(r=4))
    randomize_lora(model)
    expected = model(IDS).logits
    with pytest.raises(EfftuneError, match=r"merge: the base weight is quantised \(nf4\).*dequantize_model"):
        merge_lora(model)
    assert not any(layer.merged for _, layer in lora_layers(model))  # refused before any layer changed
    dequantize_model(model)
    merge_lora(model)
    torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-9, atol=1e-9)


def test_adapter_saved_on_a_quantised_base_loads_on_a_quantised_and_on_the_original_base(tmp_path):
    model = llama64(torch.float32)
    quantize_model(model, "nf4")
    cfg = LoraConfig(r=4, alpha=8)
    add_lora(model, cfg)
    randomize_lora(model)
    expected = model(IDS).logits
    save_adapter(model, tmp_path / "a", cfg)
    state = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    again = llama64(torch.float32)  # same seed: same weights, quantised the same way
    quantize_model(again, "nf4")
    load_adapter(again, tmp_path / "a")
    torch.testing.assert_close(again(IDS).logits, expected, rtol=0, atol=0)

    plain = llama64(torch.float32)
    load_adapter(plain, tmp_path / "a")
    loaded = {n: p.detach() for n, p in plain.named_parameters() if "lora_" in n}
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[n], state[n]) for n in state)
    # it runs as the same adapter attached to the original base by hand
    ref = llama64(torch.float32)
    add_lora(ref, cfg)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_" in n:
                p.copy_(state[n])
    torch.testing.assert_close(plain(IDS).logits, ref(IDS).logits, rtol=0, atol=0)


def test_a_method_attached_before_keeps_its_trainable_linears():
    model = llama64(torch.float32)
    add_lora(model, LoraConfig(r=4))
    report = quantize_model(model, "int8")
    assert all(p.endswith(".base_layer") for p in report.quantized) and len(report.quantized) == 14
    assert all(isinstance(layer.base_layer, Int8Linear) for _, layer in lora_layers(model))


def test_refusals():
    model = llama64(torch.float32)
    with pytest.raises(ConfigError, match="nf5"):
        quantize_model(model, "nf5")
    quantize_model(model, "nf4")
    with pytest.raises(ConfigError, match="quantised already"):
        quantize_model(model, "int8")
    with pytest.raises(ConfigError, match="no decoder blocks"):
        quantize_model(nn.Sequential(nn.Linear(64, 64)), "nf4")


@pytest.mark.parametrize("overrides,words", [
    ({"quantize": "nf5"}, ["quantize", "nf5", "nf4"]),
    ({"quantize": "nf4", "method": "relora"}, ["quantize: nf4", "method: relora"]),
    ({"quantize": "nf4", "method": "full"}, ["quantize: nf4", "method: full"]),
    ({"quantize": "int8", "train": {"fp8_base": True}}, ["quantize: int8", "train.fp8_base"]),
])
def test_the_config_refuses_up_front(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert all(w in str(err.value) for w in words), str(err.value)
    assert load_config(None, {"quantize": "nf4"}).quantize == "nf4"
    assert load_config(None, {"method": "full"}).quantize == "none"  # the default refuses nothing


def test_quantised_layers_are_found_as_linears():
    """`all-linear` targets and MixLoRA's gated-MLP check see them (they subclass nn.Linear)."""
    model = llama64(torch.float32)
    quantize_model(model, "nf4")
    assert isinstance(model.model.layers[0].mlp.gate_proj, QuantizedLinear)
    assert len(add_lora(model, LoraConfig(r=2))) == 14


def test_packed_tensors_are_frozen_integer_parameters_under_the_buffers_keys():
    """What FSDP2 shards (tests/train/test_distributed.py): the codes and int8 scales are parameters
    that cannot train; the state dict keys are as before; the weight counts as its elements."""
    model = llama64()
    total = trainable_parameters(model)[1]
    quantize_model(model, "nf4")
    layer = model.model.layers[0].mlp.down_proj
    assert {n: p.dtype for n, p in layer.named_parameters()} == {"codes": torch.uint8, "scale_q": torch.int8}
    assert not any(p.requires_grad for p in layer.parameters())
    assert {n for n, _ in layer.named_buffers()} == {"scale_scale", "scale_mean", "code"}
    assert set(layer.state_dict()) == {"codes", "scale_q", "scale_scale", "scale_mean"}
    assert trainable_parameters(model)[1] == total


def test_bottleneck_adapters_on_a_quantised_base_take_the_base_dtype():
    """A sublayer whose linears are all quantised has no floating-point weight: the adapter takes
    the embeddings' dtype (float64 here), not the codes'."""
    from efftune.methods.bottleneck import BottleneckConfig, add_bottleneck, bottleneck_adapters
    model = llama64()
    quantize_model(model, "nf4")
    add_bottleneck(model, BottleneckConfig())
    assert all(p.dtype == torch.float64 for _, a in bottleneck_adapters(model) for p in a.parameters()
               if p.requires_grad)
    assert model(IDS).logits.isfinite().all()


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_training_step_with_the_compiled_dequantisation_gives_the_eager_bits(kind, monkeypatch):
    """What a GPU runs (`linear.compiled_on_gpu`: the dequantisation compiled, inside the fused LoRA and
    SwiGLU ops' forward and backward and the plain quantised matmul), forced onto the CPU: the loss and
    every LoRA gradient bit for bit as eager, in bf16, with one graph per dtype for all the layers."""
    from torch._dynamo.utils import counters

    from efftune.quantize import linear

    def step(model):
        loss = model(IDS).logits.float().square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    model = llama64(torch.bfloat16)
    quantize_model(model, kind)
    add_lora(model, LoraConfig(r=4, alpha=8))
    randomize_lora(model)
    model.train()
    twin = copy.deepcopy(model)
    eager_loss, eager_grads = step(model)
    real = linear.compiled_on_gpu
    monkeypatch.setattr(linear, "compiled_on_gpu", lambda fn, device: real(fn, torch.device("cuda")))
    torch._dynamo.reset()
    counters.clear()
    loss, grads = step(twin)
    assert counters["stats"]["unique_graphs"] >= 1  # the compiled form ran
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    assert torch.equal(loss, eager_loss)
    assert grads.keys() == eager_grads.keys() and len(grads) == 2 * 2 * 7
    for name, g in grads.items():
        assert torch.equal(g, eager_grads[name]), name
    torch._dynamo.reset()

"""NF4 / int8 fused 3-D MoE experts (efftune.quantize.experts) on a tiny Qwen3-MoE in float64:
quantised per expert; the model runs as its dequantised twin does (transformers' own expert loop);
expert LoRA (all experts, or a subset as ESFT's lora mode picks) trains on top with the outputs,
LoRA and input gradients of the dequantised reference; nothing reaches or keeps the dense base;
merges and ESFT's full mode are refused in one line."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from efftune.config import load_config
from efftune.errors import ConfigError, EfftuneError
from efftune.methods.esft import add_esft_full
from efftune.methods.expert_lora import ExpertLora, ExpertLoraConfig, add_expert_lora, unload_expert_lora
from efftune.quantize import QuantizedExperts, dequantize_model, quantize_model, quantized_layers
from efftune.quantize.experts import dense_experts, expert_tensors
from efftune.quantize.linear import DENSE

KINDS = ["nf4", "int8"]


def moe64(dtype=torch.float64, seed: int = 0, expert_width: int = 64, vocab: int = 96) -> nn.Module:
    """A tiny Qwen3-MoE whose expert weights all take NF4 (inputs of 64), 4 experts, top-2."""
    import transformers as t
    cfg = t.Qwen3MoeConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, vocab_size=vocab, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=expert_width,
                           intermediate_size=128, max_position_embeddings=64, norm_topk_prob=True,
                           initializer_range=0.2, tie_word_embeddings=False)
    cfg._experts_implementation = "eager"  # transformers' own per-expert loop: the reference
    torch.manual_seed(seed)
    model = t.Qwen3MoeForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(std=1.0)  # decisive routing
    return model


IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))


def experts_of(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, QuantizedExperts)]


def run(model: nn.Module):
    """(logits, trainable gradients, input-embedding gradient) of a square loss."""
    x = model.get_input_embeddings()(IDS).detach().requires_grad_(True)
    logits = model(inputs_embeds=x).logits
    logits.square().mean().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, x.grad


@pytest.mark.parametrize("kind", KINDS)
def test_the_experts_are_quantised_per_expert_and_run_as_their_dequantised_twin(kind):
    model = moe64()
    report = quantize_model(model, kind)
    assert report.experts == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert "2 fused-experts modules" in report.summary() and not report.skipped
    assert report.bytes_after < report.bytes_before / (3.5 if kind == "nf4" else 1.9)
    for experts in experts_of(model):  # each expert's matrix is the 2-D format of that matrix alone
        for name in ("gate_up_proj", "down_proj"):
            full = experts.dequantize(name)
            assert full.shape == experts.shapes[name] and full.dtype == torch.float64
            for e in range(experts.num_experts):
                assert torch.equal(full[e], DENSE[kind](expert_tensors(experts.packed(name), e, kind), torch.float64))
    twin = copy.deepcopy(model)
    dequantize_model(twin)
    assert not quantized_layers(twin)
    assert type(twin.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"  # transformers' module, its loop
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, twin(IDS).logits, rtol=1e-10, atol=1e-10)


def test_the_weights_come_back_within_the_formats_bounds():
    model = moe64()
    originals = [(m.gate_up_proj.detach().clone(), m.down_proj.detach().clone())
                 for m in model.modules() if type(m).__name__ == "Qwen3MoeExperts"]
    quantize_model(model, "int8")
    for experts, (gu, down) in zip(experts_of(model), originals):
        for name, w in (("gate_up_proj", gu), ("down_proj", down)):
            step = w.abs().amax(dim=2, keepdim=True) / 127  # int8: one scale per output row of each expert
            assert ((experts.dequantize(name) - w).abs() <= step / 2 + 1e-12).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("subset", [None, [1, 3]])
def test_expert_lora_on_quantised_experts_equals_the_dequantised_reference(kind, subset):
    model = moe64()
    quantize_model(model, kind)
    add_expert_lora(model, ExpertLoraConfig(r=4, alpha=8, experts=subset, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    layer = model.model.layers[0].mlp.experts
    assert isinstance(layer, ExpertLora) and isinstance(layer.base_layer, QuantizedExperts)
    ref = copy.deepcopy(model)
    dequantize_model(ref)
    assert not quantized_layers(ref) and type(ref.model.layers[0].mlp.experts.base_layer).__name__ == "Qwen3MoeExperts"
    (out, grads, dx), (ref_out, ref_grads, ref_dx) = run(model), run(ref)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-10, atol=1e-10)
    assert grads.keys() == ref_grads.keys() and any("experts.lora" in n for n in grads)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-9, atol=1e-12, msg=name)
    for experts in experts_of(model):  # nothing trains in, or reaches, the quantised experts
        assert all(not t.requires_grad and t.grad is None for t in (*experts.parameters(), *experts.buffers()))


def test_backward_keeps_no_dense_expert_weight():
    model = moe64(torch.float32)
    quantize_model(model, "nf4")
    add_expert_lora(model, ExpertLoraConfig(r=4))
    shapes = {s[i:] for m in experts_of(model) for s in m.shapes.values() for i in (0, 1)}  # (E, o, i) and (o, i)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(IDS).logits.square().mean()
    loss.backward()
    assert saved and not [tuple(t.shape) for t in saved if t.is_floating_point() and tuple(t.shape) in shapes]


def test_compiled_expert_lora_on_quantised_experts_gives_the_eager_numbers():
    """To fp32's accuracy: compiled and eager, the slot sum and the SiLU-and-weight op compute in fp32
    (moe.experts._SumSlots, _silu_mul) and round once."""
    model = moe64()
    quantize_model(model, "nf4")
    add_expert_lora(model, ExpertLoraConfig(r=4))
    eager = run(model)
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, backend="aot_eager")
    x = model.get_input_embeddings()(IDS).detach().requires_grad_(True)
    logits = compiled(inputs_embeds=x).logits
    logits.square().mean().backward()
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits.detach(), eager[0], **tol)
    torch.testing.assert_close(x.grad, eager[2], **tol)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, eager[1][n], **tol, msg=n)


def test_merging_into_quantised_experts_and_esft_full_are_refused():
    model = moe64()
    quantize_model(model, "nf4")
    add_expert_lora(model, ExpertLoraConfig(r=4))
    with pytest.raises(EfftuneError, match="merge: the expert weights are quantised.*dequantize_model"):
        unload_expert_lora(model, merge=True)
    assert all(isinstance(m, ExpertLora) and not m.merged for m in (layer.mlp.experts for layer in model.model.layers))
    expected = model(IDS).logits
    dequantize_model(model)
    unload_expert_lora(model, merge=True)
    torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-9, atol=1e-9)

    other = moe64()
    quantize_model(other, "int8")
    with pytest.raises(ConfigError, match="esft: mode full.*quantised.*esft.mode lora"):
        add_esft_full(other, {"model.layers.0.mlp.experts": [0]})
    with pytest.raises(ConfigError, match="quantize: nf4.*esft.mode: full"):
        load_config(None, {"method": "esft", "quantize": "nf4", "esft": {"mode": "full"}})
    assert load_config(None, {"method": "esft", "quantize": "nf4", "esft": {"mode": "lora"}}).quantize == "nf4"


def test_experts_that_do_not_divide_into_blocks_stay_and_are_named():
    report = quantize_model(moe64(expert_width=32), "nf4")  # down_proj's input, 32, is no NF4 block
    assert not report.experts and len(report.quantized) == 8
    assert report.skipped == {f"model.layers.{i}.mlp.experts": "whose expert weights' input sizes are not "
                              "multiples of 64 (NF4's block)" for i in (0, 1)}
    assert "model.layers.0.mlp.experts" in report.summary()
    assert len(quantize_model(moe64(expert_width=32), "int8").experts) == 2  # int8 takes any shape


def test_dense_experts_equal_a_float64_formula():
    """int8: q · scale per row; NF4 through the 2-D function per expert (checked against the
    paper's formula in test_formats)."""
    w = torch.randn(3, 8, 128, dtype=torch.float64)
    model_like = nn.Module()
    model_like.gate_up_proj = nn.Parameter(w)
    from efftune.quantize.experts import quantize_stacked
    q, scale = quantize_stacked("int8", w)
    torch.testing.assert_close(dense_experts("int8", [q, scale], torch.float64), q.double() * scale.double()[..., None])


@pytest.mark.parametrize("arch", ["olmoe", "mixtral"])
def test_other_moe_architectures_quantise_their_experts_too(arch):
    """OLMoE's and Mixtral's fused experts (32 wide: int8, which takes any shape), with expert LoRA."""
    from tests.moe.test_expert_lora import randomize_b, tiny_moe
    model = tiny_moe(arch)
    assert len(quantize_model(model, "int8").experts) == 2
    add_expert_lora(model, ExpertLoraConfig(r=4))
    randomize_b(model)
    ref = copy.deepcopy(model)
    dequantize_model(ref)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-10, atol=1e-10)

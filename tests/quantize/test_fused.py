"""The fused LoRA ops on a quantised base (efftune.methods.lora.ops / swiglu): the quantised model
takes the fused path (lora_linears for q/k/v and o, the SwiGLU op for the MLP) and computes what the
unfused reference computes, a plain dequantised float64 base plus LoRA, in the output and in the
LoRA and input gradients; no dense copy of a quantised weight is kept for backward; compiled, the
same numbers."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from efftune.methods.lora import LoraConfig, add_lora, lora_layers
from efftune.methods.lora.swiglu import FusedSwiGLU, unwrap_swiglu_mlps
from efftune.quantize import Int8Linear, Nf4Linear, dequantize_model, quantize_model, quantized_layers
from tests.conftest import randomize_lora
from tests.quantize.test_model import llama64

KINDS = [("nf4", Nf4Linear), ("int8", Int8Linear)]


def quantised_lora(kind: str, use_dora: bool = False, dtype=torch.float64) -> nn.Module:
    model = llama64(dtype)
    quantize_model(model, kind)
    add_lora(model, LoraConfig(r=4, alpha=8, use_dora=use_dora))
    randomize_lora(model)
    return model


def unfused_reference(model: nn.Module) -> nn.Module:
    """The same model, every quantised base a plain nn.Linear of its dequantised weight, and every
    layer on the per-layer path (no fused op, the MLP's own formula)."""
    ref = copy.deepcopy(model)
    dequantize_model(ref)
    unwrap_swiglu_mlps(ref)
    for _, layer in lora_layers(ref):
        layer.fused = None
    assert not quantized_layers(ref)
    return ref


def embeds(model: nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(3))
    return model.get_input_embeddings()(ids).detach().requires_grad_(True)


def run(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """(logits, the trainable parameters' gradients, the input's gradient) of a square loss."""
    x = x.detach().clone().requires_grad_(True)
    logits = model(inputs_embeds=x).logits
    logits.square().mean().backward()
    inner = getattr(model, "_orig_mod", model)  # a compiled model's parameters under their own names
    return logits.detach(), {n: p.grad for n, p in inner.named_parameters() if p.requires_grad}, x.grad


def assert_same(got, want, tol: float) -> None:
    (out, grads, dx), (ref_out, ref_grads, ref_dx) = got, want
    torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol)
    torch.testing.assert_close(dx, ref_dx, rtol=tol, atol=tol)
    assert grads.keys() == ref_grads.keys() and grads
    for name, g in grads.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(g, ref_grads[name], rtol=tol, atol=tol, msg=name)


def assert_fused_paths_apply(model: nn.Module, x: torch.Tensor) -> None:
    block = model.model.layers[0]
    attn, mlp = block.self_attn, block.mlp
    assert isinstance(attn.q_proj.base_layer, (Nf4Linear, Int8Linear))
    assert attn.q_proj.fused.plan(x) is not None and attn.o_proj.fused.plan(x) is not None
    assert isinstance(mlp, FusedSwiGLU) and mlp._fused(x[0]) is not None


@pytest.mark.parametrize("kind,cls", KINDS)
def test_fused_ops_on_a_quantised_base_equal_the_unfused_dequantised_reference(kind, cls):
    model = quantised_lora(kind)
    x = embeds(model)
    assert_fused_paths_apply(model, x)
    assert_same(run(model, x), run(unfused_reference(model), x), 1e-10)
    for _, layer in lora_layers(model):  # nothing reaches the quantised base
        assert isinstance(layer.base_layer, cls)
        assert all(t.grad is None for t in (*layer.base_layer.parameters(), *layer.base_layer.buffers()))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kind,backend", [("nf4", None), ("int8", None), ("nf4", "aot_eager"), ("nf4", "inductor")])
def test_no_dense_copy_of_a_quantised_weight_is_kept_for_backward(kind, backend, fused):
    """Every tensor autograd keeps between forward and backward, recorded as it is saved: none has
    the shape of a quantised layer's weight (the op dequantises again in backward). Compiled too:
    the dequantisation happens inside the ops, where no partitioner can choose to keep it. On the
    fused path and on the per-layer one (the quantised layer's own matmul)."""
    model = quantised_lora(kind, dtype=torch.float32)
    if not fused:
        unwrap_swiglu_mlps(model)
        for _, layer in lora_layers(model):
            layer.fused = None
    shapes = {(layer.base_layer.out_features, layer.base_layer.in_features) for _, layer in lora_layers(model)}
    run_model = model if backend is None else torch.compile(model, backend=backend)
    x = embeds(model)
    if backend is not None:
        run_model(inputs_embeds=x).logits.sum().backward()  # compiled outside the recording
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = run_model(inputs_embeds=x).logits.square().mean()
    loss.backward()
    dense = [tuple(t.shape) for t in saved if t.is_floating_point() and tuple(t.shape) in shapes]
    assert saved and not dense, dense
    assert any(t.dtype == (torch.uint8 if kind == "nf4" else torch.int8) for t in saved)  # the packed codes


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_compiled_fused_ops_on_a_quantised_base_give_the_eager_numbers(kind):
    model = quantised_lora(kind)
    x = embeds(model)
    eager = run(model, x)
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    assert_same(run(compiled, x), eager, 1e-10)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_dora_on_a_quantised_base_equals_dora_on_the_dequantised_base(kind):
    model = quantised_lora(kind, use_dora=True)
    x = embeds(model)
    assert model.model.layers[0].self_attn.q_proj.fused.plan(x) is not None  # lora_linears + DoRA's scale
    assert_same(run(model, x), run(unfused_reference(model), x), 1e-10)

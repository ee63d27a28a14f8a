import pytest
import torch
from torch import nn

from efftune.attach import find_targets
from efftune.errors import EfftuneError, TargetError
from efftune.methods.lora.config import LoraConfig
from efftune.methods.lora.layer import (LoraEmbedding, LoraLinear, adapter_names, delta_weight, lora_layers,
                                        mixed_adapter_batch)
from efftune.methods.lora.model import (add_lora, delete_adapter, merge_and_unload, merge_lora, set_active_adapters,
                                        set_trainable_adapters, unload_lora, unmerge_lora)
from tests.conftest import randomize_lora, tiny_llama

IDS = torch.randint(0, 300, (3, 12), generator=torch.Generator().manual_seed(0))


def logits(m, ids=IDS):
    with torch.no_grad():
        return m(input_ids=ids).logits


def test_init_equals_base(model):
    base = logits(model)
    add_lora(model, LoraConfig(r=4))
    assert torch.equal(logits(model), base)


def test_all_linear_targets_every_projection_but_not_the_head(model):
    names = add_lora(model, LoraConfig(r=2))
    assert len(names) == 2 * 7
    assert not any("lm_head" in n for n in names)
    assert isinstance(model.lm_head, nn.Linear)


def test_suffix_and_regex_targets(model):
    assert find_targets(model, ["q_proj", "v_proj"]) == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert find_targets(model, r"model\.layers\.1\.mlp\.(gate|up)_proj") == [
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]


def test_target_matching_nothing_lists_what_exists(model):
    with pytest.raises(TargetError, match="q_proj.*v_proj|gate_proj") as info:
        add_lora(model, LoraConfig(target_modules=["query"]))
    assert "'query'" in str(info.value) or "query" in str(info.value)
    assert not list(lora_layers(model))


def test_merged_equals_unmerged_and_unmerge_restores(model):
    w0 = {n: p.clone() for n, p in model.named_parameters()}
    add_lora(model, LoraConfig(r=4, alpha=8))
    randomize_lora(model)
    adapted = logits(model)
    assert not torch.allclose(adapted, logits(tiny_llama()))
    merge_lora(model)
    torch.testing.assert_close(logits(model), adapted, atol=1e-5, rtol=0)
    unmerge_lora(model)
    torch.testing.assert_close(logits(model), adapted, atol=1e-5, rtol=0)
    for name, layer in lora_layers(model):
        torch.testing.assert_close(layer.base_layer.weight, w0[name + ".weight"], atol=1e-6, rtol=0)


def test_merge_and_unload_gives_plain_model(model):
    add_lora(model, LoraConfig(r=4))
    randomize_lora(model)
    adapted = logits(model)
    merge_and_unload(model)
    assert not list(lora_layers(model))
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    torch.testing.assert_close(logits(model), adapted, atol=1e-5, rtol=0)


def test_only_lora_parameters_get_gradients(model):
    add_lora(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    randomize_lora(model)
    model.train()
    model(input_ids=IDS).logits.sum().backward()
    for name, p in model.named_parameters():
        is_lora = ".lora_A" in name or ".lora_B" in name
        assert p.requires_grad == is_lora, name
        if is_lora:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_gradients_match_closed_form(model64):
    """dA = s (dY B)^T X and dB = s dY^T (A X), checked on one layer in float64."""
    torch.manual_seed(0)
    base = nn.Linear(6, 5, bias=False).double()
    layer = LoraLinear(base)
    a = layer.add_adapter("default", r=3, scaling=0.5)
    nn.init.normal_(a.lora_B)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(4, 5, dtype=torch.float64)
    layer(x).backward(dy)
    torch.testing.assert_close(a.lora_A.grad, 0.5 * (dy @ a.lora_B).T @ x)
    torch.testing.assert_close(a.lora_B.grad, 0.5 * dy.T @ (x @ a.lora_A.T))
    torch.testing.assert_close(x.grad, dy @ (base.weight + 0.5 * a.lora_B @ a.lora_A))


def test_rslora_scaling(model):
    add_lora(model, LoraConfig(r=16, alpha=8, use_rslora=True, target_modules=["q_proj"]))
    _, layer = next(lora_layers(model))
    assert layer.adapters["default"].scaling == pytest.approx(8 / 4)


def test_delta_weight_is_s_B_A():
    A, B = torch.randn(2, 5), torch.randn(3, 2)
    torch.testing.assert_close(delta_weight(A, B, 0.25), 0.25 * B @ A)


def test_several_adapters_activate_deactivate_delete(model):
    base = logits(model)
    add_lora(model, LoraConfig(r=2), adapter="a")
    randomize_lora(model, seed=1)
    add_lora(model, LoraConfig(r=3, target_modules=["v_proj"]), adapter="b")
    randomize_lora(model, seed=2)
    assert adapter_names(model) == ["a", "b"]
    set_active_adapters(model, "a")
    only_a = logits(model)
    set_active_adapters(model, "b")
    only_b = logits(model)
    set_active_adapters(model, ["a", "b"])
    both = logits(model)
    assert not torch.allclose(only_a, only_b)
    assert not torch.allclose(both, only_a)
    set_active_adapters(model, None)
    torch.testing.assert_close(logits(model), base)
    set_active_adapters(model, "a")
    delete_adapter(model, "b")
    assert adapter_names(model) == ["a"]
    torch.testing.assert_close(logits(model), only_a)
    with pytest.raises(EfftuneError, match="no adapter named 'b'"):
        set_active_adapters(model, "b")


def test_new_adapter_trains_earlier_ones_frozen_unless_asked(model):
    add_lora(model, LoraConfig(r=2), adapter="a")
    add_lora(model, LoraConfig(r=2), adapter="b")
    trainable = {n.split(".adapters.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"b"}
    set_trainable_adapters(model, ["a", "b"])
    trainable = {n.split(".adapters.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"a", "b"}


def test_mixed_adapter_batch_equals_each_adapter_alone(model):
    add_lora(model, LoraConfig(r=2), adapter="a")
    add_lora(model, LoraConfig(r=4, target_modules=["q_proj", "up_proj"]), adapter="b")
    randomize_lora(model, std=0.3)
    expected = []
    for i, name in enumerate(["a", None, "b"]):
        set_active_adapters(model, name)
        expected.append(logits(model, IDS[i:i + 1]))
    set_active_adapters(model, ["a", "b"])
    with mixed_adapter_batch(model, ["a", None, "b"]):
        mixed = logits(model)
    # fp32 rounding only: alone, "a" runs q/k/v and gate/up through one shared-input GEMM
    torch.testing.assert_close(mixed, torch.cat(expected), atol=5e-5, rtol=0)
    assert all(layer.batch_adapters is None for _, layer in lora_layers(model))


def test_mixed_batch_gradients_reach_only_own_adapter(model):
    add_lora(model, LoraConfig(r=2), adapter="a")
    add_lora(model, LoraConfig(r=2), adapter="b")
    set_trainable_adapters(model, ["a", "b"])
    randomize_lora(model)
    with mixed_adapter_batch(model, ["a", "a", None]):
        model(input_ids=IDS).logits.sum().backward()
    for name, p in model.named_parameters():
        if ".adapters.a." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0
        if ".adapters.b." in name:
            assert p.grad is None or p.grad.abs().sum() == 0


def test_mixed_batch_rejects_unknown_adapter(model):
    add_lora(model, LoraConfig(r=2), adapter="a")
    with pytest.raises(EfftuneError, match="unknown adapters: zzz"):
        with mixed_adapter_batch(model, ["zzz", "a", "a"]):
            pass


def test_unload_without_merge_restores_base(model):
    base = logits(model)
    add_lora(model, LoraConfig(r=2))
    randomize_lora(model)
    unload_lora(model, merge=False)
    torch.testing.assert_close(logits(model), base)


def test_embedding_lora_merges(model):
    add_lora(model, LoraConfig(r=2, target_modules=["q_proj"], embeddings=["embed_tokens"]))
    layer = model.model.embed_tokens
    assert isinstance(layer, LoraEmbedding)
    before = logits(model)
    with torch.no_grad():
        layer.adapters["default"].lora_A.normal_()
    adapted = logits(model)
    assert not torch.allclose(before, adapted)
    merge_lora(model)
    torch.testing.assert_close(logits(model), adapted, atol=1e-5, rtol=0)


def test_conv1d_lora_on_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    names = add_lora(m, LoraConfig(r=2, target_modules=["c_attn", "c_fc"]))
    assert len(names) == 4
    randomize_lora(m)
    ids = torch.randint(0, 100, (2, 8))
    adapted = logits(m, ids)
    merge_lora(m)
    torch.testing.assert_close(logits(m, ids), adapted, atol=1e-5, rtol=0)


class LinearCalls(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.nn.functional.linear
        return func(*args, **(kwargs or {}))


def forward_and_grads(model):
    with LinearCalls() as calls:
        out = model(input_ids=IDS).logits
    out.square().mean().backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, calls.count


def test_fused_linears_compute_what_the_per_layer_path_computes():
    from efftune.methods.lora.layer import FusedLinears

    def build():  # tiny_llama seeds the RNG: both models get the same A init
        m = tiny_llama(dtype=torch.float64)
        q = m.model.layers[0].self_attn.q_proj  # a frozen bias rides along in the fused op
        q.bias = nn.Parameter(torch.randn(q.out_features, dtype=torch.float64), requires_grad=False)
        add_lora(m, LoraConfig(r=4))
        randomize_lora(m)
        return m

    fused, alone = build(), build()
    for _, layer in lora_layers(alone):
        layer.fused = None
    groups = {id(layer.fused): layer.fused for _, layer in lora_layers(fused)}
    assert len(groups) == 8 and all(isinstance(g, FusedLinears) for g in groups.values())  # 4 per layer
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    assert attn.q_proj.fused is attn.k_proj.fused is attn.v_proj.fused
    assert mlp.gate_proj.fused is mlp.up_proj.fused and len(mlp.down_proj.fused.layers) == 1
    out_f, grads_f, calls_f = forward_and_grads(fused)
    out_a, grads_a, calls_a = forward_and_grads(alone)
    # per layer and projection: the base linear and two LoRA linears; fused, only the LM head is an F.linear
    assert calls_a == 2 * 7 * 3 + 1 and calls_f == 1
    torch.testing.assert_close(out_f, out_a, atol=1e-12, rtol=1e-12)
    assert grads_f.keys() == grads_a.keys()
    for name, g in grads_f.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(g, grads_a[name], atol=1e-12, rtol=1e-10)
    assert all(p.grad is None for p in fused.parameters() if not p.requires_grad)  # no frozen-weight grads
    # nothing is kept past the block's last member
    assert all(g.source is None and all(k is None for k in g.kept) for g in groups.values())


def test_fused_linears_follow_autocast_and_step_aside_for_other_dtypes():
    m = tiny_llama()
    add_lora(m, LoraConfig(r=4))
    randomize_lora(m)
    layer = m.model.layers[0].mlp.down_proj
    x = torch.randn(2, 5, m.config.intermediate_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        ref = layer.base_layer(x) + layer.adapters["default"](x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref.to(torch.bfloat16), atol=2e-2, rtol=2e-2)
    m.to(torch.bfloat16)
    for _, lora in lora_layers(m):  # a bf16 base with fp32 adapters, no autocast: the per-layer path
        lora.adapters["default"].float()
    assert layer.fused.output(0, x.bfloat16()) is None
    assert layer(x.bfloat16()).dtype == torch.bfloat16


def test_fused_linears_step_aside_for_what_they_cannot_fuse():
    m = tiny_llama(dtype=torch.float64)
    add_lora(m, LoraConfig(r=2), adapter="a")
    add_lora(m, LoraConfig(r=4, dropout=0.1), adapter="b")
    randomize_lora(m)
    layer = m.model.layers[0].self_attn.q_proj
    group = layer.fused
    assert group._adapter() is None  # two adapters active
    set_active_adapters(m, "b")
    assert group._adapter() is None  # dropout draws a mask per projection
    set_active_adapters(m, "a")
    assert group._adapter() == "a"
    m.model.layers[0].self_attn.k_proj.merge()
    assert group._adapter() is None  # one member merged
    m.model.layers[0].self_attn.k_proj.unmerge()
    handle = layer.base_layer.register_forward_hook(lambda *a: None)
    assert group._adapter() is None  # a hook on a base layer must still run
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
    assert group._adapter() is None  # so must a global hook, which would see each base layer's call
    handle.remove()
    assert group._adapter() == "a"
    layer.base_layer.weight.requires_grad_(True)
    assert group._adapter() is None  # a trained base weight needs its gradient

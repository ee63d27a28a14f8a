"""DoRA: against a direct float64 implementation that builds W0 + sBA and its norms, and against peft."""
import pytest
import torch
from torch import nn

from efftune.errors import ConfigError, EfftuneError
from efftune.methods.dora import add_dora
from efftune.methods.lora.config import LoraConfig
from efftune.methods.lora.dora import DoraAdapter, norms
from efftune.methods.lora.layer import FusedLinears, LoraLinear, lora_layers, mixed_adapter_batch
from efftune.methods.lora.model import add_lora, merge_and_unload, merge_lora, set_active_adapters, unmerge_lora
from efftune.methods.lora.peft_format import load_adapter, save_adapter
from efftune.methods.lora_fa import LoraFAConfig, add_lora_fa
from efftune.methods.registry import get_method
from tests.conftest import tiny_llama

IDS = torch.randint(0, 300, (3, 12), generator=torch.Generator().manual_seed(0))


def logits(m, ids=IDS):
    with torch.no_grad():
        return m(input_ids=ids).logits


def randomize(model, std=0.1, seed=1):
    """Non-zero B and a magnitude away from its initial value, so every term matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for a in layer.adapters.values():
                a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g, dtype=a.lora_B.dtype) * std)
                if isinstance(a, DoraAdapter):
                    a.lora_magnitude_vector.mul_(1 + 0.2 * torch.rand(a.lora_magnitude_vector.shape, generator=g,
                                                                      dtype=a.lora_magnitude_vector.dtype))


def reference(x, w0, bias, A, B, m, s):
    """DoRA as the paper writes it: W' = m ⊙ V / ‖V‖ (rows), V = W0 + sBA, ‖V‖ detached."""
    V = w0 + s * B @ A
    n = V.norm(dim=1).detach()
    y = x @ ((m / n)[:, None] * V).t()
    return y if bias is None else y + bias


def dora_layer(bias=True, fused=True, r=3, scaling=0.7, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(12, 7, bias=bias).double().requires_grad_(False)
    layer = LoraLinear(base)
    a = layer.add_adapter("d", r=r, scaling=scaling, adapter_cls=DoraAdapter)
    with torch.no_grad():
        nn.init.normal_(a.lora_B)
        a.lora_magnitude_vector.mul_(torch.linspace(0.5, 1.5, 7, dtype=torch.float64))
    if fused:
        layer.fused = FusedLinears([layer])
    return layer, a


def test_the_norm_formula_equals_the_explicit_norm():
    g = torch.Generator().manual_seed(0)
    w0, A, B = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((9, 13), (4, 13), (9, 4)))
    torch.testing.assert_close(norms(w0, A, B, 0.37), (w0 + 0.37 * B @ A).norm(dim=1))


def test_magnitude_starts_at_the_row_norms_and_the_output_at_the_base(model):
    base = logits(model)
    add_dora(model, LoraConfig(r=4))
    for _, layer in lora_layers(model):
        a = layer.adapters["default"]
        torch.testing.assert_close(a.lora_magnitude_vector, layer.base_layer.weight.norm(dim=1))
    torch.testing.assert_close(logits(model), base, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("fused", [True, False], ids=["lora_linears", "per-layer"])
def test_forward_and_gradients_equal_the_float64_reference(bias, fused):
    layer, a = dora_layer(bias=bias, fused=fused)
    w0 = layer.base_layer.weight
    b0 = layer.base_layer.bias
    A, B, m = (t.detach().clone().requires_grad_(True) for t in (a.lora_A, a.lora_B, a.lora_magnitude_vector))
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    dy = torch.randn(2, 5, 7, dtype=torch.float64)
    y = layer(x)
    y_ref = reference(x_ref, w0, b0, A, B, m, a.scaling)
    torch.testing.assert_close(y, y_ref)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(a.lora_A.grad, A.grad)
    torch.testing.assert_close(a.lora_B.grad, B.grad)
    torch.testing.assert_close(a.lora_magnitude_vector.grad, m.grad)


def test_the_fused_op_and_the_per_layer_path_agree_on_a_model(model64):
    add_dora(model64, LoraConfig(r=4, alpha=8))
    randomize(model64)
    fused = logits(model64)
    for _, layer in lora_layers(model64):
        layer.fused = None
    torch.testing.assert_close(logits(model64), fused)


def test_rslora_scaling_reaches_dora(model64):
    add_dora(model64, LoraConfig(r=4, alpha=8, use_rslora=True))
    layer = model64.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.adapters["default"].scaling == pytest.approx(8 / 2)


def test_merge_then_unmerge_restores_w0_and_merged_equals_unmerged(model64):
    w0 = {n: p.clone() for n, p in model64.named_parameters()}
    add_dora(model64, LoraConfig(r=4, alpha=8))
    randomize(model64)
    adapted = logits(model64)
    assert not torch.allclose(adapted, logits(tiny_llama(dtype=torch.float64)))
    merge_lora(model64)
    torch.testing.assert_close(logits(model64), adapted)
    unmerge_lora(model64)
    torch.testing.assert_close(logits(model64), adapted)
    for name, layer in lora_layers(model64):
        torch.testing.assert_close(layer.base_layer.weight, w0[name + ".weight"], atol=1e-12, rtol=0)


def test_merge_restores_in_float32_to_rounding(model):
    w0 = {n: p.clone() for n, p in model.named_parameters()}
    add_dora(model, LoraConfig(r=4, alpha=8))
    randomize(model)
    adapted = logits(model)
    merge_lora(model)
    torch.testing.assert_close(logits(model), adapted, atol=1e-5, rtol=0)
    unmerge_lora(model)
    for name, layer in lora_layers(model):
        torch.testing.assert_close(layer.base_layer.weight, w0[name + ".weight"], atol=1e-6, rtol=0)


def test_a_dora_and_a_lora_adapter_active_together_merge_exactly(model64):
    w0 = {n: p.clone() for n, p in model64.named_parameters()}
    add_dora(model64, LoraConfig(r=4, alpha=8), adapter="d")
    add_lora(model64, LoraConfig(r=2, alpha=4), adapter="l")
    randomize(model64)
    both = logits(model64)
    set_active_adapters(model64, "d")
    only_d = logits(model64)
    set_active_adapters(model64, ["d", "l"])
    assert not torch.allclose(both, only_d)
    merge_lora(model64)
    torch.testing.assert_close(logits(model64), both)
    unmerge_lora(model64)
    for name, layer in lora_layers(model64):
        torch.testing.assert_close(layer.base_layer.weight, w0[name + ".weight"], atol=1e-12, rtol=0)


def test_merge_and_unload_gives_a_plain_model_with_the_same_outputs(model64):
    add_dora(model64, LoraConfig(r=4, alpha=8))
    randomize(model64)
    adapted = logits(model64)
    merge_and_unload(model64)
    assert not list(lora_layers(model64))
    assert type(model64.model.layers[0].mlp.down_proj) is nn.Linear
    torch.testing.assert_close(logits(model64), adapted)


def test_the_norm_cache_follows_the_base_weight(model64):
    add_dora(model64, LoraConfig(r=4, alpha=8))
    randomize(model64)
    layer = model64.get_submodule("model.layers.0.self_attn.q_proj")
    a = layer.adapters["default"]
    with torch.no_grad():
        layer.base_layer.weight.mul_(1.5)
    w = layer.base_layer.weight
    torch.testing.assert_close(a.norms(layer), (w + a.delta_weight()).norm(dim=1))


def test_mixed_adapter_batch_equals_each_adapter_alone(model64):
    add_dora(model64, LoraConfig(r=4, alpha=8), adapter="a")
    add_dora(model64, LoraConfig(r=2, alpha=4), adapter="b")
    randomize(model64)
    alone = {}
    for name in ("a", "b", None):
        set_active_adapters(model64, name)
        alone[name] = logits(model64)
    with mixed_adapter_batch(model64, ["a", "b", None]):
        mixed = logits(model64)
    for i, name in enumerate(("a", "b", None)):
        torch.testing.assert_close(mixed[i], alone[name][i])


def test_save_and_load_round_trip(tmp_path, model):
    add_dora(model, LoraConfig(r=4, alpha=8))
    randomize(model)
    save_adapter(model, tmp_path / "d", LoraConfig(r=4, alpha=8))
    fresh = tiny_llama()
    cfg = load_adapter(fresh, tmp_path / "d")
    assert cfg.use_dora
    assert isinstance(fresh.model.layers[0].self_attn.q_proj.adapters["default"], DoraAdapter)
    torch.testing.assert_close(logits(fresh), logits(model))


def test_what_dora_does_not_combine_with_is_refused(model):
    with pytest.raises(ConfigError, match="embeddings"):
        LoraConfig(use_dora=True, embeddings=["embed_tokens"])
    with pytest.raises(ConfigError, match="LoRA-FA"):
        add_lora_fa(tiny_llama(), LoraFAConfig(use_dora=True))
    add_dora(model, LoraConfig(r=2), adapter="d")
    add_dora(model, LoraConfig(r=2), adapter="e")
    from efftune.compose.merge import merge_adapters
    with pytest.raises(EfftuneError, match="DoRA"):
        merge_adapters(model, ["d", "e"], [0.5, 0.5])


def test_method_dora_is_registered():
    method = get_method("dora")
    assert method.config_key == "lora"


# ---- peft ------------------------------------------------------------------------------------------

def grads(model, ids=IDS) -> None:
    model.zero_grad()
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    model.eval()


def peft_factors(pm, path):
    layer = pm.base_model.model.get_submodule(path)
    return (layer.lora_A["default"].weight, layer.lora_B["default"].weight,
            layer.lora_magnitude_vector["default"].weight)


def assert_same_grads(ours, pm):
    for path, layer in lora_layers(ours):
        a = layer.adapters["default"]
        for mine, theirs in zip((a.lora_A, a.lora_B, a.lora_magnitude_vector), peft_factors(pm, path)):
            torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-5, rtol=1e-4)


def test_peft_loads_our_dora_adapter_with_the_same_logits_and_gradients(tmp_path, peft):
    ours = tiny_llama()
    add_dora(ours, LoraConfig(r=4, alpha=8))
    randomize(ours)
    save_adapter(ours, tmp_path / "d", LoraConfig(r=4, alpha=8))
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "d"), is_trainable=True).eval()
    torch.testing.assert_close(logits(pm), logits(ours), atol=1e-5, rtol=1e-5)
    grads(ours)
    grads(pm)
    assert_same_grads(ours, pm)


def test_we_load_peft_dora_adapter_with_the_same_logits_and_gradients(tmp_path, peft):
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                           use_dora=True, use_rslora=True))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(tmp_path / "p")
    ours = tiny_llama()
    cfg = load_adapter(ours, tmp_path / "p")
    assert cfg.use_dora and cfg.use_rslora
    pm.eval()
    torch.testing.assert_close(logits(ours), logits(pm), atol=1e-5, rtol=1e-5)
    for _, layer in lora_layers(ours):
        layer.adapters["default"].requires_grad_(True)
    grads(ours)
    grads(pm)
    assert_same_grads(ours, pm)


# ---- torch.compile ----------------------------------------------------------------------------------

def test_a_dora_block_compiles_to_one_graph_and_computes_what_eager_does():
    # aot_eager: Dynamo and AOT autograd trace DoraScale and the norms as Inductor would get them,
    # without the minute of Inductor's code generation on CPU (GPU runs: bench/throughput.py)
    model = tiny_llama(layers=1)
    add_dora(model, LoraConfig(r=4, alpha=8))
    randomize(model)
    ids = IDS[:2]

    def loss_and_grads():
        model.zero_grad()
        loss = model(input_ids=ids).logits.float().logsumexp(-1).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    eager = loss_and_grads()
    torch._dynamo.reset()
    block = model.model.layers[0]
    for module in model.modules():  # what compile_blocks does first: the graph reads the caches unchecked
        if hasattr(module, "before_compile"):
            module.before_compile()
    assert all(layer.adapters["default"].base_norm_sq is not None for _, layer in lora_layers(model))
    pos = torch.arange(12)[None]
    h = torch.randn(1, 12, model.config.hidden_size, requires_grad=True)
    explained = torch._dynamo.explain(block)(h, position_embeddings=model.model.rotary_emb(h, pos),
                                             attention_mask=None, position_ids=pos)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    block.compile(backend="aot_eager")
    compiled = loss_and_grads()
    torch.testing.assert_close(compiled[0], eager[0], atol=1e-5, rtol=1e-5)
    assert compiled[1].keys() == eager[1].keys()
    for name, g in eager[1].items():
        torch.testing.assert_close(compiled[1][name], g, atol=1e-5, rtol=1e-4)

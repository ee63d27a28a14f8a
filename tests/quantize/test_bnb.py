"""LoRA on a model bitsandbytes quantised (transformers' BitsAndBytesConfig, 4-bit NF4 and 8-bit),
on CPU: the LoRA layer wraps bitsandbytes' Linear4bit / Linear8bitLt and calls it for the base term;
the model computes what the same LoRA on its dequantised twin computes (forward, LoRA and input
gradients); merges and DoRA are refused in one line, dequantize_model makes it mergeable; a
pre-quantised checkpoint trains from the command line. Skipped without bitsandbytes (an optional
extra)."""
from __future__ import annotations

import copy

import pytest
import torch

from efftune.errors import ConfigError, EfftuneError
from efftune.methods.lora import LoraConfig, add_lora, load_adapter, lora_layers, merge_lora, save_adapter
from efftune.quantize import dequantize_model, quantize_model, quantized_layers
from efftune.quantize.bnb import bnb_kind
from tests.conftest import make_tokenizer, randomize_lora
from tests.quantize.test_model import llama64
from tests.test_cli import data_file, last_json, run  # noqa: F401 (data_file is a fixture)

bitsandbytes = pytest.importorskip("bitsandbytes")

IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
SETTINGS = {"4-bit": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                          bnb_4bit_compute_dtype=torch.float32),
            "8-bit": dict(load_in_8bit=True)}


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("float")
    llama64(torch.float32).save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    return d


def load_bnb(path, kind: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(**SETTINGS[kind]),
                                                dtype=torch.float32, device_map="cpu")


def run_model(model):
    x = model.get_input_embeddings()(IDS).detach().requires_grad_(True)
    logits = model(inputs_embeds=x).logits
    logits.square().mean().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, x.grad


@pytest.mark.parametrize("kind", ["4-bit", "8-bit"])
def test_a_lora_layer_adds_its_update_to_what_the_bitsandbytes_module_computes(float_dir, kind):
    """Layer by layer, against a float64 formula on top of the bitsandbytes module's own output and
    input gradient (8-bit: LLM.int8() quantises the activations too, so only the module itself
    says what its base term is)."""
    model = load_bnb(float_dir, kind)
    add_lora(model, LoraConfig(r=4, alpha=8))
    randomize_lora(model)
    layer = dict(lora_layers(model))["model.layers.1.mlp.down_proj"]
    base, adapter = layer.base_layer, layer.adapters["default"]
    assert bnb_kind(base) == kind and layer.fused.plan(torch.zeros(1, 128)) is None  # bitsandbytes' own kernels
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(2), requires_grad=True)
    g = torch.randn(6, 64, generator=torch.Generator().manual_seed(3))
    (layer(x) * g).sum().backward()
    x0 = x.detach().clone().requires_grad_(True)
    base_out = base(x0)
    (base_out * g).sum().backward()
    a, b, s, xd, gd = (adapter.lora_A.detach().double(), adapter.lora_B.detach().double(), adapter.scaling,
                       x.detach().double(), g.double())
    with torch.no_grad():
        y = layer(x)
    torch.testing.assert_close(y.double(), base_out.detach().double() + s * (xd @ a.t()) @ b.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(adapter.lora_B.grad.double(), s * gd.t() @ (xd @ a.t()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(adapter.lora_A.grad.double(), s * (gd @ b).t() @ xd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x0.grad.double() + s * (gd @ b) @ a, rtol=1e-5, atol=1e-5)
    assert all(p.grad is None for p in base.parameters())


def test_lora_over_4bit_layers_equals_lora_over_their_dequantised_weights(float_dir):
    """Weight-only 4-bit: the whole model against its twin made dense by dequantize_model."""
    kind = "4-bit"
    model = load_bnb(float_dir, kind)
    assert bnb_kind(model.model.layers[0].self_attn.q_proj) == kind
    add_lora(model, LoraConfig(r=4, alpha=8))
    randomize_lora(model)
    layers = dict(lora_layers(model))
    assert len(layers) == 14 and all(bnb_kind(layer.base_layer) == kind for layer in layers.values())
    q = layers["model.layers.0.self_attn.q_proj"].adapters["default"]
    assert q.lora_A.shape == (4, 64) and q.lora_B.shape == (64, 4) and q.lora_A.dtype == torch.float32
    ref = copy.deepcopy(model)
    assert dequantize_model(ref) == 14 and not quantized_layers(ref)
    (out, grads, dx), (ref_out, ref_grads, ref_dx) = run_model(model), run_model(ref)
    tol = dict(rtol=1e-4, atol=1e-5)  # fp32: bitsandbytes' kernels sum in another order
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(dx, ref_dx, **tol)
    assert grads.keys() == ref_grads.keys() and len(grads) == 28 and all("lora_" in n for n in grads)
    for name, g in grads.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(g, ref_grads[name], **tol, msg=name)


def test_merge_and_dora_are_refused_and_dequantize_model_makes_it_mergeable(float_dir):
    model = load_bnb(float_dir, "4-bit")
    add_lora(model, LoraConfig(r=4))
    randomize_lora(model)
    # (an input that requires grad keeps bitsandbytes on its fp32 path: in eval mode without one, on
    # an AVX512-BF16 CPU, it repacks the weight for a bf16 kernel)
    expected = run_model(model)[0]
    with pytest.raises(EfftuneError, match=r"merge: the base weight is quantised \(bitsandbytes 4-bit "
                                           r"\(Linear4bit\)\).*dequantize_model"):
        merge_lora(model)
    dequantize_model(model)
    merge_lora(model)
    torch.testing.assert_close(run_model(model)[0], expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(EfftuneError, match=r"DoRA on bitsandbytes 8-bit \(Linear8bitLt\) layers"):
        add_lora(load_bnb(float_dir, "8-bit"), LoraConfig(r=4, use_dora=True))
    with pytest.raises(ConfigError, match="quantised already.*Linear4bit of bitsandbytes"):
        quantize_model(load_bnb(float_dir, "4-bit"), "nf4")


def test_the_adapter_loads_on_the_original_base(float_dir, tmp_path):
    model = load_bnb(float_dir, "4-bit")
    cfg = LoraConfig(r=4, alpha=8)
    add_lora(model, cfg)
    randomize_lora(model)
    save_adapter(model, tmp_path / "a", cfg)
    from transformers import AutoModelForCausalLM
    plain = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32)
    load_adapter(plain, tmp_path / "a")
    state = {n: p for n, p in model.named_parameters() if "lora_" in n}
    loaded = {n: p for n, p in plain.named_parameters() if "lora_" in n}
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[n], state[n]) for n in state)


def test_a_pre_quantised_checkpoint_trains_from_the_command_line(capsys, float_dir, data_file, tmp_path):  # noqa: F811
    """A checkpoint saved quantised (its config says bitsandbytes 4-bit) loads as bitsandbytes layers."""
    saved = tmp_path / "bnb4"
    load_bnb(float_dir, "4-bit").save_pretrained(saved)
    make_tokenizer().save_pretrained(saved)
    out_dir = tmp_path / "run"
    code, out, err = run(capsys, "train", "--model", saved, "--data", data_file, "--steps", 2, "--batch-size", 4,
                         "--eval-size", 8, "--method", "lora", "--output", out_dir)
    assert code == 0, err
    assert last_json(out)["steps"] == 2
    code, out, err = run(capsys, "eval", "--model", float_dir, "--adapter", out_dir / "adapter", "--data", data_file)
    assert code == 0, err


def test_the_dense_weight_survives_bitsandbytes_cpu_repacking(float_dir):
    """On an AVX512-BF16 CPU, bitsandbytes repacks a 4-bit weight for its bf16 kernel at the first
    eval forward without gradients; the dense weight is then read from its own inverse of that
    packing (which re-quantises the double-quantised scales: close, not bit-equal)."""
    from efftune.quantize.bnb import dense_weight
    model = load_bnb(float_dir, "4-bit")
    layer = model.model.layers[0].self_attn.q_proj
    before = dense_weight(layer, torch.float32)
    with torch.no_grad():
        model(IDS)
    torch.testing.assert_close(dense_weight(layer, torch.float32), before, rtol=0, atol=0.01 * before.abs().max().item())


def test_fsdp_refuses_a_bitsandbytes_base_in_one_line(float_dir):
    """bitsandbytes keeps its quantisation state on the weight, which FSDP2 replaces by shards."""
    from efftune.quantize import check_shardable
    model = load_bnb(float_dir, "4-bit")
    add_lora(model, LoraConfig(r=4))
    with pytest.raises(ConfigError, match=r"fsdp cannot shard the bitsandbytes 4-bit \(Linear4bit\) layers .*"
                                          r"model\.layers\.0\.self_attn\.q_proj.* --quantize nf4"):
        check_shardable(model)
    ours = llama64()
    quantize_model(ours, "nf4")
    check_shardable(ours)  # efftune's own shard


@pytest.mark.parametrize("kind", ["4-bit", "8-bit"])
def test_parameter_counts_see_through_the_packing(float_dir, kind):
    """The total counts a quantised weight as the elements it stands for (Linear4bit packs two codes a
    byte), so it equals the unquantised model's total."""
    from transformers import AutoModelForCausalLM

    from efftune.attach import trainable_parameters
    plain = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32)
    model = load_bnb(float_dir, kind)
    assert trainable_parameters(model)[1] == trainable_parameters(plain)[1] == sum(p.numel() for p in plain.parameters())

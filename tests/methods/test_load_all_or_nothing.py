"""Every method's adapter load is all or nothing (efftune.files.load_all_or_nothing): a load that fails
on the last key it reaches leaves the model exactly as it was (its module tree, module objects,
parameters bit for bit with their requires_grad and storage, buffers), and a good load afterwards
works. Each method saves a real adapter on a tiny model (Llama; a Qwen3-MoE for the methods that
adapt experts; GPT-2 for BitFit over biases the model already has, which a load overwrites).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from efftune.config import RunConfig
from efftune.errors import AdapterError, EfftuneError
from efftune.files import load_all_or_nothing
from efftune.methods.bitfit import BitFitConfig, bitfit_state_dict
from efftune.methods.bottleneck import BottleneckConfig, add_bottleneck, bottleneck_state_dict
from efftune.methods.esft import add_esft_full, esft_state_dict
from efftune.methods.expert_lora import expert_lora_state_dict
from efftune.methods.full import full_state_dict
from efftune.methods.ia3 import ia3_layers, ia3_state_dict
from efftune.methods.lora.config import LoraConfig
from efftune.methods.lora.layer import lora_layers
from efftune.methods.lora.model import add_lora
from efftune.methods.lora.packing import owns_storage
from efftune.methods.lora.peft_format import adapter_state_dict
from efftune.methods.mixlora import mixlora_state_dict
from efftune.methods.prefix_tuning import prefix_tuning_state_dict
from efftune.methods.prompt_tuning import prompt_tuning_state_dict
from efftune.methods.registry import get_method
from tests.conftest import make_tokenizer, tiny_llama
from tests.methods.test_bitfit import tiny_gpt2
from tests.moe.test_expert_lora import tiny_moe


def moe():
    return tiny_moe(dtype=torch.float32)


ESFT_EXPERTS = {"model.layers.0.mlp.experts": [1, 3], "model.layers.1.mlp.experts": [0]}

# name: (method, base model, config options, the saved tensors by file key in the order the loader
# checks them: the method's own state dict, which its save writes and its load fills)
CASES = {
    "lora": ("lora", tiny_llama, {}, adapter_state_dict),
    "lora-fa": ("lora-fa", tiny_llama, {}, adapter_state_dict),
    "dora": ("dora", tiny_llama, {}, adapter_state_dict),
    "bitfit": ("bitfit", tiny_llama, {"add_biases": True}, lambda m: bitfit_state_dict(m, BitFitConfig())),
    "bitfit-own-biases": ("bitfit", tiny_gpt2, {}, lambda m: bitfit_state_dict(m, BitFitConfig())),
    "ia3": ("ia3", tiny_llama, {}, ia3_state_dict),
    "bottleneck": ("bottleneck", tiny_llama, {"bottleneck_size": 8}, bottleneck_state_dict),
    "prompt-tuning": ("prompt-tuning", tiny_llama, {"num_virtual_tokens": 3, "tasks": ["a", "b"]},
                      prompt_tuning_state_dict),
    "prefix-tuning": ("prefix-tuning", tiny_llama, {"num_virtual_tokens": 3}, prefix_tuning_state_dict),
    "mixlora": ("mixlora", tiny_llama, {"num_experts": 2, "top_k": 1, "r": 2}, mixlora_state_dict),
    "expert-lora": ("expert-lora", moe, {"r": 2, "target_modules": ["q_proj", "v_proj"]}, expert_lora_state_dict),
    "esft": ("esft", moe, {}, esft_state_dict),
    "full": ("full", tiny_llama, {"target_modules": ["mlp"]}, full_state_dict),  # the whole model's weights
}
CORRUPTIONS = ("shape", "dtype", "drop", "nan")


def fingerprint(model: nn.Module) -> dict:
    """Everything the test holds a failed load to: module names, types and objects; parameters'
    and buffers' names, objects, requires_grad, storage views and bytes."""
    def tensor(t: torch.Tensor) -> tuple:
        return (id(t), t.requires_grad, t.dtype, tuple(t.shape), t.stride(), t.storage_offset(),
                t.untyped_storage().data_ptr(), t.detach().contiguous().view(torch.uint8).clone())
    return {"modules": [(n, type(m), id(m)) for n, m in model.named_modules(remove_duplicate=False)],
            "parameters": {n: tensor(p) for n, p in model.named_parameters(remove_duplicate=False)},
            "buffers": {n: tensor(b) for n, b in model.named_buffers(remove_duplicate=False)}}


def assert_same(before: dict, after: dict) -> None:
    assert after["modules"] == before["modules"]
    for kind in ("parameters", "buffers"):
        assert list(after[kind]) == list(before[kind])
        for name, was in before[kind].items():
            now = after[kind][name]
            assert now[:-1] == was[:-1], f"{kind[:-1]} {name} changed: {was[:-1]} -> {now[:-1]}"
            assert torch.equal(now[-1], was[-1]), f"{kind[:-1]} {name}'s values changed"


def logits(model: nn.Module) -> torch.Tensor:
    ids = torch.tensor([[5, 17, 3, 9, 30, 2]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def corrupt(tensors: dict[str, torch.Tensor], key: str, how: str) -> dict[str, torch.Tensor]:
    out = dict(tensors)
    t = tensors[key]
    if how == "shape":
        out[key] = torch.cat([t, t[:1]])  # one more row
    elif how == "dtype":
        out[key] = torch.ones(t.shape, dtype=torch.int64)
    elif how == "nan":
        out[key] = t.clone().fill_(float("nan"))
    else:
        del out[key]
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """case -> (adapter directory, its weights file, the trained model, the key the loader checks last)."""
    root, tokenizer, out = tmp_path_factory.mktemp("saved"), make_tokenizer(), {}
    for case, (name, make, options, state) in CASES.items():
        method, model = get_method(name), make()
        cfg = dataclasses.replace(getattr(RunConfig(), method.config_key), **options)
        if name == "esft":  # full experts chosen by hand (choosing by data needs a data set)
            add_esft_full(model, ESFT_EXPERTS)
        else:
            method.attach(model, cfg, tokenizer=tokenizer)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():  # trained values: nothing a fresh attach would give by chance
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
        method.save(model, root / case, cfg, metadata={})
        weights = next((root / case).glob("*.safetensors"))
        out[case] = (root / case, weights, model, list(state(model))[-1])
    return out


@pytest.mark.parametrize("how", CORRUPTIONS)
@pytest.mark.parametrize("case", CASES)
def test_a_load_failing_on_the_last_key_leaves_the_model_as_it_was(saved, case, how):
    name, make, _, _ = CASES[case]
    directory, weights, trained, last = saved[case]
    good = load_file(str(weights))
    save_file(corrupt(good, last, how), str(weights))
    try:
        model = make()
        if case == "ia3" and how == "drop":  # peft's IA3 files name the modules they scale: one fewer is valid
            get_method(name).load(model, directory)
            assert len(list(ia3_layers(model))) == len(good) - 1
            return
        before, reference = fingerprint(model), logits(model)
        with pytest.raises(EfftuneError) as exc:
            get_method(name).load(model, directory)
        message = str(exc.value)
        assert message and "\n" not in message
        # the error names the last key (a LoRA factor without its partner: names its module)
        assert last in message or last.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] in message, message
        assert_same(before, fingerprint(model))
        torch.testing.assert_close(logits(model), reference, rtol=0, atol=0)
    finally:
        save_file(good, str(weights))
    # the same model takes the good adapter afterwards, and computes what the trained one does
    get_method(name).load(model, directory)
    torch.testing.assert_close(logits(model), logits(trained), rtol=0, atol=0)


def test_lora_fused_and_packed_layers_are_undone(tmp_path):
    """LoRA's own checks refuse a bad file before attaching; here the shared helper fails after
    `add_lora` wrapped every linear, fused q/k/v and gate/up, wrapped the MLPs and packed the
    gate/up weights into one matrix (a new storage behind existing parameters): all undone."""
    model = tiny_llama()
    before = fingerprint(model)
    source = tiny_llama()
    add_lora(source, LoraConfig(r=2, target_modules="all-linear"))
    assert not owns_storage(source.model.layers[0].mlp.gate_proj.base_layer.weight)  # packed by add_lora
    tensors = {k: v.clone() for k, v in adapter_state_dict(source).items()}
    last = list(tensors)[-1]
    tensors[last] = tensors[last][:, :1]
    with pytest.raises(AdapterError, match=f"{last}' of shape"):
        load_all_or_nothing(model, lambda: add_lora(model, LoraConfig(r=2, target_modules="all-linear")),
                            tensors, lambda: adapter_state_dict(model), tmp_path / "w.safetensors")
    assert not list(lora_layers(model))
    assert_same(before, fingerprint(model))


def test_a_failed_second_adapter_leaves_the_first_as_it_was(tmp_path):
    """A second LoRA adapter goes into the first one's layers (their adapter dicts and active
    lists) and needs more spare rows in the gate/up packing (a new matrix): all undone."""
    model = tiny_llama()
    add_lora(model, LoraConfig(r=2, target_modules="all-linear"), adapter="first")
    before = fingerprint(model)
    state = {n: (list(layer.adapters), list(layer.active)) for n, layer in lora_layers(model)}
    source = tiny_llama()
    add_lora(source, LoraConfig(r=4, target_modules="all-linear"), adapter="second")
    tensors = {k: v.clone() for k, v in adapter_state_dict(source, "second").items()}
    del tensors[list(tensors)[-1]]
    with pytest.raises(AdapterError, match="lacks key"):
        load_all_or_nothing(model, lambda: add_lora(model, LoraConfig(r=4, target_modules="all-linear"), "second"),
                            tensors, lambda: adapter_state_dict(model, "second"), tmp_path / "w.safetensors")
    assert {n: (list(layer.adapters), list(layer.active)) for n, layer in lora_layers(model)} == state
    assert_same(before, fingerprint(model))


def test_ctrl_c_inside_attach_is_undone(tmp_path):
    model = tiny_llama()
    before = fingerprint(model)

    def attach():
        add_bottleneck(model, BottleneckConfig(bottleneck_size=4))
        model.model.norm.weight.requires_grad_(True)
        model.extra_attribute = 1
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        load_all_or_nothing(model, attach, {}, dict, tmp_path / "w.safetensors")
    assert not hasattr(model, "extra_attribute")
    assert_same(before, fingerprint(model))


def test_an_attach_that_writes_an_existing_tensor_is_a_bug_not_a_silent_change(tmp_path):
    model = tiny_llama()

    def attach():
        with torch.no_grad():
            model.model.norm.weight.mul_(2)
    with pytest.raises(RuntimeError, match="efftune bug"):
        load_all_or_nothing(model, attach, {}, dict, tmp_path / "w.safetensors")


@pytest.mark.parametrize("case", CASES)
def test_a_config_field_of_the_wrong_type_is_refused_before_anything_attaches(saved, case):
    # found by tests/test_fuzz.py: prefix tuning checked its `efftune` field after attaching
    import json
    name, make, _, _ = CASES[case]
    directory = saved[case][0]
    originals = {f: f.read_text() for f in directory.glob("*.json")}
    try:
        for f, text in originals.items():
            record = json.loads(text)
            if isinstance(record, dict):
                f.write_text(json.dumps({**record, "efftune": "LORA"}))
        model = make()
        before = fingerprint(model)
        try:
            get_method(name).load(model, directory)
        except EfftuneError as exc:
            assert "\n" not in str(exc)
            assert_same(before, fingerprint(model))
    finally:
        for f, text in originals.items():
            f.write_text(text)

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from efftune.errors import AdapterError
from efftune.methods.lora.config import LoraConfig
from efftune.methods.lora.layer import lora_layers
from efftune.methods.lora.model import add_lora
from efftune.methods.lora.peft_format import load_adapter, save_adapter
from tests.conftest import randomize_lora, tiny_llama

IDS = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))


def logits(m):
    with torch.no_grad():
        return m(input_ids=IDS).logits


def trained_adapter(tmp_path, cfg: LoraConfig | None = None):
    cfg = cfg or LoraConfig(r=4, alpha=8)
    m = tiny_llama()
    add_lora(m, cfg)
    randomize_lora(m)
    save_adapter(m, tmp_path / "adapter", cfg)
    return m, tmp_path / "adapter"


def test_files_use_peft_names_and_shapes(tmp_path):
    _, d = trained_adapter(tmp_path)
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    tensors = load_file(str(d / "adapter_model.safetensors"))
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (32, 4)
    assert len(tensors) == 2 * 7 * 2


def test_save_load_round_trip(tmp_path):
    m, d = trained_adapter(tmp_path)
    m2 = tiny_llama()
    cfg = load_adapter(m2, d)
    assert cfg.r == 4 and cfg.alpha == 8
    torch.testing.assert_close(logits(m2), logits(m), atol=0, rtol=0)


def test_peft_loads_our_adapter(tmp_path, peft):
    m, d = trained_adapter(tmp_path, LoraConfig(r=4, alpha=8, use_rslora=True))
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(d)).eval()
    torch.testing.assert_close(logits(pm), logits(m), atol=1e-5, rtol=0)


def peft_adapter_with_patterns(directory, peft):
    """A peft LoRA with per-module ranks and alphas and non-zero B, saved to `directory`."""
    pcfg = peft.LoraConfig(r=6, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"],
                           rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3})
    pm = peft.get_peft_model(tiny_llama(), pcfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    pm.eval()
    pm.save_pretrained(str(directory))
    return pm


def test_we_load_peft_adapter(tmp_path, peft):
    pm = peft_adapter_with_patterns(tmp_path / "p", peft)
    expected = logits(pm)
    m = tiny_llama()
    load_adapter(m, tmp_path / "p")
    torch.testing.assert_close(logits(m), expected, atol=1e-5, rtol=0)
    ranks = {n: l.adapters["default"].r for n, l in lora_layers(m)}
    assert ranks["model.layers.0.mlp.down_proj"] == 2 and ranks["model.layers.0.self_attn.q_proj"] == 6


def test_mixed_ranks_survive_our_save_for_peft(tmp_path, peft):
    pm = peft_adapter_with_patterns(tmp_path / "p", peft)
    m = tiny_llama()
    cfg = load_adapter(m, tmp_path / "p")
    save_adapter(m, tmp_path / "ours", cfg)
    again = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(logits(again), logits(pm), atol=1e-5, rtol=0)


def test_shape_mismatch_names_the_key(tmp_path):
    _, d = trained_adapter(tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM
    other = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(AdapterError, match=r"q_proj\.lora_A\.weight.*\(4, 32\).*\(4, 48\)"):
        load_adapter(other, d)


def test_module_missing_from_model(tmp_path):
    _, d = trained_adapter(tmp_path)
    with pytest.raises(AdapterError, match="layers.2|no such module"):
        # a one-layer model lacks layer 1
        load_adapter(tiny_llama(layers=1), d)


def test_missing_files_and_pickle_refused(tmp_path):
    with pytest.raises(AdapterError, match="does not exist"):
        load_adapter(tiny_llama(), tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="has no adapter_config.json"):
        load_adapter(tiny_llama(), tmp_path / "empty")
    _, d = trained_adapter(tmp_path)
    tensors = load_file(str(d / "adapter_model.safetensors"))
    torch.save(tensors, d / "adapter_model.bin")
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="pickle"):
        load_adapter(tiny_llama(), d)
    m = tiny_llama()
    load_adapter(m, d, allow_pickle=True)
    assert len(list(lora_layers(m))) == 14


def test_unexpected_key_is_named(tmp_path):
    _, d = trained_adapter(tmp_path)
    tensors = load_file(str(d / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.0.mlp.up_proj.weight"] = torch.zeros(2)
    save_file(tensors, str(d / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="up_proj.weight.*not a LoRA factor"):
        load_adapter(tiny_llama(), d)


def test_save_is_atomic_and_replaces(tmp_path):
    m, d = trained_adapter(tmp_path)
    save_adapter(m, d, LoraConfig(r=4, alpha=8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_rank_in_config_must_match_the_tensors_and_a_refusal_changes_nothing(tmp_path):
    _, d = trained_adapter(tmp_path)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))  # the tensors are rank 4
    m = tiny_llama()
    before = {n: p.clone() for n, p in m.named_parameters()}
    with pytest.raises(AdapterError, match=r"says r=8 for 'model.layers.0.self_attn.q_proj', but its tensors have "
                                           r"rank 4"):
        load_adapter(m, d)
    assert not list(lora_layers(m)) and all(p.requires_grad for p in m.parameters())
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "rank_pattern": {"q_proj": 8}}))
    with pytest.raises(AdapterError, match="says r=8 for 'model.layers.0.self_attn.q_proj'"):
        load_adapter(tiny_llama(), d)


@pytest.mark.parametrize("change, message", [
    (lambda cfg: cfg.update(lora_alpha="big"), "field 'lora_alpha' is 'big', expected a positive number"),
    (lambda cfg: cfg.update(r=0), "field 'r' is 0, expected a positive integer"),
    (lambda cfg: cfg.update(alpha_pattern={"q_proj(": 2}), "alpha_pattern key 'q_proj\\(' is not a valid regex"),
])
def test_bad_config_fields_are_named(tmp_path, change, message):
    _, d = trained_adapter(tmp_path)
    cfg = json.loads((d / "adapter_config.json").read_text())
    change(cfg)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=message):
        load_adapter(tiny_llama(), d)


def test_torn_weights_and_non_object_config_are_named(tmp_path):
    _, d = trained_adapter(tmp_path)
    weights = d / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(AdapterError, match="adapter_model.safetensors is not a readable safetensors file"):
        load_adapter(tiny_llama(), d)
    (d / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(AdapterError, match="adapter_config.json holds a JSON list, expected an object"):
        load_adapter(tiny_llama(), d)

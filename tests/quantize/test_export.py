"""A full-model export on a quantised base (efftune's NF4 / int8, or bitsandbytes'): the adapter is
merged into a dequantised copy in the base's own dtype, one line says so, and the written directory
is a plain transformers model that computes what the adapter on the quantised base computes."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from efftune.methods.lora import LoraConfig, add_lora, export_merged, save_adapter
from efftune.quantize import quantize_model, quantized_layers
from tests.conftest import make_tokenizer, randomize_lora
from tests.quantize.test_model import IDS, llama64
from tests.test_cli import last_json, run


@pytest.mark.parametrize("kind,dtype", [("nf4", torch.float32), ("int8", torch.float32), ("nf4", torch.bfloat16)])
def test_export_merges_into_a_dequantised_copy_in_the_base_dtype_and_says_so(tmp_path, kind, dtype):
    model = llama64(dtype)
    quantize_model(model, kind)
    add_lora(model, LoraConfig(r=4, alpha=8))
    randomize_lora(model)
    with torch.no_grad():  # in fp32 (the same codes, the compute dtype moved): rounding aside, the reference
        expected = copy.deepcopy(model).float()(IDS).logits
    lines: list[str] = []
    export_merged(model, make_tokenizer(), tmp_path / "m", log=lines.append)
    name = str(dtype).removeprefix("torch.")
    assert len(lines) == 1 and "quantised (14 layers)" in lines[0] and f"dequantised copy in {name}" in lines[0]
    assert len(quantized_layers(model)) == 14  # the caller's model is left as it was
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear
    assert plain.model.layers[0].self_attn.q_proj.weight.dtype == dtype
    with torch.no_grad():
        got = plain.float()(IDS).logits
    # bf16: the merged weight is rounded to bf16 once more (computed here in fp32 to see only that)
    tol = 1e-4 if dtype == torch.float32 else 0.02 * expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=0 if dtype == torch.bfloat16 else tol, atol=tol)


def test_export_of_a_plain_base_says_nothing(tmp_path):
    model = llama64(torch.float32)
    add_lora(model, LoraConfig(r=4))
    lines: list[str] = []
    export_merged(model, None, tmp_path / "m", log=lines.append)
    assert lines == []


def test_merge_full_model_on_a_bitsandbytes_checkpoint(capsys, tmp_path):
    """`efftune merge --full-model` on a pre-quantised bitsandbytes checkpoint: a plain model, said in one line."""
    pytest.importorskip("bitsandbytes")
    from tests.quantize.test_bnb import load_bnb
    float_dir = tmp_path / "float"
    llama64(torch.float32).save_pretrained(float_dir)
    saved = tmp_path / "bnb4"
    load_bnb(float_dir, "4-bit").save_pretrained(saved)
    make_tokenizer().save_pretrained(saved)
    model = AutoModelForCausalLM.from_pretrained(saved)
    cfg = LoraConfig(r=4, alpha=8)
    add_lora(model, cfg)
    randomize_lora(model)
    x = model.get_input_embeddings()(IDS).detach().requires_grad_(True)  # bitsandbytes' fp32 path
    expected = model(inputs_embeds=x).logits.detach()
    save_adapter(model, tmp_path / "a", cfg)
    code, out, err = run(capsys, "merge", "--model", saved, "--adapters", tmp_path / "a", "--full-model",
                         "--output", tmp_path / "m")
    assert code == 0, err
    assert last_json(out)["kind"] == "model"
    assert "the base is quantised (14 layers)" in err and "dequantised copy in float32" in err
    assert "quantization_config" not in json.loads((tmp_path / "m" / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(plain(inputs_embeds=x.detach()).logits, expected, rtol=1e-4, atol=1e-4)

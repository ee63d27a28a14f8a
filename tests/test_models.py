import pytest
import torch

from efftune.errors import EfftuneError
from efftune.models import load_model, resolve_dtype
from tests.conftest import make_tokenizer, tiny_llama


def test_local_directory_gets_pad_token_and_dtype(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    tok = make_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    model, tokenizer = load_model(str(tmp_path), dtype="fp32", device="cpu")
    assert tokenizer.pad_token == tokenizer.eos_token == "<eos>"
    assert next(model.parameters()).dtype == torch.float32
    model64, _ = load_model(str(tmp_path), dtype="float64", device="cpu")
    assert next(model64.parameters()).dtype == torch.float64


def test_auto_dtype_is_fp32_on_cpu():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(EfftuneError, match="dtype: unknown value 'fp8'"):
        resolve_dtype("fp8", torch.device("cpu"))


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(EfftuneError, match="GGUF file .*nope.gguf does not exist"):
        load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(EfftuneError, match="local directory .*missing does not exist"):
        load_model(str(tmp_path / "missing"))

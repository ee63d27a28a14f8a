"""`efftune train --quantize` on the tiny local model: methods train on a quantised base, the adapter
loads on the original base, and what cannot run is refused up front in one line."""
import pytest

from tests.conftest import make_tokenizer
from tests.quantize.test_experts import moe64
from tests.test_cli import data_file, last_json, run  # noqa: F401 (data_file is a fixture)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    """A tiny Qwen3-MoE (every weight in blocks of 64) and the tokenizer, as a local directory."""
    import torch
    d = tmp_path_factory.mktemp("moe")
    moe64(torch.float32, vocab=300).save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    return d


@pytest.mark.parametrize("method", ["expert-lora", "lora"])
def test_train_on_quantised_moe_experts(capsys, moe_dir, data_file, tmp_path, method):  # noqa: F811
    out_dir = tmp_path / "run"
    code, out, err = run(capsys, "train", "--model", moe_dir, "--data", data_file, "--steps", 2, "--batch-size", 4,
                         "--eval-size", 8, "--method", method, "--quantize", "nf4", "--output", out_dir)
    assert code == 0, err
    assert "quantize nf4: 8 linear layers of the decoder blocks and 2 fused-experts modules" in err
    assert last_json(out)["steps"] == 2
    code, out, err = run(capsys, "eval", "--model", moe_dir, "--adapter", out_dir / "adapter", "--data", data_file)
    assert code == 0, err


@pytest.mark.parametrize("kind,method", [("nf4", "lora"), ("int8", "lora-fa"), ("nf4", "mixlora")])
def test_train_on_a_quantised_base(capsys, model_dir, data_file, tmp_path, kind, method):  # noqa: F811
    out_dir = tmp_path / "run"
    code, out, err = run(capsys, "train", "--model", model_dir, "--data", data_file, "--steps", 3, "--batch-size", 4,
                         "--eval-size", 8, "--method", method, "--quantize", kind, "--lr", "1e-2",
                         "--output", out_dir)
    assert code == 0, err
    assert f"quantize {kind}: " in err
    if kind == "nf4":  # the tiny model is 32 wide: only down_proj takes blocks of 64
        assert "2 linear layers" in err and "not a multiple of 64" in err and "q_proj" in err
    summary = last_json(out)
    assert summary["steps"] == 3 and summary["accuracy_after"] is not None
    code, out, err = run(capsys, "eval", "--model", model_dir, "--adapter", out_dir / "adapter", "--data", data_file)
    assert code == 0, err


@pytest.mark.parametrize("args,words", [
    (["--method", "relora", "--quantize", "nf4"], ["quantize: nf4", "method: relora"]),
    (["--fp8-base", "--quantize", "int8"], ["quantize: int8", "train.fp8_base"]),
    (["--quantize", "fp4"], ["quantize", "fp4"]),
    (["--method", "esft", "--esft.mode", "full", "--quantize", "nf4"], ["quantize: nf4", "esft.mode: full"]),
])
def test_refused_in_one_line(capsys, model_dir, data_file, tmp_path, args, words):  # noqa: F811
    code, out, err = run(capsys, "train", "--model", model_dir, "--data", data_file, "--output", tmp_path / "r", *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and all(w in err for w in words), err
    assert not (tmp_path / "r").exists()

"""`efftune train --quantize` on the tiny local model: methods train on a quantised base, the adapter
loads on the original base, and what cannot run is refused up front in one line."""
import pytest

from tests.test_cli import data_file, last_json, run  # noqa: F401 (data_file is a fixture)


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
])
def test_refused_in_one_line(capsys, model_dir, data_file, tmp_path, args, words):  # noqa: F811
    code, out, err = run(capsys, "train", "--model", model_dir, "--data", data_file, "--output", tmp_path / "r", *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and all(w in err for w in words), err
    assert not (tmp_path / "r").exists()

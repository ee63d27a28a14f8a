"""The example scripts still run (they use the real default model's tokenizer, hence slow)."""
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def test_moe_expert_lora_example_runs(tmp_path, bigbench_sdist):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "moe_expert_lora.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "experts ESFT would train: {'model.layers.0.mlp.experts'" in proc.stdout
    assert "reloaded adapter gives the same logits: True" in proc.stdout
    assert (tmp_path / "runs" / "moe-example" / "peft" / "adapter_config.json").is_file()
    assert (tmp_path / "runs" / "moe-example" / "routing.png").is_file()

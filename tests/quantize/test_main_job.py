"""The main job on the real default model with `--quantize nf4` against the same job unquantised, both
in bf16 (`--dtype bf16 --precision bf16`: the issue's reference is the bf16 main job, what a GPU runs):
held-out accuracy within 0.03. Two whole main jobs (bf16 on 2 CPU cores: about half an hour), so it
runs only when asked: EFFTUNE_QUANT_MAIN_JOB=1. On 2026-12-05: bf16 0.895, NF4 0.865 (seed 0). In
fp32 the unquantised job reaches 0.905 (0.04 above; seeds 1 and 2 within 0.015: README, Quantized
bases)."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.environ.get("EFFTUNE_QUANT_MAIN_JOB") != "1",
                                 reason="two whole main jobs: set EFFTUNE_QUANT_MAIN_JOB=1")]


def main_job(out, *args) -> dict:
    proc = subprocess.run([sys.executable, "-m", "efftune.cli", "train", "--eval-every", "0", "--output", str(out),
                           *args], capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_nf4_main_job_matches_the_unquantised_one(tmp_path):
    bf16 = ("--dtype", "bf16", "--precision", "bf16")
    plain = main_job(tmp_path / "plain", *bf16)
    nf4 = main_job(tmp_path / "nf4", *bf16, "--quantize", "nf4")
    # accuracies are hits / 200, printed to 4 places: compare the gap as the count it is, not its float error
    assert round(abs(nf4["accuracy_after"] - plain["accuracy_after"]), 4) <= 0.03, (plain, nf4)
    assert nf4["accuracy_after"] >= nf4["accuracy_before"] + 0.5

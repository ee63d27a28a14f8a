"""The main job on the real default model with `--quantize nf4` against the same job in the model's
own dtype: held-out accuracy within 0.03. Two whole main jobs (about 8 minutes on 2 CPU cores), so
it runs only when asked: EFFTUNE_QUANT_MAIN_JOB=1. On 2026-12-04 and again on 2026-12-05: fp32 0.905,
NF4 0.865 (fails by 0.01; seeds 1 and 2 are within 0.015: see README, Quantized bases)."""
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
    plain = main_job(tmp_path / "plain")
    nf4 = main_job(tmp_path / "nf4", "--quantize", "nf4")
    assert abs(nf4["accuracy_after"] - plain["accuracy_after"]) <= 0.03, (plain, nf4)
    assert nf4["accuracy_after"] >= nf4["accuracy_before"] + 0.5

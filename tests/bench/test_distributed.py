"""bench/distributed.py on CPU: 2 gloo ranks of the tiny shape, each case a torchrun of its own (about
10 s each here, most of it imports). A base rank 0 alone builds and sends (--rank0-base: the 70B
shape's way) must train as the same base built on every rank does."""
from __future__ import annotations

import json

import pytest
import torch

from bench import distributed as bench
from bench.base_init import filled_base

FSDP, DDP = ("efftune-fsdp", "peft-fsdp"), ("efftune-ddp", "peft-ddp")


def run_bench(capsys, cases: tuple[str, ...], *flags: str) -> dict[str, dict]:
    """The launcher's JSON line for each case, by case."""
    bench.main(["--shape", "tiny", "--nproc", "2", "--steps", "1", "--warmup", "1", "--seq", "32",
                "--cases", *cases, "--ckpt", "--init", "fast", *flags])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    found = {r["case"]: r for r in lines if "case" in r}
    for case in cases:
        assert "error" not in found[case], found[case].get("stderr_tail", found[case]["error"])
    return found


def test_a_base_from_rank0_trains_as_the_base_every_rank_builds(capsys, monkeypatch):
    """Under FSDP (efftune's train(), and peft through torch's fully_shard) the runs match in their base
    weights, buffers and loss; under DDP (a torchrun less each: the test's time) every rank's whole
    base is rank 0's, which is the fill's."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two ranks on a small machine: threads only slow them
    from_rank0 = run_bench(capsys, FSDP + DDP, "--rank0-base")
    every_rank = run_bench(capsys, FSDP, "--no-rank0-base")
    built = filled_base("tiny", torch.device("cpu"))  # what every rank's base holds in the second run
    values = torch.cat([p.detach().double().view(-1) for p in built.parameters()])
    for case in FSDP + DDP:
        got = from_rank0[case]
        assert (got["rank0_base"], got["ckpt"], got["init"]) == (True, True, "fast")
        # each rank's shard (fsdp) or whole copy (ddp) of the base, and its buffers (inv_freq), are rank 0's
        assert got["base_weights"]["every_rank_same"]
        assert got["base_weights"]["sum"] == pytest.approx(values.sum().item(), rel=1e-9)
        assert got["base_weights"]["sum_squares"] == pytest.approx(values.square().sum().item(), rel=1e-9)
    for case in FSDP:
        a, b = from_rank0[case], every_rank[case]
        assert b["rank0_base"] is False and b["base_weights"] == a["base_weights"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)  # after a step: the adapters' start too
    assert "from rank 0" in from_rank0["peft-fsdp"]["fsdp_via"]
    assert "from rank 0" not in every_rank["peft-fsdp"]["fsdp_via"]

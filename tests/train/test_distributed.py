"""Several ranks (gloo on CPU) against one process: `efftune.train.distributed` and the loop under
torchrun. Each multi-process test starts 2 tiny float64 ranks (a few seconds of imports each)."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from efftune.errors import ConfigError
from efftune.train.distributed import World, check_batch
from efftune.train.loop import TrainConfig, train
from tests.train import dist_worker

CONFIG = dict(steps=3, batch_size=4, lr=1e-2, warmup_steps=1, eval_every=0, save_every=0, max_length=64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ranks(out: Path, config: dict, n: int = 2, resume: bool = False, evaluate: bool = False) -> None:
    mp.spawn(dist_worker.spawned, args=(n, free_port(), str(out), config, resume, evaluate), nprocs=n, join=True)


def one_process(out: Path, config: dict, resume: bool = False):
    model = dist_worker.lora_model()
    result = train(model, dist_worker.sequences(), TrainConfig(**config), out / "run", pad_id=1, resume=resume)
    return result, {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def losses(run_dir: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


def assert_same_weights(a: dict, b: dict, tol: float = 1e-10) -> None:
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=tol, atol=tol, msg=n)


def test_global_batch_must_split_evenly():
    assert check_batch(8, 0, World(0, 2)) == 4
    assert check_batch(8, 2, World(1, 2)) == 2
    with pytest.raises(ConfigError, match="split across 3 ranks"):
        check_batch(8, 0, World(0, 3))
    with pytest.raises(ConfigError, match="not divisible by 2 ranks x train.micro_batch_size 4"):
        check_batch(12, 4, World(0, 2))
    with pytest.raises(ConfigError, match="train.distributed must be one of"):
        TrainConfig(distributed="zero3")


def test_ddp_two_ranks_equal_one_process(tmp_path):
    config = {**CONFIG, "micro_batch_size": 1}  # 2 examples a rank: accumulation under no_sync too
    ranks(tmp_path / "ddp", config, evaluate=True)
    ref, weights = one_process(tmp_path / "one", config)
    got = [load_file(str(tmp_path / "ddp" / f"rank-{r}.safetensors")) for r in (0, 1)]
    assert_same_weights(got[0], got[1], tol=0)  # replicas stay identical
    assert_same_weights(weights, got[0])
    assert losses(tmp_path / "ddp" / "run") == pytest.approx(losses(tmp_path / "one" / "run"), rel=1e-9)
    info = json.loads((tmp_path / "ddp" / "rank-0.json").read_text())
    assert info["tokens"] == ref.tokens  # both ranks' tokens
    # the evaluation, sharded over the ranks, is the whole set's: 7 examples, 4 + 3
    assert [e["step"] for e in info["evals"]] == [0, 3] and all(0 <= e["accuracy"] <= 1 for e in info["evals"])
    assert (tmp_path / "ddp" / "run" / "checkpoints" / "step-000003").is_dir()

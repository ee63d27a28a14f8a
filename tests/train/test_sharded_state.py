"""Checkpoints in the sharded (DCP) format of `train.distributed: fsdp`, in one process: what a
resume reads back, and a load that fails changing nothing. (Written by 2 FSDP ranks and resumed on
1 and on 2: tests/train/test_distributed.py.)"""
from __future__ import annotations

import pytest
import torch

from efftune.errors import CheckpointError
from efftune.methods.lora.config import LoraConfig
from efftune.methods.lora.model import add_lora
from efftune.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from tests.conftest import tiny_llama


def trained(r: int = 4):
    """A tiny LoRA model after one AdamW step (so the optimizer has state), and its optimizer."""
    model = tiny_llama(dtype=torch.float64)
    torch.manual_seed(1)
    add_lora(model, LoraConfig(r=r))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model(torch.arange(12).reshape(2, 6)).logits.square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def fresh(r: int = 4):
    model = tiny_llama(dtype=torch.float64)
    torch.manual_seed(2)  # other initial adapter weights than `trained`'s
    add_lora(model, LoraConfig(r=r))
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def checkpoint(tmp_path):
    model, optimizer = trained()
    save_checkpoint(tmp_path / "step-000001", model, optimizer, 1, {"note": 1}, sharded=True)
    return tmp_path / "step-000001", model, optimizer


def test_a_sharded_checkpoint_loads_in_one_process(checkpoint):
    directory, model, optimizer = checkpoint
    assert latest_checkpoint(directory.parent) == directory
    assert (directory / "sharded" / ".metadata").is_file() and not (directory / "trainable.safetensors").exists()
    other, other_opt = fresh()
    state = load_checkpoint(directory, other, other_opt)
    assert state["step"] == 1 and state["note"] == 1
    for n, w in weights(model).items():
        assert torch.equal(w, dict(other.named_parameters())[n]), n
    want, got = optimizer.state_dict(), other_opt.state_dict()
    assert want["state"].keys() == got["state"].keys()
    for i, s in want["state"].items():
        for k, v in s.items():
            assert torch.equal(v, got["state"][i][k]), (i, k)
    assert got["param_groups"][0]["lr"] == want["param_groups"][0]["lr"]


def test_a_torn_shard_changes_nothing(checkpoint):
    directory = checkpoint[0]
    shard = next((directory / "sharded").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    other, other_opt = fresh()
    before = weights(other)
    with pytest.raises(CheckpointError, match="sharded/ shards cannot be read"):
        load_checkpoint(directory, other, other_opt)
    assert all(torch.equal(w, dict(other.named_parameters())[n]) for n, w in before.items())
    assert not other_opt.state  # as before the load


def test_a_checkpoint_of_another_rank_is_refused_before_anything_changes(checkpoint):
    other, other_opt = fresh(r=8)
    before = weights(other)
    with pytest.raises(CheckpointError, match="has shape"):
        load_checkpoint(checkpoint[0], other, other_opt)
    assert all(torch.equal(w, dict(other.named_parameters())[n]) for n, w in before.items())
    assert not other_opt.state


def _killed_save(directory):
    """What a sharded save killed before it moved its shards into place leaves: DCP's files in step-N.shards."""
    directory.mkdir(parents=True)
    (directory / "__0_0.distcp").write_bytes(b"shard")
    (directory / ".metadata.tmp").write_bytes(b"")
    return directory


def test_a_save_clears_the_staging_a_killed_save_left_and_nothing_else(tmp_path):
    model, optimizer = trained()
    root = tmp_path / "checkpoints"
    killed, same_step = _killed_save(root / "step-000001.shards"), _killed_save(root / "step-000003.shards")
    foreign = root / "step-000002.shards"  # named as ours, but holding a file DCP does not write
    foreign.mkdir()
    (foreign / "notes.txt").write_text("someone's")
    other = _killed_save(root / "backup.shards")  # DCP's files, but not a name a save gives
    save_checkpoint(root / "step-000003", model, optimizer, 3, {}, sharded=True)
    assert sorted(p.name for p in root.iterdir()) == ["backup.shards", "latest", "step-000002.shards", "step-000003"]
    assert (foreign / "notes.txt").read_text() == "someone's" and (other / "__0_0.distcp").is_file()
    assert not killed.exists() and not same_step.exists()
    assert latest_checkpoint(root) == root / "step-000003"


def test_a_resume_clears_the_staging_a_killed_save_left(tmp_path):
    from efftune.train.loop import TrainConfig, train
    from tests.train.dist_worker import lora_model, sequences
    config = TrainConfig(steps=2, batch_size=4, lr=1e-2, warmup_steps=0, eval_every=0, save_every=1)
    train(lora_model(), sequences(), config, tmp_path / "run", pad_id=1)
    killed = _killed_save(tmp_path / "run" / "checkpoints" / "step-000003.shards")
    result = train(lora_model(), sequences(), config, tmp_path / "run", pad_id=1, resume=True)
    assert result.start_step == 2 and not killed.exists()
    assert sorted(p.name for p in killed.parent.iterdir()) == ["latest", "step-000001", "step-000002"]

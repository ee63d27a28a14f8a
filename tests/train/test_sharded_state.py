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

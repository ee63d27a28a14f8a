"""The packed tensors under FSDP2's mixed precision (one gloo rank in this process): bf16 compute
casts none of them (codes and int8 scales stay integers, fp32 scales fp32) and the output is the
unsharded layer's, bit for bit. Sharding over 2 ranks: tests/train/test_distributed.py."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from efftune.quantize import Int8Linear, Nf4Linear


@pytest.fixture
def one_rank(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("cls", [Nf4Linear, Int8Linear])
def test_bf16_mixed_precision_casts_no_packed_tensor(one_rank, cls):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor
    torch.manual_seed(0)
    layer = cls(nn.Linear(128, 64, bias=False))  # fp32 compute dtype: the policy's bf16 would be a cast
    block = nn.Sequential(layer)
    x = torch.randn(3, 128)
    with torch.no_grad():
        want = layer(x.bfloat16())  # the policy casts the block's input to bf16
    stored = {n: t.dtype for n, t in (*layer.named_parameters(), *layer.named_buffers())}
    fully_shard(block, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    assert all(isinstance(p, DTensor) for p in layer.parameters())  # FSDP2 manages the packed tensors
    seen = {}
    layer.register_forward_pre_hook(lambda m, _: seen.update(
        {n: (type(t), t.dtype) for n, t in (*m.named_parameters(), *m.named_buffers())}))
    with torch.no_grad():
        got = block(x)
    assert {n: dtype for n, (_, dtype) in seen.items()} == stored
    assert all(kind is not DTensor for kind, _ in seen.values())  # gathered whole for the forward
    assert got.dtype == want.dtype and torch.equal(got, want)

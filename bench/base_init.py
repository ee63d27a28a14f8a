"""Random-init Llama bases of bench/throughput.py's shapes, built without transformers' init.

transformers initialises a random model module by module (`normal_` per weight), drawing every value
from one serial CPU generator: minutes for the 8B shape, far longer for the 70B one (131 GiB in bf16)
in host memory. A throughput benchmark needs the values' scale, not their randomness, so
`filled_base` builds the model with its parameters on the meta device, gives them storage where
they will live (`to_empty`) and copies one block of N(0, initializer_range) values, drawn once,
tiled into every weight matrix; the norms' weights are 1 and other vectors 0, as transformers' init
sets them. The block's length is odd, so its tiles do not line up with the power-of-two widths of the
weights' rows: no two rows of a matrix are equal while it has fewer rows than the block has values
(2^24 + 1; the largest shape's largest matrix, the 70B embedding, has 128256). The block comes from a seeded CPU generator: every
call, on any device, fills the same values, so ranks that each fill their own base hold the same
weights, and a base rank 0 fills and sends matches them.

Buffers are computed by the model's own constructor (rotary `inv_freq`): `empty_base` puts the
parameters on the meta device but builds the buffers in host memory (accelerate's
`init_empty_weights(include_buffers=False)`), so they hold their right values on every rank.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from bench.throughput import llama_config
from efftune.train.distributed import to_empty_keeping_ties

NOISE_VALUES = (1 << 24) + 1  # 16.8M values (32 MiB in bf16): drawn in a fraction of a second


def empty_base(shape: str) -> nn.Module:
    """The bf16 Llama of `shape` with its parameters on the meta device (no storage) and its buffers
    computed in host memory; in training mode."""
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM
    with init_empty_weights(include_buffers=False):
        model = LlamaForCausalLM._from_config(llama_config(shape), dtype=torch.bfloat16)
    # accelerate swaps each parameter for a meta copy as it is registered, the tied output embedding
    # too, which unties it: tie again
    model.tie_weights()
    return model.train()


def base_gib(shape: str) -> float:
    """The size of `shape`'s bf16 parameters in GiB (a tied matrix once)."""
    return sum(p.numel() * p.element_size() for p in empty_base(shape).parameters()) / 2**30


def filled_base(shape: str, device: torch.device) -> nn.Module:
    """The bf16 Llama of `shape` on `device`, its weights filled fast (the module docstring says how).
    Seeds torch's generator with 0 afterwards, as `build_model` does before transformers' init, so
    that what attaches next (an adapter's initial values) draws the same on every rank."""
    model = empty_base(shape)
    buffers = {name: b.clone() for name, b in model.named_buffers()}  # to_empty discards them
    to_empty_keeping_ties(model, device)
    fill_parameters(model, model.config.initializer_range)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    torch.manual_seed(0)
    return model


def fill_parameters(model: nn.Module, std: float) -> None:
    """Every parameter of `model` set: matrices to tiles of one N(0, std) block, the weights of norm
    layers to 1, other vectors to 0. A tied parameter is filled once."""
    largest = max(p.numel() for p in model.parameters() if p.ndim >= 2)
    noise = torch.randn(min(NOISE_VALUES, largest), generator=torch.Generator().manual_seed(0)).mul_(std)
    as_param: dict[tuple, torch.Tensor] = {}  # the block in each (dtype, device) the parameters take
    done: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            for p in module.parameters(recurse=False):
                if id(p) in done:
                    continue
                done.add(id(p))
                if p.ndim < 2:
                    p.fill_(1.0 if type(module).__name__.endswith("Norm") else 0.0)
                    continue
                key = (p.dtype, p.device)
                if key not in as_param:
                    as_param[key] = noise.to(device=p.device, dtype=p.dtype)
                _tile(p.view(-1), as_param[key])


def _tile(flat: torch.Tensor, block: torch.Tensor) -> None:
    for start in range(0, flat.numel(), block.numel()):
        part = flat[start:start + block.numel()]
        part.copy_(block[:part.numel()])


@contextmanager
def all_cores() -> Iterator[None]:
    """torch's CPU work on every core of the machine for a while (torchrun starts each rank with one
    thread): for filling a base in host memory while the other ranks wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)

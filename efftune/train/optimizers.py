"""The optimizers the training loop builds (`train.optimizer`): AdamW, or AdamW with 8-bit moments.

`adamw` is torch's AdamW (fused on CUDA). `adamw8bit` is torchao's AdamW8bit: both Adam moments of
every tensor of 4,096 values or more are kept as 8-bit codes with one fp32 scale per block of 256
(dynamic-tree quantisation, as bitsandbytes does), 2 bytes a weight instead of 8, the update itself
computed in fp32. It is what lets a full fine-tune of an 8B model fit one 141 GB GPU
(`efftune.methods.full`). torchao is an optional extra (`pip install "efftune[optim]"`); the core
never imports it unless this optimizer is asked for.

Checkpoints hold plain tensors: an 8-bit moment is written as its codes (uint8, the parameter's
shape, under the moment's key) and its block scales (under `<key>::scale`), and rebuilt from them on
load, so a resumed run continues bit-identically. (Writing the values the codes stand for and
quantising them again would not be exact: the signed code map has +1 but not -1, so a block whose
largest value is negative comes back with another scale.)
"""
from __future__ import annotations

import importlib.util
from typing import Iterable, Sequence

import torch
from torch import nn

from ..errors import ConfigError

OPTIMIZERS = ("adamw", "adamw8bit")
EXTRA = "optim"  # pip install "efftune[optim]"
SCALE = "::scale"  # checkpoint key suffix of an 8-bit moment's block scales
MOMENTS = {"exp_avg": True, "exp_avg_sq": False, "max_exp_avg_sq": False}  # state key -> signed codes


def check_optimizer(name: str) -> None:
    """`train.optimizer` is one we build, and its package is installed (said before a run starts)."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    if name == "adamw8bit" and importlib.util.find_spec("torchao") is None:
        raise ConfigError(f"train.optimizer adamw8bit needs torchao, which is not installed: "
                          f"pip install \"efftune[{EXTRA}]\"")


def build_optimizer(name: str, groups: Sequence[dict], lr: float, device: torch.device,
                    fp32_moments: Iterable[torch.Tensor] = ()) -> torch.optim.Optimizer:
    """The optimizer `name` over parameter `groups` (each with its own weight decay); betas (0.9, 0.999),
    eps 1e-8. `fp32_moments`: parameters whose moments stay fp32 under adamw8bit (`embedding_weights`)."""
    check_optimizer(name)
    if name == "adamw8bit":
        return _adamw8bit_class()(list(groups), lr=lr, betas=(0.9, 0.999), eps=1e-8, fp32_moments=fp32_moments)
    return torch.optim.AdamW(list(groups), lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=device.type == "cuda")


def embedding_weights(model: nn.Module) -> list[torch.Tensor]:
    """The input and output embedding matrices: their Adam moments stay fp32 under adamw8bit. A row of a
    token that is rare in the batch gets a gradient many orders of magnitude below its block's largest,
    so its second moment rounds to 0 in 8 bits while its first does not, and the update m / (sqrt(v) + eps)
    blows up: measured here, a 3-step run moved such embedding entries by 0.79 at lr 1e-3 (fp32 AdamW:
    at most 0.002). bitsandbytes gives the same advice (32-bit state for embeddings)."""
    found = []
    for get in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, get)() if hasattr(model, get) else None
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and all(weight is not w for w in found):
            found.append(weight)
    return found


def is_quantized(value) -> bool:
    """Is this optimizer state an 8-bit moment (codes + block scales)?"""
    return torch.is_tensor(value) and type(value) is not torch.Tensor and hasattr(value, "codes") \
        and hasattr(value, "scale")


def state_tensors(field: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """One optimizer state entry as plain tensors for a checkpoint, by field name: the tensor itself,
    or an 8-bit moment's codes (under `field`, the parameter's shape) and block scales (`field::scale`)."""
    if is_quantized(value):
        return {field: value.codes.detach().contiguous(), f"{field}{SCALE}": value.scale.detach().contiguous()}
    return {field: value.detach().contiguous()}



_CLASS: list[type] = []


def _adamw8bit_class() -> type:
    """torchao's AdamW8bit as the loop drives it (made once: torchao is imported only here)."""
    if _CLASS:
        return _CLASS[0]
    from torchao.optim import AdamW8bit
    torchao_zeros = AdamW8bit._subclass_zeros  # an 8-bit moment of p's shape, codes and scales zero

    class EfftuneAdamW8bit(AdamW8bit):
        """torchao's AdamW8bit with three changes:
        - the moments of `fp32_moments` (the embeddings) stay fp32 (`embedding_weights` says why);
        - each group's lr stays a Python float (the loop sets it every step and a checkpoint writes it
          as JSON); it is handed to torchao's compiled update as a tensor, which torchao requires so
          that a new value does not recompile;
        - `load_state_dict` rebuilds 8-bit moments from a checkpoint's codes and scales (`state_tensors`)."""

        quantized_states = True  # checkpoint.load_checkpoint: this optimizer takes `::scale` entries

        def __init__(self, params, *args, fp32_moments: Iterable[torch.Tensor] = (), **kwargs):
            self.fp32_ids = {id(p) for p in fp32_moments}
            super().__init__(params, *args, **kwargs)

        def _new_buffer(self, p: torch.Tensor, signed: bool):
            if id(p) in self.fp32_ids:
                return torch.zeros_like(p, dtype=torch.float32)
            return super()._new_buffer(p, signed)

        def add_param_group(self, param_group: dict) -> None:
            torch.optim.Optimizer.add_param_group(self, param_group)  # torchao's would make lr a tensor
            self.param_groups[-1]["lr"] = float(self.param_groups[-1]["lr"])

        @torch.no_grad()
        def step(self, closure=None):
            lrs = [g["lr"] for g in self.param_groups]
            for g, lr in zip(self.param_groups, lrs):
                g["lr"] = torch.tensor(float(lr), dtype=torch.float32)
            try:
                return super().step(closure)
            finally:
                for g, lr in zip(self.param_groups, lrs):
                    g["lr"] = float(lr)

        def load_state_dict(self, state_dict: dict) -> None:
            super().load_state_dict(state_dict)
            for group in self.param_groups:
                for p in group["params"]:
                    state = self.state.get(p, {})
                    for key, signed in MOMENTS.items():
                        # a moment saved as codes and scales is rebuilt from them (exact); one saved
                        # plain stays plain (small tensors, embeddings, an adamw run resumed changed)
                        value, scale = state.get(key), state.pop(key + SCALE, None)
                        if value is None or scale is None:
                            continue
                        buffer = torchao_zeros(p, signed, self.block_size)
                        buffer.codes.copy_(value.to(torch.uint8))  # (load_state_dict made the codes floats)
                        buffer.scale.copy_(scale)
                        state[key] = buffer

    _CLASS.append(EfftuneAdamW8bit)
    return EfftuneAdamW8bit

"""LoRA-FA (Zhang et al. 2023): LoRA with `A` random and frozen; only `B` trains.

The point is memory. `dB = s · dYᵀ (A x)` needs only `A x` (tokens × r), and `dX` needs only
`A` and `B`, so the layer keeps `A x` for the backward pass and never `x` (tokens × in). Dropout
on the LoRA input would need a (tokens × in) mask; we keep the seed and regenerate it instead.

Optional gradient correction (paper v2): replace `grad_B` by `grad_B · (A Aᵀ + δI)⁻¹ / s²`, the
B step whose weight change `s · ΔB · A` best matches the full-weight gradient (least squares).
`A` never changes, so the r × r inverse is computed once per layer and reused until `A` is
written to (e.g. by loading an adapter).

On disk a LoRA-FA adapter is a LoRA adapter (peft format); `load_lora_fa` re-freezes `A`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .lora.config import LoraConfig
from .lora.layer import LoraAdapter, adapter_input
from .lora.model import add_lora
from .lora.peft_format import load_adapter, save_adapter
from .registry import Method


@dataclass
class LoraFAConfig(LoraConfig):
    correction: bool = True   # precondition grad_B by (A Aᵀ + δI)⁻¹ / s²
    delta: float = 1e-8
    SECTION: ClassVar[str] = "lora_fa"

    def __post_init__(self):
        super().__post_init__()
        if self.delta < 0:
            raise ConfigError(f"lora_fa.delta must be >= 0, got {self.delta}")


def _keep_mask(shape, p: float, seed: int, device, dtype) -> torch.Tensor:
    """The dropout keep-mask scaled by 1/(1-p), reproducible from `seed`."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.empty(shape, device=device, dtype=dtype).bernoulli_(1 - p, generator=gen) / (1 - p)


class FrozenALora(torch.autograd.Function):
    """`B (s · A · dropout(x))` with `A` frozen, saving only `s·A x` (plus `A`, `B` themselves)."""

    @staticmethod
    def forward(ctx, x, A, B, scaling: float, p: float, seed: int, correction):
        xd = x * _keep_mask(x.shape, p, seed, x.device, x.dtype) if p > 0 else x
        h = F.linear(xd, A) * scaling  # (..., r), scaled: the one activation kept for backward
        out = F.linear(h, B)
        ctx.save_for_backward(h, A, B, correction)
        ctx.scaling, ctx.p, ctx.seed, ctx.x_dtype, ctx.x_shape = scaling, p, seed, x.dtype, x.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, A, B, correction = ctx.saved_tensors
        s = ctx.scaling
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_B = None
        if ctx.needs_input_grad[2]:
            grad_B = (g.T @ h.reshape(-1, h.shape[-1]).to(g.dtype)).to(B.dtype)
            if correction is not None:
                grad_B = grad_B @ correction.to(grad_B.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = ((g @ B.to(g.dtype)) * s) @ A.to(g.dtype)
            grad_x = grad_x.reshape(ctx.x_shape)
            if ctx.p > 0:
                grad_x = grad_x * _keep_mask(ctx.x_shape, ctx.p, ctx.seed, grad_x.device, grad_x.dtype)
            grad_x = grad_x.to(ctx.x_dtype)
        return grad_x, None, grad_B, None, None, None, None


def correction_matrix(A: torch.Tensor, scaling: float, delta: float) -> torch.Tensor:
    """(A Aᵀ + δI)⁻¹ / s², shape (r, r), in float32 at least."""
    a = A.detach().to(torch.promote_types(A.dtype, torch.float32))
    gram = a @ a.T + delta * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    return torch.linalg.inv(gram) / scaling ** 2


class LoraFAAdapter(LoraAdapter):
    """A LoRA adapter whose `A` is frozen; its backward keeps `A x` only."""

    def __init__(self, *args, correction: bool = True, delta: float = 1e-8, **kwargs):
        super().__init__(*args, **kwargs)
        self.correction, self.delta = correction, delta
        self._cached: tuple[tuple, torch.Tensor] | None = None
        self.lora_A.requires_grad_(False)

    def requires_grad_(self, requires_grad: bool = True):
        super().requires_grad_(requires_grad)
        self.lora_A.requires_grad_(False)  # A stays frozen whatever the caller switches on
        return self

    def _correction(self) -> torch.Tensor | None:
        if not self.correction:
            return None
        if torch.compiler.is_compiling() and self._cached is not None:
            # A is frozen while training; compile_blocks refreshed the cache just before (a
            # data-pointer check here would break the compiled graph)
            return self._cached[1]
        key = (self.lora_A._version, self.lora_A.data_ptr(), self.lora_A.device)
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, correction_matrix(self.lora_A, self.scaling, self.delta))
        return self._cached[1]

    def before_compile(self) -> None:
        """Called by `efftune.train.compile.compile_blocks`: bring the cached correction up to date."""
        self._correction()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and (x.requires_grad or self.lora_B.requires_grad)):
            return super().forward(x)  # inference: nothing is saved anyway
        x = adapter_input(x, self.lora_A.dtype)
        p = self.dropout.p if self.training and isinstance(self.dropout, nn.Dropout) else 0.0
        seed = int(torch.randint(0, 2 ** 62, (1,)).item()) if p > 0 else 0
        A, B = self.lora_A, self.lora_B
        if torch.is_autocast_enabled(x.device.type):  # do what autocast would do to F.linear
            dtype = torch.get_autocast_dtype(x.device.type)
            x, A = x.to(dtype), A.to(dtype)
        return FrozenALora.apply(x, A, B, self.scaling, p, seed, self._correction())


def _adapter_factory(config: LoraFAConfig):
    def make(*args, **kwargs) -> LoraFAAdapter:
        return LoraFAAdapter(*args, correction=config.correction, delta=config.delta, **kwargs)
    return make


def add_lora_fa(model: nn.Module, config: LoraFAConfig | None = None, adapter: str = "default", *,
                tokenizer=None) -> list[str]:
    """Attach a LoRA-FA adapter (A frozen, B trains) to every module `config` targets.
    (`tokenizer`: unused, as every method's attach takes one.)"""
    config = config or LoraFAConfig()
    if config.use_dora:  # refused here, not in the config: lora_fa.use_dora is a key LoRA-FA inherits
        raise ConfigError("lora_fa.use_dora: DoRA with LoRA-FA is not supported (use --method dora or "
                          "--method lora-fa)")
    return add_lora(model, config, adapter, adapter_cls=_adapter_factory(config))


def load_lora_fa(model: nn.Module, directory, adapter: str = "default", config: LoraFAConfig | None = None,
                 allow_pickle: bool = False) -> LoraFAConfig:
    """Load a LoRA adapter directory (peft format) as LoRA-FA: its A frozen, its B trainable."""
    fa = config or LoraFAConfig()
    lora_cfg = load_adapter(model, directory, adapter, allow_pickle=allow_pickle, adapter_cls=_adapter_factory(fa))
    return LoraFAConfig(**{**lora_cfg.__dict__, "correction": fa.correction, "delta": fa.delta})


def save_lora_fa(model: nn.Module, directory: str | os.PathLike, config: LoraFAConfig,
                 metadata: dict | None = None) -> Path:
    """Write the adapter in peft's LoRA format (peft loads it as LoRA); the config's "efftune"
    entry records that it is LoRA-FA and its correction."""
    return save_adapter(model, directory, config,
                        metadata={"method": "lora-fa", "correction": config.correction, **(metadata or {})})


METHOD = Method("lora-fa", "lora_fa", attach=add_lora_fa, save=save_lora_fa, load=load_lora_fa)

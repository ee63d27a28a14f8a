"""A sparse mixture-of-experts FFN (Switch-style) that drops into any model, and dense-MLP upcycling.

Dropped tokens (over capacity in Switch mode, or chosen by no expert in expert choice) come out of
`SparseMoE` as zeros by default: in a transformer block `h + ffn(norm(h))` the residual outside
then carries them unchanged, as in Switch. Set `residual_dropped=True` only where nothing outside
adds the input back (the layer then returns a dropped token's input).
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .routing import Router, RouterConfig, Routing


class SwiGLU(nn.Module):
    """Llama-style expert: `down(silu(gate(x)) * up(x))`. x (..., hidden) -> (..., hidden)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoE(nn.Module):
    """`Router` + E experts; forward(x (..., hidden)) -> y (..., hidden), y = Σ_kept slots w · E_i(x).

    Experts come from `expert_factory()` (called E times), default `SwiGLU(hidden, intermediate)`.
    After each forward, `self.last_routing` holds the `Routing` (loads, dropped fraction, entropy)
    and `self.aux_loss` its load-balancing + z-loss: a training loop must add `aux_loss` of every
    SparseMoE to the task loss, or nothing keeps the experts balanced.
    """

    def __init__(self, hidden_size: int, config: RouterConfig, intermediate_size: int | None = None,
                 expert_factory: Callable[[], nn.Module] | None = None,
                 residual_dropped: bool = False) -> None:
        super().__init__()
        if expert_factory is None:
            if intermediate_size is None:
                raise ConfigError("SparseMoE needs intermediate_size or expert_factory")
            expert_factory = lambda: SwiGLU(hidden_size, intermediate_size)  # noqa: E731
        self.hidden_size = hidden_size
        self.router = Router(hidden_size, config)
        self.experts = nn.ModuleList(expert_factory() for _ in range(config.num_experts))
        self.residual_dropped = residual_dropped
        self.last_routing: Routing | None = None
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])                                     # (T, H)
        routing = self.router(flat)
        self.last_routing, self.aux_loss = routing, routing.aux_loss

        # Group the kept (token, slot) pairs by expert: one sort, then each expert runs once on
        # its contiguous block of token ids (gather with index_select, scatter-add back).
        num_slots = routing.expert_index.shape[1]
        kept = routing.kept.reshape(-1)
        token = torch.arange(flat.shape[0], device=x.device).repeat_interleave(num_slots)[kept]
        expert = routing.expert_index.reshape(-1)[kept]
        weight = routing.weight.reshape(-1)[kept]
        order = expert.argsort(stable=True)
        token, expert, weight = token[order], expert[order], weight[order]
        counts = torch.bincount(expert, minlength=len(self.experts)).tolist()

        out = torch.zeros_like(flat)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            idx = token[start:start + n]
            y = self.experts[e](flat.index_select(0, idx))
            out.index_add_(0, idx, y * weight[start:start + n, None].to(y.dtype))
            start += n
        if self.residual_dropped:
            dropped = ~routing.kept.any(-1)
            out = torch.where(dropped[:, None], flat, out)
        return out.reshape(shape)


def _hidden_size(mlp: nn.Module) -> int:
    size = getattr(mlp, "hidden_size", None)
    if isinstance(size, int):
        return size
    for module in mlp.modules():  # the first linear layer reads the hidden state
        if isinstance(module, nn.Linear):
            return module.in_features
    raise ConfigError(f"upcycle_mlp: cannot infer the hidden size of {type(mlp).__name__}; "
                      "it has no `hidden_size` and no nn.Linear")


def upcycle_mlp(mlp: nn.Module, num_experts: int, router_config: RouterConfig | None = None,
                residual_dropped: bool = False) -> SparseMoE:
    """Sparse upcycling: a SparseMoE whose experts are deep copies of the dense `mlp`.

    The router starts at zero, so probabilities start uniform; with renormalised top-k the
    output starts equal to the dense MLP's. (Switch scales by p = 1/E at first instead.)
    `router_config.num_experts` must equal `num_experts`; default: top-2, renormalised.
    """
    config = router_config or RouterConfig(num_experts=num_experts, top_k=min(2, num_experts))
    if config.num_experts != num_experts:
        raise ConfigError(f"router.num_experts ({config.num_experts}) differs from num_experts ({num_experts})")
    moe = SparseMoE(_hidden_size(mlp), config, expert_factory=lambda: copy.deepcopy(mlp),
                    residual_dropped=residual_dropped)
    ref = next((p for p in mlp.parameters() if p.is_floating_point()), None)  # not a quantised layer's codes
    if ref is not None:
        moe.router.to(device=ref.device, dtype=ref.dtype)
    nn.init.zeros_(moe.router.W_r.weight)
    return moe


def moe_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every routed layer: a module with a `Router` named `router` that records `last_routing`
    and `aux_loss` after each forward (SparseMoE, MixLoRA blocks, ...)."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(getattr(m, "router", None), Router) and hasattr(m, "last_routing")]


def _routings(model: nn.Module, real: torch.Tensor | None) -> list[tuple[nn.Module, Routing]]:
    """Each routed layer with its last routing, counted over the real tokens when `real` is given."""
    layers = [m for _, m in moe_layers(model) if m.last_routing is not None]
    if real is None:
        return [(m, m.last_routing) for m in layers]
    return [(m, m.last_routing.over(real.reshape(-1))) for m in layers]


def collect_aux_losses(model: nn.Module, real: torch.Tensor | None = None) -> tuple[torch.Tensor | None, dict[str, float]]:
    """After a forward pass: the sum of every routed layer's auxiliary loss (None without MoE layers),
    and the parts to log: load-balancing loss, z-loss, dropped-token fraction and router entropy
    (nats, mean over tokens), averaged over layers. `real` (B, L) bool, the batch's real tokens: the
    losses and statistics count those only (padding neither pulls the balance nor shows in the log);
    None: every token the layers saw."""
    routed = _routings(model, real)
    if not routed:
        return None, {}
    total = sum(m.aux_loss for m, _ in routed) if real is None else sum(r.aux_loss for _, r in routed)
    n = len(routed)
    stats = {"load_balancing_loss": sum(float(r.load_balancing_loss.detach()) for _, r in routed) / n,
             "z_loss": sum(float(r.z_loss.detach()) for _, r in routed) / n,
             "dropped_fraction": sum(float(r.dropped_fraction) for _, r in routed) / n,
             "router_entropy": sum(float(r.router_entropy) for _, r in routed) / n}
    return total, stats


def expert_loads(model: nn.Module, real: torch.Tensor | None = None) -> list[list[float]]:
    """Tokens each expert took in the last forward pass, one row per SparseMoE layer (model order);
    of the real tokens only when `real` (B, L) is given."""
    return [r.expert_load.float().tolist() for _, r in _routings(model, real)]

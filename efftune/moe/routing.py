"""Routers for sparse mixture-of-experts layers: token-choice top-k, Switch (k = 1 with capacity)
and expert choice (Zhou et al. 2022), all answering in one `Routing` shape.

A `Routing` gives every token `k` slots; slot j of token t sends the token to expert
`expert_index[t, j]` with weight `weight[t, j]` when `kept[t, j]`. Top-k and Switch use k = top_k
(Switch: 1); expert choice uses k = E, slot e meaning "expert e", so one layer code path serves all.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import non_negative_numbers, positive_ints, positive_numbers
from ..errors import ConfigError

MODES = ("top_k", "switch", "expert_choice")


@dataclass
class RouterConfig:
    """Router settings. `capacity_factor_*` scale Switch's expert capacity and expert choice's c."""
    num_experts: int
    mode: str = "top_k"
    top_k: int = 2
    renormalize: bool = True
    capacity_factor_train: float = 1.25
    capacity_factor_eval: float = 2.0
    aux_loss_coef: float = 1e-2
    z_loss_coef: float = 1e-3
    jitter: float = 0.0

    def __post_init__(self) -> None:
        positive_ints("router", self, "num_experts")
        if self.mode not in MODES:
            raise ConfigError(f"router.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        positive_ints("router", self, "top_k")
        if self.mode == "top_k" and self.top_k > self.num_experts:
            raise ConfigError(f"router.top_k ({self.top_k}) exceeds router.num_experts ({self.num_experts})")
        positive_numbers("router", self, "capacity_factor_train", "capacity_factor_eval")
        non_negative_numbers("router", self, "aux_loss_coef", "z_loss_coef")
        if not isinstance(self.jitter, (int, float)) or not 0 <= self.jitter < 1:
            raise ConfigError(f"router.jitter must be in [0, 1), got {self.jitter!r}")


@dataclass
class Routing:
    """One routing decision for `T` tokens, `E` experts and `k` slots per token.

    expert_index (T, k) long; weight (T, k) float, 0 where not kept; kept (T, k) bool;
    probs, logits (T, E) float32 (or float64); assigned (T, E) bool: the experts each token chose
    before capacity; losses and statistics are 0-d tensors except expert_load (E,): tokens each
    expert processes after capacity. The coefficients are the router's, for `over`.
    """
    expert_index: torch.Tensor
    weight: torch.Tensor
    kept: torch.Tensor
    probs: torch.Tensor
    logits: torch.Tensor
    assigned: torch.Tensor
    load_balancing_loss: torch.Tensor
    z_loss: torch.Tensor
    expert_load: torch.Tensor
    dropped_fraction: torch.Tensor
    router_entropy: torch.Tensor
    aux_loss_coef: float
    z_loss_coef: float

    @property
    def aux_loss(self) -> torch.Tensor:
        """What a training loop adds to its loss: load balancing + z-loss (coefficients applied)."""
        return self.load_balancing_loss + self.z_loss

    def over(self, real: torch.Tensor) -> "Routing":
        """The same decision with its losses and statistics counted over the tokens where `real`
        (T,) is true only: a padded batch's padding tokens are routed too (the layer sees them), but
        they must neither pull the balance loss nor show in the loads. Gradients flow as in the
        original (through probs and logits). The decision itself is unchanged: in Switch and expert
        choice mode padding still takes capacity (the layer would need the mask in its forward)."""
        if real.shape != self.probs.shape[:1]:
            raise ValueError(f"Routing.over: a mask of {tuple(real.shape)} for {self.probs.shape[0]} tokens")
        real = real.to(self.probs.device, torch.bool)
        return Routing(self.expert_index, self.weight, self.kept, self.probs, self.logits, self.assigned,
                       **_summary(self.probs, self.logits, self.assigned, self.expert_index, self.kept,
                                  self.aux_loss_coef, self.z_loss_coef, real),
                       aux_loss_coef=self.aux_loss_coef, z_loss_coef=self.z_loss_coef)


def _mean(x: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """Mean over dim 0 (tokens), of the real tokens only when `real` (T,) bool is given."""
    if real is None:
        return x.mean(0)
    w = real.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return (x * w).sum(0) / w.sum().clamp_min(1)


def load_balancing_loss(probs: torch.Tensor, assigned: torch.Tensor, coef: float,
                        real: torch.Tensor | None = None) -> torch.Tensor:
    """Switch's `α · E · Σ_i f_i · P_i`.

    probs (T, E): router probabilities; assigned (T, E) bool or 0/1: token t is routed to expert i
    (before capacity). f_i = share of all assignments going to i, P_i = mean probability of i.
    `real` (T,) bool: count these tokens only (padding left out); None: all.
    Gradient flows through P only (f comes from a discrete choice). Equals α when P is uniform.
    """
    num_experts = probs.shape[-1]
    assigned = assigned.to(probs.dtype)
    if real is not None:
        assigned = assigned * real.to(probs.dtype)[:, None]
    counts = assigned.sum(0)
    f = counts / counts.sum().clamp_min(1)
    return coef * num_experts * (f * _mean(probs, real)).sum()


def z_loss(logits: torch.Tensor, coef: float, real: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss `c_z · mean_t (logsumexp_j logits[t, j])²`; keeps logits small. logits (T, E);
    `real` (T,) bool: the mean over these tokens only."""
    return coef * _mean(torch.logsumexp(logits, dim=-1).square(), real)


def _summary(probs: torch.Tensor, logits: torch.Tensor, assigned: torch.Tensor, expert_index: torch.Tensor,
             kept: torch.Tensor, aux_loss_coef: float, z_loss_coef: float,
             real: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """A routing's losses and statistics, over the tokens where `real` is true (None: all)."""
    with torch.no_grad():
        num_experts = probs.shape[-1]
        slots = torch.ones(kept.shape, device=probs.device) if real is None else \
            real[:, None].expand(kept.shape).float()
        expert_load = torch.zeros(num_experts, device=probs.device).index_add_(
            0, expert_index[kept], slots[kept])
        dropped = _mean((~kept.any(-1)).float(), real)
        entropy = _mean(-(probs * probs.clamp_min(1e-30).log()).sum(-1), real)
    return dict(load_balancing_loss=load_balancing_loss(probs, assigned, aux_loss_coef, real),
                z_loss=z_loss(logits, z_loss_coef, real), expert_load=expert_load,
                dropped_fraction=dropped, router_entropy=entropy)


def capacity(num_tokens: int, num_experts: int, factor: float) -> int:
    """Tokens one expert may take: ceil(tokens / experts × factor), at most all tokens."""
    return min(num_tokens, math.ceil(num_tokens / num_experts * factor))


class Router(nn.Module):
    """`W_r` (hidden → experts, no bias) plus the routing rule of `config.mode`.

    forward(x (T, hidden)) -> Routing. Logits are computed in at least fp32 (input and weight cast)
    because bf16 softmax over many experts flips top-k choices and inflates the z-loss.
    Expert choice looks at the whole batch (each expert picks its best tokens), so it is not
    causal: use it for training or encoders, not token-by-token decoding.
    """

    def __init__(self, hidden_size: int, config: RouterConfig) -> None:
        super().__init__()
        self.config = config
        self.W_r = nn.Linear(hidden_size, config.num_experts, bias=False)

    def capacity_factor(self) -> float:
        return self.config.capacity_factor_train if self.training else self.config.capacity_factor_eval

    def forward(self, x: torch.Tensor) -> Routing:
        cfg = self.config
        dtype = torch.promote_types(x.dtype, torch.float32)
        x = x.to(dtype)
        if self.training and cfg.jitter > 0:
            # multiplicative noise explores other experts early in training (Switch), never at eval
            x = x * torch.empty_like(x).uniform_(1 - cfg.jitter, 1 + cfg.jitter)
        logits = F.linear(x, self.W_r.weight.to(dtype))
        probs = logits.softmax(-1)
        num_tokens, num_experts = probs.shape

        if cfg.mode == "expert_choice":
            c = capacity(num_tokens, num_experts, cfg.capacity_factor_train if self.training
                         else cfg.capacity_factor_eval)
            chosen = probs.t().topk(c, dim=-1).indices                      # (E, c) token ids
            kept = torch.zeros_like(probs, dtype=torch.bool)
            kept[chosen, torch.arange(num_experts, device=x.device)[:, None]] = True
            expert_index = torch.arange(num_experts, device=x.device).expand(num_tokens, -1)
            weight = probs * kept
            assigned = kept
        else:
            k = 1 if cfg.mode == "switch" else cfg.top_k
            top_p, expert_index = probs.topk(k, dim=-1)                       # (T, k)
            # Switch scales by the raw p: renormalising one probability would give 1 and cut the
            # router off from the task gradient
            if cfg.mode == "top_k" and cfg.renormalize:
                top_p = top_p / top_p.sum(-1, keepdim=True)
            assigned = F.one_hot(expert_index, num_experts).sum(1).bool()  # (T, E)
            if cfg.mode == "switch":
                # position of each token in its expert's queue, in token order; overflow is dropped
                one_hot = F.one_hot(expert_index[:, 0], num_experts)
                position = (one_hot.cumsum(0) * one_hot).sum(-1) - 1
                kept = (position < capacity(num_tokens, num_experts, self.capacity_factor()))[:, None]
            else:
                kept = torch.ones_like(expert_index, dtype=torch.bool)
            weight = top_p * kept

        return Routing(expert_index=expert_index, weight=weight, kept=kept, probs=probs, logits=logits,
                       assigned=assigned, aux_loss_coef=cfg.aux_loss_coef, z_loss_coef=cfg.z_loss_coef,
                       **_summary(probs, logits, assigned, expert_index, kept, cfg.aux_loss_coef,
                                  cfg.z_loss_coef, None))

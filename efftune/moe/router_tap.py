"""Router logits of transformers' MoE blocks, recorded for the load-balancing loss and for ESFT.

transformers computes its MoE load-balancing loss only inside `*ForCausalLM.forward` with
`output_router_logits=True`; efftune's loss runs the model body, so nothing would keep the experts
balanced. `RouterTap` wraps a block's router (`mlp.gate`) as `base_layer`, passes its output through
unchanged and keeps the last one. (transformers' own output capture hooks the router class, which
stays inside the tap, so `output_router_logits=True` still works.)
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import EfftuneError


class RouterTap(nn.Module):
    """A router wrapper recording `last_logits` (T, E) and, for routers returning
    (logits, scores, indices), `last_scores` / `last_indices` (T, k) of the last forward."""

    def __init__(self, base_layer: nn.Module, experts_path: str):
        super().__init__()
        self.base_layer = base_layer
        self.experts_path = experts_path  # the experts module this router feeds (ESFT keys by it)
        self.last_logits = self.last_scores = self.last_indices = None

    def forward(self, *args, **kwargs):
        out = self.base_layer(*args, **kwargs)
        if isinstance(out, tuple):
            self.last_logits, self.last_scores, self.last_indices = (tuple(out) + (None, None))[:3]
        else:  # a router that returns its logits only
            self.last_logits = out
        return out


def _router_of(block: nn.Module) -> tuple[str, nn.Module] | None:
    for name in ("gate", "router"):
        m = getattr(block, name, None)
        if isinstance(m, nn.Module):
            return name, m
    return None


def add_router_taps(model: nn.Module) -> list[str]:
    """Wrap the router beside every fused-experts module in a RouterTap (idempotent).
    Returns the router paths now tapped."""
    from ..attach import replace_module
    from .experts import GroupedExperts, experts_modules
    paths = [p for p, _ in experts_modules(model)]
    paths += [p for p, m in model.named_modules() if isinstance(m, GroupedExperts)]
    tapped = []
    for path in paths:
        parent_path = path.rpartition(".")[0]
        found = _router_of(model.get_submodule(parent_path) if parent_path else model)
        if found is None:
            raise EfftuneError(f"{path}: its block has no `gate` or `router` module to record logits from")
        name, router = found
        router_path = f"{parent_path}.{name}" if parent_path else name
        if not isinstance(router, RouterTap):
            replace_module(model, router_path, RouterTap(router, path))
        tapped.append(router_path)
    return tapped


def remove_router_taps(model: nn.Module) -> None:
    from ..attach import replace_module, wrappers
    for path, tap in list(wrappers(model, RouterTap)):
        replace_module(model, path, tap.base_layer)


def router_taps(model: nn.Module) -> list[RouterTap]:
    return [m for m in model.modules() if isinstance(m, RouterTap)]


def load_balancing_loss(logits: list[torch.Tensor], top_k: int,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' MoE balance loss `E · Σ_e f_e · P_e` with f (share of top-k picks) and P (mean
    router probability) pooled over all layers' tokens (not averaged per layer), padding excluded
    by `attention_mask` (B, L). logits: one (T, E) tensor per layer, T = B·L."""
    num_experts = logits[0].shape[-1]
    device = logits[0].device
    counts = torch.zeros(num_experts, dtype=torch.float32, device=device)
    prob_sum = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = torch.zeros((), dtype=torch.float32, device=device)
    mask = None if attention_mask is None else attention_mask.reshape(-1).to(device, torch.float32)
    for layer in logits:
        probs = layer.float().softmax(-1)
        picked = probs.topk(top_k, dim=-1).indices
        w = torch.ones(layer.shape[0], device=device) if mask is None else mask
        counts = counts.index_add(0, picked.reshape(-1), w.repeat_interleave(top_k))
        prob_sum = prob_sum + (probs * w[:, None]).sum(0)
        rows = rows + w.sum()
    return num_experts * ((counts / rows) * (prob_sum / rows)).sum()


def hf_router_aux_loss(model: nn.Module, attention_mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """The model's own load-balancing loss for the last forward, coefficient applied
    (`config.router_aux_loss_coef`, top-k `config.num_experts_per_tok`); None when no RouterTap
    recorded anything (call `add_router_taps` once before training)."""
    logits = [t.last_logits for t in router_taps(model) if t.last_logits is not None]
    if not logits:
        return None
    config = model.config
    coef = float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)
    return coef * load_balancing_loss(logits, int(config.num_experts_per_tok), attention_mask)


def hf_router_aux(model: nn.Module, real: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor | None, dict[str, float], list[list[float]]]:
    """For the training loop, after a forward: (the model's own load-balancing loss or None, the
    stats to log, tokens per expert per tapped layer) — the same shape of answer as efftune's
    routed layers give (`efftune.moe.layer.collect_aux_losses`, `expert_loads`). `real` (B, L) bool,
    the batch's real tokens: the loss, the router entropy and the loads count those only (padding
    is routed too, but must not pull the balance); None: every token."""
    aux = hf_router_aux_loss(model, real)
    if aux is None:
        return None, {}, []
    top_k = int(model.config.num_experts_per_tok)
    loads, entropy = [], []
    with torch.no_grad():
        for tap in router_taps(model):
            if tap.last_logits is None:
                continue
            probs = tap.last_logits.float().softmax(-1)
            w = torch.ones(probs.shape[0], device=probs.device) if real is None else \
                real.reshape(-1).to(probs.device, torch.float32)
            picked = probs.topk(top_k, dim=-1).indices.reshape(-1)
            loads.append(torch.bincount(picked, weights=w.repeat_interleave(top_k),
                                        minlength=probs.shape[-1]).tolist())
            token_entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
            entropy.append(float((token_entropy * w).sum() / w.sum().clamp_min(1)))
    stats = {"load_balancing_loss": float(aux.detach()), "router_entropy": sum(entropy) / max(len(entropy), 1)}
    return aux, stats, loads

"""Adapter merging: combine several LoRA adapters into one, or fold adapters into the base model.

Pure functions on full updates ΔW (out, in) — task arithmetic (`linear_merge`), TIES
(`ties_merge`), DARE (`dare`, `dare_merge`) — and `low_rank`, which factors a merged ΔW back into
LoRA's (A, B). `merge_adapters` runs them over every LoRA layer of a model and attaches the result
as a new adapter; `export_merged` writes a plain transformers model with the active adapters
folded into its weights.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..errors import EfftuneError
from ..methods.lora.config import LoraConfig
from ..methods.lora.layer import LoraAdapter, LoraEmbedding, adapter_names, lora_layers
from ..methods.lora.model import check_ranks, set_active_adapters, set_trainable_adapters

# ---- checks shared by the pure functions and the model-level API -------------------------------

def _check_fraction(name: str, value: float, allow_one: bool = True) -> None:
    ok = isinstance(value, numbers.Real) and (0.0 < value <= 1.0 if allow_one else 0.0 < value < 1.0)
    if not ok:
        raise EfftuneError(f"merge: {name} must be in (0, {'1]' if allow_one else '1)'}, got {value!r}")


def _check_weights(n: int, weights: Sequence[float]) -> None:
    if len(weights) != n:
        raise EfftuneError(f"merge: {n} adapters but {len(weights)} weights; give one weight per adapter")
    for i, w in enumerate(weights):
        if not math.isfinite(w):
            raise EfftuneError(f"merge: weight {i} is {w!r}; weights must be finite numbers")


def _check_deltas(deltas: Sequence[Tensor], weights: Sequence[float]) -> None:
    if not deltas:
        raise EfftuneError("merge: no adapter updates to merge")
    _check_weights(len(deltas), weights)
    for i, d in enumerate(deltas):
        if d.shape != deltas[0].shape:
            raise EfftuneError(f"merge: update {i} has shape {tuple(d.shape)}, update 0 {tuple(deltas[0].shape)}")


# ---- pure tensor functions -----------------------------------------------------------------------

def linear_merge(deltas: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Task arithmetic: `Σ_i λ_i ΔW_i`. `deltas`: n tensors of one shape (out, in); `weights`: n
    floats λ_i. Returns a new (out, in) tensor."""
    _check_deltas(deltas, weights)
    out = deltas[0] * weights[0]
    for d, w in zip(deltas[1:], weights[1:]):
        out.add_(d, alpha=w)  # `out` is fresh, so in-place saves a full-size temporary per adapter
    return out


def trim(delta: Tensor, density: float) -> Tensor:
    """Keep the `density` fraction of entries of largest magnitude (k = round(density · numel),
    at least 1), zero the rest. Same shape as `delta`."""
    _check_fraction("density", density)
    k = max(1, round(density * delta.numel()))
    if k >= delta.numel():
        return delta.clone()
    keep = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
    keep[delta.abs().flatten().topk(k).indices] = True
    return delta * keep.view_as(delta)


def ties_merge(deltas: Sequence[Tensor], weights: Sequence[float], density: float) -> Tensor:
    """TIES (Yadav et al. 2023). `deltas`: n tensors (out, in); `weights`: n floats; returns (out, in).

    1. trim each ΔW_i to its top-`density` entries by magnitude, then scale it by λ_i;
    2. elect each entry's sign as the sign of the sum of the trimmed, weighted values;
    3. disjoint mean: per entry, average only the values whose sign equals the elected one
       (an entry where none agree, or whose sum is exactly 0, is 0).
    """
    _check_deltas(deltas, weights)
    _check_fraction("density", density)
    trimmed = [trim(d, density) * w for d, w in zip(deltas, weights)]
    elected = linear_merge(trimmed, [1.0] * len(trimmed)).sign()
    total, count = torch.zeros_like(trimmed[0]), torch.zeros_like(trimmed[0])
    for t in trimmed:
        agree = (t.sign() == elected) & (t != 0)  # zeros were trimmed away: they cast no vote
        total += t * agree
        count += agree
    return total / count.clamp(min=1)


def dare(delta: Tensor, drop: float, generator: torch.Generator) -> Tensor:
    """DARE (Yu et al. 2023): zero each entry with probability `drop` and scale the survivors by
    1/(1-drop), so the expected value is `delta`. Any shape; `generator` must live on `delta`'s
    device and alone decides which entries drop."""
    _check_fraction("drop", drop, allow_one=False)  # drop=1 would divide by zero
    keep = torch.rand(delta.shape, generator=generator, device=delta.device) >= drop
    return torch.where(keep, delta / (1.0 - drop), torch.zeros((), dtype=delta.dtype, device=delta.device))


_COMBINE: dict[str, Callable[[Sequence[Tensor], Sequence[float], float], Tensor]] = {
    "linear": lambda deltas, weights, density: linear_merge(deltas, weights),
    "ties": ties_merge,
}


def dare_merge(deltas: Sequence[Tensor], weights: Sequence[float], drop: float, seed: int | torch.Generator,
               combine: str = "linear", density: float = 0.5) -> Tensor:
    """DARE each ΔW_i (n tensors (out, in)), then combine them with `linear_merge` or `ties_merge`
    (`combine="ties"`, which uses `density`). `seed`: an int, or a generator to draw from (so a
    caller merging many layers gets different masks per layer from one seed). Returns (out, in)."""
    _check_deltas(deltas, weights)
    if combine not in _COMBINE:
        raise EfftuneError(f"merge: combine must be one of {sorted(_COMBINE)}, got {combine!r}")
    generator = seed if isinstance(seed, torch.Generator) else \
        torch.Generator(device=deltas[0].device).manual_seed(seed)
    return _COMBINE[combine]([dare(d, drop, generator) for d in deltas], weights, density)


def low_rank(delta: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Best rank-`r` approximation of `delta` (out, in) as LoRA factors `(A (r, in), B (out, r))`
    with `B @ A` the truncated SVD (Eckart–Young). The singular values are split as sqrt into both
    factors so neither dwarfs the other. If r > min(out, in), the extra rows/columns are zero."""
    if not isinstance(r, int) or r < 1:
        raise EfftuneError(f"merge: rank r must be a positive integer, got {r!r}")
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(r, S.numel())
    root = S[:k].sqrt()
    return _pad(root[:, None] * Vh[:k], U[:, :k] * root, r)


def _pad(A: Tensor, B: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Zero-pad factors (k, in), (out, k) to rank r ≥ k: the product is unchanged."""
    k = A.shape[0]
    if k == r:
        return A, B
    return (torch.cat([A, A.new_zeros(r - k, A.shape[1])]), torch.cat([B, B.new_zeros(B.shape[0], r - k)], dim=1))


# ---- model level -----------------------------------------------------------------------------

# Each method maps (updates, weights, density, drop, generator) to the merged update.
METHODS: dict[str, Callable[..., Tensor]] = {
    "linear": lambda ds, ws, density, drop, gen: linear_merge(ds, ws),
    "ties": lambda ds, ws, density, drop, gen: ties_merge(ds, ws, density),
    "dare_linear": lambda ds, ws, density, drop, gen: dare_merge(ds, ws, drop, gen, "linear"),
    "dare_ties": lambda ds, ws, density, drop, gen: dare_merge(ds, ws, drop, gen, "ties", density),
}


def _concat(present: list[tuple[LoraAdapter, float]], r: int) -> tuple[Tensor, Tensor]:
    """Exact factors of Σ λ_i s_i B_i A_i: stack the A_i, and the scaled B_i beside each other."""
    dtype = torch.promote_types(present[0][0].lora_A.dtype, torch.float32)
    A = torch.cat([a.lora_A.to(dtype) for a, _ in present])
    B = torch.cat([a.lora_B.to(dtype) * (a.scaling * w) for a, w in present], dim=1)
    return _pad(A, B, r)


@torch.no_grad()
def merge_adapters(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], method: str = "linear",
                   new_adapter: str = "merged", r: int | None = None, density: float = 0.5, drop: float = 0.5,
                   seed: int = 0) -> LoraConfig:
    """Combine the named LoRA adapters of `model` into a new adapter `new_adapter`.

    Per LoRA layer: each adapter's ΔW = s·B@A (an adapter absent from the layer is ΔW = 0, which
    every method here treats as leaving it out), combined by `method` ("linear", "ties",
    "dare_linear", "dare_ties"), then factored by `low_rank` to rank `r` (default: the largest
    rank among the inputs on that layer). "linear" with r ≥ the sum of the input ranks is exact:
    the scaled factors are concatenated (zero-padded to r) instead of going through an SVD.
    The new adapter has scaling 1 (alpha = r), becomes the only active adapter and, as with
    `add_lora`, the only trainable one; the inputs stay attached. Returns a LoraConfig
    (r, alpha = r) to pass to `save_adapter` for it.
    """
    adapters = [adapters] if isinstance(adapters, str) else list(adapters)
    try:
        weights = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise EfftuneError(f"merge: weights must be numbers, got {weights!r}") from None
    known = adapter_names(model)
    if not adapters:
        raise EfftuneError("merge: name at least one adapter to merge")
    for name in adapters:
        if name not in known:
            raise EfftuneError(f"merge: no adapter named {name!r} (have: {', '.join(known) or 'none'})")
    if len(set(adapters)) != len(adapters):
        raise EfftuneError(f"merge: adapter names repeat in {adapters}")
    _check_weights(len(adapters), weights)
    if method not in METHODS:
        raise EfftuneError(f"merge: method must be one of {', '.join(METHODS)}, got {method!r}")
    if new_adapter in known:
        raise EfftuneError(f"merge: adapter {new_adapter!r} already exists; choose another new_adapter name")
    if r is not None and (not isinstance(r, int) or r < 1):
        raise EfftuneError(f"merge: r must be a positive integer, got {r!r}")
    if r is not None:  # a rank above a module's smaller side is zero padding
        check_ranks(model, [p for p, layer in lora_layers(model) if set(adapters) & set(layer.adapters)], r, {})
    _check_fraction("density", density)
    _check_fraction("drop", drop, allow_one=False)

    generators: dict[torch.device, torch.Generator] = {}  # one stream per device, seeded once
    plan = []  # compute every layer's factors before attaching any, so a failure changes nothing
    for path, layer in lora_layers(model):
        if layer.merged:
            raise EfftuneError(f"merge: {path} has merged adapters; call unmerge_lora first")
        present = [(layer.adapters[n], w) for n, w in zip(adapters, weights) if n in layer.adapters]
        if not present:
            continue
        if any(a.scales_output for a, _ in present):
            raise EfftuneError(f"merge: {path} holds a DoRA adapter; combining DoRA adapters is not supported "
                               "(their magnitude vectors have no counterpart in a merged B·A)")
        rank = r or max(a.r for a, _ in present)
        if method == "linear" and rank >= sum(a.r for a, _ in present):
            plan.append((path, layer, rank, *_concat(present, rank)))
            continue
        deltas = [a.delta_weight() for a, _ in present]
        device = deltas[0].device
        if device not in generators:
            generators[device] = torch.Generator(device=device).manual_seed(seed)
        merged = METHODS[method](deltas, [w for _, w in present], density, drop, generators[device])
        plan.append((path, layer, rank, *low_rank(merged, rank)))

    for _, layer, rank, A, B in plan:
        new = layer.add_adapter(new_adapter, rank, scaling=1.0)
        new.lora_A.copy_(A)
        new.lora_B.copy_(B)
    set_active_adapters(model, new_adapter)
    set_trainable_adapters(model, new_adapter)
    top = max(rank for _, _, rank, _, _ in plan)
    linear = sorted({p.rsplit(".", 1)[-1] for p, l, *_ in plan if not isinstance(l, LoraEmbedding)})
    return LoraConfig(r=top, alpha=float(top), target_modules=linear,
                      embeddings=[p for p, l, *_ in plan if isinstance(l, LoraEmbedding)])


def merge_notes(model: nn.Module, adapters: Sequence[str], labels: Sequence[str] | None = None,
                method: str = "linear", r: int | None = None) -> list[str]:
    """One line each on what `merge_adapters` will do that the user may not expect: modules some
    adapters lack, ranks that differ, and a linear merge made approximate by a rank below the sum
    of the input ranks (nothing for one adapter). `labels` name the adapters in the lines (e.g.
    their directories; default: the adapter names)."""
    labels = list(labels or adapters)
    covers = {n: {} for n in adapters}  # adapter -> {module path: rank}
    for path, layer in lora_layers(model):
        for n in adapters:
            if n in layer.adapters:
                covers[n][path] = layer.adapters[n].r
    every = set().union(*(set(c) for c in covers.values()))
    notes = []
    lacking = [(label, every - set(covers[n])) for n, label in zip(adapters, labels) if every - set(covers[n])]
    if lacking:
        parts = "; ".join(f"{label} lacks {len(missing)} of {len(every)} (e.g. {sorted(missing)[0]})"
                          for label, missing in lacking)
        notes.append(f"merge: the adapters adapt different modules ({parts}); where one lacks a module its "
                     "update there counts as zero")
    ranks = sorted({rank for c in covers.values() for rank in c.values()})
    if len(ranks) > 1:
        notes.append(f"merge: input ranks differ ({', '.join(map(str, ranks))}); the merged adapter has rank {r}"
                     if r else f"merge: input ranks differ ({', '.join(map(str, ranks))}); the merged adapter has, "
                     "per module, the largest input rank there (--rank sets one for all)")
    if method == "linear":
        short = [p for p in every if (r or max(c[p] for c in covers.values() if p in c))
                 < sum(c[p] for c in covers.values() if p in c)]
        if short:
            need = max(sum(c[p] for c in covers.values() if p in c) for p in every)
            notes.append(f"merge: {f'rank {r}' if r else 'that rank'} is below the sum of the input ranks on "
                         f"{len(short)} module(s), so there the merge is the best low-rank approximation (SVD) of "
                         f"the weighted sum; --rank {need} keeps it exact")
    return notes

"""LoRA (Hu et al. 2021): `h = W0 x + s · B (A x)` with `W0` frozen, `s = alpha / r`.

`LoraLayer` wraps one base module (nn.Linear, transformers' Conv1D, nn.Embedding) and holds any
number of named adapters. The model-level functions below attach, switch, merge and remove them;
the model stays the user's transformers model throughout.
"""
from __future__ import annotations

import itertools
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, EfftuneError
from .attach import _conv1d_class, find_targets, freeze_base, hooked, master_dtype, replace_module, wrappers
from .lora_ops import fused_lora_linears
from .swiglu_lora import unwrap_swiglu_mlps, wrap_swiglu_mlps

INITS = ("kaiming", "gaussian")


@dataclass
class LoraConfig:
    """LoRA hyperparameters. `target_modules`: "all-linear", a list of module-name suffixes, or
    a regex (full match on the module path). `init`: A Kaiming-uniform ("kaiming", as nn.Linear)
    or Gaussian with std 1/r ("gaussian"); B starts at zero either way."""
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    use_rslora: bool = False
    init: str = "kaiming"
    embeddings: str | list[str] = field(default_factory=list)  # nn.Embedding modules to adapt too
    SECTION: ClassVar[str] = "lora"  # the run config's section, named in errors (a subclass has its own)

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"{self.SECTION}.r must be a positive integer, got {self.r!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"{self.SECTION}.alpha must be a positive finite number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{self.SECTION}.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise ConfigError(f"{self.SECTION}.init must be one of {INITS}, got {self.init!r}")
        for key in ("target_modules", "embeddings"):  # a string is a regex: refuse one that cannot match
            pattern = getattr(self, key)
            if isinstance(pattern, str) and pattern != "all-linear":
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ConfigError(f"{self.SECTION}.{key}: {pattern!r} is not a valid regex ({exc})") from None

    def scaling(self, r: int | None = None, alpha: float | None = None) -> float:
        r, alpha = r or self.r, self.alpha if alpha is None else alpha
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """`s · B @ A`, shape (out, in), computed in fp32 at least: the one merge formula."""
    dtype = torch.promote_types(lora_A.dtype, torch.float32)
    return (lora_B.to(dtype) @ lora_A.to(dtype)) * scaling


def adapter_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` as the adapter factors (of `dtype`) take it: cast, unless autocast casts for the matmul."""
    if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        return x.to(dtype)
    return x


class LoraAdapter(nn.Module):
    """One adapter's factors: `lora_A` (r, in), `lora_B` (out, r) — peft's shapes and names."""

    def __init__(self, in_features: int, out_features: int, r: int, scaling: float,
                 dropout: float = 0.0, init: str = "kaiming", *, device=None, dtype=None):
        super().__init__()
        self.r, self.scaling = r, scaling
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.linear(self.dropout(adapter_input(x, self.lora_A.dtype)), self.lora_A)
        # scale the rank-r intermediate, not the (tokens × out) result: r/out of the work
        return F.linear(z * self.scaling, self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        return delta_weight(self.lora_A, self.lora_B, self.scaling)


# Sibling projections that read the same input in transformers' decoder blocks.
SHARED_INPUT_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class FusedLinears:
    """LoRA linears computed by one `lora_linears` op (see `lora_ops`): a group of siblings that
    read one input (attention's q/k/v, the MLP's gate/up), or a single layer.

    The first member called computes every member's output — frozen GEMM and LoRA update in one
    pass, the A factors stacked into one GEMM — and keeps the others' outputs until they are called
    with that same tensor. It applies while every member runs the same single plain LoRA adapter
    (no dropout, nothing merged, no mixed batch) on a plain frozen nn.Linear without hooks, in one
    compute dtype (autocast's, or everything in x's); otherwise each layer computes its own output
    as usual. A plain object, not a module: it holds no parameters and never appears in a state dict."""

    def __init__(self, layers: Sequence["LoraLayer"]):
        self.layers = list(layers)
        self.source: torch.Tensor | None = None  # the input the kept outputs belong to
        self.kept: list[torch.Tensor | None] = [None] * len(self.layers)

    def _adapter(self) -> str | None:
        """The one adapter every member runs, when the op applies; else None."""
        names = {tuple(n for n in layer.active if n not in layer.merged) for layer in self.layers}
        if len(names) != 1 or len(name := next(iter(names))) != 1:
            return None
        for layer in self.layers:
            adapter, base = layer.adapters[name[0]], layer.base_layer
            if type(adapter) is not LoraAdapter or not isinstance(adapter.dropout, nn.Identity) \
                    or layer.batch_adapters is not None or type(base) is not nn.Linear or hooked(base) \
                    or base.weight.requires_grad \
                    or (base.bias is not None and base.bias.requires_grad):
                return None
        return name[0]

    def _compute_dtype(self, x: torch.Tensor, adapters: Sequence[LoraAdapter]) -> torch.dtype | None:
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        tensors = [layer.base_layer.weight for layer in self.layers] + [a.lora_A for a in adapters]
        return x.dtype if all(t.dtype == x.dtype for t in tensors) else None

    def plan(self, x: torch.Tensor) -> tuple[str, list[LoraAdapter], torch.dtype] | None:
        """(the adapter's name, each member's adapter, the compute dtype) when the op applies to
        input x; else None."""
        name = self._adapter()
        if name is None:
            return None
        adapters = [layer.adapters[name] for layer in self.layers]
        dtype = self._compute_dtype(x, adapters)
        return None if dtype is None else (name, adapters, dtype)

    def operands(self, adapters: Sequence[LoraAdapter], dtype: torch.dtype) -> tuple[list, list, torch.Tensor, list]:
        """(frozen weights, biases, the stacked scaled A factors, the B factors), cast to `dtype`."""
        bases = [layer.base_layer for layer in self.layers]
        return ([b.weight.to(dtype) for b in bases], [None if b.bias is None else b.bias.to(dtype) for b in bases],
                torch.cat([adapter.lora_A * adapter.scaling for adapter in adapters]).to(dtype),
                [adapter.lora_B.to(dtype) for adapter in adapters])

    def output(self, slot: int, x: torch.Tensor) -> torch.Tensor | None:
        """Member `slot`'s output for input x; None when the op does not apply."""
        if self.source is x and self.kept[slot] is not None:
            y, self.kept[slot] = self.kept[slot], None
            if all(k is None for k in self.kept):
                self.source = None  # nothing outlives the last member's call
            return y
        plan = self.plan(x)
        if plan is None:
            return None
        _, adapters, dtype = plan
        ys = fused_lora_linears(x.to(dtype), *self.operands(adapters, dtype))
        y, ys[slot] = ys[slot], None
        if len(ys) > 1:
            self.source, self.kept = x, ys
        return y


def link_fused_linears(model: nn.Module) -> int:
    """Give every LoRA-wrapped nn.Linear its `FusedLinears` group: the siblings of
    SHARED_INPUT_SIBLINGS together, any other layer alone. Returns how many groups."""
    groups: list[list[LoraLinear]] = []
    grouped: set[int] = set()
    for parent in model.modules():
        for names in SHARED_INPUT_SIBLINGS:
            members = [getattr(parent, n, None) for n in names]
            members = [m for m in members if isinstance(m, LoraLinear)]
            if len(members) >= 2 and len({m.in_features for m in members}) == 1:
                groups.append(members)
                grouped.update(id(m) for m in members)
    groups += [[m] for _, m in lora_layers(model) if isinstance(m, LoraLinear) and id(m) not in grouped]
    for members in groups:
        group = FusedLinears(members)
        for slot, layer in enumerate(members):
            layer.fused, layer.fused_slot = group, slot
    return len(groups)


class LoraLayer(nn.Module):
    """A base module plus named LoRA adapters; `active` ones add their update in `forward`.

    During a mixed-adapter batch (`mixed_adapter_batch`), `batch_adapters` names the adapter of
    each example (or None for the base model), `batch_rows` holds each adapter's row indices on
    this layer's device, and each adapter runs only on its own rows.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        self.batch_adapters: Sequence[str | None] | None = None
        self.batch_rows: dict[str, torch.Tensor] | None = None
        self.fused: FusedLinears | None = None  # set by link_fused_linears
        self.fused_slot = 0

    # -- what differs between base module kinds ------------------------------------------
    @property
    def in_features(self) -> int:
        raise NotImplementedError

    @property
    def out_features(self) -> int:
        raise NotImplementedError

    def lora_delta(self, adapter: LoraAdapter, x: torch.Tensor) -> torch.Tensor:
        return adapter(x)

    def to_weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        """(out, in) update -> the layout of `base_layer.weight`."""
        return delta

    # -- adapters ------------------------------------------------------------------------------
    def add_adapter(self, name: str, r: int, scaling: float, dropout: float = 0.0,
                    init: str = "kaiming", adapter_cls: type[LoraAdapter] | None = None) -> LoraAdapter:
        """Add adapter `name`; `adapter_cls` (default LoraAdapter) lets a variant such as LoRA-FA
        bring its own forward."""
        if name in self.adapters:
            raise EfftuneError(f"adapter {name!r} already exists")
        weight = self.base_layer.weight
        dtype = master_dtype(weight.dtype)
        cls = adapter_cls or LoraAdapter
        self.adapters[name] = cls(self.in_features, self.out_features, r, scaling, dropout, init,
                                  device=weight.device, dtype=dtype)
        self.active.append(name)
        return self.adapters[name]

    def delete_adapter(self, name: str) -> None:
        if name in self.merged:
            raise EfftuneError(f"adapter {name!r} is merged; unmerge before deleting it")
        del self.adapters[name]
        if name in self.active:
            self.active.remove(name)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.fused is not None and not args and not kwargs:
            y = self.fused.output(self.fused_slot, x)
            if y is not None:
                return y
        y = self.base_layer(x, *args, **kwargs)
        if self.batch_adapters is not None:
            return self._mixed_forward(x, y)
        for name in self.active:
            if name not in self.merged:
                y = y + self.lora_delta(self.adapters[name], x).to(y.dtype)
        return y

    def _mixed_forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.merged:
            raise EfftuneError("a mixed-adapter batch needs unmerged adapters; call unmerge_lora first")
        # Compiled (torch.compile of the block), this reads only tensors and the adapters' names: which
        # row goes where is data, so a new layout of rows is no new graph. The check is eager-only.
        if not torch.compiler.is_compiling() and len(self.batch_adapters) != x.shape[0]:
            raise EfftuneError(f"mixed-adapter batch names {len(self.batch_adapters)} adapters for "
                               f"{x.shape[0]} examples")
        for name, adapter in self.adapters.items():
            rows = self.batch_rows.get(name)
            if rows is not None:
                delta = self.lora_delta(adapter, x.index_select(0, rows))
                y = y.index_add(0, rows, delta.to(y.dtype))
        return y

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every active, unmerged adapter into the base weight."""
        for name in self.active:
            if name not in self.merged:
                w = self.base_layer.weight
                w.add_(self.to_weight_layout(self.adapters[name].delta_weight()).to(w.dtype))
                self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract merged adapters again (exact up to rounding in the weight's dtype)."""
        while self.merged:
            name = self.merged.pop()
            w = self.base_layer.weight
            w.sub_(self.to_weight_layout(self.adapters[name].delta_weight()).to(w.dtype))


class LoraLinear(LoraLayer):
    """LoRA on nn.Linear, or on transformers' Conv1D (GPT-2), whose weight is stored (in, out)."""

    @property
    def fan_in_fan_out(self) -> bool:
        return isinstance(self.base_layer, _conv1d_class())

    @property
    def in_features(self) -> int:
        w = self.base_layer.weight
        return w.shape[0] if self.fan_in_fan_out else w.shape[1]

    @property
    def out_features(self) -> int:
        w = self.base_layer.weight
        return w.shape[1] if self.fan_in_fan_out else w.shape[0]

    def to_weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.T if self.fan_in_fan_out else delta


class LoraEmbedding(LoraLayer):
    """LoRA on nn.Embedding: `A` (r, vocab) is looked up by token id, then `B` (dim, r)."""

    @property
    def in_features(self) -> int:
        return self.base_layer.num_embeddings

    @property
    def out_features(self) -> int:
        return self.base_layer.embedding_dim

    def lora_delta(self, adapter: LoraAdapter, ids: torch.Tensor) -> torch.Tensor:
        return F.linear(F.embedding(ids, adapter.lora_A.T), adapter.lora_B) * adapter.scaling

    def to_weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.T

    def add_adapter(self, name, r, scaling, dropout=0.0, init="kaiming", adapter_cls=None) -> LoraAdapter:
        # Zero A and random B, so the adapter starts at the base model yet the lookup of A
        # gets a gradient from the first step. (Embeddings always get plain LoRA adapters.)
        adapter = super().add_adapter(name, r, scaling, 0.0, init)
        with torch.no_grad():
            adapter.lora_B.normal_()
            adapter.lora_A.zero_()
        return adapter


# ---- model-level API ---------------------------------------------------------------------------

def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """Every LoRA-wrapped module with its path (the path of the module it wraps)."""
    return wrappers(model, LoraLayer)


def adapter_names(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for _, layer in lora_layers(model):
        names.update(dict.fromkeys(layer.adapters))
    return list(names)


def add_lora(model: nn.Module, config: LoraConfig | None = None, adapter: str = "default",
             rank_of: dict[str, int] | None = None, alpha_of: dict[str, float] | None = None,
             adapter_cls: type[LoraAdapter] | None = None) -> list[str]:
    """Attach a LoRA adapter named `adapter` to every module `config` targets.

    Everything else is frozen (earlier adapters too: `set_trainable_adapters` trains several);
    the new adapter trains and becomes active beside any adapters already active. `rank_of` / `alpha_of` override r / alpha per module path (as
    peft's rank_pattern does); `adapter_cls` picks a LoRA variant's adapter class (LoRA-FA).
    Returns the adapted module paths.
    """
    config = config or LoraConfig()
    if adapter in adapter_names(model):
        raise EfftuneError(f"adapter {adapter!r} already exists; delete it or choose another name")
    if not config.target_modules and not config.embeddings:
        raise ConfigError("lora.target_modules is empty: name the modules to adapt")
    names = find_targets(model, config.target_modules) if config.target_modules else []
    if config.embeddings:
        names += find_targets(model, config.embeddings, accept=lambda m: isinstance(m, nn.Embedding))
    check_ranks(model, names, config.r, rank_of or {})
    freeze_base(model)  # only once nothing can fail: a refused attach leaves the model as it was
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, LoraLayer):
            wrapper = LoraEmbedding(module) if isinstance(module, nn.Embedding) else LoraLinear(module)
            replace_module(model, name, wrapper)
            module = wrapper
        r = (rank_of or {}).get(name, config.r)
        scaling = config.scaling(r, (alpha_of or {}).get(name))
        module.add_adapter(adapter, r, scaling, config.dropout, config.init, adapter_cls).requires_grad_(True)
    link_fused_linears(model)
    wrap_swiglu_mlps(model)
    return names


def matrix_sides(module: nn.Module) -> tuple[int, int]:
    """(in, out) of the matrix an adapter on `module` updates."""
    base = getattr(module, "base_layer", module)
    if isinstance(base, nn.Embedding):
        return base.num_embeddings, base.embedding_dim
    w = base.weight
    return (w.shape[0], w.shape[1]) if isinstance(base, _conv1d_class()) else (w.shape[1], w.shape[0])


def check_ranks(model: nn.Module, names: list[str], r: int, rank_of: dict[str, int]) -> None:
    """Refuse a configured rank above a target's smaller side: B @ A cannot exceed that rank, so
    the extra rows only add parameters (r = 1000 on a 576-wide model trains more than the model).
    Ranks given per module (`rank_of`: a loaded adapter's own tensors) are taken as they are."""
    sides = {name: matrix_sides(model.get_submodule(name)) for name in names if name not in rank_of}
    if sides and r > (limit := min(min(s) for s in sides.values())):
        name, (n_in, n_out) = next((n, s) for n, s in sides.items() if min(s) == limit)
        raise ConfigError(f"LoRA rank r={r} is larger than {name}'s smaller side ({n_in} in, {n_out} out): "
                          f"it adds parameters but no expressiveness; use r <= {limit} (--rank, lora.r)")


def set_active_adapters(model: nn.Module, names: str | Sequence[str] | None) -> None:
    """Which adapters run: a name, several (their updates add up), or None for the base model."""
    names = [names] if isinstance(names, str) else list(names or [])
    known = adapter_names(model)
    for n in names:
        if n not in known:
            raise EfftuneError(f"no adapter named {n!r} (have: {', '.join(known) or 'none'})")
    for _, layer in lora_layers(model):
        if layer.merged:
            raise EfftuneError("unmerge adapters before switching which are active")
        layer.active = [n for n in names if n in layer.adapters]


def set_trainable_adapters(model: nn.Module, names: str | Sequence[str]) -> None:
    names = [names] if isinstance(names, str) else list(names)
    for _, layer in lora_layers(model):
        for n, adapter in layer.adapters.items():
            adapter.requires_grad_(n in names)


def delete_adapter(model: nn.Module, name: str) -> None:
    if name not in adapter_names(model):
        raise EfftuneError(f"no adapter named {name!r}")
    for _, layer in lora_layers(model):
        if name in layer.adapters:
            layer.delete_adapter(name)


def merge_lora(model: nn.Module) -> None:
    """Fold the active adapters into the base weights (forward then skips them)."""
    for _, layer in lora_layers(model):
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.unmerge()


def unload_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Put the base modules back, merging the active adapters first unless `merge=False`."""
    for name, layer in list(lora_layers(model)):
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        replace_module(model, name, layer.base_layer)
    unwrap_swiglu_mlps(model)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    return unload_lora(model, merge=True)


@contextmanager
def mixed_adapter_batch(model: nn.Module, per_example: Sequence[str | None]):
    """Within the block, example i of each batch goes through adapter `per_example[i]` alone
    (None: the base model). Gradients flow to each adapter from its own examples."""
    known = set(adapter_names(model))
    unknown = sorted({n for n in per_example if n is not None} - known)
    if unknown:
        raise EfftuneError(f"mixed-adapter batch names unknown adapters: {', '.join(unknown)}")
    layers = [layer for _, layer in lora_layers(model)]
    # each adapter's row indices, copied to each layers' device once for the whole batch (not once a layer)
    where = {name: [i for i, n in enumerate(per_example) if n == name]
             for name in dict.fromkeys(n for n in per_example if n is not None)}
    rows_on: dict[torch.device, dict[str, torch.Tensor]] = {}
    for layer in layers:
        # its adapters' device (its base may hold no `weight`: FP8 while training, efftune.train.fp8)
        device = next(itertools.chain(layer.parameters(), layer.buffers())).device
        if device not in rows_on:
            rows_on[device] = {name: torch.tensor(rows, device=device) for name, rows in where.items()}
        layer.batch_adapters, layer.batch_rows = list(per_example), rows_on[device]
    try:
        yield model
    finally:
        for layer in layers:
            layer.batch_adapters, layer.batch_rows = None, None

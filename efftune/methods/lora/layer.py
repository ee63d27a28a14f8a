"""LoRA (Hu et al. 2021): `h = W0 x + s · B (A x)` with `W0` frozen, `s = alpha / r`.

`LoraLayer` wraps one base module (nn.Linear, transformers' Conv1D, nn.Embedding) and holds any
number of named adapters; `FusedLinears` runs siblings that share an input (q/k/v, gate/up) through
one fused op; `mixed_adapter_batch` sends each example of a batch through its own adapter.
"""
from __future__ import annotations

import itertools
import math
from contextlib import contextmanager
from typing import ClassVar, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...attach import _conv1d_class, hooked, master_dtype, wrappers
from ...errors import EfftuneError
from ...quantize import bnb
from ...quantize.linear import QuantizedLinear
from ...quantize.operands import flatten, weight_operands
from .ops import fused_lora_linears


def delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """`s · B @ A`, shape (out, in), computed in fp32 at least: the one merge formula."""
    dtype = torch.promote_types(lora_A.dtype, torch.float32)
    return (lora_B.to(dtype) @ lora_A.to(dtype)) * scaling


def _merge_terms(like: torch.Tensor, scales: Sequence[torch.Tensor | None],
                 deltas: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, Σ g ⊙ ΔW) of `merged_weight`: c = 1 + Σ (g - 1) per row, g = 1 where None."""
    c, total = torch.ones_like(like[:, 0]), torch.zeros_like(like)
    for g, delta in zip(scales, deltas):
        if g is None:
            total += delta
        else:
            c += g - 1
            total += g[:, None] * delta
    return c, total


def merged_weight(w0: torch.Tensor, scales: Sequence[torch.Tensor | None], deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """The weight (out, in) that computes what the unmerged adapters compute together on `w0`.

    Each adapter adds `(g - 1) ⊙ W0 + g ⊙ ΔW` to the base (g its per-output-feature scale, one
    value per row: DoRA's m / n; None for LoRA, g = 1, which leaves plain `ΔW`), so the sum is
    `c ⊙ W0 + Σ g ⊙ ΔW` with `c = 1 + Σ (g - 1)`: affine in W0, hence exactly invertible
    (`unmerged_weight`) while no c is 0."""
    c, total = _merge_terms(w0, scales, deltas)
    return c[:, None] * w0 + total


def unmerged_weight(w: torch.Tensor, scales: Sequence[torch.Tensor | None], deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """`W0` from `w = merged_weight(W0, scales, deltas)`: `(w - Σ g ⊙ ΔW) / c`."""
    c, total = _merge_terms(w, scales, deltas)
    return (w - total) / c[:, None]


def adapter_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` as the adapter factors (of `dtype`) take it: cast, unless autocast casts for the matmul."""
    if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        return x.to(dtype)
    return x


class LoraAdapter(nn.Module):
    """One adapter's factors: `lora_A` (r, in), `lora_B` (out, r) — peft's shapes and names.

    A variant whose output is LoRA's, scaled per output feature (DoRA), sets `scales_output` and
    overrides the three hooks below; the layers and the fused op call them and know no variant."""

    # The layer's output is `scale_output(W0 x + s B A x, bias)` instead of the plain sum plus bias.
    scales_output: ClassVar[bool] = False

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

    def attached(self, layer: "LoraLayer") -> None:
        """Called once the layer holds the adapter (DoRA reads the base weight here)."""

    def scale_output(self, layer: "LoraLayer", v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The layer's output from `v = W0 x + s B A x` (no bias yet); only when `scales_output`."""
        raise NotImplementedError

    def merge_scale(self, layer: "LoraLayer", w0: torch.Tensor) -> torch.Tensor | None:
        """Per-row scale g of the merge (`merged_weight`) on the unmerged (out, in) weight w0."""
        return None

    def refresh_caches(self, layer: "LoraLayer") -> None:
        """Bring caches of the base weight up to date (a compiled graph reads them unchecked)."""


# Sibling projections that read the same input in transformers' decoder blocks.
SHARED_INPUT_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class FusedLinears:
    """LoRA linears computed by one `lora_linears` op (see `ops`): a group of siblings that
    read one input (attention's q/k/v, the MLP's gate/up), or a single layer.

    The first member called computes every member's output — frozen GEMM and LoRA update in one
    pass, the A factors stacked into one GEMM — and keeps the others' outputs until they are called
    with that same tensor. It applies while every member runs the same single plain LoRA adapter
    (no dropout, nothing merged, no mixed batch) on a plain frozen nn.Linear or a quantised one
    (`efftune.quantize`: the op dequantises it, one layer at a time) without hooks, in one compute
    dtype (autocast's, or everything in x's); otherwise each layer computes its own output as usual.
    A plain object, not a module: it holds no parameters and never appears in a state dict."""

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
            # the op computes LoraAdapter.forward: a variant with a forward of its own (LoRA-FA) steps aside
            if type(adapter).forward is not LoraAdapter.forward or not isinstance(adapter.dropout, nn.Identity) \
                    or layer.batch_adapters is not None or not _frozen_linear(base) or hooked(base):
                return None
        return name[0]

    def _compute_dtype(self, x: torch.Tensor, adapters: Sequence[LoraAdapter]) -> torch.dtype | None:
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        dtypes = [_weight_dtype(layer.base_layer) for layer in self.layers] + [a.lora_A.dtype for a in adapters]
        return x.dtype if all(d == x.dtype for d in dtypes) else None

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
        """(frozen weights as (kind, tensors) (`quantize.operands`), biases, the stacked scaled A
        factors, the B factors), cast to `dtype` (a quantised weight's tensors stay as stored)."""
        bases = [layer.base_layer for layer in self.layers]
        # an output-scaling adapter (DoRA) adds the bias after its scale, in `scale_output`
        return ([weight_operands(b, dtype) for b in bases],
                [None if b.bias is None or a.scales_output else b.bias.to(dtype) for b, a in zip(bases, adapters)],
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
        members, biases, a, bs = self.operands(adapters, dtype)
        weights, kinds = flatten(members)
        ys = fused_lora_linears(x.to(dtype), weights, biases, a, bs, kinds)
        for i, (layer, adapter) in enumerate(zip(self.layers, adapters)):
            if adapter.scales_output:
                bias = layer.base_layer.bias
                ys[i] = adapter.scale_output(layer, ys[i], None if bias is None else bias.to(dtype))
        y, ys[slot] = ys[slot], None
        if len(ys) > 1:
            self.source, self.kept = x, ys
        return y


def _frozen_linear(base: nn.Module) -> bool:
    """A plain nn.Linear or a quantised one, nothing of it training (a quantised layer's `weight`
    would dequantise it: not read here)."""
    if isinstance(base, QuantizedLinear):
        return base.bias is None or not base.bias.requires_grad
    return type(base) is nn.Linear and not base.weight.requires_grad \
        and (base.bias is None or not base.bias.requires_grad)


def _weight_dtype(base: nn.Module) -> torch.dtype:
    return base.dtype if isinstance(base, QuantizedLinear) else base.weight.dtype


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
        # per merged adapter, its merge's row scale (None: LoRA), while a scaled one is merged
        self.merge_scales: list[torch.Tensor | None] | None = None

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
        self.adapters[name].attached(self)
        self.active.append(name)
        return self.adapters[name]

    def before_compile(self) -> None:
        """Called by `efftune.train.compile.compile_blocks` before it compiles."""
        for adapter in self.adapters.values():
            adapter.refresh_caches(self)

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
        base = self.base_layer(x, *args, **kwargs)
        if self.batch_adapters is not None:
            return self._mixed_forward(x, base)
        y = base
        for name in self.active:
            if name not in self.merged:
                y = y + self.adapter_delta(self.adapters[name], x, base)
        return y

    def adapter_delta(self, adapter: LoraAdapter, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """What `adapter` adds to the base output `base` (of input x). An output-scaling adapter
        (DoRA) adds `scale(W0 x + s B A x) - base`, so several active adapters sum as in peft."""
        delta = self.lora_delta(adapter, x).to(base.dtype)
        if not adapter.scales_output:
            return delta
        bias = self.base_layer.bias
        v = base if bias is None else base - bias.to(base.dtype)
        return adapter.scale_output(self, v + delta, None if bias is None else bias.to(base.dtype)) - base

    def _mixed_forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.merged:
            raise EfftuneError("a mixed-adapter batch needs unmerged adapters; call unmerge_lora first")
        # Compiled (torch.compile of the block), this reads only tensors and the adapters' names: which
        # row goes where is data, so a new layout of rows is no new graph. The check is eager-only.
        if not torch.compiler.is_compiling() and len(self.batch_adapters) != x.shape[0]:
            raise EfftuneError(f"mixed-adapter batch names {len(self.batch_adapters)} adapters for "
                               f"{x.shape[0]} examples")
        base = y
        for name, adapter in self.adapters.items():
            rows = self.batch_rows.get(name)
            if rows is not None:
                delta = self.adapter_delta(adapter, x.index_select(0, rows), base.index_select(0, rows))
                y = y.index_add(0, rows, delta)
        return y

    @torch.no_grad()
    def check_mergeable(self) -> None:
        """Refuse a merge into a quantised base (its `weight` is a read-only dequantised copy, or
        bitsandbytes' packed codes)."""
        kind = self.base_layer.KIND if isinstance(self.base_layer, QuantizedLinear) else \
            bnb.describe(self.base_layer) if bnb.bnb_kind(self.base_layer) else None
        if kind is not None:
            raise EfftuneError(f"merge: the base weight is quantised ({kind}), and merging into "
                               "it would round the update away: call efftune.quantize.dequantize_model(model) "
                               "first, which makes each quantised layer a plain one to merge into")

    def merge(self) -> None:
        """Fold every active, unmerged adapter into the base weight."""
        self.check_mergeable()
        pending = [name for name in self.active if name not in self.merged]
        if any(self.adapters[name].scales_output for name in self.merged + pending):
            self._merge_scaled(self.merged + pending)
            return
        for name in pending:
            w = self.base_layer.weight
            w.add_(self.to_weight_layout(self.adapters[name].delta_weight()).to(w.dtype))
            self.merged.append(name)

    def _merge_scaled(self, names: list[str]) -> None:
        """Merge `names` at once, from the unmerged weight: a scaled adapter's term depends on W0
        (`merged_weight`), so anything merged already is taken out first."""
        if names == self.merged:
            return
        self.unmerge()
        w = self.base_layer.weight
        w0 = self.to_weight_layout(w).to(torch.promote_types(w.dtype, torch.float32))  # (out, in): a transpose or not
        scales = [self.adapters[n].merge_scale(self, w0) for n in names]
        deltas = [self.adapters[n].delta_weight().to(w0.dtype) for n in names]
        if not bool(_merge_terms(w0, scales, deltas)[0].all()):
            raise EfftuneError("merge: a row of the merged weight would be scaled by 0 (magnitudes of 0), "
                               "which unmerge could not undo")
        w.copy_(self.to_weight_layout(merged_weight(w0, scales, deltas)).to(w.dtype))
        self.merged, self.merge_scales = list(names), scales

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract merged adapters again (exact up to rounding in the weight's dtype)."""
        if self.merge_scales is not None:
            w = self.base_layer.weight
            wf = self.to_weight_layout(w).to(torch.promote_types(w.dtype, torch.float32))
            deltas = [self.adapters[n].delta_weight().to(wf.dtype) for n in self.merged]
            w.copy_(self.to_weight_layout(unmerged_weight(wf, self.merge_scales, deltas)).to(w.dtype))
            self.merged, self.merge_scales = [], None
            return
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
        # an nn.Linear says so; a quantised one's `weight` would dequantise it (efftune's) or is
        # packed codes of another shape (bitsandbytes')
        if isinstance(self.base_layer, nn.Linear):
            return self.base_layer.in_features
        w = self.base_layer.weight
        return w.shape[0] if self.fan_in_fan_out else w.shape[1]

    @property
    def out_features(self) -> int:
        if isinstance(self.base_layer, nn.Linear):
            return self.base_layer.out_features
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


# ---- the layers of a model ----------------------------------------------------------------------

def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """Every LoRA-wrapped module with its path (the path of the module it wraps)."""
    return wrappers(model, LoraLayer)


def adapter_names(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for _, layer in lora_layers(model):
        names.update(dict.fromkeys(layer.adapters))
    return list(names)


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

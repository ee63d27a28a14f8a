"""A frozen linear weight as the fused ops take it: a *kind* and its tensors.

The ops of `efftune.methods.lora` (`lora_linears`, the SwiGLU op's `rows_mm` / `lora_output`, ...)
are registered with `torch.library`, whose schemas have flat tensor lists and no nesting. So a list
of weights travels as one flat `Tensor[]` plus `str[]? kinds`, one kind per weight: "dense" takes one
tensor (the weight itself, in the compute dtype), "nf4" and "int8" take the tensors of
`QuantizedLinear.quantized()` (ARITY of them). No `kinds` (None, or empty) means every weight is dense, so the
ops' older calls stay valid.

Inside an op, `materialize` makes one quantised weight dense in the compute dtype right before its
GEMM, and the op lets it go: the dense copy never outlives the GEMM, and, the op being opaque to
torch.compile, no partitioner can decide to keep it for backward either.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .linear import DENSE, IN_FEATURES, QuantizedLinear

DENSE_KIND = "dense"
ARITY = {DENSE_KIND: 1, "nf4": 5, "int8": 2}  # tensors per weight


def weight_operands(linear: nn.Module, dtype: torch.dtype) -> tuple[str, list[Tensor]]:
    """(kind, tensors) of a frozen linear for an op computing in `dtype`: a quantised layer's packed
    tensors as stored (nothing is dequantised here), a plain layer's weight cast to `dtype`."""
    if isinstance(linear, QuantizedLinear):
        return linear.KIND, list(linear.quantized())
    return DENSE_KIND, [linear.weight.to(dtype)]


def flatten(members: Sequence[tuple[str, Sequence[Tensor]]]) -> tuple[list[Tensor], list[str]]:
    """[(kind, tensors), ...] -> (the flat tensor list, the kinds); kinds is [] when all are dense."""
    flat = [t for _, tensors in members for t in tensors]
    kinds = [kind for kind, _ in members]
    return flat, ([] if all(k == DENSE_KIND for k in kinds) else kinds)


def split(weights: Sequence[Tensor], kinds: Sequence[str] | None) -> list[tuple[str, list[Tensor]]]:
    """The inverse of `flatten`: each weight's (kind, tensors)."""
    if not kinds:  # None or empty: all dense
        return [(DENSE_KIND, [w]) for w in weights]
    out, start = [], 0
    for kind in kinds:
        if kind not in ARITY:
            raise ValueError(f"unknown weight kind {kind!r}; known: {', '.join(ARITY)}")
        out.append((kind, list(weights[start:start + ARITY[kind]])))
        start += ARITY[kind]
    if start != len(weights):
        raise ValueError(f"kinds {list(kinds)} take {start} tensors, got {len(weights)}")
    return out


def materialize(kind: str, tensors: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """The dense (out, in) weight: a dense one as it is (the caller cast it), a quantised one made in
    `dtype` (a new tensor, for one GEMM)."""
    return tensors[0] if kind == DENSE_KIND else DENSE[kind](tuple(tensors), dtype)


def out_features(kind: str, tensors: Sequence[Tensor]) -> int:
    """The weight's rows, from its tensors' shapes only (fake kernels): every format keeps one row
    of its first tensor per output feature."""
    return tensors[0].shape[0]


def in_features(kind: str, tensors: Sequence[Tensor]) -> int:
    """The weight's columns, from its tensors' shapes only."""
    return tensors[0].shape[1] if kind == DENSE_KIND else IN_FEATURES[kind](tensors)


def gemm_flops(rows: int, weights: Sequence[Tensor], kinds: Sequence[str] | None) -> int:
    """Multiply-adds ×2 of `rows` rows times every weight (transposed), for the ops' flop formulas
    (`torch.utils.flop_counter`, which torch.compile's memory-budget search reads too). A
    dequantisation's own work is memory-bound and not counted."""
    return sum(2 * rows * in_features(kind, w) * out_features(kind, w) for kind, w in split(weights, kinds))

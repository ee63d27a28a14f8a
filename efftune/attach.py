"""The one way a method attaches to a model: swap matching modules for wrappers, and back.

A wrapper holds the untouched base module as `base_layer`; detaching puts the base module back
(after merging into it when asked). Targets are chosen by module-name suffixes, a regex, or
"all-linear" (every linear layer except the output head).
"""
from __future__ import annotations

import re
from typing import Callable, Iterator, Sequence, TypeVar

import torch
from torch import nn

from .errors import ConfigError, TargetError

T = TypeVar("T", bound=nn.Module)
Targets = str | Sequence[str]


def master_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """The dtype of trainable adapter weights over a base of `base_dtype`: fp32 master weights
    under a half-precision base (autocast runs them in bf16); a float64 base (tests) keeps float64."""
    return torch.promote_types(base_dtype, torch.float32)


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
        return Conv1D
    except ImportError:  # pragma: no cover - transformers always has it today
        return ()


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, _conv1d_class()))


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def name_matches(name: str, targets: Targets) -> bool:
    """Does the module path `name` match? A string is a full-match regex; a list holds suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_targets(model: nn.Module, targets: Targets,
                 accept: Callable[[nn.Module], bool] = is_linear) -> list[str]:
    """Names of the modules `targets` selects, in model order. Raises TargetError on no match."""
    if isinstance(targets, str) and targets != "all-linear":
        try:
            re.compile(targets)
        except re.error as exc:
            raise TargetError(f"target_modules {targets!r} is not a valid regex ({exc})") from None
    head = _output_head(model)
    names = []
    for name, module in model.named_modules():
        if not name or module is head or name.endswith(".base_layer") or ".base_layer." in name:
            continue
        module = getattr(module, "base_layer", module)  # an attached wrapper stands for its base
        if isinstance(targets, str) and targets == "all-linear":
            hit = is_linear(module)
        else:
            hit = name_matches(name, targets)
        if hit:
            if not accept(module):
                raise TargetError(f"target {name!r} is a {type(module).__name__}, which this method "
                                  "cannot wrap")
            names.append(name)
    if not names:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if n and is_linear(m) and m is not head})
        raise TargetError(f"target_modules {targets!r} matches no module; linear layers here are "
                          f"named: {', '.join(leaves) or '(none)'}")
    return names


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, child = get_submodule_parent(model, name)
    setattr(parent, child, new)


def hooked(*modules: nn.Module) -> bool:
    """Whether calling these modules would run hooks (their own or global ones). A fused path that
    computes their outputs without calling them must step aside then, or the hooks would not run."""
    from torch.nn.modules import module as m
    if m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks \
            or m._global_backward_pre_hooks:
        return True
    return any(mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks or mod._backward_pre_hooks
               for mod in modules)


def wrappers(model: nn.Module, kind: type[T]) -> Iterator[tuple[str, T]]:
    """Every attached wrapper of type `kind`, with its module path."""
    for name, module in model.named_modules():
        if isinstance(module, kind):
            yield name, module


def freeze_base(model: nn.Module) -> None:
    """No base parameter trains; methods switch on their own parameters afterwards."""
    for p in model.parameters():
        p.requires_grad_(False)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a quantised weight counts as the elements it stands for."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    counted: set[int] = set()
    total = 0
    for m in model.modules():
        own = [p for p in m.parameters(recurse=False) if id(p) not in counted]
        counted.update(id(p) for p in own)
        packed = [p for p in own if not p.is_floating_point()]
        total += sum(p.numel() for p in own if p.is_floating_point())
        if not packed:
            continue
        if hasattr(m, "packed_weight_numel"):
            # efftune's quantised layers (efftune.quantize, a layer above) pack their frozen weight into
            # integer parameters and say how many elements the weight has
            total += m.packed_weight_numel
        elif isinstance(getattr(m, "in_features", None), int) and isinstance(getattr(m, "out_features", None), int):
            # a linear another library quantised (bitsandbytes' Linear4bit packs two codes a byte)
            total += m.in_features * m.out_features
        else:
            total += sum(p.numel() for p in packed)
    return trainable, total


def decoder_blocks(model: nn.Module, option: str | None = None) -> list[nn.Module]:
    """The repeated blocks, found by the class names transformers lists in `_no_split_modules`.
    With `option` (the config key that needs them), finding none is a ConfigError naming it."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(inner, "_no_split_modules", None) or ())
    blocks = [m for m in inner.modules() if type(m).__name__ in names]
    if option and not blocks:
        raise ConfigError(f"{option}: found no decoder blocks in {type(model).__name__} "
                          "(it lists none in _no_split_modules)")
    return blocks

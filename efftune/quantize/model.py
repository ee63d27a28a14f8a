"""Quantise a model's frozen decoder-block linears (`quantize: nf4 | int8`), and back.

Only the linear layers inside the decoder blocks are quantised, and the fused 3-D expert weights of
MoE blocks (per expert, `experts.QuantizedExperts`): they hold nearly all the weights. Embeddings,
norms, routers and the LM head keep their dtype (the head's logits feed the loss directly, and tied
embeddings share its matrix). Run it on a freshly loaded model, before a method attaches.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError
from ..moe.experts import experts_modules
from . import bnb, nf4
from . import experts as quantized_experts
from .experts import QuantizedExperts
from .linear import LINEARS, QuantizedLinear

CHOICES = ("none", "nf4", "int8")
# Classes of layers some other library already quantised (bitsandbytes, as transformers loads them
# with load_in_4bit / load_in_8bit): quantising again is refused; methods train on top (`bnb`).
FOREIGN_QUANTIZED = ("Linear4bit", "Linear8bitLt", "Params4bit")


def check_quantize(quantize: str, fp8_base: bool) -> None:
    """Refuse what cannot run with a quantised base, before anything is loaded (methods that write
    into the base: `config.check_combination`, from the method's record)."""
    if quantize not in CHOICES:
        raise ConfigError(f"quantize must be one of {', '.join(CHOICES)}, got {quantize!r}")
    if quantize == "none":
        return
    if fp8_base:
        raise ConfigError(f"quantize: {quantize} and train.fp8_base both replace the frozen base weights; "
                          "choose one")


@dataclass
class QuantizeReport:
    """What `quantize_model` did: the quantised module paths (linears; fused-experts modules in
    `experts`), the ones left as they were (path -> why), and the bytes of their weights before and after."""
    kind: str
    quantized: list[str] = field(default_factory=list)
    experts: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0

    def summary(self) -> str:
        moe = f" and {len(self.experts)} fused-experts modules (each expert on its own)" if self.experts else ""
        line = (f"quantize {self.kind}: {len(self.quantized)} linear layers of the decoder blocks{moe}, "
                f"{self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB")
        if self.skipped:
            reasons: dict[str, list[str]] = {}
            for path, why in self.skipped.items():
                reasons.setdefault(why, []).append(path)
            line += "; left as they were: " + "; ".join(
                f"{len(paths)} {why} ({', '.join(paths[:3])}{', ...' if len(paths) > 3 else ''})"
                for why, paths in reasons.items())
        return line


def _nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def _why_not(kind: str, linear: nn.Linear) -> str | None:
    if kind == "nf4" and not nf4.fits(linear.out_features, linear.in_features):
        return f"whose input size is not a multiple of {nf4.BLOCK} (NF4's block)"
    if not linear.weight.is_floating_point():
        return "whose weight is not floating point"
    return None


def quantize_model(model: nn.Module, kind: str) -> QuantizeReport:
    """Replace the frozen nn.Linear layers of the decoder blocks by `LINEARS[kind]` in place.

    A layer that cannot take the format (NF4: an input size that is not a multiple of 64) stays
    as it was and is named in the report; none that can is a ConfigError. On a model some method
    already froze, only frozen linears are quantised (a method's own trainable layers stay)."""
    from ..attach import replace_module
    from ..attach import decoder_blocks
    if kind not in LINEARS:
        raise ConfigError(f"quantize must be one of {', '.join(LINEARS)}, got {kind!r}")
    foreign = next((n for n, m in model.named_modules() if type(m).__name__ in FOREIGN_QUANTIZED), None)
    if foreign is not None:
        raise ConfigError(f"quantize: {kind}: the model is quantised already ({foreign} is a "
                          f"{type(model.get_submodule(foreign)).__name__} of bitsandbytes); drop quantize (methods "
                          "train on its layers as they are) or load it in bf16")
    if any(isinstance(m, (QuantizedLinear, QuantizedExperts)) for m in model.modules()):
        raise ConfigError(f"quantize: {kind}: the model is quantised already")
    # fresh from loading every weight requires grad; once a method froze the base, the trainable
    # linears are the method's own
    frozen_only = any(not p.requires_grad for p in model.parameters())
    report = QuantizeReport(kind)
    paths = {id(m): n for n, m in model.named_modules()}
    for block in decoder_blocks(model, f"quantize: {kind}"):
        for name, module in list(block.named_modules()):
            if type(module) is not nn.Linear or (frozen_only and module.weight.requires_grad):
                continue
            path = f"{paths[id(block)]}.{name}"
            if (why := _why_not(kind, module)) is not None:
                report.skipped[path] = why
                continue
            new = LINEARS[kind](module)
            report.bytes_before += _nbytes(module)
            report.bytes_after += _nbytes(new)
            replace_module(block, name, new)
            report.quantized.append(path)
        for name, module in experts_modules(block):  # MoE: the fused expert weights (none wrapped yet)
            path = f"{paths[id(block)]}.{name}"
            if frozen_only and module.gate_up_proj.requires_grad:
                continue
            if not quantized_experts.fits(kind, module):
                report.skipped[path] = f"whose expert weights' input sizes are not multiples of {nf4.BLOCK} (NF4's block)"
                continue
            report.bytes_before += _nbytes(module)
            new = QuantizedExperts(module, kind)
            report.bytes_after += _nbytes(new)
            replace_module(block, name, new)
            report.experts.append(path)
    if not report.quantized and not report.experts:
        why = f": {next(iter(report.skipped.values()))}" if report.skipped else ""
        raise ConfigError(f"quantize: {kind}: no linear layer in the decoder blocks can be quantised{why}")
    return report


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Put a plain frozen nn.Linear holding the dequantised weight in place of every quantised
    linear (efftune's or bitsandbytes'), and the original fused-experts module with dequantised
    weights in place of every quantised one: the model a merge or a full-model export writes into.
    The dense weights take `dtype`, by default the base's own: efftune's layers their compute dtype
    (the model's dtype when it was quantised), bitsandbytes' the dtype transformers loaded the model
    in (`config.dtype`, as transformers' own `dequantize` takes); a bitsandbytes model then loses
    its quantization config too (transformers' quantizer removes it), so `save_pretrained` writes a
    plain model. Returns how many modules changed. (The original weights are gone: this is the
    quantised model made dense.)"""
    from ..attach import replace_module
    count, foreign = 0, False
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedExperts):
            replace_module(model, name, module.dense() if dtype is None else module.dense().to(dtype))
            count += 1
        elif isinstance(module, QuantizedLinear) or bnb.bnb_kind(module) is not None:
            if isinstance(module, QuantizedLinear):
                weight = module.dequantize(dtype)
            else:
                weight, foreign = bnb.dense_weight(module, dtype or _bnb_dtype(model)), True
            dense = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
            dense.weight = nn.Parameter(weight, requires_grad=False)
            bias = module.bias
            if bias is not None and bias.dtype != weight.dtype:
                bias = nn.Parameter(bias.detach().to(weight.dtype), requires_grad=bias.requires_grad)
            dense.bias = bias
            replace_module(model, name, dense)
            count += 1
    quantizer = getattr(model, "hf_quantizer", None)
    if foreign and quantizer is not None:
        quantizer.remove_quantization_config(model)
    return count


def base_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype `dequantize_model` gives a quantised model's weights, or None when it has none."""
    for module in model.modules():
        if isinstance(module, (QuantizedLinear, QuantizedExperts)):
            return module.dtype
        if bnb.bnb_kind(module) is not None:
            return _bnb_dtype(model)
    return None


def _bnb_dtype(model: nn.Module) -> torch.dtype:
    """The dtype transformers loaded a bitsandbytes model in (its config's), else that of its first
    floating-point weight (bitsandbytes packs its own as integers)."""
    dtype = getattr(getattr(model, "config", None), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def check_shardable(model: nn.Module) -> None:
    """Refuse what FSDP2 cannot shard: bitsandbytes' layers keep their quantisation state on the
    weight parameter itself, which `fully_shard` replaces by plain shards (bitsandbytes has no FSDP2
    support). efftune's own layers shard (`linear.frozen_packed`)."""
    found = [n for n, m in model.named_modules() if bnb.bnb_kind(m) is not None]
    if found:
        layer = model.get_submodule(found[0])
        raise ConfigError(f"train.distributed fsdp cannot shard the {bnb.describe(layer)} layers of this model "
                          f"({found[0]}, {len(found)} in all): bitsandbytes has no FSDP2 support; use "
                          "train.distributed ddp, or load the model in bf16 with --quantize nf4, which shards")


def quantized_layers(model: nn.Module) -> list[str]:
    """The paths of the model's quantised linears and fused-experts modules."""
    return [n for n, m in model.named_modules()
            if isinstance(m, (QuantizedLinear, QuantizedExperts)) or bnb.bnb_kind(m) is not None]

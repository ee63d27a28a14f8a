"""Linear layers bitsandbytes quantised (`Linear4bit`, `Linear8bitLt`: a model loaded with
transformers' `BitsAndBytesConfig`, or a pre-quantised checkpoint whose config says so).

efftune does not quantise with bitsandbytes (`quantize_model` has formats of its own); it trains on
top of a model that comes quantised this way: a LoRA layer wraps the bitsandbytes module and calls
it for the base term (its own kernels, CUDA or CPU), adding the update on the side. Found by class
and module name, so nothing here imports bitsandbytes until a weight must be made dense
(`dense_weight`: merging into a dequantised copy, `dequantize_model`). bitsandbytes is an optional
extra (`pip install efftune[bnb]`).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

BNB_LINEARS = {"Linear4bit": "4-bit", "Linear8bitLt": "8-bit"}


def bnb_kind(module: nn.Module) -> str | None:
    """"4-bit" or "8-bit" for a bitsandbytes-quantised linear layer (its subclasses too), else None."""
    for cls in type(module).__mro__:
        if cls.__name__ in BNB_LINEARS and cls.__module__.startswith("bitsandbytes"):
            return BNB_LINEARS[cls.__name__]
    return None


def describe(module: nn.Module) -> str:
    """A few words for messages: "bitsandbytes 4-bit (Linear4bit)"."""
    return f"bitsandbytes {bnb_kind(module)} ({type(module).__name__})"


@torch.no_grad()
def dense_weight(module: nn.Module, dtype: torch.dtype) -> Tensor:
    """The (out, in) weight of a bitsandbytes linear, dequantised by bitsandbytes itself, in `dtype`."""
    import bitsandbytes.functional as bnb_functional
    weight = module.weight
    if bnb_kind(module) == "4-bit":
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            # bitsandbytes repacks a 4-bit weight for its AVX512 CPU kernel at the first forward in
            # eval mode; its own state_dict puts it back in the standard layout first, and so do we
            weight.data, weight.quant_state = bnb_functional._convert_weight_packed_for_cpu_inverse(
                weight.data, weight.quant_state)
        return bnb_functional.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
    scale = getattr(weight, "SCB", None)
    if scale is None:
        scale = module.state.SCB
    if scale is None:  # not quantised yet (bitsandbytes quantises when the layer moves to its device)
        return weight.data.to(dtype)
    # LLM.int8()'s vector-wise form: one absmax scale per output row, int8 codes of 127ths
    return (weight.data.float() * (scale.float()[:, None] / 127)).to(dtype)

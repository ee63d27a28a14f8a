"""Quantised frozen bases (QLoRA's NF4, int8 weight-only): `quantize_model(model, "nf4")`, then
attach any method as usual. See README "Quantized bases"."""
from .experts import QuantizedExperts
from .linear import Int8Linear, Nf4Linear, QuantizedLinear
from .model import (CHOICES, QuantizeReport, base_dtype, check_quantize, check_shardable, dequantize_model,
                    quantize_model, quantized_layers)

__all__ = ["CHOICES", "Int8Linear", "Nf4Linear", "QuantizedExperts", "QuantizedLinear", "QuantizeReport", "base_dtype", "check_quantize", "check_shardable",
           "dequantize_model", "quantize_model", "quantized_layers"]

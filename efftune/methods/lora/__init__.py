"""LoRA, in one folder: `config` (LoraConfig), `layer` (LoraLayer and its adapters, the fused
sibling groups, mixed-adapter batches), `model` (attach / switch / merge / unload / export on a
whole model), `ops` (the fused `efftune::` custom ops), `swiglu` + `swiglu_triton` (the fused
SwiGLU op and its Triton kernels), `packing` (the packed gate/up rows), `peft_format` (adapters in
peft's files, both ways).

The names below are LoRA's public API, importable from `efftune.methods.lora`.
"""
from ..registry import Method
from .config import LoraConfig
from .layer import lora_layers, mixed_adapter_batch
from .model import (add_lora, delete_adapter, export_merged, merge_and_unload, merge_lora, set_active_adapters,
                    set_trainable_adapters, unload_lora, unmerge_lora)
from .peft_format import load_adapter, save_adapter

METHOD = Method("lora", "lora", attach=add_lora, save=save_adapter, load=load_adapter)

__all__ = ["LoraConfig", "lora_layers", "mixed_adapter_batch", "add_lora", "delete_adapter", "export_merged",
           "merge_and_unload", "merge_lora", "set_active_adapters", "set_trainable_adapters", "unload_lora",
           "unmerge_lora", "load_adapter", "save_adapter", "METHOD"]

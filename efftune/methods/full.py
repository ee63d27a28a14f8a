"""Full fine-tuning: every weight of the model trains, or every weight of the modules a pattern picks.

Nothing is wrapped or added: the method switches `requires_grad` on for the chosen parameters, so
the model keeps its own modules and the training loop's forward path (chunked LM-head loss,
compiled blocks, CUDA graphs, activation checkpointing) runs as it does for any method.

Precision (a documented choice): the trained weights are kept in fp32 ("master weights") when the
model is bf16 or fp16, as adapters are (`attach.master_dtype`), and the forward runs them under the
loop's bf16 autocast; weights that do not train keep the model's dtype. That costs 4 bytes a weight
more than bf16 weights with fp32 optimizer state, but each AdamW step lands in fp32, where bf16
weights would drop updates smaller than their 8-bit mantissa resolves (most late-training steps at
small learning rates). With `train.optimizer: adamw8bit` the two Adam moments take 1 byte each, so
an 8B model needs ~4 (weights) + 4 (gradients) + 2 (moments) = 10 bytes a weight, 80 GB, and fits
one 141 GB GPU with room for activations.

The result is a whole transformers model directory (`save_pretrained`: safetensors, sharded above
`SHARD_SIZE`) in the model's own dtype, which `AutoModelForCausalLM.from_pretrained` loads without
efftune. `full_config.json` beside it records what trained.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..attach import find_targets, master_dtype
from ..errors import AdapterError, ConfigError
from ..files import load_all_or_nothing, read_json_object, read_safetensors, replace_dir_atomically
from .registry import Method

CONFIG_FILE = "full_config.json"
SHARD_SIZE = "5GB"  # transformers' hub convention: shards a download can resume one by one
ALL = "all"


@dataclass
class FullConfig:
    """`target_modules`: "all" (every parameter: embeddings, norms and head included), "all-linear"
    (every linear but the output head), module-name suffixes (`mlp`: every MLP) or a full-match regex
    over module names (`model\\.layers\\.(0|1)\\..*`); every parameter inside a chosen module trains."""
    target_modules: str | list[str] = ALL

    def __post_init__(self):
        if not self.target_modules:
            raise ConfigError("full.target_modules is empty: name what trains ('all' for every weight)")


def _is_all(targets: str | list[str]) -> bool:
    return targets == ALL or (isinstance(targets, list) and targets == [ALL])


def target_parameters(model: nn.Module, config: FullConfig) -> list[str]:
    """Names of the parameters `config` trains, in model order (a tied weight once, by its first name).
    Raises TargetError when the pattern matches no module."""
    if _is_all(config.target_modules):
        return [n for n, _ in model.named_parameters()]
    modules = find_targets(model, config.target_modules, accept=lambda m: True)
    chosen = {id(p) for path in modules for p in model.get_submodule(path).parameters()}
    return [n for n, p in model.named_parameters() if id(p) in chosen]


def add_full(model: nn.Module, config: FullConfig | None = None, *, tokenizer=None) -> list[str]:
    """Make the parameters `config` picks trainable (fp32 masters under a half-precision model) and
    freeze every other one. Returns the trained parameter names."""
    config = config or FullConfig()
    names = target_parameters(model, config)
    params = dict(model.named_parameters())
    chosen = {id(params[n]) for n in names}
    if not chosen:
        raise ConfigError("full.target_modules picks modules without parameters: nothing would train")
    with torch.no_grad():
        for p in model.parameters():
            train = id(p) in chosen
            p.requires_grad_(train)
            if train and p.dtype != master_dtype(p.dtype):
                # in place of the parameter object: tied weights and the optimizer see the same one
                p.data = p.data.to(master_dtype(p.dtype))
    return names


def saved_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model was loaded in (its config's), which a saved model keeps: fp32 masters are
    written back in it, so the directory has the size and dtype of the model it came from."""
    dtype = getattr(getattr(model, "config", None), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if isinstance(dtype, torch.dtype):
        return dtype
    frozen = [p.dtype for p in model.parameters() if not p.requires_grad]
    return frozen[0] if frozen else next(model.parameters()).dtype


def model_state(model: nn.Module, dtype: torch.dtype,
                state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict (or `state_dict`, the same keys gathered whole from an FSDP run) with
    floating-point tensors in `dtype`; tensors shared by several keys (tied embeddings) stay shared,
    so transformers writes them once."""
    source = state_dict if state_dict is not None else model.state_dict()
    cast: dict[int, torch.Tensor] = {}
    out = {}
    for key, t in model.state_dict(keep_vars=True).items():  # the module's own objects say what is shared
        if id(t) not in cast:
            s = source[key].detach()
            cast[id(t)] = s.to(dtype) if s.is_floating_point() else s
        out[key] = cast[id(t)]
    return out


def save_full(model: nn.Module, directory: str | os.PathLike, config: FullConfig, metadata: dict | None = None,
              tokenizer=None, max_shard_size: int | str = SHARD_SIZE,
              state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the whole model as a transformers directory (atomically): `save_pretrained` in the model's
    own dtype, shards of at most `max_shard_size`, the tokenizer if given, and `full_config.json`.
    `state_dict`: the model's weights gathered whole (`efftune.train.distributed.whole_state_dict`,
    after training under FSDP, where the model itself holds only this rank's shards)."""
    dtype = saved_dtype(model)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, state_dict=model_state(model, dtype, state_dict), max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        record = {"method": "full", "format_version": 1, "target_modules": config.target_modules,
                  "trained_parameters": len(trained), "dtype": str(dtype).removeprefix("torch.")}
        if metadata:
            record["efftune"] = metadata
        (tmp / CONFIG_FILE).write_text(json.dumps(record, indent=1))
    return replace_dir_atomically(directory, write)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights and persistent buffers by state-dict key, in model order, each tensor once
    (a tied head is its embedding's key only, as `save_pretrained` writes it): what `load_full` fills."""
    seen: set[int] = set()
    out = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            out[key] = t
    return out


def load_full(model: nn.Module, directory: str | os.PathLike) -> FullConfig:
    """Load the weights of a model directory `save_full` wrote into `model` (same architecture, any
    dtype), all or nothing (`files.load_all_or_nothing`: every key there, floating point, of its
    shape and finite, none left over). Nothing trains afterwards: this is for using the result
    (`efftune eval --adapter DIR`); to train on, load the directory as `--model`. Returns its config."""
    directory = Path(directory)
    record = read_json_object(directory / CONFIG_FILE)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise AdapterError(f"adapter: {directory} holds no .safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(read_safetensors(f))
    config = FullConfig(target_modules=record.get("target_modules", ALL))  # checked before any weight changes
    load_all_or_nothing(model, lambda: None, tensors, lambda: full_state_dict(model), directory)
    return config


METHOD = Method("full", "full", attach=add_full, save=save_full, load=load_full, artifact="model", writes_base=True)

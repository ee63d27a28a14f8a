import dataclasses

import pytest
import yaml

from efftune.config import RunConfig, load_config
from efftune.data.options import MOVED, DataConfig, upgrade_saved
from efftune.errors import ConfigError
from efftune.train.checkpoint import changed_keys


def test_defaults_are_the_main_job():
    cfg = load_config(None)
    assert cfg == RunConfig()
    assert cfg.task == ["intent_recognition"] and cfg.lora.r == 8 and cfg.train.steps == 60


def test_yaml_and_overrides_merge_per_section(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("task: navigate\nlora: {r: 4, target_modules: [q_proj]}\ntrain: {steps: 9, lr: 1}\n")
    cfg = load_config(p, {"train": {"steps": 3}})
    assert cfg.task == ["navigate"] and cfg.lora.target_modules == ["q_proj"]
    assert cfg.train.steps == 3 and cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


@pytest.mark.parametrize("text, message", [
    ("modle: x", "unknown config key 'modle'"),
    ("lora: {rank: 4}", "unknown config key 'lora.rank'"),
    ("train: {batch_size: 2.5}", "train.batch_size: expected int"),
    ("train: {precision: fp8}", "train.precision must be auto, fp32 or bf16"),
    ("train: {batch_size: 6, micro_batch_size: 4}", "micro_batch_size (4) must divide"),
    ("chat_template: maybe", "chat_template: expected bool"),
    ("lora: [1, 2]", "lora: expected a mapping"),
    ("task: [1, 2]", "task[0]: expected str"),
    ("a: [", "not valid YAML: expected the node content, but found '<stream end>' (line 2, column 1)"),
    ("modle: x", "did you mean 'model'?"),
    ("eval_size: -5", "eval_size must be 0 or more, got -5"),
    ("device: gpu", "device: unknown device 'gpu'"),
    ("lora: {target_modules: 'q_proj('}", "lora.target_modules: 'q_proj(' is not a valid regex"),
    ("ia3: {feedforward_modules: '[x'}", "ia3.feedforward_modules: '[x' is not a valid regex"),
    ("train: {save_every: -1}", "train.save_every must be at least 0, got -1"),
    ("train: {lr: .inf}", "train.lr must be a positive finite number, got inf"),
    ("lora: {alpha: 0}", "lora.alpha must be a positive finite number, got 0.0"),
    ("data: {train_on: everything}", "data.train_on must be one of assistant, last_assistant, all, got 'everything'"),
    ("data: {overflow: wrap}", "data.overflow must be one of truncate, drop, error, got 'wrap'"),
    ("data: {columns: [question]}", "data.columns: 'question' is not FIELD=COLUMN"),
    ("data: {columns: [prompt=q, completion=q]}", "data.columns: column 'q' is named twice"),
    ("data: {trian_on: all}", "unknown config key 'data.trian_on' (did you mean 'train_on'?"),
    ("data: {cache: sometimes}", "data.cache: expected bool"),
    ("eval_samples: -1", "eval_samples must be 0 or more, got -1"),
])
def test_bad_values_name_the_key(tmp_path, text, message):
    p = tmp_path / "c.yaml"
    p.write_text(text + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert message in str(info.value) and str(p) in str(info.value) and "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")


def test_a_directory_and_bytes_that_are_not_utf8(tmp_path):
    with pytest.raises(ConfigError, match="is a directory; pass a YAML file"):
        load_config(tmp_path)
    (tmp_path / "c.yaml").write_bytes(b"model: caf\xe9\n")
    with pytest.raises(ConfigError, match="c.yaml: byte offset 10 is not UTF-8"):
        load_config(tmp_path / "c.yaml")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_number_is_refused_where_a_positive_number_is_asked_for(value):
    from efftune.config import load_config
    with pytest.raises(ConfigError, match=r"mixlora\.alpha must be a positive number"):
        load_config(None, {"mixlora": {"alpha": value}})


def test_the_data_section_round_trips(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  path: chats.jsonl\n  eval_path: held.parquet\n  split: train\n  eval_split: test\n"
                 "  columns: [prompt=question, completion=answer]\n  train_on: last_assistant\n  overflow: drop\n"
                 "  cache: false\neval_samples: 0\n")
    cfg = load_config(p)
    assert cfg.data == DataConfig(path="chats.jsonl", eval_path="held.parquet", split="train", eval_split="test",
                                  columns=["prompt=question", "completion=answer"], train_on="last_assistant",
                                  overflow="drop", cache=False)
    assert cfg.eval_samples == 0
    # the run's saved config (config.json is asdict) read back as a config file is the same run
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    assert load_config(again) == cfg
    # a flag's value joins the file's section, key by key
    assert load_config(p, {"data": {"overflow": "error"}}).data == dataclasses.replace(cfg.data, overflow="error")


@pytest.mark.parametrize("old, value", [(k, "x") for k in MOVED if k != "data"] + [("data_cache", False)])
def test_a_data_key_at_the_top_level_says_where_it_moved(tmp_path, old, value):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"model": "default", old: value}))
    with pytest.raises(ConfigError) as info:
        load_config(p)
    text = str(info.value)
    assert text == f"{p}: {old} moved: write data.{MOVED[old]} (data: {{{MOVED[old]}: ...}})"
    with pytest.raises(ConfigError, match=rf"^{old} moved: write data\.{MOVED[old]} "):
        load_config(None, {old: value})  # the same from Python's overrides


@pytest.mark.parametrize("text", ["data: chats.jsonl", "data: [a, b]", "data:"])
def test_data_as_a_file_name_says_it_is_a_section_now(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(p, {"data": {"train_on": "all"}})  # a flag's data key with it: still one line
    assert str(info.value).startswith(f"{p}: data is a section now: write data.path for the data file")
    assert "\n" not in str(info.value)
    if text == "data: chats.jsonl":
        assert str(info.value).endswith("(data: {path: chats.jsonl})")


def test_a_run_saved_before_the_data_section_is_compared_key_by_key():
    saved = {"model": "m", "data": "a.jsonl", "eval_data": None, "data_split": None, "eval_split": None,
             "data_columns": [], "data_train_on": "assistant", "data_overflow": "truncate", "data_cache": True,
             "eval_samples": 3, "train": {"steps": 2}}
    new = dataclasses.asdict(RunConfig(model="m", data=DataConfig(path="a.jsonl", cache=False)))
    new["train"] = {"steps": 2}
    upgraded = upgrade_saved(saved)
    assert upgraded["data"] == dataclasses.asdict(DataConfig(path="a.jsonl"))
    assert changed_keys(upgraded, new) == []  # data.cache is bookkeeping
    new["data"]["train_on"], new["data"]["path"] = "all", "b.jsonl"
    assert sorted(changed_keys(upgraded, new)) == ["data.path", "data.train_on"]
    assert upgrade_saved(new) is new  # a run saved with the section is left as it is

import pytest

from efftune.config import RunConfig, load_config
from efftune.errors import ConfigError


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

"""The flag table generated from the config dataclasses: every key has a flag, each flag sets its
key, help names key and default, the old names still work, `hub build` shares train's flags."""
import argparse
import dataclasses
import functools
import json
import typing

import pytest

from efftune import cli
from efftune.cli import main, parser
from efftune.config import RunConfig, load_config
from efftune.methods.lora.config import LoraConfig
from efftune.train.loop import TrainConfig


def declared(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def all_keys() -> dict[str, tuple[object, object]]:
    """Every config key, found by walking RunConfig and its section dataclasses -> (type, declared default)."""
    keys = {}
    hints = typing.get_type_hints(RunConfig)
    for top in dataclasses.fields(RunConfig):
        if dataclasses.is_dataclass(hints[top.name]):
            section = hints[top.name]
            inner = typing.get_type_hints(section)
            for f in dataclasses.fields(section):
                keys[f"{top.name}.{f.name}"] = (inner[f.name], declared(f))
        else:
            keys[top.name] = (hints[top.name], declared(top))
    return keys


@functools.cache
def train_actions() -> dict[str, argparse.Action]:
    return actions_by_dest(subparser("train"))


def subparser(*names: str) -> argparse.ArgumentParser:
    p = parser()
    for name in names:
        p = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return p.populated()


def actions_by_dest(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in p._actions}


def parsed_config(*argv: str) -> RunConfig:
    """`efftune train ARGV`'s run config, through the code path `efftune train` takes."""
    return cli.train_config(parser().parse_args(["train", *argv]))


def value_of(cfg: RunConfig, key: str):
    section, _, name = key.rpartition(".")
    return getattr(getattr(cfg, section) if section else cfg, name)


# key -> (flags that set it to `expected`, expected), each expected differing from the default
SETS = {
    "model": (["--model", "./some/model"], "./some/model"),
    "task": (["--task", "yesno,implicatures"], ["yesno", "implicatures"]),
    "data.path": (["--data", "train.jsonl"], "train.jsonl"),
    "data.eval_path": (["--eval-data", "ev.jsonl"], "ev.jsonl"),
    "data.split": (["--data-split", "test"], "test"),
    "data.eval_split": (["--eval-split", "validation"], "validation"),
    "data.columns": (["--data-columns", "prompt=question,completion=answer"], ["prompt=question", "completion=answer"]),
    "data.train_on": (["--data-train-on", "last_assistant"], "last_assistant"),
    "data.overflow": (["--data-overflow", "drop"], "drop"),
    "data.cache": (["--no-data-cache"], False),
    "eval_samples": (["--eval-samples", "0"], 0),
    "log": (["--log", "tensorboard"], ["tensorboard"]),
    "eval_size": (["--eval-size", "12"], 12),
    "method": (["--method", "ia3"], "ia3"),
    "output": (["--output", "runs/other"], "runs/other"),
    "chat_template": (["--chat-template"], True),
    "dtype": (["--dtype", "bf16"], "bf16"),
    "device": (["--device", "cpu"], "cpu"),
    "quantize": (["--quantize", "nf4"], "nf4"),
    "lora.r": (["--lora.r", "3"], 3),
    "lora.alpha": (["--lora.alpha", "7.5"], 7.5),
    "lora.dropout": (["--lora.dropout", "0.25"], 0.25),
    "lora.target_modules": (["--lora.target-modules", "q_proj,v_proj"], ["q_proj", "v_proj"]),
    "lora.use_rslora": (["--lora.use-rslora"], True),
    "lora.init": (["--lora.init", "gaussian"], "gaussian"),
    "lora.embeddings": (["--lora.embeddings", "embed_tokens"], ["embed_tokens"]),
    "lora.use_dora": (["--lora.use-dora"], True),
    "lora_fa.r": (["--lora-fa.r", "5"], 5),
    "lora_fa.alpha": (["--lora-fa.alpha", "3"], 3.0),
    "lora_fa.dropout": (["--lora-fa.dropout", "0.5"], 0.5),
    "lora_fa.target_modules": (["--lora-fa.target-modules", r"model\.layers\.0\..*"], r"model\.layers\.0\..*"),
    "lora_fa.use_rslora": (["--lora-fa.use-rslora"], True),
    "lora_fa.init": (["--lora-fa.init", "gaussian"], "gaussian"),
    "lora_fa.embeddings": (["--lora-fa.embeddings", "embed_tokens,lm_head"], ["embed_tokens", "lm_head"]),
    "lora_fa.use_dora": (["--lora-fa.use-dora"], True),  # parses; add_lora_fa refuses it
    "lora_fa.correction": (["--lora-fa.no-correction"], False),
    "lora_fa.delta": (["--lora-fa.delta", "0.001"], 0.001),
    "relora.restart_every": (["--relora.restart-every", "7"], 7),
    "relora.rewarmup_steps": (["--relora.rewarmup-steps", "3"], 3),
    "relora.optimizer_reset": (["--relora.optimizer-reset", "zero"], "zero"),
    "relora.prune_fraction": (["--relora.prune-fraction", "0.5"], 0.5),
    "relora.full_rank": (["--relora.full-rank", "lm_head"], ["lm_head"]),
    "relora.warm_start_steps": (["--relora.warm-start-steps", "4"], 4),
    "bitfit.target_modules": (["--bitfit.target-modules", "o_proj"], ["o_proj"]),
    "bitfit.norms": (["--bitfit.no-norms"], False),
    "bitfit.add_biases": (["--bitfit.add-biases"], True),
    "ia3.target_modules": (["--ia3.target-modules", "v_proj,down_proj"], ["v_proj", "down_proj"]),
    "ia3.feedforward_modules": (["--ia3.feedforward-modules", ""], []),
    "bottleneck.bottleneck_size": (["--bottleneck.bottleneck-size", "16"], 16),
    "bottleneck.placement": (["--bottleneck.placement", "pfeiffer"], "pfeiffer"),
    "bottleneck.activation": (["--bottleneck.activation", "gelu"], "gelu"),
    "bottleneck.attn_module": (["--bottleneck.attn-module", "attn"], "attn"),
    "bottleneck.ffn_module": (["--bottleneck.ffn-module", "feed_forward"], "feed_forward"),
    "prompt_tuning.num_virtual_tokens": (["--prompt-tuning.num-virtual-tokens", "4"], 4),
    "prompt_tuning.init": (["--prompt-tuning.init", "random"], "random"),
    "prompt_tuning.init_text": (["--prompt-tuning.init-text", "Answer yes or no"], "Answer yes or no"),
    "prompt_tuning.tasks": (["--prompt-tuning.tasks", "a,b"], ["a", "b"]),
    "prompt_tuning.init_from": (["--prompt-tuning.init-from", "runs/spot/adapter"], "runs/spot/adapter"),
    "prefix_tuning.num_virtual_tokens": (["--prefix-tuning.num-virtual-tokens", "6"], 6),
    "prefix_tuning.prefix_projection": (["--prefix-tuning.no-prefix-projection"], False),
    "prefix_tuning.projection_hidden_size": (["--prefix-tuning.projection-hidden-size", "48"], 48),
    "prefix_tuning.init": (["--prefix-tuning.init", "random"], "random"),
    "expert_lora.r": (["--expert-lora.r", "4"], 4),
    "expert_lora.alpha": (["--expert-lora.alpha", "8"], 8.0),
    "expert_lora.targets": (["--expert-lora.targets", "down_proj"], ["down_proj"]),
    "expert_lora.experts": (["--expert-lora.experts", "0, 3"], [0, 3]),
    "expert_lora.target_modules": (["--expert-lora.target-modules", "q_proj,o_proj"], ["q_proj", "o_proj"]),
    "expert_lora.use_rslora": (["--expert-lora.use-rslora"], True),
    "expert_lora.impl": (["--expert-lora.impl", "loop"], "loop"),
    "expert_lora.aux_loss": (["--expert-lora.no-aux-loss"], False),
    "esft.mode": (["--esft.mode", "lora"], "lora"),
    "esft.score": (["--esft.score", "token"], "token"),
    "esft.threshold": (["--esft.threshold", "0.5"], 0.5),
    "esft.top_fraction": (["--esft.top-fraction", "0.25"], 0.25),
    "esft.selection": (["--esft.selection", "experts.json"], "experts.json"),
    "esft.data": (["--esft.data", "affinity.jsonl"], "affinity.jsonl"),
    "esft.max_examples": (["--esft.max-examples", "32"], 32),
    "esft.r": (["--esft.r", "2"], 2),
    "esft.alpha": (["--esft.alpha", "4"], 4.0),
    "esft.impl": (["--esft.impl", "grouped_mm"], "grouped_mm"),
    "mixlora.num_experts": (["--mixlora.num-experts", "4"], 4),
    "mixlora.top_k": (["--mixlora.top-k", "1"], 1),
    "mixlora.r": (["--mixlora.r", "2"], 2),
    "mixlora.alpha": (["--mixlora.alpha", "4"], 4.0),
    "mixlora.dropout": (["--mixlora.dropout", "0.1"], 0.1),
    "mixlora.aux_loss_coef": (["--mixlora.aux-loss-coef", "0.02"], 0.02),
    "mixlora.z_loss_coef": (["--mixlora.z-loss-coef", "0.001"], 0.001),
    "mixlora.jitter": (["--mixlora.jitter", "0.01"], 0.01),
    "mixlora.attn_r": (["--mixlora.attn-r", "4"], 4),
    "mixlora.attn_alpha": (["--mixlora.attn-alpha", "8"], 8.0),
    "mixlora.attn_targets": (["--mixlora.attn-targets", ""], []),
    "mixlora.ffn_targets": (["--mixlora.ffn-targets", "up_proj"], ["up_proj"]),
    "mixlora.ffn_module": (["--mixlora.ffn-module", "feed_forward"], "feed_forward"),
    "mixlora.dense": (["--mixlora.dense"], True),
    "full.target_modules": (["--full.target-modules", "mlp"], ["mlp"]),
    "retention": (["--retention", "default"], ["default"]),
    "train.steps": (["--steps", "5"], 5),
    "train.batch_size": (["--batch-size", "8"], 8),
    "train.micro_batch_size": (["--micro-batch-size", "4"], 4),
    "train.lr": (["--lr", "3e-4"], 3e-4),
    "train.weight_decay": (["--weight-decay", "0.01"], 0.01),
    "train.warmup_steps": (["--warmup-steps", "2"], 2),
    "train.min_lr_ratio": (["--min-lr-ratio", "0"], 0.0),
    "train.grad_clip": (["--grad-clip", "0.5"], 0.5),
    "train.precision": (["--precision", "fp32"], "fp32"),
    "train.max_length": (["--max-length", "128"], 128),
    "train.activation_checkpointing": (["--activation-checkpointing"], True),
    "train.activation_checkpointing_fraction": (["--activation-checkpointing", "--activation-checkpointing-fraction",
                                                 "0.5"], 0.5),
    "train.compile": (["--compile"], True),
    "train.compile_memory_budget": (["--compile", "--compile-memory-budget", "0.5"], 0.5),
    "train.compile_lean": (["--no-compile-lean"], False),
    "train.cuda_graphs": (["--compile", "--cuda-graphs"], True),
    "train.compile_autotune": (["--compile", "--compile-autotune"], True),
    "train.fp8_base": (["--fp8-base"], True),
    "train.optimizer": (["--optimizer", "adamw8bit"], "adamw8bit"),
    "train.attention": (["--attention", "flash4"], "flash4"),
    "train.masked_attention": (["--masked-attention", "flex"], "flex"),
    "train.eval_every": (["--eval-every", "0"], 0),
    "train.save_every": (["--save-every", "5"], 5),
    "train.save_every_minutes": (["--save-every-minutes", "0"], 0.0),
    "train.keep_checkpoints": (["--keep-checkpoints", "5"], 5),
    "train.seed": (["--seed", "3"], 3),
    "train.distributed": (["--distributed", "fsdp"], "fsdp"),
}


DATA_FLAGS = {"path": "--data", "eval_path": "--eval-data", "eval_split": "--eval-split"}


def test_the_table_covers_every_config_key():
    assert set(SETS) == set(all_keys())


def test_every_config_key_has_a_flag():
    dests = actions_by_dest(subparser("train"))
    for key in all_keys():
        assert key in dests, f"config key {key!r} has no flag"
        options = dests[key].option_strings
        section, _, name = key.rpartition(".")
        expected = f"--{name}" if section in ("", "train") else f"--{section}.{name}"
        if section == "data":  # the names these keys had before the data section
            expected = DATA_FLAGS.get(name, f"--data-{name}")
        assert expected.replace("_", "-") in options, (key, options)


@pytest.mark.parametrize("key", sorted(SETS))
def test_a_flag_sets_its_key(key):
    argv, expected = SETS[key]
    default = all_keys()[key][1]
    assert expected != default  # the row tests something
    cfg = parsed_config(*argv)
    assert value_of(cfg, key) == expected
    assert type(value_of(cfg, key)) is type(expected)
    # ... and nothing else but what the other flags given name (--compile with --cuda-graphs)
    plain = load_config(None)
    named = {a for a in argv if a.startswith("--")}
    for other in all_keys():
        if other == key or any(o in named for o in train_actions()[other].option_strings):
            continue
        if other == "esft.threshold" and key == "esft.top_fraction":
            assert value_of(cfg, other) is None  # a top fraction replaces the threshold's own default
        else:
            assert value_of(cfg, other) == value_of(plain, other), other


def test_no_flag_keeps_every_default():
    cfg = parsed_config()
    assert cfg == load_config(None)
    assert cfg.train == TrainConfig() and cfg.lora == LoraConfig()


def test_help_names_key_and_default():
    actions = actions_by_dest(subparser("train"))
    shown = {None: "none", True: "true", False: "false"}
    for key, (_, default) in all_keys().items():
        text = actions[key].help
        if isinstance(default, list):
            want = ",".join(default) if default else "empty"
        elif isinstance(default, bool) or default is None:
            want = shown[default]
        else:
            want = str(default)
        assert text.endswith(f"[{key}; default: {want}]"), (key, text)
        assert len(text) > len(f"[{key}; default: {want}]") + 10, f"{key}: help says nothing but key and default"
    assert actions["train.steps"].help == "optimizer steps [train.steps; default: 60]"
    assert actions["lora.r"].help == "LoRA rank r [lora.r; default: 8]"
    assert actions["esft.threshold"].help.endswith("[esft.threshold; default: none]")


def test_help_is_grouped_by_section():
    text = subparser("train").format_help()
    titles = ["the run:", "your data (data.*):", "training (train.*):", "LoRA (lora.*):", "LoRA-FA (lora_fa.*):",
              "ReLoRA (relora.*):",
              "BitFit (bitfit.*):", "IA3 (ia3.*):", "bottleneck adapters (bottleneck.*):",
              "prompt tuning (prompt_tuning.*):", "prefix tuning (prefix_tuning.*):",
              "expert LoRA (expert_lora.*):", "ESFT (esft.*):", "MixLoRA (mixlora.*):"]
    positions = [text.index(f"\n{t}\n") for t in titles]
    assert positions == sorted(positions)
    # each flag sits under its section's title
    mixlora = text[text.index("\nMixLoRA (mixlora.*):\n"):]
    assert "--mixlora.num-experts N" in mixlora and "--steps N" not in mixlora


# the flags of `efftune train` before the table was generated, with the key each set
OLD_FLAGS = [
    (["--model", "m"], "model", "m"), (["--task", "a,b"], "task", ["a", "b"]), (["--data", "d"], "data.path", "d"),
    (["--eval-data", "e"], "data.eval_path", "e"), (["--eval-size", "3"], "eval_size", 3),
    (["--method", "bitfit"], "method", "bitfit"), (["--output", "o"], "output", "o"),
    (["--chat-template"], "chat_template", True), (["--dtype", "fp16"], "dtype", "fp16"),
    (["--device", "cpu"], "device", "cpu"), (["--rank", "4"], "lora.r", 4), (["--alpha", "2"], "lora.alpha", 2.0),
    (["--dropout", "0.1"], "lora.dropout", 0.1), (["--target-modules", "q_proj"], "lora.target_modules", ["q_proj"]),
    (["--target-modules", "all-linear"], "lora.target_modules", "all-linear"),
    (["--target-modules", r".*\.(q|v)_proj"], "lora.target_modules", r".*\.(q|v)_proj"),
    (["--rslora"], "lora.use_rslora", True), (["--no-fa-correction"], "lora_fa.correction", False),
    (["--restart-every", "9"], "relora.restart_every", 9), (["--steps", "2"], "train.steps", 2),
    (["--batch-size", "4"], "train.batch_size", 4), (["--micro-batch-size", "2"], "train.micro_batch_size", 2),
    (["--lr", "0.5"], "train.lr", 0.5), (["--warmup-steps", "1"], "train.warmup_steps", 1),
    (["--max-length", "64"], "train.max_length", 64), (["--precision", "bf16"], "train.precision", "bf16"),
    (["--activation-checkpointing"], "train.activation_checkpointing", True), (["--compile"], "train.compile", True),
    (["--compile", "--compile-memory-budget", "0.3"], "train.compile_memory_budget", 0.3),
    (["--compile-speed-first"], "train.compile_lean", False),
    (["--compile", "--compile-autotune"], "train.compile_autotune", True),
    (["--compile", "--cuda-graphs"], "train.cuda_graphs", True), (["--fp8-base"], "train.fp8_base", True),
    (["--attention", "flash4"], "train.attention", "flash4"),
    (["--masked-attention", "flex"], "train.masked_attention", "flex"),
    (["--eval-every", "3"], "train.eval_every", 3), (["--save-every", "3"], "train.save_every", 3),
    (["--save-every-minutes", "2.5"], "train.save_every_minutes", 2.5), (["--seed", "1"], "train.seed", 1),
]


@pytest.mark.parametrize("argv, key, expected", OLD_FLAGS, ids=[" ".join(a[0]) for a in OLD_FLAGS])
def test_old_flag_names_still_work(argv, key, expected):
    assert value_of(parsed_config(*argv), key) == expected


def test_lora_aliases_follow_the_method_and_dotted_flags_do_not():
    cfg = parsed_config("--method", "lora-fa", "--rank", "4", "--alpha", "2", "--dropout", "0.1",
                        "--target-modules", "q_proj", "--rslora")
    assert (cfg.lora_fa.r, cfg.lora_fa.alpha, cfg.lora_fa.dropout) == (4, 2.0, 0.1)
    assert cfg.lora_fa.target_modules == ["q_proj"] and cfg.lora_fa.use_rslora is True
    assert cfg.lora == LoraConfig()
    cfg = parsed_config("--method", "lora-fa", "--lora.r", "4", "--lora-fa.r", "6")
    assert cfg.lora.r == 4 and cfg.lora_fa.r == 6
    cfg = parsed_config("--rank", "4", "--lora.r", "5", "--method", "lora-fa")  # the last flag given wins
    assert cfg.lora.r == 5 and cfg.lora_fa.r == 8


def test_flags_override_the_config_file_both_ways(tmp_path):
    (tmp_path / "run.yaml").write_text("train: {compile: true, compile_memory_budget: 0.4, steps: 9}\n"
                                       "expert_lora: {experts: [1, 2]}\nmixlora: {dense: true}\n")
    cfg = parsed_config("--config", str(tmp_path / "run.yaml"), "--no-compile", "--compile-memory-budget", "none",
                        "--expert-lora.experts", "none", "--mixlora.no-dense")
    assert cfg.train.compile is False and cfg.train.compile_memory_budget is None and cfg.train.steps == 9
    assert cfg.expert_lora.experts is None and cfg.mixlora.dense is False


# ---- hub build: the same table for its training part -------------------------------------------------------

def build_call(monkeypatch, *argv: str) -> dict:
    """What `efftune hub build ARGV` hands build_library."""
    import efftune.compose.library
    seen = {}

    def fake_build_library(model, tasks, output, lora_cfg, train_cfg, **kw):
        seen.update(model=model, tasks=tasks, output=output, lora=lora_cfg, train=train_cfg, **kw)
        return {"built": []}
    monkeypatch.setattr(efftune.compose.library, "build_library", fake_build_library)
    assert main(["hub", "build", "--tasks", "a,b", "--output", "lib", *argv]) == 0
    return seen


def test_hub_build_defaults_are_the_dataclasses(monkeypatch, capsys):
    seen = build_call(monkeypatch)
    assert seen["lora"] == LoraConfig() and seen["train"] == TrainConfig()
    assert seen["eval_size"] is None and seen["together"] == 1 and seen["tasks"] == ["a", "b"]
    assert (seen["model"], seen["dtype"], seen["device"], seen["chat_template"]) == ("default", "auto", "auto", False)


def test_hub_build_takes_train_and_lora_flags(monkeypatch, capsys):
    seen = build_call(monkeypatch, "--r", "2", "--lora.init", "gaussian", "--target-modules", "q_proj,v_proj",
                      "--steps", "3", "--weight-decay", "0.1", "--grad-clip", "0", "--keep-checkpoints", "4",
                      "--compile", "--eval-size", "0", "--together", "2", "--device", "cpu")
    assert seen["lora"] == LoraConfig(r=2, init="gaussian", target_modules=["q_proj", "v_proj"])
    assert seen["train"] == TrainConfig(steps=3, weight_decay=0.1, grad_clip=0.0, keep_checkpoints=4, compile=True)
    assert seen["eval_size"] == 0 and seen["together"] == 2 and seen["device"] == "cpu"


def test_hub_build_has_a_flag_for_every_lora_and_train_key():
    dests = actions_by_dest(subparser("hub", "build"))
    lora = {f"lora.{f.name}" for f in dataclasses.fields(LoraConfig)}
    train = {f"train.{f.name}" for f in dataclasses.fields(TrainConfig)} - {"train.eval_every"}  # a build: before/after
    assert lora | train | {"eval_size", "model", "dtype", "device", "chat_template"} <= set(dests)
    assert "train.eval_every" not in dests and "method" not in dests and "mixlora.r" not in dests
    assert dests["train.steps"].help == "optimizer steps per module [train.steps; default: 60]"


# ---- bad values: one line naming the flag (a value of the wrong type) or the key (out of range) -------------

@pytest.mark.parametrize("argv, culprit", [
    (["train", "--steps", "ten"], "argument --steps: invalid int value: 'ten'"),
    (["train", "--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    (["train", "--expert-lora.experts", "1,x"], "argument --expert-lora.experts: expected comma-separated "
                                                "integers, got '1,x'"),
    (["train", "--compile-memory-budget", "most"], "argument --compile-memory-budget: invalid float value: "
                                                   "'most' (or none)"),
    (["train", "--weight-decay", "-1"], "train.weight_decay must be 0 or a positive finite number, got -1.0"),
    (["train", "--min-lr-ratio", "2"], "train.min_lr_ratio must be in [0, 1], got 2.0"),
    (["train", "--keep-checkpoints", "0"], "train.keep_checkpoints must be at least 1, got 0"),
    (["train", "--mixlora.top-k", "9"], "mixlora.top_k (9) exceeds mixlora.num_experts (8)"),
    (["train", "--lora-fa.delta", "-1"], "lora_fa.delta must be >= 0, got -1.0"),
    (["train", "--cuda-graphs"], "train.cuda_graphs needs train.compile: true"),
    (["train", "--rank", "0", "--method", "lora-fa"], "lora_fa.r must be a positive integer, got 0"),
    (["hub", "build", "--tasks", "a", "--output", "lib", "--grad-clip", "-1"],
     "train.grad_clip must be 0 or a positive finite number, got -1.0"),
    (["hub", "build", "--tasks", "a", "--output", "lib", "--eval-every", "3"],
     "unrecognized arguments: --eval-every 3"),
])
def test_bad_values_name_the_flag_or_key(argv, culprit, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written: checked below
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("efftune: error: ") and culprit in err, err
    assert list(tmp_path.iterdir()) == []


# ---- end to end: keys that had no flag before reach a run ------------------------------------------------

@pytest.fixture
def data_file(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"Q: {i} + 1?", "completion": f" {i + 1}"}) + "\n" for i in range(12)))
    return p


def run(capsys, *args):
    code = main(list(map(str, args)))
    out, err = capsys.readouterr()
    return code, out, err


def test_method_options_and_training_keys_from_flags(capsys, model_dir, data_file, tmp_path):
    # keys that had no flag before the table was generated from the config dataclasses
    out_dir = tmp_path / "mix"
    code, out, err = run(capsys, "train", "--model", model_dir, "--data", data_file, "--method", "mixlora",
                         "--mixlora.num-experts", 3, "--mixlora.top-k", 1, "--mixlora.r", 2,
                         "--mixlora.attn-targets", "", "--steps", 3, "--batch-size", 4, "--save-every", 1,
                         "--keep-checkpoints", 1, "--weight-decay", 0.1, "--grad-clip", 0.5, "--min-lr-ratio", 0,
                         "--eval-every", 0, "--output", out_dir)
    assert code == 0, err
    saved = json.loads((out_dir / "config.json").read_text())
    assert {k: saved["mixlora"][k] for k in ("num_experts", "top_k", "r", "attn_targets")} == \
        {"num_experts": 3, "top_k": 1, "r": 2, "attn_targets": []}
    assert (saved["train"]["keep_checkpoints"], saved["train"]["weight_decay"], saved["train"]["grad_clip"],
            saved["train"]["min_lr_ratio"]) == (1, 0.1, 0.5, 0.0)
    assert sorted(p.name for p in (out_dir / "checkpoints").glob("step-*")) == ["step-000003"]  # one kept
    adapter = json.loads((out_dir / "adapter" / "mixlora_config.json").read_text())
    assert adapter["num_experts"] == 3 and adapter["top_k"] == 1 and adapter["r"] == 2

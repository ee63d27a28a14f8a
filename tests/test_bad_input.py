"""Every bad input is answered in one line (issue 21, sections 3-4): one row per case.

Each row runs the command line in this process (`efftune.cli.main`) on a tiny random-init model
saved to a temporary directory and tiny JSONL files (no network, never the real default model),
and checks that the command
  - exits with status 2,
  - prints exactly one `efftune: error:` line, as the last line of stderr, naming the culprit (the
    file, line, field, flag or key the row gives), and no traceback or other error text (progress
    bars and log lines of what happened before may come first),
  - prints nothing on stdout (no summary of a run that did not happen),
  - changes nothing on disk: the row's workspace (its inputs and its output paths) and the shared
    model and adapter directories hash the same before and after.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from efftune.cli import main
from efftune.methods.ia3 import IA3Config
from efftune.methods.lora.config import LoraConfig
from efftune.methods.lora.model import add_lora
from efftune.methods.lora.peft_format import save_adapter
from efftune.methods.registry import get_method
from tests.conftest import make_tokenizer, randomize_lora, tiny_llama
from tests.data.test_bigbench import fake_bigbench  # noqa: F401  (fixture: a small fake BIG-bench sdist)

MC_ROWS = [{"input": f"Q: Is {w} blue?", "choices": ["yes", "no"], "answer": int(w != "sky")}
           for w in ["sky", "grass", "fox", "dog"] * 6]  # 24 rows
GOOD = "".join(json.dumps(r) + "\n" for r in MC_ROWS)


class NetworkUsed(BaseException):
    """Raised by a socket call: not an Exception, so no library's retry loop swallows it."""


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """A bad input is refused without the network: a path-like --model that does not exist must
    not be looked up on the hub (it used to spend 52 s retrying)."""
    def refuse(*args, **kwargs):
        raise NetworkUsed(f"a bad input reached for the network: {args[:2]}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    """train() draws training.png at every checkpoint; matplotlib is most of a tiny run's time."""
    monkeypatch.setattr("efftune.train.loop.plot_metrics", lambda rows, path: path)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """What rows read but never write: a tiny model, its adapters, a finished run with checkpoints."""
    root = tmp_path_factory.mktemp("shared")
    model_dir = root / "model"
    tiny_llama().save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    m = tiny_llama()
    add_lora(m, LoraConfig(r=4, alpha=8))
    randomize_lora(m)
    save_adapter(m, root / "adapter", LoraConfig(r=4, alpha=8))
    m = tiny_llama()
    add_lora(m, LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    save_adapter(m, root / "adapter_qv", LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    wide = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    add_lora(wide, LoraConfig(r=4, alpha=8))
    save_adapter(wide, root / "adapter_wide", LoraConfig(r=4, alpha=8))  # made for another base model
    ia3 = get_method("ia3")
    m = tiny_llama()
    ia3.attach(m, IA3Config(), tokenizer=None)
    ia3.save(m, root / "adapter_ia3", IA3Config(), metadata={})
    (root / "train.jsonl").write_text(GOOD)
    run = root / "run"
    code = main(["train", "--model", str(model_dir), "--data", str(root / "train.jsonl"), "--steps", "2",
                 "--batch-size", "2", "--save-every", "1", "--eval-size", "0", "--rank", "2", "--output", str(run)])
    assert code == 0 and (run / "checkpoints" / "latest").is_file()
    return root


@dataclass
class Ctx:
    """A row's workspace `ws` (hashed before and after) and the shared directories."""
    ws: Path
    shared: Path

    @property
    def model(self) -> str:
        return str(self.shared / "model")

    @property
    def data(self) -> str:
        return str(self.shared / "train.jsonl")

    def out(self, name: str = "out") -> str:
        return str(self.ws / name)

    def file(self, name: str, content: str | bytes) -> str:
        p = self.ws / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content.encode() if isinstance(content, str) else content)
        return str(p)

    def copy(self, what: str) -> Path:
        """A copy of a shared directory in the workspace, to break it there."""
        return Path(shutil.copytree(self.shared / what, self.ws / what))

    def train(self, *extra: str, data: str | None = None, out: str | None = None) -> list[str]:
        """A small `efftune train` call that would succeed but for `extra`."""
        return ["train", "--model", self.model, "--data", data or self.data, "--steps", "1", "--batch-size", "2",
                "--eval-size", "2", "--output", out or self.out(), *extra]

    def adapter_copy(self, what: str = "adapter") -> Path:
        return self.copy(what)


def resume_args(c: Ctx, run: Path) -> list[str]:
    """Resuming the shared run's copy `run` with the arguments that made it."""
    return ["train", "--model", c.model, "--data", c.data, "--steps", "2", "--batch-size", "2", "--save-every", "1",
            "--eval-size", "0", "--rank", "2", "--output", str(run), "--resume"]


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def torn(path: Path) -> Path:
    """`path`'s directory, with `path` cut in half (as a crash mid-write leaves a file)."""
    truncate(path)
    return path.parent


def with_config(c: Ctx, name: str, change: Callable[[dict], None]) -> Path:
    d = c.adapter_copy()
    cfg = json.loads((d / "adapter_config.json").read_text())
    change(cfg)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


def rank_four_tensors_config_eight(c: Ctx) -> Path:
    return with_config(c, "adapter", lambda cfg: cfg.update(r=8))  # the tensors are rank 4


def empty_dir(c: Ctx) -> str:
    (c.ws / "empty").mkdir()
    return str(c.ws / "empty")


def model_dir_without(c: Ctx, *names: str) -> str:
    d = c.copy("model")
    for n in names:
        (d / n).unlink()
    return str(d)


def corrupt_weights_model(c: Ctx) -> str:
    d = c.copy("model")
    truncate(d / "model.safetensors", 0.3)
    return str(d)


def unwritable_output(c: Ctx) -> str:
    """A directory this process cannot create: a read-only parent (or, for root, who may write
    anywhere on disk, a path under /sys, where no process may create entries)."""
    if os.geteuid() == 0:
        return "/sys/efftune-bad-input-test/run"
    locked = c.ws / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    return str(locked / "run")


BAD_JSONL = {  # name -> (content, culprit besides the file name)
    "not_utf8": (b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff\xfe", "completion": "b"}\n', "offset 47"),
    "not_json": ('{"prompt": "a", "completion": "b"}\n{"prompt": "a",\n', "not valid JSON"),
    "missing_field": ('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', "'completion'"),
    "empty_completion": ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": ""}\n', "'completion'"),
    "empty_choice": ('{"prompt": "a", "completion": "b"}\n{"input": "a", "choices": ["", "x"], "answer": 1}\n',
                     "'choices'"),
    "answer_not_a_choice": ('{"prompt": "a", "completion": "b"}\n{"input": "a", "choices": ["x", "y"], '
                            '"answer": "z"}\n', "'answer'"),
    "not_an_object": ('{"prompt": "a", "completion": "b"}\n[1, 2]\n', "JSON object"),
    "chat_unknown_role": ('{"prompt": "a", "completion": "b"}\n{"messages": [{"role": "bot", "content": "x"}]}\n',
                          "messages[0].role: unknown role 'bot'"),
    "chat_empty": ('{"prompt": "a", "completion": "b"}\n{"messages": []}\n', "'messages' is an empty conversation"),
    "chat_content_not_a_string": ('{"prompt": "a", "completion": "b"}\n{"conversations": [{"from": "human", '
                                  '"value": 3}]}\n', "conversations[0].value must be a string"),
}


def jsonl_row(kind: str):
    content, culprit = BAD_JSONL[kind]

    def setup(c: Ctx):
        return c.train(data=c.file("bad.jsonl", content)), ("bad.jsonl:2", culprit)
    return pytest.param(setup, id=f"train-jsonl-{kind}")


def row(id: str, setup: Callable[[Ctx], tuple[list[str], str | tuple[str, ...]]]):
    return pytest.param(setup, id=id)


def yaml_config(text: str | bytes):
    return lambda c: (["train", "--config", c.file("run.yaml", text), "--data", c.data, "--model", c.model,
                       "--output", c.out()], "run.yaml")


ROWS = [
    # -- data files -----------------------------------------------------------------------------------
    *[jsonl_row(kind) for kind in BAD_JSONL],
    row("train-jsonl-empty", lambda c: (c.train(data=c.file("empty.jsonl", "\n\n")), ("empty.jsonl", "no rows"))),
    row("train-data-is-a-directory", lambda c: (c.train(data=str(c.ws)), (str(c.ws), "is a directory"))),
    row("train-data-missing", lambda c: (c.train(data=c.out("none.jsonl")), ("none.jsonl", "does not exist"))),
    row("train-eval-data-bad-row", lambda c: (c.train("--eval-data", c.file("ev.jsonl", '{"input": "x"}\n')),
                                              "ev.jsonl:1")),
    row("max-length-one", lambda c: (c.train("--max-length", "1"), "max_length")),
    row("data-columns-column-twice", lambda c: (c.train("--data-columns", "prompt=q,completion=q"),
                                                ("data.columns", "'q' is named twice"))),
    row("chat-data-without-a-chat-template", lambda c: (c.train(data=c.file("chat.jsonl", 4 * (json.dumps(
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) + "\n"))),
        ("chat.jsonl:", "chat template"))),
    # -- the model ------------------------------------------------------------------------------------
    row("model-random-bytes-gguf", lambda c: (["generate", "--model", c.file("x.gguf", os.urandom(4096)), "hi"],
                                              ("x.gguf", "not a GGUF file"))),
    row("model-torn-gguf", lambda c: (["generate", "--model", c.file("t.gguf", b"GGUF\x03\x00\x00\x00torn"), "hi"],
                                      "t.gguf")),
    row("model-gguf-missing", lambda c: (["generate", "--model", c.out("nope.gguf"), "hi"], "nope.gguf")),
    row("model-empty-directory", lambda c: (c.train("--model", empty_dir(c)), ("empty", "config.json"))),
    row("model-without-tokenizer", lambda c: (["generate", "--model", model_dir_without(
        c, "tokenizer.json", "tokenizer_config.json"), "hi"], "tokenizer")),
    row("model-without-weights", lambda c: (["generate", "--model", model_dir_without(c, "model.safetensors"), "hi"],
                                            "weights")),
    row("model-torn-weights", lambda c: (["generate", "--model", corrupt_weights_model(c), "hi"], "model")),
    row("model-relative-path-missing", lambda c: (["generate", "--model", "./no-such-model-dir", "hi"],
                                                  "./no-such-model-dir")),
    row("model-home-path-missing", lambda c: (["generate", "--model", "~/no-such-efftune-model", "hi"],
                                              "~/no-such-efftune-model")),
    row("model-nested-path-missing", lambda c: (["generate", "--model", "runs/x/no-such-model", "hi"],
                                                "runs/x/no-such-model")),
    pytest.param(lambda c: (c.train("--device", "cuda"), "'cuda'"), id="device-cuda-without-a-gpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
    row("device-cuda-99", lambda c: (c.train("--device", "cuda:99"), "cuda:99")),
    row("device-unknown", lambda c: (c.train("--device", "gpu"), "'gpu'")),
    row("dtype-unknown", lambda c: (c.train("--dtype", "fp8"), ("dtype", "'fp8'"))),
    row("chat-template-missing", lambda c: (c.train("--chat-template"), "chat template")),
    # -- training flags -------------------------------------------------------------------------------
    row("target-regex-does-not-compile", lambda c: (c.train("--target-modules", "q_proj("), ("target_modules",
                                                                                            "q_proj("))),
    row("target-matches-nothing", lambda c: (c.train("--target-modules", "nosuch_proj"), ("nosuch_proj",
                                                                                          "q_proj"))),
    row("eval-size-negative", lambda c: (c.train("--eval-size", "-5"), "eval_size")),
    row("eval-size-larger-than-the-data", lambda c: (c.train("--eval-size", "500"), ("eval_size", "train.jsonl"))),
    row("rank-above-the-layer", lambda c: (c.train("--rank", "1000"), ("r=1000", "k_proj", "32 in, 16 out"))),
    row("save-every-negative", lambda c: (c.train("--save-every", "-1"), "save_every")),
    row("eval-every-negative", lambda c: (c.train("--eval-every", "-1"), "eval_every")),
    row("warmup-negative", lambda c: (c.train("--warmup-steps", "-1"), "warmup_steps")),
    row("steps-zero", lambda c: (c.train("--steps", "0"), "steps")),
    row("checkpointing-fraction-zero", lambda c: (c.train("--activation-checkpointing",
                                                          "--activation-checkpointing-fraction", "0"),
                                                  "activation_checkpointing_fraction")),
    row("checkpointing-fraction-without-checkpointing", lambda c: (
        c.train("--activation-checkpointing-fraction", "0.5"), "activation_checkpointing_fraction")),
    row("memory-budget-with-checkpointing", lambda c: (
        c.train("--compile", "--compile-memory-budget", "0.5", "--activation-checkpointing"),
        ("compile_memory_budget", "activation_checkpointing"))),
    row("lr-zero", lambda c: (c.train("--lr", "0"), "lr")),
    row("lr-infinite", lambda c: (c.train("--lr", "inf"), "lr")),
    row("micro-batch-does-not-divide", lambda c: (c.train("--micro-batch-size", "3"), "micro_batch_size")),
    row("precision-unknown", lambda c: (c.train("--precision", "fp64"), "precision")),
    row("seed-negative", lambda c: (c.train("--seed", "-1"), "seed")),
    row("dropout-out-of-range", lambda c: (c.train("--dropout", "1.5"), "dropout")),
    row("method-unknown", lambda c: (c.train("--method", "qlora"), "'qlora'")),
    row("flag-not-an-int", lambda c: (c.train("--steps", "ten"), ("--steps", "'ten'"))),
    row("flag-list-not-ints", lambda c: (c.train("--expert-lora.experts", "1,x"), ("--expert-lora.experts",
                                                                                    "'1,x'"))),
    row("weight-decay-negative", lambda c: (c.train("--weight-decay", "-1"), "train.weight_decay")),
    row("method-option-out-of-range", lambda c: (c.train("--method", "mixlora", "--mixlora.top-k", "9"),
                                                 ("mixlora.top_k", "mixlora.num_experts"))),
    row("lora-fa-rank-zero", lambda c: (c.train("--method", "lora-fa", "--rank", "0"), "lora_fa.r")),
    row("flag-unknown", lambda c: (c.train("--nosuch-flag", "1"), ("--nosuch-flag", "efftune train --help"))),
    row("flag-misspelled", lambda c: (c.train("--stpes", "5"), ("--stpes", "did you mean --steps?"))),
    # -- full fine-tuning, optimizers and retention panels (issue 26) ----------------------------------
    row("full-with-fp8-base", lambda c: (c.train("--method", "full", "--fp8-base"), ("method full", "fp8_base"))),
    row("full-target-matches-nothing", lambda c: (c.train("--method", "full", "--full.target-modules", "nosuch"),
                                                  "nosuch")),
    row("optimizer-unknown", lambda c: (c.train("--optimizer", "sgd"), ("train.optimizer", "'sgd'"))),
    row("retention-holds-a-trained-task", lambda c: (["train", "--model", c.model, "--task", "yesno", "--retention",
                                                      "gen,yesno", "--output", c.out()], ("yesno", "trains on"))),
    row("retention-task-missing", lambda c: (c.train("--retention", "gen,nosuch"), ("retention", "'nosuch'"))),
    row("eval-retention-task-missing", lambda c: (["eval", "--model", c.model, "--retention", "nosuch"],
                                                  ("retention", "'nosuch'"))),
    # -- config files ---------------------------------------------------------------------------------
    row("config-unknown-key", lambda c: (yaml_config("train:\n  stepz: 3\n")(c)[0], ("train.stepz", "steps"))),
    row("config-wrong-type", lambda c: (yaml_config("train:\n  steps: many\n")(c)[0], ("train.steps", "'many'"))),
    row("config-not-yaml", lambda c: (yaml_config("train: [1, 2\n")(c)[0], ("run.yaml", "line"))),
    row("config-not-a-mapping", lambda c: (yaml_config("- 1\n- 2\n")(c)[0], "run.yaml")),
    row("config-section-not-a-mapping", lambda c: (yaml_config("train: 5\n")(c)[0], "train")),
    row("config-not-utf8", lambda c: (yaml_config(b"model: \xff\n")(c)[0], "run.yaml")),
    row("config-missing", lambda c: (["train", "--config", c.out("none.yaml")], "none.yaml")),
    row("config-is-a-directory", lambda c: (["train", "--config", str(c.ws)], "is a directory")),
    # -- the output directory -------------------------------------------------------------------------
    row("output-is-a-file", lambda c: (c.train(out=c.file("taken", "mine")), ("taken", "file"))),
    row("output-under-a-file", lambda c: (c.train(out=str(Path(c.file("taken", "mine")) / "run")), "taken")),
    row("output-not-writable", lambda c: (c.train(out=unwritable_output(c)), "efftune-bad-input-test"
                                          if os.geteuid() == 0 else "locked")),
    row("output-holds-a-run", lambda c: (c.train(out=str(c.copy("run"))), ("run", "--overwrite"))),
    # -- checkpoints ----------------------------------------------------------------------------------
    row("resume-without-checkpoints", lambda c: (c.train("--resume"), "--resume")),
    *[row(f"checkpoint-torn-{name.split('.')[0]}",
          lambda c, name=name: (resume_args(c, broken_checkpoint(c, name)), name))
      for name in ("trainable.safetensors", "optimizer.safetensors", "state.json")],
    row("checkpoint-incomplete", lambda c: (resume_args(c, broken_checkpoint(c, "rng.safetensors", delete=True)),
                                            ("incomplete", "rng.safetensors"))),
    # -- eval / generate ------------------------------------------------------------------------------
    row("eval-needs-task-or-data", lambda c: (["eval", "--model", c.model], "--task")),
    row("eval-task-unknown", lambda c: (["eval", "--model", c.model, "--task", "yesnoo"], ("yesnoo", "yesno"))),
    row("eval-task-misspelled", lambda c: (["eval", "--model", c.model, "--task", "yesmo"], ("yesmo", "yesno"))),
    row("eval-task-eval-size-negative", lambda c: (["eval", "--model", c.model, "--task", "yesno",
                                                    "--eval-size", "-5"], "eval_size")),
    row("eval-task-eval-size-too-big", lambda c: (["eval", "--model", c.model, "--task", "yesno",
                                                   "--eval-size", "11"], ("eval_size", "yesno"))),
    row("eval-data-bad-row", lambda c: (["eval", "--model", c.model, "--data", c.file("e.jsonl", "{}\n")],
                                        "e.jsonl:1")),
    row("adapter-missing", lambda c: (["eval", "--model", c.model, "--data", c.data, "--adapter", c.out("nope")],
                                      "nope")),
    row("adapter-is-a-file", lambda c: (["eval", "--model", c.model, "--data", c.data, "--adapter", c.data],
                                        "train.jsonl")),
    row("adapter-torn-safetensors", lambda c: (["eval", "--model", c.model, "--data", c.data, "--adapter",
                                                str(broken_adapter(c, "torn"))], "adapter_model.safetensors")),
    row("adapter-garbage-safetensors", lambda c: (["eval", "--model", c.model, "--data", c.data, "--adapter",
                                                   str(broken_adapter(c, "garbage"))], "adapter_model.safetensors")),
    row("adapter-config-not-json", lambda c: (["eval", "--model", c.model, "--data", c.data, "--adapter",
                                               str(broken_adapter(c, "config"))], "adapter_config.json")),
    row("adapter-config-rank-8-tensors-rank-4", lambda c: (["eval", "--model", c.model, "--data", c.data, "--adapter",
                                                            str(rank_four_tensors_config_eight(c))], ("r=8", "rank 4"))),
    row("adapter-config-field-wrong-type", lambda c: (["eval", "--model", c.model, "--data", c.data, "--adapter",
                                                       str(with_config(c, "adapter", lambda cfg: cfg.update(
                                                           lora_alpha="big")))], "lora_alpha")),
    row("adapter-for-another-model", lambda c: (["eval", "--model", c.model, "--data", c.data, "--adapter",
                                                 str(c.copy("adapter_wide"))], ("lora_A.weight", "(4, 48)"))),
    row("adapter-ia3-torn", lambda c: (["eval", "--model", c.model, "--data", c.data, "--adapter",
                                        str(torn(c.copy("adapter_ia3") / "adapter_model.safetensors"))],
                                       "adapter_ia3/adapter_model.safetensors")),
    row("adapter-key-not-lora", lambda c: (["eval", "--model", c.model, "--data", c.data, "--adapter",
                                            str(broken_adapter(c, "extra_key"))], "up_proj.weight")),
    row("generate-max-new-tokens-zero", lambda c: (["generate", "--model", c.model, "--max-new-tokens", "0", "hi"],
                                                   "--max-new-tokens")),
    # -- merge ----------------------------------------------------------------------------------------
    row("merge-weights-not-numbers", lambda c: (merge_args(c, "--weights", "a,b"), ("--weights", "'a'"))),
    row("merge-weights-count", lambda c: (merge_args(c, "--weights", "1,2,3"), ("--weights", "3", "2 adapter"))),
    row("merge-weights-nan", lambda c: (merge_args(c, "--weights", "1,nan"), "'nan'")),
    row("merge-adapter-missing", lambda c: (["merge", "--model", c.model, "--adapters", c.out("gone"),
                                             "--output", c.out("merged")], "gone")),
    row("merge-density", lambda c: (merge_args(c, "--combine", "ties", "--density", "2"), "density")),
    row("merge-rank-above-the-layer", lambda c: (merge_args(c, "--rank", "1000"), "r=1000")),
    row("merge-combine-unknown", lambda c: (merge_args(c, "--combine", "mean"), "--combine")),
    row("merge-output-is-a-file", lambda c: (merge_args(c, out=c.file("taken", "mine")), "taken")),
    row("merge-output-not-empty", lambda c: (merge_args(c, out=str(Path(c.file("full/keep.txt", "mine")).parent)),
                                             ("full", "--overwrite"))),
    # -- hub compose / build / tasks ------------------------------------------------------------------
    row("compose-library-missing", lambda c: (compose_args(c, lib=c.out("nolib")), "nolib")),
    row("compose-needs-task-or-examples", lambda c: (["hub", "compose", "--model", c.model, "--library",
                                                      str(library(c)), "--output", c.out("hub")], "--task")),
    row("compose-examples-bad-row", lambda c: (compose_args(c, examples=c.file("shots.jsonl", "[]\n")),
                                               "shots.jsonl:1")),
    row("compose-budget-zero", lambda c: (compose_args(c, "--budget", "0"), "budget")),
    row("compose-shots-zero", lambda c: (compose_args(c, "--task", "yesno", "--shots", "0", examples=None),
                                         "--shots")),
    row("compose-output-is-a-file", lambda c: (compose_args(c, out=c.file("taken", "mine")), "taken")),
    row("compose-output-not-empty", lambda c: (compose_args(c, out=str(Path(c.file("full/keep.txt", "m")).parent)),
                                               ("full", "--overwrite"))),
    row("build-task-unknown", lambda c: (["hub", "build", "--model", c.model, "--tasks", "yesnoo", "--output",
                                          c.out("lib")], ("yesnoo", "yesno"))),
    row("build-together-zero", lambda c: (["hub", "build", "--model", c.model, "--tasks", c.data, "--together", "0",
                                           "--output", c.out("lib")], "together")),
    row("build-tasks-file-missing", lambda c: (["hub", "build", "--model", c.model, "--tasks-file", c.out("t.txt"),
                                                "--output", c.out("lib")], "t.txt")),
    row("build-task-file-bad-row", lambda c: (["hub", "build", "--model", c.model, "--tasks",
                                               c.file("t.jsonl", '{"prompt": 1, "completion": "x"}\n'),
                                               "--output", c.out("lib")], ("t.jsonl:1", "'prompt'"))),
    row("build-rank-above-the-layer", lambda c: (["hub", "build", "--model", c.model, "--tasks", c.data, "--rank",
                                                  "1000", "--output", c.out("lib")], ("r=1000", "k_proj"))),
    row("build-target-regex", lambda c: (["hub", "build", "--model", c.model, "--tasks", c.data, "--target-modules",
                                          "q_proj(", "--output", c.out("lib")], "'q_proj('")),
    row("build-model-missing", lambda c: (["hub", "build", "--model", "./no-such-model", "--tasks", c.data,
                                           "--output", c.out("lib")], "./no-such-model")),
    row("build-rank-zero", lambda c: (["hub", "build", "--model", c.model, "--tasks", c.data, "--rank", "0",
                                       "--output", c.out("lib")], "lora.r")),
    row("build-grad-clip-negative", lambda c: (["hub", "build", "--model", c.model, "--tasks", c.data,
                                                "--grad-clip", "-1", "--output", c.out("lib")], "train.grad_clip")),
    row("tasks-kind-unknown", lambda c: (["tasks", "--kind", "essay"], ("--kind", "'essay'"))),
]


def broken_checkpoint(c: Ctx, name: str, delete: bool = False) -> Path:
    run = c.copy("run")
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    if delete:
        (latest / name).unlink()
    else:
        truncate(latest / name)
    return run


def broken_adapter(c: Ctx, how: str) -> Path:
    d = c.adapter_copy()
    weights = d / "adapter_model.safetensors"
    if how == "torn":
        truncate(weights)
    elif how == "garbage":
        weights.write_bytes(os.urandom(weights.stat().st_size))
    elif how == "config":
        (d / "adapter_config.json").write_text('{"r": 4, ')
    elif how == "extra_key":
        tensors = load_file(str(weights))
        tensors["base_model.model.model.layers.0.mlp.up_proj.weight"] = torch.zeros(2)
        save_file(tensors, str(weights))
    return d


def merge_args(c: Ctx, *extra: str, out: str | None = None) -> list[str]:
    return ["merge", "--model", c.model, "--adapters", f"{c.shared / 'adapter'},{c.shared / 'adapter_qv'}",
            "--output", out or c.out("merged"), *extra]


def library(c: Ctx) -> Path:
    lib = c.ws / "lib"
    for name in ("adapter", "adapter_qv"):
        shutil.copytree(c.shared / name, lib / name)
    return lib


def compose_args(c: Ctx, *extra: str, lib: str | None = None, examples: str | None = "",
                 out: str | None = None) -> list[str]:
    args = ["hub", "compose", "--model", c.model, "--library", lib or str(library(c)), "--output",
            out or c.out("hub"), *extra]
    if examples == "":
        examples = c.file("shots.jsonl", GOOD)
    return args + (["--examples", examples] if examples else [])


def tree_hash(*roots: Path) -> str:
    """Every path under `roots` (directories too, so a created empty one counts) and file content."""
    h = hashlib.sha256()
    for root in roots:
        if not root.exists():
            h.update(f"absent {root}".encode())
            continue
        for p in sorted(root.rglob("*")):
            h.update(str(p.relative_to(root)).encode())
            if p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("setup", ROWS)
def test_bad_input_is_one_line_naming_the_culprit(setup, shared, tmp_path, capsys, fake_bigbench):  # noqa: F811
    """(`fake_bigbench` also points efftune's cache at a temporary directory: no row reaches the real one.)"""
    ws = tmp_path / "ws"
    ws.mkdir()
    argv, culprit = setup(Ctx(ws, shared))
    culprits = (culprit,) if isinstance(culprit, str) else culprit
    before = tree_hash(ws, shared)
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("efftune: error:")]
    assert code == 2, err
    assert len(errors) == 1 and lines[-1] == errors[0], err
    for name in culprits:
        assert name in errors[0], f"{name!r} not named in: {errors[0]}"
    others = [line for line in lines[:-1] if any(w in line.lower() for w in ("error", "traceback", "exception"))]
    assert not others and "Traceback" not in err, err
    assert out == "", out
    assert tree_hash(ws, shared) == before, "the command changed files on disk"


def test_the_table_is_big_enough():
    assert len(ROWS) >= 45


# ---- inputs that are taken, but not without a word ------------------------------------------------------

def test_merge_of_differing_adapters_says_what_it_does(shared, tmp_path, capsys):
    code = main(["merge", "--model", str(shared / "model"), "--adapters",
                 f"{shared / 'adapter'},{shared / 'adapter_qv'}", "--output", str(tmp_path / "merged")])
    out, err = capsys.readouterr()
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("merge: ")]
    assert notes[0].startswith(f"merge: the adapters adapt different modules ({shared / 'adapter_qv'} lacks 10 "
                               "of 14 (e.g. model.layers.0.mlp.down_proj))")
    assert notes[1].startswith("merge: input ranks differ (2, 4)") and notes[2].endswith("--rank 6 keeps it exact")
    assert json.loads(out.splitlines()[-1])["kind"] == "adapter"


def test_rows_cut_to_max_length_are_counted(shared, tmp_path, capsys):
    rows = [{"prompt": "The quick brown fox jumps over the lazy dog. " * 2000, "completion": " yes"}]
    rows += [{"prompt": f"Q: {i}?", "completion": " no"} for i in range(5)]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(["train", "--model", str(shared / "model"), "--data", str(data), "--steps", "1", "--batch-size", "2",
                 "--eval-size", "0", "--max-length", "32", "--output", str(tmp_path / "run")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "data: 1 of 6 training examples are longer than max_length 32 tokens and were cut (" in err
    assert json.loads(out.splitlines()[-1])["truncated_examples"] == 1

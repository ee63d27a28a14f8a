"""Retention panels (forgetting measured beside learning), on a small fake BIG-bench sdist and tiny models."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from efftune.config import RunConfig
from efftune.data import Formatter, MultipleChoice
from efftune.errors import ConfigError, DataError
from efftune.eval.retention import PANELS, load_panel, measure_retention, resolve_panel, retention_change
from efftune.methods.full import add_full
from efftune.methods.registry import get_method
from efftune.train.loop import TrainConfig, train
from efftune.train.seed import seed_everything
from tests.conftest import make_tokenizer, tiny_llama
from tests.data.test_bigbench import fake_sdist
from tests.test_cli import last_json, run

COLOURS = {"sky": "blue", "grass": "green", "blood": "red", "snow": "white"}
SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Take 3 steps forward.", "Always face forward.",
             "Is the sky blue?", "Turn left."]


@pytest.fixture
def bigbench(tmp_path, monkeypatch):
    """colours (multiple choice, 48 examples), chat (generative: plain sentences), target (yes/no, to train on)."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    return fake_sdist(tmp_path, monkeypatch, {
        "colours/task.json": {"append_choices_to_input": False, "examples": [
            {"input": f"Colour of {thing} {i}?", "target_scores": {c: int(c == colour) for c in COLOURS.values()}}
            for i in range(12) for thing, colour in COLOURS.items()]},
        "chat/task.json": {"examples": [{"input": f"say {i}", "target": SENTENCES[i % 5]} for i in range(20)]},
        "target/task.json": {"append_choices_to_input": False, "examples": [
            {"input": f"Q: Is {w} blue?", "target_scores": {"yes": int(w == "sky"), "no": int(w != "sky")}}
            for w in ["sky", "grass", "fox", "dog"] * 6]},
        "parent/one/task.json": {"examples": [{"input": "a", "target_scores": {"x": 1, "y": 0}}]}})


def test_the_default_panel_is_fixed():
    # a changed panel needs a new name: runs that name default-v1 stay comparable
    p = PANELS["default-v1"]
    assert p.tasks == ("general_knowledge", "emoji_movie", "phrase_relatedness", "date_understanding",
                       "human_organs_senses", "social_iqa", "anachronisms", "fantasy_reasoning",
                       "topical_chat", "few_shot_nlg", "rephrase", "scientific_press_release")
    assert (p.choice_examples, p.text_examples, p.seed) == (40, 50, 0)
    assert resolve_panel("default") == resolve_panel(["default-v1"]) == p
    assert "intent_recognition" not in p.tasks  # the main job's task


def test_a_list_of_tasks_is_a_panel_with_fixed_examples(bigbench):
    panel = load_panel("colours,chat")
    assert panel.panel.name == "tasks:colours,chat"
    assert set(panel.choice) == {"colours"} and set(panel.text) == {"chat"}
    assert len(panel.choice["colours"]) == 40 and len(panel.text["chat"]) == 20  # at most 40 / 50 per task
    assert all(t.prompt == "" and t.completion in SENTENCES for t in panel.text["chat"])  # targets as plain text
    assert load_panel(["colours", "chat"]) == panel  # the panel's seed picks the same examples every time


def _reference(model, tokenizer, panel) -> tuple[float, float]:
    """Panel accuracy and cross-entropy by their plain definitions: one transformers forward per choice
    (prompt + choice) and per text, no shared rows, no chunked head."""
    f = Formatter(tokenizer)
    accs, ces = [], []
    with torch.no_grad():
        for examples in panel.choice.values():
            hits = 0
            for ex in examples:
                scores = []
                for choice in ex.choices:
                    prompt, cont = f.encode_pair(ex.prompt, choice)
                    logp = model(torch.tensor([prompt + cont])).logits[0].log_softmax(-1)
                    scores.append(sum(float(logp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(cont)))
                hits += max(range(len(scores)), key=scores.__getitem__) in ex.correct
            accs.append(hits / len(examples))
        for texts in panel.text.values():
            nll, count = 0.0, 0
            for t in texts:
                enc = f.encode(t)
                logp = model(torch.tensor([enc.input_ids])).logits[0].log_softmax(-1)
                for pos, label in enumerate(enc.labels):
                    if label != -100:
                        nll -= float(logp[pos - 1, label])
                        count += 1
            ces.append(nll / count)
    return sum(accs) / len(accs), sum(ces) / len(ces)


def test_retention_numbers_match_their_plain_definition(bigbench, tokenizer):
    model = tiny_llama()
    panel = load_panel("colours,chat")
    got = measure_retention(model, Formatter(tokenizer), panel)
    acc, ce = _reference(model, tokenizer, panel)
    assert got["accuracy"] == round(acc, 4) and got["cross_entropy"] == pytest.approx(ce, abs=1e-4)
    assert got["tasks"] == {"colours": {"accuracy": round(acc, 4)}, "chat": {"cross_entropy": got["cross_entropy"]}}
    assert retention_change(got, got) == {"accuracy": 0.0, "cross_entropy": 0.0}


def test_a_zero_lr_run_keeps_the_retention_numbers(capsys, bigbench, model_dir, tmp_path):
    # train.lr must be positive: 1e-30 moves no fp32 weight (every update is below half a unit in the last place)
    code, out, err = run(capsys, "train", "--model", model_dir, "--task", "target", "--method", "full", "--lr", "1e-30",
                         "--steps", 2, "--batch-size", 4, "--eval-size", 4, "--retention", "colours,chat",
                         "--output", tmp_path / "r")
    assert code == 0, err
    s = last_json(out)
    assert s["retention_panel"] == "tasks:colours,chat"
    assert s["retention_before"] == s["retention_after"] and s["retention_change"] == {"accuracy": 0.0,
                                                                                         "cross_entropy": 0.0}
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["retention_after"] == s["retention_after"]
    assert "retention (tasks:colours,chat): accuracy" in err


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_retention_on_two_ranks_equals_one_process(capsys, bigbench, model_dir, tmp_path, mode):
    """`--retention` under `--nproc 2`: before and after training, measured inside the loop (under fsdp
    through the sharded model's root, every rank running every forward; under ddp each rank scoring its
    share of the examples), the numbers one process gives; the adapter saved after it is whole."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file
    args = ["train", "--model", str(model_dir), "--task", "target", "--steps", "2", "--batch-size", "4", "--lr",
            "5e-2", "--eval-size", "4", "--retention", "colours,chat", "--device", "cpu"]
    code, out, err = run(capsys, *args, "--output", tmp_path / "one")
    assert code == 0, err
    one = last_json(out)
    assert one["retention_change"] != {"accuracy": 0.0, "cross_entropy": 0.0}  # training moved them
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "efftune", *args, "--nproc", "2", "--distributed", mode,
                           "--output", str(tmp_path / mode)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    for when in ("retention_before", "retention_after"):  # fp32: the 2 ranks' sums round otherwise
        assert two[when]["accuracy"] == one[when]["accuracy"], when
        assert two[when]["cross_entropy"] == pytest.approx(one[when]["cross_entropy"], abs=2e-4), when
        assert two[when]["tasks"].keys() == one[when]["tasks"].keys()
    a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / mode / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


@pytest.mark.parametrize("method", ["prompt-tuning", "prefix-tuning"])
def test_before_is_the_base_models_for_methods_that_start_off_it(capsys, bigbench, model_dir, tmp_path, method):
    """Prompt and prefix tuning change the outputs from their init on; a run's "before" numbers (panel and
    held-out) are still the base model's, as every other method's: what `efftune eval` gives on the bare
    model. The freshly attached model scores otherwise (what "before" was until the fix)."""
    code, out, err = run(capsys, "train", "--model", model_dir, "--task", "target", "--method", method,
                         "--steps", 1, "--batch-size", 4, "--eval-size", 4, "--retention", "colours,chat",
                         "--output", tmp_path / "r")
    assert code == 0, err
    s = last_json(out)
    code, out, err = run(capsys, "eval", "--model", model_dir, "--task", "target", "--eval-size", 4,
                         "--retention", "colours,chat")
    assert code == 0, err
    bare = last_json(out)
    assert s["retention_before"] == bare["retention"] and s["accuracy_before"] == bare["accuracy"]
    assert s["retention_change"] == retention_change(s["retention_before"], s["retention_after"])
    # a resume (of the finished run) scores "before" on the untrained model again, then loads the checkpoint
    code, out, err = run(capsys, "train", "--model", model_dir, "--task", "target", "--method", method,
                         "--steps", 1, "--batch-size", 4, "--eval-size", 4, "--retention", "colours,chat",
                         "--output", tmp_path / "r", "--resume")
    assert code == 0, err
    again = last_json(out)
    assert {k: again[k] for k in ("retention_before", "retention_after", "accuracy_before", "accuracy_after")} \
        == {k: s[k] for k in ("retention_before", "retention_after", "accuracy_before", "accuracy_after")}
    # the reference is not the fresh method's: attached as the run attaches it, it scores the panel otherwise
    m = get_method(method)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), make_tokenizer()
    cfg = getattr(RunConfig(), m.config_key)
    seed_everything(0)
    m.attach(model, cfg, tokenizer=tokenizer)
    fresh = measure_retention(model, Formatter(tokenizer, prefix_ids=m.prefix(model, cfg) if m.prefix else None),
                              load_panel("colours,chat"))
    assert fresh["cross_entropy"] != bare["retention"]["cross_entropy"]


@pytest.mark.parametrize("method,mode", [("prefix-tuning", "fsdp"), ("prompt-tuning", "ddp")])
def test_before_is_the_base_models_on_two_ranks(capsys, bigbench, model_dir, tmp_path, method, mode):
    """Under `--nproc 2` too (fsdp: the prefixes bypassed in the sharded model, every rank running every
    forward; ddp: the ranks sharing the examples), "before" is the bare model's."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    code, out, err = run(capsys, "eval", "--model", model_dir, "--task", "target", "--eval-size", 4,
                         "--retention", "colours,chat")
    assert code == 0, err
    bare = last_json(out)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "efftune", "train", "--model", str(model_dir), "--task", "target",
                           "--method", method, "--steps", "1", "--batch-size", "4", "--eval-size", "4",
                           "--retention", "colours,chat", "--device", "cpu", "--nproc", "2", "--distributed", mode,
                           "--output", str(tmp_path / mode)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    assert two["accuracy_before"] == bare["accuracy"]
    assert two["retention_before"]["accuracy"] == bare["retention"]["accuracy"]  # fp32: the ranks' sums round
    assert two["retention_before"]["cross_entropy"] == pytest.approx(bare["retention"]["cross_entropy"], abs=2e-4)


def _knows_colours(directory, tokenizer) -> float:
    """A tiny model trained (fully) on the colours task until it knows it: a base with something to forget."""
    from efftune.data import load_task
    model = tiny_llama()
    add_full(model)
    f = Formatter(tokenizer)
    seqs = [f.encode(e) for e in load_task("colours")]
    train(model, seqs, TrainConfig(steps=40, batch_size=16, lr=1e-2, warmup_steps=0, eval_every=0, save_every=0),
          directory / "pretrain", pad_id=tokenizer.pad_token_id)
    model.save_pretrained(directory / "base")
    tokenizer.save_pretrained(directory / "base")
    return directory / "base"


def test_a_run_that_destroys_the_base_shows_forgetting(capsys, bigbench, tmp_path):
    base = _knows_colours(tmp_path, make_tokenizer())
    code, out, err = run(capsys, "train", "--model", base, "--task", "target", "--method", "full", "--lr", "0.5",
                         "--warmup-steps", 0, "--steps", 3, "--batch-size", 4, "--eval-size", 4,
                         "--retention", "colours,chat", "--output", tmp_path / "r")
    assert code == 0, err
    s = last_json(out)
    before, after = s["retention_before"], s["retention_after"]
    assert before["accuracy"] > 0.9  # the base knew the colours ...
    assert s["retention_change"]["accuracy"] < -0.4 and s["retention_change"]["cross_entropy"] > 0.5  # ... no more
    assert s["retention_change"]["accuracy"] == round(after["accuracy"] - before["accuracy"], 4)
    # the numbers are the saved model's: efftune eval --retention on it gives the same
    code, out, err = run(capsys, "eval", "--model", tmp_path / "r" / "model", "--retention", "colours,chat")
    assert code == 0, err
    assert last_json(out)["retention"] == after
    AutoModelForCausalLM.from_pretrained(tmp_path / "r" / "model")


def test_a_panel_holding_a_trained_task_is_refused_naming_it(capsys, bigbench, model_dir, tmp_path):
    code, out, err = run(capsys, "train", "--model", model_dir, "--task", "target", "--retention", "colours,target",
                         "--output", tmp_path / "r")
    assert code == 2 and "target" in err and "trains on" in err and "colours" not in err.split("holds")[1]
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="parent/one"):  # a task and its subtask are one task
        load_panel("parent/one", trained=["parent"])


def test_a_panel_naming_a_missing_task_is_refused_naming_it(capsys, bigbench, model_dir, tmp_path):
    code, out, err = run(capsys, "train", "--model", model_dir, "--task", "target", "--retention", "colours,nosuch",
                         "--output", tmp_path / "r")
    assert code == 2 and "retention" in err and "'nosuch'" in err and not (tmp_path / "r").exists()
    code, out, err = run(capsys, "eval", "--model", model_dir, "--retention", "nosuch")
    assert code == 2 and "'nosuch'" in err
    with pytest.raises(ConfigError, match="named twice"):
        resolve_panel("colours,colours")


def test_panel_examples_are_the_tasks_own(bigbench):
    panel = load_panel("colours")
    assert all(isinstance(e, MultipleChoice) and e.choices == tuple(COLOURS.values()) for e in panel.choice["colours"])
    assert not panel.text
    with pytest.raises(DataError, match="no BIG-bench task"):
        load_panel("colour")


@pytest.mark.slow
def test_the_default_panel_loads_from_bigbench(bigbench_sdist):
    panel = load_panel("default")
    assert {t: len(e) for t, e in panel.choice.items()} == {t: 40 for t in PANELS["default-v1"].tasks[:8]}
    assert {t: len(e) for t, e in panel.text.items()} == {t: 50 for t in PANELS["default-v1"].tasks[8:]}

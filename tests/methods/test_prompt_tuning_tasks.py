"""Prompt tuning with a prompt per task, end to end: each example takes the prompt named after its
BIG-bench task (`Example.task`) when it is encoded, scored, cached and generated from; the command
line refuses runs whose examples would meet no prompt of their task; one prompt works as before."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from efftune.data import Formatter, MultipleChoice
from efftune.data.token_cache import cache_key, encode_all
from efftune.errors import ConfigError
from efftune.eval.multiple_choice import score_rows
from efftune.methods.prompt_tuning import (PromptTuningConfig, add_prompt_tuning, prompt_embedding, prompt_ids,
                                           prompt_tasks, virtual_ids)
from efftune.train.loop import TrainConfig, train
from tests.conftest import tiny_llama
from tests.data.test_bigbench import fake_sdist
from tests.test_cli import last_json, run

K = 4
INIT_TEXT = "Q: Is the sky blue?"
WORDS = ["sky", "grass", "fox", "dog"]


@pytest.fixture
def bigbench(tmp_path, monkeypatch):
    """Yes/no tasks: alpha (colours) and beta (parity) to train a prompt each on, gamma to have none."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    return fake_sdist(tmp_path, monkeypatch, {
        "alpha/task.json": {"append_choices_to_input": False, "examples": [
            {"input": f"Is {w} blue?", "target_scores": {"yes": int(w == "sky"), "no": int(w != "sky")}}
            for w in WORDS * 6]},
        "beta/task.json": {"append_choices_to_input": False, "examples": [
            {"input": f"Is {i} even?", "target_scores": {"yes": int(i % 2 == 0), "no": i % 2}} for i in range(24)]},
        "gamma/task.json": {"examples": [{"input": f"Is {i} odd?", "target_scores": {
            "yes": i % 2, "no": int(i % 2 == 0)}} for i in range(8)]}})


def two_prompts(tasks=("a", "b")):
    m = tiny_llama()
    torch.manual_seed(1)
    config = PromptTuningConfig(num_virtual_tokens=K, init="random", tasks=list(tasks))
    add_prompt_tuning(m, config)
    return m, config


def example(task: str, word: str = "sky") -> MultipleChoice:
    return MultipleChoice(f"Q: Is {word} blue?\nA: ", ("yes", "no"), int(word != "sky"), task=task)


# ---- the formatter routes by task ------------------------------------------------------------------------

def test_each_example_starts_with_its_own_tasks_virtual_ids(tokenizer):
    m, config = two_prompts()
    assert prompt_tasks(config) == ["a", "b"] and prompt_ids(m, config) == {"a": virtual_ids(m, "a"),
                                                                            "b": virtual_ids(m, "b")}
    f = Formatter(tokenizer, prefix_ids=prompt_ids(m, config))
    plain = Formatter(tokenizer).encode(example("")).input_ids
    for task in ("a", "b"):
        enc = f.encode(example(task))
        assert enc.input_ids == virtual_ids(m, task) + plain and enc.labels[:K] == [-100] * K
    # multiple-choice scoring too: each example's prompt (and so its choices) follows its task's ids
    assert prompt_starts(f, [example("b")]) == [virtual_ids(m, "b")]
    assert sorted(prompt_starts(f, [example("a"), example("b")])) == [virtual_ids(m, "a"), virtual_ids(m, "b")]


def prompt_starts(formatter, examples) -> list[list[int]]:
    """The first K ids of each prompt segment (a root of the token tree) of the scoring rows."""
    rows = score_rows(formatter, examples, row_tokens=512)
    return [[t for t, s in zip(row.ids, row.seg) if s == root][:K]
            for row in rows for root, parent in enumerate(row.parents) if parent == -1]


def test_an_example_of_no_prompts_task_is_one_clear_error(tokenizer):
    f = Formatter(tokenizer, prefix_ids={"a": [300], "b": [301]})
    with pytest.raises(ConfigError, match=r"no prompt for task 'c': the prompts are for tasks a, b"):
        f.encode(example("c"))
    with pytest.raises(ConfigError, match="without a task"):
        f.encode(example(""))
    with pytest.raises(ValueError, match="prefix per task"):  # text alone names no task: never a silent guess
        f.encode_prompt("Q:")
    assert f.encode_prompt("Q:", prefix_ids=[301])[0] == 301


def test_one_prompt_serves_every_example_as_before(tokenizer):
    m, config = two_prompts(tasks=("only",))
    assert prompt_tasks(config) is None and prompt_ids(m, config) == virtual_ids(m, "only")
    f = Formatter(tokenizer, prefix_ids=prompt_ids(m, config))
    untagged = [example(""), example("", "dog")]
    tagged = [example("x"), example("y", "dog")]
    assert [f.encode(e) for e in tagged] == [f.encode(e) for e in untagged] \
        == [f.encode(e, prefix_ids=virtual_ids(m, "only")) for e in untagged]
    assert cache_key(f, tagged) == cache_key(f, untagged)  # a task label changes no one-prompt cache entry


def test_the_token_cache_keys_each_examples_prefix(tokenizer):
    a, b = [300, 301], [302, 303]
    examples = [example("a"), example("b", "dog")]
    swapped = [example("b"), example("a", "dog")]
    routed = Formatter(tokenizer, prefix_ids={"a": a, "b": b})
    keys = {cache_key(routed, examples), cache_key(routed, swapped),
            cache_key(Formatter(tokenizer, prefix_ids={"a": b, "b": a}), examples),
            cache_key(Formatter(tokenizer, prefix_ids=a), examples)}
    assert len(keys) == 4  # another task per example, another prompt per task, or one prompt: another entry
    logs = []
    first = encode_all(routed, examples, log=logs.append)
    again = encode_all(Formatter(tokenizer, prefix_ids={"a": a, "b": b}), examples, log=logs.append)
    assert "read from the cache" in logs[-1]  # the virtual ids above the vocabulary are no damage
    assert list(again) == list(first) == [routed.encode(e) for e in examples]
    assert first[0].input_ids[:2] == a and first[1].input_ids[:2] == b
    other = encode_all(routed, swapped)
    assert other[0].input_ids[:2] == b and other[1].input_ids[:2] == a


def test_training_moves_only_the_prompts_of_tasks_it_sees(tokenizer, tmp_path):
    m, config = two_prompts()
    before = prompt_embedding(m).prompts.detach().clone()
    f = Formatter(tokenizer, prefix_ids=prompt_ids(m, config))
    seqs = [f.encode(example("a", w)) for w in WORDS]  # task a's examples only
    train(m, seqs, TrainConfig(steps=3, batch_size=4, lr=0.1, warmup_steps=0, save_every=0, eval_every=0),
          tmp_path, pad_id=tokenizer.pad_token_id)
    after = prompt_embedding(m).prompts.detach()
    assert not torch.allclose(after[0], before[0]) and torch.equal(after[1], before[1])


# ---- the command line ------------------------------------------------------------------------------------

def one_error_line(err: str) -> str:
    """The error the command printed, which must be one line (progress bars aside)."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("efftune:")]
    assert len(lines) == 1, err
    return lines[0]


def train_args(model, out, *extra):
    return ["train", "--model", model, "--method", "prompt-tuning", "--prompt-tuning.num-virtual-tokens", K,
            "--prompt-tuning.init", "text", "--prompt-tuning.init-text", INIT_TEXT, "--steps", 4,
            "--batch-size", 4, "--eval-size", 4, "--lr", 0.3, "--output", out, *extra]


def text_init(model_dir, tokenizer) -> torch.Tensor:
    """The (k, hidden) vectors init: text starts every prompt from (tokens repeated or cut to k)."""
    ids = tokenizer(INIT_TEXT, add_special_tokens=False)["input_ids"]
    ids = (ids * K)[:K]
    return AutoModelForCausalLM.from_pretrained(model_dir).get_input_embeddings().weight[ids].detach()


def test_a_two_task_run_trains_both_prompts_and_eval_routes_alike(capsys, bigbench, model_dir, tmp_path, tokenizer):
    out = tmp_path / "run"
    code, stdout, err = run(capsys, *train_args(model_dir, out, "--task", "alpha,beta",
                                                "--prompt-tuning.tasks", "beta,alpha"))
    assert code == 0, err
    summary = last_json(stdout)
    assert summary["train_examples"] == 40 and summary["eval_examples"] == 8
    prompts = load_file(out / "adapter" / "prompt_tuning_model.safetensors")
    init = text_init(model_dir, tokenizer)
    # both moved from their shared init (had every example gone through the first prompt, the other would
    # be saved as it began)
    for task in ("alpha", "beta"):
        trained = prompts[f"prompt_embeddings.{task}"]
        assert trained.shape == init.shape and (trained - init).abs().max() > 1e-2, task
    assert not torch.allclose(prompts["prompt_embeddings.alpha"], prompts["prompt_embeddings.beta"])
    # efftune eval routes as the run did: its held-out accuracy is the run's last
    code, stdout, err = run(capsys, "eval", "--model", model_dir, "--adapter", out / "adapter",
                            "--task", "alpha,beta", "--eval-size", 4)
    assert code == 0, err
    assert last_json(stdout)["accuracy"] == summary["accuracy_after"]
    # the run's "before" is the bare model's (no virtual ids), as with one prompt
    code, stdout, err = run(capsys, "eval", "--model", model_dir, "--task", "alpha,beta", "--eval-size", 4)
    assert code == 0, err
    assert last_json(stdout)["accuracy"] == summary["accuracy_before"]
    # generate takes one task's prompt, named
    code, stdout, err = run(capsys, "generate", "--model", model_dir, "--adapter", out / "adapter", "--task", "beta",
                            "--max-new-tokens", 2, "Is 3 even?")
    assert code == 0, err
    for args, message in [([], "holds a prompt per task (beta, alpha): pick one with --task"),
                          (["--task", "gamma"], "--task gamma names none of them")]:
        code, stdout, err = run(capsys, "generate", "--model", model_dir, "--adapter", out / "adapter", *args, "Q")
        assert code == 2 and message in one_error_line(err), err
    # eval refuses text whose task has no prompt
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"input": "Is sky blue?", "choices": ["yes", "no"], "answer": 0}) + "\n")
    for args, message in [(["--data", rows], "rows of --data carry no task"),
                          (["--task", "alpha,gamma"], "task gamma has no prompt"),
                          (["--task", "alpha", "--retention", "beta"], "drop --retention")]:
        code, stdout, err = run(capsys, "eval", "--model", model_dir, "--adapter", out / "adapter", *args)
        assert code == 2 and message in one_error_line(err), err


@pytest.mark.parametrize("extra,message", [
    (["--task", "alpha,beta", "--prompt-tuning.tasks", "alpha,gamma"],
     "task beta: no prompt of that name in prompt_tuning.tasks (alpha, gamma)"),
    (["--task", "alpha", "--prompt-tuning.tasks", "alpha,beta"],
     "prompt_tuning.tasks names beta, which the run does not train (task: alpha)"),
    (["--data", "ROWS", "--prompt-tuning.tasks", "alpha,beta"], "the rows of ROWS (data.path, --data) carry no task"),
    (["--task", "alpha,beta", "--eval-data", "ROWS", "--prompt-tuning.tasks", "alpha,beta"],
     "the rows of ROWS (data.eval_path, --eval-data) carry no task"),
    (["--task", "alpha,beta", "--prompt-tuning.tasks", "alpha,beta", "--retention", "colours"],
     "the panel's tasks have none of them"),
    (["--task", "alpha", "--prompt-tuning.tasks", "alpha,beta", "--nproc", "2"], "which the run does not train"),
])
def test_mismatched_prompts_are_one_line_before_the_model_loads(capsys, bigbench, tmp_path, extra, message):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"input": "Is sky blue?", "choices": ["yes", "no"], "answer": 0}) + "\n")
    extra = [str(rows) if a == "ROWS" else a for a in extra]
    message = message.replace("ROWS", str(rows))
    # no model there: the refusal comes first, before anything is loaded or written
    code, stdout, err = run(capsys, *train_args(tmp_path / "no-model", tmp_path / "run", *extra))
    assert code == 2 and message in one_error_line(err), err
    assert not (tmp_path / "run").exists()


def test_one_prompt_on_two_tasks_still_trains_it_on_both(capsys, bigbench, model_dir, tmp_path, tokenizer):
    """One prompt: no routing, every example takes it, whatever its task (peft's format, as before)."""
    out = tmp_path / "run"
    code, stdout, err = run(capsys, *train_args(model_dir, out, "--task", "alpha,beta",
                                                "--prompt-tuning.tasks", "shared"))
    assert code == 0, err
    trained = load_file(out / "adapter" / "adapter_model.safetensors")["prompt_embeddings"]
    assert (trained - text_init(model_dir, tokenizer)).abs().max() > 1e-2

"""`efftune train --data chat.jsonl`: conversations train end to end through the command line
(tiny model with SmolLM2's template), with TensorBoard events, samples.jsonl and the token cache.
The slow test runs examples/chat.jsonl on the real default model: its held-out assistant loss falls."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from efftune.cli import main
from tests.conftest import tiny_llama
from tests.data.chat_fixtures import chatml_tokenizer

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "chat.jsonl"


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-chat")
    tok = chatml_tokenizer()
    tiny_llama(vocab_size=len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def run(capsys, *args):
    code = main(list(map(str, args)))
    out, err = capsys.readouterr()
    return code, out, err


def test_conversations_train_from_the_command_line(capsys, chat_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("EFFTUNE_DATA_CACHE", str(tmp_path / "cache"))  # its own: the first run finds nothing
    rows = [json.loads(line) for line in EXAMPLE.read_text().splitlines()[:40]]
    rows.append({"messages": [{"role": "user", "content": "hello?"}]})  # no assistant turn: skipped, counted
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out_dir = tmp_path / "run"
    args = ["train", "--model", chat_model_dir, "--data", data, "--steps", 6, "--batch-size", 8, "--eval-size", 8,
            "--eval-every", 3, "--rank", 4, "--lr", "1e-2", "--log", "tensorboard", "--eval-samples", 2,
            "--max-length", 1024, "--output", out_dir]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["train_examples"] == 32 and summary["eval_examples"] == 8
    assert summary["perplexity_after"] < summary["perplexity_before"]
    assert "1 of 41 conversations in" in err and "no assistant turn and were skipped" in err
    evals = [r for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines()) if r.get("eval")]
    assert [r["step"] for r in evals] == [0, 3, 6] and all("eval_loss" in r for r in evals)
    samples = [json.loads(line) for line in (out_dir / "samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["sample"]) for s in samples] == [(0, 0), (0, 1), (3, 0), (3, 1), (6, 0), (6, 1)]
    assert samples[0]["prompt"][-1]["role"] == "user" and samples[0]["reference"].startswith("Capital: ")

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out_dir / "tensorboard"))
    acc.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "eval/perplexity", "eval/eval_loss"} <= set(
        acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]

    # the same data again: the tokens come from the cache, and the run computes the same
    code, out2, err = run(capsys, *args[:-1], tmp_path / "run2")
    assert code == 0, err
    assert "41 examples of" in err and "parsed before, read from the cache" in err  # no JSON parsed
    assert "training examples tokenised before, read from the cache" in err  # nothing rendered
    again = json.loads(out2.strip().splitlines()[-1])
    assert again["perplexity_after"] == summary["perplexity_after"]


def test_a_resumed_run_writes_each_evaluations_samples_once(capsys, chat_model_dir, tmp_path, monkeypatch):
    """samples.jsonl rows carry the step the loop passes to the evaluation; a run stopped after its
    step-3 evaluation and resumed from the step-2 checkpoint evaluates step 3 again, and its rows
    replace the first attempt's: the file is the uninterrupted run's."""
    from efftune import faults
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(line + "\n" for line in EXAMPLE.read_text().splitlines()[:24]))
    args = ["train", "--model", chat_model_dir, "--data", data, "--steps", 4, "--batch-size", 4, "--eval-size", 4,
            "--eval-every", 1, "--save-every", 2, "--rank", 4, "--lr", "1e-2", "--eval-samples", 1,
            "--max-length", 1024]
    code, _, err = run(capsys, *args, "--output", tmp_path / "whole")
    assert code == 0, err
    whole = (tmp_path / "whole" / "samples.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in whole] == [0, 1, 2, 3, 4]

    monkeypatch.setenv(faults.ENV, "mid_step@4:raise")  # inside step 4, after the step-3 evaluation
    faults.reset()
    with pytest.raises(faults.FaultInjected):
        run(capsys, *args, "--output", tmp_path / "cut")
    cut = tmp_path / "cut" / "samples.jsonl"
    assert [json.loads(line)["step"] for line in cut.read_text().splitlines()] == [0, 1, 2, 3]
    with cut.open("a") as f:
        f.write('{"step": 3, "sample": 0, "rep')  # and a row the crash left half-written
    monkeypatch.delenv(faults.ENV)
    faults.reset()
    code, _, err = run(capsys, *args, "--output", tmp_path / "cut", "--resume")
    assert code == 0, err
    assert cut.read_text().splitlines() == whole


def test_train_on_and_overflow_reach_the_run(capsys, chat_model_dir, tmp_path):
    code, out, err = run(capsys, "train", "--model", chat_model_dir, "--data", EXAMPLE, "--steps", 1,
                         "--batch-size", 4, "--eval-size", 0, "--max-length", 64, "--data-overflow", "error",
                         "--output", tmp_path / "run")
    assert code == 2 and "chat.jsonl:" in err and "more than train.max_length 64 (data.overflow: error" in err
    code, out, err = run(capsys, "train", "--model", chat_model_dir, "--data", EXAMPLE, "--data-train-on", "everything",
                         "--output", tmp_path / "run")
    assert code == 2 and "data.train_on must be one of assistant, last_assistant, all" in err


@pytest.mark.slow
def test_default_model_learns_the_example_conversations(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "efftune.cli", "train", "--data", str(EXAMPLE), "--steps", "10",
                           "--eval-size", "20", "--eval-every", "0", "--eval-samples", "2", "--output", str(out)],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["perplexity_after"] < 0.8 * summary["perplexity_before"], summary
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r.get("eval")]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert (out / "samples.jsonl").is_file()


def test_sample_replies_start_with_the_formatters_prefix():
    """samples.jsonl's greedy replies see what training saw: the method's prefix (prompt tuning's
    virtual tokens) before the rendered prompt. Reference: model.generate on prefix + rendered ids."""
    import torch

    from efftune.data.examples import Conversation
    from efftune.data.tokenize import Formatter
    from efftune.eval.samples import greedy_replies
    tok = chatml_tokenizer()
    model = tiny_llama(vocab_size=len(tok), seed=3).eval()
    conv = Conversation((("user", "What is the capital of France?"), ("assistant", "Paris.")))
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    rendered = tok(text, add_special_tokens=False)["input_ids"]

    def reference(ids: list[int]) -> str:
        t = torch.tensor([ids])
        out = model.generate(input_ids=t, attention_mask=torch.ones_like(t), max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, t.shape[1]:], skip_special_tokens=True)
    prefix = [11, 12, 13, 14]
    with_prefix = greedy_replies(model, Formatter(tok, prefix_ids=prefix), [conv], max_new_tokens=8)
    without = greedy_replies(model, Formatter(tok), [conv], max_new_tokens=8)
    assert with_prefix[0]["reply"] == reference(prefix + rendered)
    assert without[0]["reply"] == reference(rendered)
    assert with_prefix[0]["reply"] != without[0]["reply"]  # the prefix changes what this model says
    assert with_prefix[0]["reference"] == "Paris."

"""The command line on a tiny local model and JSONL data: the contract users script against."""
import json

import pytest
import torch

from efftune.cli import main

ROWS = [{"input": f"Q: Is {w} blue?", "choices": ["yes", "no"], "answer": int(w != "sky")}
        for w in ["sky", "grass", "fox", "dog", "sky", "grass", "fox", "dog"] * 3]


@pytest.fixture
def data_file(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return p


def run(capsys, *args):
    code = main(list(map(str, args)))
    out, err = capsys.readouterr()
    return code, out, err


def last_json(out):
    return json.loads(out.strip().splitlines()[-1])


def reference_accuracy(model_path, rows, adapter=None) -> float:
    """Accuracy by its plain definition, apart from efftune's scoring and adapter loading: each
    choice scored by one transformers forward over prompt + choice (no shared rows), the LoRA
    update `W += alpha/r · B A` merged by hand from the adapter's files."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from efftune.data import Formatter
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    if adapter is not None:
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        tensors = load_file(adapter / "adapter_model.safetensors")
        with torch.no_grad():
            for key, a in tensors.items():
                if key.endswith(".lora_A.weight"):
                    module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                    b = tensors[key.replace(".lora_A.", ".lora_B.")]
                    model.get_submodule(module).weight += cfg["lora_alpha"] / cfg["r"] * (b @ a)
    formatter = Formatter(AutoTokenizer.from_pretrained(model_path))
    hits = 0
    for row in rows:
        scores = []
        for choice in row["choices"]:
            prompt, cont = formatter.encode_pair(row["input"], choice)
            with torch.no_grad():
                logp = model(torch.tensor([prompt + cont])).logits[0].log_softmax(-1)
            scores.append(sum(float(logp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(cont)))
        hits += max(range(len(scores)), key=scores.__getitem__) == row["answer"]
    return hits / len(rows)


def test_train_then_eval_with_adapter(capsys, model_dir, data_file, tmp_path):
    out_dir = tmp_path / "run"
    code, out, err = run(capsys, "train", "--model", model_dir, "--data", data_file, "--steps", 4, "--batch-size", 4,
                         "--eval-size", 8, "--rank", 2, "--lr", "1e-2", "--output", out_dir)
    assert code == 0, err
    summary = last_json(out)
    assert {"accuracy_before", "accuracy_after", "adapter", "steps", "train_seconds"} <= set(summary)
    assert summary["steps"] == 4 and summary["eval_examples"] == 8
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metrics.jsonl",
                 "training.png", "summary.json", "config.json"):
        assert (out_dir / name).is_file(), name
    code, out, err = run(capsys, "eval", "--model", model_dir, "--adapter", out_dir / "adapter", "--data", data_file)
    assert code == 0, err
    result = last_json(out)
    assert result["examples"] == len(ROWS)
    assert result["accuracy"] == pytest.approx(reference_accuracy(model_dir, ROWS, out_dir / "adapter"), abs=1e-12)


def test_refuses_to_overwrite_a_run(capsys, model_dir, data_file, tmp_path):
    args = ["train", "--model", model_dir, "--data", data_file, "--steps", 1, "--batch-size", 2, "--output", tmp_path]
    (tmp_path / "keep.txt").write_text("previous run")
    code, out, err = run(capsys, *args)
    assert code == 2 and "already holds a run" in err and "--overwrite" in err
    assert (tmp_path / "keep.txt").read_text() == "previous run"
    code, out, err = run(capsys, *args, "--overwrite")
    assert code == 0, err


def test_resume_continues_a_stopped_run(capsys, model_dir, data_file, tmp_path, monkeypatch):
    base = ["train", "--model", model_dir, "--data", data_file, "--batch-size", 2, "--save-every", 2,
            "--output", tmp_path / "r"]
    assert run(capsys, *base, "--steps", 2)[0] == 0
    config = (tmp_path / "r" / "config.json").read_bytes()
    code, out, err = run(capsys, *base, "--steps", 4, "--resume")  # more steps: another lr schedule
    assert code == 2 and "train.steps" in err and "2 -> 4" in err and "--resume-changed" in err
    assert (tmp_path / "r" / "config.json").read_bytes() == config  # a failed resume rewrites nothing
    import efftune.train.distributed

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:  # Ctrl-C while a resumed run loads: its checkpoint is still there
        patch.setattr(efftune.train.distributed, "load_model", interrupted)  # the base loader's
        code, out, err = run(capsys, *base, "--steps", 4, "--resume-changed")
    assert code == 130 and "last checkpoint is kept: resume with --resume" in err
    assert (tmp_path / "r" / "config.json").read_bytes() == config
    code, out, err = run(capsys, *base, "--steps", 4, "--resume-changed")
    assert code == 0, err
    assert last_json(out)["changed_on_resume"] == ["train.steps"] and last_json(out)["resumed_from_step"] == 2
    steps = [json.loads(l)["step"] for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(l)]
    assert steps == [1, 2, 3, 4]


def test_resume_compares_the_data_section(capsys, model_dir, data_file, tmp_path):
    base = ["train", "--model", model_dir, "--batch-size", 2, "--steps", 2, "--eval-size", 2, "--output", tmp_path / "r"]
    assert run(capsys, *base, "--data", data_file)[0] == 0
    config = tmp_path / "r" / "config.json"
    saved = json.loads(config.read_text())
    assert saved["data"]["path"] == str(data_file) and saved["data"]["overflow"] == "truncate"
    code, out, err = run(capsys, *base, "--data", data_file, "--data-overflow", "drop", "--resume")
    assert code == 2 and "data.overflow 'truncate' -> 'drop'" in err and "--resume-changed" in err
    # a run saved before the data section (its keys at the top level): compared key by key all the same
    old = {k: v for k, v in saved.items() if k != "data"}
    old.update({"data": str(data_file), "eval_data": None, "data_split": None, "eval_split": None,
                "data_columns": [], "data_train_on": "assistant", "data_overflow": "truncate", "data_cache": True})
    config.write_text(json.dumps(old))
    other = tmp_path / "other.jsonl"
    other.write_bytes(data_file.read_bytes())
    code, out, err = run(capsys, *base, "--data", other, "--resume")
    assert code == 2 and "data.path" in err and "other.jsonl" in err
    code, out, err = run(capsys, *base, "--data", data_file, "--no-data-cache", "--resume")  # bookkeeping: free
    assert code == 0, err
    assert not last_json(out).get("changed_on_resume")


def test_config_file_and_flag_override(capsys, model_dir, data_file, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {model_dir}\ndata: {{{{path: {data_file}}}}}\noutput: {tmp_path / 'out'}\n"
                   "lora: {{r: 2, target_modules: [q_proj, v_proj]}}\ntrain: {{steps: 5, batch_size: 2}}\n"
                   .replace("{{", "{").replace("}}", "}"))
    code, out, err = run(capsys, "train", "--config", cfg, "--steps", 2)
    assert code == 0, err
    assert last_json(out)["steps"] == 2
    saved = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 2 and sorted(saved["target_modules"]) == ["q_proj", "v_proj"]


@pytest.mark.parametrize("yaml_text, message", [
    ("train: {stepz: 3}", "unknown config key 'train.stepz'"),
    ("train: {steps: many}", "train.steps: expected int"),
    ("lora: {r: 0}", "lora.r must be a positive integer"),
    ("method: vera", "unknown method 'vera'"),
    ("train: {masked_attention: dense}", "train.masked_attention must be one of sdpa, flex"),
    ("- a list", "expected a mapping"),
])
def test_bad_config_is_one_clear_line(capsys, tmp_path, yaml_text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text + "\n")
    code, out, err = run(capsys, "train", "--config", cfg, "--output", tmp_path / "o")
    assert code == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_target_that_matches_nothing(capsys, model_dir, data_file, tmp_path):
    code, out, err = run(capsys, "train", "--model", model_dir, "--data", data_file, "--target-modules", "query,value",
                         "--output", tmp_path / "o" / "deeper")
    assert code == 2 and "matches no module" in err and "q_proj" in err
    assert not (tmp_path / "o").exists()  # a run that never started leaves nothing, not even the parents it made


def test_bad_data_row_names_file_and_line(capsys, model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    code, out, err = run(capsys, "train", "--model", model_dir, "--data", bad, "--output", tmp_path / "o")
    assert code == 2 and "bad.jsonl:2" in err and "completion" in err
    assert not (tmp_path / "o").exists()


def test_generate(capsys, model_dir):
    code, out, err = run(capsys, "generate", "--model", model_dir, "--max-new-tokens", 3, "Q: Is the sky blue?")
    assert code == 0, err


def test_eval_needs_task_or_data(capsys, model_dir):
    code, out, err = run(capsys, "eval", "--model", model_dir)
    assert code == 2 and "exactly one of --task or --data" in err


def test_lora_fa_method_from_flags(capsys, model_dir, data_file, tmp_path):
    out_dir = tmp_path / "fa"
    code, out, err = run(capsys, "train", "--model", model_dir, "--data", data_file, "--method", "lora-fa",
                         "--rank", 3, "--steps", 2, "--batch-size", 4, "--output", out_dir)
    assert code == 0, err
    saved = json.loads((out_dir / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 3 and saved["efftune"]["method"] == "lora-fa" and saved["efftune"]["correction"] is True
    assert json.loads((out_dir / "config.json").read_text())["lora_fa"]["r"] == 3


def test_fp8_base_from_flags(capsys, model_dir, data_file, tmp_path):
    # LoRA-FA over an FP8 base; ReLoRA writes into the base, so it is refused in one line
    out_dir = tmp_path / "fp8"
    code, out, err = run(capsys, "train", "--model", model_dir, "--data", data_file, "--method", "lora-fa",
                         "--fp8-base", "--steps", 2, "--batch-size", 4, "--output", out_dir)
    assert code == 0, err
    assert json.loads((out_dir / "config.json").read_text())["train"]["fp8_base"] is True
    assert (out_dir / "adapter" / "adapter_model.safetensors").is_file()
    code, out, err = run(capsys, "train", "--model", model_dir, "--data", data_file, "--method", "relora",
                         "--fp8-base", "--steps", 2, "--batch-size", 4, "--output", tmp_path / "r")
    # refused from the config, before the model loads or the output directory is made
    assert code == 2 and "method relora writes into the base weights, so train.fp8_base" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_masked_attention_flag_reaches_the_config(capsys, model_dir, data_file, tmp_path):
    # flex needs CUDA: on CPU the run stops at the option, in one line, before writing anything
    code, out, err = run(capsys, "train", "--model", model_dir, "--data", data_file, "--masked-attention", "flex",
                         "--steps", 2, "--batch-size", 4, "--output", tmp_path / "flex")
    assert code != 0 and "train.masked_attention: flex needs a CUDA device" in err and "Traceback" not in err
    assert not (tmp_path / "flex" / "adapter").exists()
    code, out, err = run(capsys, "train", "--model", model_dir, "--data", data_file, "--masked-attention", "sdpa",
                         "--steps", 2, "--batch-size", 4, "--output", tmp_path / "sdpa")
    assert code == 0, err
    assert json.loads((tmp_path / "sdpa" / "config.json").read_text())["train"]["masked_attention"] == "sdpa"


@pytest.mark.parametrize("method, extra, artifact", [
    ("relora", ["--restart-every", "2"], "model"),
    ("ia3", [], "adapter"),
    ("bottleneck", [], "adapter"),
])
def test_other_methods_train_from_the_cli(capsys, model_dir, data_file, tmp_path, method, extra, artifact):
    out_dir = tmp_path / method
    code, out, err = run(capsys, "train", "--model", model_dir, "--data", data_file, "--method", method,
                         "--steps", 4, "--batch-size", 4, "--output", out_dir, *extra)
    assert code == 0, err
    summary = last_json(out)
    assert summary[artifact] == str(out_dir / artifact) and (out_dir / artifact).is_dir()


def test_relora_result_is_a_model_transformers_loads(capsys, model_dir, data_file, tmp_path):
    from transformers import AutoModelForCausalLM
    out_dir = tmp_path / "r"
    code, out, err = run(capsys, "train", "--model", model_dir, "--data", data_file, "--method", "relora",
                         "--restart-every", 2, "--steps", 4, "--batch-size", 4, "--output", out_dir)
    assert code == 0, err
    rows = [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("relora_restart")] == [2, 4]
    code, out, err = run(capsys, "eval", "--model", out_dir / "model", "--data", data_file)
    assert code == 0, err
    assert last_json(out)["accuracy"] == pytest.approx(reference_accuracy(out_dir / "model", ROWS), abs=1e-12)
    AutoModelForCausalLM.from_pretrained(out_dir / "model")


def test_bitfit_on_llama_explains_missing_biases(capsys, model_dir, data_file, tmp_path):
    code, out, err = run(capsys, "train", "--model", model_dir, "--data", data_file, "--method", "bitfit",
                         "--output", tmp_path / "b")
    assert code == 2 and "add_biases" in err


def test_merge_two_adapters(capsys, model_dir, data_file, tmp_path):
    for name, seed in (("a", 1), ("b", 2)):
        code, out, err = run(capsys, "train", "--model", model_dir, "--data", data_file, "--steps", 2, "--batch-size", 4,
                             "--seed", seed, "--rank", 2, "--output", tmp_path / name)
        assert code == 0, err
    adapters = f"{tmp_path / 'a' / 'adapter'},{tmp_path / 'b' / 'adapter'}"
    code, out, err = run(capsys, "merge", "--model", model_dir, "--adapters", adapters, "--weights", "0.5,0.5",
                         "--combine", "ties", "--output", tmp_path / "merged")
    assert code == 0, err
    assert json.loads((tmp_path / "merged" / "adapter_config.json").read_text())["r"] == 2
    code, out, err = run(capsys, "eval", "--model", model_dir, "--adapter", tmp_path / "merged", "--data", data_file)
    assert code == 0, err
    code, out, err = run(capsys, "merge", "--model", model_dir, "--adapters", adapters, "--full-model",
                         "--output", tmp_path / "full")
    assert code == 0 and (tmp_path / "full" / "config.json").is_file(), err
    # an existing --output: refused without --overwrite; a file is never replaced; with --overwrite, replaced
    merged = tmp_path / "merged"
    before = tree(merged)
    code, out, err = run(capsys, "merge", "--model", model_dir, "--adapters", adapters, "--output", merged)
    assert code == 2 and "already exists and is not empty; pass --overwrite" in err and tree(merged) == before
    (tmp_path / "file").write_text("mine")
    for extra in ([], ["--overwrite"]):
        code, out, err = run(capsys, "merge", "--model", model_dir, "--adapters", adapters, "--output",
                             tmp_path / "file", *extra)
        assert code == 2 and "is a file, not a directory" in err and len(err.strip().splitlines()) == 1
        assert (tmp_path / "file").read_text() == "mine" and not (tmp_path / "file.old").exists()
    code, out, err = run(capsys, "merge", "--model", model_dir, "--adapters", adapters, "--rank", 1, "--output",
                         merged, "--overwrite")
    assert code == 0, err
    assert json.loads((merged / "adapter_config.json").read_text())["r"] == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("merged")) == ["merged"]


def tree(d):
    """{relative path: bytes} of every file under `d`: equal before and after means untouched."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("method", ["prompt-tuning", "prefix-tuning", "ia3", "bottleneck", "lora-fa", "mixlora"])
def test_eval_loads_each_methods_result(capsys, model_dir, data_file, tmp_path, method):
    out_dir = tmp_path / method
    code, out, err = run(capsys, "train", "--model", model_dir, "--data", data_file, "--method", method,
                         "--steps", 2, "--batch-size", 4, "--eval-size", 8, "--output", out_dir)
    assert code == 0, err
    after = last_json(out)["accuracy_after"]
    held_out = tmp_path / "held_out.jsonl"  # the run's own held-out rows, to reproduce its score
    from efftune.data import load_jsonl, split_examples
    _, eval_rows = split_examples(load_jsonl(data_file), 8, seed=0)
    held_out.write_text("".join(json.dumps({"input": e.prompt, "choices": list(e.choices), "answer": e.answer})
                                + "\n" for e in eval_rows))
    code, out, err = run(capsys, "eval", "--model", model_dir, "--adapter", out_dir / "adapter", "--data", held_out)
    assert code == 0, err
    assert last_json(out)["accuracy"] == after


def test_hub_compose_from_a_library(capsys, model_dir, data_file, tmp_path):
    library = tmp_path / "library"
    library.mkdir()
    for name, seed in (("m1", 1), ("m2", 2)):
        code, out, err = run(capsys, "train", "--model", model_dir, "--data", data_file, "--steps", 2,
                             "--batch-size", 4, "--seed", seed, "--rank", 2, "--output", tmp_path / name)
        assert code == 0, err
        (tmp_path / name / "adapter").rename(library / name)
    code, out, err = run(capsys, "hub", "compose", "--model", model_dir, "--library", library, "--examples", data_file,
                         "--budget", 6, "--output", tmp_path / "composed")
    assert code == 0, err
    result = last_json(out)
    assert result["modules"] == ["m1", "m2"] and len(result["weights"]) == 2
    assert all(-1.5 <= w <= 1.5 for w in result["weights"])  # LoraHub's bounds
    # the written adapter is the composition with the weights reported: A = Σ w_i A_i, B = Σ w_i s_i B_i
    # (each module's scaling alpha/r folded into its B, the result at scaling 1)
    from safetensors.torch import load_file
    composed = load_file(tmp_path / "composed" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "composed" / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] and config["efftune"]["lorahub"]["weights"] == result["weights"]
    modules = [load_file(library / n / "adapter_model.safetensors") for n in ("m1", "m2")]
    scales = [(lambda c: c["lora_alpha"] / c["r"])(json.loads((library / n / "adapter_config.json").read_text()))
              for n in ("m1", "m2")]
    assert composed.keys() == modules[0].keys() == modules[1].keys()
    for key, value in composed.items():
        factor = [1.0, 1.0] if ".lora_A." in key else scales
        want = sum(w * f * m[key] for w, f, m in zip(result["weights"], factor, modules))
        torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-7, msg=key)
    assert result["objective"] <= result["base_objective"]
    assert (tmp_path / "composed" / "adapter_config.json").is_file()
    before = tree(tmp_path / "composed")
    code, out, err = run(capsys, "hub", "compose", "--model", model_dir, "--library", library, "--examples", data_file,
                         "--budget", 6, "--output", tmp_path / "composed")
    assert code == 2 and "pass --overwrite" in err and tree(tmp_path / "composed") == before


def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(capsys, model_dir, data_file, tmp_path,
                                                                       monkeypatch):
    out_dir = tmp_path / "run"
    base = ["train", "--model", model_dir, "--data", data_file, "--steps", 2, "--batch-size", 4, "--output", out_dir]
    assert run(capsys, *base)[0] == 0
    before = tree(out_dir)
    # the new run fails after its model loaded: the old run is back, nothing else is left
    code, out, err = run(capsys, *base, "--overwrite", "--target-modules", "query")
    assert code == 2 and "matches no module" in err
    assert tree(out_dir) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run", "train.jsonl"]
    # Ctrl-C while the model loads: the message says what was kept, exit code 130
    import efftune.train.distributed

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(efftune.train.distributed, "load_model", interrupted)  # the base loader's
    code, out, err = run(capsys, *base, "--overwrite")
    assert code == 130 and "before the first checkpoint" in err and f"previous run in {out_dir} is back" in err
    assert tree(out_dir) == before
    code, out, err = run(capsys, *base[:-1], tmp_path / "fresh")
    assert code == 130 and "run the same command again" in err and "--resume" not in err
    assert not (tmp_path / "fresh").exists()
    monkeypatch.undo()
    code, out, err = run(capsys, *base, "--overwrite", "--steps", 3)
    assert code == 0, err
    assert last_json(out)["steps"] == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["run", "train.jsonl"]


def test_compile_flags(capsys, model_dir, data_file, tmp_path):
    out_dir = tmp_path / "compiled"
    code, out, err = run(capsys, "train", "--model", model_dir, "--data", data_file, "--compile",
                         "--compile-speed-first", "--steps", 1, "--batch-size", 4, "--eval-every", 0,
                         "--output", out_dir)
    assert code == 0, err
    saved = json.loads((out_dir / "config.json").read_text())["train"]
    assert saved["compile"] is True and saved["compile_lean"] is False and saved["compile_autotune"] is False
    code, out, err = run(capsys, "train", "--model", model_dir, "--data", data_file, "--compile-autotune",
                         "--steps", 1, "--output", tmp_path / "x")
    assert code != 0 and "train.compile_autotune needs train.compile: true" in err

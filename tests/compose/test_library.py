"""`efftune hub build`: a library of LoRA modules, one per task, trained one by one or k at once."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from efftune.compose.library import INDEX_FILE, WORK_DIR, accuracies_together, build_library, module_name, resolve_tasks
from efftune.compose.lorahub import load_library, lorahub
from efftune.data import Formatter, MultipleChoice
from efftune.errors import ConfigError, DataError, EfftuneError
from efftune.eval.multiple_choice import multiple_choice_accuracy
from efftune.methods.lora.config import LoraConfig
from efftune.methods.lora.model import add_lora, set_active_adapters
from efftune.methods.lora.peft_format import load_adapter
from efftune.train.loop import TrainConfig, example_order
from tests.conftest import one_and_two_ranks, randomize_lora, tiny_llama
from tests.data.test_bigbench import fake_bigbench  # noqa: F401  (fixture: a small fake BIG-bench sdist)

WORDS = ["sky", "grass", "fox", "dog", "sea", "leaf", "cat", "snow"]
LORA = LoraConfig(r=2, alpha=4)


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    """train() draws training.png at every checkpoint; matplotlib is most of these tests' time."""
    monkeypatch.setattr("efftune.train.loop.plot_metrics", lambda rows, path: path)


def cfg(**kw) -> TrainConfig:
    base = dict(steps=3, batch_size=4, lr=1e-2, warmup_steps=1, save_every=2)
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def tasks(tmp_path):
    """Three JSONL tasks: two multiple choice (one with a long shared instruction: tree rows), one generative."""
    rows = {
        "colors": [{"input": f"Q: Is the {w} blue?", "choices": ["yes", "no"], "answer": int(w not in ("sky", "sea"))}
                   for w in WORDS * 3],
        "parity": [{"input": f"Take 3 steps forward. Turn left. Always face forward. Is {i} even?",
                    "choices": ["True", "False"], "answer": i % 2} for i in range(24)],
        "echo": [{"prompt": f"Repeat: {w}\nA:", "completion": f" {w}"} for w in WORDS * 2],
    }
    paths = []
    for name, items in rows.items():
        p = tmp_path / "data" / f"{name}.jsonl"
        p.parent.mkdir(exist_ok=True)
        p.write_text("".join(json.dumps(r) + "\n" for r in items))
        paths.append(str(p))
    return paths


def weights(directory):
    return load_file(str(directory / "adapter_model.safetensors"))


def assert_same_modules(a, b, names, atol):
    for n in names:
        wa, wb = weights(a / n), weights(b / n)
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=f"{n}: {k}")


def test_build_writes_peft_modules_and_index(tasks, tokenizer, tmp_path):
    out = tmp_path / "lib"
    summary = build_library((tiny_llama(), tokenizer), tasks, out, LORA, cfg(), together=2, eval_size=6)
    assert summary["built"] == ["colors", "parity", "echo"] and summary["skipped"] == [] and summary["modules"] == 3
    index = json.loads((out / INDEX_FILE).read_text())
    assert set(index["modules"]) == {"colors", "parity", "echo"}
    assert index["recipe"]["lora"]["r"] == 2 and index["recipe"]["train"]["steps"] == 3
    split = {s.name: s for s in resolve_tasks(tasks, 6, seed=0)}  # the build's split (its own tests: data/)
    train = {n: s.train for n, s in split.items()}
    held_out = {n: s.held_out for n, s in split.items()}
    formatter = Formatter(tokenizer)
    for name in ("colors", "parity", "echo"):
        config = json.loads((out / name / "adapter_config.json").read_text())
        meta = config["efftune"]["library"]
        assert config["peft_type"] == "LORA" and config["r"] == 2
        assert meta == {k: v for k, v in index["modules"][name].items() if k != "path"}
        assert meta["steps"] == 3 and meta["examples"] == (18 if name != "echo" else 10)
        # tokens: every example each step drew (the loop's sampler), encoded as training encodes it
        drawn = example_order(len(train[name]), 0, 0, 3 * 4)  # seed 0, 3 steps of 4
        assert meta["tokens"] == sum(len(formatter.encode(train[name][i])) for i in drawn)
        rows = [json.loads(line) for line in (out / WORK_DIR / name / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "loss" in r and not r.get("eval")]
        assert [r["step"] for r in steps] == [1, 2, 3] and meta["final_loss"] == steps[-1]["loss"]
        assert meta["seconds"] == round(sum(r["seconds"] for r in steps), 2)  # training steps only, no evaluation
        assert meta["trained_with"] == (["colors", "parity"] if name != "echo" else ["echo"])
        assert not (out / WORK_DIR / name / "checkpoints").exists()  # dropped once the module is saved
    for name in ("colors", "parity"):
        meta = index["modules"][name]
        assert meta["eval_examples"] == 6
        # before: the base model (a new adapter's B is zero); after: the saved module, loaded afresh
        assert meta["accuracy_before"] == round(multiple_choice_accuracy(tiny_llama(), formatter, held_out[name]), 4)
        trained = tiny_llama()
        load_adapter(trained, out / name)
        assert meta["accuracy_after"] == round(multiple_choice_accuracy(trained, formatter, held_out[name]), 4)
    assert index["modules"]["echo"]["accuracy_before"] is None  # generative: no accuracy


def test_second_build_skips_finished_modules(tasks, tokenizer, tmp_path):
    out = tmp_path / "lib"
    build_library((tiny_llama(), tokenizer), tasks[:2], out, LORA, cfg(), together=2, eval_size=6)
    stamps = {n: (out / n / "adapter_model.safetensors").stat().st_mtime_ns for n in ("colors", "parity")}
    steps = []
    summary = build_library((tiny_llama(), tokenizer), tasks, out, LORA, cfg(), together=2, eval_size=6,
                            on_step=lambda names, done: steps.append((tuple(names), done)))
    assert summary["skipped"] == ["colors", "parity"] and summary["built"] == ["echo"]
    assert {names for names, _ in steps} == {("echo",)}  # only the new module trained
    assert {n: (out / n / "adapter_model.safetensors").stat().st_mtime_ns for n in stamps} == stamps
    again = build_library("no/such/model", tasks, out, LORA, cfg(), together=2, eval_size=6)  # all done: no load
    assert again["built"] == [] and again["skipped"] == ["colors", "parity", "echo"] and again["modules"] == 3
    with pytest.raises(ConfigError, match="another recipe"):  # a different recipe must not mix in silently
        build_library((tiny_llama(), tokenizer), tasks, out, LORA, cfg(steps=4), eval_size=6)


@pytest.mark.parametrize("first, second", [(1, 1), (2, 2), (2, 1)])
def test_interrupted_build_resumes_to_the_uninterrupted_result(tasks, tokenizer, tmp_path, first, second):
    """Stop after step 3 of 4 (checkpoint at 2), build again (a fresh model, as a new process
    would): the modules equal an uninterrupted build's; checkpoints carry over between groupings."""
    c = cfg(steps=4)
    ref = tmp_path / "ref"
    build_library((tiny_llama(dtype=torch.float64), tokenizer), tasks[:2], ref, LORA, c, together=second, eval_size=6)

    def stop(names, done):
        if done == 3:
            raise KeyboardInterrupt
    out = tmp_path / "lib"
    with pytest.raises(KeyboardInterrupt):
        build_library((tiny_llama(dtype=torch.float64), tokenizer), tasks[:2], out, LORA, c, together=first,
                      eval_size=6, on_step=stop)
    assert (out / WORK_DIR / "colors" / "checkpoints" / "step-000002").is_dir()
    assert not (out / "colors").exists()
    seen = []
    build_library((tiny_llama(dtype=torch.float64), tokenizer), tasks[:2], out, LORA, c, together=second, eval_size=6,
                  on_step=lambda names, done: seen.extend((n, done) for n in names))
    assert min(d for n, d in seen if n == "colors") == 3  # resumed after the checkpoint, not from scratch
    assert_same_modules(out, ref, ["colors", "parity"], atol=1e-12)
    a = json.loads((out / INDEX_FILE).read_text())["modules"]["colors"]
    b = json.loads((ref / INDEX_FILE).read_text())["modules"]["colors"]
    for key in ("accuracy_before", "accuracy_after", "tokens", "steps"):
        assert a[key] == b[key], key
    assert a["final_loss"] == pytest.approx(b["final_loss"], abs=1e-5)


def test_k_at_once_equals_one_by_one(tasks, tokenizer, tmp_path):
    """float64: three modules together (tree rows, plain rows, micro-batches, active gradient
    clipping) end where training each alone with train() ends."""
    c = cfg(steps=4, batch_size=4, micro_batch_size=2, grad_clip=0.05, weight_decay=0.01)
    lora = LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])
    build_library((tiny_llama(dtype=torch.float64), tokenizer), tasks, tmp_path / "one", lora, c, together=1, eval_size=6)
    build_library((tiny_llama(dtype=torch.float64), tokenizer), tasks, tmp_path / "k", lora, c, together=3, eval_size=6)
    assert_same_modules(tmp_path / "one", tmp_path / "k", ["colors", "parity", "echo"], atol=1e-10)
    one = json.loads((tmp_path / "one" / INDEX_FILE).read_text())["modules"]
    k = json.loads((tmp_path / "k" / INDEX_FILE).read_text())["modules"]
    for n in ("colors", "parity"):
        assert one[n]["accuracy_after"] == k[n]["accuracy_after"]
        assert one[n]["final_loss"] == pytest.approx(k[n]["final_loss"], abs=1e-6)
    moved = weights(tmp_path / "k" / "colors")
    assert any(v.abs().max() > 0 for key, v in moved.items() if "lora_B" in key)  # training did something


def test_accuracies_together_match_one_adapter_at_a_time(tokenizer):
    m = tiny_llama()
    add_lora(m, LoraConfig(r=2), adapter="a")
    add_lora(m, LoraConfig(r=2), adapter="b")
    randomize_lora(m, std=0.5)
    f = Formatter(tokenizer)
    exs = {"a": [MultipleChoice(f"Q: Is the {w} blue?\nA:", ("yes", "no"), i % 2) for i, w in enumerate(WORDS)],
           "b": [MultipleChoice(f"Take 3 steps. Is {i} even?\nA:", ("True", "False", "maybe"), i % 3)
                 for i in range(10)]}
    together = accuracies_together(m, f, exs, rows_per_batch=1)
    for n in ("a", "b"):
        set_active_adapters(m, n)
        assert together[n] == round(multiple_choice_accuracy(m, f, exs[n]), 4)


def test_built_library_loads_in_peft_and_composes_with_lorahub(tasks, tokenizer, tmp_path):
    pytest.importorskip("nevergrad")
    from peft import PeftModel
    out = tmp_path / "lib"
    build_library((tiny_llama(), tokenizer), tasks[:2], out, LORA, cfg(), together=2, eval_size=6)
    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    ours = tiny_llama()
    load_adapter(ours, out / "colors")
    theirs = PeftModel.from_pretrained(tiny_llama(), out / "colors")
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-5, rtol=0)

    model = tiny_llama()
    names = load_library(model, out)  # _runs/ and library.json are not modules
    assert names == ["colors", "parity"]
    shots = [MultipleChoice(f"Q: Is the {w} blue?", ("yes", "no"), 0) for w in WORDS[:4]]
    hub, res = lorahub(model, Formatter(tokenizer), shots, names, budget=4)
    assert res.modules == names and res.objective <= res.base_objective


def test_a_directory_of_peft_adapters_is_a_library(tasks, tokenizer, tmp_path):
    """Modules made elsewhere (peft) sit beside built ones: compose loads them, build indexes
    them as external and leaves them alone."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    out = tmp_path / "lib"
    foreign = get_peft_model(tiny_llama(), PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    foreign.save_pretrained(out / "made_by_peft")
    assert load_library(tiny_llama(), out) == ["made_by_peft"]
    build_library((tiny_llama(), tokenizer), tasks[:1], out, LORA, cfg(steps=2), eval_size=6)
    index = json.loads((out / INDEX_FILE).read_text())["modules"]
    assert index["made_by_peft"] == {"path": "made_by_peft", "external": True, "r": 4, "lora_alpha": 8}
    assert load_library(tiny_llama(), out) == ["colors", "made_by_peft"]


def test_bigbench_tasks_and_clear_errors(fake_bigbench, tokenizer, tmp_path):  # noqa: F811
    out = tmp_path / "lib"
    model = (tiny_llama(), tokenizer)
    with pytest.raises(ConfigError, match="no tasks given"):
        build_library(model, [], out, LORA, cfg())
    with pytest.raises(DataError, match="hub build: task: no BIG-bench task named 'yesnoo'.*yesno"):
        build_library(model, ["yesno", "yesnoo"], out, LORA, cfg())
    assert not (out / "yesno").exists()  # nothing trained before every task resolved
    with pytest.raises(ConfigError, match="both be module 'x'"):
        build_library(model, ["x.jsonl", "x"], out, LORA, cfg())
    with pytest.raises(ConfigError, match="together must be a positive integer"):
        build_library(model, ["yesno"], out, LORA, cfg(), together=0)
    summary = build_library(model, ["yesno", "parent/one"], out, LORA, cfg(steps=2, batch_size=2),
                            together=2, eval_size=4)
    assert summary["built"] == ["yesno", "parent__one"] == [module_name("yesno"), module_name("parent/one")]
    meta = json.loads((out / INDEX_FILE).read_text())["modules"]["yesno"]
    assert meta["task"] == "yesno" and meta["examples"] == 16 and meta["eval_examples"] == 4
    (out / "stray").mkdir()
    (out / "stray" / "notes.txt").write_text("mine")
    (tmp_path / "stray.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    with pytest.raises(EfftuneError, match="not a LoRA module"):  # never replaces a directory it did not write
        build_library(model, [str(tmp_path / "stray.jsonl")], out, LORA, cfg())
    assert (out / "stray" / "notes.txt").read_text() == "mine"


def test_cli_build(tasks, tokenizer, tmp_path, capsys):
    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (tmp_path / "tasks.txt").write_text(f"# my library\n{tasks[0]}\n\n{tasks[1]}  # second\n")
    from efftune.cli import main, parser
    p = parser()
    code = main(["hub", "build", "--model", str(model_dir), "--tasks-file", str(tmp_path / "tasks.txt"),
                 "--output", str(tmp_path / "lib"), "--steps", "2", "--batch-size", "2", "--together", "2",
                 "--r", "2", "--lr", "0.01", "--target-modules", "q_proj,v_proj", "--eval-size", "4"])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["built"] == ["colors", "parity"] and summary["together"] == 2
    config = json.loads((tmp_path / "lib" / "colors" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["target_modules"] == ["q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == str(model_dir)
    with pytest.raises(SystemExit):  # --tasks and --tasks-file exclude each other
        p.parse_args(["hub", "build", "--tasks", "a", "--tasks-file", "f", "--output", "o"])


def test_a_passed_model_keeps_its_own_adapters_as_they_were(tasks, tokenizer, tmp_path):
    from efftune.methods.lora.layer import lora_layers
    from efftune.methods.lora.model import add_lora
    model = tiny_llama()
    add_lora(model, LORA, adapter="mine")
    mine = [p for n, p in model.named_parameters() if ".mine." in n]
    build_library((model, tokenizer), tasks[:2], tmp_path / "lib", LORA, cfg(), together=2, eval_size=0)
    assert all(layer.active == ["mine"] and list(layer.adapters) == ["mine"] for _, layer in lora_layers(model))
    assert mine and all(p.requires_grad for p in mine)


def test_cli_build_together_4_compiles_the_blocks(tasks, tokenizer, tmp_path, capsys, monkeypatch):
    """`hub build --together 4 --compile` trains through train()'s k-adapter mode, so the decoder
    blocks are compiled (as with --together 1) and the compiled graphs run; the modules equal an
    uncompiled build's up to compile rounding."""
    import efftune.train.loop as loop
    from efftune.cli import main
    from efftune.attach import decoder_blocks
    model_dir = tmp_path / "model"
    tiny_llama(layers=1).save_pretrained(model_dir)  # one block: one graph to compile (slow on CPU)
    tokenizer.save_pretrained(model_dir)
    size = tmp_path / "data" / "size.jsonl"
    size.write_text("".join(json.dumps({"input": f"Q: Is a {w} big?", "choices": ["yes", "no"], "answer": i % 2})
                            + "\n" for i, w in enumerate(WORDS * 2)))
    names = ["colors", "parity", "echo", "size"]
    compiled, compile_blocks = [], loop.compile_blocks

    def watched(model, **options):  # the loop's own compile_blocks, noting the model it compiled
        compiled.append(model)
        return compile_blocks(model, **options)
    monkeypatch.setattr(loop, "compile_blocks", watched)

    def build(out, *flags):
        code = main(["hub", "build", "--model", str(model_dir), "--tasks", ",".join(tasks + [str(size)]),
                     "--output", str(out), "--together", "4", "--steps", "1", "--batch-size", "2",
                     "--warmup-steps", "0", "--lr", "0.01", "--r", "2", "--target-modules", "q_proj,v_proj",
                     "--eval-size", "0", *flags])
        stdout, err = capsys.readouterr()
        assert code == 0, err
        return json.loads(stdout.strip().splitlines()[-1])

    frames = torch._dynamo.utils.counters["frames"]["ok"]
    summary = build(tmp_path / "compiled", "--compile")
    assert summary["built"] == names and summary["together"] == 4
    assert len(compiled) == 1  # one group of four: one model compiled, once
    blocks = decoder_blocks(compiled[0])
    assert len(blocks) == 1 and blocks[0]._compiled_call_impl is not None
    assert torch._dynamo.utils.counters["frames"]["ok"] > frames  # the compiled block ran (Dynamo traced it)
    index = json.loads((tmp_path / "compiled" / INDEX_FILE).read_text())["modules"]
    assert all(index[n]["trained_with"] == names for n in names)

    build(tmp_path / "eager")
    assert len(compiled) == 1  # without --compile nothing is compiled
    assert_same_modules(tmp_path / "compiled", tmp_path / "eager", names, atol=1e-5)
    moved = weights(tmp_path / "eager" / "size")
    assert any(v.abs().max() > 0 for key, v in moved.items() if "lora_B" in key)  # the step did something


def test_compiled_build_runs_every_group_compiled(tokenizer, tmp_path, monkeypatch):
    """Modules train under fixed slot names, so a compiled build's later groups reuse the first group's
    graph: with Dynamo's recompile limit lowered to 2 and 4 groups (a new adapter name per group
    would need 4 graphs: from the third group on the blocks would run eagerly), every group's step
    runs the compiled block, one graph serves all four, and the modules equal an eager build's."""
    import efftune.train.loop as loop
    from efftune.attach import decoder_blocks
    graphs, calls = [], []

    def counting(gm, example_inputs):  # a backend that runs the captured graph and counts its runs
        graphs.append(gm)

        def run(*args):
            calls.append(len(graphs))
            return gm.forward(*args)
        return run
    compile_blocks = loop.compile_blocks

    def watched(model, **options):  # the loop's own compile_blocks, its blocks then compiled with `counting`
        n = compile_blocks(model, **options)
        for block in decoder_blocks(model):
            block.compile(backend=counting)
        return n
    monkeypatch.setattr(loop, "compile_blocks", watched)
    rows = "".join(json.dumps({"input": f"Q: Is the {w} blue?", "choices": ["yes", "no"], "answer": i % 2}) + "\n"
                   for i, w in enumerate(WORDS))
    paths = []
    for t in range(4):  # the same examples: the same shapes in every group, so only the names could differ
        paths.append(tmp_path / f"task{t}.jsonl")
        paths[-1].write_text(rows)
    c = cfg(steps=1, batch_size=2, warmup_steps=0, save_every=0)
    ran = []
    torch._dynamo.reset()  # test isolation: earlier tests' graphs of the same block code count towards the limit
    with torch._dynamo.config.patch(recompile_limit=2):
        summary = build_library((tiny_llama(layers=1), tokenizer), [str(p) for p in paths], tmp_path / "compiled",
                                LORA, replace(c, compile=True), together=1, eval_size=0,
                                on_step=lambda names, done: ran.append((names, len(calls))))
    names = [f"task{t}" for t in range(4)]
    assert summary["built"] == names
    assert [n for n, _ in ran] == [[n] for n in names]
    counts = [0] + [k for _, k in ran]
    assert all(b > a for a, b in zip(counts, counts[1:])), counts  # each group's step ran the compiled block
    assert len(graphs) == 1  # one graph for all groups: no recompiles
    build_library((tiny_llama(layers=1), tokenizer), [str(p) for p in paths], tmp_path / "eager", LORA, c,
                  together=1, eval_size=0)
    assert_same_modules(tmp_path / "compiled", tmp_path / "eager", names, atol=1e-6)
    moved = weights(tmp_path / "eager" / "task3")
    assert any(v.abs().max() > 0 for key, v in moved.items() if "lora_B" in key)  # the step did something


def test_resumed_build_refuses_a_changed_setting_unless_resume_changed(tasks, tokenizer, tmp_path, capsys):
    """An unfinished module resumes only with the settings its checkpoint was made with; `hub build
    --resume-changed` accepts a change, resuming from the checkpoint (not from scratch)."""
    from efftune.cli import main
    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "lib"

    def stop(names, done):
        if done == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        build_library((tiny_llama(), tokenizer), tasks[:2], out, LORA, cfg(steps=4), together=2, eval_size=6,
                      on_step=stop)
    flags = ["hub", "build", "--model", str(model_dir), "--tasks", ",".join(tasks[:2]), "--output", str(out),
             "--together", "2", "--steps", "4", "--batch-size", "4", "--lr", "0.01", "--warmup-steps", "1",
             "--save-every", "2", "--r", "2", "--alpha", "4", "--eval-size", "6", "--max-length", "256"]
    capsys.readouterr()
    assert main(flags) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
    assert err == (f"efftune: error: hub build: module colors's checkpoint {out / WORK_DIR / 'colors' / 'checkpoints'}"
                   "/step-000002 was made with another train.max_length; the build resumes a module as it would "
                   "have run (pass --resume-changed to accept the change, or use another --output)")
    assert not (out / "colors").exists()
    assert main(flags + ["--resume-changed"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["built"] == ["colors", "parity"]
    for n in ("colors", "parity"):  # resumed: the metrics hold steps 1-2 once (from the checkpoint) and 3-4
        steps = [r["step"] for r in map(json.loads, (out / WORK_DIR / n / "metrics.jsonl").read_text().splitlines())
                 if "loss" in r and not r.get("eval")]
        assert steps == [1, 2, 3, 4], (n, steps)


def test_slot_groups_keep_each_checkpoints_adapter_name():
    """Modules take the first free slots, a module with a checkpoint the adapter name it holds; two
    whose checkpoints hold the same name go to different groups; the model's own adapters' names are skipped."""
    from efftune.compose.library import LibraryTask, _slot_groups
    tasks = [LibraryTask(n, n, [], []) for n in "abcde"]
    held = {"a": None, "b": "slot0", "c": "slot0", "d": None, "e": "colors"}
    groups = [([s.name for s in g], slots) for g, slots in _slot_groups(tasks, held, 3, {"slot1"})]
    assert groups == [(["a", "b", "d"], {"a": "slot2", "b": "slot0", "d": "slot3"}),
                      (["c", "e"], {"c": "slot0", "e": "colors"})]
    assert [[s.name for s in g] for g, _ in _slot_groups(tasks, dict.fromkeys("abcde"), 2, set())] == \
        [["a", "b"], ["c", "d"], ["e"]]


def test_a_slots_messages_name_its_module_directory(tmp_path):
    from efftune.train.together import Lane
    assert Lane("slot0", [], tmp_path / "colors", [], [], [0, 1]).label() == f"adapter slot0 ({tmp_path / 'colors'}): "
    assert Lane("colors", [], tmp_path / "colors", [], [], [0, 1]).label() == "adapter colors: "
    assert Lane(None, [], tmp_path, [], [], [0, 1]).label() == ""


def test_build_under_torchrun_refuses_fsdp_saying_why(tasks, tokenizer, tmp_path, monkeypatch, capsys):
    """fsdp shards the model in place for one group of modules, which the next group's adapters would
    attach to: under torchrun (or --nproc, before torchrun starts) a build with train.distributed fsdp
    is refused in one line, before anything is written; torchrun's flags need --nproc."""
    from efftune.cli import main
    message = "hub build cannot run train.distributed fsdp"
    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    common = ["hub", "build", "--model", str(model_dir), "--tasks", ",".join(tasks[:2]), "--output",
              str(tmp_path / "lib"), "--device", "cpu"]
    for extra, error in ((["--nproc", "1", "--distributed", "fsdp"], message),
                         (["--nnodes", "2"], "--nnodes is for several processes: add --nproc N"),
                         (["--nproc", "0"], "--nproc must be at least 1")):
        assert main([*common, *extra]) == 2
        assert error in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=f"{message}: fsdp shards the model in place .* use train.distributed ddp"):
        build_library((tiny_llama(), tokenizer), tasks, tmp_path / "lib", train_cfg=cfg(distributed="fsdp"))
    assert not (tmp_path / "lib").exists()


def test_build_on_two_ranks_equals_one_process(tasks, tokenizer, tmp_path, capsys):
    """`efftune hub build --nproc 2` (torchrun, 2 gloo ranks, float64): each group trains across the ranks
    (the global batch split), held-out accuracy is scored in shares and summed, and rank 0 alone writes:
    the modules equal a one-process build's, the index holds the same entries, the summary is printed
    once. Two groups (together 2 over 3 tasks: a pair, then one alone) run on the same model. Both
    builds run micro-batches of 2 (the one process accumulates two a step), so each forward lays out
    the same rows: a layout of all 4 examples in one forward is the same sum in another order, and
    Adam's first steps (update g / (|g| + eps) for gradients near eps) turn that rounding into
    differences of ~1e-8 here, where the same layout agrees to 1e-10."""

    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    order = [tasks[2], tasks[0], tasks[1]]  # echo (no held-out choices) with colors, then parity alone
    args = ["hub", "build", "--model", str(model_dir), "--tasks", ",".join(order), "--together", "2",
            "--steps", "2", "--batch-size", "4", "--lr", "0.01", "--warmup-steps", "1", "--r", "2",
            "--micro-batch-size", "2", "--eval-size", "4", "--dtype", "float64", "--device", "cpu"]
    one, two, done = one_and_two_ranks(args, tmp_path, capsys)
    assert done.stderr.count("hub build: training echo, colors") == 1  # the log too
    assert (two["built"], two["modules"]) == (one["built"], one["modules"]) == (["echo", "colors", "parity"], 3)
    names = ["echo", "colors", "parity"]
    assert_same_modules(tmp_path / "one", tmp_path / "two", names, atol=1e-10)
    a, b = (json.loads((tmp_path / d / INDEX_FILE).read_text()) for d in ("one", "two"))
    assert (a["base_model"], a["recipe"]) == (b["base_model"], b["recipe"])
    for n in names:
        ma, mb = ({k: v for k, v in m["modules"][n].items() if k not in ("seconds", "final_loss")} for m in (a, b))
        assert ma == mb, n
        assert a["modules"][n]["final_loss"] == pytest.approx(b["modules"][n]["final_loss"], rel=1e-9)
    assert a["modules"]["colors"]["accuracy_before"] is not None and a["modules"]["parity"]["accuracy_after"] is not None
    assert not list((tmp_path / "two" / WORK_DIR).glob("*/checkpoints/*"))  # the modules are the results


def test_only_rank_0_reads_the_base_of_a_build(tasks, tokenizer, tmp_path):
    """Under torchrun a build loads the base as `efftune train` does: rank 1's model directory holds a
    corrupt weight file, so it builds the model on the meta device and DDP sends it rank 0's; group
    after group (the second wraps the model rank 1 got filled) the modules equal one process's."""
    import shutil

    import torch.multiprocessing as mp

    from tests.train import dist_worker
    from tests.train.test_distributed import free_port
    base, unreadable = tmp_path / "model", tmp_path / "model-without-weights"
    tiny_llama().save_pretrained(base)
    tokenizer.save_pretrained(base)
    shutil.copytree(base, unreadable)
    (unreadable / "model.safetensors").write_bytes(b"not a safetensors file")
    kwargs = dict(tasks=tasks, lora_cfg=LORA, train_cfg=cfg(steps=2, micro_batch_size=2, save_every=0), together=2,
                  eval_size=4, dtype="float64", device="cpu")
    mp.spawn(dist_worker.spawned_build, nprocs=2, join=True,
             args=(2, free_port(), [str(base), str(unreadable)], {**kwargs, "output_dir": str(tmp_path / "two")}))
    build_library(str(base), output_dir=tmp_path / "one", log=lambda m: None, **kwargs)
    assert_same_modules(tmp_path / "one", tmp_path / "two", ["colors", "parity", "echo"], atol=1e-10)


def test_on_step_is_rank_0s_and_what_it_raises_stops_every_rank(tasks, tokenizer, tmp_path):
    """Under torchrun a build's `on_step` runs on rank 0 only (progress once, as the log): rank 1's is
    never called. A KeyboardInterrupt it raises after step 2 stops both ranks after that step, rank 0
    with it and rank 1 with an EfftuneError naming it, instead of leaving rank 1 waiting in step 3's
    collectives (each rank must end on its own: torch.multiprocessing does not stop the other here);
    step 1's checkpoint is kept and no module is written."""
    import time
    from functools import partial

    import torch.multiprocessing as mp

    from tests.train import dist_worker
    from tests.train.test_distributed import free_port
    base, record = tmp_path / "model", tmp_path / "on_step.txt"
    tiny_llama().save_pretrained(base)
    tokenizer.save_pretrained(base)
    kwargs = dict(tasks=tasks[:1], output_dir=str(tmp_path / "lib"), lora_cfg=LORA, eval_size=0, dtype="float64",
                  device="cpu", train_cfg=cfg(steps=3, micro_batch_size=2, save_every=1),
                  on_step=partial(dist_worker.stop_at, 2, str(record)))
    ranks = mp.spawn(dist_worker.spawned_build, nprocs=2, join=False,
                     args=(2, free_port(), [str(base)] * 2, kwargs, str(tmp_path)))
    deadline = time.monotonic() + 600  # far beyond the build's time: a rank left waiting never ends
    while not ranks.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ranks.processes:
                p.kill()
            pytest.fail(f"ranks still running: {[p.pid for p in ranks.processes if p.is_alive()]}")
    assert record.read_text().split("\n") == ["0 1", "0 2", ""]  # rank 0's calls only
    assert (tmp_path / "rank-0.outcome").read_text() == "KeyboardInterrupt: "
    assert (tmp_path / "rank-1.outcome").read_text() == "EfftuneError: rank 0 failed (KeyboardInterrupt)"
    assert (tmp_path / "lib" / WORK_DIR / "colors" / "checkpoints" / "step-000001").is_dir()
    assert not (tmp_path / "lib" / WORK_DIR / "colors" / "checkpoints" / "step-000002").exists()
    assert not (tmp_path / "lib" / "colors").exists()

"""BIG-bench loading against a small fake sdist laid out like the real one (no download)."""
import io
import json
import tarfile

import pytest

from efftune.data import Completion, MultipleChoice, load_task, split_examples, task_index
from efftune.errors import DataError

ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks/"


def add_task_file(tf, name, obj):
    """`obj` as JSON at `name` under the BIG-bench sdist's task folder of the open tar `tf`."""
    data = json.dumps(obj).encode()
    info = tarfile.TarInfo(ROOT + name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def fake_sdist(tmp_path, monkeypatch, tasks: dict[str, dict]):
    """The tests' stand-in for the BIG-bench sdist, in a cache of their own ($EFFTUNE_CACHE under
    `tmp_path`): each `tasks` entry (a path under the task folder, e.g.
    "yesno/task.json") holds its JSON. Returns the cache's bigbench folder."""
    monkeypatch.setenv("EFFTUNE_CACHE", str(tmp_path / "cache"))
    target = tmp_path / "cache" / "bigbench"
    target.mkdir(parents=True)
    with tarfile.open(target / "bigbench-1.0.0.tar.gz", "w:gz") as tf:
        for name, obj in tasks.items():
            add_task_file(tf, name, obj)
    return target


@pytest.fixture
def fake_bigbench(tmp_path, monkeypatch):
    return fake_sdist(tmp_path, monkeypatch, {
        "yesno/task.json": {
            "description": "answer yes or no", "append_choices_to_input": False,
            "examples": [{"input": f"Is {i} even?", "target_scores": {"yes": int(i % 2 == 0), "no": int(i % 2)}}
                         for i in range(20)]},
        "listed/task.json": {
            "task_prefix": "Pick one.", "examples": [{"input": "Colour of sky?",
                                                      "target_scores": {"red": 0, "blue": 1, "azure": 1}}]},
        "gen/task.json": {"example_input_prefix": "\nIn: ", "example_output_prefix": "\nOut: ",
                          "examples": [{"input": "2+2", "target": ["4", "four"]}]},
        "parent/task.json": {"description": "has subtasks"},
        "parent/one/task.json": {"examples": [{"input": "a", "target_scores": {"x": 1, "y": 0}}]},
        "parent/two/task.json": {"examples": [{"input": "b", "target_scores": {"x": 0, "y": 1}}]},
        "broken/task.json": {"examples": [{"nothing": 1}]}})


def test_index_lists_kinds_and_sizes(fake_bigbench):
    index = task_index()
    assert index["yesno"].kind == "multiple_choice" and index["yesno"].examples == 20
    assert index["gen"].kind == "generative"
    assert "parent" not in index and index["parent/one"].examples == 1
    assert (fake_bigbench / "index.json").exists()


def test_indexing_shows_progress_over_the_sdist(fake_bigbench, capsys):
    task_index()
    err = capsys.readouterr().err
    assert "indexing BIG-bench tasks (once)" in err and "100%" in err  # the whole sdist was read
    task_index()  # from the index file: nothing to show
    assert capsys.readouterr().err == ""


def test_multiple_choice_formatting(fake_bigbench):
    ex = load_task("yesno")
    assert len(ex) == 20 and all(isinstance(e, MultipleChoice) for e in ex)
    assert ex[0].prompt == "Q: Is 0 even?\nA: " and ex[0].choices == ("yes", "no") and ex[0].answer == 0
    listed = load_task("listed")[0]
    assert listed.prompt == "Pick one.\nQ: Colour of sky?\n  choice: red\n  choice: blue\n  choice: azure\nA: "
    assert listed.correct == (1, 2) and listed.answer == 1


def test_generative_and_subtasks(fake_bigbench):
    gen = load_task("gen")[0]
    assert isinstance(gen, Completion) and gen.prompt == "In: 2+2\nOut: " and gen.completion == "4"
    assert [e.prompt.split("\n")[0] for e in load_task("parent")] == ["Q: a", "Q: b"]


def test_only_requested_task_is_extracted(fake_bigbench):
    load_task("gen")
    extracted = sorted(p.parent.name for p in (fake_bigbench / "tasks").rglob("task.json"))
    assert extracted == ["gen"]


def test_unknown_task_suggests_names(fake_bigbench):
    with pytest.raises(DataError, match="no BIG-bench task named 'yesn'.*yesno"):
        load_task("yesn")


def test_bad_example_names_task_and_index(fake_bigbench):
    with pytest.raises(DataError, match="bigbench:broken: example 0"):
        load_task("broken")


def test_split_is_deterministic_and_disjoint(fake_bigbench):
    ex = load_task("yesno")
    tr1, ev1 = split_examples(ex, 5, seed=0)
    tr2, ev2 = split_examples(ex, 5, seed=0)
    assert ev1 == ev2 and tr1 == tr2 and len(ev1) == 5 and len(tr1) == 15
    assert not set(map(id, tr1)) & set(map(id, ev1))
    assert split_examples(ex, 0.25, seed=0)[1] == ev1


def test_tasks_command_lists_kind_and_size(fake_bigbench, capsys):
    from efftune.cli import main
    assert main(["tasks", "--kind", "multiple_choice"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "yesno\tmultiple_choice\t20" in lines and not any(l.startswith("gen\t") for l in lines)


def test_an_index_without_the_sdist_says_where_to_put_it(tmp_path, monkeypatch):
    """The package index may not offer bigbench==1.0.0 (seen: only a placeholder 0.0.1): one line that
    says so, names the cache folder a copy of the sdist goes into, and the way around it (--data)."""
    from efftune.data import bigbench
    from efftune.errors import EfftuneError
    monkeypatch.setenv("EFFTUNE_CACHE", str(tmp_path / "cache"))

    def no_release(requirement, dest):
        raise EfftuneError(f"could not download {requirement!r} from the package index (pip said: ERROR: No "
                           f"matching distribution found for {requirement})")
    monkeypatch.setattr(bigbench, "pip_download", no_release)
    with pytest.raises(DataError) as e:
        task_index()
    message = str(e.value)
    assert "\n" not in message and "bigbench==1.0.0" in message and "--data" in message
    assert str(tmp_path / "cache" / "bigbench") in message

"""Fault injection: a run killed anywhere loses nothing, and its resume ends bit-identical to a run
that was never interrupted (adapter tensors, metrics rows but their timings, summary but its timings).

Each faulted run is a real process, forked by multiprocessing's fork server (which imported torch and
efftune once, so a run costs about a second, not an import; forked from that single-threaded server,
not from this process, whose torch and progress-bar threads may hold a lock at the moment of a fork
and leave the child waiting on it forever: a CI run hung so) with EFFTUNE_FAULT naming the point where
it dies (`os._exit`, as abruptly as kill -9; `efftune.faults`). Then a fresh `efftune train --resume` (or, if the run died
before its first checkpoint, the same command again) must finish the job. `kill -9` at seeded random
times, SIGINT/SIGTERM and a full disk are checked the same way. The model is a random-init tiny
Llama and the data 24 rows, so the whole file takes about a minute on two cores.
"""
from __future__ import annotations

import errno
import functools
import json
import multiprocessing
import multiprocessing.process
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from efftune import faults
from efftune.cli import main
from efftune.train.checkpoint import latest_checkpoint, read_state
from tests.conftest import make_tokenizer, tiny_llama

ROWS = [{"input": f"Q: Is {w} blue?", "choices": ["yes", "no"], "answer": int(w != "sky")}
        for w in ["sky", "grass", "fox", "dog", "sky", "grass", "fox", "dog"] * 3]
# dropout makes the random-number state part of what a resume must restore
RUN = ["--batch-size", 4, "--save-every", 2, "--save-every-minutes", 0, "--eval-every", 2, "--eval-size", 8,
       "--rank", 2, "--dropout", 0.1, "--lr", "1e-2", "--warmup-steps", 1]
TIMINGS = {"seconds", "tokens_per_s", "train_seconds", "total_seconds", "resumed_from_step"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    tiny_llama().save_pretrained(d / "model")
    make_tokenizer().save_pretrained(d / "model")
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return d


def args(setup, out, steps=6, *extra):
    return ["train", "--model", setup / "model", "--data", setup / "data.jsonl", "--steps", steps, *RUN,
            "--output", out, *extra]


def train_here(argv) -> int:
    """`efftune ...` in this process (a resume after a crash; a reference run)."""
    faults.reset()
    return main([str(a) for a in argv])


@functools.cache
def _forks():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "efftune.cli", "tests.test_faults"])
    return context


def _child(argv: list[str], log: Path, fault: str | None) -> None:
    code = 99
    try:
        if fault:
            os.environ[faults.ENV] = fault
        faults.reset()
        sys.stdout = sys.stderr = open(log, "w", buffering=1)
        code = main(argv)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(code)


def start_child(argv, log: Path, fault: str | None = None) -> multiprocessing.process.BaseProcess:
    """`efftune ...` in a process of its own (module docstring) whose stdout/stderr go to `log`."""
    child = _forks().Process(target=_child, args=([str(a) for a in argv], log, fault))
    child.start()
    return child


def wait_child(child: multiprocessing.process.BaseProcess) -> int:
    """The child's exit code, or -N if signal N killed it."""
    child.join()
    return child.exitcode


def run_child(argv, log: Path, fault: str | None = None) -> int:
    return wait_child(start_child(argv, log, fault))


def outcome(out: Path) -> dict:
    """What a finished run produced, minus timings and the run's own directory name."""
    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if k not in TIMINGS}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value.replace(str(out), "OUT") if isinstance(value, str) else value
    return {
        "adapter": load_file(str(out / "adapter" / "adapter_model.safetensors")),
        "adapter_config": json.loads((out / "adapter" / "adapter_config.json").read_text()),
        "metrics": clean([json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]),
        "summary": clean(json.loads((out / "summary.json").read_text())),
    }


def assert_same(out: Path, reference: dict) -> None:
    got = outcome(out)
    assert got["adapter"].keys() == reference["adapter"].keys()
    for k, t in reference["adapter"].items():
        assert torch.equal(got["adapter"][k], t), f"{k} differs from the uninterrupted run"
    for part in ("metrics", "summary", "adapter_config"):
        assert got[part] == reference[part], part
    leftovers = [p.name for p in out.rglob("*") if p.name.endswith((".tmp", ".old"))]
    assert not leftovers, leftovers


@pytest.fixture(scope="module")
def reference(setup):
    """The uninterrupted runs every interrupted one must equal (6 and 12 steps)."""
    refs = {}
    for steps in (6, 12):
        out = setup / f"reference-{steps}"
        assert train_here(args(setup, out, steps)) == 0
        refs[steps] = outcome(out)
    # the reference does not depend on running in this process: a forked run gives the same
    assert run_child(args(setup, setup / "forked", 12), setup / "forked.log") == 0
    assert_same(setup / "forked", refs[12])
    return refs


def latest_step(out: Path) -> int | None:
    found = latest_checkpoint(out / "checkpoints") if (out / "checkpoints").is_dir() else None
    return read_state(found)["step"] if found else None


# (fault point, the checkpoint the crash must leave as `latest`): checkpoints come at steps 2, 4, 6
POINTS = [
    ("before_first_step", None),
    ("mid_step@3", 2),
    ("after_optimizer_step@4", 2),
    ("mid_metrics_append@5", 2),          # rows: eval 0, step 1, step 2, eval 2, step 3 (torn)
    ("checkpoint_after_weights@2", 2),
    ("checkpoint_mid_optimizer@2", 2),
    ("checkpoint_before_rename@2", 2),
    ("checkpoint_before_latest@2", 2),    # step-000004 complete, `latest` still step-000002
    ("before_prune@2", 4),
    ("final_eval", 6),
    ("after_adapter_save", 6),
    ("summary_write", 6),
]


def test_every_fault_point_is_tested():
    assert {p.split("@")[0] for p, _ in POINTS} | {"overwrite_before_commit"} == set(faults.POINTS)


@pytest.mark.parametrize("point, latest", POINTS, ids=[p for p, _ in POINTS])
def test_a_crash_at_a_fault_point_resumes_bit_identical(setup, reference, tmp_path, point, latest):
    out = tmp_path / "run"
    assert run_child(args(setup, out), tmp_path / "crash.log", fault=point) == faults.EXIT_CODE, \
        (tmp_path / "crash.log").read_text()[-2000:]
    assert latest_step(out) == latest  # the last good checkpoint survived, whole
    again = args(setup, out, 6, "--resume") if latest else args(setup, out)
    assert train_here(again) == 0
    assert_same(out, reference[6])
    if point == "final_eval":  # resuming the finished run once more changes nothing
        assert train_here(args(setup, out, 6, "--resume")) == 0
        assert_same(out, reference[6])


def test_a_crash_before_the_new_run_of_an_overwrite_commits_brings_the_old_run_back(setup, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(setup / "reference-6", out)
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    code = run_child(args(setup, out, 6, "--overwrite", "--seed", 1), tmp_path / "crash.log",
                     fault="overwrite_before_commit")
    assert code == faults.EXIT_CODE
    assert not (out / "checkpoints").exists()  # the new run had started in `out`, the old one aside
    # the next command on the directory finds the old run moved aside and puts it back first
    assert train_here(args(setup, out)) == 2
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crash.log", "run"]
    assert train_here(args(setup, out, 6, "--overwrite")) == 0
    assert_same(out, reference[6])


def test_kill_9_at_random_times_loses_nothing(setup, reference, tmp_path):
    out, rng = tmp_path / "run", random.Random(21)
    kills, newest = 0, None
    for attempt in range(12):
        log = tmp_path / f"run-{attempt}.log"
        child = start_child(args(setup, out, 12, *(["--resume"] if newest else [])), log)
        if attempt < 10:  # a seeded moment: while loading, or a little after a random step of the rest
            target = rng.randint(newest or 0, 12)
            if target > (newest or 0):
                _wait_for_step(out, target, child)
            time.sleep(rng.uniform(0, 0.15))
            os.kill(child.pid, signal.SIGKILL)
        code = wait_child(child)
        if code == 0:
            break
        assert code == -signal.SIGKILL, log.read_text()[-2000:]
        kills += 1
        step = latest_step(out)  # never behind the last good checkpoint seen: no kill lost one
        assert step is None or newest is None or step >= newest
        newest = step if step is not None else newest
    assert code == 0 and kills >= 4
    assert_same(out, reference[12])


def _wait_for_step(out: Path, step: int, child: multiprocessing.process.BaseProcess) -> None:
    """Block until the run in `out` has logged `step` (or the process ended)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        rows = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
        if any(f'"step": {step}, "loss"' in r for r in rows) or not child.is_alive():
            return
        time.sleep(0.01)


def test_sigterm_checkpoints_at_the_step_boundary_and_resumes_identically(setup, reference, tmp_path):
    out = tmp_path / "run"
    child = start_child(args(setup, out, 12), tmp_path / "term.log")
    _wait_for_step(out, 3, child)
    os.kill(child.pid, signal.SIGTERM)
    assert wait_child(child) == 143
    err = (tmp_path / "term.log").read_text()
    stopped = latest_step(out)
    assert stopped is not None and 3 <= stopped < 12  # the step it was in finished, then a checkpoint
    assert f"stopped after step {stopped}; checkpoint" in err and "resume with --resume" in err
    assert train_here(args(setup, out, 12, "--resume")) == 0
    assert_same(out, reference[12])


def test_ctrl_c_of_the_command_writes_a_checkpoint_and_resumes_identically(setup, reference, tmp_path):
    # the real entry point in its own interpreter (the kill and exit code a user sees)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "efftune.cli", *map(str, args(setup, out, 12))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        rows = (out / "metrics.jsonl").read_text() if (out / "metrics.jsonl").exists() else ""
        if '"step": 2, "loss"' in rows:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    stopped = latest_step(out)
    assert stopped is not None and 2 <= stopped < 12
    assert f"stopped after step {stopped}; checkpoint" in err and "Traceback" not in err
    assert train_here(args(setup, out, 12, "--resume")) == 0
    assert_same(out, reference[12])


def test_a_full_disk_leaves_the_previous_checkpoint_and_says_so(setup, reference, tmp_path, monkeypatch, capsys):
    import efftune.train.checkpoint as checkpoint
    real, calls = checkpoint.save_file, []

    def full_disk(tensors, path, *a, **kw):
        calls.append(path)
        if len(calls) == 6:  # the second checkpoint's optimizer state (4 files a checkpoint)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real(tensors, path, *a, **kw)
    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    out = tmp_path / "run"
    capsys.readouterr()
    assert train_here(args(setup, out)) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("efftune: error")]
    assert len(errors) == 1 and "Traceback" not in err
    last = errors[0]
    assert last.startswith("efftune: error: could not write ") and "No space left on device" in last
    assert f"the last checkpoint {out / 'checkpoints' / 'step-000002'} is intact" in last
    assert latest_step(out) == 2 and sorted(p.name for p in (out / "checkpoints").iterdir()) == \
        ["latest", "step-000002"]  # nothing half-written left behind
    monkeypatch.undo()
    assert train_here(args(setup, out, 6, "--resume")) == 0
    assert_same(out, reference[6])

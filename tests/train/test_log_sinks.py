"""--log tensorboard: every number of metrics.jsonl as a TensorBoard scalar, read back with
TensorBoard's own event reader; a resumed run's events are its metrics.jsonl."""
import json

import pytest

from efftune.errors import ConfigError
from efftune.train.log_sinks import MetricSinks, check_sinks

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

ROWS = [
    {"eval": True, "step": 0, "perplexity": 12.5, "eval_loss": 2.5257},
    {"step": 1, "loss": 2.4, "lr": 0.0005, "grad_norm": 1.25, "tokens_per_s": 812.0, "router": {"load": [0.75, 0.25]}},
    {"step": 2, "loss": 2.1, "lr": 0.001, "grad_norm": 0.5, "tokens_per_s": 830.5, "router": {"load": [0.5, 0.5]}},
    {"eval": True, "step": 2, "perplexity": 8.0, "eval_loss": 2.0794},
]


def read_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def write_metrics(run, rows):
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def expected(rows) -> dict[str, list[tuple[int, float]]]:
    """The scalars by hand: a tag per number, under train/ or eval/."""
    out: dict = {}
    for r in rows:
        section = "eval" if r.get("eval") else "train"
        for k, v in r.items():
            if k in ("step", "eval"):
                continue
            items = [(f"{k}/load/{i}", x) for i, x in enumerate(v["load"])] if k == "router" else [(k, v)]
            for tag, x in items:
                out.setdefault(f"{section}/{tag}", []).append((r["step"], pytest.approx(x)))
    return out


def test_every_metric_is_a_tensorboard_scalar(tmp_path):
    write_metrics(tmp_path, ROWS[:2])
    sinks = MetricSinks(["tensorboard"], tmp_path)
    sinks.sync()  # as at a checkpoint
    write_metrics(tmp_path, ROWS)
    sinks.close()  # the rows since, at the end
    assert read_scalars(tmp_path / "tensorboard") == expected(ROWS)


def test_a_resumed_run_replaces_the_steps_past_its_checkpoint(tmp_path):
    killed = ROWS + [{"step": 3, "loss": 9.0, "lr": 0.001, "grad_norm": 9.0, "tokens_per_s": 1.0}]
    write_metrics(tmp_path, killed)
    MetricSinks(["tensorboard"], tmp_path).close()  # the first process, killed after step 3
    resumed = ROWS + [{"step": 3, "loss": 1.9, "lr": 0.001, "grad_norm": 0.4, "tokens_per_s": 829.0}]
    write_metrics(tmp_path, resumed)  # resumed from step 2's checkpoint, step 3 again
    MetricSinks(["tensorboard"], tmp_path).close()
    assert read_scalars(tmp_path / "tensorboard") == expected(resumed)


def test_unknown_sink_is_refused():
    with pytest.raises(ConfigError, match="log: unknown sink 'tensorbored'"):
        check_sinks(["tensorbored"])


def test_rows_reach_tensorboard_as_the_loop_writes_them(tmp_path):
    """The loop's on_metrics: each row is in TensorBoard's files once flushed, before the run ends."""
    sinks = MetricSinks(["tensorboard"], tmp_path)
    for i, row in enumerate(ROWS):
        write_metrics(tmp_path, ROWS[:i + 1])  # the loop appends the row, then calls on_metrics
        sinks.on_metrics(None, row)
        sinks.flush()  # as at a checkpoint (and every 15 s by itself)
        assert read_scalars(tmp_path / "tensorboard") == expected(ROWS[:i + 1])
    sinks.close()
    assert read_scalars(tmp_path / "tensorboard") == expected(ROWS)


def wandb_history(run_file) -> list[dict]:
    """The history rows an offline wandb run wrote, read back from its `.wandb` file: a LevelDB-style
    log (a 7-byte ':W&B' header, then 32 KiB blocks of records: crc32 4, length 2, type 1 (full, first,
    middle, last), data), each record a wandb protobuf `Record`."""
    from wandb.proto import wandb_internal_pb2
    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    rows, pos, block, pending = [], 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
    return rows


def test_wandb_offline_gets_every_row(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    sinks = MetricSinks(["wandb"], tmp_path)
    for i, row in enumerate(ROWS):
        write_metrics(tmp_path, ROWS[:i + 1])
        sinks.on_metrics(None, row)
    sinks.close()
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    history = wandb_history(run_file)
    # every scalar of every row, at its row's step (wandb's own "_step"); rows of one step may share a row
    got: dict = {}
    for h in history:
        for tag, value in h.items():
            if not tag.startswith("_"):
                got.setdefault(tag, []).append((h["_step"], pytest.approx(value)))
    assert got == expected(ROWS)

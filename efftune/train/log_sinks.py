"""Metrics beyond metrics.jsonl: TensorBoard scalars and Weights & Biases (`--log tensorboard,wandb`).

metrics.jsonl stays the run's record (resume reads it, the plots come from it); a sink mirrors its
rows as the loop writes them (`train(on_metrics=sinks.on_metrics)`), so TensorBoard shows a run
live. Every number of a row becomes a scalar at the
row's step: a training row's keys under `train/` (loss, lr, grad_norm, tokens_per_s, MoE router
stats, ...), an evaluation's under `eval/`; lists are written per index, mappings per key.

Each process sends the whole of metrics.jsonl on its first sync, with its TensorBoard writer's
`purge_step` at the first row's step: TensorBoard's reader then drops what an earlier process
wrote from that step on. So a resumed run's events are exactly its metrics.jsonl, without the
steps a killed run logged past its last checkpoint.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

from ..errors import ConfigError
from .loop import read_metrics

SINKS = ("tensorboard", "wandb")
EXTRAS = {"tensorboard": ("tensorboard", 'pip install "efftune[log]"'), "wandb": ("wandb", 'pip install "efftune[wandb]"')}
SKIP = ("step", "eval")  # bookkeeping keys, not metrics


def check_sinks(names: list[str]) -> None:
    for name in names:
        if name not in SINKS:
            raise ConfigError(f"log: unknown sink {name!r} (known: {', '.join(SINKS)})")


def scalars(row: dict) -> Iterator[tuple[str, float]]:
    """(tag, value) for every number in a metrics row."""
    section = "eval" if row.get("eval") else "train"

    def walk(tag: str, value) -> Iterator[tuple[str, float]]:
        if isinstance(value, bool):
            yield tag, float(value)
        elif isinstance(value, (int, float)):
            if math.isfinite(value):
                yield tag, float(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                yield from walk(f"{tag}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                yield from walk(f"{tag}/{i}", v)

    for key, value in row.items():
        if key not in SKIP:
            yield from walk(f"{section}/{key}", value)


class TensorBoardSink:
    def __init__(self, log_dir: Path, purge_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(f"--log tensorboard needs the tensorboard package: {EXTRAS['tensorboard'][1]}") from None
        # flush_secs: TensorBoard's default (120 s) leaves a live run's curves minutes behind
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step, flush_secs=15)

    def write(self, row: dict) -> None:
        for tag, value in scalars(row):
            self.writer.add_scalar(tag, value, global_step=int(row.get("step", 0)))

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """wandb reads WANDB_MODE (offline, disabled) and WANDB_PROJECT itself; its files go under the
    run directory."""

    def __init__(self, run_dir: Path, config: dict):
        try:
            import wandb
        except ImportError:
            raise ConfigError(f"--log wandb needs the wandb package: {EXTRAS['wandb'][1]}") from None
        self.wandb = wandb
        self.run = wandb.init(dir=str(run_dir), config=config, project=None, name=run_dir.name, resume="allow")

    def write(self, row: dict) -> None:
        self.run.log(dict(scalars(row)), step=int(row.get("step", 0)))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


class MetricSinks:
    """The sinks `names` asks for, fed from `run_dir`/metrics.jsonl."""

    def __init__(self, names: list[str], run_dir: Path, config: dict | None = None):
        check_sinks(names)
        self.names, self.run_dir, self.config = list(names), Path(run_dir), config or {}
        self.sinks: list = []
        self.sent = 0  # rows of metrics.jsonl already sent

    def _open(self, rows: list[dict]) -> None:
        first = int(rows[0].get("step", 0)) if rows else 0
        for name in self.names:
            if name == "tensorboard":
                self.sinks.append(TensorBoardSink(self.run_dir / "tensorboard", purge_step=first))
            else:
                self.sinks.append(WandbSink(self.run_dir, self.config))

    def sync(self, *_) -> None:
        """Send the rows of metrics.jsonl not sent yet (takes and ignores a checkpoint path, so it
        can follow `on_checkpoint`)."""
        if not self.names:
            return
        path = self.run_dir / "metrics.jsonl"
        rows = read_metrics(path) if path.is_file() else []
        if not rows:
            return
        if not self.sinks:  # the first sync of this process sends every row, from the first step on
            self._open(rows)
        for row in rows[self.sent:]:
            for sink in self.sinks:
                sink.write(row)
        self.sent = len(rows)
        for sink in self.sinks:
            sink.flush()

    def on_metrics(self, adapter: str | None, row: dict) -> None:
        """The loop's `on_metrics`: `row` was just appended to metrics.jsonl. The first call of a
        process sends the whole file (a resumed run's history, this row last); later ones the row."""
        if not self.names:
            return
        if not self.sinks:
            self.sync()
            return
        for sink in self.sinks:
            sink.write(row)
        self.sent += 1

    def flush(self, *_) -> None:
        """Write what the sinks hold to disk (takes and ignores a checkpoint path, so it can follow
        `on_checkpoint`)."""
        for sink in self.sinks:
            sink.flush()

    def close(self, sync: bool = True) -> None:
        if sync:
            self.sync()
        for sink in self.sinks:
            sink.close()
        self.sinks = []

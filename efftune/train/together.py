"""Several LoRA adapters trained at once: the lanes of `efftune.train.loop.train`.

A *lane* is what one run trains: the model's trainable parameters on one list of examples (the
plain loop has one lane, the whole run), or one of k LoRA adapters on its own examples (`train`
given `{adapter: sequences}`, the module library's `--together k`). A lane has everything a run
training it alone would have: its examples in their own seeded order, its loss normalised by its
own answer tokens, its gradient clipping, metrics, checkpoints, evaluations and MoE balance loss.
The lanes' rows share each forward/backward over the frozen base (`mixed_adapter_batch`: each row
goes through its own lane's adapter only) and the loss is the sum of the lanes' losses; adapters
share no parameters, so each gets exactly the gradient it would get alone. One AdamW steps every
lane (two groups a lane; AdamW is elementwise), and a lane's checkpoint holds its own part of it
in the format of a one-lane run, so a lane's checkpoint resumes alone or beside others.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from ..data.layout import Batch
from ..data.tokenize import Encoded
from ..errors import ConfigError
from ..methods.lora.layer import adapter_names, lora_layers


@dataclass
class Lane:
    """One adapter's run (or, with `name` None, the whole run) and where it stands."""
    name: str | None
    sequences: Sequence[Encoded]
    directory: Path                # metrics.jsonl, checkpoints/, training.png
    params: list[torch.Tensor]     # model order, as the optimizer holds them
    param_names: list[str]
    groups: list[int]              # its optimizer groups (weight-decayed matrices, the rest)
    start: int = 0                 # the step it resumed from
    rows: list[dict] = field(default_factory=list)   # its metrics.jsonl
    evals: list[dict] = field(default_factory=list)
    last_ckpt: Path | None = None  # its newest checkpoint on disk
    unconfirmed: bool = False      # True until a forward pass with last_ckpt's weights gave a finite loss
    zero_grad: int = 0             # consecutive steps with a zero gradient norm
    routing_load: list | None = None  # MoE: tokens per (layer, expert), summed over the run

    @property
    def metrics_path(self) -> Path:
        return self.directory / "metrics.jsonl"

    @property
    def ckpt_root(self) -> Path:
        return self.directory / "checkpoints"

    def label(self) -> str:
        """How messages name the lane: nothing for the whole run; an adapter by its name, and by its
        run directory where that is not named after it (the module library's slots)."""
        if self.name is None:
            return ""
        return f"adapter {self.name}: " if self.directory.name == self.name else \
            f"adapter {self.name} ({self.directory}): "


def make_lanes(model: nn.Module, sequences: Sequence[Encoded] | Mapping[str, Sequence[Encoded]],
               params: list[torch.Tensor], output_dir: Path,
               run_dirs: Mapping[str, Path] | None = None) -> list[Lane]:
    """The run's lanes: one over `params` writing to `output_dir`, or, for a mapping {adapter:
    sequences}, one a LoRA adapter writing to `run_dirs[adapter]` (default `output_dir/<adapter>/`),
    each over the parameters of `params` that are its adapter's. Every parameter of `params` must
    be one adapter's."""
    names = {id(p): n for n, p in model.named_parameters()}
    if not isinstance(sequences, Mapping):
        if not sequences:
            raise ConfigError("no training examples")
        return [Lane(None, sequences, output_dir, params, [names[id(p)] for p in params], [0, 1])]
    if not sequences:
        raise ConfigError("train: no adapters to train (an empty mapping of adapter -> examples)")
    known = adapter_names(model)
    owner: dict[int, str] = {}
    for name in sequences:
        if name not in known:
            raise ConfigError(f"train: the model has no LoRA adapter named {name!r} (have: {', '.join(known) or 'none'})")
        if not sequences[name]:
            raise ConfigError(f"train: no training examples for adapter {name!r}")
        for _, layer in lora_layers(model):
            if name in layer.adapters:
                owner.update((id(p), name) for p in layer.adapters[name].parameters())
    stray = [names[id(p)] for p in params if id(p) not in owner]
    if stray:
        raise ConfigError(f"train: {stray[0]} is trainable but belongs to none of the adapters trained at once "
                          f"({', '.join(sequences)}); freeze it or train it on its own")
    lanes = []
    for i, name in enumerate(sequences):
        mine = [p for p in params if owner[id(p)] == name]
        if not mine:
            raise ConfigError(f"train: adapter {name!r} has no trainable parameters")
        directory = Path((run_dirs or {}).get(name, output_dir / name))
        lanes.append(Lane(name, sequences[name], directory, mine, [names[id(p)] for p in mine], [2 * i, 2 * i + 1]))
    return lanes


def lane_losses(logp: torch.Tensor, batch: Batch, owner: Sequence[int], n_targets: Sequence[int]
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """For rows of several lanes (`owner[i]`: the lane of row i of `batch`) and the log-probs of their
    targets: each lane's answer NLL divided by its own answer tokens in the step (`n_targets`), and
    each lane's real tokens (B, L), which its MoE balance loss counts."""
    lane_of_row = torch.tensor(owner, device=logp.device)
    losses = torch.zeros(len(n_targets), dtype=logp.dtype, device=logp.device).index_add(
        0, lane_of_row[batch.rows], -logp) / torch.tensor(n_targets, dtype=logp.dtype, device=logp.device)
    return losses, [batch.real & (lane_of_row == j)[:, None] for j in range(len(n_targets))]


def lane_optimizer(optimizer: torch.optim.Optimizer, lane: Lane) -> torch.optim.Optimizer:
    """The lane's part of `optimizer` as an optimizer of its own: its groups and its parameters'
    state (the same tensors, not copies). It is what a run training the lane alone holds, so a
    checkpoint written or read through it fits either. Used to save and load, never to step."""
    view = type(optimizer)([{**optimizer.param_groups[g]} for g in lane.groups])
    for p in lane.params:
        if p in optimizer.state:
            view.state[p] = optimizer.state[p]
    return view


def take_lane_state(optimizer: torch.optim.Optimizer, lane: Lane, view: torch.optim.Optimizer) -> None:
    """Put what `view` (from `lane_optimizer`, loaded from a checkpoint since) holds back into
    `optimizer`: the lane's parameters' state and its groups' settings."""
    for p in lane.params:
        if p in view.state:
            optimizer.state[p] = view.state[p]
        else:
            optimizer.state.pop(p, None)
    for g, loaded in zip(lane.groups, view.param_groups):
        optimizer.param_groups[g].update({k: v for k, v in loaded.items() if k != "params"})

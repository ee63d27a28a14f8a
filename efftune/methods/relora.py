"""ReLoRA (Lialin et al. 2023): high-rank training through low-rank updates merged and restarted.

Every `restart_every` steps each LoRA update is folded into its base weight (`W += s·B·A`),
`A` is drawn again (Kaiming-uniform) and `B` set to zero — the model's output does not change —
and the optimizer state of the LoRA parameters is reset (zeroed, or pruned to its largest or a
random fraction). Because each cycle learns a new rank-r update, the total `W − W0` can exceed
rank r. The learning rate follows a jagged cosine: a short re-warmup after every restart.
Modules named in `full_rank` (embeddings, norms, LM head) train at full rank throughout.

Warm start (`warm_start_steps`): the run begins full-rank. For those steps the wrapped base
weights train and the adapters sit out of the forward pass (A at its init, B at zero); at the
switch the base weights are frozen again, their optimizer state is dropped, and LoRA training
starts where the full-rank phase ended (B = 0, so the output does not change). The switch is
followed by a re-warmup like a restart, and restarts are counted from it.

The merged base weights are part of the training state: checkpoints carry them, so a run
resumed mid-cycle continues exactly.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..attach import name_matches
from ..errors import AdapterError, ConfigError
from ..schedule import jagged_cosine, warmup_cosine
from .hooks import TrainHooks
from .lora.layer import lora_layers
from .lora.model import add_lora, export_merged
from .registry import Method

if TYPE_CHECKING:
    from ..train.loop import TrainConfig

RESETS = ("zero", "magnitude", "random")


@dataclass
class ReLoraConfig:
    restart_every: int = 100          # steps between merge-and-restart
    rewarmup_steps: int = 10          # LR re-warmup after each restart
    optimizer_reset: str = "magnitude"  # zero | magnitude | random
    prune_fraction: float = 0.9       # fraction of each LoRA moment removed (magnitude / random)
    full_rank: list[str] = field(default_factory=list)  # module suffixes trained at full rank
    warm_start_steps: int = 0         # full-rank steps (base weights train, LoRA waits) before LoRA

    def __post_init__(self):
        if self.restart_every < 1:
            raise ConfigError(f"relora.restart_every must be at least 1, got {self.restart_every}")
        if self.optimizer_reset not in RESETS:
            raise ConfigError(f"relora.optimizer_reset must be one of {RESETS}, got {self.optimizer_reset!r}")
        if not 0.0 <= self.prune_fraction <= 1.0:
            raise ConfigError(f"relora.prune_fraction must be in [0, 1], got {self.prune_fraction}")
        if self.warm_start_steps < 0:
            raise ConfigError(f"relora.warm_start_steps must be at least 0, got {self.warm_start_steps}")


def train_full_rank(model: nn.Module, suffixes: list[str]) -> list[str]:
    """Switch on training of every parameter of the named modules (e.g. embed_tokens, norm)."""
    names = []
    for name, module in model.named_modules():
        if name and name_matches(name, suffixes) and not isinstance(module, nn.ModuleDict):
            module.requires_grad_(True)
            names.append(name)
    if suffixes and not names:
        raise ConfigError(f"relora.full_rank {suffixes} matches no module")
    return names


@torch.no_grad()
def merge_and_restart(model: nn.Module, adapter: str = "default") -> None:
    """Fold each LoRA update into its base weight, then re-draw A and zero B (output unchanged)."""
    for _, layer in lora_layers(model):
        if adapter not in layer.adapters:
            continue
        a = layer.adapters[adapter]
        w = layer.base_layer.weight
        w.add_(layer.to_weight_layout(a.delta_weight()).to(w.dtype))
        nn.init.kaiming_uniform_(a.lora_A, a=math.sqrt(5))
        a.lora_B.zero_()


@torch.no_grad()
def reset_optimizer_state(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], how: str,
                          prune_fraction: float) -> None:
    """Reset the moments of `params` only: zero them, or keep (1 - p) of the entries, chosen by
    the magnitude of the first moment or at random.

    One mask per parameter serves all its moments: pruning Adam's first and second moments in
    different places would leave m / sqrt(v) with v = 0 and m != 0, a huge step.
    """
    for p in params:
        state = optimizer.state.get(p)
        if not state:
            continue
        moments = [v for v in state.values() if torch.is_tensor(v) and v.shape == p.shape]  # not `step`
        if not moments:
            continue
        drop = int(round(prune_fraction * p.numel()))
        if how == "zero" or drop >= p.numel():
            keep = torch.zeros_like(moments[0], dtype=torch.bool)
        elif how == "magnitude":
            ref = state.get("exp_avg", moments[0]).abs().flatten()
            keep = torch.zeros(p.numel(), dtype=torch.bool, device=p.device)
            keep[ref.topk(p.numel() - drop).indices] = True
            keep = keep.view_as(p)
        else:
            keep = torch.rand(p.shape, device=p.device) >= prune_fraction
        for value in moments:
            value.mul_(keep)


class ReLoraHooks(TrainHooks):
    """Plugs ReLoRA into `efftune.train.loop.train` (pass `hooks=ReLoraHooks(model, cfg)`).

    Warm start keeps the set of parameters with requires_grad the same in both phases (the LoRA
    factors and the full-rank modules), so a checkpoint from either phase loads into a freshly
    built model: the base weights get requires_grad only while a training forward pass of the
    warm phase runs (a forward pre-hook turns it on, `after_step` off again), and the adapters
    sit out of the forward pass until the switch, so they get no gradient. The optimizer holds
    the base weights from the start (AdamW skips a parameter whose gradient is None); their
    state is dropped at the switch. The phase is a function of the step, which checkpoints
    carry (`relora.steps_done`).
    """

    keeps_base_weights = False  # restarts merge into the base weights; warm start trains them

    def __init__(self, model: nn.Module, config: ReLoraConfig, adapter: str = "default"):
        self.model, self.config, self.adapter = model, config, adapter
        self.layers = [(name, layer) for name, layer in lora_layers(model) if adapter in layer.adapters]
        if not self.layers:
            raise ConfigError("ReLoRA needs a LoRA adapter attached to the model")
        self.restarts = 0
        self.steps_done = 0
        self.warming = False
        self._handles: list = []
        self._active: dict[str, list[str]] = {}
        if config.warm_start_steps > 0:
            self._enter_warm_start()

    def lora_parameters(self) -> list[torch.Tensor]:
        return [p for _, layer in self.layers for p in layer.adapters[self.adapter].parameters()]

    def base_weights(self) -> list[torch.Tensor]:
        return [layer.base_layer.weight for _, layer in self.layers]

    # -- warm start ----------------------------------------------------------------------------
    def _enter_warm_start(self) -> None:
        self.warming = True
        for name, layer in self.layers:
            self._active[name] = list(layer.active)
            layer.active = [n for n in layer.active if n != self.adapter]
            layer.base_layer.weight.requires_grad_(False)
            self._handles.append(layer.register_forward_pre_hook(_train_base_weight))

    def _leave_warm_start(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.warming = False
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for name, layer in self.layers:
            layer.active = self._active.pop(name)
            w = layer.base_layer.weight
            w.requires_grad_(False)
            w.grad = None
            if optimizer is not None:
                optimizer.state.pop(w, None)  # frees the full-rank Adam moments

    def parameters(self, model: nn.Module) -> list[torch.Tensor]:
        """The trainable parameters, plus the base weights when there is a warm start."""
        base = {id(w) for w in self.base_weights()} if self.config.warm_start_steps > 0 else set()
        return [p for p in model.parameters() if p.requires_grad or id(p) in base]

    # -- the loop's hooks ------------------------------------------------------------------------
    def lr_multiplier(self, step: int, config: TrainConfig) -> float:
        c = self.config
        if c.warm_start_steps == 0:
            return jagged_cosine(step, config.steps, config.warmup_steps, c.restart_every,
                                 c.rewarmup_steps, config.min_lr_ratio)
        # one cosine over the whole run; re-warmups after the switch and after each restart
        base = warmup_cosine(step, config.steps, config.warmup_steps, config.min_lr_ratio)
        since = step - c.warm_start_steps
        if since >= 0 and since % c.restart_every < c.rewarmup_steps:
            return base * (since % c.restart_every + 1) / (c.rewarmup_steps + 1)
        return base

    def after_step(self, done: int, optimizer: torch.optim.Optimizer) -> dict:
        self.steps_done = done
        if self.warming:
            for w in self.base_weights():
                w.requires_grad_(False)
            if done < self.config.warm_start_steps:
                return {}
            self._leave_warm_start(optimizer)
            return {"relora_switch": True}
        since = done - self.config.warm_start_steps
        if since <= 0 or since % self.config.restart_every:
            return {}
        merge_and_restart(self.model, self.adapter)
        reset_optimizer_state(optimizer, self.lora_parameters(), self.config.optimizer_reset,
                              self.config.prune_fraction)
        self.restarts += 1
        return {"relora_restart": True}

    def state(self) -> dict[str, torch.Tensor]:
        """The base weights restarts (or the warm start) have changed: they differ from the
        model files; with a warm start, also the step, which fixes the phase."""
        out = {f"{name}.base_layer.weight": layer.base_layer.weight for name, layer in self.layers}
        if self.config.warm_start_steps > 0:
            out["relora.steps_done"] = torch.tensor([self.steps_done], dtype=torch.int64)
        return out

    @torch.no_grad()
    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, layer in self.layers:
            key = f"{name}.base_layer.weight"
            if key not in tensors:
                raise ConfigError(f"checkpoint lacks ReLoRA's merged weight {key!r}")
            layer.base_layer.weight.copy_(tensors[key])
        if self.config.warm_start_steps > 0:
            if "relora.steps_done" not in tensors:
                raise ConfigError("checkpoint lacks relora.steps_done: it was made without a warm start")
            self.steps_done = int(tensors["relora.steps_done"][0])
            if self.warming and self.steps_done >= self.config.warm_start_steps:
                self._leave_warm_start()  # the optimizer loaded no state for the base weights
            self.restarts = max(0, self.steps_done - self.config.warm_start_steps) // self.config.restart_every


def _train_base_weight(layer: nn.Module, args) -> None:
    """Forward pre-hook of a LoRA layer during warm start: its base weight takes a gradient in
    a training forward pass (`ReLoraHooks.after_step` turns that off after the step)."""
    if layer.training and torch.is_grad_enabled():
        layer.base_layer.weight.requires_grad_(True)


def relora_hooks(model: nn.Module, run_config) -> ReLoraHooks:
    """The hooks of `method: relora`: the run config's `relora` section, full-rank modules on."""
    if run_config.lora.use_dora:
        raise ConfigError("relora with lora.use_dora is not supported: its restarts fold B·A into the weights, "
                          "and DoRA's magnitudes would have to be restarted too")
    train_full_rank(model, run_config.relora.full_rank)
    return ReLoraHooks(model, run_config.relora)


def save_relora(model: nn.Module, directory: str | os.PathLike, config, metadata: dict | None = None) -> Path:
    """ReLoRA's result: the restarts merged into the base weights, so a whole model directory
    (the last cycle's adapter merged in), which transformers loads as it is."""
    return export_merged(model, None, directory)


def load_relora(model: nn.Module, directory: str | os.PathLike):
    raise AdapterError(f"adapter: {directory} is a ReLoRA run's result, a whole model: load it with --model {directory}")


# ReLoRA changes the base weights at every restart, so its result is a whole model.
METHOD = Method("relora", "lora", attach=add_lora, save=save_relora, load=load_relora, hooks=relora_hooks,
                artifact="model", writes_base=True,
                not_shardable="it merges its LoRA into the frozen base weights at each restart, which FSDP keeps "
                              "sharded across the ranks")

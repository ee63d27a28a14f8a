"""ESFT, Expert-Specialized Fine-Tuning (Wang et al. 2024): train only the experts a task routes to.

1. `expert_affinity` runs task data through the model and measures, per MoE layer and expert, the
   average gate score (routing weight, 0 where not chosen) and the token-selection ratio (share of
   the T·k top-k picks).
2. `select_experts` keeps per layer the smallest set of experts whose scores (normalised to sum 1)
   reach `threshold` p, the paper's rule, or the top `top_fraction` of experts.
3. Training: `mode="full"` trains the selected experts' own weights. They are copied out of the
   fused 3-D parameters into separate parameters (`EsftExperts.gate_up_proj` (n, 2I, H),
   `.down_proj` (n, H, I)); the fused ones stay frozen, so no optimizer ever sees — or decays —
   a non-selected expert. `mode="lora"` puts expert LoRA on the selected experts only.

On disk (full mode; lora mode writes expert_lora's format): `esft_config.json` {"method": "esft",
"format_version": 1, "mode", "experts": {experts path: [ids]}, "base_model_name_or_path", ...} and
`esft_model.safetensors` with `<experts path>.gate_up_proj` / `.down_proj`: the selected experts'
whole weights, row i for expert experts[path][i]. Loading overwrites those experts' weights.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from ..attach import freeze_base, master_dtype, replace_module, wrappers
from ..checks import positive_ints, positive_numbers
from ..errors import AdapterError, ConfigError, EfftuneError
from ..files import AdapterFormat
from ..moe.experts import IMPLS, Dispatch, GroupedExperts, PackedExperts, experts_modules
from ..moe.router_tap import add_router_taps, remove_router_taps, router_taps
from .expert_lora import ExpertLoraConfig, add_expert_lora, load_expert_lora, save_expert_lora
from .registry import Method

MODES = ("full", "lora")
SCORES = ("gate", "token")
CONFIG_FILE = "esft_config.json"
WEIGHTS_FILE = "esft_model.safetensors"
FORMAT = AdapterFormat("esft", CONFIG_FILE, WEIGHTS_FILE)


@dataclass
class EsftConfig:
    """`score`: rank experts by average gate score ("gate", ESFT-Gate) or token-selection ratio
    ("token", ESFT-Token). Exactly one of `threshold` (cumulative share p) and `top_fraction`.
    `selection`: a JSON file {experts path: [ids]} (from `save_selection`) used instead of
    measuring; `data`: a JSONL file (efftune's format) to measure affinity on, at most
    `max_examples` rows. `r`, `alpha`: LoRA rank and alpha in mode "lora"."""
    mode: str = "full"
    score: str = "gate"
    threshold: float | None = None     # neither set: threshold 0.2
    top_fraction: float | None = None
    selection: str | None = None
    data: str | None = None
    max_examples: int = 256
    r: int = 16
    alpha: float = 32.0
    impl: str = "auto"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"esft.mode must be one of {MODES}, got {self.mode!r}")
        if self.score not in SCORES:
            raise ConfigError(f"esft.score must be one of {SCORES}, got {self.score!r}")
        if self.top_fraction is not None and self.threshold is not None:
            raise ConfigError("esft.threshold and esft.top_fraction are both set; choose one")
        if self.top_fraction is None and self.threshold is None:
            self.threshold = 0.2
        if self.top_fraction is not None:
            if not 0 < self.top_fraction <= 1:
                raise ConfigError(f"esft.top_fraction must be in (0, 1], got {self.top_fraction!r}")
        elif self.threshold is None or not 0 < self.threshold <= 1:
            raise ConfigError(f"esft.threshold must be in (0, 1], got {self.threshold!r}")
        positive_ints("esft", self, "max_examples")
        if self.impl not in IMPLS:
            raise ConfigError(f"esft.impl must be one of {IMPLS}, got {self.impl!r}")
        positive_ints("esft", self, "r")
        positive_numbers("esft", self, "alpha")


@dataclass
class ExpertAffinity:
    """layers: experts-module paths; gate (L, E): mean routing weight per token; token (L, E):
    share of the top-k picks (rows sum to 1); tokens: how many tokens were measured."""
    layers: list[str]
    gate: torch.Tensor
    token: torch.Tensor
    tokens: int


@torch.no_grad()
def expert_affinity(model: nn.Module, batches: Iterable) -> ExpertAffinity:
    """Route `batches` (input_ids (B, L) tensors, or dicts of model inputs with an optional
    attention_mask, whose padding is not counted) through `model` and measure every expert."""
    had_taps = bool(router_taps(model))
    add_router_taps(model)
    taps = router_taps(model)
    layers = [t.experts_path for t in taps]
    gate = token = None
    total = 0
    try:
        for batch in batches:
            inputs = batch if isinstance(batch, dict) else {"input_ids": batch}
            model(**inputs)
            mask = inputs.get("attention_mask")
            keep = None if mask is None else mask.reshape(-1).bool()
            for i, t in enumerate(taps):
                if t.last_indices is None:
                    raise EfftuneError(f"{t.experts_path}: its router returns no top-k choice; ESFT needs "
                                       "(logits, scores, indices) routers")
                idx, w = t.last_indices, t.last_scores.float()
                if keep is not None:
                    idx, w = idx[keep], w[keep]
                num_experts = t.last_logits.shape[-1]
                if gate is None:
                    gate = torch.zeros(len(taps), num_experts, dtype=torch.float64)
                    token = torch.zeros(len(taps), num_experts, dtype=torch.float64)
                gate[i].index_add_(0, idx.reshape(-1).cpu(), w.reshape(-1).double().cpu())
                token[i].index_add_(0, idx.reshape(-1).cpu(), torch.ones(idx.numel(), dtype=torch.float64))
            total += int(keep.sum()) if keep is not None else int(inputs["input_ids"].numel())
    finally:
        if not had_taps:
            remove_router_taps(model)
    if gate is None or total == 0:
        raise EfftuneError("expert_affinity: no tokens were routed (empty batches?)")
    return ExpertAffinity(layers, gate / total, token / token.sum(-1, keepdim=True), total)


def select_experts(scores: torch.Tensor, threshold: float | None = None,
                   top_fraction: float | None = None) -> list[list[int]]:
    """Per row (layer) of scores (L, E): the smallest set of experts whose scores, normalised to
    sum 1, add up to >= threshold (highest first), or the ceil(top_fraction·E) highest. Sorted ids."""
    if (threshold is None) == (top_fraction is None):
        raise ConfigError("select_experts: give exactly one of threshold and top_fraction")
    chosen = []
    for row in scores.double():
        order = torch.argsort(row, descending=True, stable=True)
        if top_fraction is not None:
            n = max(1, math.ceil(top_fraction * row.numel()))
        else:
            share = (row / row.sum().clamp_min(1e-30))[order].cumsum(0)
            # tolerance: a share that reaches p only up to rounding still reaches it
            n = int((share < threshold - 1e-6).sum()) + 1
        chosen.append(sorted(order[:min(n, row.numel())].tolist()))
    return chosen


def selection(affinity: ExpertAffinity, config: EsftConfig) -> dict[str, list[int]]:
    """{experts path: selected ids} by `config.score` and its threshold / top_fraction."""
    scores = affinity.gate if config.score == "gate" else affinity.token
    return dict(zip(affinity.layers, select_experts(scores, config.threshold, config.top_fraction)))


def save_selection(chosen: dict[str, list[int]], path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(chosen, indent=2))


class EsftExperts(GroupedExperts):
    """Fused experts whose `experts` (sorted ids) run on trainable copies of their weights:
    gate_up_proj (n, 2I, H), down_proj (n, H, I); every other expert uses the frozen base."""

    def __init__(self, base_layer: nn.Module, experts: list[int], impl: str = "auto"):
        experts = sorted(experts)
        super().__init__(base_layer, impl, adapted=experts)
        self.experts = experts
        self.register_buffer("expert_ids", torch.tensor(experts, device=base_layer.gate_up_proj.device),
                             persistent=False)
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(base_layer, name)
            dtype = master_dtype(w.dtype)
            setattr(self, name, nn.Parameter(w.detach().index_select(0, self.expert_ids).to(dtype)))

    def project_adapted(self, name: str, x: torch.Tensor, d: Dispatch) -> torch.Tensor:
        weight = getattr(self, name).to(x.dtype)
        return self.trainable_projection(name, x, d, d.split, weight, d.picked.index_select(0, self.expert_ids))

    @torch.no_grad()
    def merged_base(self) -> nn.Module:
        """The base module with the trained experts written back into its fused weights."""
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(self.base_layer, name)
            w.index_copy_(0, self.expert_ids, getattr(self, name).to(w.dtype))
        return self.base_layer


def add_esft_full(model: nn.Module, chosen: dict[str, list[int]], impl: str = "auto") -> list[str]:
    """Freeze the model; the selected experts of each listed layer train their whole weights."""
    known = dict(experts_modules(model))
    packed = next((p for p, m in known.items() if isinstance(m, PackedExperts)), None)
    if packed is not None:
        raise ConfigError(f"esft: mode full trains the selected experts' own weights, which are quantised ({packed}); "
                          "use esft.mode lora on a quantised base, or drop quantize")
    freeze_base(model)
    for path, ids in chosen.items():
        if path not in known:
            raise EfftuneError(f"esft: {path!r} is not a fused-experts module of this model")
        bad = [e for e in ids if not 0 <= e < known[path].gate_up_proj.shape[0]]
        if bad or not ids:
            raise ConfigError(f"esft: layer {path}: expert ids {ids!r} do not fit its "
                              f"{known[path].gate_up_proj.shape[0]} experts")
        replace_module(model, path, EsftExperts(known[path], ids, impl))
    add_router_taps(model)
    return list(chosen)


def unload_esft(model: nn.Module, merge: bool = True) -> nn.Module:
    for path, layer in list(wrappers(model, EsftExperts)):
        replace_module(model, path, layer.merged_base() if merge else layer.base_layer)
    return model


def _examples_batches(model, tokenizer, config: EsftConfig):
    from ..data.jsonl import load_jsonl
    device = next(model.parameters()).device
    for ex in load_jsonl(config.data)[:config.max_examples]:
        text = ex.prompt + ex.completion
        yield torch.tensor([tokenizer(text)["input_ids"][:1024]], device=device)


def add_esft(model: nn.Module, config: EsftConfig, tokenizer=None) -> list[str]:
    """The Method-registry attach: experts from `config.selection`, else measured on `config.data`."""
    if not experts_modules(model):
        raise ConfigError("esft: the model has no fused-experts module (3-D gate_up_proj / down_proj); it needs "
                          "a transformers-5 MoE model such as Qwen3-MoE, OLMoE or Mixtral")
    if config.selection:
        try:
            chosen = {str(k): [int(i) for i in v] for k, v in json.loads(Path(config.selection).read_text()).items()}
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            raise ConfigError(f"esft.selection: cannot read {config.selection} as {{path: [ids]}} ({exc})") from None
    elif config.data:
        if tokenizer is None:
            raise ConfigError("esft.data needs a tokenizer to measure expert affinity")
        chosen = selection(expert_affinity(model, _examples_batches(model, tokenizer, config)), config)
    else:
        raise ConfigError("esft needs esft.selection (a JSON file of experts) or esft.data (task examples)")
    if config.mode == "lora":
        return add_expert_lora(model, ExpertLoraConfig(r=config.r, alpha=config.alpha, impl=config.impl), chosen)
    return add_esft_full(model, chosen, config.impl)


def esft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The selected experts' trainable weights under their file keys, in model order (full mode)."""
    return {f"{p}.{n}": getattr(layer, n) for p, layer in wrappers(model, EsftExperts)
            for n in ("gate_up_proj", "down_proj")}


def save_esft(model: nn.Module, directory: str | os.PathLike, config: EsftConfig,
              metadata: dict | None = None) -> Path:
    """Full mode: the selected experts' weights only (esft format); lora mode: expert_lora's format."""
    if config.mode == "lora":
        return save_expert_lora(model, directory, ExpertLoraConfig(r=config.r, alpha=config.alpha),
                                {"method": "esft", **(metadata or {})})
    layers = list(wrappers(model, EsftExperts))
    if not layers:
        raise AdapterError("the model has no ESFT experts to save")
    return FORMAT.save(model, directory, {"mode": "full", "experts": {p: l.experts for p, l in layers}},
                       esft_state_dict(model), metadata)


def load_esft(model: nn.Module, directory: str | os.PathLike):
    """Load what `save_esft` wrote (either mode), all or nothing; keys and shapes are checked,
    misfits named."""
    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file() and (directory / "expert_lora_config.json").is_file():
        return load_expert_lora(model, directory)
    cfg, tensors = FORMAT.read(directory)

    def attach() -> None:
        try:
            chosen = {str(p): [int(i) for i in ids] for p, ids in cfg["experts"].items()}
            add_esft_full(model, chosen)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, EfftuneError) as exc:
            raise AdapterError(f"adapter: {directory / CONFIG_FILE}: bad experts field ({exc})") from None
    FORMAT.load(model, directory, tensors, attach, lambda: esft_state_dict(model))
    return EsftConfig(mode="full", selection=None)


# selects experts from esft.selection (JSON) or by routing esft.data through the model
METHOD = Method("esft", "esft", attach=add_esft, save=save_esft, load=load_esft,
                runs_base=lambda config: not config.selection and bool(config.data))

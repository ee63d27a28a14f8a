"""LoRA on the fused 3-D expert weights of transformers-5 MoE models.

Per expert e and projection p (gate_up_proj (E, 2I, H) or down_proj (E, H, I)):
`y = x W_p,e^T + s · (x A_p,e^T) B_p,e^T`, computed on the rows routed to e only, grouped by expert
(efftune/moe/experts.py); `W + s·B A` is never formed. Factors are 3-D: `lora_A` (n, r, in),
`lora_B` (n, out, r) for the n adapted experts (all E, or the `experts` subset); B starts at zero.
`target_modules` adds plain LoRA (same r, alpha) to linear layers such as attention.

On disk (efftune's own format, safetensors only):
- `expert_lora_config.json`: {"method": "expert-lora", "format_version": 1, "r", "alpha",
  "use_rslora", "targets", "target_modules", "num_experts", "experts": {experts path: [ids] | null},
  "base_model_name_or_path", "efftune": run metadata}.
- `expert_lora_model.safetensors`: `<experts path>.<target>.lora_A` (n, r, in) and `.lora_B`
  (n, out, r), row i belonging to expert experts[path][i]; linear LoRA as
  `<module path>.lora_A.weight` (r, in) / `.lora_B.weight` (out, r).
`export_peft` writes peft's `target_parameters` layout instead (all E experts, zeros elsewhere).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..attach import freeze_base, master_dtype, replace_module, wrappers
from ..checks import positive_ints, positive_numbers
from ..errors import AdapterError, ConfigError, EfftuneError
from ..files import AdapterFormat, base_model_name, checked_field, config_from, write_adapter_dir
from ..moe.experts import IMPLS, Dispatch, GroupedExperts, PackedExperts, experts_modules, grouped_linear, weight_like
from ..moe.router_tap import add_router_taps
from .registry import Method

TARGETS = ("gate_up_proj", "down_proj")
CONFIG_FILE = "expert_lora_config.json"
WEIGHTS_FILE = "expert_lora_model.safetensors"
FORMAT = AdapterFormat("expert-lora", CONFIG_FILE, WEIGHTS_FILE)


@dataclass
class ExpertLoraConfig:
    """`targets`: which fused projections get LoRA. `experts`: adapt only these expert ids (in
    every MoE layer; None = all). `target_modules`: linear layers that get plain LoRA too (e.g.
    attention: ["q_proj", "k_proj", "v_proj", "o_proj"]). `impl`: expert path ("auto" = grouped
    GEMM on CUDA bf16, else a loop; "grouped_mm": torch's grouped GEMM on any device, bf16; "loop").
    `aux_loss`: record router logits for `hf_router_aux_loss`."""
    r: int = 16
    alpha: float = 32.0
    targets: list[str] = field(default_factory=lambda: list(TARGETS))
    experts: list[int] | None = None
    target_modules: list[str] = field(default_factory=list)
    use_rslora: bool = False
    impl: str = "auto"
    aux_loss: bool = True

    def __post_init__(self):
        positive_ints("expert_lora", self, "r")
        positive_numbers("expert_lora", self, "alpha")
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        bad = [t for t in self.targets if t not in TARGETS]
        if not self.targets or bad:
            raise ConfigError(f"expert_lora.targets must be a non-empty subset of {list(TARGETS)}, got {self.targets!r}")
        if self.experts is not None:
            if (not self.experts or any(isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in self.experts)
                    or len(set(self.experts)) != len(self.experts)):
                raise ConfigError(f"expert_lora.experts must be distinct non-negative expert ids, got {self.experts!r}")
        if self.impl not in IMPLS:
            raise ConfigError(f"expert_lora.impl must be one of {IMPLS}, got {self.impl!r}")

    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


class ExpertFactors(nn.Module):
    """LoRA factors of one fused projection for n experts: lora_A (n, r, in), lora_B (n, out, r)."""

    def __init__(self, n: int, in_features: int, out_features: int, r: int, scaling: float, *,
                 device=None, dtype=None):
        super().__init__()
        self.r, self.scaling = r, scaling
        bound = 1.0 / math.sqrt(in_features)  # what nn.Linear's Kaiming-uniform init gives (r, in)
        self.lora_A = nn.Parameter(torch.empty(n, r, in_features, device=device, dtype=dtype).uniform_(-bound, bound))
        self.lora_B = nn.Parameter(torch.zeros(n, out_features, r, device=device, dtype=dtype))

    def delta_weight(self) -> torch.Tensor:
        """s · B_e A_e for every adapted expert (n, out, in), in fp32 at least (merging only)."""
        dtype = torch.promote_types(self.lora_A.dtype, torch.float32)
        return torch.bmm(self.lora_B.to(dtype), self.lora_A.to(dtype)) * self.scaling


class ExpertLora(GroupedExperts):
    """A fused-experts module (`base_layer`, frozen) plus per-expert LoRA on `targets`.
    `experts`: adapted expert ids (None = all); `lora[target]` holds their factors in id order."""

    def __init__(self, base_layer: nn.Module, r: int, scaling: float, targets=TARGETS,
                 experts: list[int] | None = None, impl: str = "auto"):
        w = weight_like(base_layer, "gate_up_proj")  # shape, dtype, device (a quantised base's not dequantised)
        num_experts = w.shape[0]
        if experts is not None:
            bad = [e for e in experts if not 0 <= e < num_experts]
            if bad:
                raise ConfigError(f"expert_lora.experts: expert id {bad[0]} does not exist (the model has "
                                  f"{num_experts} experts per layer)")
            experts = sorted(experts)
            if len(experts) == num_experts:
                experts = None  # all of them: no split of the dispatch needed
        super().__init__(base_layer, impl, adapted=experts)
        self.experts = experts
        n = num_experts if experts is None else len(experts)
        ids = torch.arange(num_experts) if experts is None else torch.tensor(experts)
        self.register_buffer("expert_ids", ids.to(w.device), persistent=False)
        dtype = master_dtype(w.dtype)
        self.lora = nn.ModuleDict()
        for name in targets:
            _, out_f, in_f = weight_like(base_layer, name).shape
            self.lora[name] = ExpertFactors(n, in_f, out_f, r, scaling, device=w.device, dtype=dtype)
        self.enabled, self.merged = True, False

    def _active(self, name: str) -> bool:
        return name in self.lora and self.enabled and not self.merged

    def project(self, name: str, x: torch.Tensor, d: Dispatch) -> torch.Tensor:
        y = super().project(name, x, d)
        if d.split is None and self._active(name):
            y = y + self._delta(name, x, d, 0, d.counts)
        return y

    def project_adapted(self, name: str, x: torch.Tensor, d: Dispatch) -> torch.Tensor:
        y = super().project_adapted(name, x, d)
        if self._active(name):
            y = y + self._delta(name, x, d, d.split or 0, d.picked.index_select(0, self.expert_ids))
        return y

    def _delta(self, name: str, x: torch.Tensor, d: Dispatch, start: int, counts: torch.Tensor) -> torch.Tensor:
        """s · (x A_e^T) B_e^T for rows `start`.. of projection `name` (x: those rows, grouped by
        `counts`); the rank-r intermediate is scaled, not the (S, out) result, and A's input rows are
        not kept for backward (`trainable_projection`)."""
        f = self.lora[name]
        u = self.trainable_projection(name, x, d, start, f.lora_A.to(x.dtype), counts) * f.scaling
        return grouped_linear(u, f.lora_B.to(u.dtype), counts, self.impl)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold s · B_e A_e into the base weights of the adapted experts."""
        if isinstance(self.base_layer, PackedExperts):
            raise EfftuneError("merge: the expert weights are quantised, and merging into them would round the "
                               "update away: call efftune.quantize.dequantize_model(model) first")
        if not self.merged:
            for name, f in self.lora.items():
                w = getattr(self.base_layer, name)
                w.index_add_(0, self.expert_ids, f.delta_weight().to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            for name, f in self.lora.items():
                w = getattr(self.base_layer, name)
                w.index_add_(0, self.expert_ids, -f.delta_weight().to(w.dtype))
            self.merged = False


def expert_lora_layers(model: nn.Module) -> list[tuple[str, ExpertLora]]:
    return list(wrappers(model, ExpertLora))


def add_expert_lora(model: nn.Module, config: ExpertLoraConfig | None = None,
                    experts_of: dict[str, list[int] | None] | None = None, *, tokenizer=None) -> list[str]:
    """Freeze the model and wrap every fused-experts module in an ExpertLora (and give
    `config.target_modules` plain LoRA). `experts_of` maps an experts-module path to its adapted
    ids, overriding `config.experts` (ESFT picks per layer); a path missing from it is not adapted.
    Returns the adapted module paths."""
    from .lora.config import LoraConfig
    from .lora.model import add_lora
    config = config or ExpertLoraConfig()
    if expert_lora_layers(model):
        raise EfftuneError("the model already has expert LoRA; load or attach it once")
    found = experts_modules(model)
    if not found:
        raise EfftuneError("expert_lora: the model has no fused-experts module (3-D gate_up_proj / down_proj); "
                           "it needs a transformers-5 MoE model such as Qwen3-MoE, OLMoE or Mixtral")
    freeze_base(model)
    adapted = []
    for path, module in found:
        if experts_of is not None and path not in experts_of:
            continue
        ids = config.experts if experts_of is None else experts_of[path]
        wrapper = ExpertLora(module, config.r, config.scaling(), config.targets, ids, config.impl)
        replace_module(model, path, wrapper)
        adapted.append(path)
    if config.aux_loss:
        add_router_taps(model)
    if config.target_modules:
        adapted += add_lora(model, LoraConfig(r=config.r, alpha=config.alpha, use_rslora=config.use_rslora,
                                              target_modules=config.target_modules))
    for _, layer in expert_lora_layers(model):
        layer.lora.requires_grad_(True)
    return adapted


def unload_expert_lora(model: nn.Module, merge: bool = False) -> nn.Module:
    """Put the base experts modules back (folding the updates in first with `merge`)."""
    layers = expert_lora_layers(model)
    packed = next((layer for _, layer in layers if isinstance(layer.base_layer, PackedExperts)), None)
    if merge and packed is not None:
        packed.merge()  # refuses in one line, before any layer changed
    for path, layer in layers:
        if merge:
            layer.merge()
        replace_module(model, path, layer.base_layer)
    return model


def _linear_lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from .lora.layer import lora_layers
    state = {}
    for path, layer in lora_layers(model):
        if "default" in layer.adapters:
            a = layer.adapters["default"]
            state[f"{path}.lora_A.weight"], state[f"{path}.lora_B.weight"] = a.lora_A, a.lora_B
    return state


def expert_lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every factor under its file key (module docstring): the experts' in model order, then the linears'."""
    state = {}
    for path, layer in expert_lora_layers(model):
        for name, f in layer.lora.items():
            state[f"{path}.{name}.lora_A"], state[f"{path}.{name}.lora_B"] = f.lora_A, f.lora_B
    return {**state, **_linear_lora_state(model)}


def save_expert_lora(model: nn.Module, directory: str | os.PathLike, config: ExpertLoraConfig,
                     metadata: dict | None = None) -> Path:
    """Write the adapter in efftune's expert-LoRA format (see the module docstring), atomically."""
    layers = expert_lora_layers(model)
    if not layers:
        raise AdapterError("the model has no expert LoRA to save")
    fields = {"r": config.r, "alpha": config.alpha, "use_rslora": config.use_rslora, "targets": list(config.targets),
              "target_modules": list(config.target_modules), "num_experts": layers[0][1].num_experts,
              "experts": {p: l.experts for p, l in layers}}
    return FORMAT.save(model, directory, fields, expert_lora_state_dict(model), metadata)


def load_expert_lora(model: nn.Module, directory: str | os.PathLike) -> ExpertLoraConfig:
    """Attach the expert LoRA saved in `directory` and load its factors, all or nothing; every key
    and shape is checked against the model and the first misfit named (file and key)."""
    directory = Path(directory)
    cfg, tensors = FORMAT.read(directory)
    where = directory / CONFIG_FILE
    config = config_from(ExpertLoraConfig, cfg, ("r", "alpha", "targets", "target_modules", "use_rslora"), where)
    experts_of = checked_field(cfg, "experts", lambda v: isinstance(v, dict) and all(  # null: all experts
        ids is None or isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                     for i in ids)
        for ids in v.values()), "an object of expert index lists (or null for all)", where)
    known = {p for p, _ in experts_modules(model)}
    unknown = [p for p in experts_of if p not in known]
    if unknown:
        raise AdapterError(f"adapter: {directory / CONFIG_FILE} names experts module {unknown[0]!r}, which this "
                           f"model lacks (base model of the adapter: {cfg.get('base_model_name_or_path')})")

    def attach() -> None:
        try:
            add_expert_lora(model, config, experts_of)
        except ConfigError as exc:
            raise AdapterError(f"adapter: {directory / CONFIG_FILE}: {exc}") from None
    FORMAT.load(model, directory, tensors, attach, lambda: expert_lora_state_dict(model))
    return config


# ---- peft's target_parameters layout -------------------------------------------------------------

def peft_expert_keys(path: str, targets) -> dict[str, str]:
    """peft key stem of each target. peft nests one ParamWrapper per targeted parameter; with both
    targeted, gate_up_proj's wrapper is the inner one (`experts.base_layer`)."""
    prefix = f"base_model.model.{path}"
    if len(targets) == 1:
        return {targets[0]: prefix}
    return {"gate_up_proj": f"{prefix}.base_layer", "down_proj": prefix}


def export_peft(model: nn.Module, directory: str | os.PathLike, config: ExpertLoraConfig) -> Path:
    """Write the adapter as a peft LoRA directory with `target_parameters` (peft >= 0.17 loads it
    with PeftModel.from_pretrained). peft keeps factors for all E experts: lora_A.weight (E·r, in),
    expert-major rows; lora_B.weight (out, r·E), expert-minor columns. Experts this adapter does not
    adapt get zero factors. Linear LoRA (`target_modules`) is written as usual."""
    from ..files import PREFIX
    layers = expert_lora_layers(model)
    if not layers:
        raise AdapterError("the model has no expert LoRA to export")
    state = {}
    for path, layer in layers:
        keys = peft_expert_keys(path, list(layer.lora))
        for name, f in layer.lora.items():
            e = layer.num_experts
            A = f.lora_A.new_zeros(e, *f.lora_A.shape[1:]).index_copy(0, layer.expert_ids, f.lora_A.detach())
            B = f.lora_B.new_zeros(e, *f.lora_B.shape[1:]).index_copy(0, layer.expert_ids, f.lora_B.detach())
            state[f"{keys[name]}.lora_A.weight"] = A.reshape(-1, A.shape[-1])
            state[f"{keys[name]}.lora_B.weight"] = B.permute(1, 2, 0).reshape(B.shape[1], -1)
    linear = _linear_lora_state(model)
    state.update({PREFIX + k: v.detach() for k, v in linear.items()})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name(model),
           "r": config.r, "lora_alpha": config.alpha, "lora_dropout": 0.0, "use_rslora": config.use_rslora,
           "target_modules": sorted({k.rsplit(".", 1)[-1] for k in {p.rsplit(".lora_", 1)[0] for p in linear}}),
           "target_parameters": sorted(config.targets), "bias": "none", "fan_in_fan_out": False,
           "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
           "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False}
    return write_adapter_dir(directory, cfg, state)


METHOD = Method("expert-lora", "expert_lora", attach=add_expert_lora, save=save_expert_lora, load=load_expert_lora)

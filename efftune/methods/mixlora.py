"""MixLoRA (Li et al. 2024): a sparse mixture of LoRA experts inside each frozen FFN block.

Each Llama-style MLP (`gate_proj`, `up_proj`, `down_proj`, `act_fn`) is wrapped in a
`MixLoraBlock` that holds E experts. Expert e is the frozen FFN with its own LoRA update on
each targeted projection, `W_p + s·B_{p,e} A_{p,e}` for p in gate/up/down. A top-k router
(`efftune.moe.routing.Router`, k = 2 of E = 8 by default, weights renormalised over the k picks)
reads the FFN input and sends each token to k experts. Attention gets a plain LoRA adapter named
`ATTN_ADAPTER` (`efftune.methods.lora.add_lora` on q/k/v/o). The router's load-balancing loss
reaches the training loop through `efftune.moe.layer.collect_aux_losses`: every block has a
`router` and records `last_routing` and `aux_loss` after each forward.

The math of one block, for a token x (hidden H, intermediate I), expert set K(x), weights
w_e (Σ_{e∈K} w_e = 1 when renormalised), activation φ, LoRA scaling s:

    naive:      y = Σ_{e∈K} w_e · D_e( φ(G_e x) ⊙ U_e x ),  P_e = W_p + s B_{p,e} A_{p,e}  (P = G, U, D)

    efficient:  g = W_g x  and  u = W_u x                     once per token, for all experts
                h_e = φ(g + s B_{g,e} A_{g,e} x) ⊙ (u + s B_{u,e} A_{u,e} x)   per routed (x, e)
                y = W_d (Σ_{e∈K} w_e h_e)  +  Σ_{e∈K} s B_{d,e} A_{d,e} (w_e h_e)

They are equal: G_e x = W_g x + s B_{g,e} A_{g,e} x (likewise U_e), so the frozen products are the
same for every expert and are computed once; and D_e is linear, so
Σ_e w_e D_e h_e = W_d Σ_e w_e h_e + Σ_e s B_{d,e} A_{d,e} (w_e h_e): the frozen down projection
runs once, on the weighted sum of the experts' intermediates, and each expert's LoRA delta takes
its already-weighted intermediate (w_e h_e is formed once and feeds both terms). Only the rank-r
deltas run per expert, each on its own tokens: the (token, slot) pairs are sorted by expert once,
so expert e reads one contiguous block. (A bias on `down_proj` enters the naive form as
(Σ w_e)·b: with renormalised weights that is b, which `down_proj` adds; otherwise the
difference is added explicitly.) The frozen matmuls thus cost one FFN per token, as without
MixLoRA, instead of k.

Adapter weights (experts, router) are fp32 masters under a half-precision base, as LoRA's are;
under autocast they run in bf16. Token-level routing keeps the experts out of the base weights
(no merge); the attention LoRA can be merged or exported for peft (`export_attention_peft`).

On disk (efftune's own format, safetensors only):
- `mixlora_config.json`: {"method": "mixlora", "format_version": 1, every `MixLoraConfig` field,
  "base_model_name_or_path", "efftune": run metadata}.
- `mixlora_model.safetensors`: per FFN block at module path P, `P.router.W_r.weight` (E, hidden)
  and `P.experts.<e>.<proj>.lora_A` (r, in) / `.lora_B` (out, r) for each expert e and targeted
  projection; per attention projection at path Q, `Q.lora_A` (r, in) / `Q.lora_B` (out, r).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..attach import find_targets, freeze_base, master_dtype, replace_module, wrappers
from ..checks import non_negative_numbers, positive_ints, positive_numbers
from ..errors import AdapterError, ConfigError, EfftuneError
from ..files import AdapterFormat, config_from
from ..moe.routing import Router, RouterConfig, Routing
from .lora.config import LoraConfig
from .lora.layer import LoraAdapter, LoraLayer, lora_layers
from .lora.model import add_lora, delete_adapter
from .lora.peft_format import save_adapter
from .registry import Method

CONFIG_FILE = "mixlora_config.json"
WEIGHTS_FILE = "mixlora_model.safetensors"
FORMAT = AdapterFormat("mixlora", CONFIG_FILE, WEIGHTS_FILE)
ATTN_ADAPTER = "mixlora"           # name of the attention LoRA adapter
FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
ROUTER_INIT_STD = 0.02             # MixLoRA's router initialisation: N(0, 0.02²)


@dataclass
class MixLoraConfig:
    """MixLoRA hyperparameters. Experts: `num_experts` LoRA experts of rank `r` (scaling
    alpha / r) on the FFN projections `ffn_targets` of each `ffn_module`, `top_k` per token.
    Router: load-balancing loss `aux_loss_coef` (Switch's form), z-loss `z_loss_coef` (MixLoRA
    uses none), multiplicative input jitter `jitter` in training. Attention: plain LoRA of rank
    `attn_r` on `attn_targets` (module-name suffixes; empty for none). `dropout` applies to all.
    `dense`: run the blocks in the dense masked form (`MixLoraBlock._dense_forward`: no host
    sync, a few large kernels; same result, tested) instead of sorting tokens by expert."""
    num_experts: int = 8
    top_k: int = 2
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    jitter: float = 0.0
    attn_r: int = 8
    attn_alpha: float = 16.0
    attn_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    ffn_targets: list[str] = field(default_factory=lambda: list(FFN_PROJECTIONS))
    ffn_module: str = "mlp"
    dense: bool = False

    def __post_init__(self):
        positive_ints("mixlora", self, "num_experts", "top_k", "r", "attn_r")
        if self.top_k > self.num_experts:
            raise ConfigError(f"mixlora.top_k ({self.top_k}) exceeds mixlora.num_experts ({self.num_experts})")
        positive_numbers("mixlora", self, "alpha", "attn_alpha")
        non_negative_numbers("mixlora", self, "aux_loss_coef", "z_loss_coef")
        for name in ("dropout", "jitter"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise ConfigError(f"mixlora.{name} must be in [0, 1), got {v!r}")
        if not isinstance(self.ffn_targets, list) or not self.ffn_targets \
                or any(t not in FFN_PROJECTIONS for t in self.ffn_targets):
            raise ConfigError(f"mixlora.ffn_targets must be a non-empty list of {', '.join(FFN_PROJECTIONS)}, "
                              f"got {self.ffn_targets!r}")
        if not isinstance(self.attn_targets, list) or not all(isinstance(t, str) and t for t in self.attn_targets):
            raise ConfigError(f"mixlora.attn_targets must be a list of module-name suffixes, got {self.attn_targets!r}")
        clash = [t for t in self.attn_targets if t in FFN_PROJECTIONS]
        if clash:
            raise ConfigError(f"mixlora.attn_targets names the FFN projection {clash[0]!r}, which the experts "
                              "adapt; list attention projections only")
        if not isinstance(self.ffn_module, str) or not self.ffn_module:
            raise ConfigError(f"mixlora.ffn_module must be a module-name suffix, got {self.ffn_module!r}")

    def router_config(self) -> RouterConfig:
        return RouterConfig(num_experts=self.num_experts, mode="top_k", top_k=self.top_k, renormalize=True,
                            aux_loss_coef=self.aux_loss_coef, z_loss_coef=self.z_loss_coef, jitter=self.jitter)


def _is_gated_mlp(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, p, None), nn.Linear) for p in FFN_PROJECTIONS) \
        and callable(getattr(module, "act_fn", None))


class MixLoraBlock(nn.Module):
    """A frozen gated MLP (`base_layer`) + a router + E LoRA experts; see the module docstring.

    forward(x (..., hidden)) -> (..., hidden). After each forward `last_routing` holds the
    `Routing` of the x.numel() / hidden tokens (flattened in order) and `aux_loss` its loss.
    """

    def __init__(self, base_layer: nn.Module, num_experts: int, r: int, scaling: float, dropout: float,
                 targets: list[str], router_config: RouterConfig):
        super().__init__()
        if not _is_gated_mlp(base_layer):
            raise ConfigError(f"mixlora: {type(base_layer).__name__} is not a gated MLP with nn.Linear "
                              f"{', '.join(FFN_PROJECTIONS)} and an act_fn")
        self.base_layer = base_layer
        self.targets = [p for p in FFN_PROJECTIONS if p in targets]  # fixed order
        weight = base_layer.gate_proj.weight
        dtype = master_dtype(weight.dtype)
        self.router = Router(weight.shape[1], router_config).to(device=weight.device, dtype=dtype)
        nn.init.normal_(self.router.W_r.weight, std=ROUTER_INIT_STD)
        self.experts = nn.ModuleList(
            nn.ModuleDict({p: LoraAdapter(getattr(base_layer, p).in_features, getattr(base_layer, p).out_features,
                                          r, scaling, dropout, device=weight.device, dtype=dtype)
                           for p in self.targets})
            for _ in range(num_experts))
        self.last_routing: Routing | None = None
        self.aux_loss: torch.Tensor | None = None
        self.dense = False  # the dense masked form (see _dense_forward) instead of sorting by expert

    def _expert_deltas(self, proj: str, inputs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Each expert's LoRA delta of `proj` on its own contiguous block of rows of `inputs`."""
        parts, start = [], 0
        for e, n in enumerate(counts):
            if n:
                parts.append(self.experts[e][proj](inputs[start:start + n]))
            start += n
        return torch.cat(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mlp = self.base_layer
        shape = x.shape
        flat = x.reshape(-1, shape[-1])                                        # (T, H)
        if flat.shape[0] == 0:
            return mlp(x)
        routing = self.router(flat)
        self.last_routing, self.aux_loss = routing, routing.aux_loss
        if self.dense:
            return self._dense_forward(flat, routing).reshape(*shape[:-1], -1)

        # (token, slot) pairs sorted by expert, once: pair p of the (T, k) routing is token p // k
        k = routing.expert_index.shape[1]
        expert = routing.expert_index.reshape(-1)
        order = expert.argsort(stable=True)
        token = order // k                                                     # (P,) P = T·k
        weight = routing.weight.reshape(-1)[order]
        counts = torch.bincount(expert, minlength=len(self.experts)).tolist()

        # frozen gate / up for every token once, then each pair's copy plus its expert's delta
        g = mlp.gate_proj(flat).index_select(0, token)                         # (P, I)
        u = mlp.up_proj(flat).index_select(0, token)
        xs = flat.index_select(0, token)                                       # (P, H)
        if "gate_proj" in self.targets:
            g = g + self._expert_deltas("gate_proj", xs, counts).to(g.dtype)
        if "up_proj" in self.targets:
            u = u + self._expert_deltas("up_proj", xs, counts).to(u.dtype)
        h = mlp.act_fn(g) * u
        hw = h * weight[:, None].to(h.dtype)                                   # w_e · h_e
        combined = torch.zeros((flat.shape[0], h.shape[1]), dtype=h.dtype, device=h.device)
        combined.index_add_(0, token, hw)                                      # Σ_e w_e h_e
        y = mlp.down_proj(combined)                                            # W_d once
        if "down_proj" in self.targets:
            y = y.index_add(0, token, self._expert_deltas("down_proj", hw, counts).to(y.dtype))
        bias = mlp.down_proj.bias
        if bias is not None and not self.router.config.renormalize:
            wsum = routing.weight.sum(-1, keepdim=True)
            y = y + (wsum - 1).to(y.dtype) * bias.to(y.dtype)
        return y.reshape(*shape[:-1], y.shape[-1])


    def _stacked(self, proj: str) -> tuple[torch.Tensor, torch.Tensor]:
        """All experts' factors of `proj` side by side: A (E·r, in) and B (out, E·r)."""
        a = torch.cat([ex[proj].lora_A for ex in self.experts])
        b = torch.cat([ex[proj].lora_B for ex in self.experts], dim=1)
        return a, b

    def _dense_forward(self, flat: torch.Tensor, routing: Routing) -> torch.Tensor:
        """The same block without sorting tokens by expert: no host sync, a few large kernels.

        Every token's x·Aᵀ is computed for all E experts at once, (T, E·r), and a one-hot mask
        of each slot's expert keeps only that expert's r columns before the stacked B; the down
        projection's deltas are masked the same way and summed over slots before one B GEMM.
        The frozen projections still run once per token. Extra work: E·r (not r) rank columns,
        small beside the FFN's own widths. Dropout (if any) draws one mask per token and
        projection, shared by the experts, where the sorted form draws one per (token, expert)."""
        mlp = self.base_layer
        T, k = routing.expert_index.shape
        E = len(self.experts)
        first = self.experts[0]
        r, s = first[self.targets[0]].r, first[self.targets[0]].scaling
        autocast = torch.is_autocast_enabled(flat.device.type)
        adapter_dtype = first[self.targets[0]].lora_A.dtype

        def rank_part(proj: str, inp: torch.Tensor) -> torch.Tensor:  # (T, E, r): x Aᵀ for all experts
            if not autocast and inp.dtype != adapter_dtype:
                inp = inp.to(adapter_dtype)
            a, _ = self._stacked(proj)
            return torch.nn.functional.linear(first[proj].dropout(inp), a).view(T, E, r)

        def expand(proj: str, part: torch.Tensor, like: torch.Tensor) -> torch.Tensor:  # (T, E, r) -> (T, out)
            _, b = self._stacked(proj)
            return torch.nn.functional.linear((part * s).reshape(T, E * r), b).to(like.dtype)

        slot_mask = torch.nn.functional.one_hot(routing.expert_index, E)    # (T, k, E)
        weight = routing.weight
        g0, u0 = mlp.gate_proj(flat), mlp.up_proj(flat)
        xa = {p: rank_part(p, flat) for p in ("gate_proj", "up_proj") if p in self.targets}
        combined = down_part = None
        for j in range(k):
            m = slot_mask[:, j, :, None]
            g = g0 + expand("gate_proj", xa["gate_proj"] * m, g0) if "gate_proj" in xa else g0
            u = u0 + expand("up_proj", xa["up_proj"] * m, u0) if "up_proj" in xa else u0
            hw = mlp.act_fn(g) * u * weight[:, j, None].to(g.dtype)           # w_j h_j
            combined = hw if combined is None else combined + hw
            if "down_proj" in self.targets:
                part = rank_part("down_proj", hw) * m
                down_part = part if down_part is None else down_part + part
        y = mlp.down_proj(combined)
        if down_part is not None:
            y = y + expand("down_proj", down_part, y)
        bias = mlp.down_proj.bias
        if bias is not None and not self.router.config.renormalize:
            y = y + (weight.sum(-1, keepdim=True) - 1).to(y.dtype) * bias.to(y.dtype)
        return y


# ---- model-level API ---------------------------------------------------------------------------

def mixlora_blocks(model: nn.Module) -> Iterator[tuple[str, MixLoraBlock]]:
    return wrappers(model, MixLoraBlock)


def mixlora_routing(model: nn.Module) -> dict[str, Routing]:
    """The last forward's routing of every block, by module path: per token (flattened batch ×
    sequence) `expert_index` (T, k), `weight` (T, k), `probs` (T, E), and `expert_load` (E,)."""
    return {name: b.last_routing for name, b in mixlora_blocks(model) if b.last_routing is not None}


def add_mixlora(model: nn.Module, config: MixLoraConfig | None = None, tokenizer=None) -> list[str]:
    """Freeze the model, put LoRA on the attention projections and MixLoRA experts in every
    `config.ffn_module`. Returns the adapted module paths (attention projections, then FFN blocks).
    `tokenizer` is unused (the method registry's signature)."""
    config = config or MixLoraConfig()
    if any(True for _ in mixlora_blocks(model)):
        raise EfftuneError("the model already has MixLoRA blocks; unload them first")
    blocks = find_targets(model, [config.ffn_module], accept=lambda m: True)
    for name in blocks:
        if not _is_gated_mlp(model.get_submodule(name)):
            raise ConfigError(f"mixlora.ffn_module: {name!r} is a {type(model.get_submodule(name)).__name__}, not "
                              f"a gated MLP with {', '.join(FFN_PROJECTIONS)} and act_fn")
    freeze_base(model)
    names = []
    if config.attn_targets:
        names += add_lora(model, LoraConfig(r=config.attn_r, alpha=config.attn_alpha, dropout=config.dropout,
                                            target_modules=list(config.attn_targets)), adapter=ATTN_ADAPTER)
    for name in blocks:
        block = MixLoraBlock(model.get_submodule(name), config.num_experts, config.r, config.alpha / config.r,
                             config.dropout, config.ffn_targets, config.router_config())
        block.dense = config.dense
        replace_module(model, name, block)
    return names + blocks


def unload_mixlora(model: nn.Module, keep_attention: bool = False) -> nn.Module:
    """Put the plain MLPs back (experts and routers are dropped: they cannot be merged); also
    remove the attention LoRA unless `keep_attention`."""
    for name, block in list(mixlora_blocks(model)):
        replace_module(model, name, block.base_layer)
    if not keep_attention and any(ATTN_ADAPTER in layer.adapters for _, layer in lora_layers(model)):
        delete_adapter(model, ATTN_ADAPTER)
        for name, layer in list(lora_layers(model)):
            if not layer.adapters:
                replace_module(model, name, layer.base_layer)
    return model


def _attention_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(p, layer) for p, layer in lora_layers(model) if ATTN_ADAPTER in layer.adapters]


def mixlora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every MixLoRA tensor under the keys of the on-disk format (module docstring)."""
    state = {}
    for path, layer in _attention_layers(model):
        a = layer.adapters[ATTN_ADAPTER]
        state[f"{path}.lora_A"], state[f"{path}.lora_B"] = a.lora_A, a.lora_B
    for path, block in mixlora_blocks(model):
        for name, p in block.named_parameters():
            if not name.startswith("base_layer."):
                state[f"{path}.{name}"] = p
    return state


def save_mixlora(model: nn.Module, directory: str | os.PathLike, config: MixLoraConfig,
                 metadata: dict | None = None) -> Path:
    """Write experts, routers and the attention LoRA with `config` to `directory` (atomically)."""
    if not any(True for _ in mixlora_blocks(model)):
        raise AdapterError("the model has no MixLoRA blocks to save")
    return FORMAT.save(model, directory, asdict(config), mixlora_state_dict(model), metadata)


def load_mixlora(model: nn.Module, directory: str | os.PathLike) -> MixLoraConfig:
    """Attach the MixLoRA adapter saved in `directory`, all or nothing; returns its config. Every
    key and shape is checked against the model; the first misfit is named."""
    directory = Path(directory)
    cfg, tensors = FORMAT.read(directory)
    config = config_from(MixLoraConfig, cfg, [f.name for f in fields(MixLoraConfig) if f.name in cfg],
                         directory / CONFIG_FILE)
    FORMAT.load(model, directory, tensors, lambda: add_mixlora(model, config), lambda: mixlora_state_dict(model))
    return config


def export_attention_peft(model: nn.Module, directory: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write the attention LoRA alone as a peft LoRA adapter (`adapter_config.json` +
    `adapter_model.safetensors`) that `peft.PeftModel.from_pretrained` loads onto the base
    model. The experts have no peft equivalent and are left out."""
    layers = _attention_layers(model)
    if not layers:
        raise AdapterError("the model has no MixLoRA attention LoRA to export")
    a = layers[0][1].adapters[ATTN_ADAPTER]
    targets = sorted({p.rsplit(".", 1)[-1] for p, _ in layers})
    cfg = LoraConfig(r=a.r, alpha=a.scaling * a.r, dropout=0.0, target_modules=targets)
    return save_adapter(model, directory, cfg, adapter=ATTN_ADAPTER,
                        metadata={"method": "mixlora-attention", **(metadata or {})})


# Experts and routers are token-routed (not mergeable): the result is efftune's own format.
METHOD = Method("mixlora", "mixlora", attach=add_mixlora, save=save_mixlora, load=load_mixlora)

"""Prefix tuning (Li & Liang 2021): trainable keys and values before every attention layer's own.

P virtual positions (`num_virtual_tokens`) get a key and a value per layer and kv head; every real
token may attend to them, and the model stays frozen. They reach the model through its cache
interface: the decoder body (`model.<base_model_prefix>`) is wrapped in a `PrefixTuningBody` whose
forward pre-fills a transformers `DynamicCache` with the prefix, so each attention layer prepends
it as it would a cached past (a pass that keeps no cache, as training and scoring, gets a
prefix-only cache that stores nothing). The wrapper also gives masks the P prefix columns and
shifts explicit position ids by P (real tokens sit at positions P.., as if the prefix had been a
text before them: what peft does). So efftune's calls of the body (4-D tree masks, packed rows),
`model(ids)` and `model.generate` (empty cache on the first step: filled; later steps: it already
holds the prefix) all work unchanged, and so does activation checkpointing. Tested on Llama-style
models; sliding-window layers would evict the prefix.

Unlike LoRA or (IA)³, prefix tuning does not start at the base model's outputs: any prefix is
attended to, so the outputs change from the first step (the init only chooses a sensible change).
`without_prefixes(model)` runs the base meanwhile (a run's "before" numbers are the base's).

The table of prefixes is (P, layers·2·kv_heads·head_dim); row p holds, layer after layer, the key
then the value of position p, each kv_heads × head_dim (peft's layout). With `prefix_projection`
(the paper's reparametrisation, for stabler training) the table is computed as
`Linear-Tanh-Linear(embedding)` from a (P, hidden) embedding; `fold()` replaces the MLP by the
table it computes, which is all that is saved.

On disk: peft's PREFIX_TUNING format, `adapter_config.json` (`"peft_type": "PREFIX_TUNING"`,
`num_virtual_tokens`, `num_layers`, `token_dim` = kv_heads·head_dim, `num_attention_heads` =
kv_heads, `prefix_projection: false`) and `adapter_model.safetensors` holding `prompt_embeddings`
(P, num_layers·2·token_dim), so peft loads what we write and we load what peft writes.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer

from ..attach import freeze_base, master_dtype, replace_module, wrappers
from ..errors import AdapterError, ConfigError, EfftuneError, TargetError
from ..files import base_model_name, checked_field, load_all_or_nothing, read_adapter_dir, write_adapter_dir
from .registry import Method

CONFIG_FILE, WEIGHTS_FILE, PEFT_KEY = "adapter_config.json", "adapter_model.safetensors", "prompt_embeddings"
INITS = ("vocab", "random")
RANDOM_STD = 0.02  # "random": small prefixes, a small first change to the outputs


@dataclass
class PrefixTuningConfig:
    """`num_virtual_tokens` P; `prefix_projection`: train the table through an MLP from a (P, hidden)
    embedding (folded away when saved); `projection_hidden_size`: the MLP's width (None: the model's
    hidden size); `init`: "vocab" starts from the keys and values the model computes for P sampled
    vocabulary tokens (with a projection: the embedding starts at those tokens' embeddings, the MLP
    at random), "random" from small noise."""
    num_virtual_tokens: int = 20
    prefix_projection: bool = True
    projection_hidden_size: int | None = None
    init: str = "vocab"

    def __post_init__(self):
        if not isinstance(self.num_virtual_tokens, int) or isinstance(self.num_virtual_tokens, bool) \
                or self.num_virtual_tokens < 1:
            raise ConfigError(f"prefix_tuning.num_virtual_tokens must be a positive integer, "
                              f"got {self.num_virtual_tokens!r}")
        if not isinstance(self.prefix_projection, bool):
            raise ConfigError(f"prefix_tuning.prefix_projection must be true or false, got {self.prefix_projection!r}")
        size = self.projection_hidden_size
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
            raise ConfigError(f"prefix_tuning.projection_hidden_size must be a positive integer or null, got {size!r}")
        if self.init not in INITS:
            raise ConfigError(f"prefix_tuning.init must be one of {INITS}, got {self.init!r}")


@dataclass(frozen=True)
class KVShape:
    """What one prefix row holds: layers × (key, value) × kv_heads × head_dim."""
    layers: int
    kv_heads: int
    head_dim: int

    @property
    def width(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim

    @classmethod
    def of(cls, config) -> "KVShape":
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim)


class _PrefixOnlyLayer(DynamicLayer):
    """A cache layer that supplies the prefix and stores nothing: for passes without a cache
    (training, scoring). Being read-only, it gives a checkpointed layer's recompute in backward
    the same keys as its forward."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def _cache_argument(forward) -> str:
    """The name under which `forward` takes the attention cache: `cache` from transformers 5.24 on,
    `past_key_values` before. (5.24+ still accepts the old name alone, but a call that carries
    both, e.g. our cache as `past_key_values` next to the `cache=None` the LM head passes down,
    silently drops ours.)"""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _cache_field(out) -> str | None:
    """The field under which a model output carries its cache: `cache` from transformers 5.24 on,
    `past_key_values` before (the other name still works there, but logs a deprecation warning)."""
    names = {f.name for f in dataclasses.fields(out)} if dataclasses.is_dataclass(out) else set()
    return next((name for name in ("cache", "past_key_values") if name in names), None)


def _output_cache(out) -> Cache | None:
    field = _cache_field(out)
    return getattr(out, field) if field else None


@contextmanager
def _cache_through_checkpointing(layers: list[nn.Module], on: bool):
    """transformers drops the cache in activation-checkpointed layers, since a storing cache would
    be written twice; a prefix-only cache is not written, so the layers may keep it meanwhile."""
    if not on:
        yield
        return
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            vars(layer).pop("_can_checkpoint_with_cache", None)


class PrefixTuningBody(nn.Module):
    """The decoder body with trainable prefixes in its attention cache. Called as the body is:
    `input_ids` (B, L), an optional mask (2-D (B, past + L), or 4-D (B, 1, L, past + L) bool for
    sdpa / float for eager; the P prefix columns may be left out, they are added), optional
    `position_ids` of the real tokens counted from 0 (shifted by P here)."""

    def __init__(self, base_layer: nn.Module, num_virtual_tokens: int, projection_hidden_size: int | None = None):
        super().__init__()
        self.base_layer = base_layer
        self.config = base_layer.config
        self.kv_shape = KVShape.of(self.config)
        self._cache_arg = _cache_argument(base_layer.forward)
        w = base_layer.get_input_embeddings().weight
        dtype = master_dtype(w.dtype)
        P, hidden = num_virtual_tokens, self.config.hidden_size
        if projection_hidden_size is None:
            self.prefix = nn.Parameter(torch.zeros(P, self.kv_shape.width, device=w.device, dtype=dtype))
        else:
            self.embedding = nn.Parameter(torch.zeros(P, hidden, device=w.device, dtype=dtype))
            self.transform = nn.Sequential(nn.Linear(hidden, projection_hidden_size), nn.Tanh(),
                                           nn.Linear(projection_hidden_size, self.kv_shape.width)).to(w.device, dtype)

    @property
    def num_virtual_tokens(self) -> int:
        return (self.prefix if self.folded else self.embedding).shape[0]

    @property
    def folded(self) -> bool:
        return not hasattr(self, "transform")

    def get_input_embeddings(self) -> nn.Module:
        return self.base_layer.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.base_layer.set_input_embeddings(value)

    def table(self) -> torch.Tensor:
        """The prefixes, (P, layers·2·kv_heads·head_dim) in peft's layout."""
        return self.prefix if self.folded else self.transform(self.embedding)

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the projection MLP by the table it computes now (a plain trainable parameter)."""
        if self.folded:
            return
        table = self.table().detach().clone()
        del self.embedding, self.transform
        self.prefix = nn.Parameter(table)

    def key_values(self, batch: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, (keys, values) of shape (batch, kv_heads, P, head_dim)."""
        s, P = self.kv_shape, self.num_virtual_tokens
        kv = self.table().to(dtype).view(P, s.layers, 2, s.kv_heads, s.head_dim).permute(1, 2, 3, 0, 4)
        return [(kv[i, 0].expand(batch, -1, -1, -1), kv[i, 1].expand(batch, -1, -1, -1)) for i in range(s.layers)]

    def _cache(self, cache: Cache | None, batch: int, dtype: torch.dtype, store: bool) -> Cache:
        """A cache that holds the prefix: `cache` filled if empty (generate's first step), as it is
        if not (it holds the prefix from an earlier step), else a new one: a DynamicCache if the
        pass is to `store` its keys, a prefix-only one if not."""
        if cache is not None and not isinstance(cache, DynamicCache):
            raise EfftuneError(f"prefix tuning needs a DynamicCache (transformers' default), got a "
                               f"{type(cache).__name__}")
        if cache is not None and cache.get_seq_length() > 0:
            return cache
        kv = self.key_values(batch, dtype)
        if cache is None and not store:
            return Cache(layers=[_PrefixOnlyLayer(k, v) for k, v in kv])
        cache = cache if cache is not None else DynamicCache(config=self.config)
        for layer, (k, v) in enumerate(kv):
            cache.update(k, v, layer)
        return cache

    def _extend_mask(self, mask: torch.Tensor | None, total: int) -> torch.Tensor | None:
        """Give `mask` the P prefix columns (visible to every query) unless it has them already."""
        if mask is None:
            return None  # the model sizes its causal mask from the cache, prefix included
        if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 4):
            raise EfftuneError(f"prefix tuning takes a 2-D or 4-D attention mask tensor, got "
                               f"{getattr(mask, 'shape', type(mask).__name__)}")
        P = self.num_virtual_tokens
        if mask.shape[-1] == total:
            return mask
        if mask.shape[-1] != total - P:
            raise EfftuneError(f"prefix tuning: the attention mask spans {mask.shape[-1]} keys; expected "
                               f"{total - P} (or {total} with the {P} prefix columns)")
        # bool (sdpa): True = may attend; float (eager): added to the scores, so 0; int (2-D): 1.
        fill = True if mask.dtype == torch.bool else (0 if mask.is_floating_point() and mask.dim() == 4 else 1)
        cols = torch.full((*mask.shape[:-1], P), fill, dtype=mask.dtype, device=mask.device)
        return torch.cat([cols, mask], dim=-1)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None, **kwargs):
        # transformers 5.24+ passes the cache down as `cache`, older versions as `past_key_values`
        incoming = kwargs.pop("cache", None)
        past_key_values = past_key_values if past_key_values is not None else incoming
        x = input_ids if input_ids is not None else inputs_embeds
        layers = [m for m in self.base_layer.modules() if isinstance(m, GradientCheckpointingLayer)]
        checkpointing = self.training and any(layer.gradient_checkpointing for layer in layers)
        # as transformers does: no storing cache in training with activation checkpointing
        use_cache = (self.config.use_cache if use_cache is None else use_cache) and not checkpointing
        cache = self._cache(past_key_values, x.shape[0], self.get_input_embeddings().weight.dtype, store=use_cache)
        total = cache.get_seq_length() + x.shape[1]
        if position_ids is not None:
            position_ids = position_ids + self.num_virtual_tokens
        with _cache_through_checkpointing(layers, checkpointing and not isinstance(cache, DynamicCache)):
            out = self.base_layer(input_ids=input_ids, attention_mask=self._extend_mask(attention_mask, total),
                                  position_ids=position_ids, inputs_embeds=inputs_embeds,
                                  use_cache=use_cache, **{self._cache_arg: cache}, **kwargs)
        if not isinstance(cache, DynamicCache) and _output_cache(out) is cache:
            # the prefix-only cache is no past to continue from
            setattr(out, _cache_field(out), None)
        return out


# ---- model-level API ---------------------------------------------------------------------------

def prefix_body(model: nn.Module) -> PrefixTuningBody:
    found = [m for _, m in wrappers(model, PrefixTuningBody)]
    if not found:
        raise EfftuneError("the model has no prefixes (attach prefix tuning first)")
    return found[0]


def _body(model: nn.Module) -> tuple[str, nn.Module]:
    """(attribute, module) of the decoder body that prefix tuning wraps."""
    if any(True for _ in wrappers(model, PrefixTuningBody)):
        raise EfftuneError("the model already has prefixes; load or attach them once")
    name = getattr(model, "base_model_prefix", "")
    body = getattr(model, name, None) if name else None
    if not isinstance(body, nn.Module) or body is model:
        raise TargetError(f"prefix tuning wraps a causal LM's decoder body (`model.<base_model_prefix>`); "
                          f"{type(model).__name__} has none")
    for field in ("num_hidden_layers", "num_attention_heads", "hidden_size"):
        if not isinstance(getattr(getattr(body, "config", None), field, None), int):
            raise TargetError(f"prefix tuning needs the model config's {field}; {type(model).__name__} lacks it")
    return name, body


@torch.no_grad()
def _vocab_tokens(body: nn.Module, n: int, tokenizer) -> torch.Tensor:
    """n token ids sampled with torch's RNG (special and padding-only ids left out)."""
    size = body.get_input_embeddings().num_embeddings
    usable = torch.arange(size)
    if tokenizer is not None:  # the table may be padded past the tokenizer, and specials are odd starts
        keep = usable < len(tokenizer)
        keep[[i for i in tokenizer.all_special_ids if i < size]] = False
        usable = usable[keep] if keep.any() else usable
    return usable[torch.randint(len(usable), (n,))]


@torch.no_grad()
def _init(wrapper: PrefixTuningBody, config: PrefixTuningConfig, tokenizer) -> None:
    body, P, emb = wrapper.base_layer, config.num_virtual_tokens, wrapper.get_input_embeddings()
    if config.init == "random":  # a projection's input at the scale of token embeddings
        target = wrapper.prefix if wrapper.folded else wrapper.embedding
        target.normal_(0, RANDOM_STD if wrapper.folded else float(emb.weight.float().std()))
        return
    ids = _vocab_tokens(body, P, tokenizer).to(emb.weight.device)
    if not wrapper.folded:  # the projection's input: those tokens' embeddings
        wrapper.embedding.copy_(emb(ids).to(wrapper.embedding.dtype))
        return
    # The keys and values the model computes for the tokens as a text: rotary positions 0..P-1
    # are already applied, as they are to any cached key.
    was_training = body.training
    cache = _output_cache(body.eval()(input_ids=ids[None], use_cache=True))
    body.train(was_training)
    rows = [torch.stack([cache.layers[i].keys[0], cache.layers[i].values[0]]) for i in range(wrapper.kv_shape.layers)]
    table = torch.stack(rows).permute(3, 0, 1, 2, 4)  # (P, layers, 2, kv_heads, head_dim)
    wrapper.prefix.copy_(table.reshape(P, -1).to(wrapper.prefix.dtype))


def _attach(model: nn.Module, name: str, wrapper: PrefixTuningBody) -> None:
    freeze_base(model)  # the wrapper is not in the model yet: its parameters stay trainable
    replace_module(model, name, wrapper)


def add_prefix_tuning(model: nn.Module, config: PrefixTuningConfig | None = None, tokenizer=None) -> list[str]:
    """Freeze the model and wrap its decoder body in a PrefixTuningBody whose prefixes (or their
    projection) train. `tokenizer` keeps special tokens out of the "vocab" init's sample.
    Returns the wrapped module's path."""
    config = config or PrefixTuningConfig()
    name, body = _body(model)
    projection = (config.projection_hidden_size or body.config.hidden_size) if config.prefix_projection else None
    wrapper = PrefixTuningBody(body, config.num_virtual_tokens, projection)
    _init(wrapper, config, tokenizer)  # before the model changes, so a failing init leaves it alone
    _attach(model, name, wrapper)
    return [name]


def fold_prefix_tuning(model: nn.Module) -> None:
    """Fold the projection MLP into the table it computes (for inference, or to train the table)."""
    prefix_body(model).fold()


@contextmanager
def without_prefixes(model: nn.Module):
    """While inside, the model runs as its base: the plain decoder body in each PrefixTuningBody's
    place, put back on leaving (an error included). Any prefix changes the outputs, so a freshly
    attached model is not the base; this is how a run scores the base beside it (`Method.bypass`).
    Only the module tree changes: the wrapper and its parameters stay as they are."""
    found = list(wrappers(model, PrefixTuningBody))
    for name, wrapper in found:
        replace_module(model, name, wrapper.base_layer)
    try:
        yield model
    finally:
        for name, wrapper in found:
            replace_module(model, name, wrapper)


def remove_prefix_tuning(model: nn.Module) -> nn.Module:
    """Put the plain decoder body back (its parameters stay as they are, frozen)."""
    for name, wrapper in list(wrappers(model, PrefixTuningBody)):
        replace_module(model, name, wrapper.base_layer)
    return model


# ---- save / load --------------------------------------------------------------------------------

def prefix_tuning_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The prefix table under its peft key; a projection is computed into a table (not a parameter)."""
    return {PEFT_KEY: prefix_body(model).table()}


def save_prefix_tuning(model: nn.Module, directory: str | os.PathLike, config: PrefixTuningConfig | None = None,
                       metadata: dict | None = None) -> Path:
    """Write the prefix table as a peft PREFIX_TUNING adapter (atomically). A projection is folded
    into the file (not into the model, which may train on); `config` records how training ran."""
    wrapper = prefix_body(model)
    s, P = wrapper.kv_shape, wrapper.num_virtual_tokens
    with torch.no_grad():
        table = prefix_tuning_state_dict(model)[PEFT_KEY].detach().float()
    config = config or PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=not wrapper.folded)
    ours = {"prefix_projection": config.prefix_projection, "projection_hidden_size": config.projection_hidden_size,
            "init": config.init}
    cfg = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name(model),
           "num_virtual_tokens": P, "token_dim": s.kv_heads * s.head_dim, "num_transformer_submodules": 1,
           "num_attention_heads": s.kv_heads, "num_layers": s.layers, "encoder_hidden_size": s.kv_heads * s.head_dim,
           "prefix_projection": False, "init_weights": None, "inference_mode": True, "modules_to_save": None,
           "revision": None, "efftune": {**(metadata or {}), "prefix_tuning": ours}}
    return write_adapter_dir(directory, cfg, {PEFT_KEY: table}, CONFIG_FILE, WEIGHTS_FILE)


def _check_config(cfg: dict, shape: KVShape, where: Path) -> None:
    """The config's own numbers, where given, must describe this model's cache (else a mismatched
    layout could pass the shape check: layers and heads trade places in one flat row)."""
    if (cfg.get("num_transformer_submodules") or 1) != 1:
        raise AdapterError(f"adapter: {where} is an encoder-decoder prefix "
                           f"(num_transformer_submodules={cfg['num_transformer_submodules']})")
    expect = {"num_layers": shape.layers, "num_attention_heads": shape.kv_heads,
              "token_dim": shape.kv_heads * shape.head_dim}
    for field, value in expect.items():
        if cfg.get(field) is not None and cfg[field] != value:
            raise AdapterError(f"adapter: {where} has {field}={cfg[field]!r}, this model needs {value} "
                               f"(base model of the adapter: {cfg.get('base_model_name_or_path')})")


def load_prefix_tuning(model: nn.Module, directory: str | os.PathLike) -> PrefixTuningConfig:
    """Attach the prefixes saved in `directory` (by efftune or peft) as a plain, trainable table,
    all or nothing. The config, the tensor's key, shape and values are checked, a misfit named."""
    directory = Path(directory)
    cfg, tensors = read_adapter_dir(directory, CONFIG_FILE, WEIGHTS_FILE, kind=("peft_type", "PREFIX_TUNING"))
    name, body = _body(model)
    shape = KVShape.of(body.config)
    _check_config(cfg, shape, directory / CONFIG_FILE)
    P = cfg.get("num_virtual_tokens")
    if not isinstance(P, int) or isinstance(P, bool) or P < 1:
        raise AdapterError(f"adapter: {directory / CONFIG_FILE} has num_virtual_tokens={P!r}, "
                           "expected a positive integer")
    # every field is checked before anything attaches: a bad one must leave the model as it was
    where = directory / CONFIG_FILE
    ours = checked_field(cfg, "efftune", lambda v: isinstance(v, dict), "an object", where, {})
    ours = checked_field(ours, "prefix_tuning", lambda v: isinstance(v, dict), "an object", where, {})
    init = ours.get("init") if isinstance(ours.get("init"), str) and ours["init"] in INITS else "random"
    load_all_or_nothing(model, lambda: _attach(model, name, PrefixTuningBody(body, P)), tensors,
                        lambda: prefix_tuning_state_dict(model), directory / WEIGHTS_FILE,
                        " (another base model, or another prefix length?)")
    return PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=False, init=init)


# The prefixes live in the wrapped decoder body's attention cache: prompts need no special ids; they
# change the outputs from the start, so a run scores the base with them bypassed (`without_prefixes`).
METHOD = Method("prefix-tuning", "prefix_tuning", attach=add_prefix_tuning, save=save_prefix_tuning,
                load=load_prefix_tuning, bypass=without_prefixes)

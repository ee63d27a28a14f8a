"""LoraHub (Huang et al. 2023): compose a library of LoRA modules for an unseen task from a few examples.

Composition follows the reference code: weights go on each factor separately,
`A = Σ w_i A_i`, `B = Σ w_i B_i`, so `B @ A` has cross terms `w_i w_j B_i A_j` (intended). The
weights are found gradient-free (nevergrad, default NGOpt, budget 40) by minimising the few-shot
answer NLL + `0.05 · mean|w|`, with `w` starting at 0 and bounded in [-1.5, 1.5].

Two choices of ours, for causal LMs and libraries the paper did not cover:
- ranks may differ between modules (or layers): on each layer every module's factors are
  zero-padded to the largest rank there (extra A rows / B columns are 0), which leaves each
  module's own product unchanged; a module absent from a layer contributes zeros there;
- each module's scaling s_i is folded into its B (`B_i' = s_i B_i`) and the composed adapter
  has scaling 1, so a one-hot `w` reproduces module i exactly (alpha = r when saved).
"""
from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..data.examples import Example, MultipleChoice
from ..data.layout import collate, training_rows
from ..data.tokenize import Formatter
from ..errors import ConfigError, EfftuneError
from ..files import CONFIG_FILE
from ..forward.logprobs import target_logprobs
from ..forward.options import DEFAULT, ForwardOptions
from ..methods.lora.config import LoraConfig
from ..methods.lora.layer import LoraEmbedding, LoraLayer, adapter_names, lora_layers
from ..methods.lora.model import merge_lora, set_active_adapters
from ..methods.lora.peft_format import load_adapter, save_adapter


def load_library(model: nn.Module, directory: str | Path) -> list[str]:
    """Attach every LoRA module under `directory` (each subdirectory holding an adapter_config.json,
    efftune's or peft's) as an adapter named after its subdirectory. Returns the names, sorted.
    The modules are loaded inactive: the model computes what it did before until some are
    activated (`set_active_adapters`) or composed (`LoraHub`)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise EfftuneError(f"lorahub: library directory {directory} does not exist")
    subs = sorted(p for p in directory.iterdir() if p.is_dir() and (p / CONFIG_FILE).is_file()
                  and not p.name.endswith((".tmp", ".old")))  # leftovers of an interrupted atomic write
    if not subs:
        raise EfftuneError(f"lorahub: library directory {directory} holds no LoRA modules "
                           f"(no subdirectory with an {CONFIG_FILE})")
    active = list(dict.fromkeys(n for _, layer in lora_layers(model) for n in layer.active))
    for sub in subs:
        load_adapter(model, sub, adapter=sub.name)
    set_active_adapters(model, active)
    return [sub.name for sub in subs]


class LoraHub:
    """One composed adapter `name` over library adapters `modules`, rewritten in place by `set_weights`.

    Per layer the library factors are stacked once: `stack_A` (N, r_max, in) and `stack_B`
    (N, out, r_max) with B pre-scaled by s_i; `set_weights(w)` is then two einsums per layer.
    Only the composed adapter is active while the hub is in use.
    """

    def __init__(self, model: nn.Module, modules: Sequence[str], name: str = "lorahub"):
        modules = list(modules)
        known = adapter_names(model)
        if not modules:
            raise EfftuneError("lorahub: no modules to compose")
        missing = [m for m in modules if m not in known]
        if missing:
            raise EfftuneError(f"lorahub: no adapter named {missing[0]!r} (have: {', '.join(known) or 'none'})")
        if len(set(modules)) != len(modules):
            raise EfftuneError(f"lorahub: module names repeat in {modules}")
        if name in known:
            raise EfftuneError(f"lorahub: adapter {name!r} already exists; choose another name")
        self.model, self.modules, self.name = model, modules, name
        self.layers: list[tuple[str, LoraLayer, torch.Tensor, torch.Tensor]] = []
        dora = next((p for p, layer in lora_layers(model) if any(layer.adapters[m].scales_output
                                                                 for m in modules if m in layer.adapters)), None)
        if dora is not None:
            raise EfftuneError(f"lorahub: {dora} holds a DoRA module; composing DoRA modules is not supported "
                               "(LoraHub combines B·A only)")
        with torch.no_grad():
            for path, layer in lora_layers(model):
                if layer.merged:
                    raise EfftuneError(f"lorahub: {path} has merged adapters; call unmerge_lora first")
                present = [(i, layer.adapters[m]) for i, m in enumerate(modules) if m in layer.adapters]
                if not present:
                    continue
                r_max = max(a.r for _, a in present)
                new = layer.add_adapter(name, r_max, scaling=1.0)
                new.requires_grad_(False)  # the search is gradient-free
                A0, B0 = new.lora_A, new.lora_B
                stack_A = A0.new_zeros(len(modules), r_max, A0.shape[1])
                stack_B = B0.new_zeros(len(modules), B0.shape[0], r_max)
                for i, a in present:  # zero padding: rows r..r_max of A, columns of B
                    stack_A[i, :a.r] = a.lora_A.to(A0.dtype)
                    stack_B[i, :, :a.r] = a.lora_B.to(B0.dtype) * a.scaling
                self.layers.append((path, layer, stack_A, stack_B))
        set_active_adapters(model, name)
        self.weights = np.zeros(len(modules))
        self.set_weights(self.weights)

    @property
    def r(self) -> int:
        return max(sa.shape[1] for _, _, sa, _ in self.layers)

    @torch.no_grad()
    def set_weights(self, weights: Sequence[float] | np.ndarray) -> None:
        """`A = Σ w_i A_i`, `B = Σ w_i s_i B_i` on every layer; `weights`: N floats."""
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
        if w.shape[0] != len(self.modules) or not np.isfinite(w).all():
            raise EfftuneError(f"lorahub: need {len(self.modules)} finite weights, got {list(w)}")
        self.weights = w.copy()
        for _, layer, stack_A, stack_B in self.layers:
            wt = torch.as_tensor(w, dtype=stack_A.dtype, device=stack_A.device)
            adapter = layer.adapters[self.name]
            adapter.lora_A.copy_(torch.einsum("n,nri->ri", wt, stack_A))
            adapter.lora_B.copy_(torch.einsum("n,nor->or", wt, stack_B))

    def config(self) -> LoraConfig:
        """LoraConfig for `save_adapter`: r = largest rank, alpha = r (scaling 1); lower-rank layers
        go into peft's rank/alpha patterns."""
        linear = sorted({p.rsplit(".", 1)[-1] for p, l, *_ in self.layers if not isinstance(l, LoraEmbedding)})
        emb = [p for p, l, *_ in self.layers if isinstance(l, LoraEmbedding)]
        return LoraConfig(r=self.r, alpha=float(self.r), target_modules=linear, embeddings=emb)

    def save(self, directory: str | Path, metadata: dict | None = None) -> Path:
        """Write the current composition as a normal peft LoRA adapter directory."""
        meta = {"lorahub": {"modules": self.modules, "weights": [float(x) for x in self.weights], **(metadata or {})}}
        return save_adapter(self.model, directory, self.config(), adapter=self.name, metadata=meta)

    def merge(self) -> None:
        """Fold the composition into the base weights (`merge_lora`; only it is active)."""
        set_active_adapters(self.model, self.name)
        merge_lora(self.model)


class FewShotLoss:
    """Mean NLL of the examples' answer tokens, laid out once and scored in `rows_per_batch` rows
    per forward (one forward when they fit)."""

    def __init__(self, model: nn.Module, formatter: Formatter, examples: Sequence[Example],
                 row_tokens: int = 1024, rows_per_batch: int = 8, options: ForwardOptions = DEFAULT):
        if not examples:
            raise EfftuneError("lorahub: no few-shot examples")
        self.model, self.options = model, options
        seqs = [formatter.encode(ex) for ex in examples]
        rows = training_rows(seqs, max(row_tokens, max(len(s) for s in seqs)))
        attention = getattr(getattr(model, "config", None), "_attn_implementation", "sdpa") or "sdpa"
        pad = formatter.tokenizer.pad_token_id
        pad = pad if pad is not None else 0
        device = next(model.parameters()).device
        self.batches = [collate(rows[i:i + rows_per_batch], pad, attention).to(device)
                        for i in range(0, len(rows), rows_per_batch)]
        self.tokens = sum(int(b.targets.numel()) for b in self.batches)
        if not self.tokens:
            raise EfftuneError("lorahub: the few-shot examples have no answer tokens")

    @torch.no_grad()
    def __call__(self) -> float:
        was_training = self.model.training
        self.model.eval()  # no dropout: the objective must be deterministic
        try:
            total = 0.0
            for b in self.batches:
                lp = target_logprobs(self.model, b.input_ids, b.rows, b.sources, b.targets, b.position_ids, b.mask,
                                     options=self.options)
                total -= float(lp.double().sum())
        finally:
            self.model.train(was_training)
        return total / self.tokens


@dataclass
class LoraHubResult:
    modules: list[str]              # the selected library modules, in weight order
    weights: list[float]            # best weights found
    objective: float                # objective at `weights`
    loss: float                     # few-shot loss at `weights` (objective without the regulariser)
    base_objective: float           # objective at w = 0 (the base model)
    losses: list[float] = field(default_factory=list)        # objective per evaluation: the loss curve
    tried: list[list[float]] = field(default_factory=list)   # the weights nevergrad proposed, in order
    accuracy: float | None = None   # held-out multiple-choice accuracy of the best composition


def select_modules(library: Sequence[str], max_modules: int = 20, seed: int = 0) -> list[str]:
    """All of `library` if it has at most `max_modules`, else a seeded random sample (library order)."""
    library = list(library)
    if max_modules < 1:
        raise ConfigError(f"lorahub: max_modules must be at least 1, got {max_modules}")
    if len(library) <= max_modules:
        return library
    chosen = set(random.Random(seed).sample(library, max_modules))
    return [m for m in library if m in chosen]


def objective(hub: LoraHub, loss_fn: FewShotLoss, weights: Sequence[float] | np.ndarray,
              regularization: float = 0.05) -> tuple[float, float]:
    """(loss + regularization · mean|w|, loss) at `weights` (N floats); leaves the hub set to them."""
    w = np.asarray(weights, dtype=np.float64)
    hub.set_weights(w)
    loss = loss_fn()
    return loss + regularization * float(np.mean(np.abs(w))), loss


def _stop_threads(opt) -> None:
    """Stop the worker threads of nevergrad's scipy-backed optimizers (NGOpt picks COBYLA for small
    budgets): their thread waits for one more `tell` and, left alone, can keep the process from exiting."""
    stack, seen = [opt], set()
    while stack:
        o = stack.pop()
        if o is None or id(o) in seen:
            continue
        seen.add(id(o))
        thread = getattr(o, "_messaging_thread", None)
        if thread is not None:
            thread.stop()
        stack += [getattr(o, "_optim", None), *getattr(o, "optims", [])]


def lorahub(model: nn.Module, formatter: Formatter, examples: Sequence[Example], library: Sequence[str], *,
            max_modules: int = 20, budget: int = 40, optimizer: str = "NGOpt", regularization: float = 0.05,
            bound: float = 1.5, seed: int = 0, eval_examples: Sequence[MultipleChoice] | None = None,
            name: str = "lorahub", row_tokens: int = 1024, rows_per_batch: int = 8,
            options: ForwardOptions = DEFAULT) -> tuple[LoraHub, LoraHubResult]:
    """Find weights for (a seeded sample of at most `max_modules` of) the attached `library`
    adapters that minimise `few-shot loss(w) + regularization · mean|w|` over `w ∈ [-bound, bound]^N`.

    Leaves the best composition attached as the only active adapter `name`; returns the hub
    (`.save(dir)`, `.merge()`) and the result. `eval_examples` (multiple choice) adds held-out accuracy.
    `options`: the forwards' kernels (`efftune.forward.options`).
    """
    import nevergrad as ng  # optional dependency (the "hub" extra)

    if budget < 1:
        raise ConfigError(f"lorahub: budget must be at least 1, got {budget}")
    if optimizer not in ng.optimizers.registry:
        raise ConfigError(f"lorahub: unknown nevergrad optimizer {optimizer!r}")
    if not bound > 0:
        raise ConfigError(f"lorahub: bound must be positive, got {bound}")
    modules = select_modules(library, max_modules, seed)
    # before attaching: fail early
    loss_fn = FewShotLoss(model, formatter, examples, row_tokens, rows_per_batch, options)
    hub = LoraHub(model, modules, name)

    evaluate = lambda w: objective(hub, loss_fn, w, regularization)
    n = len(modules)
    param = ng.p.Array(init=np.zeros(n)).set_bounds(-bound, bound)
    param.random_state = np.random.RandomState(seed)
    opt = ng.optimizers.registry[optimizer](parametrization=param, budget=budget)
    base, base_loss = evaluate(np.zeros(n))
    best = (base, base_loss, np.zeros(n))  # w = 0 is a valid answer: never return worse than the base
    losses, tried = [], []
    with warnings.catch_warnings():
        # NGOpt's COBYLA (via scipy) warns about its own default tolerances: noise to our users
        warnings.filterwarnings("ignore", message="COBYLA: Invalid RHOEND")
        for _ in range(budget):
            cand = opt.ask()
            w = np.asarray(cand.value, dtype=np.float64)
            value, loss = evaluate(w)
            opt.tell(cand, value)
            losses.append(value)
            tried.append(w.tolist())
            if value < best[0]:
                best = (value, loss, w)
    _stop_threads(opt)
    hub.set_weights(best[2])
    result = LoraHubResult(modules, best[2].tolist(), best[0], best[1], base, losses, tried)
    if eval_examples:
        from ..eval.multiple_choice import multiple_choice_accuracy
        result.accuracy = multiple_choice_accuracy(model, formatter, list(eval_examples), options=options)
    return hub, result

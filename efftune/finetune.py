"""The main job, top to bottom: load model and data, attach a method, evaluate, train,
evaluate again, save. `efftune train` is this function."""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path


from .config import RunConfig
from .data import Completion, Example, Formatter, MultipleChoice, load_jsonl, load_task, split_examples
from .errors import ConfigError, DataError, EfftuneError
from .eval.multiple_choice import multiple_choice_accuracy
from .eval.perplexity import perplexity
from .methods import get_method
from .methods.attach import trainable_parameters
from .models import load_model
from .train.loop import train
from .train.seed import seed_everything


def load_examples(cfg: RunConfig) -> tuple[list[Example], list[Example]]:
    """(train, eval) examples: the user's JSONL, or a deterministic split of each BIG-bench task."""
    if cfg.data:
        examples = load_jsonl(cfg.data)
        if cfg.eval_data:
            return examples, load_jsonl(cfg.eval_data)
        return split_examples(examples, cfg.eval_size, seed=cfg.train.seed)
    if not cfg.task:
        raise ConfigError("task: name at least one BIG-bench task, or pass data: FILE.jsonl")
    train_set, eval_set = [], []
    for name in cfg.task:
        tr, ev = split_examples(load_task(name), cfg.eval_size, seed=0)  # fixed: same held-out set always
        train_set += tr
        eval_set += ev
    if cfg.eval_data:
        eval_set = load_jsonl(cfg.eval_data)
    return train_set, eval_set


def evaluator(formatter: Formatter, examples: list[Example]):
    """Accuracy on the multiple-choice examples, perplexity on the rest (whichever exist)."""
    mc = [e for e in examples if isinstance(e, MultipleChoice)]
    text = [e for e in examples if isinstance(e, Completion)]

    def evaluate(model) -> dict:
        out = {}
        if mc:
            out["accuracy"] = round(multiple_choice_accuracy(model, formatter, mc), 4)
        if text:
            out["perplexity"] = round(perplexity(model, formatter, text), 4)
        return out
    return evaluate


def prepare_output(path: Path, overwrite: bool, resume: bool) -> None:
    """Refuse to clobber a previous run unless asked; `resume` continues in place."""
    if resume:
        if not (path / "checkpoints").is_dir():
            raise EfftuneError(f"--resume: {path} has no checkpoints to resume from")
        return
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise EfftuneError(f"output directory {path} already holds a run; pass --overwrite to replace "
                               "it or --resume to continue it")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)


def run(cfg: RunConfig, *, overwrite: bool = False, resume: bool = False, log=print) -> dict:
    """Fine-tune as `cfg` says; returns the summary printed as the CLI's last line."""
    method = get_method(cfg.method)
    method_cfg = getattr(cfg, method.config_key)
    out = Path(cfg.output)
    train_set, eval_set = load_examples(cfg)  # fail on bad data before touching the output dir
    if not train_set:
        raise DataError("no training examples")
    prepare_output(out, overwrite, resume)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))

    t0 = time.perf_counter()
    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    log(f"model {cfg.model} loaded in {time.perf_counter() - t0:.1f}s on {next(model.parameters()).device}")
    seed_everything(cfg.train.seed)  # the adapter's initial weights too come from --seed
    method.attach(model, method_cfg, tokenizer)
    formatter = Formatter(tokenizer, chat_template=cfg.chat_template, max_length=cfg.train.max_length,
                          prefix_ids=method.prefix(model, method_cfg) if method.prefix else None)
    hooks = method.hooks(model, cfg) if method.hooks else None
    trainable, total = trainable_parameters(model)
    log(f"{cfg.method}: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.3f}%)")
    sequences = [formatter.encode(e) for e in train_set]
    log(f"data: {len(train_set)} training examples ({sum(map(len, sequences)) / len(sequences):.0f} tokens "
        f"on average), {len(eval_set)} held out")

    result = train(model, sequences, cfg.train, out, pad_id=tokenizer.pad_token_id, resume=resume,
                   evaluate=evaluator(formatter, eval_set) if eval_set else None, hooks=hooks)
    adapter_dir = out / method.artifact
    before = result.evals[0] if result.evals else {}
    after = result.evals[-1] if result.evals else {}
    method.save(model, adapter_dir, method_cfg, {"tasks": cfg.task if not cfg.data else None,
                                                 "data": cfg.data, "steps": cfg.train.steps, **after})
    if method.artifact == "model":
        tokenizer.save_pretrained(adapter_dir)
    summary = {
        "accuracy_before": before.get("accuracy"), "accuracy_after": after.get("accuracy"),
        "perplexity_before": before.get("perplexity"), "perplexity_after": after.get("perplexity"),
        method.artifact: str(adapter_dir), "steps": result.steps, "train_seconds": round(result.train_seconds, 1),
        "final_loss": round(result.final_loss, 4), "eval_examples": len(eval_set),
        "train_examples": len(train_set), "trainable_parameters": trainable,
        "metrics": str(out / "metrics.jsonl"), "plot": str(out / "training.png"),
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    summary = {k: v for k, v in summary.items() if v is not None}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    scores = [f"{k} {before.get(k)} -> {after[k]}" for k in ("accuracy", "perplexity") if k in after]
    log(f"held-out {', '.join(scores) or '(no evaluation)'}; {method.artifact}: {adapter_dir}; metrics: "
        f"{out / 'metrics.jsonl'}; plot: {out / 'training.png'}; summary: {out / 'summary.json'}")
    return summary

"""The main job, top to bottom: load model and data, attach a method, evaluate, train,
evaluate again, save. `efftune train` is this function."""
from __future__ import annotations

import math
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

from .attach import trainable_parameters
from .config import RunConfig
from .data import Completion, Example, Formatter, MultipleChoice
from .data.entries import take
from .data.examples import Conversation
from .data.loading import load_examples
from .data.options import apply_overflow, load_for_run
from .data.token_cache import encode_all
from .data.tokenize import IGNORE, sequence_stats, truncation_note
from .errors import ConfigError, DataError, EfftuneError
from .eval.multiple_choice import multiple_choice_accuracy
from .eval.retention import PanelExamples, describe, load_panel, measure_retention, retention_change
from .eval.perplexity import perplexity
from .eval.samples import append_samples, greedy_replies
from .faults import fault_point
from .files import write_text_atomically
from .forward.options import DEFAULT, ForwardOptions
from .methods.registry import get_method
from .methods.hooks import TrainHooks
from .progress import note as stderr_note
from .train import distributed
from .train.interrupt import RunInterrupted
from .train.log_sinks import MetricSinks
from .train.loop import check_shardable, strict_json, train
from .train.rundir import RunDir
from .train.seed import seed_everything


def evaluator(formatter: Formatter, examples: list[Example], options: ForwardOptions = DEFAULT,
              samples: int = 0, run_dir: Path | None = None, sharded: bool = False):
    """Accuracy on the multiple-choice examples, perplexity on the rest (whichever exist; of a
    conversation, on the tokens `train_on` covers, with its log as `eval_loss`), each forward run
    with `options` (the training run's: `TrainConfig.forward_options()`). With `samples` and
    conversations held out, greedy replies to the first `samples` of them go to
    `run_dir`/samples.jsonl at each evaluation (by rank 0), under the `step` the loop passes.

    `sharded` (several ranks, each with the whole model: `train.distributed: ddp`): each rank
    scores every size-th example and the counts are summed over the ranks, so every rank returns
    the result of the whole set. (Under fsdp every rank runs every forward, as sharded weights
    need all ranks in each forward: the ranks score the whole set alike.)"""
    mc = [e for e in examples if isinstance(e, MultipleChoice)]
    text = [e for e in examples if isinstance(e, (Completion, Conversation))]
    here = distributed.world() if sharded else distributed.World()
    chats = [e for e in examples if isinstance(e, Conversation)][:samples] \
        if run_dir is not None and distributed.world().main else []
    score = _sharded_scores(formatter, mc, text, options, here) if here.size > 1 else None

    def evaluate(model, step: int = 0) -> dict:
        if score is not None:
            hits, ppl = score(model)
        else:
            hits = multiple_choice_accuracy(model, formatter, mc, options=options) * len(mc) if mc else 0
            ppl = perplexity(model, formatter, text, options=options) if text else None
        out = {}
        if mc:
            out["accuracy"] = round(hits / len(mc), 4)
        if text:
            out["perplexity"] = round(ppl, 4)
            if any(isinstance(e, Conversation) for e in text):
                out["eval_loss"] = round(math.log(ppl), 4)
        if chats:
            append_samples(run_dir / "samples.jsonl", step, greedy_replies(model, formatter, chats))
        return out
    return evaluate


def _sharded_scores(formatter: Formatter, mc: list[MultipleChoice], text: list[Example],
                    options: ForwardOptions, here: distributed.World):
    """(multiple-choice hits, perplexity) over the whole set, each rank scoring its share of the
    examples (`distributed.sum_over_shares`): hits, and the answer tokens' total NLL (perplexity =
    exp(mean NLL), so the NLL is log(perplexity) x tokens) and count, summed over the ranks."""
    # each example's answer tokens, counted once (not at every evaluation), sharded beside the examples
    answer_tokens = [sum(1 for t in formatter.encode(e).labels if t != IGNORE) for e in text]

    def score(model) -> tuple[int, float | None]:
        def mine(mine_mc: list[MultipleChoice], mine_text: list[Example], mine_tokens: list[int]) -> list[float]:
            hits = round(multiple_choice_accuracy(model, formatter, mine_mc, options=options) * len(mine_mc)) \
                if mine_mc else 0
            tokens = sum(mine_tokens)
            nll = math.log(perplexity(model, formatter, mine_text, options=options)) * tokens if mine_text else 0.0
            return [hits, nll, tokens]
        hits, nll, count = distributed.sum_over_shares(mine, mc, text, answer_tokens, here=here)
        return hits, math.exp(nll / max(count, 1)) if text else None
    return score


def check_distributed(cfg: RunConfig) -> None:
    """What `train.distributed: fsdp` cannot run, refused from the config alone (before any process
    starts under `--nproc`); the loop checks the rest (`efftune.train.loop.check_shardable`)."""
    why = get_method(cfg.method).not_shardable
    if cfg.train.distributed == "fsdp" and why:
        raise ConfigError(f"train.distributed fsdp cannot run method {cfg.method}: {why}; use train.distributed ddp")
    if cfg.train.distributed == "fsdp" and (cfg.train.fp8_base or cfg.train.cuda_graphs):
        check_shardable(cfg.train, TrainHooks())


def check_prefix_tasks(cfg: RunConfig) -> None:
    """A method with a prefix per task (prompt tuning with several prompts) starts each example with
    its own BIG-bench task's (`Example.task`). Refused from the config alone, before any model work:
    examples that carry no task (the user's data), a training task without a prefix, a prefix of a
    task the run does not train (it would be saved untrained), and a retention panel (its tasks have
    no prefix, and no one of the prompts is the run's)."""
    method = get_method(cfg.method)
    tasks = method.prefix_tasks(getattr(cfg, method.config_key))
    if not tasks:
        return
    key, named = f"{method.config_key}.tasks", ", ".join(tasks)
    for source, where in ((cfg.data.path, "data.path, --data"), (cfg.data.eval_path, "data.eval_path, --eval-data")):
        if source:
            raise ConfigError(f"{key} holds several prompts ({named}), but the rows of {source} ({where}) carry no "
                              "task to pick one by; train one prompt on them, or name BIG-bench tasks with --task")
    if cfg.retention:
        raise ConfigError(f"retention: {key} holds several prompts ({named}) and the panel's tasks have none of "
                          "them, so no one prompt is the run's to score the panel with; drop --retention")
    if missing := [t for t in cfg.task if t not in tasks]:
        raise ConfigError(f"task {', '.join(missing)}: no prompt of that name in {key} ({named}); with several "
                          "prompts each training task takes the prompt named after it")
    if unused := [t for t in tasks if t not in cfg.task]:
        raise ConfigError(f"{key} names {', '.join(unused)}, which the run does not train (task: "
                          f"{', '.join(cfg.task)}): that prompt would be saved untrained")


def _load_base(cfg: RunConfig, method_cfg, method):
    """The base model and tokenizer for this rank (`efftune.train.distributed.load_base`: under torchrun
    rank 0 alone reads the weights, into host memory under fsdp). A base quantised or kept in FP8 here
    (each rank converts its own weights), or a method that runs the base while it attaches (ESFT
    measuring experts on data), is loaded by every rank."""
    every_rank = cfg.quantize != "none" or cfg.train.fp8_base or method.runs_base(method_cfg)
    return distributed.load_base(cfg.model, cfg.dtype, cfg.device, every_rank=every_rank,
                                 rank0_on_host=cfg.train.distributed == "fsdp")


def run(cfg: RunConfig, *, overwrite: bool = False, resume: bool = False, resume_changed: bool = False,
        log=print) -> dict:
    """Fine-tune as `cfg` says; returns the summary printed as the CLI's last line.

    `overwrite` replaces a run in `cfg.output`, but only once the new run has written its first
    checkpoint (`efftune.train.rundir`); `resume` continues it from its last checkpoint, refusing a
    config that computes differently unless `resume_changed` (which implies `resume`).

    Under torchrun every rank runs this (`efftune.train.distributed`): rank 0 fetches the data and
    the model first, prepares the output directory, logs and writes every file; the others train
    beside it and return the same summary.
    """
    check_distributed(cfg)
    check_prefix_tasks(cfg)
    here = distributed.init(cfg.device)
    if not here.main:
        log = lambda message: None  # noqa: E731 - one voice: rank 0's
    method = get_method(cfg.method)
    method_cfg = getattr(cfg, method.config_key)
    out = Path(cfg.output)
    resume = resume or resume_changed
    train_set, eval_set = distributed.main_first(lambda: load_examples(
        tasks=cfg.task, data=cfg.data.path, eval_data=cfg.data.eval_path, eval_size=cfg.eval_size, seed=cfg.train.seed,
        read=lambda _, evaluation: load_for_run(cfg.data, evaluation, stderr_note)))  # fail on bad data before the dir
    if not train_set:
        raise DataError("no training examples")
    panel = load_panel(cfg.retention, trained=[] if cfg.data.path else cfg.task) if cfg.retention else None
    rundir = RunDir(out, log)
    changed = distributed.on_main(
        lambda: rundir.resume(asdict(cfg), resume_changed) if resume else rundir.start(asdict(cfg), overwrite))
    if not here.main:
        rundir.committed = True  # rank 0 owns the directory: the others never undo anything in it
    try:
        return _run(cfg, method, method_cfg, out, train_set, eval_set, rundir, resume, resume_changed, changed or [],
                    log, panel)
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        if getattr(exc, "checkpoint", None) is not None:
            raise  # the loop wrote a checkpoint and says so
        rundir.abandon()
        if rundir.committed:
            raise RunInterrupted("interrupted; the run's last checkpoint is kept: resume with --resume", signum) \
                from None
        back = f"; the previous run in {out} is back" if rundir.restored else ""
        raise RunInterrupted(f"interrupted before the first checkpoint, so nothing of this run was kept{back}; "
                             "run the same command again to start it", signum) from None
    except BaseException:
        rundir.abandon()  # a run without a checkpoint does not count (an --overwrite puts the old one back)
        raise


def _run(cfg: RunConfig, method, method_cfg, out: Path, train_set, eval_set, rundir: RunDir, resume: bool,
         resume_changed: bool, changed: list[str], log, panel: PanelExamples | None = None) -> dict:
    t0 = time.perf_counter()
    here = distributed.world()
    model, tokenizer = _load_base(cfg, method_cfg, method)
    log(f"model {cfg.model} loaded in {time.perf_counter() - t0:.1f}s on {next(model.parameters()).device}")
    if cfg.quantize != "none":  # before the method attaches: its wrappers take the quantised layers as bases
        from .quantize import quantize_model
        log(quantize_model(model, cfg.quantize).summary())
    seed_everything(cfg.train.seed)  # the adapter's initial weights too come from --seed
    method.attach(model, method_cfg, tokenizer=tokenizer)
    def formatter_for(prefix_ids: list[int] | dict[str, list[int]] | None) -> Formatter:
        return Formatter(tokenizer, chat_template=cfg.chat_template, max_length=cfg.train.max_length,
                         prefix_ids=prefix_ids, train_on=cfg.data.train_on)
    # the method's prefix: one for every example, or each example its task's (check_prefix_tasks)
    formatter = formatter_for(method.prefix(model, method_cfg) if method.prefix else None)
    hooks = method.hooks(model, cfg) if method.hooks else None
    trainable, total = trainable_parameters(model)
    log(f"{cfg.method}: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.3f}%)")
    sequences = encode_all(formatter, train_set, use_cache=cfg.data.cache, log=log)
    # rows over max_length: kept cut, dropped or refused as data.overflow says, never silently
    kept, notes = apply_overflow(train_set, sequences, cfg.data.overflow, cfg.train.max_length,
                                 source=cfg.data.path or "the training data")
    for line in notes:
        log(line)
    dropped_examples = len(train_set) - len(kept)
    if not kept:
        raise DataError(f"no training example is left within max_length {cfg.train.max_length} tokens")
    if len(kept) < len(train_set):  # views of the mapped arrays, not a million objects (efftune.data.token_cache)
        train_set, sequences = take(train_set, kept), take(sequences, kept)
    lengths, cut, _ = sequence_stats(sequences)
    log(f"data: {len(train_set)} training examples ({lengths.mean():.0f} tokens on average), {len(eval_set)} held out")
    if note := truncation_note(sequences, cfg.train.max_length):  # never cut rows without a word
        log(note)
    # forgetting: the panel before training and after it, measured by the loop (`measure`). "Before" is the
    # base model's for every method, so every method's forgetting (and held-out gain) counts from the same
    # model: prompts without the method's virtual tokens, through the model with any state that changes
    # its outputs from the start bypassed (prefix tuning's prefixes). For a method that starts at the base
    # (LoRA's B = 0, (IA)³ at ones, ...) that is the model as training starts; for prompt and prefix tuning
    # the held-out "before" is scored that way too (their step-0 row in metrics.jsonl stays the run's own).
    retention: dict[str, dict] = {}
    base_formatter = formatter_for(None) if method.prefix else formatter  # prompts without virtual tokens
    as_base = method.bypass or (lambda model: nullcontext())
    off_base = method.prefix is not None or method.bypass is not None
    base_eval = evaluator(base_formatter, eval_set, cfg.train.forward_options(),
                          sharded=cfg.train.distributed == "ddp") if off_base and eval_set else None
    base_scores: dict = {}

    def measure(model, when: str) -> None:
        # before: on a resume too, the model is the untrained one until the loop loads the checkpoint, so
        # the numbers are the uninterrupted run's. Under ddp the ranks share the examples; under fsdp
        # every rank runs every forward (sharded weights need all ranks in each)
        share = here.active and cfg.train.distributed == "ddp"
        before = when == "before"
        with as_base(model) if before else nullcontext():
            if panel:
                retention[when] = measure_retention(model, base_formatter if before else formatter, panel,
                                                    cfg.train.forward_options(),
                                                    part=(here.rank, here.size) if share else (0, 1),
                                                    sum_over=distributed.all_sum if share else None)
            if before and base_eval is not None:
                base_scores.update(base_eval(model))
        if before and panel:
            log(describe(retention[when]))

    sinks = MetricSinks(cfg.log if here.main else [], out, asdict(cfg))  # TensorBoard / wandb: rank 0's rows

    def on_checkpoint(path):
        rundir.commit(path)
        sinks.flush()

    try:
        result = train(model, sequences, cfg.train, out, pad_id=tokenizer.pad_token_id, resume=resume,
                       evaluate=evaluator(formatter, eval_set, cfg.train.forward_options(), cfg.eval_samples, out,
                                          sharded=cfg.train.distributed == "ddp") if eval_set else None,
                       hooks=hooks, resume_changed=resume_changed, on_checkpoint=on_checkpoint,
                       on_metrics=sinks.on_metrics, unshard=method.artifact != "model",
                       measure=measure if panel or base_eval else None)
    except BaseException:
        sinks.close(sync=False)  # what the checkpoints covered was sent; the error is what matters
        raise
    sinks.close()
    if here.main:
        rundir.commit()  # a resumed finished run writes no checkpoint
    retained, retained_after = retention.get("before"), retention.get("after")
    adapter_dir = out / method.artifact
    # The summary is computed from this run's metrics (a resumed run's included), never carried over; the
    # held-out "before" is the base's (`base_scores`, see `measure`), which for most methods is step 0's row.
    before = base_scores if base_eval is not None else \
        result.evals[0] if result.evals and result.evals[0]["step"] == 0 else {}
    after = result.evals[-1] if result.evals and result.evals[-1]["step"] == result.steps else {}
    summary = {
        "accuracy_before": before.get("accuracy"), "accuracy_after": after.get("accuracy"),
        "perplexity_before": before.get("perplexity"), "perplexity_after": after.get("perplexity"),
        method.artifact: str(adapter_dir), "steps": result.steps, "train_seconds": round(result.train_seconds, 1),
        "final_loss": None if result.final_loss is None else round(result.final_loss, 4),
        "eval_examples": len(eval_set), "train_examples": len(train_set), "trainable_parameters": trainable,
        "truncated_examples": int((cut > 0).sum()),
        "dropped_examples": dropped_examples or None,
        "metrics": str(out / "metrics.jsonl"), "plot": str(out / "training.png"),
        "resumed_from_step": result.start_step if resume else None, "changed_on_resume": changed or None,
        "retention_panel": retained and retained["panel"], "retention_before": retained,
        "retention_after": retained_after, "retention_change": retained and retention_change(retained, retained_after),
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    summary = {k: v for k, v in summary.items() if v is not None}
    # a whole model trained under fsdp (full fine-tuning) is gathered into rank 0's host memory to be saved
    gathered = {"state_dict": distributed.whole_state_dict(model)} \
        if here.active and cfg.train.distributed == "fsdp" and method.artifact == "model" else {}
    if not here.main:  # rank 0 writes the adapter (the whole of it: every rank holds it, or it is gathered)
        return summary
    try:
        method.save(model, adapter_dir, method_cfg, metadata={"tasks": cfg.task if not cfg.data.path else None,
                                                              "data": cfg.data.path, "steps": cfg.train.steps, **after},
                    **gathered)
        if method.artifact == "model":
            tokenizer.save_pretrained(adapter_dir)
        fault_point("after_adapter_save")
        write_text_atomically(out / "summary.json", strict_json(summary, indent=2), fault="summary_write")
    except OSError as exc:  # a full disk: the final checkpoint is whole, so a resume finishes the job
        raise EfftuneError(f"could not write {exc.filename or out}: {exc.strerror or exc}; the run's final "
                           "checkpoint is intact: free space and run again with --resume") from None
    if retained:
        log(describe(retained, retained_after))
    scores = [f"{k} {before.get(k)} -> {after[k]}" for k in ("accuracy", "perplexity") if k in after]
    log(f"held-out {', '.join(scores) or '(no evaluation)'}; {method.artifact}: {adapter_dir}; metrics: "
        f"{out / 'metrics.jsonl'}; plot: {out / 'training.png'}; summary: {out / 'summary.json'}")
    return summary

import json
import math

import pytest
import torch

from efftune.data import Formatter, MultipleChoice
from efftune.errors import CheckpointError, TrainingDiverged
from efftune.methods.hooks import TrainHooks
from efftune.methods.lora.config import LoraConfig
from efftune.methods.lora.model import add_lora
from efftune.schedule import warmup_cosine
from efftune.train.checkpoint import latest_checkpoint
from efftune.train.loop import TrainConfig, example_order, train
from tests.conftest import randomize_lora, tiny_llama

PROMPTS = ["Q: Is the sky blue?\nA: ", "Q: Is grass red?\nA: ", "Take 3 steps forward.\nA: ",
           "Always face forward.\nA: ", "0123456789 =\nA: ", "The quick brown fox\nA: "]


def data(tokenizer):
    f = Formatter(tokenizer)
    return [f.encode(MultipleChoice(p, ("yes", "no"), i % 2)) for i, p in enumerate(PROMPTS * 2)]


def lora_model(dropout=0.0):
    m = tiny_llama()
    add_lora(m, LoraConfig(r=4, dropout=dropout))
    return m


def trainable(m):
    return {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}


def test_loss_goes_down_and_files_written(tokenizer, tmp_path):
    m = lora_model()
    rows = []
    res = train(m, data(tokenizer), TrainConfig(steps=30, batch_size=4, lr=1e-2, warmup_steps=2, save_every=10, eval_every=0),
                tmp_path, pad_id=tokenizer.pad_token_id, evaluate=lambda model, step: {"accuracy": 0.5})
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 30 and losses[-1] < losses[0] * 0.5
    assert [r["step"] for r in rows if r.get("eval")] == [0, 30] and res.evals[0]["step"] == 0
    assert (tmp_path / "training.png").stat().st_size > 1000
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-000030"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-000020", "step-000030"]


def test_resume_equals_uninterrupted_run(tokenizer, tmp_path):
    cfg = TrainConfig(steps=6, batch_size=4, lr=5e-3, warmup_steps=2, save_every=3, eval_every=3)
    seqs = data(tokenizer)
    full = lora_model(dropout=0.1)  # dropout makes the RNG state part of what must be restored
    res_full = train(full, seqs, cfg, tmp_path / "a", pad_id=1, evaluate=lambda m, step: {})

    def stop_at_step_3(model, step):
        stop_at_step_3.calls += 1
        if stop_at_step_3.calls == 2:  # call 1 is the step-0 evaluation, call 2 follows step 3
            raise KeyboardInterrupt
        return {}
    stop_at_step_3.calls = 0
    with pytest.raises(KeyboardInterrupt):
        train(lora_model(dropout=0.1), seqs, cfg, tmp_path / "b", pad_id=1, evaluate=stop_at_step_3)
    assert latest_checkpoint(tmp_path / "b" / "checkpoints").name == "step-000003"

    resumed = lora_model(dropout=0.1)  # a fresh process: new model, new optimizer
    res_resumed = train(resumed, seqs, cfg, tmp_path / "b", pad_id=1, resume=True, evaluate=lambda m, step: {})
    assert res_resumed.final_loss == res_full.final_loss
    for (n, a), b in zip(trainable(full).items(), trainable(resumed).values()):
        assert torch.equal(a, b), n
    rows = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_accumulation_equals_one_big_batch(tokenizer, tmp_path):
    seqs = data(tokenizer)
    a, b = lora_model(), lora_model()
    train(a, seqs, TrainConfig(steps=3, batch_size=6, lr=1e-2, warmup_steps=1), tmp_path / "a", pad_id=1)
    train(b, seqs, TrainConfig(steps=3, batch_size=6, micro_batch_size=2, lr=1e-2, warmup_steps=1),
          tmp_path / "b", pad_id=1)
    for (n, x), y in zip(trainable(a).items(), trainable(b).values()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5, msg=lambda m: f"{n}: {m}")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tokenizer, tmp_path):
    m = lora_model()
    cfg = TrainConfig(steps=6, batch_size=2, lr=1e-3, warmup_steps=1, save_every=2)
    calls = {"n": 0}
    layer = m.model.layers[0].mlp.down_proj

    def poison(module, inputs, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] > 3 else output
    layer.register_forward_hook(poison)
    with pytest.raises(TrainingDiverged, match=r"step 4.*step-000002"):
        train(m, data(tokenizer), cfg, tmp_path, pad_id=1)
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-000002"


def test_incomplete_checkpoint_is_reported(tokenizer, tmp_path):
    m = lora_model()
    train(m, data(tokenizer), TrainConfig(steps=2, batch_size=2, save_every=2), tmp_path, pad_id=1)
    (tmp_path / "checkpoints" / "step-000002" / "optimizer.safetensors").unlink()
    with pytest.raises(CheckpointError, match="incomplete: missing optimizer.safetensors"):
        train(lora_model(), data(tokenizer), TrainConfig(steps=4, batch_size=2), tmp_path, pad_id=1, resume=True)


def test_schedule_warmup_then_cosine_to_min():
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert warmup_cosine(100, 100, 10, 0.1) == pytest.approx(0.1)


def test_example_order_is_a_permutation_per_epoch_and_resumable():
    order = example_order(7, seed=3, start=0, count=14)
    assert sorted(order[:7]) == list(range(7)) and sorted(order[7:]) == list(range(7))
    assert example_order(7, seed=3, start=5, count=4) == order[5:9]
    # the order is each epoch's seeded shuffle (kept once per epoch, not drawn again per example)
    import numpy as np
    assert order == [int(np.random.default_rng([3, g // 7]).permutation(7)[g % 7]) for g in range(14)]
    assert example_order(7, seed=4, start=0, count=7) == np.random.default_rng([4, 0]).permutation(7).tolist()


def test_activation_checkpointing_gives_the_same_training(tokenizer, tmp_path):
    seqs = data(tokenizer)
    a, b = lora_model(), lora_model()
    train(a, seqs, TrainConfig(steps=3, batch_size=6, lr=1e-2, warmup_steps=1), tmp_path / "a", pad_id=1)
    train(b, seqs, TrainConfig(steps=3, batch_size=6, lr=1e-2, warmup_steps=1, activation_checkpointing=True),
          tmp_path / "b", pad_id=1)
    assert b.model.layers[0].gradient_checkpointing
    for (n, x), y in zip(trainable(a).items(), trainable(b).values()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5, msg=lambda m: f"{n}: {m}")


def test_checkpointing_a_share_of_the_layers_gives_the_same_training(tokenizer, tmp_path):
    """train.activation_checkpointing_fraction: only that share of the layers recompute (spread
    evenly), and the run trains as one without checkpointing."""
    from efftune.attach import decoder_blocks
    from efftune.train.loop import checkpointed_layers
    seqs = data(tokenizer)
    a, b = lora_model(), lora_model()
    train(a, seqs, TrainConfig(steps=3, batch_size=6, lr=1e-2, warmup_steps=1), tmp_path / "a", pad_id=1)
    train(b, seqs, TrainConfig(steps=3, batch_size=6, lr=1e-2, warmup_steps=1, activation_checkpointing=True,
                               activation_checkpointing_fraction=0.5), tmp_path / "b", pad_id=1)
    blocks = decoder_blocks(b)
    assert [blk.gradient_checkpointing for blk in blocks] == [i in checkpointed_layers(len(blocks), 0.5)
                                                            for i in range(len(blocks))]
    assert 0 < sum(blk.gradient_checkpointing for blk in blocks) < len(blocks)
    for (n, x), y in zip(trainable(a).items(), trainable(b).values()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5, msg=lambda m: f"{n}: {m}")


def test_checkpointed_layers_are_spread_evenly():
    from efftune.train.loop import checkpointed_layers
    assert checkpointed_layers(4, 0.5) == {0, 2}
    assert checkpointed_layers(32, 1.0) == set(range(32))
    assert checkpointed_layers(3, 0.1) == {0}  # at least one
    picked = sorted(checkpointed_layers(32, 0.8))
    assert len(picked) == 26 and max(b - a for a, b in zip(picked, picked[1:])) == 2


def test_compiled_blocks_give_the_same_training(tokenizer, tmp_path):
    # torch.compile of each decoder block (fp32 here) must train like eager, tree masks included
    from efftune.attach import decoder_blocks
    seqs = data(tokenizer)
    a, b = lora_model(), lora_model()
    train(a, seqs, TrainConfig(steps=2, batch_size=6, lr=1e-2, warmup_steps=1), tmp_path / "a", pad_id=1)
    train(b, seqs, TrainConfig(steps=2, batch_size=6, lr=1e-2, warmup_steps=1, compile=True,
                               compile_memory_budget=0.5), tmp_path / "b", pad_id=1)
    assert len(decoder_blocks(b)) == 2 and all(blk._compiled_call_impl is not None for blk in decoder_blocks(b))
    for (n, x), y in zip(trainable(a).items(), trainable(b).values()):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")


def test_compiled_checkpointing_is_the_compilers_and_trains_like_eager(tokenizer, tmp_path, monkeypatch):
    # compiled and fully checkpointed: no checkpoint around the blocks (transformers' switch stays off),
    # every block compiled to recompute all but its inputs (tests/train/test_compile.py counts what that
    # keeps), the training forwards under the run's own partition settings
    import efftune.train.loop as loop
    from efftune.attach import decoder_blocks
    budgets, real_partitioner = [], loop.partitioner
    fractions, real_compile = [], loop.compile_blocks

    def partitioner(budget, lean):
        budgets.append(budget)
        return real_partitioner(budget, lean)

    def compile_blocks(model, **options):
        fractions.append(options["checkpoint_fraction"])
        return real_compile(model, **options)

    monkeypatch.setattr(loop, "partitioner", partitioner)
    monkeypatch.setattr(loop, "compile_blocks", compile_blocks)
    seqs = data(tokenizer)
    a, b = lora_model(), lora_model()
    train(a, seqs, TrainConfig(steps=2, batch_size=6, lr=1e-2, warmup_steps=1), tmp_path / "a", pad_id=1)
    train(b, seqs, TrainConfig(steps=2, batch_size=6, lr=1e-2, warmup_steps=1, compile=True,
                               activation_checkpointing=True), tmp_path / "b", pad_id=1)
    assert not any(blk.gradient_checkpointing for blk in decoder_blocks(b))
    assert budgets and set(budgets) == {None} and fractions == [1.0]
    for (n, x), y in zip(trainable(a).items(), trainable(b).values()):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")


def test_cuda_graph_training_pads_rows_to_max_length_and_trains_like_eager(tokenizer, tmp_path, monkeypatch):
    # on CPU Inductor skips the graphs but the rest runs as on a GPU: the fixed-length rows, the
    # "reduce-overhead" compile and the per-forward step marker
    import efftune.train.loop as loop
    from efftune.data.layout import collate as real_collate
    lengths = []

    def spy(rows, pad_id, attention="sdpa", length=None):
        batch = real_collate(rows, pad_id, attention, length)
        lengths.append(batch.input_ids.shape[1])
        return batch

    monkeypatch.setattr(loop, "collate", spy)
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    seqs = data(tokenizer)
    a, b = lora_model(), lora_model()
    train(a, seqs, TrainConfig(steps=2, batch_size=6, lr=1e-2, warmup_steps=1, max_length=64), tmp_path / "a", pad_id=1)
    assert all(n < 64 for n in lengths)
    lengths.clear()
    train(b, seqs, TrainConfig(steps=2, batch_size=6, lr=1e-2, warmup_steps=1, max_length=64, compile=True,
                               cuda_graphs=True), tmp_path / "b", pad_id=1)
    assert lengths == [64, 64] and len(marks) == 2  # one mark per optimizer step
    from efftune.attach import decoder_blocks
    assert all(blk._compiled_call_impl is None for blk in decoder_blocks(b))  # eager again afterwards
    for (n, x), y in zip(trainable(a).items(), trainable(b).values()):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the graphs themselves)")
def test_cuda_graphs_train_like_eager_on_gpu(tokenizer, tmp_path):
    # float64: tree-masked rows, two micro-batches per step (their gradients accumulate across two
    # replays of the same graphs), evaluations in between; equal to eager up to compile rounding
    seqs = data(tokenizer)
    runs = []

    @torch.no_grad()
    def probe(model, step):
        return {"n": float(model(torch.ones(1, 5, dtype=torch.long, device="cuda")).logits.sum())}

    for graphs in (False, True):
        m = lora_model().to("cuda", torch.float64)
        randomize_lora(m)  # B != 0, so every factor has a gradient from the first step
        train(m, seqs, TrainConfig(steps=3, batch_size=6, micro_batch_size=3, lr=1e-2, warmup_steps=1, max_length=64,
                                   precision="fp32", compile=graphs, cuda_graphs=graphs, eval_every=1),
              tmp_path / str(graphs), pad_id=1, evaluate=probe)
        rows = [json.loads(l) for l in (tmp_path / str(graphs) / "metrics.jsonl").read_text().splitlines()]
        runs.append((trainable(m), [(r["loss"], r["grad_norm"]) for r in rows if "loss" in r]))
    (eager, eager_log), (graphed, graphed_log) = runs
    assert len(graphed_log) == 3 and graphed_log == eager_log
    for x, y in zip(eager.values(), graphed.values()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)  # measured: 4e-8 (Adam at lr 1e-2 magnifies 1e-10)


def test_the_partition_settings_reach_the_compiled_forward(tokenizer, tmp_path, monkeypatch):
    import efftune.train.loop as loop
    seen = []
    real = loop.partitioner

    def spy(budget=None, lean=True):
        seen.append((budget, lean))
        return real(budget, lean)

    monkeypatch.setattr(loop, "partitioner", spy)
    train(lora_model(), data(tokenizer), TrainConfig(steps=1, batch_size=6, warmup_steps=1, compile=True,
                                                     compile_lean=False, compile_memory_budget=0.8),
          tmp_path / "a", pad_id=1)
    assert seen and set(seen) == {(0.8, False)}


def test_compile_memory_budget_is_checked():
    from efftune.errors import ConfigError
    with pytest.raises(ConfigError, match="train.cuda_graphs needs train.compile"):
        TrainConfig(cuda_graphs=True)
    with pytest.raises(ConfigError, match=r"activation_checkpointing_fraction must be in \(0, 1\]"):
        TrainConfig(activation_checkpointing=True, activation_checkpointing_fraction=0)
    with pytest.raises(ConfigError, match="activation_checkpointing_fraction needs train.activation_checkpointing"):
        TrainConfig(activation_checkpointing_fraction=0.5)
    with pytest.raises(ConfigError, match="train.compile_memory_budget and train.activation_checkpointing"):
        TrainConfig(compile=True, compile_memory_budget=0.5, activation_checkpointing=True)
    # compiled and checkpointed, the compiler recomputes inside the graphs, which CUDA graphs replay:
    # every block, or the share activation_checkpointing_fraction picks
    config = TrainConfig(compile=True, cuda_graphs=True, activation_checkpointing=True)
    assert config.compiler_checkpoints and config.compiled_checkpoint_fraction() == 1.0
    part = TrainConfig(compile=True, cuda_graphs=True, activation_checkpointing=True, activation_checkpointing_fraction=0.5)
    assert part.compiler_checkpoints and part.compiled_checkpoint_fraction() == 0.5
    assert not TrainConfig(activation_checkpointing=True).compiler_checkpoints
    assert TrainConfig(compile=True).compiled_checkpoint_fraction() == 0.0
    with pytest.raises(ConfigError, match="train.compile_memory_budget needs train.compile"):
        TrainConfig(compile_memory_budget=0.5)
    with pytest.raises(ConfigError, match=r"in \(0, 1\]"):
        TrainConfig(compile=True, compile_memory_budget=1.5)


def _moe_model():
    from efftune.attach import replace_module
    from efftune.moe.layer import upcycle_mlp
    from efftune.moe.routing import RouterConfig
    m = tiny_llama()
    for i, layer in enumerate(m.model.layers):
        replace_module(m, f"model.layers.{i}.mlp", upcycle_mlp(layer.mlp, 4, RouterConfig(num_experts=4, mode="switch")))
    for name, p in m.named_parameters():
        p.requires_grad_("router" in name)  # only the routers train
    return m


def test_moe_aux_losses_are_added_and_logged(tokenizer, tmp_path, monkeypatch):
    from efftune.train import loop
    with_aux = _moe_model()
    train(with_aux, data(tokenizer), TrainConfig(steps=2, batch_size=4, lr=1e-2, warmup_steps=1), tmp_path / "a",
          pad_id=1)
    rows = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["load_balancing_loss"] > 0 and "z_loss" in r and "dropped_fraction" in r for r in rows)
    # step 1 runs on upcycled routers, which start at zero: uniform probabilities make the Switch
    # balance loss exactly α, the z-loss c_z · log(4)² and the entropy log(4)
    assert rows[0]["load_balancing_loss"] == pytest.approx(1e-2, abs=1e-6)
    assert rows[0]["z_loss"] == pytest.approx(round(1e-3 * math.log(4) ** 2, 6), abs=1e-9)
    assert rows[0]["router_entropy"] == pytest.approx(math.log(4), abs=1e-6)
    assert all(0 < r["router_entropy"] <= math.log(4) + 1e-6 for r in rows)  # 4 experts
    load = json.loads((tmp_path / "a" / "routing.json").read_text())["expert_load"]
    assert len(load) == 2 and all(len(r) == 4 for r in load) and sum(map(sum, load)) > 0
    assert (tmp_path / "a" / "routing.png").stat().st_size > 1000
    real = loop.collect_aux_losses
    monkeypatch.setattr(loop, "collect_aux_losses", lambda m, mask=None: (real(m, mask)[0] * 0, {}))  # no aux term
    without = _moe_model()
    train(without, data(tokenizer), TrainConfig(steps=2, batch_size=4, lr=1e-2, warmup_steps=1), tmp_path / "b",
          pad_id=1)
    routers = [(a, b) for (n, a), (_, b) in zip(with_aux.named_parameters(), without.named_parameters())
               if "router" in n]
    assert routers and any(not torch.equal(a, b) for a, b in routers)  # the aux loss moved the routers


# ---- never losing work: resume checks, bad checkpoints, divergence, signals ---------------------------------

def _metrics(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


def _untimed(rows):
    return [{k: v for k, v in r.items() if k not in ("seconds", "tokens_per_s")} for r in rows]


def test_torn_last_metrics_line_is_dropped_a_torn_middle_line_named(tokenizer, tmp_path):
    cfg = TrainConfig(steps=4, batch_size=2, save_every=2, warmup_steps=1)
    full = lora_model()
    train(full, data(tokenizer), cfg, tmp_path / "a", pad_id=1)
    train(lora_model(), data(tokenizer), TrainConfig(**{**cfg.__dict__, "steps": 2}), tmp_path / "b", pad_id=1)
    metrics = tmp_path / "b" / "metrics.jsonl"
    rows = metrics.read_text()
    metrics.write_text(rows + '{"step": 3, "loss": 1.2')  # a kill during the append of step 3's row
    m = lora_model()
    train(m, data(tokenizer), cfg, tmp_path / "b", pad_id=1, resume=True, resume_changed=True)
    assert [r["step"] for r in _metrics(metrics)] == [1, 2, 3, 4]
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:1] + ['{"step": 2, "lo'] + lines[2:]) + "\n")
    with pytest.raises(CheckpointError, match=r"metrics.jsonl:2 is not a JSON object"):
        train(lora_model(), data(tokenizer), cfg, tmp_path / "b", pad_id=1, resume=True)


@pytest.mark.parametrize("name", ["trainable.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"])
def test_truncated_checkpoint_file_is_one_error_and_changes_nothing(tokenizer, tmp_path, name):
    cfg = TrainConfig(steps=2, batch_size=2, save_every=2, warmup_steps=1)
    train(lora_model(), data(tokenizer), cfg, tmp_path, pad_id=1)
    f = tmp_path / "checkpoints" / "step-000002" / name
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
    metrics_before = (tmp_path / "metrics.jsonl").read_bytes()
    m = lora_model()
    before = trainable(m)
    with pytest.raises(CheckpointError) as err:
        train(m, data(tokenizer), cfg, tmp_path, pad_id=1, resume=True)
    msg = str(err.value)
    assert name in msg and "truncated or corrupt" in msg and "\n" not in msg
    assert all(torch.equal(before[n], p) for n, p in trainable(m).items())
    assert (tmp_path / "metrics.jsonl").read_bytes() == metrics_before


def test_checkpoint_whose_optimizer_state_does_not_fit_changes_nothing(tokenizer, tmp_path):
    from safetensors.torch import load_file, save_file
    cfg = TrainConfig(steps=2, batch_size=2, save_every=2, warmup_steps=1)
    train(lora_model(), data(tokenizer), cfg, tmp_path, pad_id=1)
    f = tmp_path / "checkpoints" / "step-000002" / "optimizer.safetensors"
    opt = load_file(str(f))
    key = next(k for k in opt if k.endswith("::exp_avg"))
    opt[key] = torch.zeros(3, 3)  # a shape no parameter of this run has
    save_file(opt, str(f))
    m = lora_model()
    before = trainable(m)
    with pytest.raises(CheckpointError, match=r"optimizer state .*exp_avg' has shape \(3, 3\)"):
        train(m, data(tokenizer), cfg, tmp_path, pad_id=1, resume=True)
    assert all(torch.equal(before[n], p) for n, p in trainable(m).items())


def test_resume_refuses_a_config_that_computes_differently(tokenizer, tmp_path):
    cfg = TrainConfig(steps=4, batch_size=2, save_every=2, warmup_steps=1)
    def stop(checkpoint):
        raise KeyboardInterrupt  # right after step 2's checkpoint
    with pytest.raises(KeyboardInterrupt):
        train(lora_model(), data(tokenizer), cfg, tmp_path, pad_id=1, on_checkpoint=stop)
    changed = TrainConfig(steps=4, batch_size=2, save_every=1, warmup_steps=1, lr=5e-3, eval_every=1)
    with pytest.raises(CheckpointError, match=r"another train\.lr; .*--resume-changed"):
        train(lora_model(), data(tokenizer), changed, tmp_path, pad_id=1, resume=True)
    # save_every and eval_every change nothing the run computes: a resume may change them
    res = train(lora_model(), data(tokenizer), TrainConfig(steps=4, batch_size=2, save_every=1, eval_every=1,
                                                            warmup_steps=1), tmp_path, pad_id=1, resume=True)
    assert res.start_step == 2
    res = train(lora_model(), data(tokenizer), changed, tmp_path / "x", pad_id=1)  # (a fresh run is unaffected)
    assert res.start_step == 0


class _LrJump(TrainHooks):
    """The schedule of a run that blows up: a sane learning rate for two steps, then 1e30."""

    def lr_multiplier(self, step, config):
        return 1.0 if step < 2 else 1e30


def test_divergence_sets_the_bad_checkpoint_aside_and_resumes_from_a_good_one(tokenizer, tmp_path):
    cfg = TrainConfig(steps=6, batch_size=2, save_every=1, lr=1e-3, warmup_steps=0)
    with pytest.raises(TrainingDiverged) as err:
        train(lora_model(), data(tokenizer), cfg, tmp_path, pad_id=1, hooks=_LrJump())
    # step 3 (lr 1e27) left finite but huge weights; they gave step 4 a NaN loss
    msg = str(err.value)
    assert "at step 4" in msg and "step-000003.diverged" in msg and "last good checkpoint is" in msg
    assert msg.rstrip().endswith("--resume-changed") and "step-000002" in msg
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-000002"
    assert (tmp_path / "checkpoints" / "step-000003.diverged").is_dir()
    res = train(lora_model(), data(tokenizer), cfg, tmp_path, pad_id=1, resume=True)  # the plain schedule
    assert res.start_step == 2 and math.isfinite(res.final_loss)


def test_non_finite_weights_are_never_checkpointed(tokenizer, tmp_path):
    class Poison(TrainHooks):
        def after_step(self, done, optimizer):
            if done == 3:
                with torch.no_grad():
                    optimizer.param_groups[0]["params"][0].fill_(float("inf"))
            return {}

    cfg = TrainConfig(steps=4, batch_size=2, save_every=3, warmup_steps=1)
    with pytest.raises(TrainingDiverged, match=r"became NaN or infinite at step 3; stopped, no good checkpoint"):
        train(lora_model(), data(tokenizer), cfg, tmp_path, pad_id=1, hooks=Poison())
    assert latest_checkpoint(tmp_path / "checkpoints") is None and not list((tmp_path / "checkpoints").glob("step-*"))


def test_zero_gradient_norm_for_several_steps_warns(tokenizer, tmp_path, capsys):
    m = lora_model()
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.zero_()  # A = B = 0: no gradient reaches either factor
    train(m, data(tokenizer), TrainConfig(steps=6, batch_size=2, warmup_steps=1), tmp_path, pad_id=1)
    rows = _metrics(tmp_path / "metrics.jsonl")
    assert [r["grad_norm"] for r in rows] == [0.0] * 6
    assert [r.get("zero_grad_steps") for r in rows] == [None, None, None, None, 5, 6]
    err = capsys.readouterr().err
    assert err.count("warning: the gradient norm has been 0 for 5 steps (since step 1)") == 1


def test_time_based_checkpoints(tokenizer, tmp_path):
    written = []
    train(lora_model(), data(tokenizer), TrainConfig(steps=3, batch_size=2, save_every=0, save_every_minutes=1e-9,
                                                     warmup_steps=1), tmp_path / "a", pad_id=1,
          on_checkpoint=lambda p: written.append(p.name))
    assert written == ["step-000001", "step-000002", "step-000003"]
    written.clear()
    train(lora_model(), data(tokenizer), TrainConfig(steps=3, batch_size=2, save_every=0, save_every_minutes=0,
                                                     warmup_steps=1), tmp_path / "b", pad_id=1,
          on_checkpoint=lambda p: written.append(p.name))
    assert written == ["step-000003"]


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_finishes_the_step_checkpoints_and_resumes_identically(tokenizer, tmp_path, sig, code):
    import os
    import signal

    from efftune.train.interrupt import RunInterrupted

    class SignalAt(TrainHooks):
        def after_step(self, done, optimizer):
            if done == 3:
                os.kill(os.getpid(), getattr(signal, sig))  # arrives in the middle of step 3's bookkeeping
            return {}

    cfg = TrainConfig(steps=5, batch_size=2, save_every=0, save_every_minutes=0, eval_every=2, warmup_steps=1)
    seqs = data(tokenizer)
    # what the process had (default_int_handler, or SIG_IGN where it was started in the background)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    evaluate = lambda m, step: {"probe": round(float(sum(p.detach().sum() for p in m.parameters() if p.requires_grad)), 6)}
    full = lora_model(dropout=0.1)
    train(full, seqs, cfg, tmp_path / "a", pad_id=1, evaluate=evaluate)
    with pytest.raises(RunInterrupted) as err:
        train(lora_model(dropout=0.1), seqs, cfg, tmp_path / "b", pad_id=1, evaluate=evaluate, hooks=SignalAt())
    assert err.value.exit_code == code and "after step 3" in str(err.value) and "--resume" in str(err.value)
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # the handlers are put back
    assert latest_checkpoint(tmp_path / "b" / "checkpoints").name == "step-000003"
    resumed = lora_model(dropout=0.1)
    train(resumed, seqs, cfg, tmp_path / "b", pad_id=1, evaluate=evaluate, resume=True)
    assert all(torch.equal(a, b) for a, b in zip(trainable(full).values(), trainable(resumed).values()))
    assert _untimed(_metrics(tmp_path / "a" / "metrics.jsonl")) == _untimed(_metrics(tmp_path / "b" / "metrics.jsonl"))


def test_a_crash_in_the_final_evaluation_is_evaluated_again_on_resume(tokenizer, tmp_path):
    cfg = TrainConfig(steps=3, batch_size=2, eval_every=0, warmup_steps=1)
    calls = []

    def evaluate(m, step):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("crash in the final evaluation")
        return {"accuracy": 0.25}
    full = train(lora_model(), data(tokenizer), cfg, tmp_path / "a", pad_id=1, evaluate=lambda m, step: {"accuracy": 0.25})
    with pytest.raises(RuntimeError):
        train(lora_model(), data(tokenizer), cfg, tmp_path / "b", pad_id=1, evaluate=evaluate)
    res = train(lora_model(), data(tokenizer), cfg, tmp_path / "b", pad_id=1, evaluate=evaluate, resume=True)
    assert res.evals == full.evals == [{"step": 0, "accuracy": 0.25}, {"step": 3, "accuracy": 0.25}]
    assert res.final_loss == full.final_loss and res.start_step == 3
    again = train(lora_model(), data(tokenizer), cfg, tmp_path / "b", pad_id=1, evaluate=evaluate, resume=True)
    assert again.evals == full.evals and len(calls) == 3  # a finished run's final evaluation is read back


# ---- k LoRA adapters at once (the module library's --together k) ------------------------------------------

def two_adapters(model=None):
    """float64 tiny llama with LoRA adapters a and b (the same initial weights on every call)."""
    from efftune.methods.lora.model import set_trainable_adapters
    m = model if model is not None else tiny_llama(dtype=torch.float64)
    for n in ("a", "b"):
        add_lora(m, LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"]), adapter=n)
    set_trainable_adapters(m, ["a", "b"])
    return m


def adapter_weights(m, name):
    return {k: p.detach().clone() for k, p in m.named_parameters() if f".adapters.{name}." in k}


def alone(m, name):
    """Model m set to train adapter `name` by itself (the plain loop)."""
    from efftune.methods.lora.model import set_active_adapters, set_trainable_adapters
    set_trainable_adapters(m, [name])
    set_active_adapters(m, name)
    return m


def other_data(tokenizer):
    f = Formatter(tokenizer)
    return [f.encode(MultipleChoice(p, ("True", "False"), i % 2)) for i, p in enumerate(PROMPTS[::-1] * 2)]


def test_k_adapters_train_as_each_alone_and_a_signal_resumes_identically(tokenizer, tmp_path):
    """Two adapters at once (float64, micro-batches, active clipping) end where each alone ends, with
    each one's own loss and gradient norm logged in its own run directory; SIGTERM after step 3
    checkpoints both, and the resume equals the uninterrupted run bit for bit."""
    import os
    import signal

    from efftune.train.interrupt import RunInterrupted
    seqs = {"a": data(tokenizer), "b": other_data(tokenizer)}
    cfg = TrainConfig(steps=4, batch_size=4, micro_batch_size=2, lr=1e-2, warmup_steps=1, grad_clip=0.05,
                      weight_decay=0.01, eval_every=2, save_every=0, save_every_minutes=0)
    calls = []

    def evaluate(m, names, step):  # each adapter's own numbers
        calls.append(names)
        return {n: {"probe": round(float(sum(p.sum() for p in adapter_weights(m, n).values())), 9)} for n in names}
    full = two_adapters()
    res = train(full, seqs, cfg, tmp_path / "k", pad_id=1, evaluate=evaluate)
    assert calls == [["a", "b"]] * 3  # steps 0, 2 and 4
    for n in ("a", "b"):
        solo = alone(two_adapters(), n)
        train(solo, seqs[n], cfg, tmp_path / n, pad_id=1)
        for (key, x), y in zip(adapter_weights(solo, n).items(), adapter_weights(full, n).values()):
            torch.testing.assert_close(y, x, atol=1e-10, rtol=0, msg=key)
        k_rows = [r for r in _metrics(tmp_path / "k" / n / "metrics.jsonl") if "loss" in r]
        one_rows = _metrics(tmp_path / n / "metrics.jsonl")
        assert [r["loss"] for r in k_rows] == pytest.approx([r["loss"] for r in one_rows], abs=2e-6)
        assert [r["grad_norm"] for r in k_rows] == pytest.approx([r["grad_norm"] for r in one_rows], abs=2e-4)
        assert all(r["together"] == 2 for r in k_rows) and one_rows[0]["grad_norm"] > 0.05  # clipping acts
        assert res.adapters[n].final_loss == k_rows[-1]["loss"] and res.adapters[n].evals[-1]["step"] == 4
        assert latest_checkpoint(tmp_path / "k" / n / "checkpoints").name == "step-000004"
    assert adapter_weights(full, "a").keys().isdisjoint(adapter_weights(full, "b").keys())

    class SignalAt(TrainHooks):
        def after_step(self, done, optimizer):
            if done == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return {}
    with pytest.raises(RunInterrupted, match="after step 3"):
        train(two_adapters(), seqs, cfg, tmp_path / "s", pad_id=1, evaluate=evaluate, hooks=SignalAt())
    assert all(latest_checkpoint(tmp_path / "s" / n / "checkpoints").name == "step-000003" for n in ("a", "b"))
    resumed = two_adapters()
    again = train(resumed, seqs, cfg, tmp_path / "s", pad_id=1, evaluate=evaluate, resume=True)
    assert again.start_step == 3 and all(r.start_step == 3 for r in again.adapters.values())
    for n in ("a", "b"):
        assert all(torch.equal(x, y) for x, y in zip(adapter_weights(full, n).values(),
                                                      adapter_weights(resumed, n).values()))
        assert _untimed(_metrics(tmp_path / "k" / n / "metrics.jsonl")) == \
            _untimed(_metrics(tmp_path / "s" / n / "metrics.jsonl"))


def test_k_adapters_resume_each_from_its_own_step(tokenizer, tmp_path):
    """An adapter whose run stopped at step 2 (trained alone) continues beside a fresh one: each
    ends as it would alone, and the plain loop resumes an adapter's checkpoint of a k-adapter run."""
    seqs = {"a": data(tokenizer), "b": other_data(tokenizer)}
    cfg = TrainConfig(steps=3, batch_size=2, lr=1e-2, warmup_steps=1, save_every=1)
    ref = {}
    for n in ("a", "b"):
        solo = alone(two_adapters(), n)
        train(solo, seqs[n], cfg, tmp_path / "ref" / n, pad_id=1)
        ref[n] = adapter_weights(solo, n)
    import shutil
    shutil.copytree(tmp_path / "ref" / "a", tmp_path / "run" / "a")  # a trained alone...
    shutil.rmtree(tmp_path / "run" / "a" / "checkpoints" / "step-000003")  # ...and stopped after step 2
    (tmp_path / "run" / "a" / "checkpoints" / "latest").write_text("step-000002")
    m = two_adapters()
    res = train(m, seqs, cfg, tmp_path / "run", pad_id=1, resume=True)
    assert {n: r.start_step for n, r in res.adapters.items()} == {"a": 2, "b": 0}
    for n in ("a", "b"):
        for (key, x), y in zip(ref[n].items(), adapter_weights(m, n).values()):
            torch.testing.assert_close(y, x, atol=1e-10, rtol=0, msg=key)
    steps = [r["step"] for r in _metrics(tmp_path / "run" / "a" / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3]  # step 3 of the solo run was dropped with its checkpoint, then trained again
    assert [r.get("together") for r in _metrics(tmp_path / "run" / "a" / "metrics.jsonl") if "loss" in r] == \
        [None, None, 2]
    solo = alone(two_adapters(), "b")  # b's checkpoint of the k-adapter run resumes in the plain loop
    (tmp_path / "run" / "b" / "checkpoints" / "latest").write_text("step-000002")
    assert train(solo, seqs["b"], cfg, tmp_path / "run" / "b", pad_id=1, resume=True).start_step == 2
    for (key, x), y in zip(ref["b"].items(), adapter_weights(solo, "b").values()):
        torch.testing.assert_close(y, x, atol=1e-10, rtol=0, msg=key)


def test_k_adapters_moe_balance_loss_is_each_adapters_own(tmp_path):
    """A tiny Qwen3-MoE (float64, balance loss weighted 1): adapters a and b trained at once get
    each its own balance loss over its own rows' real tokens, so they end as each alone; logged
    losses and routing.json per adapter equal the one-adapter runs'."""
    from efftune.data.tokenize import IGNORE, Encoded
    from efftune.moe.router_tap import add_router_taps
    from tests.moe.test_expert_lora import tiny_moe

    def moe_two_adapters(coef=1.0):
        m = tiny_moe("qwen3")
        m.config.router_aux_loss_coef = coef
        add_router_taps(m)
        return two_adapters(m)
    g = torch.Generator().manual_seed(0)

    def task(n):
        out = []
        for _ in range(n):
            p, a = torch.randint(1, 64, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist(), \
                torch.randint(1, 64, (2,), generator=g).tolist()
            out.append(Encoded(p + a, [IGNORE] * len(p) + a))
        return out
    seqs = {"a": task(6), "b": task(5)}
    cfg = TrainConfig(steps=2, batch_size=3, lr=1e-2, warmup_steps=0)
    k = moe_two_adapters()
    train(k, seqs, cfg, tmp_path / "k", pad_id=0)
    for n in ("a", "b"):
        solo = alone(moe_two_adapters(), n)
        train(solo, seqs[n], cfg, tmp_path / n, pad_id=0)
        for (key, x), y in zip(adapter_weights(solo, n).items(), adapter_weights(k, n).values()):
            torch.testing.assert_close(y, x, atol=1e-10, rtol=0, msg=key)
        k_rows, one_rows = _metrics(tmp_path / "k" / n / "metrics.jsonl"), _metrics(tmp_path / n / "metrics.jsonl")
        for key in ("loss", "load_balancing_loss", "router_entropy"):
            assert [r[key] for r in k_rows] == pytest.approx([r[key] for r in one_rows], abs=2e-6), key
        assert json.loads((tmp_path / "k" / n / "routing.json").read_text()) == \
            json.loads((tmp_path / n / "routing.json").read_text())
    without = alone(moe_two_adapters(coef=0.0), "a")  # the balance loss moved the adapters: it counts
    train(without, seqs["a"], cfg, tmp_path / "no_aux", pad_id=0)
    assert any((x - y).abs().max() > 1e-6 for x, y in zip(adapter_weights(without, "a").values(),
                                                          adapter_weights(k, "a").values()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the graphs themselves)")
def test_k_adapters_train_under_cuda_graphs_as_eager_on_gpu(tokenizer, tmp_path):
    """Two adapters at once, compiled blocks replayed as CUDA graphs (rows padded to max_length; the
    adapters' row indices are graph inputs, so a new layout of rows is no new graph), two
    micro-batches a step and evaluations between: the same logs and weights as eager."""
    seqs = {"a": data(tokenizer), "b": other_data(tokenizer)}
    runs = []

    @torch.no_grad()
    def probe(model, names, step):
        return {n: {"n": float(sum(p.sum() for p in adapter_weights(model, n).values()))} for n in names}

    for graphs in (False, True):
        m = two_adapters(tiny_llama().to("cuda", torch.float64))
        randomize_lora(m)  # B != 0, so every factor has a gradient from the first step
        train(m, seqs, TrainConfig(steps=3, batch_size=6, micro_batch_size=3, lr=1e-2, warmup_steps=1, max_length=64,
                                   precision="fp32", compile=graphs, cuda_graphs=graphs, eval_every=1),
              tmp_path / str(graphs), pad_id=1, evaluate=probe)
        logs = {n: [(r["loss"], r["grad_norm"]) for r in _metrics(tmp_path / str(graphs) / n / "metrics.jsonl")
                    if "loss" in r] for n in ("a", "b")}
        runs.append(({n: adapter_weights(m, n) for n in ("a", "b")}, logs))
    (eager, eager_log), (graphed, graphed_log) = runs
    assert len(graphed_log["a"]) == 3 and graphed_log == eager_log
    for n in ("a", "b"):
        for x, y in zip(eager[n].values(), graphed[n].values()):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


def test_k_adapters_refuse_what_cannot_be_split_and_name_a_diverging_adapter(tokenizer, tmp_path):
    from efftune.errors import ConfigError
    seqs = {"a": data(tokenizer), "b": other_data(tokenizer)}
    cfg = TrainConfig(steps=3, batch_size=2, warmup_steps=0, save_every=1)
    m = two_adapters()
    with pytest.raises(ConfigError, match="no LoRA adapter named 'c'"):
        train(m, {"a": seqs["a"], "c": seqs["b"]}, cfg, tmp_path, pad_id=1)
    with pytest.raises(ConfigError, match="no training examples for adapter 'b'"):
        train(m, {"a": seqs["a"], "b": []}, cfg, tmp_path, pad_id=1)

    class Counter(TrainHooks):  # state of its own: one for all adapters, though each resumes from its own step
        def state(self):
            return {"count": torch.zeros(1)}

    class Merging(TrainHooks):  # writes into the base weights the adapters share (as ReLoRA's restarts)
        keeps_base_weights = False
    for hooks in (Counter(), Merging()):
        with pytest.raises(ConfigError, match=f"cannot run with {type(hooks).__name__}"):
            train(m, seqs, cfg, tmp_path, pad_id=1, hooks=hooks)
    m.lm_head.weight.requires_grad_(True)
    with pytest.raises(ConfigError, match="lm_head.weight is trainable but belongs to none of the adapters"):
        train(m, seqs, cfg, tmp_path, pad_id=1)
    assert not list(tmp_path.iterdir())  # refused before anything was written

    class PoisonB(TrainHooks):
        def after_step(self, done, optimizer):
            if done == 2:
                with torch.no_grad():
                    next(iter(adapter_weights_live(m2, "b"))).fill_(float("inf"))
            return {}
    m2 = two_adapters()
    with pytest.raises(TrainingDiverged, match=r"^adapter b: weight '.*\.adapters\.b\..*' became NaN or infinite at "
                                               r"step 2; stopped, the last good checkpoint is .*step-000001"):
        train(m2, seqs, cfg, tmp_path / "run", pad_id=1, hooks=PoisonB())
    for n in ("a", "b"):  # the step-2 checkpoint of neither was written
        assert latest_checkpoint(tmp_path / "run" / n / "checkpoints").name == "step-000001"


def adapter_weights_live(m, name):
    return [p for k, p in m.named_parameters() if f".adapters.{name}." in k]

"""Full fine-tuning (`--method full`): what trains, the saved model directory, exact resume, 8-bit AdamW."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from efftune.config import load_config
from efftune.errors import ConfigError, TargetError
from efftune.methods.full import FullConfig, add_full, load_full, save_full
from efftune.train.checkpoint import latest_checkpoint
from efftune.train.loop import TrainConfig, train
from tests.conftest import tiny_llama
from tests.test_cli import ROWS, last_json, run
from tests.train.test_loop import data


def llama(hidden=32, intermediate=64, tied=False, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=300, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tied, attn_implementation="sdpa", initializer_range=0.2)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


CFG = dict(batch_size=4, lr=1e-2, warmup_steps=0, eval_every=0, save_every=0)


@pytest.mark.parametrize("targets, chosen", [
    ("all", lambda n: True),
    (["mlp"], lambda n: ".mlp." in n),                                   # suffix: every MLP
    (r"model\.layers\.1\..*", lambda n: n.startswith("model.layers.1.")),  # regex: one layer's modules
])
def test_full_moves_every_targeted_weight_and_no_other(tokenizer, tmp_path, targets, chosen):
    model = tiny_llama()
    before = weights(model)
    names = add_full(model, FullConfig(target_modules=targets))
    assert names == [n for n in before if chosen(n)] and names
    train(model, data(tokenizer), TrainConfig(steps=2, **CFG), tmp_path, pad_id=1)
    for n, p in model.named_parameters():
        assert p.requires_grad == chosen(n), n
        assert torch.equal(p, before[n]) != chosen(n), n  # moved exactly when targeted


@pytest.mark.parametrize("mode", [{"activation_checkpointing": True}, {"compile": True}])
def test_full_fine_tuning_trains_the_same_through_checkpointing_and_compiled_blocks(tokenizer, tmp_path, mode):
    # Adam divides by each gradient's own scale, so a rounding difference in a tiny gradient becomes a
    # difference of up to lr in its weight: a small lr keeps that far below the tolerance
    runs = []
    for extra in ({}, mode):
        model = tiny_llama()
        add_full(model)
        train(model, data(tokenizer), TrainConfig(steps=2, **{**CFG, "lr": 1e-4}, **extra), tmp_path / str(len(runs)),
              pad_id=1)
        runs.append(weights(model))
    for n, w in runs[0].items():
        torch.testing.assert_close(runs[1][n], w, atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")


def test_a_half_precision_model_trains_fp32_masters_and_saves_in_its_own_dtype(tokenizer, tmp_path):
    model = llama(dtype=torch.bfloat16)
    add_full(model, FullConfig(target_modules=["mlp"]))
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert all((d == torch.float32) == (".mlp." in n) for n, d in dtypes.items())
    train(model, data(tokenizer), TrainConfig(steps=2, precision="bf16", **CFG), tmp_path / "run", pad_id=1)
    save_full(model, tmp_path / "out", FullConfig(target_modules=["mlp"]))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for n, p in loaded.named_parameters():  # the saved weights: the trained ones, rounded to bf16
        assert p.dtype == torch.bfloat16 and torch.equal(p, model.get_parameter(n).detach().to(torch.bfloat16)), n
    assert json.loads((tmp_path / "out" / "full_config.json").read_text())["dtype"] == "bfloat16"


def test_the_saved_model_loads_in_transformers_and_gives_the_trained_logits(tokenizer, tmp_path):
    model = llama(tied=True)  # tied embeddings train once and are saved once
    add_full(model)
    train(model, data(tokenizer), TrainConfig(steps=2, **CFG), tmp_path / "run", pad_id=1)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    save_full(model, tmp_path / "out", FullConfig(), tokenizer=tokenizer, max_shard_size="20KB")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded above the size
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.tensor([tokenizer("Q: Is the sky blue?\nA: yes")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model.eval()(ids).logits)
    assert AutoTokenizer.from_pretrained(tmp_path / "out")("sky")["input_ids"] == tokenizer("sky")["input_ids"]
    fresh = llama(tied=True, seed=1)  # efftune's loader puts the same weights into a model of that shape
    load_full(fresh, tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(fresh.eval()(ids).logits, loaded(ids).logits)


def _stop_after_first_save(model, step):
    _stop_after_first_save.calls += 1
    if _stop_after_first_save.calls == 2:  # call 1 is the step-0 evaluation, call 2 follows step 2
        raise KeyboardInterrupt
    return {}


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit", "adamwfp8"])
def test_resume_equals_an_uninterrupted_run(tokenizer, tmp_path, optimizer):
    if optimizer != "adamw":
        pytest.importorskip("torchao")
    # 64 x 128 MLP weights hold 8,192 values: torchao keeps their moments in 8 bits (from 4,096)
    make = lambda: llama(hidden=64, intermediate=128)
    cfg = TrainConfig(steps=4, batch_size=4, lr=1e-2, warmup_steps=1, save_every=2, eval_every=2, optimizer=optimizer)
    seqs = data(tokenizer)
    whole = make()
    add_full(whole)
    res_whole = train(whole, seqs, cfg, tmp_path / "a", pad_id=1, evaluate=lambda m, step: {})

    _stop_after_first_save.calls = 0
    stopped = make()
    add_full(stopped)
    with pytest.raises(KeyboardInterrupt):
        train(stopped, seqs, cfg, tmp_path / "b", pad_id=1, evaluate=_stop_after_first_save)
    ckpt = latest_checkpoint(tmp_path / "b" / "checkpoints")
    assert ckpt.name == "step-000002"
    from safetensors import safe_open
    with safe_open(ckpt / "optimizer.safetensors", "pt") as f:
        scales = [k for k in f.keys() if k.endswith("::scale")]
        codes = {f.get_tensor(k.removesuffix("::scale")).dtype for k in scales}
    assert bool(scales) == (optimizer != "adamw")  # 8-bit moments are saved as codes and scales
    assert codes <= {torch.uint8 if optimizer == "adamw8bit" else torch.float8_e4m3fn}

    resumed = make()
    add_full(resumed)
    res_resumed = train(resumed, seqs, cfg, tmp_path / "b", pad_id=1, resume=True, evaluate=lambda m, step: {})
    assert res_resumed.final_loss == res_whole.final_loss
    for n, p in whole.named_parameters():
        assert torch.equal(p, resumed.get_parameter(n)), n


@pytest.mark.parametrize("eight", ["adamw8bit", "adamwfp8"])
def test_8bit_moments_but_fp32_ones_for_the_embeddings(tokenizer, tmp_path, eight):
    pytest.importorskip("torchao")
    from efftune.train.loop import make_optimizer
    from efftune.train.optimizers import QUANTIZED, embedding_weights, is_quantized
    runs, lr, steps = {}, 1e-3, 3
    for optimizer in ("adamw", eight):
        model = llama(hidden=64, intermediate=128)
        add_full(model)
        start = weights(model)
        train(model, data(tokenizer), TrainConfig(steps=steps, optimizer=optimizer, **{**CFG, "lr": lr}),
              tmp_path / optimizer, pad_id=1)
        runs[optimizer] = {n: p.detach() - start[n] for n, p in model.named_parameters()}
    # which moments are 8-bit: every matrix of 4,096 values or more, but the embeddings and the head
    model = llama(hidden=64, intermediate=128)
    add_full(model)
    params = list(model.parameters())
    opt = make_optimizer([params], TrainConfig(optimizer=eight), torch.device("cpu"), embedding_weights(model))
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    eight_bit = {n: is_quantized(opt.state[p]["exp_avg"]) and is_quantized(opt.state[p]["exp_avg_sq"])
                 and opt.state[p]["exp_avg"].codes.dtype == QUANTIZED[eight][1] for n, p in model.named_parameters()}
    assert eight_bit == {n: p.numel() >= 4096 and n not in ("model.embed_tokens.weight", "lm_head.weight")
                         for n, p in model.named_parameters()}
    # Adam moves a weight by about lr a step; 8-bit moments change the path a little, never by more than
    # that (8-bit moments on the embeddings moved rare tokens' entries by 0.79 here)
    for n, exact in runs["adamw"].items():
        assert (runs[eight][n] - exact).abs().max() < lr * steps, n


@pytest.mark.parametrize("eight", ["adamw8bit", "adamwfp8"])
def test_an_optimizer_step_with_8bit_moments_is_adams(tmp_path, eight):
    pytest.importorskip("torchao")
    from efftune.train.optimizers import build_optimizer, is_quantized
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 128))
    opt = build_optimizer(eight, [{"params": [p], "weight_decay": 0.0}], 1e-2, torch.device("cpu"))
    g = torch.randn_like(p)
    p.grad = g.clone()
    start = p.detach().clone()
    opt.step()
    assert is_quantized(opt.state[p]["exp_avg"]) and isinstance(opt.param_groups[0]["lr"], float)
    # Adam's first step, by hand: m = 0.1 g, v = 0.001 g², bias-corrected m / sqrt(v) = sign(g)
    m_hat, v_hat = g, g * g
    reference = start - 1e-2 * m_hat / (v_hat.sqrt() + 1e-8)
    assert torch.allclose(p.detach(), reference, atol=1e-4)


@pytest.mark.parametrize("eight", ["adamw8bit", "adamwfp8"])
def test_8bit_moments_load_as_their_values_where_they_cannot_stay_8bit(eight):
    """A checkpoint's 8-bit moment for a parameter whose moments this run keeps plain (under FSDP: rows that
    do not split across the ranks in whole blocks) loads as the values its codes stand for."""
    pytest.importorskip("torchao")
    from efftune.train.optimizers import build_optimizer, is_quantized, state_tensors
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 128))
    saving = build_optimizer(eight, [{"params": [p], "weight_decay": 0.0}], 1e-2, torch.device("cpu"))
    p.grad = torch.randn_like(p)
    saving.step()
    moment = saving.state[p]["exp_avg"]
    assert is_quantized(moment) and set(state_tensors("exp_avg", moment)) == {"exp_avg", "exp_avg::scale"}
    loading = build_optimizer(eight, [{"params": [p], "weight_decay": 0.0}], 1e-2, torch.device("cpu"),
                              fp32_moments=[p])  # this one keeps p's moments in fp32
    state = {k: v for field, value in saving.state[p].items() for k, v in
             (state_tensors(field, value) if field != "step" else {field: value}).items()}
    loading.load_state_dict({"state": {0: state}, "param_groups": saving.state_dict()["param_groups"]})
    loaded = loading.state[p]["exp_avg"]
    assert not is_quantized(loaded) and torch.equal(loaded, moment.dequantize())


@pytest.mark.parametrize("wrote, resumes", [("adamw8bit", "adamwfp8"), ("adamwfp8", "adamw8bit")])
def test_a_resume_with_the_other_8bit_optimizer_is_refused_and_changes_nothing(tokenizer, tmp_path, wrote, resumes):
    """Map indices (adamw8bit) read as fp8 numbers (adamwfp8), or the other way round, are other moments:
    even where the run is told a changed config is fine (`resume_changed`), the checkpoint is refused."""
    pytest.importorskip("torchao")
    from efftune.errors import CheckpointError
    make = lambda: llama(hidden=64, intermediate=128)
    model = make()
    add_full(model)
    cfg = dict(steps=2, batch_size=4, lr=1e-2, warmup_steps=1, save_every=2, eval_every=0)
    train(model, data(tokenizer), TrainConfig(optimizer=wrote, **cfg), tmp_path, pad_id=1)
    again = make()
    add_full(again)
    before = weights(again)
    with pytest.raises(CheckpointError, match=f"holds train.optimizer {wrote}'s .* resume with train.optimizer {wrote}"):
        train(again, data(tokenizer), TrainConfig(optimizer=resumes, **cfg), tmp_path, pad_id=1, resume=True,
              resume_changed=True)
    assert all(torch.equal(before[n], p) for n, p in again.named_parameters())


# ---- bad input -------------------------------------------------------------------------------------------

def test_a_target_pattern_matching_nothing_is_refused():
    with pytest.raises(TargetError, match="nothing_here"):
        add_full(tiny_llama(), FullConfig(target_modules=["nothing_here"]))


@pytest.mark.parametrize("values, words", [
    ({"method": "full", "train": {"fp8_base": True}}, ["method full", "train.fp8_base"]),
    ({"method": "relora", "train": {"optimizer": "adamw8bit"}}, ["method relora", "adamw8bit"]),
    ({"method": "relora", "train": {"optimizer": "adamwfp8"}}, ["method relora", "adamwfp8"]),
    ({"train": {"optimizer": "sgd"}}, ["train.optimizer", "sgd"]),
    ({"method": "full", "full": {"target_modules": []}}, ["full.target_modules"]),
])
def test_combinations_that_cannot_run_are_refused_naming_both(values, words):
    with pytest.raises(ConfigError) as exc:
        load_config(None, values)
    assert all(w in str(exc.value) for w in words), str(exc.value)


@pytest.mark.parametrize("method", ["full", "relora"])
def test_methods_that_write_into_the_base_refuse_a_quantised_or_fp8_base(method):
    # the methods' own records say they write into the base (Method.writes_base)
    with pytest.raises(ConfigError, match=f"quantize: int8 cannot run with method: {method}"):
        load_config(None, {"method": method, "quantize": "int8"})
    with pytest.raises(ConfigError, match=f"method {method} writes into the base weights, so train.fp8_base"):
        load_config(None, {"method": method, "train": {"fp8_base": True}})


def test_adamw8bit_without_torchao_names_the_extra(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(ConfigError, match=r"efftune\[optim\]"):
        TrainConfig(optimizer="adamw8bit")


# ---- the command line ------------------------------------------------------------------------------------

@pytest.fixture
def data_file(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return p


def test_method_full_from_the_cli_writes_a_model_eval_loads(capsys, model_dir, data_file, tmp_path):
    out_dir = tmp_path / "f"
    code, out, err = run(capsys, "train", "--model", model_dir, "--data", data_file, "--method", "full",
                         "--full.target-modules", "mlp", "--steps", 3, "--batch-size", 4, "--output", out_dir)
    assert code == 0, err
    summary = last_json(out)
    assert summary["model"] == str(out_dir / "model") and "full:" in err
    code, out, err = run(capsys, "eval", "--model", out_dir / "model", "--data", data_file)
    assert code == 0, err
    direct = last_json(out)["accuracy"]
    code, out, err = run(capsys, "eval", "--model", model_dir, "--adapter", out_dir / "model", "--data", data_file)
    assert code == 0, err
    assert last_json(out)["accuracy"] == direct
    code, out, err = run(capsys, "train", "--model", model_dir, "--data", data_file, "--method", "full",
                         "--fp8-base", "--output", tmp_path / "g")
    assert code == 2 and "method full" in err and "fp8_base" in err and not (tmp_path / "g").exists()

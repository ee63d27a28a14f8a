import json

import pytest
import torch
from torch import nn

from efftune.data import Formatter, MultipleChoice
from efftune.methods.lora.config import LoraConfig
from efftune.methods.lora.layer import lora_layers
from efftune.methods.lora.model import add_lora
from efftune.methods.relora import ReLoraConfig, ReLoraHooks, merge_and_restart, reset_optimizer_state, train_full_rank
from efftune.schedule import jagged_cosine, warmup_cosine
from efftune.train.loop import TrainConfig, train
from tests.conftest import randomize_lora, tiny_llama


def test_merge_and_restart_keeps_outputs():
    m = tiny_llama()
    add_lora(m, LoraConfig(r=2))
    randomize_lora(m)
    ids = torch.randint(0, 300, (2, 8))
    with torch.no_grad():
        before = m(ids).logits
        A0 = [l.adapters["default"].lora_A.clone() for _, l in lora_layers(m)]
        merge_and_restart(m)
        torch.testing.assert_close(m(ids).logits, before, atol=1e-5, rtol=0)
    for (_, l), a0 in zip(lora_layers(m), A0):
        assert torch.all(l.adapters["default"].lora_B == 0) and not torch.equal(l.adapters["default"].lora_A, a0)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8, bias=False)

    def forward(self, x):
        return self.proj(x)


def test_accumulated_update_exceeds_rank_r():
    torch.manual_seed(0)
    model = Toy()
    W0 = model.proj.weight.detach().clone()
    add_lora(model, LoraConfig(r=1, alpha=1, target_modules=["proj"]))
    target = torch.randn(8, 8)  # full rank
    hooks = ReLoraHooks(model, ReLoraConfig(restart_every=25, optimizer_reset="zero"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2, weight_decay=0)
    for step in range(100):
        x = torch.randn(32, 8)
        loss = (model(x) - x @ target.T).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        hooks.after_step(step + 1, opt)
    assert hooks.restarts == 4
    update = model.proj.base_layer.weight.detach() - W0
    assert torch.linalg.matrix_rank(update, atol=1e-4) >= 3  # each cycle added a new rank-1 direction


def test_jagged_schedule_at_restart_boundaries():
    kw = dict(total=100, warmup=5, restart_every=20, rewarmup=4, min_ratio=0.1)
    assert jagged_cosine(3, **kw) == pytest.approx(warmup_cosine(3, 100, 5, 0.1))      # global warmup
    assert jagged_cosine(19, **kw) == pytest.approx(warmup_cosine(19, 100, 5, 0.1))    # before restart
    assert jagged_cosine(20, **kw) == pytest.approx(warmup_cosine(20, 100, 5, 0.1) / 5)  # right after it
    assert jagged_cosine(23, **kw) == pytest.approx(warmup_cosine(23, 100, 5, 0.1) * 4 / 5)
    assert jagged_cosine(24, **kw) == pytest.approx(warmup_cosine(24, 100, 5, 0.1))    # back on the curve
    assert jagged_cosine(40, **kw) < jagged_cosine(39, **kw) / 3


@pytest.mark.parametrize("how, kept", [("zero", 0), ("magnitude", 10), ("random", None)])
def test_optimizer_reset_prunes_lora_state_only(how, kept):
    torch.manual_seed(0)
    lora_p = nn.Parameter(torch.randn(10, 10))
    other = nn.Parameter(torch.randn(5))
    opt = torch.optim.AdamW([lora_p, other], lr=1e-2)
    ((lora_p * torch.randn(10, 10)).sum() + other.pow(3).sum()).backward()  # distinct moments
    opt.step()
    other_before = {k: v.clone() for k, v in opt.state[other].items()}
    avg = opt.state[lora_p]["exp_avg"].clone()
    reset_optimizer_state(opt, [lora_p], how, prune_fraction=0.9)
    after = opt.state[lora_p]["exp_avg"]
    nonzero = int((after != 0).sum())
    if kept is not None:
        assert nonzero == kept
    else:
        assert 0 < nonzero < 40
    if how == "magnitude":  # the survivors are the largest entries, unchanged
        top = avg.abs().flatten().topk(10).values
        assert torch.equal(after.abs().flatten().topk(10).values, top)
    for k, v in opt.state[other].items():
        assert torch.equal(v, other_before[k])
    assert opt.state[lora_p]["step"] == 1


def test_full_rank_modules_train_and_unknown_names_fail():
    m = tiny_llama()
    add_lora(m, LoraConfig(r=2))
    names = train_full_rank(m, ["embed_tokens", "norm"])
    assert "model.embed_tokens" in names and "model.norm" in names
    assert m.model.embed_tokens.weight.requires_grad and m.model.norm.weight.requires_grad
    assert not m.model.layers[0].self_attn.q_proj.base_layer.weight.requires_grad
    with pytest.raises(Exception, match="matches no module"):
        train_full_rank(m, ["nothing_here"])


def _data(tokenizer):
    f = Formatter(tokenizer)
    return [f.encode(MultipleChoice(f"Q: Is {w} blue?\nA: ", ("yes", "no"), i % 2))
            for i, w in enumerate(["sky", "grass", "fox", "dog", "sky", "fox"])]


def _relora_model():
    m = tiny_llama()
    add_lora(m, LoraConfig(r=2, dropout=0.1))
    return m


def test_resume_across_a_restart_equals_uninterrupted(tokenizer, tmp_path):
    cfg = TrainConfig(steps=6, batch_size=3, lr=1e-2, warmup_steps=1, save_every=3, eval_every=3)
    rcfg = ReLoraConfig(restart_every=2, rewarmup_steps=1, optimizer_reset="random", prune_fraction=0.5)
    seqs = _data(tokenizer)
    full = _relora_model()
    res_full = train(full, seqs, cfg, tmp_path / "a", pad_id=1, hooks=ReLoraHooks(full, rcfg), evaluate=lambda m, step: {})

    def stop_after_step_3(model, step):
        stop_after_step_3.calls += 1
        if stop_after_step_3.calls == 2:
            raise KeyboardInterrupt
        return {}
    stop_after_step_3.calls = 0
    half = _relora_model()
    with pytest.raises(KeyboardInterrupt):  # stopped mid-cycle, one restart (step 2) behind it
        train(half, seqs, cfg, tmp_path / "b", pad_id=1, hooks=ReLoraHooks(half, rcfg), evaluate=stop_after_step_3)
    resumed = _relora_model()
    res = train(resumed, seqs, cfg, tmp_path / "b", pad_id=1, resume=True, hooks=ReLoraHooks(resumed, rcfg),
                evaluate=lambda m, step: {})
    assert res.final_loss == res_full.final_loss
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n
    rows = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("relora_restart")] == [2, 4, 6]


# ---- warm start: a full-rank phase first, then LoRA, in one run ----------------------------------

def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(a, b):
    return {n for n in a if not torch.equal(a[n], b[n])}


def test_warm_start_switch_keeps_outputs_and_drops_base_state():
    m = tiny_llama()
    add_lora(m, LoraConfig(r=2))
    hooks = ReLoraHooks(m, ReLoraConfig(restart_every=4, warm_start_steps=2))
    opt = torch.optim.AdamW(hooks.parameters(m), lr=1e-2)
    base = hooks.base_weights()
    assert all(any(p is w for p in opt.param_groups[0]["params"]) for w in base)
    ids = torch.randint(0, 300, (2, 8))
    for done in (1, 2):
        m.train()
        m(ids, labels=ids).loss.backward()
        assert all(w.grad is not None for w in base) and all(p.grad is None for p in hooks.lora_parameters())
        opt.step()
        opt.zero_grad(set_to_none=True)
        if done == 2:
            assert all(w in opt.state for w in base)
            m.eval()
            with torch.no_grad():
                before = m(ids).logits
        assert hooks.after_step(done, opt) == ({"relora_switch": True} if done == 2 else {})
        assert not any(w.requires_grad for w in base)  # between steps, as in a checkpoint
    with torch.no_grad():
        assert torch.equal(m(ids).logits, before)  # B = 0: switching LoRA on changes nothing
    assert not any(w in opt.state for w in base)  # the full-rank moments are freed
    m.train()
    m(ids, labels=ids).loss.backward()
    assert all(w.grad is None for w in base) and all(p.grad is not None for p in hooks.lora_parameters())


def test_warm_start_trains_base_weights_first_then_lora_only(tokenizer, tmp_path):
    cfg = TrainConfig(steps=5, batch_size=3, lr=1e-2, warmup_steps=1, save_every=0, eval_every=1)
    rcfg = ReLoraConfig(restart_every=10, rewarmup_steps=1, warm_start_steps=2, full_rank=["norm"])
    m = _relora_model()
    train_full_rank(m, rcfg.full_rank)
    snaps = []
    train(m, _data(tokenizer), cfg, tmp_path, pad_id=1, hooks=ReLoraHooks(m, rcfg),
          evaluate=lambda model, step: snaps.append(_snapshot(model)) or {})
    lora = {n for n in snaps[0] if ".adapters." in n}
    base = {n for n in snaps[0] if n.endswith("base_layer.weight")}
    full = {"model.norm.weight"}
    assert lora and base and full
    for k in (1, 2):  # warm start: base weights (and full-rank modules) train, LoRA stays at init
        changed = _changed(snaps[k - 1], snaps[k])
        assert changed == base | full
    for k in (3, 4, 5):  # after the switch: LoRA (B first) and full-rank modules only
        changed = _changed(snaps[k - 1], snaps[k])
        assert full <= changed <= lora | full and any(n.endswith("lora_B") for n in changed)
    for n in lora:
        assert torch.equal(snaps[2][n], snaps[0][n])
    assert not any(p.requires_grad for n, p in m.named_parameters() if n in base)
    logged = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if r.get("relora_switch")] == [2]


def test_warm_start_schedule_counts_restarts_from_the_switch():
    m = tiny_llama()
    add_lora(m, LoraConfig(r=2))
    cfg = TrainConfig(steps=100, warmup_steps=5, min_lr_ratio=0.1)
    hooks = ReLoraHooks(m, ReLoraConfig(restart_every=20, rewarmup_steps=4, warm_start_steps=30))
    lr = lambda s: hooks.lr_multiplier(s, cfg)
    cos = lambda s: warmup_cosine(s, 100, 5, 0.1)
    for s in (0, 3, 20, 29, 34, 49):  # warm start (no restart at 20), and back on the curve
        assert lr(s) == pytest.approx(cos(s))
    for s in (30, 50, 70):  # re-warmup after the switch and after each restart
        assert lr(s) == pytest.approx(cos(s) / 5)
        assert lr(s + 3) == pytest.approx(cos(s + 3) * 4 / 5)
    no_warm = ReLoraHooks(m, ReLoraConfig(restart_every=20, rewarmup_steps=4))
    assert [no_warm.lr_multiplier(s, cfg) for s in range(100)] == \
        [jagged_cosine(s, 100, 5, 20, 4, 0.1) for s in range(100)]


@pytest.mark.parametrize("stop_after", [2, 3, 4])  # inside the warm start, at the switch, after it
def test_resume_across_the_warm_start_switch_equals_uninterrupted(tokenizer, tmp_path, stop_after):
    cfg = TrainConfig(steps=6, batch_size=3, lr=1e-2, warmup_steps=1, save_every=1, eval_every=1)
    rcfg = ReLoraConfig(restart_every=2, rewarmup_steps=1, optimizer_reset="random", prune_fraction=0.5,
                        warm_start_steps=3, full_rank=["norm"])
    seqs = _data(tokenizer)

    def run(out, resume=False, evaluate=lambda m, step: {}):
        model = _relora_model()
        train_full_rank(model, rcfg.full_rank)
        return model, train(model, seqs, cfg, out, pad_id=1, resume=resume, hooks=ReLoraHooks(model, rcfg),
                            evaluate=evaluate)

    full, res_full = run(tmp_path / "a")

    def stop(model, step):
        stop.calls += 1
        if stop.calls == stop_after + 1:  # call 1 is the evaluation before step 1
            raise KeyboardInterrupt
        return {}
    stop.calls = 0
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", evaluate=stop)
    resumed, res = run(tmp_path / "b", resume=True)
    assert res.final_loss == res_full.final_loss
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n
    rows = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("relora_switch")] == [3]
    assert [r["step"] for r in rows if r.get("relora_restart")] == [5]

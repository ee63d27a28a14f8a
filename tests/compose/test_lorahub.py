from __future__ import annotations

import numpy as np
import pytest
import torch

from efftune.compose.lorahub import FewShotLoss, LoraHub, load_library, lorahub, objective, select_modules
from efftune.data.examples import MultipleChoice
from efftune.data.tokenize import Formatter
from efftune.errors import EfftuneError
from efftune.methods.lora.config import LoraConfig
from efftune.methods.lora.layer import lora_layers
from efftune.methods.lora.model import add_lora, set_active_adapters
from efftune.methods.lora.peft_format import load_adapter, save_adapter
from efftune.train.loop import TrainConfig, train
from tests.conftest import randomize_lora, tiny_llama

IDS = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(m):
    with torch.no_grad():
        return m(input_ids=IDS).logits


def mixed_library():
    """Three modules of ranks 4, 2 (q/v only) and 8, with different alphas."""
    m = tiny_llama()
    add_lora(m, LoraConfig(r=4, alpha=8), adapter="a")
    add_lora(m, LoraConfig(r=2, alpha=2, target_modules=["q_proj", "v_proj"]), adapter="b")
    add_lora(m, LoraConfig(r=8, alpha=4), adapter="c")
    randomize_lora(m, std=0.2)
    return m


def task(answer: int, n: int = 12, start: int = 0) -> list[MultipleChoice]:
    return [MultipleChoice(f"Q: Is item {k} blue?\nA:", ("yes", "no"), answer) for k in range(start, start + n)]


# ---- composition --------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", [0, 1, 2])
def test_one_hot_weights_reproduce_a_module(which):
    m = mixed_library()
    names = ["a", "b", "c"]
    set_active_adapters(m, names[which])
    expected = logits(m)
    hub = LoraHub(m, names)
    hub.set_weights(np.eye(3)[which])
    torch.testing.assert_close(logits(m), expected, atol=1e-5, rtol=0)
    assert {l.adapters["lorahub"].r for _, l in lora_layers(m)} == {8}  # padded to the largest rank


def test_zero_weights_are_the_base_model():
    m = mixed_library()
    set_active_adapters(m, None)
    base = logits(m)
    hub = LoraHub(m, ["a", "b", "c"])
    hub.set_weights([0.0, 0.0, 0.0])
    torch.testing.assert_close(logits(m), base, atol=1e-6, rtol=0)


def test_factorwise_composition_has_cross_terms():
    m = mixed_library()
    hub = LoraHub(m, ["a", "c"])
    hub.set_weights([0.5, -1.0])
    layer = m.get_submodule("model.layers.0.self_attn.o_proj")
    a, c = layer.adapters["a"], layer.adapters["c"]
    A = torch.cat([0.5 * a.lora_A, torch.zeros(4, a.lora_A.shape[1])]) - c.lora_A
    B = torch.cat([0.5 * a.scaling * a.lora_B, torch.zeros(a.lora_B.shape[0], 4)], 1) - c.scaling * c.lora_B
    torch.testing.assert_close(layer.adapters["lorahub"].delta_weight(), B @ A)
    assert layer.active == ["lorahub"]


def test_save_load_and_merge_keep_the_composition(tmp_path):
    m = mixed_library()
    hub = LoraHub(m, ["a", "b", "c"])
    hub.set_weights([0.7, -0.4, 1.2])
    expected = logits(m)
    hub.save(tmp_path / "hub", metadata={"objective": 1.0})
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path / "hub", adapter="x")
    torch.testing.assert_close(logits(fresh), expected, atol=1e-5, rtol=0)
    hub.merge()
    torch.testing.assert_close(logits(m), expected, atol=1e-5, rtol=0)


def test_bad_names_error():
    m = mixed_library()
    with pytest.raises(EfftuneError, match="no adapter named 'z'"):
        LoraHub(m, ["a", "z"])
    LoraHub(m, ["a"])
    with pytest.raises(EfftuneError, match="already exists"):
        LoraHub(m, ["b"])


# ---- objective --------------------------------------------------------------------------------------

def test_regulariser_term(tokenizer):
    m = mixed_library()
    fmt = Formatter(tokenizer)
    examples = task(0, 5)
    hub, loss_fn = LoraHub(m, ["a", "b", "c"]), FewShotLoss(m, fmt, examples)
    w = np.array([0.3, -1.2, 0.9])
    value, loss = objective(hub, loss_fn, w)
    hub.set_weights(w)
    assert loss == loss_fn()
    assert value - loss == pytest.approx(0.05 * 0.8, abs=1e-12)
    assert objective(hub, loss_fn, w, regularization=0.5)[0] - loss == pytest.approx(0.4, abs=1e-12)


def test_search_result_splits_objective_and_loss(tokenizer):
    m = mixed_library()
    examples = task(0, 5)
    hub, res = lorahub(m, Formatter(tokenizer), examples, ["a", "b", "c"], budget=5, regularization=0.05)
    assert res.objective - res.loss == pytest.approx(0.05 * np.mean(np.abs(res.weights)), abs=1e-12)
    assert FewShotLoss(m, Formatter(tokenizer), examples)() == pytest.approx(res.loss, abs=1e-9)
    assert res.objective == min([res.base_objective, *res.losses])


def test_few_shot_loss_is_one_forward_and_matches_per_example(tokenizer):
    m = tiny_llama()
    fmt = Formatter(tokenizer)
    examples = task(0, 5)
    loss_fn = FewShotLoss(m, fmt, examples)
    assert len(loss_fn.batches) == 1
    total, count = 0.0, 0
    for ex in examples:
        enc = fmt.encode(ex)
        with torch.no_grad():
            lp = torch.log_softmax(m(input_ids=torch.tensor([enc.input_ids])).logits[0], -1)
        for t, label in enumerate(enc.labels):
            if label != -100:
                total -= float(lp[t - 1, label])
                count += 1
    assert loss_fn() == pytest.approx(total / count, rel=1e-5)


# ---- search ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_library(tmp_path_factory, tokenizer):
    """good: trained to answer "yes"; bad1: trained to answer "no"; bad2: random B (rank 2)."""
    root = tmp_path_factory.mktemp("library")
    m = tiny_llama()
    fmt = Formatter(tokenizer)
    cfg = TrainConfig(steps=15, batch_size=8, lr=2e-2, warmup_steps=1, eval_every=0, save_every=0)
    for name, answer in (("good", 0), ("bad1", 1)):
        set_active_adapters(m, None)
        add_lora(m, LoraConfig(r=4, alpha=8), adapter=name)
        train(m, [fmt.encode(ex) for ex in task(answer, 16)], cfg, root / f"run-{name}", pad_id=1)
        save_adapter(m, root / "lib" / name, LoraConfig(r=4, alpha=8), adapter=name)
    set_active_adapters(m, None)
    add_lora(m, LoraConfig(r=2, alpha=4), adapter="bad2")
    randomize_lora(m, std=0.3, seed=5)  # rewrites every adapter's B, so save bad2 only
    save_adapter(m, root / "lib" / "bad2", LoraConfig(r=2, alpha=4), adapter="bad2")
    return root / "lib"


def test_load_library(trained_library, tmp_path):
    m = tiny_llama()
    ids = torch.arange(12)[None]
    with torch.no_grad():
        base = m(ids).logits
    assert load_library(m, trained_library) == ["bad1", "bad2", "good"]
    with torch.no_grad():  # loaded, not active: the model still computes what it did
        torch.testing.assert_close(m(ids).logits, base)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "not-an-adapter").mkdir()
    with pytest.raises(EfftuneError, match="holds no LoRA modules"):
        load_library(tiny_llama(), tmp_path / "empty")


def test_search_finds_the_good_module(trained_library, tokenizer):
    m = tiny_llama()
    names = load_library(m, trained_library)
    fmt = Formatter(tokenizer)
    hub, res = lorahub(m, fmt, task(0, 5, start=100), names, budget=30, seed=0,
                       eval_examples=task(0, 10, start=200))
    assert res.modules == ["bad1", "bad2", "good"]
    assert res.objective < res.base_objective
    assert np.argmax(np.abs(res.weights)) == res.modules.index("good")
    assert len(res.losses) == 30 and min(res.losses) >= res.objective
    # every proposal and the answer lie in the bounds
    tried = np.array(res.tried)
    assert tried.min() >= -1.5 and tried.max() <= 1.5
    assert all(-1.5 <= w <= 1.5 for w in res.weights)
    # the best composition is left attached and active
    assert all(l.active == ["lorahub"] for _, l in lora_layers(m))
    assert FewShotLoss(m, fmt, task(0, 5, start=100))() == pytest.approx(res.loss, abs=1e-9)
    assert res.accuracy == 1.0


def test_preselection_is_seeded():
    lib = ["m0", "m1", "m2"]
    first = select_modules(lib, max_modules=2, seed=3)
    assert len(first) == 2 and set(first) <= set(lib)
    assert select_modules(lib, max_modules=2, seed=3) == first
    assert {tuple(select_modules(lib, 2, seed=s)) for s in range(20)} != {tuple(first)}  # the seed matters
    assert select_modules(lib, max_modules=5) == lib


def test_search_uses_the_preselection(tokenizer):
    m = mixed_library()
    hub, res = lorahub(m, Formatter(tokenizer), task(0, 5), ["a", "b", "c"], max_modules=2, budget=4, seed=3)
    assert res.modules == select_modules(["a", "b", "c"], 2, seed=3)
    assert len(res.weights) == 2


def test_library_with_a_peft_module_and_peft_reads_the_result(tmp_path, peft):
    from tests.test_io import peft_adapter_with_patterns
    pm = peft_adapter_with_patterns(tmp_path / "lib" / "p", peft)  # ranks 6 and 2, alphas 12 and 3
    with torch.no_grad():
        expected = pm(input_ids=IDS).logits
    ours = mixed_library()
    save_adapter(ours, tmp_path / "lib" / "c", LoraConfig(r=8, alpha=4), adapter="c")
    m = tiny_llama()
    assert load_library(m, tmp_path / "lib") == ["c", "p"]
    hub = LoraHub(m, ["c", "p"])
    hub.set_weights([0.0, 1.0])
    torch.testing.assert_close(logits(m), expected, atol=1e-5, rtol=0)
    hub.set_weights([0.6, -0.8])
    mixed = logits(m)
    hub.save(tmp_path / "hub")
    back = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "hub")).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=IDS).logits, mixed, atol=1e-5, rtol=0)

import copy
import math

import pytest
import torch

from efftune.compose.merge import dare, dare_merge, linear_merge, low_rank, merge_adapters, ties_merge, trim
from efftune.errors import EfftuneError
from efftune.methods.lora.config import LoraConfig
from efftune.methods.lora.layer import lora_layers
from efftune.methods.lora.model import add_lora, export_merged, set_active_adapters
from efftune.methods.lora.peft_format import load_adapter, save_adapter
from tests.conftest import randomize_lora, tiny_llama

IDS = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))


def logits(m):
    with torch.no_grad():
        return m(input_ids=IDS).logits


def two_adapters():
    """"a": r=4 on every linear; "b": r=2 on q/v only (absent elsewhere, so it contributes 0 there)."""
    m = tiny_llama()
    add_lora(m, LoraConfig(r=4, alpha=8), adapter="a")
    add_lora(m, LoraConfig(r=2, alpha=2, target_modules=["q_proj", "v_proj"]), adapter="b")
    randomize_lora(m)
    return m


def new_ranks(m, name="merged"):
    return {layer.adapters[name].r for _, layer in lora_layers(m) if name in layer.adapters}


# ---- pure functions, answers worked out by hand ------------------------------------------------------

D1 = torch.tensor([[3.0, -1.0, 2.0], [0.5, 4.0, -1.5]])
D2 = torch.tensor([[-2.5, 0.2, 1.8], [3.0, -0.5, -1.2]])


def test_linear_merge():
    a, b = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.eye(2)
    assert torch.equal(linear_merge([a, b], [2.0, -1.0]), torch.tensor([[1.0, 4.0], [6.0, 7.0]]))
    assert torch.equal(a, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))  # inputs untouched


def test_trim_keeps_top_half_by_magnitude():
    # |D1| = 3 1 2 / .5 4 1.5: the top 3 are 4, 3, 2
    assert torch.equal(trim(D1, 0.5), torch.tensor([[3.0, 0.0, 2.0], [0.0, 4.0, 0.0]]))
    assert torch.equal(trim(D1, 1.0), D1)


def test_ties_sign_election_and_disjoint_mean():
    # trimmed: T1 = [[3, 0, 2], [0, 4, 0]], T2 = [[-2.5, 0, 1.8], [3, 0, 0]]
    # sum = [[0.5, 0, 3.8], [3, 4, 0]] -> signs + 0 + / + + 0
    # (0,0): only T1's 3 agrees -> 3; (0,2): both agree -> (2 + 1.8) / 2; no votes -> 0
    expected = torch.tensor([[3.0, 0.0, 1.9], [3.0, 4.0, 0.0]])
    torch.testing.assert_close(ties_merge([D1, D2], [1.0, 1.0], density=0.5), expected)
    # weights scale before the election: 2·T2 = [[-5, 0, 3.6], [6, 0, 0]], sum (0,0) = -2 -> -5 wins
    expected = torch.tensor([[-5.0, 0.0, 2.8], [6.0, 4.0, 0.0]])
    torch.testing.assert_close(ties_merge([D1, D2], [1.0, 2.0], density=0.5), expected)
    # one update, nothing trimmed: itself
    torch.testing.assert_close(ties_merge([D1], [1.0], density=1.0), D1)


def test_dare_drops_at_rate_rescales_survivors_and_keeps_the_mean():
    delta = torch.randn(500, 400, generator=torch.Generator().manual_seed(3)) + 1.0
    out = dare(delta, 0.3, torch.Generator().manual_seed(0))
    kept = out != 0
    assert abs((1 - kept.float().mean().item()) - 0.3) < 0.005  # 200k entries: std of the rate ~0.001
    assert torch.equal(out[kept], delta[kept] / 0.7)
    assert abs(out.mean().item() - delta.mean().item()) < 0.02
    again = dare(delta, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # the generator alone decides
    assert not torch.equal(out, dare(delta, 0.3, torch.Generator().manual_seed(1)))


def test_dare_merge_is_dare_then_combine():
    g = torch.Generator().manual_seed(7)
    expected = linear_merge([dare(D1, 0.5, g), dare(D2, 0.5, g)], [1.0, -1.0])
    assert torch.equal(dare_merge([D1, D2], [1.0, -1.0], 0.5, seed=7), expected)
    g = torch.Generator().manual_seed(7)
    expected = ties_merge([dare(D1, 0.5, g), dare(D2, 0.5, g)], [1.0, 1.0], 0.5)
    assert torch.equal(dare_merge([D1, D2], [1.0, 1.0], 0.5, seed=7, combine="ties", density=0.5), expected)


def test_low_rank():
    s2 = math.sqrt(0.5)
    u1, u2 = torch.tensor([s2, s2, 0.0]), torch.tensor([s2, -s2, 0.0])
    v1, v2 = torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0, 0.0])
    m = 3 * torch.outer(u1, v1) + torch.outer(u2, v2)  # rank 2, singular values 3 and 1
    A, B = low_rank(m, 2)
    assert A.shape == (2, 4) and B.shape == (3, 2)
    torch.testing.assert_close(B @ A, m)
    A, B = low_rank(m, 1)
    torch.testing.assert_close(B @ A, 3 * torch.outer(u1, v1))
    # sqrt split: both factors carry sqrt(3)
    torch.testing.assert_close(A.norm(), torch.tensor(math.sqrt(3)))
    torch.testing.assert_close(B.norm(), torch.tensor(math.sqrt(3)))
    A, B = low_rank(m, 5)  # more than min(out, in): zero-padded
    assert A.shape == (5, 4) and B.shape == (3, 5)
    torch.testing.assert_close(B @ A, m)


def test_pure_functions_reject_bad_input():
    with pytest.raises(EfftuneError, match="2 adapters but 1 weights"):
        linear_merge([D1, D2], [1.0])
    with pytest.raises(EfftuneError, match=r"density must be in \(0, 1\], got 0"):
        ties_merge([D1], [1.0], density=0.0)
    with pytest.raises(EfftuneError, match=r"drop must be in \(0, 1\), got 1.5"):
        dare(D1, 1.5, torch.Generator())
    with pytest.raises(EfftuneError, match="update 1 has shape"):
        linear_merge([D1, D1.T], [1.0, 1.0])
    with pytest.raises(EfftuneError, match="combine must be one of"):
        dare_merge([D1], [1.0], 0.5, 0, combine="mean")


# ---- merge_adapters on a model -------------------------------------------------------------------

def test_linear_one_adapter_reproduces_it():
    m = tiny_llama()
    add_lora(m, LoraConfig(r=4, alpha=8), adapter="a")
    randomize_lora(m)
    expected = logits(m)
    cfg = merge_adapters(m, ["a"], [1.0], new_adapter="m")
    assert cfg.r == 4 and cfg.alpha == 4
    for _, layer in lora_layers(m):
        assert layer.active == ["m"] and layer.adapters["m"].scaling == 1.0 and layer.adapters["m"].r == 4
        assert layer.adapters["m"].lora_A.requires_grad and not layer.adapters["a"].lora_A.requires_grad
    torch.testing.assert_close(logits(m), expected, atol=1e-5, rtol=0)


def test_linear_concat_is_exact_sum_of_adapters():
    m = two_adapters()
    set_active_adapters(m, ["a", "b"])
    both = logits(m)
    ref = copy.deepcopy(m)
    merge_adapters(m, ["a", "b"], [1.0, 1.0], r=6)  # 4 + 2: concatenated, no SVD
    assert new_ranks(m) == {6}  # zero-padded where b is absent (k/o/mlp: a's 4 alone)
    torch.testing.assert_close(logits(m), both, atol=1e-5, rtol=0)
    q = m.get_submodule("model.layers.0.self_attn.q_proj").adapters
    assert torch.equal(q["merged"].lora_A[:4], q["a"].lora_A) and torch.equal(q["merged"].lora_A[4:], q["b"].lora_A)
    # weighted: same as scaling each adapter by its weight
    merge_adapters(m, ["a", "b"], [0.5, -2.0], new_adapter="w", r=6)
    for _, layer in lora_layers(ref):
        layer.adapters["a"].scaling *= 0.5
        if "b" in layer.adapters:
            layer.adapters["b"].scaling *= -2.0
    torch.testing.assert_close(logits(m), logits(ref), atol=1e-5, rtol=0)


def test_svd_path_with_enough_rank_is_exact():
    # TIES of one adapter keeping everything is the adapter itself; it goes through low_rank
    m = two_adapters()
    set_active_adapters(m, "a")
    expected = logits(m)
    merge_adapters(m, ["a"], [1.0], method="ties", density=1.0)
    torch.testing.assert_close(logits(m), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_ties_and_dare_give_requested_rank(method):
    m = two_adapters()
    base = logits(tiny_llama())
    merge_adapters(m, ["a", "b"], [0.7, 0.3], method=method, r=3, density=0.4, drop=0.3, seed=1)
    assert new_ranks(m) == {3}
    out = logits(m)
    assert torch.isfinite(out).all() and not torch.allclose(out, base)
    merge_adapters(m, ["a", "b"], [0.7, 0.3], method=method, new_adapter="default_r")
    assert new_ranks(m, "default_r") == {4}  # the largest input rank


def test_dare_merge_is_seeded():
    m1, m2 = two_adapters(), two_adapters()
    for m in (m1, m2):
        merge_adapters(m, ["a", "b"], [1.0, 1.0], method="dare_linear", drop=0.5, seed=5)
    torch.testing.assert_close(logits(m1), logits(m2), atol=0, rtol=0)


def test_merged_adapter_saves_and_loads(tmp_path):
    m = two_adapters()
    cfg = merge_adapters(m, ["a", "b"], [1.0, 0.5], r=6)
    save_adapter(m, tmp_path / "merged", cfg, adapter="merged")
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path / "merged")
    torch.testing.assert_close(logits(fresh), logits(m), atol=1e-5, rtol=0)


def test_merge_adapters_rejects_bad_input():
    m = two_adapters()
    with pytest.raises(EfftuneError, match=r"no adapter named 'c' \(have: a, b\)"):
        merge_adapters(m, ["a", "c"], [1.0, 1.0])
    with pytest.raises(EfftuneError, match="2 adapters but 3 weights"):
        merge_adapters(m, ["a", "b"], [1.0, 1.0, 1.0])
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(EfftuneError, match=rf"density must be in \(0, 1\], got {bad}"):
            merge_adapters(m, ["a", "b"], [1.0, 1.0], method="ties", density=bad)
    for bad in (0.0, 1.0, 2.0):
        with pytest.raises(EfftuneError, match=rf"drop must be in \(0, 1\), got {bad}"):
            merge_adapters(m, ["a", "b"], [1.0, 1.0], method="dare_linear", drop=bad)
    with pytest.raises(EfftuneError, match="weights must be numbers"):
        merge_adapters(m, ["a"], ["heavy"])
    with pytest.raises(EfftuneError, match="method must be one of.*'mean'"):
        merge_adapters(m, ["a"], [1.0], method="mean")
    with pytest.raises(EfftuneError, match="'a' already exists"):
        merge_adapters(m, ["a", "b"], [1.0, 1.0], new_adapter="a")
    assert {n for _, layer in lora_layers(m) for n in layer.adapters} == {"a", "b"}  # nothing attached


# ---- export_merged -----------------------------------------------------------------------------

def test_export_merged_loads_as_plain_transformers_model(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    m = two_adapters()
    set_active_adapters(m, ["a", "b"])
    expected = logits(m)
    out = export_merged(m, tokenizer, tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    torch.testing.assert_close(logits(reloaded), expected, atol=1e-5, rtol=0)
    assert AutoTokenizer.from_pretrained(str(out)).encode("Q: Is") == tokenizer.encode("Q: Is")
    # the caller's model is untouched
    assert len(list(lora_layers(m))) == 14 and not any(layer.merged for _, layer in lora_layers(m))
    torch.testing.assert_close(logits(m), expected, atol=0, rtol=0)
    # exporting again replaces the directory and leaves no temporary behind
    export_merged(m, None, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_export_without_active_adapter_is_refused(tmp_path):
    m = two_adapters()
    set_active_adapters(m, None)
    with pytest.raises(EfftuneError, match="no adapter is active"):
        export_merged(m, None, tmp_path / "x")


def test_merge_notes_say_what_happens_to_differing_adapters():
    from efftune.compose.merge import merge_notes
    m = two_adapters()  # a: r=4 on all 14 linears; b: r=2 on the 4 q/v projections
    notes = merge_notes(m, ["a", "b"], ["dirA", "dirB"])
    assert notes == [
        "merge: the adapters adapt different modules (dirB lacks 10 of 14 (e.g. model.layers.0.mlp.down_proj)); "
        "where one lacks a module its update there counts as zero",
        "merge: input ranks differ (2, 4); the merged adapter has, per module, the largest input rank there "
        "(--rank sets one for all)",
        # on q/v the default rank 4 < 4 + 2: an SVD; --rank 6 would concatenate exactly
        "merge: that rank is below the sum of the input ranks on 4 module(s), so there the merge is the best "
        "low-rank approximation (SVD) of the weighted sum; --rank 6 keeps it exact"]
    assert merge_notes(m, ["a", "b"], ["dirA", "dirB"], r=6) == notes[:1] + [
        "merge: input ranks differ (2, 4); the merged adapter has rank 6"]
    assert merge_notes(m, ["a"]) == []  # one adapter: nothing to say


def test_merge_rank_above_a_layer_is_refused_before_anything_changes():
    m = two_adapters()
    with pytest.raises(EfftuneError, match=r"r=17 is larger than model.layers.0.self_attn.k_proj's smaller side"):
        merge_adapters(m, ["a", "b"], [1.0, 1.0], r=17)
    assert "merged" not in {n for _, layer in lora_layers(m) for n in layer.adapters}

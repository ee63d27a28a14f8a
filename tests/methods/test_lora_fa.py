import pytest
import torch
from torch import nn

from efftune.data import Formatter, MultipleChoice
from efftune.methods.lora.layer import LoraLinear, lora_layers
from efftune.methods.lora.model import add_lora
from efftune.methods.lora.peft_format import save_adapter
from efftune.methods.lora_fa import LoraFAAdapter, LoraFAConfig, add_lora_fa, correction_matrix, load_lora_fa
from efftune.train.loop import TrainConfig, train
from tests.conftest import randomize_lora, tiny_llama


def fa_layer(correction=False, dropout=0.0, dtype=torch.float64):
    torch.manual_seed(0)
    base = nn.Linear(12, 7, bias=False).to(dtype).requires_grad_(False)
    layer = LoraLinear(base)
    a = layer.add_adapter("d", r=3, scaling=0.5, dropout=dropout,
                          adapter_cls=lambda *args, **kw: LoraFAAdapter(*args, correction=correction, **kw))
    nn.init.normal_(a.lora_B)
    return layer, a


def test_gradients_equal_plain_lora_with_frozen_A():
    layer, a = fa_layer()
    ref_layer = LoraLinear(layer.base_layer)
    ref = ref_layer.add_adapter("d", r=3, scaling=0.5)
    with torch.no_grad():
        ref.lora_A.copy_(a.lora_A)
        ref.lora_B.copy_(a.lora_B)
    ref.lora_A.requires_grad_(False)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    dy = torch.randn(2, 5, 7, dtype=torch.float64)
    layer(x).backward(dy)
    ref_layer(x_ref).backward(dy)
    torch.testing.assert_close(layer(x), ref_layer(x_ref))
    torch.testing.assert_close(a.lora_B.grad, ref.lora_B.grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert a.lora_A.grad is None


def test_backward_keeps_r_columns_per_token_not_in():
    layer, a = fa_layer(dropout=0.1, dtype=torch.float32)
    layer.train()
    x = torch.randn(40, 12, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    per_token = [t for t in saved if t.dim() >= 2 and t.shape[0] == 40]
    assert per_token and all(t.shape[-1] == 3 for t in per_token)  # A·x only: (tokens, r)
    assert not any(t.shape == x.shape for t in saved)


def test_dropout_mask_is_regenerated_exactly():
    layer, a = fa_layer(dropout=0.5)
    layer.train()
    x = torch.randn(6, 12, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(6, 7, dtype=torch.float64)
    torch.manual_seed(7)
    layer(x).backward(dy)
    torch.manual_seed(7)
    seed = int(torch.randint(0, 2 ** 62, (1,)).item())
    from efftune.methods.lora_fa import _keep_mask
    keep = _keep_mask(x.shape, 0.5, seed, x.device, x.dtype)
    assert set(keep.unique().tolist()) <= {0.0, 2.0}
    expected_dx = dy @ layer.base_layer.weight + ((dy @ a.lora_B) * 0.5 @ a.lora_A) * keep
    torch.testing.assert_close(x.grad, expected_dx)
    torch.testing.assert_close(a.lora_B.grad, 0.5 * dy.T @ ((x * keep) @ a.lora_A.T))


def test_correction_matches_closed_form_and_least_squares():
    layer, a = fa_layer(correction=True)
    x = torch.randn(9, 12, dtype=torch.float64)
    dy = torch.randn(9, 7, dtype=torch.float64)
    layer(x).backward(dy)
    A, s = a.lora_A.detach(), 0.5
    plain = s * dy.T @ (x @ A.T)
    expected = plain @ torch.linalg.inv(A @ A.T + 1e-8 * torch.eye(3, dtype=torch.float64)) / s ** 2
    torch.testing.assert_close(a.lora_B.grad, expected)
    # the corrected step is the least-squares fit of s·ΔB·A to the full-weight gradient G = dyᵀ x
    G = dy.T @ x
    fit = torch.linalg.lstsq((s * A).T, G.T).solution.T
    torch.testing.assert_close(a.lora_B.grad, fit, atol=1e-6, rtol=1e-6)


def test_correction_is_cached_until_A_changes():
    layer, a = fa_layer(correction=True)
    first = a._correction()
    assert a._correction() is first
    with torch.no_grad():
        a.lora_A.mul_(2)
    second = a._correction()
    assert second is not first
    torch.testing.assert_close(second, correction_matrix(a.lora_A, 0.5, 1e-8))


def test_only_B_trains_and_A_is_bit_identical_after_training(tokenizer, tmp_path):
    m = tiny_llama()
    add_lora_fa(m, LoraFAConfig(r=4))
    A0 = {n: l.adapters["default"].lora_A.clone() for n, l in lora_layers(m)}
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("lora_B") for n in trainable)
    f = Formatter(tokenizer)
    seqs = [f.encode(MultipleChoice(f"Q: Is {w} blue?\nA: ", ("yes", "no"), i % 2))
            for i, w in enumerate(["sky", "grass", "fox", "dog"])]
    res = train(m, seqs, TrainConfig(steps=8, batch_size=4, lr=1e-2, warmup_steps=1), tmp_path, pad_id=1)
    assert res.final_loss < 7
    for n, l in lora_layers(m):
        assert torch.equal(l.adapters["default"].lora_A, A0[n])
        assert l.adapters["default"].lora_B.abs().sum() > 0


def test_saved_as_lora_and_loaded_frozen(tmp_path):
    m = tiny_llama()
    cfg = LoraFAConfig(r=4)
    add_lora_fa(m, cfg)
    randomize_lora(m)
    save_adapter(m, tmp_path / "fa", cfg)
    m2 = tiny_llama()
    loaded = load_lora_fa(m2, tmp_path / "fa")
    assert isinstance(loaded, LoraFAConfig) and loaded.r == 4
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(m2(ids).logits, m(ids).logits, atol=0, rtol=0)
    assert all(isinstance(l.adapters["default"], LoraFAAdapter) and not l.adapters["default"].lora_A.requires_grad
               for _, l in lora_layers(m2))
    peft = pytest.importorskip("peft")
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "fa")).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(ids).logits, m(ids).logits, atol=1e-5, rtol=0)


def test_fa_and_plain_adapters_mix(tmp_path):
    m = tiny_llama()
    add_lora(m, adapter="plain")
    add_lora_fa(m, LoraFAConfig(r=2), adapter="fa")
    kinds = {type(a).__name__ for _, l in lora_layers(m) for a in l.adapters.values()}
    assert kinds == {"LoraAdapter", "LoraFAAdapter"}

"""FP8 frozen base (efftune.train.fp8): the matmul's math, what it saves, the swap and its undo."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from efftune.errors import ConfigError
from efftune.methods.lora.config import LoraConfig
from efftune.methods.lora.model import add_lora
from efftune.train.fp8 import FP8, Fp8Base, Fp8Linear, cpu_rowwise_fp8_error, quantize_rows
from efftune.train.loop import TrainConfig, train
from tests.conftest import randomize_lora, tiny_llama
from tests.train.test_loop import data

REL = 0.08  # one matmul: e4m3 keeps 3 mantissa bits, per-element relative error <= 1/16
REL_MODEL = 0.25  # logits of the tiny random model: the rounding of 14 FP8 linears compounds


# these run FP8 matmuls on CPU tensors: torch 2.13's CPU _scaled_mm takes row-wise scales, 2.11's does not
cpu_fp8 = pytest.mark.skipif(cpu_rowwise_fp8_error() is not None,
                             reason=f"this torch's CPU FP8 matmul: {cpu_rowwise_fp8_error()}")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def test_quantize_rows_scales_each_row_to_the_fp8_range():
    x = torch.randn(6, 64) * torch.logspace(-3, 3, 6).unsqueeze(1)  # rows of very different size
    q, s = quantize_rows(x)
    assert q.dtype == FP8 and s.shape == (6, 1)
    assert torch.allclose(q.float().abs().amax(1), torch.full((6,), 448.0))  # each row uses the whole range
    assert rel_err(q.float() * s, x) < 1 / 16
    q0, _ = quantize_rows(torch.zeros(2, 16))  # an all-zero row: no division by zero
    assert torch.equal(q0.float(), torch.zeros(2, 16))


@cpu_fp8
def test_fp8_linear_matches_the_linear_and_saves_no_activation():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=True).requires_grad_(False)
    fp8 = Fp8Linear(lin)
    x = torch.randn(3, 5, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fp8(x)
    assert y.shape == (3, 5, 48) and rel_err(y, F.linear(x, lin.weight, lin.bias)) < REL
    # exactly the quantised product: (s_x · xq)(s_w · wq)ᵀ, accumulated in fp32
    xq, xs = quantize_rows(x.detach().reshape(-1, 64))
    wq, ws = quantize_rows(lin.weight)
    emulated = (xq.double() * xs.double()) @ (wq.double() * ws.double()).T + lin.bias.double()
    torch.testing.assert_close(y.detach().reshape(-1, 48).double(), emulated, rtol=1e-5, atol=1e-5)
    # backward needs the weight only: nothing of the input's size is kept for it
    assert saved and sum(t.numel() for t in saved) == lin.weight.numel() + 48  # fp8 weight + its scales
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, g)
    assert rel_err(dx, g @ lin.weight) < REL
    gq, gs = quantize_rows(g.reshape(-1, 48) * ws.view(1, -1))  # weight scales folded into the gradient
    torch.testing.assert_close(dx.reshape(-1, 64).double(), (gq.double() * gs.double()) @ wq.double(),
                               rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in fp8.parameters())


def lora_model():
    m = tiny_llama()
    add_lora(m, LoraConfig(r=4, alpha=8))
    randomize_lora(m)
    return m


def fused_mlps(model):
    from efftune.methods.lora.swiglu import FusedSwiGLU
    mlps = [mod for mod in model.modules() if isinstance(mod, FusedSwiGLU)]
    assert mlps
    return mlps


@cpu_fp8
def test_fp8_base_swaps_the_frozen_linears_and_restores_them_exactly():
    m = lora_model()
    ids = torch.randint(0, 300, (2, 12))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ref = m(ids).logits
    with Fp8Base(m) as swap:
        fp8s = [mod for mod in m.modules() if isinstance(mod, Fp8Linear)]
        assert len(fp8s) == 2 * 7 == len(swap.swapped)  # q k v o gate up down in both blocks; not lm_head
        assert isinstance(m.lm_head, nn.Linear)
        assert all(lin.weight.device.type == "cpu" for _, _, lin, _ in swap.swapped)
        assert all(mlp.gate_up_spare is None for mlp in fused_mlps(m))  # the packed matrix is let go
        out = m(ids).logits
        assert rel_err(out, ref) < REL_MODEL
        out.sum().backward()  # gradients reach the LoRA factors through the FP8 base
        grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert not any(isinstance(mod, Fp8Linear) for mod in m.modules())
    assert all(mlp.gate_up_spare is not None for mlp in fused_mlps(m))  # packed again on the way back
    after = m.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    torch.testing.assert_close(m(ids).logits, ref, rtol=0, atol=0)


@cpu_fp8
def test_training_with_fp8_base_learns_and_leaves_the_base_untouched(tokenizer, tmp_path):
    m = lora_model()
    base = {k: v.clone() for k, v in m.state_dict().items() if "lora_" not in k}
    result = train(m, data(tokenizer), TrainConfig(steps=4, batch_size=6, lr=1e-2, warmup_steps=1, fp8_base=True),
                   tmp_path / "run", pad_id=1)
    assert result.final_loss == result.final_loss  # finite
    now = m.state_dict()
    assert all(torch.equal(base[k], now[k]) for k in base)  # the exact weights are back
    assert not any(isinstance(mod, Fp8Linear) for mod in m.modules())
    ref = lora_model()
    moved = [k for k, v in now.items() if "lora_" in k and not torch.equal(v, ref.state_dict()[k])]
    assert moved  # the adapters trained


def test_fp8_base_refuses_relora_and_models_without_eligible_linears(tokenizer, tmp_path):
    from efftune.methods.relora import ReLoraConfig, ReLoraHooks
    m = lora_model()
    with pytest.raises(ConfigError, match="fp8_base cannot run with ReLoraHooks"):
        train(m, data(tokenizer), TrainConfig(steps=1, batch_size=2, fp8_base=True), tmp_path / "r", pad_id=1,
              hooks=ReLoraHooks(m, ReLoraConfig(restart_every=2)))
    assert not any(isinstance(mod, Fp8Linear) for mod in m.modules())
    trainable = tiny_llama().requires_grad_(True)  # full fine-tuning: no frozen linear to convert
    with pytest.raises(ConfigError, match="no frozen linear"):
        Fp8Base(trainable)


def test_a_cpu_torch_without_row_wise_fp8_is_refused_up_front(monkeypatch):
    import efftune.train.fp8 as fp8
    monkeypatch.setattr(fp8, "cpu_rowwise_fp8_error", lambda: "Only per-tensor scaling is supported")
    m = lora_model()
    with pytest.raises(ConfigError, match="train.fp8_base on CPU needs row-wise scaled FP8 matmuls.*per-tensor"):
        Fp8Base(m)
    assert not any(isinstance(mod, Fp8Linear) for mod in m.modules())


@cpu_fp8
def test_k_adapters_at_once_train_on_the_fp8_base_as_each_alone(tokenizer, tmp_path):
    """train()'s k-adapter mode (the module library's --together) runs on the FP8 base too: the
    frozen linears are FP8 during the run (row-wise scales: a row's rounding is its own, whatever
    rows share the batch) and each adapter ends as it does trained alone on the FP8 base."""
    from efftune.methods.lora.model import set_active_adapters, set_trainable_adapters
    from tests.train.test_loop import other_data

    def two():
        m = tiny_llama()
        for n in ("a", "b"):
            add_lora(m, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]), adapter=n)
        return m
    seqs = {"a": data(tokenizer), "b": other_data(tokenizer)}
    cfg = TrainConfig(steps=3, batch_size=4, lr=1e-2, warmup_steps=1, fp8_base=True)
    fp8_seen = []

    def evaluate(m, names, step):
        fp8_seen.append(any(isinstance(mod, Fp8Linear) for mod in m.modules()))
        return {}
    k = two()
    base = {n: v.clone() for n, v in k.state_dict().items() if "lora_" not in n}
    set_trainable_adapters(k, ["a", "b"])
    train(k, seqs, cfg, tmp_path / "k", pad_id=1, evaluate=evaluate)
    assert fp8_seen == [True, True]  # before and after training, inside the run
    assert not any(isinstance(mod, Fp8Linear) for mod in k.modules())
    assert all(torch.equal(v, k.state_dict()[n]) for n, v in base.items())  # the exact base is back
    for n in ("a", "b"):
        solo = two()
        set_trainable_adapters(solo, [n])
        set_active_adapters(solo, n)
        train(solo, seqs[n], cfg, tmp_path / n, pad_id=1)
        mine = {key: v for key, v in solo.state_dict().items() if f".adapters.{n}." in key}
        assert mine and any(not torch.equal(v, two().state_dict()[key]) for key, v in mine.items())  # trained
        for key, v in mine.items():
            torch.testing.assert_close(k.state_dict()[key], v, atol=1e-5, rtol=1e-4, msg=key)

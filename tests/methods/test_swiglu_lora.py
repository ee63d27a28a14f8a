import pytest
import torch
from torch import nn

from efftune.methods.lora.config import LoraConfig
from efftune.methods.lora.model import add_lora, set_active_adapters, unload_lora
from efftune.methods.lora.swiglu import (FusedSwiGLU, is_swiglu_mlp, swiglu_backward_reference,
                                         swiglu_forward_reference, triton_available, unwrap_swiglu_mlps)
from tests.conftest import randomize_lora, tiny_llama

IDS = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))


def lora_llama(dtype=torch.float64, **config) -> nn.Module:
    m = tiny_llama(dtype=dtype)
    add_lora(m, LoraConfig(r=4, **config))
    randomize_lora(m)
    return m


def loss_and_grads(model, ids=IDS):
    loss = model(input_ids=ids.to(model.device)).logits.square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_fused_mlp_computes_what_the_per_layer_ops_compute():
    fused, apart = lora_llama(), lora_llama()
    unwrap_swiglu_mlps(apart)
    mlp = fused.model.layers[0].mlp
    assert isinstance(mlp, FusedSwiGLU) and type(apart.model.layers[0].mlp).__name__ == "LlamaMLP"
    assert mlp._fused(torch.randn(3, 32, dtype=torch.float64)) is not None  # the fused path applies
    loss_f, grads_f = loss_and_grads(fused)
    loss_a, grads_a = loss_and_grads(apart)
    torch.testing.assert_close(loss_f, loss_a, atol=1e-12, rtol=1e-12)
    assert grads_f.keys() == grads_a.keys() and any("down_proj" in n for n in grads_f)
    for name, g in grads_f.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(g, grads_a[name], atol=1e-12, rtol=1e-10)
    assert all(p.grad is None for p in fused.parameters() if not p.requires_grad)  # frozen stays gradient-free


def test_wrapping_keeps_every_name_and_unloading_gives_the_mlp_back():
    plain = tiny_llama()
    names = list(plain.state_dict())
    m = lora_llama(dtype=torch.float32)
    assert sum(isinstance(x, FusedSwiGLU) for x in m.modules()) == 2
    other = lora_llama(dtype=torch.float32)
    unwrap_swiglu_mlps(other)
    assert list(m.state_dict()) == list(other.state_dict())  # peft files and checkpoints see no difference
    with torch.no_grad():
        before = m(input_ids=IDS).logits
    unload_lora(m)  # merges
    assert [type(layer.mlp).__name__ for layer in m.model.layers] == ["LlamaMLP"] * 2
    assert list(m.state_dict()) == names
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=IDS).logits, before, atol=1e-5, rtol=1e-4)


def test_only_standard_silu_mlps_are_recognised():
    m = tiny_llama()
    mlp = m.model.layers[0].mlp
    assert is_swiglu_mlp(mlp)
    mlp.act_fn = nn.GELU()
    assert not is_swiglu_mlp(mlp)

    class Scaled(nn.Module):  # same children, another formula
        def __init__(self, inner):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj, self.act_fn = (
                inner.gate_proj, inner.up_proj, inner.down_proj, nn.SiLU())

        def forward(self, x):
            return 2 * self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    assert not is_swiglu_mlp(Scaled(mlp))


def test_fused_mlp_steps_aside_where_it_cannot_fuse():
    m = lora_llama()
    add_lora(m, LoraConfig(r=2), adapter="b")
    randomize_lora(m)
    mlp = m.model.layers[0].mlp
    x = torch.randn(3, 32, dtype=torch.float64)
    formula = lambda: mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))  # noqa: E731
    assert mlp._fused(x) is None  # two adapters active
    set_active_adapters(m, "b")
    torch.testing.assert_close(mlp._fused(x), formula(), atol=1e-12, rtol=1e-12)
    handle = mlp.down_proj.register_forward_hook(lambda *a: None)
    assert mlp._fused(x) is None  # a hook on a member would not run
    handle.remove()
    mlp.up_proj.merge()
    assert mlp._fused(x) is None
    torch.testing.assert_close(mlp(x), formula(), atol=1e-12, rtol=1e-12)
    mlp.up_proj.unmerge()
    dropped = lora_llama(dropout=0.1)
    assert dropped.model.layers[0].mlp._fused(x) is None


def random_swiglu_inputs(n, f, rg, ru, rd, dtype, device, seed=0, pad=0):
    """The kernels' inputs; gu = [g0 | u0 | z] with `pad` columns after it (a packed row stride)."""
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    gu = make(n, 2 * f + rg + ru + pad)[:, :2 * f + rg + ru]
    return dict(dh=make(n, f), gu=gu, bg=make(f, rg) * 0.3, bu=make(f, ru) * 0.3, ad=make(rd, f) * 0.1,
                dzd=make(n, rd))


def kernel_devices():
    if torch.cuda.is_available() and triton_available():
        return ["cuda"]
    return []


@pytest.mark.gpu
@pytest.mark.skipif(not kernel_devices(), reason="needs CUDA and Triton (the kernels themselves)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(100, 200, 4, 4, 8, 0), (300, 520, 16, 16, 16, 24), (4096, 1536, 16, 8, 32, 8)])
def test_triton_kernels_match_the_reference(dtype, shape):
    from efftune.methods.lora import swiglu_triton
    t = random_swiglu_inputs(*shape[:5], dtype=dtype, device="cuda", pad=shape[5])
    fp64 = {k: v.double() for k, v in t.items()}
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    args = ("gu", "bg", "bu")
    back = ("dh", "dzd", "ad") + args
    outs = swiglu_triton.forward(*(t[k] for k in args), t["ad"]) + swiglu_triton.backward(*(t[k] for k in back))
    refs = swiglu_forward_reference(*(fp64[k] for k in args), fp64["ad"]) + swiglu_backward_reference(
        *(fp64[k] for k in back))
    for name, out, r in zip(("h", "z_d", "[dg | du | dz]", "h again"), outs, refs):
        assert out.dtype == dtype, name
        assert out.shape == r.shape, name
        torch.testing.assert_close(out.double(), r, atol=tol * r.abs().max().item(), rtol=0, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not kernel_devices(), reason="needs CUDA and Triton (the kernels themselves)")
@pytest.mark.parametrize("dtype,r", [(torch.float32, 192), (torch.float32, 128), (torch.bfloat16, 256)])
def test_large_ranks_run_on_tiles_that_fit_the_gpu(dtype, r):
    """fp32 at r=192 (padded to 256) once needed 360 KiB of shared memory at the shipped tiles, past an
    H100's 227 KiB, and the op failed; now a smaller config (or the PyTorch version) runs, with the same
    results as the float64 reference, and the choice is remembered."""
    from efftune.methods.lora import swiglu_triton
    from efftune.methods.lora.swiglu import _cuda_backward, _cuda_forward
    t = random_swiglu_inputs(300, 1536, r, r, r, dtype=dtype, device="cuda")
    fp64 = {k: v.double() for k, v in t.items()}
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    outs = _cuda_forward(t["gu"], t["bg"], t["bu"], t["ad"]) + _cuda_backward(
        *(t[k] for k in ("dh", "dzd", "ad", "gu", "bg", "bu")))
    refs = swiglu_forward_reference(fp64["gu"], fp64["bg"], fp64["bu"], fp64["ad"]) + swiglu_backward_reference(
        *(fp64[k] for k in ("dh", "dzd", "ad", "gu", "bg", "bu")))
    for name, out, ref in zip(("h", "z_d", "[dg | du | dz]", "h again"), outs, refs):
        assert out.shape == ref.shape, name
        torch.testing.assert_close(out.double(), ref, atol=tol * ref.abs().max().item(), rtol=0, msg=name)
    pad = swiglu_triton._pad(r)
    for kernel in ("swiglu forward", "swiglu backward"):
        assert (kernel, t["gu"].device, dtype, pad, pad) in swiglu_triton._FITTING
    print({k[0] + f" {k[2]} r{k[3]}": v for k, v in swiglu_triton._FITTING.items()})


@pytest.mark.gpu
@pytest.mark.skipif(not kernel_devices(), reason="needs CUDA and Triton")
def test_fused_mlp_on_gpu_trains_like_the_per_layer_path():
    fused, apart = lora_llama(dtype=torch.float32).cuda(), lora_llama(dtype=torch.float32).cuda()
    unwrap_swiglu_mlps(apart)
    (loss_f, grads_f), (loss_a, grads_a) = loss_and_grads(fused), loss_and_grads(apart)
    torch.testing.assert_close(loss_f, loss_a, atol=1e-5, rtol=1e-5)
    for name, g in grads_f.items():
        torch.testing.assert_close(g, grads_a[name], atol=1e-4 * grads_a[name].abs().max().item(), rtol=1e-3)

"""Long inputs on the Triton kernels (issue 21, 1b): tensors past 2^31 elements.

On the CPU: which path each op takes for a shape (`kernel_limits`), decided from shapes alone, on
meta tensors of the 131,072-token Llama-3-8B MLP that once crashed the SwiGLU kernel. On a CUDA GPU:
each kernel at a shape past 2^31 (and past 2^32) elements, against the PyTorch version on slices of
rows at the start, around the 2^31-element boundary and at the end."""
import pytest
import torch

from efftune.forward import logprobs
from efftune.kernel_limits import INT32_LIMIT, NoFittingConfig, first_fitting, head_fits, swiglu_fits
from efftune.methods.lora.packing import aligned_rows, aligned_stride
from efftune.methods.lora.swiglu import (_cuda_backward, _cuda_forward, swiglu_backward_reference,
                                         swiglu_forward_reference, takes_kernel, triton_available)

LLAMA3_8B_MLP = dict(tokens=131072, f=14336, r=16)


def meta_swiglu(tokens, f, r, dtype=torch.bfloat16):
    """The op's operands as meta tensors (no memory): gu = [g0 | u0 | z] on aligned rows, as rows_mm makes it."""
    meta = torch.empty(0, device="meta", dtype=dtype)
    gu = aligned_rows(tokens, 2 * f + 2 * r, meta)
    make = lambda *s: torch.empty(*s, device="meta", dtype=dtype)  # noqa: E731
    return dict(gu=gu, bg=make(f, r), bu=make(f, r), ad=make(r, f), dh=make(tokens, f), dzd=make(tokens, r))


def test_long_inputs_take_the_swiglu_kernel():
    t = meta_swiglu(**LLAMA3_8B_MLP)
    gu = t["gu"]
    assert gu.shape[0] * gu.stride(0) > INT32_LIMIT  # 3.8e9 elements: 32-bit offsets wrap
    assert takes_kernel(gu, t["bg"])  # 64-bit row offsets: no length is too long
    assert swiglu_fits(10 ** 9, 14336, aligned_stride(2 * 14336 + 32))
    assert not takes_kernel(gu.to(torch.float64), t["bg"].to(torch.float64))  # no float64 kernel


def test_widths_whose_tiles_pass_2_31_take_the_pytorch_version():
    # a 9M-wide MLP: 127 rows of a tile × its row stride pass 2^31 (the kernel would wrap inside one tile)
    t = meta_swiglu(tokens=3, f=9_000_000, r=4)
    assert not takes_kernel(t["gu"], t["bg"])
    narrower = meta_swiglu(tokens=3, f=8_000_000, r=4)
    assert takes_kernel(narrower["gu"], narrower["bg"])  # 127 × 16,000,064 + 16e6 < 2^31
    # the CUDA entry points route it to the PyTorch version: same shapes as the reference, no kernel launched
    h, zd = _cuda_forward(t["gu"], t["bg"], t["bu"], t["ad"])
    ref = swiglu_forward_reference(t["gu"], t["bg"], t["bu"], t["ad"])
    assert h.shape == ref[0].shape == (3, 9_000_000) and zd.shape == ref[1].shape == (3, 4)
    dgu, h2 = _cuda_backward(t["dh"], t["dzd"], t["ad"], t["gu"], t["bg"], t["bu"])
    ref = swiglu_backward_reference(t["dh"], t["dzd"], t["ad"], t["gu"], t["bg"], t["bu"])
    assert dgu.shape == ref[0].shape == t["gu"].shape and dgu.stride() == ref[0].stride() and h2.shape == (3, 9_000_000)


def test_swiglu_limit_is_the_in_tile_offset():
    # row stride s: 127 rows × s + 2 f must stay under 2^31, whatever the token count
    s = (INT32_LIMIT - 1) // 128 // 64 * 64  # an aligned stride just inside (127 s + 2 f < 128 s)
    f = s // 2 - 64
    assert swiglu_fits(1, f, s) and swiglu_fits(2 ** 31 - 1, f, s)
    assert not swiglu_fits(1, f, s + 2 * 64 * 64)
    assert not swiglu_fits(2 ** 31, 128, 256)  # row indices are 32-bit themselves


class TooBig(Exception):
    """Stands in for Triton's OutOfResources."""


def test_first_fitting_config_is_kept_for_its_key():
    tried = []

    def launch(config):  # a GPU whose shared memory takes tiles of at most 32 rows
        tried.append(config["bt"])
        if config["bt"] > 32:
            raise TooBig
        return config["bt"] * 10

    chosen = {}
    configs = [dict(bt=64), dict(bt=32), dict(bt=16)]
    assert first_fitting(launch, configs, ("k", 256), chosen, TooBig) == 320
    assert tried == [64, 32] and chosen == {("k", 256): dict(bt=32)}
    assert first_fitting(launch, configs, ("k", 256), chosen, TooBig) == 320
    assert tried == [64, 32, 32]  # straight to the config that fitted: the same tiles every step
    assert first_fitting(launch, configs[2:], ("k", 16), chosen, TooBig) == 160  # another key tries its own


def test_no_fitting_config_says_so_every_time_and_other_errors_pass_through():
    calls = []

    def launch(config):
        calls.append(config)
        raise TooBig

    chosen = {}
    for _ in range(2):
        with pytest.raises(NoFittingConfig, match="swiglu forward"):
            first_fitting(launch, [dict(bt=64), dict(bt=16)], ("swiglu forward", 256), chosen, TooBig)
    assert len(calls) == 2  # the second call knew none fits and launched nothing

    def broken(config):
        raise ValueError("offsets pass 2^31")

    with pytest.raises(ValueError, match="2\\^31"):
        first_fitting(broken, [dict(bt=64)], ("k", 1), {}, TooBig)


def test_head_kernel_limits():
    assert head_fits(logprobs.CHUNK, 128256)
    assert 17000 * 128256 > INT32_LIMIT and head_fits(17000, 128256)  # rows past 2^31 elements: 64-bit
    assert not head_fits(1, INT32_LIMIT - 1000)  # a column index inside a row would wrap
    assert not head_fits(INT32_LIMIT, 10)  # more rows than the grid's first axis


def _cuda_triton() -> bool:
    return torch.cuda.is_available() and triton_available()


def _row_slices(n: int, row_elements: int, k: int = 384) -> torch.Tensor:
    """Row indices to check: the first k, k around the row where offsets pass 2^31, the last k."""
    boundary = INT32_LIMIT // row_elements
    return torch.cat([torch.arange(k), torch.arange(boundary - k // 2, boundary + k // 2), torch.arange(n - k, n)])


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_triton(), reason="needs CUDA and Triton (the SwiGLU kernels)")
def test_swiglu_kernels_past_2_31_elements():
    from efftune.methods.lora import swiglu_triton
    n, f, r = 1_100_000, 2048, 16  # gu: 4.6e9 elements (past 2^32), dh and h: 2.25e9 (past 2^31)
    g = torch.Generator(device="cuda").manual_seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16, generator=g)
    gu = aligned_rows(n, 2 * f + 2 * r, torch.empty(0, device="cuda", dtype=torch.bfloat16))
    gu.normal_(generator=g)
    dh, dzd = torch.randn(n, f, **bf), torch.randn(n, r, **bf)
    bg, bu, ad = torch.randn(f, r, **bf) * 0.3, torch.randn(f, r, **bf) * 0.3, torch.randn(r, f, **bf) * 0.1
    assert n * gu.stride(0) > 2 * INT32_LIMIT and n * f > INT32_LIMIT
    h, zd = swiglu_triton.forward(gu, bg, bu, ad)
    dgu, h2 = swiglu_triton.backward(dh, dzd, ad, gu, bg, bu)
    torch.cuda.synchronize()
    # rows where gu's offsets pass 2^31, and where dh's and h's do
    rows_f = torch.unique(torch.cat([_row_slices(n, gu.stride(0)), _row_slices(n, f)])).cuda()
    d = lambda x: x.double()  # noqa: E731
    sub = gu[rows_f]
    ref_h, ref_zd = swiglu_forward_reference(d(sub), d(bg), d(bu), d(ad))
    ref_dgu, ref_h2 = swiglu_backward_reference(d(dh[rows_f]), d(dzd[rows_f]), d(ad), d(sub), d(bg), d(bu))
    for name, out, ref in (("h", h, ref_h), ("z_d", zd, ref_zd), ("[dg | du | dz]", dgu, ref_dgu),
                           ("h again", h2, ref_h2)):
        got = out[rows_f].double()
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, ref, atol=2e-2 * ref.abs().max().item(), rtol=0, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_triton(), reason="needs CUDA and Triton (the LM-head kernels)")
def test_head_kernels_past_2_31_elements():
    from efftune.forward import head_triton
    n, v = 17000, 128256  # 2.18e9 logits
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(n, v, device="cuda", generator=g).mul_(4).to(torch.bfloat16)  # fp32 temp: 8.7 GB
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    targets[-1] = v - 1  # the very last element
    assert n * v > INT32_LIMIT
    rows = _row_slices(n, v, k=256).cuda()
    ref_lp, ref_grad = logprobs._chunk_logprob_and_grad(logits[rows], targets[rows], torch.bfloat16)
    lp, grad = head_triton.logprob_and_grad(logits, targets, torch.bfloat16)  # in place
    torch.testing.assert_close(lp[rows], ref_lp, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(grad[rows].float(), ref_grad.float(), atol=2 ** -8, rtol=2 ** -7)

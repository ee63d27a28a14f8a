"""NF4 and int8 weight formats against independent float64 references."""
from __future__ import annotations

import pytest
import torch

from efftune.quantize import int8, nf4

# QLoRA, Appendix E: the NF4 data type's 16 values, as printed in the paper.
PAPER_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236206, 1.0]


def test_the_code_is_the_papers_and_its_normal_quantiles():
    assert list(nf4.CODE) == PAPER_NF4
    # rebuilt from its definition in float64: equal to the fp32 table's rounding
    torch.testing.assert_close(nf4.normal_float_code(), torch.tensor(PAPER_NF4, dtype=torch.float64),
                               rtol=0, atol=2e-7)


def reference_dequantize(q: nf4.Nf4Weight, shape: tuple[int, int]) -> torch.Tensor:
    """float64, written out element by element in index form: byte j of row r holds columns 2j
    (high nibble) and 2j + 1 (low); block b = (r · in + c) // 64 has scale mean + q_b · step_{b // 256}."""
    out_f, in_f = shape
    code = torch.tensor(PAPER_NF4, dtype=torch.float64)
    codes = q.codes.long()
    idx = torch.empty(out_f, in_f, dtype=torch.long)
    idx[:, 0::2], idx[:, 1::2] = codes // 16, codes % 16
    flat = torch.arange(out_f * in_f).view(out_f, in_f)
    block = flat // 64
    scale = q.scale_mean.double() + q.scale_q.double()[block] * q.scale_scale.double()[block // 256]
    return code[idx] * scale


@pytest.mark.parametrize("shape", [(96, 576), (192, 64), (3, 128)])  # 576 wide: blocks of 256 scales don't divide
def test_nf4_round_trip_is_nearest_code_within_the_bound(shape):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g, dtype=torch.float64) * 0.02
    q = nf4.quantize(w.float())
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (shape[0], shape[1] // 2)
    ref = reference_dequantize(q, shape)
    torch.testing.assert_close(nf4.dequantize(*q.tensors(), torch.float64), ref, rtol=1e-6, atol=1e-12)
    # each weight took a nearest code of its block's dequantised scale (up to fp32 rounding)
    blocks = w.view(-1, 64)
    scale = ref.view(-1, 64).abs().amax(1, keepdim=True)  # the block's largest |code · scale| = |scale|
    code = torch.tensor(PAPER_NF4, dtype=torch.float64)
    nearest = (blocks.unsqueeze(-1) - code * scale.unsqueeze(-1)).abs().amin(-1)
    assert ((blocks - ref.view(-1, 64)).abs() <= nearest + 1e-7 * scale).all()
    # the bound: half the widest gap between codes (0.7230 .. 1) times the scale, plus how far
    # double quantisation moved the scale below the block's absolute maximum
    absmax = blocks.abs().amax(1, keepdim=True)
    half_gap = ((code[1:] - code[:-1]).max() / 2).item()
    assert ((blocks - ref.view(-1, 64)).abs() <= half_gap * scale + (absmax - scale).clamp_min(0) + 1e-9).all()


def test_nf4_error_on_gaussian_weights():
    """Blocks of 64 from N(0, σ²): the RMS error is about 9% of σ (fp32 math), and NF4 beats a
    uniform 4-bit absmax code (levels k/7; 0.108) by over 10% on such weights: the point of a normal code."""
    w = torch.randn(512, 1024, generator=torch.Generator().manual_seed(1))
    q = nf4.dequantize(*nf4.quantize(w).tensors(), torch.float32)
    rms = (q - w).pow(2).mean().sqrt().item()
    assert 0.08 < rms < 0.10
    blocks = w.view(-1, 64)
    s = blocks.abs().amax(1, keepdim=True)
    uniform = (blocks / s * 7).round() / 7 * s
    assert rms < 0.9 * (uniform - blocks).pow(2).mean().sqrt().item()


def test_double_quantisation_bounds_the_scale_error():
    g = torch.Generator().manual_seed(2)
    scales = torch.rand(1000, generator=g) * 0.1 + 0.01  # 1000: the last block of 256 is padded
    q, step, mean = nf4.quantize_scales(scales)
    assert q.dtype == torch.int8 and q.shape == (1024,) and step.shape == (4,)
    back = nf4.dequantize_scales(q, step, mean, 1000).double()
    centred = (scales.double() - scales.double().mean())
    half_step = torch.cat([centred, centred.new_zeros(24)]).view(4, 256).abs().amax(1) / 254
    assert ((back - scales.double()).abs() <= half_step.repeat_interleave(256)[:1000] * 1.0001 + 1e-8).all()
    # 8 bits per 64 weights and 32 per 64 · 256: ~0.127 bits a weight for the scales (vs 0.5 in fp32),
    # counted over whole blocks of 256 scales (the padding costs only in a layer's last block)
    bits = (q.numel() * 8 + step.numel() * 32 + 32) / (q.numel() * 64)
    assert bits < 0.128


def test_nf4_zero_blocks_and_refused_shapes():
    w = torch.zeros(4, 128)
    w[0, :64] = torch.linspace(-1, 1, 64)
    back = nf4.dequantize(*nf4.quantize(w).tensors(), torch.float32)
    assert (back[1:] == 0).all() and (back[0, 64:] == 0).all()
    with pytest.raises(ValueError, match="multiple of 64"):
        nf4.quantize(torch.zeros(8, 96))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_int8_round_trip_within_half_a_step(dtype):
    w = torch.randn(64, 100, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    w[5] = 0  # an all-zero row
    q = int8.quantize(w)
    assert q.q.dtype == torch.int8 and q.scale.dtype == torch.float32
    ref_scale = w.double().abs().amax(1) / 127
    torch.testing.assert_close(q.scale.double(), ref_scale, rtol=1e-6, atol=0)
    back = int8.dequantize(q.q, q.scale, torch.float64)
    assert ((back - w.double()).abs() <= ref_scale[:, None] / 2 * (1 + 1e-5)).all()  # (fp32 division)
    assert (back[5] == 0).all()
    assert int8.dequantize(q.q, q.scale, dtype).dtype == dtype


def test_agrees_with_torchao_nf4():
    """torchao's NF4Tensor (blocks of 64, double-quantised scales) on a shape it takes: the same
    error to within a few percent (it rounds the code to 4 decimals and picks codes against the
    exact scales)."""
    to_nf4 = pytest.importorskip("torchao.quantization.quantize_.workflows.nf4.nf4_tensor").to_nf4
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(4))
    ours = (nf4.dequantize(*nf4.quantize(w).tensors(), torch.float32) - w).pow(2).mean().sqrt()
    theirs = (to_nf4(w).get_original_weight() - w).pow(2).mean().sqrt()
    assert abs(ours / theirs - 1) < 0.03



def _everywhere(monkeypatch):
    """Make `compiled_on_gpu` compile on the CPU too (the compiled form is device-agnostic)."""
    from efftune.quantize import linear
    real = linear.compiled_on_gpu
    monkeypatch.setattr(linear, "compiled_on_gpu", lambda fn, device: real(fn, torch.device("cuda")))


def test_the_gpu_dequantisation_is_compiled_and_gives_the_eager_bits(monkeypatch):
    """On a CUDA GPU every dequantisation (a layer's, all experts' of a layer) runs its elementwise work
    compiled (`linear.compiled_on_gpu`); elsewhere eager. Checked here on the CPU, bit for bit, through
    the same functions the ops call."""
    from efftune.quantize import linear
    from efftune.quantize.experts import dense_experts, quantize_stacked
    assert linear.compiled_on_gpu(nf4.decode_scaled, torch.device("cpu")) is nf4.decode_scaled
    on_gpu = linear.compiled_on_gpu(nf4.decode_scaled, torch.device("cuda"))
    assert on_gpu is not nf4.decode_scaled and linear.compiled_on_gpu(nf4.decode_scaled, torch.device("cuda")) is on_gpu
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 96, 128, generator=g)
    tensors = {"nf4": nf4.quantize(w[0]).tensors() + (nf4.code_table(),), "int8": int8.quantize(w[0]).tensors()}
    stacked = {kind: quantize_stacked(kind, w) + ([nf4.code_table()] if kind == "nf4" else []) for kind in tensors}
    eager = {(kind, dtype): (linear.DENSE[kind](tensors[kind], dtype), dense_experts(kind, stacked[kind], dtype))
             for kind in tensors for dtype in (torch.bfloat16, torch.float32)}
    _everywhere(monkeypatch)
    for (kind, dtype), (layer, experts) in eager.items():
        assert torch.equal(linear.DENSE[kind](tensors[kind], dtype), layer), (kind, dtype)
        assert torch.equal(dense_experts(kind, stacked[kind], dtype), experts), (kind, dtype)


def test_the_compiled_dequantisation_has_one_graph_per_dtype_for_every_layer(monkeypatch):
    """torch._dynamo stops compiling a function past 8 graphs (with a hard failure where it may not
    fall back): a first version, run on an H100, made a graph per weight shape and grad mode and failed
    on the 8B model's ninth. Six shapes (square and not, packed tensors as frozen nn.Parameters, as
    the layers hold them), forward's grad mode and backward's no-grad mode, two dtypes, NF4 and int8,
    a layer's weight and stacked experts': two graphs a format."""
    from torch import nn
    from torch._dynamo.utils import counters

    from efftune.quantize import linear
    from efftune.quantize.experts import dense_experts, quantize_stacked
    _everywhere(monkeypatch)
    torch._dynamo.reset()
    counters.clear()
    g = torch.Generator().manual_seed(0)
    for out_f, in_f in [(256, 256), (64, 256), (512, 256), (256, 1024), (1024, 256), (192, 576)]:
        w = torch.randn(2, out_f, in_f, generator=g)
        frozen = lambda ts: tuple(nn.Parameter(x, requires_grad=False) if not x.is_floating_point() else x  # noqa: E731
                                  for x in ts)
        layers = {"nf4": frozen(nf4.quantize(w[0]).tensors()) + (nf4.code_table(),),
                  "int8": frozen(int8.quantize(w[0]).tensors())}
        stacks = {"nf4": list(frozen(quantize_stacked("nf4", w))) + [nf4.code_table()],
                  "int8": list(frozen(quantize_stacked("int8", w)))}
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                for dtype in (torch.bfloat16, torch.float32):
                    for kind in layers:
                        linear.DENSE[kind](layers[kind], dtype)
                        dense_experts(kind, stacks[kind], dtype)
    assert counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])
    torch._dynamo.reset()

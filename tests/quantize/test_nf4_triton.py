"""The NF4 dequantisation kernel (`efftune.quantize.nf4_triton`), run by Triton's CPU interpreter where
Triton is installed (a GPU runs the compiled kernel; tests/test_triton_kernels_compile.py compiles it
for sm_90): the same bits as the eager `nf4.dequantize`, for a layer and for stacked experts, masks at
the ragged end included."""
from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("triton")

from efftune.quantize import nf4  # noqa: E402


@pytest.fixture
def interpreted(monkeypatch):
    """nf4_triton with its kernel made under TRITON_INTERPRET=1 (read as the kernel is defined), and
    made again afterwards without it, as a GPU process imports it."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    module = importlib.reload(importlib.import_module("efftune.quantize.nf4_triton"))
    yield module
    monkeypatch.delenv("TRITON_INTERPRET")
    importlib.reload(module)


@pytest.mark.parametrize("shape", [(96, 128), (64, 4096), (3, 40, 192)])  # 6,144 / 131,072 / 11,520 bytes
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_kernel_gives_the_eager_bits(interpreted, shape, dtype):
    from efftune.quantize.experts import quantize_stacked
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    tensors = nf4.quantize(w).tensors() if w.ndim == 2 else tuple(quantize_stacked("nf4", w))
    eager = nf4.dequantize(*tensors, dtype)
    got = interpreted.dequantize(*tensors, nf4.code_table(), dtype)
    assert got.dtype == dtype and got.shape == w.shape
    if dtype == torch.bfloat16:
        # Triton's CPU interpreter truncates fp32 to bf16 where a GPU rounds to nearest even (on the GPU,
        # bench/kernel_bench.py --only dequant checks these bits equal): here the products before that
        # one rounding are checked, in fp32, and the bf16 weights to within the truncation's one step
        fp32 = interpreted.dequantize(*tensors, nf4.code_table(), torch.float32)
        assert torch.equal(fp32, nf4.dequantize(*tensors, torch.float32))
        assert torch.equal(fp32.to(dtype), eager)
        torch.testing.assert_close(got, eager, rtol=2 ** -7, atol=0)
    else:
        assert torch.equal(got, eager)
    assert (got.float() - w).abs().max() < w.abs().max() * 0.2  # and it is the weight, not just the same bits


def test_each_expert_takes_its_own_scales(interpreted):
    """Experts quantised on their own, with very different scales: each comes back as its own
    dequantisation does (an expert reading its neighbour's scales or mean would be far off)."""
    from efftune.quantize.experts import quantize_stacked
    w = torch.randn(3, 64, 512, generator=torch.Generator().manual_seed(1)) * torch.tensor([0.01, 1.0, 30.0])[:, None, None]
    stacked = quantize_stacked("nf4", w)
    got = interpreted.dequantize(*stacked, nf4.code_table(), torch.float32)
    for e in range(3):
        one = [t[e] for t in stacked]
        assert torch.equal(got[e], nf4.dequantize(*one, torch.float32))


def test_the_kernel_refuses_what_it_cannot_write(interpreted):
    tensors = nf4.quantize(torch.randn(4, 64)).tensors()
    with pytest.raises(ValueError, match="NF4 dequantisation kernel"):
        interpreted.dequantize(*tensors, nf4.code_table(), torch.float64)
    with pytest.raises(ValueError, match="NF4 dequantisation kernel"):
        interpreted.dequantize(*tensors, nf4.code_table().double(), torch.bfloat16)


def test_a_gpu_dequantisation_takes_the_kernel_where_it_can():
    from efftune.quantize import linear, nf4_triton
    cuda = torch.device("cuda")
    assert linear.nf4_kernel(cuda, torch.bfloat16) is nf4_triton.dequantize
    assert linear.nf4_kernel(cuda, torch.float32) is nf4_triton.dequantize
    assert linear.nf4_kernel(cuda, torch.float64) is None  # the compiled decode takes those
    assert linear.nf4_kernel(torch.device("cpu"), torch.bfloat16) is None

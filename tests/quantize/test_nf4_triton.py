"""The NF4 decoding kernel (`efftune.quantize.nf4_triton`), run by Triton's CPU interpreter where
Triton is installed (a GPU runs the compiled kernel; tests/test_triton_kernels_compile.py compiles it
for sm_90): the same bits as the eager `nf4.decode_scaled`, masks at the ragged end included."""
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
    got = nf4.dequantize(*tensors, dtype, decode=interpreted.decode_scaled)
    assert got.dtype == dtype and got.shape == w.shape
    if dtype == torch.bfloat16:
        # Triton's CPU interpreter truncates fp32 to bf16 where a GPU rounds to nearest even (on the GPU,
        # bench/kernel_bench.py --only dequant checks these bits equal): here the products before that
        # one rounding are checked, in fp32, and the bf16 weights to within the truncation's one step
        fp32 = nf4.dequantize(*tensors, torch.float32, decode=interpreted.decode_scaled)
        assert torch.equal(fp32.to(dtype), eager)
        assert torch.equal(fp32, nf4.dequantize(*tensors, torch.float32))
        torch.testing.assert_close(got, eager, rtol=2 ** -7, atol=0)
    else:
        assert torch.equal(got, eager)
    assert (got.float() - w).abs().max() < w.abs().max() * 0.2  # and it is the weight, not just the same bits


def test_the_kernel_refuses_what_it_cannot_write(interpreted):
    codes, scales = torch.zeros(32, dtype=torch.uint8), torch.ones(1)
    with pytest.raises(ValueError, match="NF4 decoding kernel"):
        interpreted.decode_scaled(codes, scales, nf4.code_table(), torch.float64)
    with pytest.raises(ValueError, match="NF4 decoding kernel"):
        interpreted.decode_scaled(codes, scales.double(), nf4.code_table(), torch.bfloat16)
    assert interpreted.decode_scaled(codes[:0], scales[:0], nf4.code_table(), torch.bfloat16).numel() == 0


def test_a_gpu_dequantisation_takes_the_kernel_where_it_can():
    from efftune.quantize import linear, nf4_triton
    cuda = torch.device("cuda")
    assert linear.nf4_decode(cuda, torch.bfloat16) is nf4_triton.decode_scaled
    assert linear.nf4_decode(cuda, torch.float32) is nf4_triton.decode_scaled
    assert linear.nf4_decode(cuda, torch.float64) is linear.compiled_on_gpu(nf4.decode_scaled, cuda)
    assert linear.nf4_decode(torch.device("cpu"), torch.bfloat16) is nf4.decode_scaled

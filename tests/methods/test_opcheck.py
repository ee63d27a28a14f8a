"""`torch.library.opcheck` for every registered `efftune::` op: the schema tells the truth (no
undeclared mutation or aliasing), the fake (meta) kernel gives the real outputs' shapes, strides and
dtypes, and the op survives torch.compile's AOT dispatch with dynamic shapes. CPU runs the PyTorch
versions; the CUDA cases (the Triton kernels of the SwiGLU op) run where a GPU is.
(flash4's two ops are checked in tests/eval/test_flash4.py, whose reference kernels they need.)"""
from __future__ import annotations

import itertools

import efftune.forward.flash4  # noqa: F401  (registers the flash4 ops)
import efftune.methods.lora.swiglu  # noqa: F401  (registers the SwiGLU ops)
import pytest
import torch
from torch import nn

from efftune.methods.lora import packing
from efftune.quantize import Int8Linear, Nf4Linear
from efftune.quantize.operands import flatten, weight_operands

N, IN = 7, 8          # tokens, input width
OUTS, RANKS = (6, 4), (2, 3)
F_, RG, RU, RD = 10, 2, 3, 4  # SwiGLU: intermediate width, gate/up/down LoRA ranks

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                             reason="needs CUDA")])]
OPS = torch.ops.efftune


_CALLS = itertools.count(1)  # a different tensor every call, the same ones every run


def randn(*shape, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(next(_CALLS))
    return torch.randn(*shape, generator=g, dtype=dtype).to(device)


def check(op, args, **kw) -> None:
    torch.library.opcheck(op, args, **kw)


KINDS = ["dense", "nf4", "int8"]  # how the frozen weights come: plain, or quantised (efftune.quantize)
QUANTIZED = {"nf4": Nf4Linear, "int8": Int8Linear}


def width(kind: str) -> int:
    return 64 if kind == "nf4" else IN  # NF4 needs rows of whole 64-weight blocks


def frozen(kind: str, outs, device, in_features: int | None = None) -> tuple[list, list[str] | None]:
    """Weights of these output sizes as the ops take them: (flat tensors, kinds or None)."""
    in_features = in_features or width(kind)
    members = []
    for o in outs:
        linear = nn.Linear(in_features, o, bias=False).requires_grad_(False)
        with torch.no_grad():
            linear.weight.copy_(randn(o, in_features))
        layer = linear if kind == "dense" else QUANTIZED[kind](linear)
        members.append(weight_operands(layer.to(device), torch.float32))
    flat, kinds = flatten(members)
    return flat, kinds or None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_lora_linears(device, bias, kind):
    weights, kinds = frozen(kind, OUTS, device)
    biases = [randn(OUTS[0], device=device) if bias else None, None]
    a = randn(sum(RANKS), width(kind), device=device)
    bs = [randn(o, r, device=device) for o, r in zip(OUTS, RANKS)]
    check(OPS.lora_linears.default, (randn(N, width(kind), device=device), weights, biases, a, bs, kinds))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("need_dx", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_lora_linears_backward(device, need_dx, kind):
    dys = [randn(N, o, device=device) for o in OUTS]
    weights, kinds = frozen(kind, OUTS, device)
    bs = [randn(o, r, device=device) for o, r in zip(OUTS, RANKS)]
    args = (dys, weights, randn(sum(RANKS), width(kind), device=device), bs, randn(N, sum(RANKS), device=device),
            need_dx, kinds)
    check(OPS.lora_linears_backward.default, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_lora_output(device, bias, kind):
    weights, kinds = frozen(kind, OUTS[:1], device)
    args = (randn(N, width(kind), device=device), weights,
            randn(OUTS[0], device=device) if bias else None, randn(N, RANKS[0], device=device),
            randn(OUTS[0], RANKS[0], device=device), kinds)
    check(OPS.lora_output.default, args)


def swiglu_inputs(device, dtype):
    gu = randn(N, 2 * F_ + RG + RU, device=device, dtype=dtype)  # [g0 | u0 | z]
    return gu, randn(F_, RG, device=device, dtype=dtype), randn(F_, RU, device=device, dtype=dtype), \
        randn(RD, F_, device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # float64 takes the PyTorch version on CUDA too
def test_swiglu_lora_forward(device, dtype):
    check(OPS.swiglu_lora_forward.default, swiglu_inputs(device, dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_swiglu_lora_backward(device, dtype):
    gu, bg, bu, ad = swiglu_inputs(device, dtype)
    args = (randn(N, F_, device=device, dtype=dtype), randn(N, RD, device=device, dtype=dtype), ad, gu, bg, bu)
    check(OPS.swiglu_lora_backward.default, args)


def packed_weights(device, packed: bool, extra_rows: int):
    """The two frozen weights, packed with `extra_rows` spare rows after them (or apart), and the
    packing's spare rows (None apart)."""
    torch.manual_seed(0)
    layers = [nn.Linear(IN, o, bias=False).requires_grad_(False).to(device) for o in OUTS]
    spare = packing.pack_rows(layers, extra_rows) if packed else None
    assert (spare is not None) == packed
    return [layer.weight for layer in layers], spare


def rows_args(op: str, device, packed: bool):
    extra = randn(sum(RANKS), IN, device=device)
    weights, spare = packed_weights(device, packed, extra.shape[0])
    first = randn(N, IN, device=device) if op == "rows_mm" else randn(N, sum(OUTS) + extra.shape[0], device=device)
    return first, weights, extra, spare


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["rows_mm", "rows_grad"])
def test_rows_ops(device, op):
    check(getattr(OPS, op).default, rows_args(op, device, packed=False))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["rows_mm", "rows_grad"])
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_rows_ops_on_quantised_weights(device, op, kind):
    weights, kinds = frozen(kind, OUTS, device)
    extra = randn(sum(RANKS), width(kind), device=device)
    first = randn(N, width(kind), device=device) if op == "rows_mm" else randn(N, sum(OUTS) + extra.shape[0],
                                                                                device=device)
    check(getattr(OPS, op).default, (first, weights, extra, None, kinds))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["rows_mm", "rows_grad"])
def test_rows_ops_on_a_packing(device, op):
    """opcheck runs on copies of its inputs, and copies share no storage: no packing. So the packed
    branch (one GEMM over the weights and the spare rows) gets opcheck's checks here by hand: the
    fake kernel's outputs have the real ones' shape, strides and dtype, a compiled call (AOT
    dispatch, dynamic shapes) gives the eager result, and both equal the unpacked op's."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._pytree import tree_map_only
    x, weights, extra, spare = rows_args(op, device, packed=True)
    fn = getattr(OPS, op).default
    out = fn(x, weights, extra, spare)
    assert torch.equal(spare, extra)  # the packed branch ran: it wrote the extra rows into the spare ones
    apart = fn(x, [w.clone() for w in weights], extra, None)
    torch.testing.assert_close(out, apart, rtol=1e-6, atol=1e-6)
    assert out.stride() == apart.stride()
    with FakeTensorMode() as mode:
        fake = fn(*tree_map_only(torch.Tensor, mode.from_tensor, (x, weights, extra, spare)))
    assert (fake.shape, fake.stride(), fake.dtype, fake.device) == (out.shape, out.stride(), out.dtype, out.device)
    compiled = torch.compile(lambda *args: fn(*args), backend="aot_eager", dynamic=True, fullgraph=True)
    torch.testing.assert_close(compiled(x, weights, extra, spare), out, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("op", ["quantized_mm", "quantized_mm_input_grad"])
def test_quantized_mm(device, kind, op):
    """The unfused quantised linear's matmul (efftune.quantize.linear), on 3-D activations."""
    weights, _ = frozen(kind, OUTS[:1], device)
    first = randn(2, N, width(kind), device=device) if op == "quantized_mm" else randn(2, N, OUTS[0], device=device)
    check(getattr(OPS, op).default, (first, weights, kind))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("op", ["quantized_grouped_mm", "quantized_grouped_mm_input_grad"])
def test_quantized_grouped_mm(device, kind, op):
    """The quantised MoE experts' grouped product (efftune.quantize.experts); an expert with no rows."""
    from efftune.quantize.experts import quantize_stacked
    w = randn(3, OUTS[0], width(kind))
    tensors = [t.to(device) for t in quantize_stacked(kind, w)] + ([nf4_table(device)] if kind == "nf4" else [])
    counts = torch.tensor([4, 0, 3], device=device)
    first = randn(N, width(kind), device=device) if op == "quantized_grouped_mm" else randn(N, OUTS[0], device=device)
    check(getattr(OPS, op).default, (first, tensors, kind, counts, "auto"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("subset", [False, True])
def test_gathered_grouped_ops(device, subset):
    """Expert LoRA's grouped product of gathered rows and its gradients (efftune.moe.experts):
    3 tokens, 2 slots each, 3 groups (one empty), all rows (with the inverse order) or the last 4."""
    import efftune.moe.experts  # noqa: F401  (registers the ops)
    source = randn(3, IN, device=device)
    order = torch.tensor([1, 4, 0, 3, 5, 2], device=device)
    rows, inverse = order // 2, torch.argsort(order)
    counts = torch.tensor([2, 0, 4], device=device)
    if subset:
        rows, inverse, counts = rows[2:], None, torch.tensor([0, 0, 4], device=device)
    weight = randn(3, OUTS[1], IN, device=device).requires_grad_(True)
    check(OPS.gathered_grouped_linear.default, (source.requires_grad_(True), rows, inverse, 2, weight, counts, "auto"))
    check(OPS.gathered_grouped_linear_backward.default, (randn(rows.shape[0], OUTS[1], device=device), source.detach(),
                                                         rows, inverse, 2, weight.detach(), counts, "auto"))


def nf4_table(device):
    from efftune.quantize import nf4
    return nf4.code_table(device)


CHECKED_HERE = {"lora_linears", "lora_linears_backward", "lora_output", "swiglu_lora_forward",
                "swiglu_lora_backward", "rows_mm", "rows_grad", "quantized_mm", "quantized_mm_input_grad",
                "quantized_grouped_mm", "quantized_grouped_mm_input_grad", "gathered_grouped_linear",
                "gathered_grouped_linear_backward"}
CHECKED_IN_FLASH4_TESTS = {"flash4_causal", "flash4_causal_backward"}


def test_every_registered_op_is_checked():
    """A new `efftune::` op must get its opcheck here (or beside its reference kernels)."""
    registered = {name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("efftune::")}
    assert registered == CHECKED_HERE | CHECKED_IN_FLASH4_TESTS

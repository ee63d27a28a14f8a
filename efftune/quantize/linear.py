"""Frozen linear layers whose weight is stored quantised (`Nf4Linear`, `Int8Linear`).

The matmul dequantises the weight of this one layer in the compute dtype, multiplies, and lets the
dense copy go; backward (the input gradient only: the weight never trains) dequantises it again
instead of keeping it from forward. So at no point does a dense copy of more than the layer being
computed exist, at the price of one dequantisation pass more per layer and step, as QLoRA does.

The packed tensors (NF4's codes and int8 block scales, int8's codes) are frozen integer
*parameters*, not buffers, so that FSDP2 shards them with their decoder block like any frozen weight
(`frozen_packed`); the few fp32 scales above them stay buffers, which FSDP2 keeps whole on every
rank and which no mixed-precision policy casts.

They subclass nn.Linear so that everything that looks for linear layers (`all-linear` targets,
MixLoRA's gated-MLP check, user code) still finds them, but they hold no `weight` parameter:
`weight` is a property giving the dequantised weight for reading (shape, dtype, device, values).
It is made under `torch.inference_mode`, so writing into it (a merge) fails loudly instead of
changing a temporary copy and nothing else. Code that needs a plain nn.Linear (the fused LoRA
ops' fast path, FP8) checks `type(m) is nn.Linear` and steps aside for these.
"""
from __future__ import annotations

import functools
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import register_flop_formula

from . import int8, nf4


_COMPILED: dict[Callable, Callable] = {}


def compiled_on_gpu(fn: Callable, device: torch.device) -> Callable:
    """`fn` (a dequantisation's elementwise work) as it runs on `device`: compiled by torch.compile on a
    CUDA GPU, itself elsewhere. Eager, NF4 dequantisation is a gather, a multiply and a cast, each a
    pass over the whole weight with an fp32 copy of it between them, and took as long as the GEMM it
    feeds on an H100 (0.95x for the 8B gate/up projection); compiled, one kernel reads the codes and
    writes the weight, 5.7x faster, with the same bits (bench/kernel_bench.py --only dequant,
    bench/RESULTS.md session 18). The quantised ops are opaque to a compiled model, so this holds under
    train.compile too. Not on the CPU: a compile there needs a C++ toolchain, and eager is what the
    tests check against (a CPU test checks the compiled form gives the same bits)."""
    if device.type != "cuda":
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = _shared_graphs(torch.compile(fn, dynamic=True))
    return _COMPILED[fn]


def _shared_graphs(compiled: Callable) -> Callable:
    """`compiled`, called so that every layer of a model runs one graph per dtype. Each property torch
    guards on multiplies the graphs, and past torch._dynamo's recompile limit (8) the function stops
    compiling: an 8B NF4 step has 5 weight shapes (static, as the packed tensors are nn.Parameters)
    times forward's grad mode and backward's no-grad mode. So the tensors go in flat (`nf4.decode_scaled`)
    and detached (plain tensors, symbolic sizes), always under no_grad (no dequantisation is differentiated)."""
    def run(*args):
        with torch.no_grad():
            return compiled(*(a.detach() if isinstance(a, Tensor) else a for a in args))
    return run


def nf4_kernel(device: torch.device, dtype: torch.dtype) -> Callable | None:
    """The Triton kernel an NF4 dequantisation to `dtype` on `device` runs (`nf4_triton.dequantize`:
    one pass, the same bits), on a CUDA GPU where Triton is installed (torch's CUDA builds bring it),
    for bf16 / fp16 / fp32 weights; None elsewhere (then: `nf4.dequantize` with its elementwise work
    compiled, `compiled_on_gpu`, which on the CPU is the eager function itself)."""
    if device.type != "cuda":
        return None
    kernels = _nf4_triton()
    return kernels.dequantize if kernels is not None and dtype in kernels.DTYPES else None


@functools.cache
def _nf4_triton():
    """The `nf4_triton` module, or None where Triton is missing (a CUDA build of torch without it):
    looked up once, not at every dequantisation (a step makes hundreds)."""
    try:
        from . import nf4_triton
    except ImportError:
        return None
    return nf4_triton


def _nf4_dense(tensors: tuple[Tensor, ...], dtype: torch.dtype) -> Tensor:
    codes, scale_q, scale_scale, scale_mean, table = tensors
    kernel = nf4_kernel(codes.device, dtype)
    if kernel is not None:
        return kernel(codes, scale_q, scale_scale, scale_mean, table, dtype)
    return nf4.dequantize(codes, scale_q, scale_scale, scale_mean, dtype, table,
                          decode=compiled_on_gpu(nf4.decode_scaled, codes.device))


def _int8_dense(tensors: tuple[Tensor, ...], dtype: torch.dtype) -> Tensor:
    q, scale = tensors
    return int8.dequantize(q, scale, dtype, rows=compiled_on_gpu(int8.scale_rows, q.device))


def frozen_packed(module: nn.Module, name: str, t: Tensor) -> None:
    """Register packed tensor `t` (integer: codes, int8 scales) as a frozen parameter of `module`.

    Why a parameter: FSDP2 (`fully_shard`) shards parameters, never buffers, so a buffer would leave
    every rank with the whole quantised base. As a parameter it is cut along dim 0 (whole rows of
    codes, so every 64-weight NF4 block of a row lies on one rank; whole scales) and all-gathered
    bit for bit before its block's forward (FSDP2 gathers tensors of mixed dtypes as bytes), and
    FSDP2 leaves non-floating parameters out of MixedPrecisionPolicy's cast. `Module.to(dtype)`
    and `.half()` cast floating-point tensors only, and an integer tensor cannot require a gradient,
    so no optimizer or method ever trains it. Its state-dict key is the one the buffer had."""
    module.register_parameter(name, nn.Parameter(t, requires_grad=False))


DENSE = {"nf4": _nf4_dense, "int8": _int8_dense}  # kind -> (its tensors, dtype) -> dense weight (stacked too)
IN_FEATURES = {"nf4": lambda t: t[0].shape[1] * 2, "int8": lambda t: t[0].shape[1]}  # from the shapes alone


# The matmul and its input gradient as two ops, opaque to torch.compile. Traced as plain PyTorch,
# forward's dequantisation and backward's repeat of it are one expression to the compiler, whose
# partitioner then keeps the dense weight from forward for backward (seen with aot_eager and
# inductor: every quantised layer's weight saved in the compute dtype), the very copy QLoRA's
# scheme avoids. Inside an op, nothing outside ever holds the dense weight.
_LIB = torch.library.Library("efftune", "FRAGMENT")  # methods/lora/ops.py DEFines the namespace's other ops
_LIB.define("quantized_mm(Tensor x, Tensor[] tensors, str kind) -> Tensor")
_LIB.define("quantized_mm_input_grad(Tensor dy, Tensor[] tensors, str kind) -> Tensor")


def quantized_mm(x: Tensor, tensors: list[Tensor], kind: str) -> Tensor:
    """x Wᵀ, W = DENSE[kind](tensors) made in x's dtype for this product only."""
    return F.linear(x, DENSE[kind](tuple(tensors), x.dtype))


def quantized_mm_input_grad(dy: Tensor, tensors: list[Tensor], kind: str) -> Tensor:
    """dy W, W made again in dy's dtype."""
    return dy @ DENSE[kind](tuple(tensors), dy.dtype)


_LIB.impl("quantized_mm", quantized_mm, "CompositeExplicitAutograd")
_LIB.impl("quantized_mm_input_grad", quantized_mm_input_grad, "CompositeExplicitAutograd")


@torch.library.register_fake("efftune::quantized_mm", lib=_LIB)
def _(x, tensors, kind):
    return x.new_empty(*x.shape[:-1], tensors[0].shape[0])


@torch.library.register_fake("efftune::quantized_mm_input_grad", lib=_LIB)
def _(dy, tensors, kind):
    return dy.new_empty(*dy.shape[:-1], IN_FEATURES[kind](tensors))


# Flop counts (`torch.utils.flop_counter`; without them the op counts as free, see `methods.lora.ops`);
# the dequantisation is memory-bound and not counted.
@register_flop_formula([torch.ops.efftune.quantized_mm, torch.ops.efftune.quantized_mm_input_grad], get_raw=True)
def _(x, tensors, kind, out_val=None, **_):
    return 2 * x.numel() // x.shape[-1] * tensors[0].shape[0] * IN_FEATURES[kind](tensors)


class QuantizedMatmul(torch.autograd.Function):
    """apply(x, kind, *tensors) = x Wᵀ, W = DENSE[kind](tensors) in x's dtype; saves only the
    quantised tensors, and gives no gradient but x's."""

    @staticmethod
    def forward(ctx, x: Tensor, kind: str, *tensors: Tensor) -> Tensor:
        ctx.save_for_backward(*tensors)
        ctx.kind = kind
        return torch.ops.efftune.quantized_mm(x, list(tensors), kind)

    @staticmethod
    def backward(ctx, grad: Tensor):
        tensors = ctx.saved_tensors
        dx = torch.ops.efftune.quantized_mm_input_grad(grad, list(tensors), ctx.kind) \
            if ctx.needs_input_grad[0] else None
        return (dx, None) + (None,) * len(tensors)


class QuantizedLinear(nn.Linear):
    """A frozen nn.Linear stored quantised. `dtype`: the compute dtype (the original weight's; it
    follows `.to(dtype)` like a weight would, while the quantised tensors keep their dtypes)."""

    KIND: ClassVar[str]
    FP32_BUFFERS: ClassVar[tuple[str, ...]] = ()  # scales: a cast of the model must not round them

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)  # not nn.Linear's: no weight parameter is made
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = linear.weight.dtype
        if linear.bias is not None:
            linear.bias.requires_grad_(False)
        self.register_parameter("bias", linear.bias)

    def quantized(self) -> tuple[Tensor, ...]:
        """The tensors DENSE[KIND] takes."""
        raise NotImplementedError

    @property
    def packed_weight_numel(self) -> int:
        """The weight's elements, which parameter counts take in place of the packed parameters'
        (`efftune.attach.trainable_parameters`)."""
        return self.in_features * self.out_features

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dense weight (out, in) in `dtype` (default: the compute dtype), a new tensor."""
        return DENSE[self.KIND](self.quantized(), dtype or self.dtype)

    @property
    def weight(self) -> Tensor:  # read-only, see the module docstring
        with torch.inference_mode():
            return self.dequantize()

    def forward(self, x: Tensor) -> Tensor:
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else self.dtype
        y = QuantizedMatmul.apply(x.to(dtype), self.KIND, *self.quantized())
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _apply(self, fn, recurse=True):
        # what the call does to a float weight (a cast, a move): the compute dtype follows it
        probe = fn(torch.empty(0, dtype=self.dtype))
        super()._apply(fn, recurse)
        self.dtype = probe.dtype
        for name in self.FP32_BUFFERS:
            setattr(self, name, getattr(self, name).float())
        return self

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.KIND}, dtype={self.dtype}"


class Nf4Linear(QuantizedLinear):
    """NF4 with double-quantised scales (`efftune.quantize.nf4`); in_features a multiple of 64."""

    KIND = "nf4"
    FP32_BUFFERS = ("scale_scale", "scale_mean", "code")

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        codes, scale_q, scale_scale, scale_mean = nf4.quantize(linear.weight).tensors()
        frozen_packed(self, "codes", codes)
        frozen_packed(self, "scale_q", scale_q)
        self.register_buffer("scale_scale", scale_scale)
        self.register_buffer("scale_mean", scale_mean)
        self.register_buffer("code", nf4.code_table(linear.weight.device), persistent=False)

    def quantized(self) -> tuple[Tensor, ...]:
        return self.codes, self.scale_q, self.scale_scale, self.scale_mean, self.code


class Int8Linear(QuantizedLinear):
    """int8 with one fp32 scale per output row (`efftune.quantize.int8`)."""

    KIND = "int8"
    FP32_BUFFERS = ("scale",)

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        packed = int8.quantize(linear.weight)
        frozen_packed(self, "q", packed.q)
        self.register_buffer("scale", packed.scale)

    def quantized(self) -> tuple[Tensor, ...]:
        return self.q, self.scale


LINEARS: dict[str, type[QuantizedLinear]] = {"nf4": Nf4Linear, "int8": Int8Linear}

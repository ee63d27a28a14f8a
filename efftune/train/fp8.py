"""FP8 matmuls for the frozen base linears during training (`train.fp8_base`).

A LoRA step's time goes mostly into the frozen base's two matmuls per linear: `y = x Wᵀ` forward and
`dx = dy W` backward (no weight gradient). On GPUs with FP8 tensor cores (H100, Ada) these run at
about twice the bf16 rate in float8 e4m3 with row-wise scales:

- the weight is quantised once, when training starts, per output row: `W ≈ s_n · Wq[n, :]`;
- forward quantises each token's input row: `x ≈ s_m · xq[m, :]`, so `y = s_m s_n (xq Wqᵀ)`;
- backward folds the weight scales into the incoming gradient (`g = dy · s_n`, along the
  contraction dimension), quantises `g` per row and multiplies by `Wq`: `dx = s_g (gq Wq)`. The FP8
  kernel wants its second operand column-major, so `Wq` is transposed there (one fp8 copy,
  instead of keeping a second quantised layout resident).

The layer saves no activation for backward (the weight is all it needs), so the frozen base keeps
nothing alive per token either. Only the frozen base changes: LoRA factors, their matmuls, the
LM head and the loss stay in bf16/fp32. The exact bf16 weights wait in host memory while training
runs and are put back afterwards (`Fp8Base.restore`), so merging, saving and evaluation see the
original model; the adapter was trained against the FP8-rounded base, as a QLoRA adapter is
trained against its 4-bit base. Numbers: bench/RESULTS.md.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from ..attach import replace_module
from ..errors import ConfigError
from ..methods.lora.swiglu import pack_swiglu_mlps

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
_EPS = 1e-12


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (xq (M, K) float8 e4m3, scale (M, 1) fp32) with x ≈ scale · xq, per row."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(_EPS)
    scale = amax / FP8_MAX
    return (x.float() / scale).to(FP8), scale


def fp8_matmul(aq: torch.Tensor, a_scale: torch.Tensor, bq_t: torch.Tensor, b_scale: torch.Tensor,
               out_dtype: torch.dtype) -> torch.Tensor:
    """(a_scale · aq) @ (bq_t · b_scale): aq (M, K) row-major, bq_t (K, N) column-major, a_scale
    (M, 1), b_scale (1, N), fp32 accumulation."""
    # cuBLAS takes row-wise scales only with a bf16 result; an fp32 caller gets it converted
    kernel_dtype = torch.bfloat16 if aq.is_cuda else out_dtype
    out = torch._scaled_mm(aq, bq_t, scale_a=a_scale, scale_b=b_scale, out_dtype=kernel_dtype)
    return out.to(out_dtype)


class _Fp8Linear(torch.autograd.Function):
    """y = x Wᵀ with W = w_scale · wq frozen; saves only the weight for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(wq, w_scale)
        ctx.x_dtype = x.dtype
        lead, k = x.shape[:-1], x.shape[-1]
        xq, xs = quantize_rows(x.reshape(-1, k))
        y = fp8_matmul(xq, xs, wq.t(), w_scale.view(1, -1), x.dtype)
        return y.view(*lead, wq.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        wq, w_scale = ctx.saved_tensors
        n = wq.shape[0]
        g = grad.reshape(-1, n).float() * w_scale.view(1, n)
        gq, gs = quantize_rows(g)
        ones = torch.ones(1, wq.shape[1], device=wq.device, dtype=torch.float32)
        # the kernel's second operand must be column-major: a (K, N) row-major copy, viewed as (N, K)
        dx = fp8_matmul(gq, gs, wq.t().contiguous().t(), ones, grad.dtype)
        return dx.view(*grad.shape[:-1], wq.shape[1]).to(ctx.x_dtype), None, None


class Fp8Linear(nn.Module):
    """A frozen nn.Linear whose matmul runs in FP8 (see the module docstring). Holds the quantised
    weight and its per-row scales as buffers and the original bias (frozen) as is."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            wq, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight_fp8", wq, persistent=False)
        self.register_buffer("weight_scale", scale.view(-1), persistent=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        y = _Fp8Linear.apply(x, self.weight_fp8, self.weight_scale)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def fp8_eligible(module: nn.Module) -> bool:
    """A plain frozen nn.Linear whose sizes the FP8 kernel takes (multiples of 16)."""
    return (type(module) is nn.Linear and not module.weight.requires_grad
            and (module.bias is None or not module.bias.requires_grad)
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


@functools.cache
def cpu_rowwise_fp8_error() -> str | None:
    """Why this torch's CPU `_scaled_mm` cannot take row-wise scales (None: it can). torch 2.13's
    can; 2.11's takes only one scale per matrix, and would fail at the first training step."""
    if not hasattr(torch, "_scaled_mm"):
        return "torch._scaled_mm is missing (torch >= 2.5 has it)"
    try:
        fp8_matmul(torch.ones(16, 16).to(FP8), torch.ones(16, 1), torch.ones(16, 16).to(FP8).t(),
                   torch.ones(1, 16), torch.float32)
    except Exception as e:  # RuntimeError in the builds seen; any failure means no
        return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return None


def check_fp8_device(device: torch.device) -> None:
    """FP8 matmuls need CUDA compute capability 8.9+ (Ada, Hopper) or a CPU build that has them."""
    if not hasattr(torch, "_scaled_mm"):
        raise ConfigError("train.fp8_base needs torch._scaled_mm (torch >= 2.5)")
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise ConfigError(f"train.fp8_base needs an FP8 GPU (compute capability 8.9+, e.g. H100); "
                              f"{torch.cuda.get_device_name(device)} is {major}.{minor}")
    elif device.type == "cpu" and (error := cpu_rowwise_fp8_error()):
        raise ConfigError(f"train.fp8_base on CPU needs row-wise scaled FP8 matmuls, which this torch "
                          f"({torch.__version__}) lacks: {error}")


class Fp8Base:
    """Swaps the frozen linears inside the decoder blocks for Fp8Linear, keeping the exact
    weights in host memory; `restore()` puts the original modules back (on their device).

    The LM head stays in bf16 (the logits feed the loss directly), and so does every linear with
    a trainable weight or bias. Use as a context manager or call `restore()` yourself."""

    def __init__(self, model: nn.Module):
        from ..attach import decoder_blocks
        targets = [(block, name, m) for block in decoder_blocks(model, "train.fp8_base")
                   for name, m in block.named_modules() if name and fp8_eligible(m)]
        from ..methods.lora.layer import lora_layers
        if any(a.scales_output for _, layer in lora_layers(model) for a in layer.adapters.values()):
            raise ConfigError("train.fp8_base with DoRA (--method dora, lora.use_dora) is not supported: "
                              "DoRA's norms read the frozen weight, which FP8 replaces")
        if not targets:
            raise ConfigError("train.fp8_base: no frozen linear layer in the decoder blocks can run in "
                              "FP8 (plain nn.Linear, frozen, sizes multiples of 16)")
        check_fp8_device(targets[0][2].weight.device)
        self.swapped: list[tuple[nn.Module, str, nn.Linear, torch.device]] = []
        self.model = model
        for block, name, linear in targets:
            device = linear.weight.device
            replace_module(block, name, Fp8Linear(linear))
            linear.to("cpu")  # the exact weights wait here; the FP8 copy is half their size
            self.swapped.append((block, name, linear, device))
        pack_swiglu_mlps(model)  # the bf16 gate/up matrix goes too, not kept alive by its spare rows

    def restore(self) -> None:
        for block, name, linear, device in reversed(self.swapped):
            replace_module(block, name, linear.to(device))
        self.swapped = []
        pack_swiglu_mlps(self.model)

    def __enter__(self) -> "Fp8Base":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

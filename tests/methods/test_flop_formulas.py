"""Flop counts of the opaque `efftune::` ops (`torch.utils.flop_counter`: FlopCounterMode, and
torch.compile's memory-budget search when it weighs what to recompute): a LoRA
model's training step on the fused ops counts the flops of the same step computed by plain
PyTorch matmuls (each LoRA layer apart, its base linear as nn.Linear or a quantised matmul), plus what the fused
ops compute again by design."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

import efftune.forward.flash4  # noqa: F401  (registers the flash4 ops)
from efftune.methods.lora.config import LoraConfig
from efftune.methods.lora.layer import lora_layers
from efftune.methods.lora.model import add_lora
from efftune.methods.lora.swiglu import FusedSwiGLU, unwrap_swiglu_mlps
from efftune.quantize.model import quantize_model
from tests.conftest import randomize_lora, tiny_llama


class Flops(TorchDispatchMode):
    """Sums torch's flop formulas over the ops run, as the partitioner's estimate reads them.
    (Not FlopCounterMode: its module tracker installs global module hooks, before which the fused
    LoRA path steps aside so that hooks run.)"""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def step_flops(model, ids) -> tuple[int, set[str]]:
    """The training step's flops, and the efftune ops it ran."""
    ran = set()

    class Counting(Flops):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "efftune":
                ran.add(func._overloadpacket.__name__)
            return super().__torch_dispatch__(func, types, args, kwargs)

    with Counting() as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    return counter.total, ran


@pytest.mark.parametrize("kind", ["none", "nf4", "int8"])
def test_fused_lora_ops_count_the_flops_of_the_same_step_in_plain_matmuls(kind):
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    counts = []
    for fused in (True, False):
        model = tiny_llama(hidden_size=64, intermediate_size=128)  # NF4: rows of whole 64-weight blocks
        if kind != "none":
            quantize_model(model, kind)
        add_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
        randomize_lora(model)
        if fused:
            assert any(isinstance(m, FusedSwiGLU) for m in model.modules())
        else:
            unwrap_swiglu_mlps(model)
            for _, layer in lora_layers(model):
                layer.fused = None
        counts.append(step_flops(model.train(), ids))
    (fused_count, fused_ops), (plain_count, plain_ops) = counts
    assert {"lora_linears", "lora_linears_backward", "rows_mm", "rows_grad", "swiglu_lora_forward",
            "swiglu_lora_backward", "lora_output"} <= fused_ops
    assert plain_ops == (set() if kind == "none" else {"quantized_mm", "quantized_mm_input_grad"})
    assert plain_count > 0
    # the SwiGLU op's backward makes g and u's rank-r updates z Bᵀ again rather than keep g and u
    tokens, layers, r, intermediate = ids.numel(), 2, 4, 128
    assert fused_count == plain_count + layers * 2 * (2 * tokens * r * intermediate)


def test_flash4_ops_count_as_torch_counts_attention():
    b, t, h, hkv, d = 2, 16, 4, 2, 8
    q = torch.empty(b, t, h, d, device="meta")
    k = v = torch.empty(b, t, hkv, d, device="meta")
    from torch.utils.flop_counter import flop_registry
    forward = flop_registry[torch.ops.efftune.flash4_causal](q, k, v, 0.5, out_val=None)
    backward = flop_registry[torch.ops.efftune.flash4_causal_backward](q, q, k, v, q, None, 0.5, out_val=None)
    # forward: Q Kᵀ and P V, two products of b·h·t·t·d multiply-adds (causal or not, as torch counts
    # SDPA's); backward: the scores again, dV, dP, dQ and dK, five
    product = 2 * b * h * t * t * d
    assert (forward, backward) == (2 * product, 5 * product)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantised_grouped_products_count_as_one_matmul_per_expert(kind):
    from efftune.quantize import nf4
    from efftune.quantize.experts import dense_experts, quantize_stacked
    g = torch.Generator().manual_seed(0)
    experts, out_f, in_f = 3, 16, 64
    tensors = quantize_stacked(kind, torch.randn(experts, out_f, in_f, generator=g))
    tensors += [nf4.code_table()] if kind == "nf4" else []  # the shared code table, as QuantizedExperts adds it
    counts = torch.tensor([5, 0, 4])
    x, dy = torch.randn(9, in_f, generator=g), torch.randn(9, out_f, generator=g)
    with Flops() as op:
        torch.ops.efftune.quantized_grouped_mm(x, tensors, kind, counts, "loop")
        torch.ops.efftune.quantized_grouped_mm_input_grad(dy, tensors, kind, counts, "loop")
    dense = dense_experts(kind, tensors, torch.float32)
    with Flops() as reference:
        for e, (xs, dys) in enumerate(zip(x.split(counts.tolist()), dy.split(counts.tolist()))):
            xs @ dense[e].t()
            dys @ dense[e]
    assert op.total == reference.total > 0


def test_gathered_grouped_product_counts_as_one_matmul_per_expert():
    """Expert LoRA's product of gathered rows (efftune.moe.experts) and its backward (the weight's
    and the rows' gradients) count as the matmuls on the gathered rows do."""
    from efftune.moe.experts import dispatch, gathered_grouped_linear_backward
    g = torch.Generator().manual_seed(0)
    d = dispatch(torch.tensor([[0, 2], [2, 1], [0, 1], [2, 0]]), 3)
    rows = d.order // 2
    source, weight = torch.randn(4, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    dy = torch.randn(8, 5, generator=g)
    with Flops() as op:
        torch.ops.efftune.gathered_grouped_linear(source, rows, d.inverse, 2, weight, d.counts, "loop")
        gathered_grouped_linear_backward(dy, source, rows, d.inverse, 2, weight, d.counts, "loop")
    x = source[rows]
    with Flops() as reference:
        for e, (xs, dys) in enumerate(zip(x.split(d.counts.tolist()), dy.split(d.counts.tolist()))):
            xs @ weight[e].t()
            dys.t() @ xs
            dys @ weight[e]
    assert op.total == reference.total > 0

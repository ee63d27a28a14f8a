"""Quantised bases on CUDA in bf16, the paths the CPU suite cannot reach: the fused LoRA ops with the
Triton SwiGLU kernels over NF4 / int8 linears, and expert LoRA over quantised experts through CUDA's
grouped GEMM. Each against the same model with its weights dequantised, run in fp32 (so what differs
is bf16 rounding alone), and no further from it than the dequantised model run in bf16; the CPU
suite checks the same paths' formulas in float64."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from efftune.methods.expert_lora import ExpertLoraConfig, add_expert_lora
from efftune.methods.lora import LoraConfig, add_lora
from efftune.quantize import dequantize_model, quantize_model, quantized_layers
from tests.conftest import randomize_lora
from tests.quantize.test_experts import moe64
from tests.quantize.test_model import llama64

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
KINDS = ["nf4", "int8"]


def run(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """(logits, trainable gradients, input-embedding gradient) of a square loss, returned in fp32."""
    x = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=x).logits
    logits.float().square().mean().backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach().float(), grads, x.grad.float()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def compare(model: nn.Module, device: str) -> None:
    """`model` (quantised, bf16, a method attached) on `device` against its dequantised twin in fp32:
    no further from it than the dequantised twin run in bf16 is (twice that, plus a little), so what
    the quantised path adds to bf16's own rounding is small."""
    bf16 = copy.deepcopy(model)
    dequantize_model(bf16)  # the base's own dtype: bf16
    assert not quantized_layers(bf16) and quantized_layers(model)
    fp32 = copy.deepcopy(bf16).float().to(device)
    ids = torch.randint(0, 64, (2, 48), generator=torch.Generator().manual_seed(1)).to(device)
    got, plain, want = run(model.to(device), ids), run(bf16.to(device), ids), run(fp32, ids)

    def check(name: str, a: torch.Tensor, b: torch.Tensor, ref: torch.Tensor) -> None:
        assert a.abs().sum() > 0, name
        err, bound = relative(a, ref), 2 * relative(b, ref) + 5e-3
        assert err <= bound, f"{name}: {err:.4f} from fp32, bf16 dequantised {relative(b, ref):.4f}"
    check("logits", got[0], plain[0], want[0])
    check("input gradient", got[2], plain[2], want[2])
    assert got[1].keys() == want[1].keys() and got[1]
    for name, g in got[1].items():
        check(name, g, plain[1][name], want[1][name])


def lora_model(kind: str, use_dora: bool = False) -> nn.Module:
    model = llama64(torch.bfloat16)
    quantize_model(model, kind)
    add_lora(model, LoraConfig(r=4, alpha=8, use_dora=use_dora))
    randomize_lora(model)
    return model


def expert_lora_model(kind: str) -> nn.Module:
    model = moe64(torch.bfloat16)
    quantize_model(model, kind)
    add_expert_lora(model, ExpertLoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("use_dora", [False, True])
def test_fused_lora_on_a_quantised_base_on_cuda(kind, use_dora):
    compare(lora_model(kind, use_dora), "cuda")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("kind", KINDS)
def test_expert_lora_on_quantised_experts_on_cuda(kind):
    compare(expert_lora_model(kind), "cuda")


@pytest.mark.parametrize("kind", KINDS)
def test_the_comparison_holds_on_the_cpu(kind):
    """The same check where CI runs: the helpers above compare what they should."""
    compare(lora_model(kind), "cpu")
    compare(lora_model(kind, use_dora=True), "cpu")
    compare(expert_lora_model(kind), "cpu")

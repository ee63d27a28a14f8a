"""Training parity with peft: same init, same data, same optimizer -> the same loss curve (fp32)."""
import torch

from efftune.forward.logprobs import labelled_logprobs
from efftune.methods.lora.config import LoraConfig
from efftune.methods.lora.layer import lora_layers
from efftune.methods.lora.model import add_lora
from tests.conftest import tiny_llama


def test_loss_curve_matches_peft(peft):
    torch.manual_seed(0)
    ids = torch.randint(0, 300, (4, 24))
    labels = ids.clone()
    labels[:, 0] = -100  # position 0 predicts nothing
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    ours = tiny_llama()
    add_lora(ours, LoraConfig(r=4, alpha=8))
    with torch.no_grad():  # same starting factors (B random so the first step is not trivial)
        for name, layer in lora_layers(ours):
            peft_layer = pm.base_model.model.get_submodule(name)
            peft_layer.lora_B["default"].weight.normal_(std=0.02)
            layer.adapters["default"].lora_A.copy_(peft_layer.lora_A["default"].weight)
            layer.adapters["default"].lora_B.copy_(peft_layer.lora_B["default"].weight)
    curves = []
    for model, loss_fn in ((pm, lambda: pm(input_ids=ids, labels=ids).loss),
                           (ours, lambda: -labelled_logprobs(ours, ids, labels).mean())):
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        curve = []
        for _ in range(8):
            loss = loss_fn()
            loss.backward()
            opt.step()
            opt.zero_grad()
            curve.append(loss.item())
        curves.append(curve)
    assert abs(curves[0][0] - curves[1][0]) < 1e-5
    assert curves[0][-1] < curves[0][0] - 0.1  # it trained
    for a, b in zip(*curves):
        assert abs(a - b) < 1e-3

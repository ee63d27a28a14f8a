import torch
from torch import nn

from efftune.methods.lora import packing
from efftune.methods.lora.config import LoraConfig
from efftune.methods.lora.model import add_lora, set_active_adapters, set_trainable_adapters, unload_lora
from efftune.methods.lora.swiglu import unwrap_swiglu_mlps
from tests.conftest import randomize_lora, tiny_llama

IDS = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(1))


def linears(*outs, fan_in=6, dtype=torch.float64):
    torch.manual_seed(0)
    return [nn.Linear(fan_in, o, bias=False, dtype=dtype).requires_grad_(False) for o in outs]


def gate_up(mlp):
    return [mlp.gate_proj.base_layer.weight, mlp.up_proj.base_layer.weight]


def test_packed_weights_are_rows_of_one_matrix_with_spare_rows():
    layers = linears(5, 3)
    before = [layer.weight.clone() for layer in layers]
    spare = packing.pack_rows(layers, spare=4)
    assert spare is not None
    for layer, w in zip(layers, before):
        assert layer.weight.is_contiguous() and torch.equal(layer.weight, w)  # same values, new home
    full = packing.matrix([layer.weight for layer in layers], spare, 4)
    assert full.shape == (12, 6) and torch.equal(full[:8], torch.cat(before)) and not full[8:].any()
    assert packing.matrix([layer.weight for layer in layers], spare, 5) is None  # not that much room
    assert packing.matrix([layers[1].weight, layers[0].weight], spare, 4) is None  # not in that order
    packing.unpack(layers)
    assert packing.matrix([layer.weight for layer in layers], spare, 4) is None
    assert all(torch.equal(layer.weight, w) for layer, w in zip(layers, before))


def test_weights_that_merely_sit_together_are_never_taken_for_a_packing():
    flat = torch.arange(60, dtype=torch.float64)  # three weights in one buffer, not made by pack_rows
    w1, w2, w3 = flat[:18].view(3, 6), flat[18:36].view(3, 6), flat[36:].view(4, 6)
    assert packing.matrix([w1, w2], None, 4) is None
    assert packing.matrix([w1, w2], flat[:24].view(4, 6), 4) is None  # a token that is not after them
    x, extra = torch.randn(2, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    out = packing.rows_mm(x, [w1, w2], extra, None)
    torch.testing.assert_close(out, x @ torch.cat([w1, w2, extra]).t())
    assert torch.equal(w3, flat[36:].view(4, 6)) and torch.equal(flat, torch.arange(60, dtype=torch.float64))


def test_rows_ops_give_the_same_result_packed_or_not():
    layers = linears(5, 3)
    weights = [layer.weight.clone() for layer in layers]
    spare = packing.pack_rows(layers, spare=4)
    x, extra = torch.randn(7, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    d = torch.randn(7, 12, dtype=torch.float64)
    stacked = torch.cat(weights + [extra])
    packed = [layer.weight for layer in layers]
    for token in (spare, None):
        torch.testing.assert_close(packing.rows_mm(x, packed, extra, token), x @ stacked.t())
        torch.testing.assert_close(packing.rows_grad(d, packed, extra, token), d @ stacked)
    version = layers[0].weight._version
    packing.rows_mm(x, packed, extra * 2, spare)
    assert layers[0].weight._version == version  # writing the spare rows is not a change to a weight


def test_lora_packs_gate_and_up_and_state_dicts_do_not_change():
    m = tiny_llama(dtype=torch.float64)
    names = list(m.state_dict())
    add_lora(m, LoraConfig(r=4))
    mlp = m.model.layers[0].mlp
    assert mlp.gate_up_spare is not None and "gate_up_spare" not in str(list(m.state_dict()))
    assert packing.matrix(gate_up(mlp), mlp.gate_up_spare, 8) is not None
    add_lora(m, LoraConfig(r=6), adapter="wide")  # needs 12 spare rows: packed again
    assert packing.matrix(gate_up(mlp), mlp.gate_up_spare, 12) is not None
    m.float()  # a cast gives the weights new storage; the MLP packs them again
    assert gate_up(mlp)[0].dtype == torch.float32
    assert packing.matrix(gate_up(mlp), mlp.gate_up_spare, 12) is not None
    unload_lora(m)
    assert list(m.state_dict()) == names
    gate, up = m.model.layers[0].mlp.gate_proj.weight, m.model.layers[0].mlp.up_proj.weight
    assert gate.untyped_storage().data_ptr() != up.untyped_storage().data_ptr()  # save_pretrained-safe


def test_packed_mlp_trains_like_the_plain_one_across_interleaved_adapters():
    """Two forward passes through different adapters before one backward: each backward must use its
    own adapter's A factors, though both passes wrote theirs into the same spare rows."""
    def model():
        m = tiny_llama(dtype=torch.float64)
        add_lora(m, LoraConfig(r=4))
        add_lora(m, LoraConfig(r=2), adapter="b")
        set_trainable_adapters(m, ["default", "b"])
        randomize_lora(m)
        return m

    def loss(m):
        set_active_adapters(m, "default")
        first = m(input_ids=IDS).logits.square().mean()
        set_active_adapters(m, "b")
        return first + m(input_ids=IDS).logits.pow(3).mean()

    packed, plain = model(), model()
    unwrap_swiglu_mlps(plain)
    assert packing.matrix(gate_up(packed.model.layers[0].mlp), packed.model.layers[0].mlp.gate_up_spare, 8) is not None
    for m in (packed, plain):
        loss(m).backward()
    grads = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    assert any("mlp.gate_proj.adapters.b" in n for n in grads)
    assert any("mlp.gate_proj.adapters.default" in n for n in grads)
    for n, p in packed.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-12, rtol=1e-10, msg=n)


def test_checkpoints_save_packed_weights_as_tensors_of_their_own(tmp_path):
    from safetensors.torch import load_file, save_file

    from efftune.train.checkpoint import _saveable
    layers = linears(5, 3)
    packing.pack_rows(layers, spare=4)
    tensors = _saveable({"a": layers[0].weight, "b": layers[1].weight})
    assert tensors["a"].untyped_storage().data_ptr() != tensors["b"].untyped_storage().data_ptr()
    save_file(tensors, str(tmp_path / "w.safetensors"))
    loaded = load_file(str(tmp_path / "w.safetensors"))
    assert torch.equal(loaded["a"], layers[0].weight) and torch.equal(loaded["b"], layers[1].weight)


def test_loading_a_state_dict_by_assignment_packs_the_new_weights():
    m = tiny_llama(dtype=torch.float64)
    add_lora(m, LoraConfig(r=4))
    mlp = m.model.layers[0].mlp
    state = {k: v.clone() + 1 for k, v in m.state_dict().items()}
    m.load_state_dict(state, assign=True)
    full = packing.matrix(gate_up(mlp), mlp.gate_up_spare, 8)
    assert full is not None and torch.equal(full[:-8], torch.cat([state[
        "model.layers.0.mlp.gate_proj.base_layer.weight"], state["model.layers.0.mlp.up_proj.base_layer.weight"]]))

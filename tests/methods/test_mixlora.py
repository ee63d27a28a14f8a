"""MixLoRA: start at the base model, E=1/k=1 equals plain LoRA, the efficient block equals a
hand-written per-expert loop, gradients, aux loss, save/load, peft export, training."""
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from efftune.errors import AdapterError, ConfigError
from efftune.methods.lora.config import LoraConfig
from efftune.methods.lora.layer import lora_layers
from efftune.methods.lora.model import add_lora
from efftune.methods.mixlora import (ATTN_ADAPTER, MixLoraBlock, MixLoraConfig, add_mixlora, export_attention_peft,
                                     load_mixlora, mixlora_blocks, mixlora_routing, save_mixlora, unload_mixlora)
from efftune.moe.layer import collect_aux_losses


def tiny(dtype=torch.float64, vocab=128, seed=0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, attn_implementation="sdpa", initializer_range=0.2)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def ids(vocab=128, shape=(2, 12), seed=3):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def randomize(model, std=0.1, seed=1):
    """Non-zero B everywhere (experts and attention) and a livelier router."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and (name.endswith("lora_B") or "router" in name):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (std if "lora_B" in name else 1.0))


def small_cfg(**kw):
    return MixLoraConfig(**{"num_experts": 4, "top_k": 2, "r": 4, "alpha": 8.0, "attn_r": 4, "attn_alpha": 8.0, **kw})


def test_starts_at_base_model_and_only_adapters_train():
    m = tiny()
    x = ids()
    base = m(input_ids=x).logits
    names = add_mixlora(m, small_cfg())
    assert sum(isinstance(m.get_submodule(n), MixLoraBlock) for n in names) == 2
    assert len([n for n in names if "self_attn" in n]) == 8
    torch.testing.assert_close(m(input_ids=x).logits, base, rtol=0, atol=1e-12)
    randomize(m)
    m(input_ids=x).logits.sum().backward()
    trained = {n for n, p in m.named_parameters() if p.grad is not None}
    assert trained == {n for n, p in m.named_parameters() if p.requires_grad}
    assert all(".experts." in n or ".router." in n or ".adapters.mixlora." in n for n in trained)
    assert any(".router." in n for n in trained)


def test_one_expert_top1_equals_plain_lora_on_ffn():
    ffn = ["gate_proj", "up_proj", "down_proj"]
    mix, ref = tiny(), tiny()
    add_mixlora(mix, MixLoraConfig(num_experts=1, top_k=1, r=4, alpha=8.0, attn_targets=[]))
    add_lora(ref, LoraConfig(r=4, alpha=8.0, target_modules=ffn))
    randomize(ref)
    with torch.no_grad():
        for path, layer in lora_layers(ref):
            block_path, proj = path.rsplit(".", 1)
            expert = mix.get_submodule(block_path).experts[0][proj]
            expert.lora_A.copy_(layer.adapters["default"].lora_A)
            expert.lora_B.copy_(layer.adapters["default"].lora_B)
    x = ids()
    out_mix, out_ref = mix(input_ids=x).logits, ref(input_ids=x).logits
    torch.testing.assert_close(out_mix, out_ref, rtol=1e-10, atol=1e-10)
    assert (out_ref - tiny()(input_ids=x).logits).abs().max() > 1e-3  # the adapter does something
    out_mix.square().sum().backward()
    out_ref.square().sum().backward()
    for path, layer in lora_layers(ref):
        block_path, proj = path.rsplit(".", 1)
        expert = mix.get_submodule(block_path).experts[0][proj]
        for name in ("lora_A", "lora_B"):
            torch.testing.assert_close(getattr(expert, name).grad, getattr(layer.adapters["default"], name).grad,
                                       rtol=1e-9, atol=1e-10)


def naive_block(block: MixLoraBlock, x: torch.Tensor) -> torch.Tensor:
    """The definition: y = Σ_{e in top-k} w_e · D_e(act(G_e x) * U_e x), every expert on every token
    with its merged weights W + s·B@A, then masked by a dense (T, E) weight matrix."""
    mlp, flat = block.base_layer, x.reshape(-1, x.shape[-1])
    routing = block.router(flat)
    dense = torch.zeros(flat.shape[0], len(block.experts), dtype=flat.dtype)
    dense = dense.scatter_add(1, routing.expert_index, routing.weight.to(flat.dtype))
    y = 0
    for e, expert in enumerate(block.experts):
        def weight(p):
            w = getattr(mlp, p).weight
            if p in expert:
                w = w + expert[p].scaling * expert[p].lora_B @ expert[p].lora_A
            return w
        h = mlp.act_fn(F.linear(flat, weight("gate_proj"))) * F.linear(flat, weight("up_proj"))
        y = y + dense[:, e:e + 1] * F.linear(h, weight("down_proj"))
    return y.reshape(x.shape)


@pytest.mark.parametrize("dense", [False, True], ids=["sorted", "dense"])
@pytest.mark.parametrize("targets", [["gate_proj", "up_proj", "down_proj"], ["up_proj", "down_proj"], ["gate_proj"]])
def test_efficient_block_equals_naive_per_expert_loop(targets, dense):
    # both execution forms (sorted by expert: CPU default; dense masked: CUDA default)
    m = tiny()
    add_mixlora(m, small_cfg(ffn_targets=targets, attn_targets=[]))
    randomize(m, std=0.3)
    block = m.model.layers[0].mlp
    block.dense = dense
    x = torch.randn(3, 7, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    probe = torch.randn(3, 7, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    params = [p for p in block.parameters() if p.requires_grad]

    def run(fn):
        xi = x.clone().requires_grad_(True)
        y = fn(xi)
        grads = torch.autograd.grad((y * probe).sum(), [xi, *params], allow_unused=True)
        return y.detach(), grads

    y_eff, g_eff = run(block)
    y_ref, g_ref = run(lambda xi: naive_block(block, xi))
    torch.testing.assert_close(y_eff, y_ref, rtol=1e-10, atol=1e-10)
    load = block.last_routing.expert_load
    assert load.sum() == 21 * 2 and (load > 0).sum() >= 3  # k=2 slots per token, spread over experts
    for a, b in zip(g_eff, g_ref):
        if a is None or b is None:
            assert (a is None or not a.any()) and (b is None or not b.any())
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert g_eff[1].abs().sum() > 0  # the router learns through the weights


def test_dense_config_reaches_every_block():
    m = tiny()
    add_mixlora(m, small_cfg(dense=True))
    assert [b.dense for _, b in mixlora_blocks(m)] == [True, True]


def test_aux_loss_collected_and_routing_inspectable():
    m = tiny()
    add_mixlora(m, small_cfg())
    randomize(m)
    assert collect_aux_losses(m) == (None, {})
    seen = {}  # each block's input: its router's tokens
    for name, block in mixlora_blocks(m):
        block.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(name, args[0].detach()))
    m(input_ids=ids(shape=(2, 9)))
    aux, stats = collect_aux_losses(m)
    assert aux.requires_grad and stats["dropped_fraction"] == 0
    # by hand (float64, plain Python): Switch's α·E·Σ f_i P_i over the top-2 picks, per block
    from tests.moe.test_padding import hand_entropy, hand_switch_balance
    balance, entropy = [], []
    for name, block in mixlora_blocks(m):
        w = block.router.W_r.weight.detach().tolist()
        logits = [[sum(a * b for a, b in zip(t, w[e])) for e in range(4)] for t in seen[name].reshape(-1, 64).tolist()]
        balance.append(hand_switch_balance(logits, 2, 0.01))
        entropy.append(hand_entropy(logits))
    assert aux.item() == pytest.approx(sum(balance), rel=1e-9)  # z_loss_coef is 0 by default
    assert stats["load_balancing_loss"] == pytest.approx(sum(balance) / 2, rel=1e-9)
    assert stats["router_entropy"] == pytest.approx(sum(entropy) / 2, rel=1e-9) and stats["z_loss"] == 0
    routing = mixlora_routing(m)
    assert list(routing) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    r = routing["model.layers.0.mlp"]
    assert r.expert_index.shape == (18, 2) and r.probs.shape == (18, 4)
    torch.testing.assert_close(r.weight.sum(-1), torch.ones(18, dtype=r.weight.dtype))


@pytest.mark.parametrize("dense", [False, True], ids=["sorted", "dense"])
def test_mixed_precision_and_autocast(dense):
    # bf16 base: fp32 master adapter weights, runs without autocast
    m = tiny(dtype=torch.bfloat16)
    add_mixlora(m, small_cfg())
    for _, b in mixlora_blocks(m):
        b.dense = dense
    trainable = [p for p in m.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    randomize(m)
    out = m(input_ids=ids()).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # fp32 model under bf16 autocast (what the training loop does): fp32 gradients, close to fp32
    m32 = tiny(dtype=torch.float32)
    add_mixlora(m32, small_cfg())
    for _, b in mixlora_blocks(m32):
        b.dense = dense
    randomize(m32)
    ref = m32(input_ids=ids()).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m32(input_ids=ids()).logits
    out.float().logsumexp(-1).sum().backward()
    grads = {n: p.grad for n, p in m32.named_parameters() if p.requires_grad and p.grad is not None}
    assert any(".router." in n for n in grads) and any(".experts." in n for n in grads)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_save_load_round_trip(tmp_path):
    m = tiny()
    cfg = small_cfg()
    add_mixlora(m, cfg)
    randomize(m)
    x = ids()
    want = m(input_ids=x).logits
    save_mixlora(m, tmp_path / "a", cfg, {"steps": 3})
    saved = json.loads((tmp_path / "a" / "mixlora_config.json").read_text())
    assert saved["method"] == "mixlora" and saved["num_experts"] == 4 and saved["efftune"] == {"steps": 3}
    fresh = tiny()
    assert load_mixlora(fresh, tmp_path / "a") == cfg
    assert torch.equal(fresh(input_ids=x).logits, want)


def test_bad_files_raise_adapter_error(tmp_path):
    from safetensors.torch import load_file, save_file
    m = tiny()
    add_mixlora(m, small_cfg())
    save_mixlora(m, tmp_path / "a", small_cfg())
    weights = tmp_path / "a" / "mixlora_model.safetensors"
    tensors = load_file(str(weights))
    key = "model.layers.1.mlp.experts.2.up_proj.lora_A"
    cases = {
        "lacks": {k: v for k, v in tensors.items() if k != key},
        "shape": {**tensors, key: torch.zeros(5, 64, dtype=torch.float64)},
        "fits nothing": {**tensors, "model.layers.9.mlp.router.W_r.weight": torch.zeros(4, 64)},
    }
    for words, state in cases.items():
        save_file(state, str(weights))
        fresh = tiny()
        with pytest.raises(AdapterError, match=words) as exc:
            load_mixlora(fresh, tmp_path / "a")
        assert "mixlora_model.safetensors" in str(exc.value)
        assert not list(mixlora_blocks(fresh)) and not list(lora_layers(fresh))  # left as it was
    cfg_file = tmp_path / "a" / "mixlora_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "top_k": 9}))
    with pytest.raises(AdapterError, match="mixlora_config.json.*top_k"):
        load_mixlora(tiny(), tmp_path / "a")
    cfg_file.write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_mixlora(tiny(), tmp_path / "a")
    with pytest.raises(AdapterError, match="does not exist"):
        load_mixlora(tiny(), tmp_path / "nowhere")


def test_config_errors_name_the_field():
    for kw, field in [({"top_k": 9}, "mixlora.top_k"), ({"r": 0}, "mixlora.r"), ({"dropout": 1.0}, "mixlora.dropout"),
                      ({"ffn_targets": ["q_proj"]}, "mixlora.ffn_targets"),
                      ({"attn_targets": ["q_proj", "up_proj"]}, "mixlora.attn_targets"),
                      ({"aux_loss_coef": -1.0}, "mixlora.aux_loss_coef")]:
        with pytest.raises(ConfigError, match=field):
            MixLoraConfig(**kw)


def test_peft_loads_exported_attention_adapter(tmp_path, peft):
    m = tiny()
    add_mixlora(m, small_cfg())
    randomize(m)
    export_attention_peft(m, tmp_path / "peft")
    unload_mixlora(m, keep_attention=True)  # our model with the MixLoRA FFN removed
    assert not list(mixlora_blocks(m)) and len(list(lora_layers(m))) == 8
    x = ids()
    ours = m(input_ids=x).logits
    theirs = peft.PeftModel.from_pretrained(tiny(), str(tmp_path / "peft")).eval()(input_ids=x).logits
    assert (ours - tiny()(input_ids=x).logits).abs().max() > 1e-3
    torch.testing.assert_close(theirs, ours, rtol=1e-10, atol=1e-10)
    unload_mixlora(m)
    assert not list(lora_layers(m)) and ATTN_ADAPTER not in str(dict(m.named_parameters()).keys())


def test_training_lowers_loss_and_writes_routing(tokenizer, tmp_path):
    from efftune.data import Formatter, MultipleChoice
    from efftune.train.loop import TrainConfig, train
    prompts = ["Q: Is the sky blue?\nA: ", "Q: Is grass red?\nA: ", "Take 3 steps forward.\nA: ",
               "Always face forward.\nA: ", "0123456789 =\nA: ", "The quick brown fox\nA: "]
    f = Formatter(tokenizer)
    seqs = [f.encode(MultipleChoice(p, ("yes", "no"), i % 2)) for i, p in enumerate(prompts * 2)]
    m = tiny(dtype=torch.float32, vocab=len(tokenizer))
    add_mixlora(m, small_cfg())
    train(m, seqs, TrainConfig(steps=15, batch_size=4, lr=1e-2, warmup_steps=2, save_every=0, eval_every=0),
          tmp_path, pad_id=tokenizer.pad_token_id)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < 0.5 * losses[0]
    assert all(r["load_balancing_loss"] > 0 for r in rows if "loss" in r)
    load = json.loads((tmp_path / "routing.json").read_text())["expert_load"]
    assert len(load) == 2 and all(len(row) == 4 for row in load)
    assert (tmp_path / "routing.png").is_file()

"""Expert LoRA on fused 3-D expert weights, the grouped expert path and the HF router aux loss
(CPU, tiny random-init Qwen3-MoE / OLMoE / Mixtral, float64 where values are compared)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from efftune.errors import AdapterError, ConfigError
from efftune.methods.expert_lora import (ExpertLora, ExpertLoraConfig, add_expert_lora, export_peft, load_expert_lora,
                                         save_expert_lora, unload_expert_lora)
from efftune.moe.experts import dispatch, grouped_linear, use_grouped_experts
from efftune.moe.router_tap import hf_router_aux_loss
from efftune.train.compile import partitioner

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def tiny_moe(kind: str = "qwen3", experts: int = 8, seed: int = 0, dtype=torch.float64, vocab: int = 64,
             intermediate: int = 16) -> nn.Module:
    import transformers as t
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=vocab, num_experts_per_tok=2, max_position_embeddings=128, initializer_range=0.2,
                  router_aux_loss_coef=0.01, tie_word_embeddings=False)
    if kind == "qwen3":
        cfg = t.Qwen3MoeConfig(num_experts=experts, moe_intermediate_size=intermediate, intermediate_size=64, head_dim=8,
                               norm_topk_prob=True, **common)
        cls = t.Qwen3MoeForCausalLM
    elif kind == "olmoe":
        cfg = t.OlmoeConfig(num_experts=experts, intermediate_size=16, **common)
        cls = t.OlmoeForCausalLM
    else:
        cfg = t.MixtralConfig(num_local_experts=experts, intermediate_size=16, **common)
        cls = t.MixtralForCausalLM
    cfg._experts_implementation = "eager"  # transformers' own per-expert loop: the reference
    torch.manual_seed(seed)
    model = cls(cfg).to(dtype).eval()
    with torch.no_grad():  # router init is zeros in some models: make routing decisive
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight")):
                p.normal_(std=1.0)
    return model


def ids(batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))


def randomize_b(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def routed_inputs(T: int = 10, k: int = 2, experts: int = 8, seed: int = 5):
    """Hidden states (T, 32), top-k expert ids and routing weights (both trainable inputs) and an
    output gradient, float64."""
    torch.manual_seed(seed)
    x = torch.randn(T, 32, dtype=torch.float64, requires_grad=True)
    idx = torch.stack([torch.randperm(experts)[:k] for _ in range(T)])
    w = torch.rand(T, k, dtype=torch.float64, requires_grad=True)
    return x, idx, w, torch.randn(T, 32, dtype=torch.float64)


def naive_experts(base: nn.Module, x, idx, w, lora: dict, experts) -> torch.Tensor:
    """Per (token, slot): the expert's explicit W_e + s·B_e A_e, one matrix at a time."""
    out = torch.zeros_like(x)
    slot_of = {e: i for i, e in enumerate(experts)}
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            ws = {}
            for name in ("gate_up_proj", "down_proj"):
                W = getattr(base, name)[e]
                if name in lora and e in slot_of:
                    f = lora[name]
                    W = W + f.scaling * f.lora_B[slot_of[e]] @ f.lora_A[slot_of[e]]
                ws[name] = W
            gate, up = (ws["gate_up_proj"] @ x[t]).chunk(2)
            out[t] = out[t] + w[t, j] * (ws["down_proj"] @ (base.act_fn(gate) * up))
    return out


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="expert_lora.r"):
        ExpertLoraConfig(r=0)
    with pytest.raises(ConfigError, match="expert_lora.alpha"):
        ExpertLoraConfig(alpha=-1)
    with pytest.raises(ConfigError, match="expert_lora.targets"):
        ExpertLoraConfig(targets=["up_proj"])
    with pytest.raises(ConfigError, match="expert_lora.experts"):
        ExpertLoraConfig(experts=[1, 1])
    with pytest.raises(ConfigError, match="expert_lora.impl"):
        ExpertLoraConfig(impl="fast")
    with pytest.raises(ConfigError, match="expert id 9"):
        add_expert_lora(tiny_moe(), ExpertLoraConfig(experts=[9]))


def test_dispatch_groups_rows_by_expert_with_subset_last():
    idx = torch.tensor([[3, 0], [1, 3], [0, 2]])
    d = dispatch(idx, 4, torch.tensor([False, False, False, True]))
    experts = idx.reshape(-1)[d.order]
    assert experts.tolist() == [0, 0, 1, 2, 3, 3] and d.split == 4
    assert d.counts.tolist() == [2, 1, 1, 2] and d.picked.tolist() == [0, 0, 0, 2]
    assert torch.equal(d.order[d.inverse], torch.arange(6))


def test_grouped_mm_and_loop_paths_agree():
    """torch._grouped_mm (forward only on CPU) and the per-expert loop read the same layout."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch has no _grouped_mm")
    torch.manual_seed(0)
    x, w = torch.randn(20, 32), torch.randn(4, 48, 32)
    counts = torch.tensor([5, 0, 7, 8])
    try:
        fast = torch._grouped_mm(x, w.transpose(-2, -1), offs=counts.cumsum(0).int())
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"no CPU kernel: {exc}")
    torch.testing.assert_close(grouped_linear(x, w, counts, "loop"), fast, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["qwen3", "olmoe", "mixtral"])
def test_zero_b_and_grouped_base_path_equal_the_model(kind):
    model = tiny_moe(kind)
    x = ids()
    with torch.no_grad():
        ref = model(x).logits
        use_grouped_experts(model)
        torch.testing.assert_close(model(x).logits, ref, rtol=1e-10, atol=1e-10)
    model = tiny_moe(kind)
    add_expert_lora(model, ExpertLoraConfig(r=4, target_modules=ATTN))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("targets,experts", [(["gate_up_proj", "down_proj"], None), (["down_proj"], [1, 5, 6]),
                                             (["gate_up_proj"], [0])])
def test_grouped_lora_equals_naive_per_expert_loop(targets, experts):
    """Values and gradients (input, A, B) against explicit W_e + s·B_e A_e, float64."""
    base = tiny_moe().model.layers[0].mlp.experts
    layer = ExpertLora(base, r=3, scaling=1.7, targets=targets, experts=experts)
    randomize_b(layer)
    x, idx, w, dy = routed_inputs()
    got = layer(x, idx, w)
    params = [x, w] + [p for f in layer.lora.values() for p in (f.lora_A, f.lora_B)]
    grads = torch.autograd.grad((got * dy).sum(), params)
    ref = naive_experts(base, x, idx, w, dict(layer.lora), experts or list(range(8)))
    ref_grads = torch.autograd.grad((ref * dy).sum(), params)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10)


def test_merge_matches_unmerged_and_the_hf_forward():
    """ExpertLora's output equals transformers' own experts forward on merged W + s·B A."""
    model = tiny_moe("olmoe")
    add_expert_lora(model, ExpertLoraConfig(r=4, experts=[2, 3, 7]))
    randomize_b(model)
    x = ids()
    with torch.no_grad():
        lora_out = model(x).logits
        unload_expert_lora(model, merge=True)  # base modules back, updates folded in
        torch.testing.assert_close(model(x).logits, lora_out, rtol=1e-10, atol=1e-10)


def test_only_the_intended_parameters_get_gradients():
    model = tiny_moe()
    add_expert_lora(model, ExpertLoraConfig(r=4, targets=["down_proj"], experts=[0, 4], target_modules=ATTN))
    randomize_b(model)
    model(ids()).logits.sum().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in trained)
    assert any(".mlp.experts.lora.down_proj.lora_A" in n for n in trained)
    assert not any("gate_up_proj.lora" in n for n in dict(model.named_parameters()))  # not adapted: absent
    layer = model.model.layers[0].mlp.experts
    assert layer.lora["down_proj"].lora_A.shape == (2, 4, 16)  # factors of the 2 adapted experts only
    assert layer.base_layer.gate_up_proj.grad is None and layer.base_layer.down_proj.grad is None


def adapted_with_logits(cfg: ExpertLoraConfig):
    """A tiny MoE with expert LoRA (random B, so the adapter matters), an input and its logits."""
    model = tiny_moe()
    add_expert_lora(model, cfg)
    randomize_b(model)
    x = ids()
    with torch.no_grad():
        return model, x, model(x).logits


def test_save_load_round_trip_and_errors(tmp_path):
    cfg = ExpertLoraConfig(r=4, experts=[1, 2], target_modules=ATTN)
    model, x, want = adapted_with_logits(cfg)
    save_expert_lora(model, tmp_path / "a", cfg, metadata={"steps": 3})
    fresh = tiny_moe()
    loaded = load_expert_lora(fresh, tmp_path / "a")
    assert loaded.r == 4 and loaded.target_modules == ATTN
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, want, rtol=0, atol=0)
    # a model with 4 experts per layer: factor shapes still fit, but expert ids 1, 2 exist; change r
    bad_cfg = json.loads((tmp_path / "a" / "expert_lora_config.json").read_text())
    bad_cfg["r"] = 5
    (tmp_path / "a" / "expert_lora_config.json").write_text(json.dumps(bad_cfg))
    with pytest.raises(AdapterError, match=r"expert_lora_model.safetensors.*lora_A.*shape"):
        load_expert_lora(tiny_moe(), tmp_path / "a")
    with pytest.raises(AdapterError, match="no expert_lora_config.json"):
        load_expert_lora(tiny_moe(), tmp_path)


def test_peft_export_loads_in_peft_with_equal_logits(tmp_path, peft):
    cfg = ExpertLoraConfig(r=4, alpha=8, experts=[0, 3, 5], target_modules=ATTN)
    model, x, want = adapted_with_logits(cfg)
    export_peft(model, tmp_path / "p", cfg)
    peft_model = peft.PeftModel.from_pretrained(tiny_moe(), str(tmp_path / "p"))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=x).logits, want, rtol=1e-9, atol=1e-9)


def test_peft_export_of_one_target(tmp_path, peft):
    cfg = ExpertLoraConfig(r=2, alpha=2, targets=["down_proj"])
    model = tiny_moe("mixtral")
    add_expert_lora(model, cfg)
    randomize_b(model)
    x = ids()
    with torch.no_grad():
        want = model(x).logits
    export_peft(model, tmp_path / "p", cfg)
    peft_model = peft.PeftModel.from_pretrained(tiny_moe("mixtral"), str(tmp_path / "p"))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=x).logits, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["qwen3", "mixtral"])
def test_router_aux_loss_equals_transformers(kind):
    model = tiny_moe(kind)
    add_expert_lora(model, ExpertLoraConfig(r=2))
    x = ids()
    mask = torch.ones_like(x)
    mask[1, :4] = 0
    out = model(x, attention_mask=mask, labels=x, output_router_logits=True)
    ours = hf_router_aux_loss(model, attention_mask=mask)
    torch.testing.assert_close(ours, model.config.router_aux_loss_coef * out.aux_loss, rtol=1e-6, atol=1e-9)
    out = model(x, output_router_logits=True)
    torch.testing.assert_close(hf_router_aux_loss(model), model.config.router_aux_loss_coef * out.aux_loss,
                               rtol=1e-6, atol=1e-9)
    assert ours.requires_grad  # it trains the hidden states (and a router, if one trains)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
@pytest.mark.parametrize("experts", [None, [0, 3, 5]])
def test_grouped_mm_path_equals_loop_path(experts, device):
    """The two expert paths agree in bf16 (torch._grouped_mm: CUDA's kernel, or its CPU one):
    outputs and gradients (x, weights, A, B), the base frozen as add_expert_lora leaves it."""
    base = tiny_moe(dtype=torch.bfloat16).model.layers[0].mlp.experts.to(device).requires_grad_(False)
    results = []
    for impl in ("grouped_mm", "loop"):
        torch.manual_seed(0)
        layer = ExpertLora(base, r=8, scaling=2.0, experts=experts, impl=impl).to(device)
        randomize_b(layer)
        T = 300
        x = torch.randn(T, 32, device=device, dtype=torch.bfloat16, requires_grad=True)
        idx = torch.stack([torch.randperm(8)[:2] for _ in range(T)]).to(device)
        idx[:40] = torch.tensor([1, 2])  # uneven loads, expert 7 maybe empty
        w = torch.rand(T, 2, device=device, requires_grad=True)
        out = layer(x, idx, w)
        params = [x, w] + [p for f in layer.lora.values() for p in (f.lora_A, f.lora_B)]
        results.append([out] + list(torch.autograd.grad(out.float().square().sum(), params)))
    for a, b in zip(*results):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.float().abs().max().item())


def test_training_loop_adds_the_models_own_load_balancing_loss(tokenizer, tmp_path):
    # the loop's loss path runs the body only; the RouterTap must still bring the aux loss in
    from efftune.data import Formatter, MultipleChoice
    from efftune.train.loop import TrainConfig, train
    model = tiny_moe(dtype=torch.float32, vocab=len(tokenizer))
    model.config.router_aux_loss_coef = 0.5
    add_expert_lora(model, ExpertLoraConfig(r=2))
    f = Formatter(tokenizer)
    seqs = [f.encode(MultipleChoice(f"Question {i}?\nA: ", ("yes", "no"), i % 2)) for i in range(8)]
    train(model, seqs, TrainConfig(steps=2, batch_size=4, lr=1e-2, warmup_steps=1, eval_every=0), tmp_path,
          pad_id=tokenizer.pad_token_id)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["load_balancing_loss"] > 0 and r["router_entropy"] > 0 for r in rows)
    loads = json.loads((tmp_path / "routing.json").read_text())["expert_load"]
    assert len(loads) == 2 and len(loads[0]) == 8 and (tmp_path / "routing.png").exists()  # layers × experts


def test_silu_mul_weighted_gradient_eager_and_compiled_equal_autograd():
    from efftune.moe.experts import _SiluMul
    gate_up = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.rand(5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 4, dtype=torch.float64)
    gate, up = gate_up.chunk(2, dim=-1)
    ref = F.silu(gate) * up * w.unsqueeze(-1)
    expected = torch.autograd.grad(ref, (gate_up, w), g)
    compiled_fn = torch.compile(lambda t, v: _SiluMul.apply(t, v), fullgraph=True, backend="aot_eager")
    for y in (_SiluMul.apply(gate_up, w), compiled_fn(gate_up, w)):
        torch.testing.assert_close(y, ref)
        for a, b in zip(torch.autograd.grad(y, (gate_up, w), g), expected):
            torch.testing.assert_close(a, b)


def test_dispatch_counts_match_bincount():
    idx = torch.randint(0, 5, (40, 3))  # expert 5 gets no row
    for adapted in (None, torch.tensor([True, False, True, False, False, True])):
        d = dispatch(idx, 6, adapted)
        assert torch.equal(d.counts, torch.bincount(idx.reshape(-1), minlength=6))


def test_sum_of_slots_and_permuted_weights_eager_and_compiled_equal_autograd():
    from efftune.moe.experts import _Permute, _SumSlots
    torch.manual_seed(0)
    d = dispatch(torch.randint(0, 4, (6, 2)), 4)
    out = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(6, 2, dtype=torch.float64, requires_grad=True)
    g, gw = torch.randn(6, 5, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    ref = out[d.inverse].view(6, 2, 5).sum(1)
    ref_w = weights.reshape(-1)[d.order]
    expected = torch.autograd.grad((ref, ref_w), (out, weights), (g, gw))

    def both(o, w):
        return _SumSlots.apply(o, d.order, d.inverse, 2), _Permute.apply(w.reshape(-1), d.order, d.inverse)
    for y, yw in (both(out, weights), torch.compile(both, fullgraph=True, backend="aot_eager")(out, weights)):
        torch.testing.assert_close(y, ref)
        torch.testing.assert_close(yw, ref_w)
        for a, b in zip(torch.autograd.grad((y, yw), (out, weights), (g, gw)), expected):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("subset", [False, True])
def test_gathered_grouped_linear_equals_grouped_linear_of_the_gathered_rows(subset):
    """Value and gradients (source, weight) of the op that gathers again in backward, eager and
    compiled, against grouped_linear on the gathered rows (float64); a subset of rows scatter-adds."""
    from efftune.moe.experts import gathered_grouped_linear
    torch.manual_seed(0)
    T, k, E = 7, 3, 4
    d = dispatch(torch.stack([torch.randperm(E)[:k] for _ in range(T)]), E)
    start = 5 if subset else 0
    rows = d.order[start:] // k
    counts = d.counts
    if subset:  # the rows from `start` on, grouped as the dispatch groups them
        counts = torch.bincount(torch.repeat_interleave(torch.arange(E), d.counts)[start:], minlength=E)
    source = torch.randn(T, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(E, 5, 6, dtype=torch.float64, requires_grad=True)
    g = torch.randn(rows.shape[0], 5, dtype=torch.float64)
    ref = grouped_linear(source[rows], weight, counts)
    expected = torch.autograd.grad(ref, (source, weight), g)
    inverse = None if subset else d.inverse

    def op(s, w):
        return gathered_grouped_linear(s, rows, inverse, k, w, counts, "auto")
    for y in (op(source, weight), torch.compile(op, backend="aot_eager")(source, weight)):
        torch.testing.assert_close(y, ref)
        for a, b in zip(torch.autograd.grad(y, (source, weight), g), expected):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("compiled", [False, True])
def test_the_expert_path_keeps_no_per_slot_copy_of_the_tokens_for_backward(compiled):
    """Neither the gathered input rows (S = T·k of them, which expert LoRA's A of gate_up reads), nor
    the activation (S, I) that down's A reads, nor the (T, k, H) expert outputs (which weighting after
    down_proj needed) are kept for backward, eager or compiled by Inductor with efftune's partition
    (bf16 through torch's CPU grouped GEMM, the graph CUDA runs)."""
    torch.manual_seed(0)
    base = tiny_moe(dtype=torch.bfloat16, intermediate=24).model.layers[0].mlp.experts  # 2I = 48 != H
    base.requires_grad_(False)  # as add_expert_lora freezes it
    layer = ExpertLora(base, r=8, scaling=2.0, impl="grouped_mm")  # r = 8: the CPU kernel takes rows of 16 bytes
    T, k, H = 64, 2, 32
    x = torch.randn(T, H, dtype=torch.bfloat16, requires_grad=True)
    idx = torch.stack([torch.randperm(8)[:k] for _ in range(T)])
    w = torch.rand(T, k, dtype=torch.bfloat16, requires_grad=True)
    run = torch.compile(layer) if compiled else layer
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t
    with partitioner(None):  # efftune's lean partition, as train() compiles
        run(x, idx, w)  # compiles outside the hooks
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = run(x, idx, w)
    assert shapes and (T * k, H) not in shapes and (T, k, H) not in shapes, str(shapes)
    assert (T * k, 24) not in shapes, str(shapes)  # nor the activation down_proj's A reads (S, I)
    y.float().square().sum().backward()  # and backward runs from what was kept
    assert x.grad is not None and w.grad is not None and layer.lora["gate_up_proj"].lora_A.grad is not None

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from efftune.data.layout import Row, collate
from efftune.errors import AdapterError, ConfigError, EfftuneError
from efftune.forward.logprobs import target_logprobs
from efftune.methods.prefix_tuning import (PrefixTuningBody, PrefixTuningConfig, _cache_argument, _output_cache,
                                           _vocab_tokens, add_prefix_tuning, fold_prefix_tuning, load_prefix_tuning,
                                           prefix_body, remove_prefix_tuning, save_prefix_tuning, without_prefixes)
from efftune.train.loop import enable_activation_checkpointing

P, V = 5, 128
IDS = torch.randint(3, V, (2, 7), generator=torch.Generator().manual_seed(0))
WIDTH = 2 * 2 * 2 * 16  # layers · (key, value) · kv_heads · head_dim


def llama(attn: str = "sdpa") -> LlamaForCausalLM:
    """Same random weights for every call (and either attention implementation)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, attn_implementation=attn, initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval()


def prefixed(projection=False, init="random", attn="sdpa", seed=1) -> LlamaForCausalLM:
    m = llama(attn)
    torch.manual_seed(seed)
    add_prefix_tuning(m, PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=projection, init=init))
    if init == "random":  # bigger than the init's, so that a wrong layout or position shows
        with torch.no_grad():
            body = prefix_body(m)
            (body.prefix if body.folded else body.embedding).normal_(0, 1.0)
    return m


def logits(m, ids=IDS, **kw):
    with torch.no_grad():
        return m(input_ids=ids, **kw).logits


def peft_copy(table: torch.Tensor, peft):
    """peft's prefix-tuned model of the same base, its table set to `table`."""
    pm = peft.get_peft_model(llama(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.copy_(table)
    return pm.eval()


def test_config_errors_name_the_field():
    for kwargs, field in [({"num_virtual_tokens": 0}, "num_virtual_tokens"), ({"init": "text"}, "init"),
                          ({"prefix_projection": "yes"}, "prefix_projection"),
                          ({"projection_hidden_size": -3}, "projection_hidden_size")]:
        with pytest.raises(ConfigError, match=f"prefix_tuning.{field}"):
            PrefixTuningConfig(**kwargs)


@pytest.mark.parametrize("projection", [False, True])
def test_changes_output_and_only_prefix_trains(projection):
    """Prefix tuning does not start at the base model: outputs change (finitely) from the init on."""
    base = logits(llama())
    m = llama()
    assert add_prefix_tuning(m, PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=projection)) == ["model"]
    assert isinstance(m.model, PrefixTuningBody) and m.get_input_embeddings() is m.model.base_layer.embed_tokens
    out = logits(m)
    assert torch.isfinite(out).all() and not torch.allclose(out, base, atol=1e-3)
    m.train()
    hidden = m.model(input_ids=IDS, position_ids=torch.arange(7)[None], attention_mask=None,
                     use_cache=False).last_hidden_state
    hidden.sum().backward()
    own = {"model.prefix"} if not projection else \
        {"model.embedding"} | {f"model.transform.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    for name, p in m.named_parameters():
        assert p.requires_grad == (name in own), name
        assert (p.grad is not None) == (name in own), name
    with pytest.raises(EfftuneError, match="already has prefixes"):
        add_prefix_tuning(m)
    remove_prefix_tuning(m)
    assert torch.equal(logits(m.eval()), base)


def test_without_prefixes_runs_the_base_and_puts_them_back():
    """The bypass a run scores its "before" numbers with: the base model's logits exactly inside, the
    prefixed model's again after (an error inside too), the wrapper and its table untouched."""
    base, m = logits(llama()), prefixed(projection=True)
    body, prefixed_out = m.model, logits(m)
    with without_prefixes(m):
        assert torch.equal(logits(m), base) and m.model is body.base_layer
    assert m.model is body and torch.equal(logits(m), prefixed_out)
    with pytest.raises(RuntimeError, match="inside"), without_prefixes(m):
        raise RuntimeError("inside")
    assert m.model is body and torch.equal(logits(m), prefixed_out)


def test_vocab_init_is_the_tokens_as_a_text():
    """'vocab' prefixes are the keys/values of P sampled tokens, so the prefixed model reads `ids`
    exactly as the base model reads those tokens followed by `ids`: checks layout and positions."""
    m = llama()
    torch.manual_seed(3)
    add_prefix_tuning(m, PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=False, init="vocab"))
    torch.manual_seed(3)
    tokens = _vocab_tokens(m.model.base_layer, P, None)
    expect = logits(llama(), torch.cat([tokens.expand(2, -1), IDS], 1))[:, P:]
    torch.testing.assert_close(logits(m), expect, atol=1e-5, rtol=1e-5)


def test_fold_keeps_outputs():
    m = prefixed(projection=True)
    before = logits(m)
    table = prefix_body(m).table().detach().clone()
    fold_prefix_tuning(m)
    body = prefix_body(m)
    assert body.folded and not hasattr(body, "transform") and body.prefix.requires_grad
    assert torch.equal(body.prefix, table) and body.prefix.shape == (P, WIDTH)
    torch.testing.assert_close(logits(m), before, atol=1e-6, rtol=1e-6)


def saved_prefix(directory) -> LlamaForCausalLM:
    """A prefix-tuned model (with the projection) whose adapter is saved to `directory`."""
    m = prefixed(projection=True)
    save_prefix_tuning(m, directory, PrefixTuningConfig(num_virtual_tokens=P), {"tasks": ["t"]})
    return m


def test_save_load_round_trip(tmp_path):
    m = saved_prefix(tmp_path / "a")
    assert not prefix_body(m).folded  # saving folds into the file only
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PREFIX_TUNING" and cfg["prefix_projection"] is False
    assert (cfg["num_virtual_tokens"], cfg["num_layers"], cfg["num_attention_heads"], cfg["token_dim"]) == (P, 2, 2, 32)
    assert cfg["efftune"]["tasks"] == ["t"] and cfg["efftune"]["prefix_tuning"]["prefix_projection"] is True
    assert list(load_file(str(tmp_path / "a" / "adapter_model.safetensors"))) == ["prompt_embeddings"]

    ours = llama()
    assert load_prefix_tuning(ours, tmp_path / "a").num_virtual_tokens == P
    torch.testing.assert_close(logits(ours), logits(m), atol=1e-6, rtol=1e-6)


def test_peft_loads_ours(tmp_path, peft):
    m = saved_prefix(tmp_path / "a")
    ours = llama()
    load_prefix_tuning(ours, tmp_path / "a")
    torch.testing.assert_close(logits(ours), logits(m), atol=1e-6, rtol=1e-6)
    pm = peft.PeftModel.from_pretrained(llama(), str(tmp_path / "a")).eval()
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    for kw in ({}, {"attention_mask": mask}, {"attention_mask": mask, "position_ids": pos}):
        a, b = logits(ours, **kw), logits(pm, **kw)
        torch.testing.assert_close(a[mask.bool()], b[mask.bool()], atol=1e-5, rtol=1e-5)


def test_we_load_what_peft_saves(tmp_path, peft):
    pm = peft.get_peft_model(llama(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                                              prefix_projection=True, encoder_hidden_size=24))
    torch.manual_seed(5)
    with torch.no_grad():
        for p in pm.prompt_encoder["default"].parameters():
            p.normal_(0, 0.5)
    pm.eval()
    pm.save_pretrained(str(tmp_path / "p"))
    ours = llama()
    load_prefix_tuning(ours, tmp_path / "p")
    torch.testing.assert_close(logits(ours), logits(pm), atol=1e-5, rtol=1e-5)


def peft_greedy(pm, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding by peft's uncached forward over the whole sequence at every step, with the
    position ids `generate` gives left-padded rows. (Not peft's `generate`: peft 0.21 hands its
    prefix to the model as `past_key_values` while transformers 5.24+ generate passes `cache`, so
    from the second token on peft's own generate drops its prefix.)"""
    for _ in range(new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        nxt = pm(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


def test_greedy_generate_matches_peft(peft):
    m = prefixed()
    pm = peft_copy(prefix_body(m).prefix, peft)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0
    with torch.no_grad():
        ours = m.generate(input_ids=IDS, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(ours, peft_greedy(pm, IDS, mask, 8))
        # and the cached steps agree with one uncached pass over the result (row 0: no padding)
        full = m(input_ids=ours[:1], use_cache=False).logits[0, 6:-1].argmax(-1)
    assert torch.equal(full, ours[0, 7:])


def test_cache_continues_and_checkpointing_keeps_the_prefix():
    m = prefixed(projection=True)
    full = logits(m)
    with torch.no_grad():
        first = m(input_ids=IDS[:, :4], use_cache=True)
        cache = _output_cache(first)  # `cache` from transformers 5.24 on, `past_key_values` before
        assert cache.get_seq_length() == P + 4  # the prefix, then the tokens
        rest = m(input_ids=IDS[:, 4:], **{_cache_argument(m.forward): cache}).logits
        assert _output_cache(m(input_ids=IDS, use_cache=False)) is None
    torch.testing.assert_close(torch.cat([first.logits, rest], 1), full, atol=1e-5, rtol=1e-5)
    # Activation checkpointing: transformers drops a storing cache in checkpointed layers; the
    # prefix-only cache of a pass without one stays, and gradients are those of a plain pass.
    grads = []
    for checkpoint in (False, True):
        m.zero_grad()
        if checkpoint:
            enable_activation_checkpointing(m)
        m.train()
        target_logprobs(m, IDS, torch.tensor([0, 1]), torch.tensor([5, 6]), torch.tensor([3, 4])).sum().backward()
        grads.append(prefix_body(m).embedding.grad.clone())
    torch.testing.assert_close(grads[1], grads[0])


SHARED, BRANCHES = [7, 8, 9, 10, 11, 12], [[20, 21, 22], [30, 31]]


def scored_alone(m, attn: str) -> list[torch.Tensor]:
    """The branches' target log-probs, each sequence (shared + branch) scored alone (no mask)."""
    alone = []
    with torch.no_grad():
        for b in BRANCHES:
            r = Row()
            r.add(SHARED + b, labels=[-100] * len(SHARED) + b)
            one = collate([r], pad_id=0, attention=attn)
            assert one.mask is None
            alone.append(target_logprobs(m, one.input_ids, one.rows, one.sources, one.targets,
                                         one.position_ids, one.mask))
    return alone


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tree_mask_scores_like_separate_sequences(attn):
    """A shared prompt with two branches (4-D mask, explicit positions) scores as each sequence alone."""
    m = prefixed(attn=attn)
    row = Row()
    root = row.add(SHARED)
    for b in BRANCHES:
        row.add(b, parent=root, labels=b)
    batch = collate([row], pad_id=0, attention=attn)
    assert batch.mask is not None and batch.mask.dim() == 4
    with torch.no_grad():
        tree = target_logprobs(m, batch.input_ids, batch.rows, batch.sources, batch.targets,
                               batch.position_ids, batch.mask)
    torch.testing.assert_close(tree, torch.cat(scored_alone(m, attn)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_scores_equal_peft_forward(attn, peft):
    """A sequence scored alone gives the same numbers as peft's own forward over it."""
    m = prefixed(attn=attn)
    alone = scored_alone(m, attn)
    pm = peft_copy(prefix_body(m).prefix, peft)
    shared, branch = SHARED, BRANCHES[0]
    with torch.no_grad():
        ref = torch.log_softmax(pm(input_ids=torch.tensor([shared + branch])).logits[0], -1)
    expect = ref[torch.arange(len(shared) - 1, len(shared) + 2), torch.tensor(branch)]
    torch.testing.assert_close(alone[0], expect, atol=1e-5, rtol=1e-5)


def test_bad_adapter_files_name_the_file(tmp_path):
    m = prefixed()
    d = tmp_path / "a"
    save_prefix_tuning(m, d)
    weights, config = d / "adapter_model.safetensors", d / "adapter_config.json"
    good = load_file(str(weights))

    def fails(match):
        fresh = llama()
        with pytest.raises(AdapterError, match=match):
            load_prefix_tuning(fresh, d)
        assert not isinstance(fresh.model, PrefixTuningBody)  # the model is left alone

    save_file({"prompt_embeddings": good["prompt_embeddings"][:, :-4].contiguous()}, str(weights))
    fails(rf"{weights}.*shape \(5, 124\).*\(5, 128\)")
    save_file({"other": good["prompt_embeddings"]}, str(weights))
    fails(rf"{weights}.*lacks key 'prompt_embeddings'")
    save_file({**good, "extra": torch.zeros(1)}, str(weights))
    fails(rf"{weights}.*'extra'")
    save_file(good, str(weights))
    cfg = json.loads(config.read_text())
    config.write_text(json.dumps({**cfg, "num_layers": 4}))
    fails(rf"{config}.*num_layers=4")
    config.write_text(json.dumps({**cfg, "peft_type": "PROMPT_TUNING"}))
    fails(rf"{config}.*peft_type")
    config.write_text(json.dumps(cfg))
    load_prefix_tuning(llama(), d)  # restored: loads again

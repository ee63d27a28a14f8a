from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from efftune.data import Formatter, MultipleChoice
from efftune.data.layout import training_rows
from efftune.errors import AdapterError, ConfigError, EfftuneError
from efftune.eval.generate import generate
from efftune.methods.prompt_tuning import (PromptEmbedding, PromptTuningConfig, add_prompt_tuning, load_prompt_tuning,
                                           prompt_embedding, save_prompt_tuning, virtual_ids)
from efftune.train.loop import TrainConfig, train
from tests.conftest import make_tokenizer, tiny_llama

K = 4
IDS = torch.randint(3, 300, (2, 6), generator=torch.Generator().manual_seed(0))


def logits(m, ids):
    with torch.no_grad():
        return m(input_ids=ids).logits


def with_prompt(m, ids=IDS, task="default"):
    """(batch, k + n): the task's virtual ids before every row of `ids`."""
    return torch.cat([torch.tensor(virtual_ids(m, task)).expand(ids.shape[0], -1), ids], dim=1)


def prompted(tasks=("default",), k=K, seed=1):
    m = tiny_llama()
    torch.manual_seed(seed)
    add_prompt_tuning(m, PromptTuningConfig(num_virtual_tokens=k, init="random", tasks=list(tasks)))
    return m


def test_prompt_is_a_prefix_of_embeddings(model):
    base = logits(tiny_llama(), IDS)
    torch.manual_seed(1)
    assert add_prompt_tuning(model, PromptTuningConfig(num_virtual_tokens=K, init="random")) == ["model.embed_tokens"]
    assert virtual_ids(model) == [300, 301, 302, 303]  # just above the vocabulary
    out = logits(model, with_prompt(model))
    assert out.shape == (2, K + 6, 300)  # the LM head still predicts only real tokens
    # The real tokens now sit K positions later, after K extra tokens of context: they differ.
    assert not torch.allclose(out[:, K:], base, atol=1e-3)
    x = torch.tensor([5, 17, 42, 99])
    with torch.no_grad():
        prompt_embedding(model).prompts[0] = model.model.embed_tokens.base_layer(x)
    assert torch.equal(logits(model, with_prompt(model)), logits(tiny_llama(), torch.cat([x.expand(2, -1), IDS], 1)))
    assert torch.equal(logits(model, IDS), base)  # no virtual ids: the base model


def test_only_prompts_get_gradients():
    m = prompted(tasks=("a", "b"))
    m.train()
    m(input_ids=with_prompt(m, task="b")).logits.sum().backward()
    for name, p in m.named_parameters():
        assert p.requires_grad == (name == "model.embed_tokens.prompts"), name
        assert (p.grad is not None) == p.requires_grad, name
    grad = m.model.embed_tokens.prompts.grad
    assert grad[0].abs().sum() == 0 and grad[1].abs().sum() > 0  # only the task that ran


def test_inits(tokenizer):
    m = tiny_llama()
    table = m.model.embed_tokens.weight.detach().clone()
    add_prompt_tuning(m, PromptTuningConfig(num_virtual_tokens=7, init="text", init_text="Is the sky"), tokenizer)
    ids = tokenizer("Is the sky", add_special_tokens=False)["input_ids"]
    expect = table[(ids * 7)[:7]]  # repeated to k, as peft does
    assert torch.equal(m.model.embed_tokens.prompts[0], expect)
    m = tiny_llama()
    add_prompt_tuning(m, PromptTuningConfig(num_virtual_tokens=16, tasks=["a", "b"]), tokenizer)
    rows = m.model.embed_tokens.prompts.detach().flatten(0, 1)
    picked = [int((table == r).all(1).nonzero()[0]) for r in rows]  # every row is a vocabulary row
    assert not set(picked) & set(tokenizer.all_special_ids)
    assert not torch.equal(rows[:16], rows[16:])  # each task its own sample


def test_save_load_round_trip(tmp_path):
    m = prompted()
    save_prompt_tuning(m, tmp_path / "p", PromptTuningConfig(num_virtual_tokens=K, init="random"), {"step": 3})
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["num_virtual_tokens"] == K and cfg["efftune"]["step"] == 3
    assert load_file(str(tmp_path / "p" / "adapter_model.safetensors"))["prompt_embeddings"].shape == (K, 32)
    m2 = tiny_llama()
    assert load_prompt_tuning(m2, tmp_path / "p") == PromptTuningConfig(num_virtual_tokens=K, init="random")
    assert torch.equal(logits(m2, with_prompt(m2)), logits(m, with_prompt(m)))

    multi = prompted(tasks=("a", "b"))
    save_prompt_tuning(multi, tmp_path / "multi")
    assert sorted(load_file(str(tmp_path / "multi" / "prompt_tuning_model.safetensors"))) == \
        ["prompt_embeddings.a", "prompt_embeddings.b"]
    m3 = tiny_llama()
    assert load_prompt_tuning(m3, tmp_path / "multi").tasks == ["a", "b"]
    for t in ("a", "b"):
        assert torch.equal(logits(m3, with_prompt(m3, task=t)), logits(multi, with_prompt(multi, task=t)))


def test_peft_loads_our_prompt(tmp_path, peft):
    m = prompted()
    save_prompt_tuning(m, tmp_path / "p")
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "p")).eval()
    # peft prepends the virtual tokens itself: it gets the input without them, we with them
    ours, theirs = logits(m, with_prompt(m)), logits(pm, IDS)
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs[:, K:], ours[:, K:], atol=1e-5, rtol=0)


def test_we_load_peft_prompt(tmp_path, peft):
    pm = peft.get_peft_model(tiny_llama(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=K))
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.normal_(std=0.5)
    pm.eval().save_pretrained(str(tmp_path / "p"))
    m = tiny_llama()
    assert load_prompt_tuning(m, tmp_path / "p").num_virtual_tokens == K
    torch.testing.assert_close(logits(m, with_prompt(m))[:, K:], logits(pm, IDS)[:, K:], atol=1e-5, rtol=0)


def test_mixed_task_batch_equals_each_alone():
    m = prompted(tasks=("a", "b"))
    batch = torch.cat([with_prompt(m, IDS[:1], "a"), with_prompt(m, IDS[1:], "b")])
    out = logits(m, batch)
    for i, t in enumerate(("a", "b")):
        torch.testing.assert_close(out[i:i + 1], logits(m, with_prompt(m, IDS[i:i + 1], t)), atol=1e-5, rtol=0)
    assert not torch.allclose(out[1], logits(m, with_prompt(m, IDS[1:], "a"))[0], atol=1e-3)


def test_spot_copies_the_source_prompt(tmp_path):
    src = prompted(tasks=("s", "t"), seed=3)
    save_prompt_tuning(src, tmp_path / "src")
    with pytest.raises(ConfigError, match="pick one"):
        add_prompt_tuning(tiny_llama(), PromptTuningConfig(num_virtual_tokens=K, init_from=str(tmp_path / "src")))
    m = tiny_llama()
    add_prompt_tuning(m, PromptTuningConfig(num_virtual_tokens=K, tasks=["x", "y"], init_from=f"{tmp_path / 'src'}#t"))
    for row in m.model.embed_tokens.prompts:
        assert torch.equal(row, src.model.embed_tokens.prompts[1])
    single = prompted(seed=4)
    save_prompt_tuning(single, tmp_path / "single")  # peft's format
    m = tiny_llama()
    add_prompt_tuning(m, PromptTuningConfig(num_virtual_tokens=K, init_from=str(tmp_path / "single")))
    assert torch.equal(m.model.embed_tokens.prompts, single.model.embed_tokens.prompts)
    with pytest.raises(AdapterError, match=r"prompt_embeddings\.t.*\(4, 32\).*\(5, 32\)"):
        add_prompt_tuning(tiny_llama(), PromptTuningConfig(num_virtual_tokens=5, init_from=f"{tmp_path / 'src'}#t"))


def test_training_lowers_the_loss(tokenizer, tmp_path):
    m = prompted(k=8)
    f = Formatter(tokenizer, prefix_ids=virtual_ids(m))
    prompts = ["Q: Is the sky blue?\nA: ", "Q: Is grass red?\nA: ", "The quick brown fox\nA: "]
    seqs = [f.encode(MultipleChoice(p, ("yes", "no"), i % 2)) for i, p in enumerate(prompts * 2)]
    assert seqs[0].input_ids[:8] == virtual_ids(m) and seqs[0].labels[:8] == [-100] * 8
    assert len(training_rows(seqs, 512)[0].parents) == 7  # the soft prompt runs once, as a shared root
    train(m, seqs, TrainConfig(steps=12, batch_size=6, lr=0.1, warmup_steps=1, save_every=0, eval_every=0),
          tmp_path, pad_id=tokenizer.pad_token_id)
    losses = [json.loads(l)["loss"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] * 0.7


def test_greedy_generation_with_cache(tokenizer):
    m = prompted()
    ids = with_prompt(m, IDS[:1])
    out = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                     pad_token_id=tokenizer.pad_token_id)
    step = ids  # the same greedy decoding without a cache, one full forward per token
    for _ in range(5):
        step = torch.cat([step, logits(m, step)[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, step)
    # efftune's generate: the virtual tokens go first, and it decodes what the same greedy loop gives
    f = Formatter(tokenizer, prefix_ids=virtual_ids(m))
    prompt = "Q: Is the sky blue?\nA:"
    step = torch.tensor([virtual_ids(m) + tokenizer("Q: Is the sky blue?\nA:", add_special_tokens=False)["input_ids"]])
    start = step.shape[1]
    for _ in range(3):
        step = torch.cat([step, logits(m, step)[:, -1:].argmax(-1)], 1)
    want = tokenizer.decode(step[0, start:], skip_special_tokens=True)
    assert generate(m, f, prompt, max_new_tokens=3) == want and want


def test_formatter_prefix_goes_first():
    from tokenizers.processors import TemplateProcessing
    tok = make_tokenizer()
    tok.bos_token = "<unk>"  # a tokenizer that adds BOS: the prefix goes before it, as in peft
    tok._tokenizer.post_processor = TemplateProcessing(single="<unk> $A", special_tokens=[("<unk>", 0)])
    f = Formatter(tok, prefix_ids=[300, 301])
    ex = MultipleChoice("Q: Is the sky blue?\nA: ", ("yes", "no"), 0)
    enc = f.encode(ex)
    assert enc.input_ids[:3] == [300, 301, 0] and enc.labels[:3] == [-100] * 3
    assert f.encode(ex, prefix_ids=[302]).input_ids[:2] == [302, 0]  # per call: mixed-task batches
    assert f.encode_prompt("Q:", prefix_ids=[])[0] == 0
    short = Formatter(tok, prefix_ids=[300, 301], max_length=8).encode(ex)
    assert len(short) == 8 and short.input_ids[:2] == [300, 301] and short.labels[-1] != -100  # kept in truncation
    assert short.input_ids[2:] == enc.input_ids[-6:] and short.labels[-4:] == enc.labels[-4:]


def test_bad_input(tmp_path, tokenizer):
    m = prompted(tasks=("a",))
    with pytest.raises(EfftuneError, match="unknown task 'b'.*have: a"):
        virtual_ids(m, "b")
    with pytest.raises(EfftuneError, match="already has soft prompts"):
        add_prompt_tuning(m)
    with pytest.raises(ConfigError, match="prompt_tuning.init_text is required with init: text"):
        PromptTuningConfig(init="text")
    with pytest.raises(ConfigError, match="prompt_tuning.num_virtual_tokens"):
        PromptTuningConfig(num_virtual_tokens=0)
    with pytest.raises(ConfigError, match="prompt_tuning.tasks names a task twice"):
        PromptTuningConfig(tasks=["a", "a"])
    fresh = tiny_llama()
    with pytest.raises(ConfigError, match="needs the tokenizer"):
        add_prompt_tuning(fresh, PromptTuningConfig(init="text", init_text="hi"))
    assert type(fresh.get_input_embeddings()) is nn.Embedding  # left as it was

    save_prompt_tuning(m, tmp_path / "p")
    path = tmp_path / "p" / "adapter_model.safetensors"
    save_file({"prompt_embeddings": torch.zeros(K, 16)}, str(path))  # as if from a model of hidden size 16
    with pytest.raises(AdapterError, match=r"'prompt_embeddings' of shape \(4, 16\).*expects \(4, 32\)"):
        load_prompt_tuning(fresh, tmp_path / "p")
    assert not isinstance(fresh.get_input_embeddings(), PromptEmbedding)
    save_file({"prompt_embeddings": torch.zeros(K, 32), "extra": torch.zeros(1)}, str(path))
    with pytest.raises(AdapterError, match="'extra'"):
        load_prompt_tuning(fresh, tmp_path / "p")

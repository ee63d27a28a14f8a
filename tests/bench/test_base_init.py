"""bench/base_init.py: the fast random fill of a benchmark base, against transformers' own build."""
from __future__ import annotations

import torch

from bench import base_init
from bench.base_init import empty_base, filled_base
from bench.throughput import SHAPES, build_model

CPU = torch.device("cpu")


def test_the_fill_is_the_same_every_time_with_the_layout_and_scale_of_transformers_init():
    a, b = filled_base("tiny", CPU), filled_base("tiny", CPU)
    hf = build_model("tiny", CPU)
    assert {n: (p.shape, p.dtype) for n, p in a.named_parameters()} == \
        {n: (p.shape, p.dtype) for n, p in hf.named_parameters()}
    for name, p in a.state_dict().items():
        assert torch.equal(p, b.state_dict()[name]), name  # ranks that fill their own bases agree
    for name, buf in hf.named_buffers():  # computed by the constructor, not filled: the rotary inv_freq
        assert torch.equal(a.get_buffer(name), buf), name
    for name, p in a.named_parameters():
        if p.ndim == 1:
            assert torch.equal(p, torch.ones_like(p)), name  # the RMSNorm weights, as transformers sets them
        else:
            assert abs(p.float().std().item() - 0.02) < 0.002 and abs(p.float().mean().item()) < 0.002, name


def test_tiles_of_the_block_leave_no_two_rows_equal_and_ties_stay_tied(monkeypatch):
    monkeypatch.setattr(base_init, "NOISE_VALUES", 1001)  # the embedding's 1000 x 64 values: 64 tiles
    monkeypatch.setitem(SHAPES, "tiny-tied", {**SHAPES["tiny"], "tie_word_embeddings": True})
    model = filled_base("tiny-tied", CPU)
    embedding = model.model.embed_tokens.weight
    assert model.lm_head.weight is embedding
    assert torch.equal(embedding.view(-1)[1001:2002], embedding.view(-1)[:1001])  # the block, again
    assert torch.unique(embedding, dim=0).shape[0] == embedding.shape[0]  # its odd length shifts every row


def test_an_empty_base_has_no_weights_but_its_buffers():
    model = empty_base("tiny")
    assert all(p.is_meta for p in model.parameters())
    hf = build_model("tiny", CPU)
    assert all(torch.equal(model.get_buffer(n), b) for n, b in hf.named_buffers())

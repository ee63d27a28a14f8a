"""Token-tree rows must compute exactly what each sequence computes alone."""
import pytest
import torch

from efftune.data import Completion, Formatter
from efftune.data.layout import Row, collate, common_prefix, training_rows
from efftune.forward.logprobs import labelled_logprobs, target_logprobs

INSTRUCTION = "Predict the intent of the utterance. The choices are: play, stop, skip.\n\nUtterance: "


def alone(model, seqs):
    return torch.cat([labelled_logprobs(model, torch.tensor([s.input_ids]), torch.tensor([s.labels])) for s in seqs])


def tree(model, rows, attention="sdpa"):
    b = collate(rows, pad_id=1, attention=attention)
    lp = target_logprobs(model, b.input_ids, b.rows, b.sources, b.targets, b.position_ids, b.mask)
    order = sorted(range(len(b.tags)), key=lambda k: b.tags[k])  # back to sequence order (stable)
    return lp[order], b


def encode(tokenizer, pairs):
    f = Formatter(tokenizer)
    return [f.encode(Completion(p, c)) for p, c in pairs]


def test_plain_packing_equals_separate_sequences(model, tokenizer):
    seqs = encode(tokenizer, [("Q: Is grass red?\nA:", " no"), ("Take 3 steps.", " Turn left"), ("0123", " 45")])
    rows = training_rows(seqs, max_length=64)
    assert len(rows) == 1 and rows[0].parents == [-1, -1, -1]
    got, batch = tree(model, rows)
    torch.testing.assert_close(got, alone(model, seqs), atol=1e-5, rtol=0)
    assert batch.tokens == sum(len(s) for s in seqs)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prefix_rows_equal_separate_sequences(tokenizer, attention):
    from tests.conftest import tiny_llama
    model = tiny_llama()
    model.config._attn_implementation = attention
    seqs = encode(tokenizer, [(INSTRUCTION + u, " " + a) for u, a in
                              [("play the fox song", "play"), ("stop it now", "stop"), ("next one", "skip"),
                               ("the lazy dog song please", "play")]])
    shared = common_prefix([s.input_ids for s in seqs])
    rows = training_rows(seqs, max_length=max(len(s) for s in seqs) + 1)
    assert len(rows) > 1  # the row limit forces the trunk to be repeated per row
    assert all(r.parents[0] == -1 and all(p == 0 for p in r.parents[1:]) for r in rows)
    got, batch = tree(model, rows, attention)
    torch.testing.assert_close(got, alone(model, seqs), atol=1e-5, rtol=0)
    assert batch.tokens <= len(rows) * (max(len(s) for s in seqs) + 1)
    assert shared >= 8


def test_gradients_through_shared_prefix_equal_separate(tokenizer):
    from efftune.methods.lora.config import LoraConfig
    from efftune.methods.lora.model import add_lora
    from tests.conftest import randomize_lora, tiny_llama
    seqs = encode(tokenizer, [(INSTRUCTION + u, " " + a) for u, a in [("play it", "play"), ("stop", "stop")]])
    grads = []
    for shared in (True, False):
        m = tiny_llama(dtype=torch.float64)
        torch.manual_seed(0)  # same LoRA A in both runs
        add_lora(m, LoraConfig(r=2))
        randomize_lora(m)
        if shared:
            lp, _ = tree(m, training_rows(seqs, 512))
        else:
            lp = alone(m, seqs)
        lp.sum().backward()
        grads.append([p.grad for p in m.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)  # sdpa kernels differ (masked vs causal)


def test_row_rejects_target_without_a_predecessor():
    with pytest.raises(ValueError, match="first token of a root"):
        Row().add([1, 2], labels=[1, 2])


def test_branch_positions_continue_from_parent():
    r = Row()
    root = r.add([5, 6, 7])
    a = r.add([8, 9], parent=root, labels=[8, 9])
    r.add([4], parent=a, labels=[4])
    r.add([3], parent=root, labels=[3])
    assert r.pos == [0, 1, 2, 3, 4, 5, 3]
    assert r.sources == [2, 3, 4, 2] and r.targets == [8, 9, 4, 3]
    b = collate([r], pad_id=0)
    allowed = b.mask[0, 0]
    assert allowed[6].tolist() == [True, True, True, False, False, False, True]  # sibling branch hidden
    assert allowed[5].tolist() == [True, True, True, True, True, True, False]

import torch

from efftune.data import IGNORE, Completion, Formatter, MultipleChoice, collate_packed, pack


def test_prompt_is_masked_and_space_moves_to_answer(tokenizer):
    f = Formatter(tokenizer)
    enc = f.encode(MultipleChoice("Q: Is the sky blue?\nA: ", ("yes", "no"), 0))
    prompt_ids, answer_ids = f.encode_pair("Q: Is the sky blue?\nA: ", "yes")
    assert tokenizer.decode(answer_ids) == " yes"
    assert enc.input_ids == prompt_ids + answer_ids
    assert enc.labels == [IGNORE] * len(prompt_ids) + answer_ids


def test_completion_ends_with_eos_and_long_prompt_keeps_its_end(tokenizer):
    f = Formatter(tokenizer, max_length=12)
    enc = f.encode(Completion("The quick brown fox jumps over the lazy dog. " * 3, "yes"))
    assert len(enc) == 12 and enc.input_ids[-1] == tokenizer.eos_token_id
    assert sum(t != IGNORE for t in enc.labels) == len(f.encode_pair("x: ", "yes")[1]) + 1


def test_chat_template_wraps_prompt(tokenizer):
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    f = Formatter(tokenizer, chat_template=True)
    prompt, answer = f.split("Is it? ", " yes")
    assert prompt == "<user>Is it?<assistant>" and answer == "yes"


def test_pack_respects_row_length_and_uses_every_sequence():
    lengths = [5, 3, 8, 2, 7, 1]
    rows = pack(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(6))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert len(rows) == 3


def test_collate_restarts_positions_and_pads_without_labels(tokenizer):
    from efftune.data.tokenize import Encoded
    seqs = [Encoded([5, 6, 7], [IGNORE, 6, 7]), Encoded([8, 9], [IGNORE, 9]), Encoded([4], [IGNORE])]
    batch = collate_packed(seqs, [[0, 1], [2]], pad_id=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [4, 1, 1, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9], [IGNORE] * 5]


def test_packed_rows_equal_separate_sequences(model, tokenizer):
    """Packing must not let one example see another: log-probs match unpacked runs."""
    from efftune.eval.logprobs import labelled_logprobs
    f = Formatter(tokenizer)
    seqs = [f.encode(Completion("Q: Is grass red?\nA:", " no")), f.encode(Completion("Take 3 steps.", " Turn left"))]
    packed = collate_packed(seqs, [[0, 1]], tokenizer.pad_token_id)
    lp_packed = labelled_logprobs(model, packed["input_ids"], packed["labels"], packed["position_ids"])
    alone = [labelled_logprobs(model, torch.tensor([s.input_ids]), torch.tensor([s.labels])) for s in seqs]
    torch.testing.assert_close(lp_packed, torch.cat(alone), atol=1e-5, rtol=0)

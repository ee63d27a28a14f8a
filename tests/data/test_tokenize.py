import pytest

from efftune.data import IGNORE, Completion, Formatter, MultipleChoice, pack


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


def test_cut_rows_say_how_many_tokens_they_lost(tokenizer):
    from efftune.data.tokenize import truncation_note
    f = Formatter(tokenizer, max_length=12)
    long = Completion("The quick brown fox jumps over the lazy dog. " * 3, "yes")
    short = Completion("Q: hi", "yes")
    full = f.encode_pair(long.prompt, long.completion)
    cut, kept = f.encode(long), f.encode(short)
    assert cut.dropped == len(full[0]) + len(full[1]) + 1 - 12  # + 1: the EOS token
    assert kept.dropped == 0 and truncation_note([kept], 12) is None
    note = truncation_note([cut, kept], 12)
    assert note.startswith(f"data: 1 of 2 training examples are longer than max_length 12 tokens and were cut "
                           f"({cut.dropped:,} tokens dropped")


def test_chat_template_without_one_is_refused():
    from efftune.errors import ConfigError
    from tests.conftest import make_tokenizer
    with pytest.raises(ConfigError, match="no chat template"):
        Formatter(make_tokenizer(), chat_template=True)

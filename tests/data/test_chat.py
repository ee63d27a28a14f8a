"""Conversations: the loss mask covers exactly the assistant turns as the template writes them.

The reference is independent of the code under test: the text each assistant turn should train on
is written out by hand for each template (its content and its end-of-turn token), and the masked
spans are decoded and compared with it."""
import pytest

from efftune.data import IGNORE, Formatter
from efftune.data.chat import assistant_spans, encode_conversation, parse_conversation
from efftune.data.examples import Conversation
from efftune.data.jsonl import parse_row
from efftune.data.layout import training_rows
from efftune.errors import DataError
from tests.data.chat_fixtures import (LLAMA3_GENERATION, REWRITES_HISTORY, SMOLLM2_DIR, chatml_tokenizer,
                                      llama3_tokenizer)

SYSTEM = "You answer yes or no."
TURNS = [("system", SYSTEM), ("user", "Is the sky blue?"), ("assistant", "yes"),
         ("user", "Is grass red?"), ("tool", "lookup: grass is green"), ("assistant", "no, it is green")]


def conv(turns=TURNS) -> Conversation:
    return Conversation(tuple(turns))


def target_spans(ids, labels) -> list[list[int]]:
    """The runs of target tokens, checking each target is its own token id."""
    spans, current = [], []
    for i, label in zip(ids, labels):
        if label == IGNORE:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == i
            current.append(i)
    return spans + ([current] if current else [])


CASES = {  # tokenizer maker, end-of-turn text the assistant must learn to write
    "smollm2": (chatml_tokenizer, "<|im_end|>"),
    "llama3": (llama3_tokenizer, "<|eot_id|>"),
    "llama3-generation-blocks": (lambda: llama3_tokenizer(LLAMA3_GENERATION), "<|eot_id|>"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_assistant_mask_covers_exactly_the_assistant_turns(case):
    make, end = CASES[case]
    tok = make()
    ids, labels, dropped = encode_conversation(tok, conv(), "assistant", max_length=10_000)
    assert dropped == 0
    decoded = [tok.decode(span) for span in target_spans(ids, labels)]
    assert decoded == ["yes" + end, "no, it is green" + end]
    # the whole sequence is the template's rendering, so nothing else (system, user, tool) is a target
    assert tok.decode(ids) == tok.apply_chat_template(conv().as_dicts(), tokenize=False)
    context = tok.decode([i for i, label in zip(ids, labels) if label == IGNORE])
    for role, content in TURNS:
        if role != "assistant":
            assert content in context


@pytest.mark.parametrize("case", sorted(CASES))
def test_last_assistant_trains_the_last_turn_only(case):
    make, end = CASES[case]
    tok = make()
    ids, labels, _ = encode_conversation(tok, conv(), "last_assistant", max_length=10_000)
    assert [tok.decode(s) for s in target_spans(ids, labels)] == ["no, it is green" + end]
    all_ids, all_labels, _ = encode_conversation(tok, conv(), "all", max_length=10_000)
    assert all_ids == ids and all_labels == [IGNORE] + ids[1:]


def test_generation_blocks_and_turn_by_turn_agree():
    """transformers' assistant-token mask and our turn-by-turn rendering give the same tokens and targets."""
    with_blocks = llama3_tokenizer(LLAMA3_GENERATION)
    plain = llama3_tokenizer()
    assert assistant_spans(with_blocks, conv()) == assistant_spans(plain, conv())


def test_chatml_text_after_the_end_of_turn_is_no_target():
    tok = chatml_tokenizer()
    ids, labels, _ = encode_conversation(tok, conv(TURNS[:3]), "assistant", 10_000)
    last_target = max(t for t, label in enumerate(labels) if label != IGNORE)
    assert ids[last_target] == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(ids[last_target + 1:]) == "\n"


@pytest.mark.skipif(not (SMOLLM2_DIR / "tokenizer.json").is_file(), reason="the default model is not cached")
def test_smollm2_own_tokenizer():
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(SMOLLM2_DIR)
    ids, labels, _ = encode_conversation(tok, conv(), "assistant", 10_000)
    assert [tok.decode(s) for s in target_spans(ids, labels)] == ["yes<|im_end|>", "no, it is green<|im_end|>"]
    # without a system turn the template adds its own; it is context
    ids, labels, _ = encode_conversation(tok, conv(TURNS[1:3]), "assistant", 10_000)
    assert [tok.decode(s) for s in target_spans(ids, labels)] == ["yes<|im_end|>"]
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(ids)


def test_a_template_that_rewrites_history_is_refused_naming_the_row():
    tok = chatml_tokenizer(REWRITES_HISTORY)
    example = parse_row({"messages": [{"role": r, "content": c} for r, c in TURNS]}, "chat.jsonl:7")
    with pytest.raises(DataError, match=r"chat.jsonl:7: .*not a prefix"):
        Formatter(tok).encode(example)


def test_prompt_tuning_prefix_is_never_a_target_and_long_conversations_keep_their_start():
    tok = chatml_tokenizer()
    ids, labels, dropped = encode_conversation(tok, conv(), "assistant", max_length=10_000, prefix_ids=[5, 6])
    assert ids[:2] == [5, 6] and labels[:2] == [IGNORE, IGNORE]
    cut_ids, cut_labels, cut = encode_conversation(tok, conv(), "assistant", max_length=40)
    assert cut_ids == ids[2:42] and cut == len(ids) - 2 - 40 and cut_labels == labels[2:42]


def test_sharegpt_rows_are_the_same_conversation():
    sharegpt = {"conversations": [{"from": "system", "value": SYSTEM}, {"from": "human", "value": "Is the sky blue?"},
                                  {"from": "gpt", "value": "yes"}]}
    openai = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Is the sky blue?"},
                           {"role": "assistant", "content": "yes"}]}
    assert parse_row(sharegpt, "a") == parse_row(openai, "b") == conv(TURNS[:3])


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "robot", "content": "hi"}]}, r"f.jsonl:3: messages\[0\]\.role: unknown role 'robot'"),
    ({"messages": []}, r"f.jsonl:3: field 'messages' is an empty conversation"),
    ({"messages": [{"role": "user", "content": ["a", "b"]}]}, r"f.jsonl:3: messages\[0\]\.content must be a string"),
    ({"messages": [{"role": "user"}]}, r"f.jsonl:3: messages\[0\] is missing field 'content'"),
    ({"messages": "hello"}, r"f.jsonl:3: field 'messages' must be a list"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, r"f.jsonl:3: conversations\[0\]\.from: unknown role 'bot'"),
    ({"conversations": [{"from": ["human"], "value": "x"}]}, r"f.jsonl:3: conversations\[0\]\.from must be a string"),
])
def test_bad_conversation_rows_name_the_row_and_field(row, message):
    with pytest.raises(DataError, match=message):
        parse_conversation(row, "f.jsonl:3")


def test_conversations_sharing_a_system_prompt_share_a_tree_trunk():
    tok = chatml_tokenizer()
    f = Formatter(tok)
    system = "You are a careful assistant. Answer each question with yes or no, nothing else."
    seqs = [f.encode(conv([("system", system), ("user", q), ("assistant", a)]))
            for q, a in [("Is the sky blue?", "yes"), ("Is grass red?", "no"), ("Is 2 + 2 = 4?", "yes")]]
    rows = training_rows(seqs, max_length=10_000)
    assert len(rows) == 1 and rows[0].parents[0] == -1 and rows[0].parents[1:] == [0, 0, 0]
    trunk = rows[0].ids[:rows[0].lasts[0] + 1]
    assert system in tok.decode(trunk)
    # every target of every conversation is in the row, predicted once
    assert sorted(rows[0].targets) == sorted(t for s in seqs for t in s.labels if t != IGNORE)

"""The tokenisation cache: a second run reads the tokens instead of rendering again; a changed
template (or option) is another key. And the overflow policy for rows over max_length."""
import pytest

from efftune.data import IGNORE, Formatter
from efftune.data.examples import Completion, Conversation
from efftune.data.options import apply_overflow, drop_without_assistant
from efftune.data.token_cache import encode_all
from efftune.errors import DataError
from tests.data.chat_fixtures import LLAMA3, SMOLLM2, chatml_tokenizer

CONVS = [Conversation((("user", f"Is {x} blue?"), ("assistant", a))) for x, a in
         [("the sky", "yes"), ("grass", "no"), ("the sea", "yes, mostly")]]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "tokens"


def test_second_run_hits_the_cache_and_a_changed_template_misses(cache, monkeypatch):
    tok = chatml_tokenizer(SMOLLM2)
    logs = []
    first = encode_all(Formatter(tok), CONVS, log=logs.append)
    assert first == [Formatter(tok).encode(c) for c in CONVS] and len(list(cache.iterdir())) == 1 and not logs

    def no_encoding(self, example, prefix_ids=None):
        raise AssertionError("tokenised again although cached")
    with monkeypatch.context() as m:
        m.setattr(Formatter, "encode", no_encoding)
        again = encode_all(Formatter(chatml_tokenizer(SMOLLM2)), CONVS, log=logs.append)  # a new tokenizer object
    assert again == first and "read from the cache" in logs[-1]

    changed = chatml_tokenizer(SMOLLM2.replace("helpful AI assistant", "terse AI assistant"))
    third = encode_all(Formatter(changed), CONVS, log=logs.append)
    assert len(list(cache.iterdir())) == 2 and third != first
    for option in (dict(train_on="all"), dict(max_length=20)):  # the options are part of the key too
        encode_all(Formatter(tok, **option), CONVS)
    assert len(list(cache.iterdir())) == 4
    encode_all(Formatter(chatml_tokenizer(LLAMA3)), CONVS[:2])  # other data
    assert len(list(cache.iterdir())) == 5


def test_without_the_cache_nothing_is_written(cache):
    encode_all(Formatter(chatml_tokenizer()), CONVS, use_cache=False)
    assert not cache.exists() or not list(cache.iterdir())


def test_overflow_policies():
    tok = chatml_tokenizer()
    n = max(len(Formatter(tok, max_length=10_000).encode(c)) for c in CONVS) + 2
    examples = CONVS + [Completion("Q: " + "the quick brown fox " * 40, "yes")]
    f = Formatter(tok, max_length=n)
    seqs = [f.encode(e) for e in examples]
    over = [i for i, s in enumerate(seqs) if s.dropped]
    assert over == [3]  # (the conversations fit)
    assert apply_overflow(examples, seqs, "truncate", n) == ([0, 1, 2, 3], [])
    kept, lines = apply_overflow(examples, seqs, "drop", n, source="d.jsonl")
    assert kept == [0, 1, 2] and lines == [f"data: 1 of 4 training examples are longer than max_length {n} tokens "
                                           "and were dropped (data_overflow: drop)"]
    with pytest.raises(DataError, match=rf"d.jsonl example 3: \d+ tokens, more than train.max_length {n}"):
        apply_overflow(examples, seqs, "error", n, source="d.jsonl")
    # a conversation cut before its reply has no target left: dropped with a count even under truncate
    short = Formatter(tok, max_length=8)
    cut = [short.encode(c) for c in CONVS]
    assert all(label == IGNORE for s in cut for label in s.labels)
    kept, lines = apply_overflow(CONVS, cut, "truncate", 8)
    assert kept == [] and "3 of 3 training examples have no target token within max_length 8" in lines[0]


def test_conversations_without_an_assistant_turn_are_skipped_or_refused():
    silent = Conversation((("user", "hello?"),), where="c.jsonl:2")
    examples = [CONVS[0], silent]
    assert drop_without_assistant(examples, "truncate", "assistant", "c.jsonl") == ([CONVS[0]], 1)
    assert drop_without_assistant(examples, "truncate", "all", "c.jsonl") == (examples, 0)
    with pytest.raises(DataError, match=r"c.jsonl:2: the conversation has no assistant turn"):
        drop_without_assistant(examples, "error", "assistant", "c.jsonl")

"""The data cache: a second run reads the parsed examples and the tokens instead of parsing and
rendering again, and builds exactly the sequences a fresh tokenisation gives; a changed file, template,
tokenizer or option is another key; a damaged entry is said in one line and built again. And the
overflow policy for rows over max_length."""
import json

import numpy as np
import pytest

from efftune.data import IGNORE, Formatter
from efftune.data import stored as stored_module
from efftune.data.examples import Completion, Conversation, MultipleChoice, split_examples
from efftune.data.options import apply_overflow, drop_without_assistant
from efftune.data.stored import StoredExamples, read_source
from efftune.data.token_cache import encode_all
from efftune.data.tokenize import TokenArrays
from efftune.errors import DataError
from tests.data.chat_fixtures import LLAMA3, SMOLLM2, chatml_tokenizer

CONVS = [Conversation((("user", f"Is {x} blue?"), ("assistant", a))) for x, a in
         [("the sky", "yes"), ("grass", "no"), ("the sea", "yes, mostly")]]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFTUNE_DATA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def entries(cache, kind="tokens"):
    return sorted(p for p in (cache / kind).iterdir()) if (cache / kind).exists() else []


def no_encoding(self, example, prefix_ids=None):
    raise AssertionError("tokenised again although cached")


def test_second_run_hits_the_cache_and_a_changed_template_misses(cache, monkeypatch):
    tok = chatml_tokenizer(SMOLLM2)
    logs = []
    first = encode_all(Formatter(tok), CONVS, log=logs.append)
    assert isinstance(first, TokenArrays) and list(first) == [Formatter(tok).encode(c) for c in CONVS]
    assert len(entries(cache)) == 1 and not logs
    with monkeypatch.context() as m:
        m.setattr(Formatter, "encode", no_encoding)
        again = encode_all(Formatter(chatml_tokenizer(SMOLLM2)), CONVS, log=logs.append)  # a new tokenizer object
    assert list(again) == list(first) and "read from the cache" in logs[-1]

    changed = chatml_tokenizer(SMOLLM2.replace("helpful AI assistant", "terse AI assistant"))
    third = encode_all(Formatter(changed), CONVS, log=logs.append)
    assert len(entries(cache)) == 2 and list(third) != list(first)
    for option in (dict(train_on="all"), dict(max_length=20)):  # the options are part of the key too
        encode_all(Formatter(tok, **option), CONVS)
    assert len(entries(cache)) == 4
    encode_all(Formatter(chatml_tokenizer(LLAMA3)), CONVS[:2])  # other data
    assert len(entries(cache)) == 5


def test_without_the_cache_nothing_is_written(cache):
    seqs = encode_all(Formatter(chatml_tokenizer()), CONVS, use_cache=False)
    assert list(seqs) == [Formatter(chatml_tokenizer()).encode(c) for c in CONVS] and not entries(cache)


def write_chat(path, n, seed=0, say="yes"):
    rng = np.random.default_rng(seed)
    rows = [{"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": f"Is {int(rng.integers(1000))} even?"},
                          {"role": "assistant", "content": say + " " * int(rng.integers(3))}]} for _ in range(n)]
    rows[3] = {"messages": [{"role": "user", "content": "hello?"}]}  # no assistant turn
    rows[5] = {"prompt": "Q: 2+2?\nA:", "completion": " 4"}
    rows[6] = {"input": "Sky?", "choices": ["blue", "red"], "answer": 0}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_data_file_is_parsed_and_tokenised_once(cache, tmp_path, monkeypatch):
    """The second run over a file reads neither its JSON nor renders a template, and gets the same
    examples and exactly the same ids and masks as a fresh tokenisation, for any split of it."""
    data = tmp_path / "chat.jsonl"
    write_chat(data, 40)
    tok = chatml_tokenizer()
    fresh = stored_module.load_data(data)
    logs = []
    first = read_source(data, log=logs.append)
    assert isinstance(first, StoredExamples) and list(first) == fresh and not logs
    assert [getattr(e, "where", None) for e in first] == [getattr(e, "where", None) for e in fresh]  # file:line
    first_tokens = encode_all(Formatter(tok), first, log=logs.append)
    assert not logs and len(entries(cache, "examples")) == 1 and len(entries(cache)) == 1

    with monkeypatch.context() as m:
        m.setattr(stored_module, "load_data", lambda *a, **k: pytest.fail("the file was parsed again"))
        m.setattr(Formatter, "encode", no_encoding)
        again = read_source(data, log=logs.append)
        assert "40 examples of" in logs[-1] and "parsed before, read from the cache" in logs[-1]
        kept, skipped = drop_without_assistant(again, "truncate", "assistant", str(data))
        assert skipped == 1 and list(kept) == [e for e in fresh if e != fresh[3]]
        train, held = split_examples(kept, 5, seed=3)
        tokens = encode_all(Formatter(tok), train, log=logs.append)
        assert "training examples tokenised before, read from the cache (40 sequences" in logs[-1]
    f = Formatter(tok)
    want_train, want_held = split_examples([e for e in fresh if e != fresh[3]], 5, seed=3)
    assert list(train) == want_train and list(held) == want_held
    expected = [f.encode(e) for e in want_train]
    assert list(tokens) == expected  # ids and labels (IGNORE off the targets), and the cut counts
    for got, want in zip(tokens, expected):
        assert all((label == i) if label != IGNORE else True for i, label in zip(got.input_ids, got.labels))
        assert got.labels == want.labels
    assert list(first_tokens) == [f.encode(e) for e in fresh]
    # the counts the run filters on, read from the arrays, agree with the sequences
    assert tokens.lengths().tolist() == [len(s) for s in expected]
    assert tokens.targets().tolist() == [sum(t != IGNORE for t in s.labels) for s in expected]


def test_a_changed_file_option_or_tokenizer_misses(cache, tmp_path):
    data = tmp_path / "chat.jsonl"
    write_chat(data, 12)
    tok = chatml_tokenizer()
    encode_all(Formatter(tok), read_source(data))
    assert (len(entries(cache, "examples")), len(entries(cache))) == (1, 1)
    write_chat(data, 12, say="no")  # same size, other bytes
    changed = read_source(data)
    assert changed[0].messages[-1][1].startswith("no")
    assert list(encode_all(Formatter(tok), changed)) == [Formatter(tok).encode(e) for e in changed]
    assert (len(entries(cache, "examples")), len(entries(cache))) == (2, 2)
    encode_all(Formatter(tok, train_on="last_assistant"), changed)  # an option
    encode_all(Formatter(chatml_tokenizer(LLAMA3)), changed)  # a tokenizer's template
    assert len(entries(cache)) == 4
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"q": "Two and two?", "a": "four"}\n')
    assert list(read_source(qa, columns={"prompt": "q", "completion": "a"})) == [Completion("Two and two?", "four")]
    assert list(read_source(qa, columns={"prompt": "a", "completion": "q"})) == [Completion("four", "Two and two?")]
    assert len(entries(cache, "examples")) == 4  # a column mapping is part of the key
    plain = read_source(data, use_cache=False)
    assert isinstance(plain, list) and plain == list(changed)


@pytest.mark.parametrize("damage", ["cut ids", "garbage meta", "ids out of range", "offsets", "examples text"])
def test_a_damaged_entry_is_said_and_rebuilt(cache, tmp_path, damage):
    data = tmp_path / "chat.jsonl"
    write_chat(data, 10)
    tok = chatml_tokenizer()
    want = [Formatter(tok).encode(e) for e in read_source(data)]
    encode_all(Formatter(tok), read_source(data))
    [tokens], [parsed] = entries(cache), entries(cache, "examples")
    if damage == "cut ids":
        (tokens / "ids.npy").write_bytes((tokens / "ids.npy").read_bytes()[:-12])
    elif damage == "garbage meta":
        (tokens / "entry.json").write_text("{not json")
    elif damage == "ids out of range":
        ids = np.load(tokens / "ids.npy")
        ids[4] = len(tok) + 7
        np.save(tokens / "ids.npy", ids)
    elif damage == "offsets":
        offsets = np.load(tokens / "offsets.npy")
        offsets[2:4] = offsets[3:1:-1]
        np.save(tokens / "offsets.npy", offsets)
    else:
        (parsed / "text.npy").unlink()
    logs = []
    examples = read_source(data, log=logs.append)
    again = encode_all(Formatter(tok), examples, log=logs.append)
    assert list(again) == want and list(examples) == stored_module.load_data(data)
    said = [line for line in logs if "cannot be used" in line]
    assert len(said) == 1, logs
    assert (str(parsed) if damage == "examples text" else str(tokens)) in said[0]
    if damage != "examples text":  # rebuilt: the next run reads it
        logs.clear()
        assert list(encode_all(Formatter(tok), read_source(data), log=logs.append)) == want
        assert "read from the cache" in logs[-1] and not any("cannot be used" in line for line in logs)


def test_stored_examples_round_trip_every_kind(cache, tmp_path):
    rows = [{"prompt": "Q: é?", "completion": " ü"}, {"text": "plain text"},
            {"input": "Sky?", "choices": ["blue", "red", "navy"], "answer": "navy"},
            {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "h"},
                               {"from": "gpt", "value": "g"}]}]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    fresh = stored_module.load_data(data)
    stored = read_source(data)
    assert list(stored) == fresh and isinstance(stored[2], MultipleChoice) and isinstance(stored[0], Completion)
    assert stored[-1] == fresh[-1] and list(stored[1:3]) == fresh[1:3] and list(stored.take([3, 0])) == [fresh[3],
                                                                                                      fresh[0]]


def test_the_data_cache_directory(monkeypatch, tmp_path):
    """$EFFTUNE_DATA_CACHE moves the data cache alone (tests/conftest.py points it at a temporary
    directory for the whole suite); without it the data cache sits in $EFFTUNE_CACHE."""
    import os
    from pathlib import Path

    from efftune.cache import data_cache_dir
    assert not Path(os.environ["EFFTUNE_DATA_CACHE"]).resolve().is_relative_to(Path.home().resolve() / ".cache")
    monkeypatch.setenv("EFFTUNE_CACHE", str(tmp_path / "downloads"))
    monkeypatch.setenv("EFFTUNE_DATA_CACHE", str(tmp_path / "data"))
    assert data_cache_dir("tokens") == tmp_path / "data" / "tokens" and (tmp_path / "data" / "tokens").is_dir()
    monkeypatch.delenv("EFFTUNE_DATA_CACHE")
    assert data_cache_dir("tokens") == tmp_path / "downloads" / "tokens"


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
                                           "and were dropped (data.overflow: drop)"]
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

"""split_examples: the held-out split, and the sizes it refuses."""
import pytest

from efftune.data import Completion, split_examples
from efftune.data.examples import DEFAULT_EVAL_SIZE
from efftune.errors import DataError

EXAMPLES = [Completion(f"q{i}", f"a{i}") for i in range(30)]


def test_default_holds_out_200_or_half():
    many = [Completion(f"q{i}", "a") for i in range(1000)]
    assert len(split_examples(many, None)[1]) == DEFAULT_EVAL_SIZE == 200
    train, held = split_examples(EXAMPLES, None)
    assert len(held) == 15 and len(train) == 15 and set(train).isdisjoint(held)


def test_a_size_above_half_is_refused_for_one_source_and_cut_for_several():
    with pytest.raises(DataError, match=r"eval_size 16: task x has 30 examples, so at most 15 \(half\)"):
        split_examples(EXAMPLES, 16, source="task x")
    train, held = split_examples(EXAMPLES, 16, strict=False)
    assert len(held) == 15 and held == split_examples(EXAMPLES, 15)[1]
    assert len(split_examples(EXAMPLES, 15)[1]) == 15 and len(split_examples(EXAMPLES, 0)[1]) == 0


def test_negative_size_is_refused():
    with pytest.raises(DataError, match="eval_size must be 0 or more, got -5"):
        split_examples(EXAMPLES, -5, strict=False)

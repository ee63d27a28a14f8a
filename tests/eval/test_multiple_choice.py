import math

import torch
import torch.nn.functional as F

from efftune.data import Completion, Formatter, MultipleChoice
from efftune.eval.generate import generate
from efftune.eval.multiple_choice import choice_scores, multiple_choice_accuracy
from efftune.eval.perplexity import perplexity

EXAMPLES = [
    MultipleChoice("Q: Is the sky blue?\nA: ", ("yes", "no"), 0),
    MultipleChoice("Take 3 steps forward. Turn left.\nA: ", ("True", "False", "plausible implausible"), 2),
    MultipleChoice("0123456789 + - =", (" 1", " 2 3", " (", "x"), 1),
]


def naive_scores(model, f, ex):
    """Each choice as its own full sequence: the reference the shared-prefix layout must match."""
    out = []
    for c in ex.choices:
        p, ids = f.encode_pair(ex.prompt, c)
        with torch.no_grad():
            lp = F.log_softmax(model(input_ids=torch.tensor([p + ids])).logits[0].double(), -1)
        out.append(sum(lp[len(p) - 1 + t, tok].item() for t, tok in enumerate(ids)))
    return out


def test_shared_prefix_scores_equal_naive_scores(model, tokenizer):
    f = Formatter(tokenizer)
    got = choice_scores(model, f, EXAMPLES, row_tokens=64, rows_per_batch=2)
    for ex, scores in zip(EXAMPLES, got):
        assert len(scores) == len(ex.choices)
        for a, b in zip(scores, naive_scores(model, f, ex)):
            assert math.isclose(a, b, abs_tol=1e-4)


def test_accuracy_counts_any_correct_choice(model, tokenizer):
    f = Formatter(tokenizer)
    scores = choice_scores(model, f, EXAMPLES)
    best = [max(range(len(s)), key=s.__getitem__) for s in scores]
    relabelled = [MultipleChoice(e.prompt, e.choices, b) for e, b in zip(EXAMPLES, best)]
    assert multiple_choice_accuracy(model, f, relabelled) == 1.0
    wrong = [MultipleChoice(e.prompt, e.choices, (b + 1) % len(e.choices)) for e, b in zip(EXAMPLES, best)]
    assert multiple_choice_accuracy(model, f, wrong) == 0.0
    both = [MultipleChoice(e.prompt, e.choices, (b + 1) % len(e.choices), ((b + 1) % len(e.choices), b))
            for e, b in zip(EXAMPLES, best)]
    assert multiple_choice_accuracy(model, f, both) == 1.0


def test_perplexity_matches_mean_nll(model, tokenizer):
    f = Formatter(tokenizer)
    ex = [Completion("Q: Is grass red?\nA:", " no"), Completion("", "The quick brown fox")]
    nll, n = 0.0, 0
    for e in ex:
        enc = f.encode(e)
        with torch.no_grad():
            lp = F.log_softmax(model(input_ids=torch.tensor([enc.input_ids])).logits[0].double(), -1)
        for t, lab in enumerate(enc.labels):
            if lab != -100:
                nll -= lp[t - 1, lab].item()
                n += 1
    assert math.isclose(perplexity(model, f, ex), math.exp(nll / n), rel_tol=1e-4)


def greedy_by_hand(model, tokenizer, prompt: str, new_tokens: int) -> str:
    """Greedy decoding without a cache: one full forward per token, the argmax appended; stops at
    EOS; the new tokens decoded without special tokens."""
    ids = Formatter(tokenizer).encode_prompt(prompt)
    start = len(ids)
    for _ in range(new_tokens):
        with torch.no_grad():
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(nxt)
        if nxt == tokenizer.eos_token_id:
            break
    return tokenizer.decode(ids[start:], skip_special_tokens=True)


def test_generate_returns_the_greedy_continuation(model, tokenizer):
    for prompt in ("Q: Is the sky blue?\nA:", "Take 3 steps"):
        text = generate(model, Formatter(tokenizer), prompt, max_new_tokens=5)
        assert text == greedy_by_hand(model, tokenizer, prompt, 5) and text  # a random model still says something


def test_shared_instruction_scores_equal_naive_scores(model, tokenizer):
    """With a common instruction the rows become trees (instruction -> prompt -> choices)."""
    from efftune.eval.multiple_choice import score_rows
    instruction = "Predict the intent of the utterance. The choices are: play, stop.\n\nUtterance: "
    examples = [MultipleChoice(instruction + u + "\nIntent: ", ("play", "stop"), a)
                for u, a in [("play the fox song", 0), ("stop it", 1), ("the dog song", 0)]]
    f = Formatter(tokenizer)
    rows = score_rows(f, examples, row_tokens=512)
    assert len(rows) == 1 and rows[0].parents[:2] == [-1, 0]  # shared root, then a prompt under it
    got = choice_scores(model, f, examples)
    for ex, scores in zip(examples, got):
        for a, b in zip(scores, naive_scores(model, f, ex)):
            assert math.isclose(a, b, abs_tol=1e-4)


def test_choices_longer_than_a_row_get_a_row_of_their_own(model, tokenizer):
    # long choices (whole sentences) must not stop scoring: the example gets a longer row
    f = Formatter(tokenizer)
    ex = MultipleChoice("Q: Which edit?\nA: ", ("a very long answer " * 6, "another long answer " * 6), 1)
    got = choice_scores(model, f, [EXAMPLES[0], ex], row_tokens=16)
    for a, b in zip(got[1], naive_scores(model, f, ex)):
        assert math.isclose(a, b, abs_tol=1e-4)

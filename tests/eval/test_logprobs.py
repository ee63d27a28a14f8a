import pytest
import torch
import torch.nn.functional as F

from efftune.eval import logprobs
from efftune.eval.logprobs import ChunkedTargetLogprob, labelled_logprobs
from tests.conftest import tiny_llama


@pytest.mark.parametrize("n, chunk", [(7, 3), (6, 6), (5, 100)])
def test_chunked_values_and_gradients_equal_full_logits(n, chunk):
    torch.manual_seed(0)
    hidden = torch.randn(n, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (n,))
    g = torch.randn(n, dtype=torch.float64)
    ours = ChunkedTargetLogprob.apply(hidden, weight, targets, chunk)
    ours.backward(g)
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ref = -F.cross_entropy(h2 @ w2.T, targets, reduction="none")
    ref.backward(g)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(hidden.grad, h2.grad)
    torch.testing.assert_close(weight.grad, w2.grad)


def test_model_path_equals_logits_path(monkeypatch):
    model = tiny_llama(dtype=torch.float64)
    ids = torch.randint(0, 300, (2, 9))
    labels = ids.clone()
    labels[:, :3] = -100
    chunked = labelled_logprobs(model, ids, labels)
    monkeypatch.setattr(logprobs, "_plain_head", lambda m: None)  # force the logits_to_keep path
    plain = labelled_logprobs(model, ids, labels)
    torch.testing.assert_close(chunked, plain)
    assert chunked.shape == (2 * 6,)


def test_heads_that_do_more_take_the_plain_path():
    model = tiny_llama()
    assert logprobs._plain_head(model) is model.lm_head
    model.config.final_logit_softcapping = 30.0
    assert logprobs._plain_head(model) is None

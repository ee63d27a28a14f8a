import pytest
import torch
import torch.nn.functional as F

from efftune.forward import logprobs
from efftune.forward.logprobs import ChunkedTargetLogprob, labelled_logprobs
from tests.conftest import tiny_llama


def full_logits_check(n: int, chunk: int, hidden_trains: bool, head_trains: bool, keep: bool = False) -> list:
    """ChunkedTargetLogprob's values and gradients against full logits in float64; returns the shapes
    of the tensors it saved for backward."""
    torch.manual_seed(0)
    hidden = torch.randn(n, 8, dtype=torch.float64, requires_grad=hidden_trains)
    weight = torch.randn(11, 8, dtype=torch.float64, requires_grad=head_trains)
    targets = torch.randint(0, 11, (n,))
    g = torch.randn(n, dtype=torch.float64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        ours = ChunkedTargetLogprob.apply(hidden, weight, targets, chunk, False, keep)
    ours.backward(g)
    h2 = hidden.detach().clone().requires_grad_(hidden_trains)
    w2 = weight.detach().clone().requires_grad_(head_trains)
    ref = -F.cross_entropy(h2 @ w2.T, targets, reduction="none")
    ref.backward(g)
    torch.testing.assert_close(ours, ref)
    for mine, theirs in ((hidden, h2), (weight, w2)):
        if mine.requires_grad:
            torch.testing.assert_close(mine.grad, theirs.grad)
    return saved


@pytest.mark.parametrize("n, chunk", [(7, 3), (6, 6), (5, 100)])
@pytest.mark.parametrize("head_trains", [True, False])  # False: the input gradient is made in forward
def test_chunked_values_and_gradients_equal_full_logits(n, chunk, head_trains):
    saved = full_logits_check(n, chunk, hidden_trains=True, head_trains=head_trains)
    if not head_trains:  # only the (N, d) input-gradient rows are kept: neither the head nor any logits
        assert saved == [(n, 8)]


@pytest.mark.parametrize("n, chunk", [(7, 3), (5, 100)])
@pytest.mark.parametrize("hidden_trains", [True, False])  # False: only the head trains (no input gradient)
def test_a_trainable_head_keeping_its_logit_gradients_equals_full_logits(n, chunk, hidden_trains):
    """keep (ForwardOptions.keep_logit_grads): the logit gradient made in forward is what backward uses
    for the weight gradient; the logits are not recomputed."""
    saved = full_logits_check(n, chunk, hidden_trains=hidden_trains, head_trains=True, keep=True)
    # the input-gradient rows (when the hidden states train), the logit gradients, the hidden states and the head
    assert saved == [(n, 8)] * hidden_trains + [(n, 11), (n, 8), (11, 8)]


@pytest.mark.parametrize("autocast", [False, True])
def test_keeping_the_logit_gradients_matches_recomputing_them(autocast):
    """The two paths of a trainable head give the same loss and gradients: the same loss bits, gradients
    within fp32 rounding in fp32 (the input gradient's upstream factor comes after the product, not
    before), within bf16 rounding under autocast (the kept gradient is also rounded to bf16 before its
    upstream factor multiplies it, the recomputed one after)."""
    torch.manual_seed(0)
    hidden = torch.randn(20, 16)
    weight = torch.randn(40, 16) * 0.3
    targets = torch.randint(0, 40, (20,))
    g = torch.randn(20) / 20
    results = []
    for keep in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = ChunkedTargetLogprob.apply(h, w, targets, 7, False, keep)
        out.backward(g)
        results.append((out, h.grad, w.grad))
    tol = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-5, atol=1e-7)
    assert torch.equal(results[0][0], results[1][0])  # the forward's log-probs: the same products
    for recomputed, kept in zip(*results):
        torch.testing.assert_close(kept, recomputed, **tol)


def test_train_keeps_the_logit_gradients_unless_it_checkpoints():
    from efftune.train.loop import TrainConfig
    assert TrainConfig().forward_options().keep_logit_grads
    assert not TrainConfig(activation_checkpointing=True).forward_options().keep_logit_grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_fused_chunks_equal_the_eager_ones(dtype):
    # the compiled softmax work (used when the blocks are compiled): same values and input gradient;
    # 3 chunk sizes (7, 7, 3) so the shape-dynamic compilation is exercised
    torch.manual_seed(0)
    hidden = torch.randn(17, 16, dtype=dtype, requires_grad=True)
    weight = torch.randn(40, 16, dtype=dtype)  # a frozen head: the fused backward path
    targets = torch.randint(0, 40, (17,))
    g = torch.randn(17, dtype=torch.promote_types(dtype, torch.float32))
    outs, grads = [], []
    for fused in (False, True):
        h = hidden.detach().clone().requires_grad_()
        out = ChunkedTargetLogprob.apply(h, weight, targets, 7, fused)
        out.backward(g)
        outs.append(out)
        grads.append(h.grad)
    tol = {} if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(outs[1], outs[0], **tol)
    torch.testing.assert_close(grads[1], grads[0], **tol)


def test_the_call_chooses_the_fused_head_and_compile_blocks_sets_nothing(monkeypatch):
    """`ForwardOptions.fused_head` picks the compiled per-chunk work for that call only (the compiled
    functions are stood in for by the eager ones they compile, so the values must be equal exactly);
    compiling the blocks no longer marks the model."""
    from efftune.forward.options import ForwardOptions
    from efftune.train.compile import compile_blocks, uncompile_blocks
    model = tiny_llama(dtype=torch.float64)
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :3] = -100
    eager = {"logprob": logprobs._chunk_logprob, "logprob_grad": logprobs._chunk_logprob_and_grad}
    asked = []
    monkeypatch.setattr(logprobs, "_fused", lambda name: asked.append(name) or eager[name])
    plain = labelled_logprobs(model, ids, labels)
    assert asked == []
    fused = labelled_logprobs(model, ids, labels, options=ForwardOptions(fused_head=True))
    assert asked == ["logprob"]  # the frozen-input path: log-probs only, no input gradient
    again = labelled_logprobs(model, ids, labels, options=ForwardOptions())
    assert asked == ["logprob"]
    torch.testing.assert_close(fused, plain, atol=0, rtol=0)
    torch.testing.assert_close(again, plain, atol=0, rtol=0)
    before = set(vars(model))
    assert compile_blocks(model) == 2
    assert set(vars(model)) == before
    uncompile_blocks(model)


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


def test_bf16_logit_gradient_is_rounded_once():
    # a confident target (p near 1): its entry 1 − p must be made in fp32 and rounded once, not
    # rounded as −p first (which would leave 1 − p with an absolute error of bf16's spacing near 1)
    logits = torch.tensor([[9.0, 2.0, 1.0, 0.5], [0.1, 0.2, 8.0, 0.0]])
    targets = torch.tensor([0, 2])
    logprob, dlogits = logprobs._chunk_logprob_and_grad(logits.clone(), targets, torch.bfloat16)
    ref = torch.nn.functional.one_hot(targets, 4).double() - logits.double().softmax(-1)
    assert dlogits.dtype == torch.bfloat16
    torch.testing.assert_close(dlogits.double(), ref.to(torch.bfloat16).double(), atol=0, rtol=0)
    torch.testing.assert_close(logprob.double(), logits.double().log_softmax(-1).gather(1, targets[:, None])[:, 0],
                               atol=1e-6, rtol=1e-6)


def _cuda_triton() -> bool:
    from efftune.methods.lora.swiglu import triton_available
    return torch.cuda.is_available() and triton_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_triton(), reason="needs CUDA and Triton (the LM-head kernels)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, v", [(5, 37), (300, 5000), (64, 128256)])
def test_head_kernels_match_the_reference(dtype, n, v):
    from efftune.forward import head_triton
    torch.manual_seed(0)
    logits = (torch.randn(n, v, device="cuda") * 4).to(dtype)
    logits[0, 1] = 30.0  # a confident row: its target entry 1 − p is rounded once
    targets = torch.randint(0, v, (n,), device="cuda")
    targets[0], targets[-1] = 1, v - 1  # the first and the last column
    ref_lp, ref_grad = logprobs._chunk_logprob_and_grad(logits.clone(), targets, dtype)
    work = logits.clone()
    lp, grad = head_triton.logprob_and_grad(work, targets, dtype)
    assert grad.dtype == dtype and lp.dtype == torch.float32
    assert grad.data_ptr() == work.data_ptr()  # same dtype: the gradient takes the logits' place
    torch.testing.assert_close(lp, ref_lp, atol=1e-4, rtol=1e-5)
    # fp32 sums in another order: at most one step of the output dtype's spacing apart
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=2 ** -8, rtol=2 ** -7)
    torch.testing.assert_close(grad.float(), ref_grad.float(), **tol)
    assert grad[0, 1].float().item() == pytest.approx(ref_grad[0, 1].float().item(), abs=2 ** -9)
    # another output dtype: a new tensor, the logits untouched
    lp2, grad2 = head_triton.logprob_and_grad(logits, targets, torch.float16)
    assert grad2.dtype == torch.float16 and torch.equal(lp2, lp)


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_triton(), reason="needs CUDA and Triton (the LM-head kernels)")
@pytest.mark.parametrize("head_trains", [False, True])  # the gradient made in forward, or in backward
def test_chunked_head_on_cuda_equals_full_logits(head_trains):
    torch.manual_seed(0)
    hidden = torch.randn(70, 32, device="cuda", requires_grad=True)
    weight = torch.randn(3001, 32, device="cuda", requires_grad=head_trains)
    targets = torch.randint(0, 3001, (70,), device="cuda")
    g = torch.randn(70, device="cuda")
    ours = ChunkedTargetLogprob.apply(hidden, weight, targets, 32)
    ours.backward(g)
    h2 = hidden.detach().double().requires_grad_()
    w2 = weight.detach().double().requires_grad_(head_trains)
    ref = -F.cross_entropy(h2 @ w2.T, targets, reduction="none")
    ref.backward(g.double())
    torch.testing.assert_close(ours.double(), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(hidden.grad.double(), h2.grad, atol=1e-3, rtol=1e-3)
    if head_trains:
        torch.testing.assert_close(weight.grad.double(), w2.grad, atol=1e-3, rtol=1e-3)


class MatmulDtypes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the input dtypes of every matrix product run inside it."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.seen.append(tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("head_trains", [True, False])
def test_fp32_masters_under_autocast_take_autocast_products_in_backward_too(head_trains):
    """Full fine-tuning keeps fp32 weights under bf16 autocast; backward runs outside autocast, and the
    trainable head's three products there were fp32 GEMMs (half the tokens/s of a plain loop at a 128k
    vocabulary). Every product is bf16 now, forward and backward, and the values are what plain
    autocast (`F.linear` then log-softmax, as transformers' loss does) gives."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 32, generator=g, requires_grad=True)
    weight = torch.randn(300, 32, generator=g).mul_(0.2).requires_grad_(head_trains)
    targets = torch.randint(0, 300, (40,), generator=g)
    mode = MatmulDtypes()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with mode:
            out = ChunkedTargetLogprob.apply(hidden, weight, targets, 16, False)
        ref = F.log_softmax(F.linear(hidden, weight).float(), -1).gather(1, targets[:, None])[:, 0]
    grad = torch.randn(40, generator=g)
    with mode:
        got = torch.autograd.grad(out, [hidden, weight] if head_trains else [hidden], grad)
    want = torch.autograd.grad(ref, [hidden, weight] if head_trains else [hidden], grad)
    assert mode.seen and all(set(d) == {torch.bfloat16} for d in mode.seen), mode.seen
    assert out.dtype == torch.float32 and got[0].dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=0)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=2e-2 * b.abs().max().item(), rtol=0)

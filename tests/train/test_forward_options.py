"""Forward options travel with each call (`efftune.forward.options.ForwardOptions`): train() and the
evaluators pass them down, and nothing stays on the model or its config after them, an exception
inside them included."""
import pytest
import torch

from efftune.compose.lorahub import FewShotLoss
from efftune.data import Completion, Formatter, MultipleChoice
from efftune.eval import multiple_choice as mc_module
from efftune.eval.multiple_choice import multiple_choice_accuracy
from efftune.eval.perplexity import perplexity
from efftune.finetune import evaluator
from efftune.forward import causal, flash4, flex
from efftune.forward.logprobs import target_logprobs
from efftune.forward.options import ForwardOptions
from efftune.methods.lora.config import LoraConfig
from efftune.methods.lora.model import add_lora
from efftune.train import loop
from efftune.train.loop import TrainConfig, train
from tests.conftest import randomize_lora, tiny_llama
from tests.forward.test_flex import _llama16, _sequences
from tests.train.test_loop import PROMPTS, data

FLEX = ForwardOptions(masked_attention="flex")
CHOICES = [MultipleChoice(p, ("yes", "no"), i % 2) for i, p in enumerate(PROMPTS)]


def state(model) -> tuple:
    """What a forward's options could leave behind: the model's attribute names, its config's values."""
    return set(vars(model)), dict(vars(model.config))


def assert_untouched(model, before: tuple) -> None:
    assert state(model) == before
    assert model.config._attn_implementation == "sdpa"
    assert not [name for name in vars(model) if "efftune" in name]


@pytest.fixture
def kernels_anywhere(monkeypatch):
    """flash4 and flex pass train()'s availability check on CPU (flash4's function falls back to SDPA
    off the GPU; flex runs no-grad forwards on CPU)."""
    monkeypatch.setattr(flash4, "unavailable_reason", lambda device: None)
    monkeypatch.setattr(flex, "unavailable_reason", lambda device: None)


def test_train_passes_its_options_to_every_forward_and_leaves_nothing(tokenizer, tmp_path, monkeypatch,
                                                                    kernels_anywhere):
    """Every training and evaluation forward gets the run's options (the compiled head with
    train.compile); the model and its config are as before the run."""
    seen = []

    def recording(where, real):
        def call(*args, options, **kwargs):
            seen.append((where, options))
            return real(*args, options=options, **kwargs)
        return call
    monkeypatch.setattr(loop, "target_logprobs", recording("train", loop.target_logprobs))
    monkeypatch.setattr(mc_module, "target_logprobs", recording("eval", mc_module.target_logprobs))
    compiled = []  # the blocks stay eager here: what counts is the options train() passes with compile on
    monkeypatch.setattr(loop, "compile_blocks", lambda model, **kwargs: compiled.append(kwargs) or 2)
    model = tiny_llama()
    add_lora(model, LoraConfig(r=4))
    before = state(model)
    config = TrainConfig(steps=2, batch_size=4, warmup_steps=1, eval_every=1, compile=True, attention="flash4",
                         masked_attention="flex")
    evaluate = evaluator(Formatter(tokenizer), CHOICES, config.forward_options())
    result = train(model, data(tokenizer), config, tmp_path, pad_id=tokenizer.pad_token_id, evaluate=evaluate)
    want = ForwardOptions(attention="flash4", masked_attention="flex", static_masks=False, fused_head=True,
                          keep_logit_grads=True)
    assert config.forward_options() == want
    assert len(compiled) == 1 and len(result.evals) == 3
    assert {where for where, _ in seen} == {"train", "eval"} and len(seen) >= 2 + 3
    assert all(options == want for _, options in seen)
    assert_untouched(model, before)


@pytest.mark.parametrize("where", ["training forward", "evaluation forward"])
def test_an_exception_inside_a_forward_leaves_nothing(where, tokenizer, tmp_path, kernels_anywhere):
    """A forward that raises while efftune's attention runs (flex over the training rows' mask, flash4 over
    an evaluation's maskless rows): train() raises it, and the model's own attention is back."""
    if where == "training forward":  # prompts that share 12 tokens: tree rows, with a mask
        model, config, seqs = _llama16().eval(), TrainConfig(steps=2, batch_size=4, masked_attention="flex"), \
            _sequences(8, 12)
    else:
        model, config, seqs = tiny_llama(), TrainConfig(steps=2, batch_size=4, attention="flash4"), data(tokenizer)
    add_lora(model, LoraConfig(r=4))
    before = state(model)
    ids = torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(0))
    rows, cols = torch.arange(2).repeat_interleave(6), torch.arange(6).repeat(2)

    def evaluate(m, step):  # maskless rows: the plain causal path
        with torch.no_grad():
            return {"lp": float(target_logprobs(m, ids, rows, cols, ids[:, 1:].reshape(-1),
                                                options=config.forward_options()).sum())}
    seen = []

    def boom(module, args):
        if module.training == (where == "training forward"):
            seen.append(model.config._attn_implementation)
            raise RuntimeError("boom")
    model.model.layers[0].register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        train(model, seqs, config, tmp_path, pad_id=tokenizer.pad_token_id, evaluate=evaluate)
    assert seen == [causal.MASKED_FLEX if where == "training forward" else causal.PLAIN_CAUSAL_FLASH4]
    assert_untouched(model, before)


@pytest.fixture
def fresh_flex_compile():
    """The evaluations below run FlexAttention at several shapes, after which Dynamo compiles it
    shape-dynamic; Inductor's CPU flex template fails to build some dynamic shapes other tests use, so
    the compile caches are dropped afterwards (as if this test had not run)."""
    yield
    torch._dynamo.reset()


def test_evaluators_run_each_call_with_its_own_options(tokenizer, monkeypatch, fresh_flex_compile):
    """Multiple-choice accuracy, perplexity and LoraHub's few-shot loss on one model: a call with flex
    options runs FlexAttention (CPU, no grad), the next call with the default runs none, both score the
    same, and nothing stays on the model, also after an evaluation that raised."""
    model = _llama16().eval()
    add_lora(model, LoraConfig(r=4, alpha=8))
    randomize_lora(model)
    before = state(model)
    calls = []
    real = flex.attention
    monkeypatch.setattr(flex, "attention", lambda *a: calls.append(1) or real(*a))
    f = Formatter(tokenizer)
    texts = [Completion(p, "yes" if i % 2 else "no") for i, p in enumerate(PROMPTS)]
    runs = {"accuracy": lambda o: multiple_choice_accuracy(model, f, CHOICES, options=o),
            "perplexity": lambda o: perplexity(model, f, texts, options=o),
            "few-shot loss": lambda o: FewShotLoss(model, f, CHOICES, options=o)()}
    for name, run in runs.items():
        calls.clear()
        with_flex = run(FLEX)
        assert calls, name  # flex ran: every layer of every forward
        calls.clear()
        with_sdpa = run(ForwardOptions())
        assert not calls, name
        assert with_flex == pytest.approx(with_sdpa, rel=1e-5), name
        assert_untouched(model, before)

    def boom(module, args):
        assert model.config._attn_implementation == causal.MASKED_FLEX
        raise RuntimeError("boom")
    model.model.layers[1].register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        perplexity(model, f, texts, options=FLEX)
    assert_untouched(model, before)

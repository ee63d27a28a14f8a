"""FlexAttention for masked rows (packing, token trees): the block mask, the model hook, the option.

FlexAttention has no backward on CPU, so CPU runs check the block mask and no-grad forwards against
SDPA with the same dense mask; the GPU tests at the end check training."""
import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from efftune.data.layout import collate, training_rows
from efftune.data.tokenize import Encoded
from efftune.errors import ConfigError
from efftune.forward import causal, flex
from efftune.forward.logprobs import target_logprobs
from efftune.forward.options import DEFAULT, ForwardOptions
from efftune.methods.lora.config import LoraConfig
from efftune.methods.lora.model import add_lora
from efftune.train.loop import TrainConfig
from tests.conftest import randomize_lora, tiny_llama

IGN = -100
FLEX = ForwardOptions(masked_attention="flex")


def _sequences(n: int, shared: int, seed: int = 0) -> list[Encoded]:
    """Prompts that share `shared` leading tokens (a tree when >= 8), answers labelled."""
    g = torch.Generator().manual_seed(seed)
    trunk = torch.randint(3, 300, (shared,), generator=g).tolist()
    out = []
    for i in range(n):
        rest = torch.randint(3, 300, (5 + 7 * i % 23,), generator=g).tolist()
        answer = torch.randint(3, 300, (3,), generator=g).tolist()
        ids = trunk + rest + answer
        out.append(Encoded(ids, [IGN] * (len(ids) - 3) + answer))
    return out


def _batch(shared: int, max_length: int = 150, length: int | None = None):
    return collate(training_rows(_sequences(12, shared), max_length), 1, "sdpa", length)


@pytest.mark.parametrize("shared,length", [(12, None), (0, None), (12, 300)])
def test_block_mask_is_the_dense_mask(shared, length):
    batch = _batch(shared, length=length)  # trees / packed roots; 150 and 300 tokens: partial blocks
    mask = batch.mask
    assert mask is not None and mask.dtype == torch.bool
    block = flex.block_mask(mask)
    rows, _, n, m = mask.shape
    assert block.shape == (rows, 1, n, m)
    dense = create_mask(block.mask_mod, rows, 1, n, m, device="cpu")
    assert torch.equal(dense, mask)
    # a block listed as full has no masked entry; one left out has no allowed entry
    kv_full, kv_partial = block.full_kv_num_blocks, block.kv_num_blocks
    covered = torch.zeros(rows, 1, -(-n // flex.BLOCK), -(-m // flex.BLOCK), dtype=torch.bool)
    for r in range(rows):
        for qb in range(covered.shape[2]):
            for idx, count in ((block.full_kv_indices, kv_full), (block.kv_indices, kv_partial)):
                covered[r, 0, qb, idx[r, 0, qb, :count[r, 0, qb]].long()] = True
    padded = torch.zeros(rows, 1, covered.shape[2] * flex.BLOCK, covered.shape[3] * flex.BLOCK, dtype=torch.bool)
    padded[..., :n, :m] = mask
    any_allowed = padded.unflatten(2, (-1, flex.BLOCK)).unflatten(4, (-1, flex.BLOCK)).any(5).any(3)
    assert torch.equal(covered, any_allowed)


def test_static_block_masks_keep_their_storage_and_take_the_new_mask():
    """For CUDA graphs: one BlockMask per mask shape, refilled in place by each call."""
    first, second = _batch(12, length=300).mask, _batch(0, length=300).mask
    assert not torch.equal(first, second)
    a = flex.block_mask(first, static=True)
    pointers = [getattr(a, name).data_ptr() for name in flex._TENSORS]
    b = flex.block_mask(second, static=True)
    assert b is a and [getattr(b, name).data_ptr() for name in flex._TENSORS] == pointers
    rows, _, n, m = second.shape
    assert torch.equal(create_mask(b.mask_mod, rows, 1, n, m, device="cpu"), second)
    fresh = flex.block_mask(second)
    for name in flex._TENSORS:
        assert torch.equal(getattr(b, name), getattr(fresh, name)), name
    assert flex.block_mask(first) is not flex.block_mask(first)  # not static: new tensors each call


def test_block_mask_rejects_other_masks():
    with pytest.raises(ValueError, match="boolean mask"):
        flex.block_mask(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="boolean mask"):
        flex.block_mask(torch.ones(2, 8, 8, dtype=torch.bool))


def _logprobs(model, batch, options=DEFAULT):
    return target_logprobs(model, batch.input_ids, batch.rows, batch.sources, batch.targets, batch.position_ids,
                           batch.mask, options=options)


def _llama16(dtype=torch.float32):
    """The tests' tiny Llama with heads of 16 (FlexAttention takes no smaller)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, attn_implementation="sdpa",
                      initializer_range=0.2)
    return LlamaForCausalLM(cfg).to(dtype)


@pytest.mark.parametrize("shared", [12, 0])
def test_model_forward_with_flex_equals_sdpa(shared, monkeypatch):
    """A LoRA Llama over tree rows and packed rows: FlexAttention's log-probs equal SDPA's with the
    same mask (no grad: FlexAttention's CPU backward does not exist). Calls on the one model with
    other options each run the kernel their own options name."""
    monkeypatch.setattr(flex, "unavailable_reason", lambda device: None)
    model = _llama16().eval()
    add_lora(model, LoraConfig(r=4, alpha=8))
    randomize_lora(model)
    batch = _batch(shared)
    seen = []
    real = flex.attention
    monkeypatch.setattr(flex, "attention", lambda *a: seen.append(model.config._attn_implementation) or real(*a))
    with torch.no_grad():
        want = _logprobs(model, batch)
        assert not seen
        got = _logprobs(model, batch, FLEX)
        assert seen == [causal.MASKED_FLEX] * 2  # one call per layer
        assert model.config._attn_implementation == "sdpa"  # put back after the forward
        again = _logprobs(model, batch, ForwardOptions())  # the same model, sdpa's options: no flex call
    assert seen == [causal.MASKED_FLEX] * 2
    assert not [name for name in vars(model) if name.startswith("_efftune")]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, want, atol=0, rtol=0)


def test_maskless_rows_and_other_masks_are_left_alone(monkeypatch):
    monkeypatch.setattr(flex, "unavailable_reason", lambda device: None)
    small = tiny_llama()  # heads of 8: not for the kernels
    with causal.masked_rows(small, torch.ones(1, 1, 4, 4, dtype=torch.bool), FLEX) as mask:
        assert mask.dtype == torch.bool and small.config._attn_implementation == "sdpa"
    model = _llama16()
    with causal.masked_rows(model, None, FLEX) as mask:
        assert mask is None and model.config._attn_implementation == "sdpa"
    additive = torch.zeros(1, 1, 4, 4)
    with causal.masked_rows(model, additive, FLEX) as mask:
        assert mask is additive
    boolean = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    with causal.masked_rows(model, boolean) as mask:  # sdpa's options (the default): the mask itself
        assert mask is boolean and model.config._attn_implementation == "sdpa"
    model.config._attn_implementation = "eager"  # not a model the hook serves
    with causal.masked_rows(model, boolean, FLEX) as mask:
        assert mask.dtype == torch.bool
    model.config._attn_implementation = "sdpa"
    with pytest.raises(RuntimeError, match="boom"):
        with causal.masked_rows(model, boolean, FLEX) as mask:
            assert model.config._attn_implementation == causal.MASKED_FLEX
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_attention_dropout_is_refused(monkeypatch):
    monkeypatch.setattr(flex, "unavailable_reason", lambda device: None)
    model = tiny_llama()
    model.config.attention_dropout = 0.1
    with pytest.raises(ConfigError, match="train.masked_attention: flex has no attention dropout.*0.1"):
        FLEX.check(model, "train.")


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention trains on CUDA only")


def _train_steps(model, batches, options: ForwardOptions, graphs: bool, steps: int = 4):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    out = []
    for i in range(steps):
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        batch = batches[i % len(batches)]
        loss = -_logprobs(model, batch, options).mean()
        loss.backward()
        out.append((loss.detach().float(), [p.grad.float().clone() for p in params]))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return out


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("compiled,graphs", [(False, False), (True, False), (True, True)])
def test_training_with_flex_equals_sdpa_on_gpu(compiled, graphs):
    """Loss and LoRA gradients over tree and packed rows, FlexAttention against SDPA with the mask
    (fp32), eager, with compiled blocks, and with compiled blocks replayed as CUDA graphs (static block
    masks; new rows every step)."""
    from efftune.train.compile import compile_blocks, uncompile_blocks
    batches = [_batch(12, length=256).to("cuda"), _batch(0, length=256).to("cuda")]
    if not graphs:  # rows of another length, not whole blocks (graphs would record each shape again)
        batches.append(_batch(12).to("cuda"))
    runs = []
    for kernel in ("sdpa", "flex"):
        model = _llama16().cuda().train()
        add_lora(model, LoraConfig(r=4, alpha=8))
        randomize_lora(model)
        # as train() passes them: static block masks with graphs, the compiled head with compiled blocks
        options = ForwardOptions(masked_attention=kernel, static_masks=graphs, fused_head=compiled)
        if compiled:
            compile_blocks(model, cuda_graphs=graphs)
        runs.append(_train_steps(model, batches, options, graphs))
        if compiled:
            uncompile_blocks(model)
    for (loss_a, grads_a), (loss_b, grads_b) in zip(*runs):
        torch.testing.assert_close(loss_b, loss_a, atol=1e-4, rtol=1e-4)
        for a, b in zip(grads_a, grads_b):
            assert ((a - b).norm() / a.norm()) < 1e-3


@pytest.mark.gpu
@requires_cuda
def test_train_loop_with_flex_and_cuda_graphs_equals_sdpa_on_gpu(tmp_path):
    """`train()` with train.masked_attention: flex over tree rows, two micro-batches a step, compiled
    blocks replayed as CUDA graphs (static block masks), an evaluation in between: the losses, gradient
    norms and trained factors of SDPA with the mask, in fp32."""
    import json

    from efftune.train.loop import train
    seqs = _sequences(12, shared=12)

    @torch.no_grad()
    def probe(model, step):
        return {"n": float(model(torch.ones(1, 5, dtype=torch.long, device="cuda")).logits.sum())}

    runs = []
    for kernel in ("sdpa", "flex"):
        model = _llama16().cuda()
        add_lora(model, LoraConfig(r=4, alpha=8))
        randomize_lora(model)
        out = tmp_path / kernel
        train(model, seqs, TrainConfig(steps=3, batch_size=6, micro_batch_size=3, lr=1e-2, warmup_steps=1,
                                       max_length=128, precision="fp32", compile=True, cuda_graphs=True,
                                       eval_every=1, masked_attention=kernel), out, pad_id=1, evaluate=probe)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs.append(([(r["loss"], r["grad_norm"]) for r in rows if "loss" in r],
                     {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}))
        assert model.config._attn_implementation == "sdpa"  # nothing left on the model
        assert not [name for name in vars(model) if name.startswith("_efftune")]
    (log_a, params_a), (log_b, params_b) = runs
    assert len(log_b) == 3
    for (loss_a, norm_a), (loss_b, norm_b) in zip(log_a, log_b):
        assert abs(loss_a - loss_b) < 1e-4 and abs(norm_a - norm_b) < 1e-3 * norm_a
    for name in params_a:
        torch.testing.assert_close(params_b[name], params_a[name], atol=1e-4, rtol=1e-3, msg=name)

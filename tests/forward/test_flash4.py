"""FlashAttention-4 wiring: the custom ops, their autograd, transformers' attention hook, the option.

CPU runs put reference kernels (float64 math with the package's calling convention and layouts)
where the package's would be, so everything around the kernels is checked against SDPA here; the
GPU test at the end runs the real kernels where the package is installed."""
import math

import pytest
import torch
import torch.nn.functional as F

from efftune.forward import causal, flash4
from efftune.forward.logprobs import target_logprobs
from efftune.forward.options import DEFAULT, ForwardOptions
from efftune.methods.lora.config import LoraConfig
from efftune.methods.lora.model import add_lora


def _reference_math(q, k, v, scale):
    """q [B, T, H, D], k/v [B, T, Hkv, D] -> out [B, T, H, D], lse [B, H, T]."""
    group = q.shape[2] // k.shape[2]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    kh, vh = kh.repeat_interleave(group, 1), vh.repeat_interleave(group, 1)
    scores = (qh @ kh.transpose(-1, -2)) * scale
    t = q.shape[1]
    scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    lse = torch.logsumexp(scores.float(), -1)
    out = torch.softmax(scores, -1) @ vh
    return out.transpose(1, 2), lse


class ReferenceKernels:
    """The package's `_flash_attn_fwd` / `_flash_attn_bwd` calling conventions, in plain torch."""

    def __init__(self):
        self.calls = {"forward": 0, "backward": 0}

    def forward(self, q, k, v, softmax_scale=None, causal=False, return_lse=False):
        assert causal and return_lse and q.dim() == 4 and q.stride(-1) == 1
        self.calls["forward"] += 1
        out, lse = _reference_math(q, k, v, softmax_scale)
        return out.contiguous(), lse, None, None, None

    def backward(self, q, k, v, out, dout, lse, softmax_scale, causal):
        """Attention's gradient written out (a custom op's body runs below autograd)."""
        assert causal and dout.shape == out.shape and lse.dtype == torch.float32
        self.calls["backward"] += 1
        group = q.shape[2] // k.shape[2]
        qh, oh, doh = q.transpose(1, 2), out.transpose(1, 2), dout.transpose(1, 2)
        kh, vh = (t.transpose(1, 2).repeat_interleave(group, 1) for t in (k, v))
        scores = (qh @ kh.transpose(-1, -2)) * softmax_scale
        p = torch.softmax(scores.masked_fill(~torch.ones(scores.shape[-2:], dtype=torch.bool).tril(), float("-inf")), -1)
        dv = p.transpose(-1, -2) @ doh
        ds = p * (doh @ vh.transpose(-1, -2) - (doh * oh).sum(-1, keepdim=True)) * softmax_scale
        dq, dk = ds @ kh, ds.transpose(-1, -2) @ qh
        fold = lambda t: t.unflatten(1, (-1, group)).sum(2).transpose(1, 2).contiguous()  # sum each KV head's group
        return dq.transpose(1, 2).contiguous(), fold(dk), fold(dv)

    def __call__(self):
        return self.forward, self.backward


@pytest.fixture
def kernels(monkeypatch):
    ref = ReferenceKernels()
    monkeypatch.setattr(flash4, "_kernels", ref)
    return ref


def _qkv(heads=4, kv_heads=2, tokens=7, dim=16, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, heads, tokens, dim, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(2, kv_heads, tokens, dim, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(2, kv_heads, tokens, dim, generator=g, dtype=dtype, requires_grad=True)
    return q, k, v


def test_ops_match_sdpa_with_gqa(kernels):
    q, k, v = _qkv()
    scale = 0.3
    out = flash4.causal_attention(q, k, v, scale)  # [B, T, H, D]
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, ref)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)
    assert kernels.calls == {"forward": 1, "backward": 1}


def test_ops_pass_opcheck(kernels):
    """Fake (meta) shapes agree with the real outputs, and the ops survive torch.compile's checks."""
    q, k, v = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in _qkv())
    torch.library.opcheck(flash4.flash4_causal, (q, k, v, 0.25))
    out, lse = flash4.flash4_causal(q, k, v, 0.25)
    assert lse.shape == (2, 4, 7) and lse.dtype == torch.float32
    inputs = [t.detach() for t in (torch.randn_like(out), q, k, v, out, lse)]
    torch.library.opcheck(flash4.flash4_causal_backward, (*inputs, 0.25))
    # heads-major memory (not what the model passes): the gradients still come back contiguous, as the fake says
    q2, k2, v2 = (t.detach().transpose(1, 2) for t in _qkv())
    out2, lse2 = flash4.flash4_causal(q2, k2, v2, 0.25)
    torch.library.opcheck(flash4.flash4_causal_backward, (torch.randn_like(out2), q2, k2, v2, out2, lse2, 0.25))
    assert all(g.is_contiguous() for g in flash4.flash4_causal_backward(torch.randn_like(out2), q2, k2, v2,
                                                                         out2, lse2, 0.25))


def test_compiled_graph_calls_the_op_once_each_way(kernels):
    q, k, v = _qkv()
    fn = torch.compile(lambda q, k, v: (flash4.causal_attention(q * 1.0, k, v, 0.25) ** 2).sum(),
                       backend="aot_eager", fullgraph=True)
    fn(q, k, v).backward()
    eager_grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    (flash4.causal_attention(q, k, v, 0.25) ** 2).sum().backward()
    for t, want in zip((q, k, v), eager_grads):
        torch.testing.assert_close(t.grad, want)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=64, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).double()
    add_lora(model, LoraConfig(r=4, alpha=8))
    with torch.no_grad():  # B starts at zero; nonzero B makes every factor's gradient nonzero
        for name, p in model.named_parameters():
            if p.requires_grad and "B" in name.rsplit(".", 1)[-1]:
                p.normal_(std=0.1)
    return model


def _loss_and_grads(model, ids, options=DEFAULT):
    model.zero_grad()
    rows = torch.arange(ids.shape[0]).repeat_interleave(ids.shape[1] - 1)
    cols = torch.arange(ids.shape[1] - 1).repeat(ids.shape[0])
    loss = -target_logprobs(model, ids, rows, cols, ids[:, 1:].reshape(-1), options=options).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_model_with_flash4_trains_like_sdpa(kernels, monkeypatch):
    monkeypatch.setattr(flash4, "unavailable_reason", lambda device: None)
    monkeypatch.setattr(flash4, "supports", lambda q, k: True)  # CPU float64 stands in for the GPU here
    model = _tiny_llama()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    loss_sdpa, grads_sdpa = _loss_and_grads(model, ids)
    assert kernels.calls["forward"] == 0
    loss_fa, grads_fa = _loss_and_grads(model, ids, ForwardOptions(attention="flash4"))
    assert kernels.calls == {"forward": 2, "backward": 2}  # one per layer each way
    torch.testing.assert_close(loss_fa, loss_sdpa)
    assert grads_fa.keys() == grads_sdpa.keys()
    for name in grads_sdpa:
        torch.testing.assert_close(grads_fa[name], grads_sdpa[name], msg=name)
    assert model.config._attn_implementation == "sdpa"  # put back after each forward
    _loss_and_grads(model, ids, ForwardOptions())  # the next call's own options: sdpa
    assert kernels.calls["forward"] == 2
    assert not [name for name in vars(model) if name.startswith("_efftune")]


def test_inputs_the_kernels_do_not_take_go_to_sdpa(kernels):
    q, k, v = _qkv()
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = q.shape[1] // k.shape[1], True
    # CPU float64: not for the kernels; attention dropout while training: neither
    out, _ = causal._plain_causal_flash4(module, q, k, v, None, scaling=0.25)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, ref)
    assert kernels.calls["forward"] == 0
    assert not flash4.supports(q, k)
    if torch.cuda.is_available():
        qb, kb = q.detach().cuda().bfloat16(), k.detach().cuda().bfloat16()
        assert flash4.supports(qb, kb) == (q.shape[-1] in flash4.HEAD_DIMS)


requires_flash4 = pytest.mark.skipif(
    not torch.cuda.is_available() or flash4.unavailable_reason(torch.device("cuda")) is not None,
    reason="needs a Hopper/Blackwell GPU and the flash-attn-4 package")


@pytest.mark.gpu
@requires_flash4
@pytest.mark.parametrize("dim", [64, 128])
def test_real_kernels_match_sdpa_on_gpu(dim):
    q, k, v = (t.detach().cuda().bfloat16().requires_grad_() for t in _qkv(heads=8, kv_heads=2, tokens=1000,
                                                                        dim=dim, dtype=torch.float32))
    scale = 1 / math.sqrt(dim)
    out = flash4.causal_attention(q, k, v, scale)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q64, k64, v64, is_causal=True, scale=scale, enable_gqa=True).transpose(1, 2)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    for got, want in zip(grads, ref_grads):
        assert ((got.double() - want).norm() / want.norm()) < 1e-2


@pytest.mark.gpu
@requires_flash4
def test_compiled_blocks_replayed_as_cuda_graphs_train_like_eager_on_gpu():
    """The kernels inside compiled, graph-replayed blocks: each step's gradients (new token ids and
    weights every step, so a kernel left out of the replay would show) match eager ones."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from efftune.train.compile import compile_blocks, uncompile_blocks
    steps = []
    for graphs in (False, True):
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             attn_implementation="sdpa")
        model = LlamaForCausalLM(config).cuda().bfloat16().train()
        add_lora(model, LoraConfig(r=8, alpha=16))
        params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad and name.endswith("lora_B"):
                    p.normal_(std=0.05)
        # as train() passes them: the compiled head with compiled blocks
        options = ForwardOptions(attention="flash4", fused_head=graphs)
        if graphs:
            compile_blocks(model, cuda_graphs=True)
        opt = torch.optim.SGD(params, lr=0.5)
        g = torch.Generator(device="cuda").manual_seed(1)
        grads = []
        for _ in range(5):  # graphs record on the second call and replay from the third
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            ids = torch.randint(0, 256, (2, 384), device="cuda", generator=g)
            rows = torch.arange(2, device="cuda").repeat_interleave(383)
            cols = torch.arange(383, device="cuda").repeat(2)
            loss = -target_logprobs(model, ids, rows, cols, ids[:, 1:].reshape(-1), options=options).mean()
            loss.backward()
            grads.append([p.grad.float().clone() for p in params])
            opt.step()
            opt.zero_grad(set_to_none=True)
        if graphs:
            uncompile_blocks(model)
        steps.append(grads)
    for eager, graphed in zip(*steps):
        for a, b in zip(eager, graphed):
            assert ((a - b).norm() / a.norm()) < 5e-2

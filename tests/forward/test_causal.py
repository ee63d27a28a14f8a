from unittest import mock

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, masking_utils

from efftune.data.layout import Row, collate
from efftune.errors import ConfigError, EfftuneError
from efftune.forward import causal
from efftune.forward.causal import PLAIN_CAUSAL, _plain_causal_sdpa, plain_causal, qualifies
from efftune.forward.logprobs import target_logprobs
from efftune.forward.options import ForwardOptions
from tests.conftest import tiny_llama


def every_token(ids):
    b, n = ids.shape
    rows = torch.arange(b).repeat_interleave(n - 1)
    cols = torch.arange(1, n).repeat(b)
    return rows, cols - 1, ids[rows, cols]


def test_maskless_rows_skip_mask_preparation_and_score_the_same(model64):
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    spy = mock.patch.object(masking_utils, "find_packed_sequence_indices",
                            wraps=masking_utils.find_packed_sequence_indices)
    with spy as packed_check:
        fast = target_logprobs(model64, ids, *every_token(ids))
        assert packed_check.call_count == 0  # the host-syncing check never ran
        reference = target_logprobs(model64, ids, *every_token(ids), position_ids=torch.arange(9).expand(2, 9))
        assert packed_check.call_count == 1  # explicit positions: transformers' own path
    torch.testing.assert_close(fast, reference, atol=1e-12, rtol=1e-12)
    assert model64.config._attn_implementation == "sdpa"  # restored


def test_padded_plain_rows_collate_without_positions_and_mask(model64):
    seqs = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    rows = []
    for s in seqs:
        row = Row()
        row.add(s, labels=[-100] + s[1:])
        rows.append(row)
    batch = collate(rows, pad_id=0)
    assert batch.position_ids is None and batch.mask is None
    together = target_logprobs(model64, batch.input_ids, batch.rows, batch.sources, batch.targets)
    alone = torch.cat([target_logprobs(model64, torch.tensor([s]), *every_token(torch.tensor([s]))) for s in seqs])
    torch.testing.assert_close(together, alone, atol=1e-12, rtol=1e-12)


def test_only_plain_causal_models_qualify():
    assert qualifies(tiny_llama())
    eager = tiny_llama()
    eager.config._attn_implementation = "eager"
    assert not qualifies(eager)
    windowed = MistralForCausalLM(MistralConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                                sliding_window=4, attn_implementation="sdpa"))
    assert not qualifies(windowed)  # its mask is not plain causal past 4 tokens
    with plain_causal(windowed, None, None):
        assert windowed.config._attn_implementation == "sdpa"


def test_prefix_tuned_models_keep_their_mask(tokenizer):
    from efftune.methods.prefix_tuning import PrefixTuningConfig, add_prefix_tuning
    model = tiny_llama(vocab_size=len(tokenizer))
    add_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=3), tokenizer)
    assert not qualifies(model)  # the cached prefix needs a mask with an offset


def test_the_attention_refuses_masks_and_caches():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(EfftuneError, match=PLAIN_CAUSAL):
        _plain_causal_sdpa(torch.nn.Module(), q, torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), None)
    with pytest.raises(EfftuneError, match=PLAIN_CAUSAL):
        _plain_causal_sdpa(torch.nn.Module(), q, q, q, torch.ones(1, 1, 4, 4, dtype=torch.bool))


@pytest.mark.parametrize("field,bad,kernel,error", [
    ("attention", "flash3", "flash4", "train.attention: flash4 needs a CUDA GPU"),
    ("masked_attention", "dense", "flex", "train.masked_attention: flex needs a CUDA device")])
def test_kernel_options_are_checked(field, bad, kernel, error):
    from efftune.train.loop import TrainConfig
    names = {"attention": "sdpa, flash4", "masked_attention": "sdpa, flex"}[field]
    with pytest.raises(ConfigError, match=f"train.{field} must be one of {names}"):
        TrainConfig(**{field: bad})
    with pytest.raises(ConfigError, match=f"ForwardOptions.{field} must be one of {names}, got 'xformers'"):
        ForwardOptions(**{field: "xformers"})
    model = tiny_llama()
    with pytest.raises(ConfigError, match=error):
        ForwardOptions(**{field: kernel}).check(model, "train.")
    ForwardOptions().check(model)  # sdpa runs anywhere


@pytest.mark.parametrize("field,kernel,module,error", [
    ("attention", "flash4", "flash4", "train.attention: flash4 needs a CUDA GPU"),
    ("masked_attention", "flex", "flex", "train.masked_attention: flex needs a CUDA device")])
def test_train_checks_the_kernel_options_first_and_passes_them_down(field, kernel, module, error, tmp_path,
                                                                    monkeypatch):
    from efftune.forward import flash4, flex
    from efftune.train.loop import TrainConfig, train
    model = tiny_llama()
    with pytest.raises(ConfigError, match=error):
        train(model, [], TrainConfig(**{field: kernel}), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything was written
    monkeypatch.setattr({"flash4": flash4, "flex": flex}[module], "unavailable_reason", lambda device: None)
    seen = []
    monkeypatch.setattr("efftune.train.loop._train",
                        lambda model, *a: seen.extend(x for x in a if isinstance(x, ForwardOptions)))
    before = set(vars(model))
    train(model, [], TrainConfig(**{field: kernel}), tmp_path / "run")
    assert seen == [ForwardOptions(**{field: kernel}, keep_logit_grads=True)]  # the options travel as an argument
    assert set(vars(model)) == before and model.config._attn_implementation == "sdpa"  # nothing set on the model


def test_plain_causal_takes_the_kernel_from_its_options(model64):
    """Two calls on one model, each with its own options: each runs the implementation its options name,
    and the model's own is back after each."""
    seen = []
    for options in (ForwardOptions(attention="flash4"), ForwardOptions(), ForwardOptions(attention="flash4")):
        with plain_causal(model64, None, None, options):
            seen.append(model64.config._attn_implementation)
        assert model64.config._attn_implementation == "sdpa"
    assert seen == [causal.PLAIN_CAUSAL_FLASH4, PLAIN_CAUSAL, causal.PLAIN_CAUSAL_FLASH4]
    with pytest.raises(RuntimeError, match="boom"):
        with plain_causal(model64, None, None, ForwardOptions(attention="flash4")):
            raise RuntimeError("boom")
    assert model64.config._attn_implementation == "sdpa"
    assert not [name for name in vars(model64) if name.startswith("_efftune")]

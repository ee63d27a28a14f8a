"""Tiny random-init models and a tiny tokenizer, built in the test process (no downloads)."""
from __future__ import annotations

import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

torch.set_num_threads(1)  # tiny models: threads cost more than they give


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory):
    """Parsed and tokenised training data (`efftune.cache.data_cache_dir`, `$EFFTUNE_DATA_CACHE`) go to a
    temporary directory for the whole session, child processes included: tests never write into
    the user's ~/.cache/efftune (the downloaded models and tasks stay read from there)."""
    path = tmp_path_factory.mktemp("data-cache")
    before = os.environ.get("EFFTUNE_DATA_CACHE")
    os.environ["EFFTUNE_DATA_CACHE"] = str(path)
    yield path
    if before is None:
        os.environ.pop("EFFTUNE_DATA_CACHE", None)
    else:
        os.environ["EFFTUNE_DATA_CACHE"] = before



@pytest.fixture(scope="session")
def bigbench_sdist():
    """The real BIG-bench sdist the default data comes from, fetched into ~/.cache/efftune as `efftune`
    fetches it. Where the package index does not offer it and no copy is in the cache (seen on
    2026-12-05: pypi.org listed only a placeholder 0.0.1), the tests that need the real tasks skip with
    that one-line reason, as the CUDA tests skip without a GPU; everything else runs on fake sdists."""
    from efftune.data.bigbench import sdist_path
    from efftune.errors import DataError
    try:
        return sdist_path()
    except DataError as e:
        pytest.skip(f"the BIG-bench sdist (the default data) is not obtainable here: {e}")


CORPUS = [
    "Q: Is the sky blue?\nA: yes", "Q: Is grass red?\nA: no", "The quick brown fox jumps over the lazy dog.",
    "choice: True choice: False", "Take 3 steps forward. Turn left. Always face forward.",
    "plausible implausible correct incorrect", "0123456789 + - * / = ( )",
]


def make_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def peft():
    """The peft package, for the tests that compare with it. peft is optional (`efftune[peft]`):
    without it only the tests taking this fixture skip, not the modules they sit in."""
    return pytest.importorskip("peft")


def tiny_llama(vocab_size: int = 300, dtype=torch.float32, seed: int = 0, layers: int = 2, hidden_size: int = 32,
               intermediate_size: int = 64, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tie, attn_implementation="sdpa",
                      initializer_range=0.2)  # logits big enough for LoRA alone to move them
    return LlamaForCausalLM(cfg).to(dtype).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny model and tokenizer saved as a local directory, for the command line (`--model DIR`)."""
    d = tmp_path_factory.mktemp("tiny")
    tiny_llama().save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    return d


@pytest.fixture
def model():
    return tiny_llama()


@pytest.fixture
def model64():
    return tiny_llama(dtype=torch.float64)


def randomize_lora(model, std: float = 0.1, seed: int = 1) -> None:
    """Give every LoRA B a non-zero value so the adapter changes the output."""
    from efftune.methods.lora.layer import lora_layers
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for adapter in layer.adapters.values():
                adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g) * std)


def one_and_two_ranks(args: list[str], tmp_path, capsys):
    """`efftune ARGS --output tmp_path/one` in this process, then `ARGS --nproc 2 --output tmp_path/two`
    (torchrun, processes of their own). Returns (one's summary, two's summary, two's CompletedProcess);
    asserts the two-rank run succeeded and printed its summary once (rank 0 only)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from efftune.cli import main
    assert main([*args, "--output", str(tmp_path / "one")]) == 0
    one = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "efftune", *args, "--nproc", "2", "--output", str(tmp_path / "two")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.strip().splitlines() if line.startswith("{")]
    assert len(lines) == 1, done.stdout  # the summary, from rank 0 only
    return one, json.loads(lines[0]), done

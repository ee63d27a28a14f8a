import pytest
import torch

from efftune.errors import EfftuneError
from efftune.models import load_model, resolve_dtype
from tests.conftest import make_tokenizer, tiny_llama


def test_local_directory_gets_pad_token_and_dtype(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    tok = make_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    model, tokenizer = load_model(str(tmp_path), dtype="fp32", device="cpu")
    assert tokenizer.pad_token == tokenizer.eos_token == "<eos>"
    assert next(model.parameters()).dtype == torch.float32
    model64, _ = load_model(str(tmp_path), dtype="float64", device="cpu")
    assert next(model64.parameters()).dtype == torch.float64


def test_auto_dtype_is_fp32_on_cpu():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(EfftuneError, match="dtype: unknown value 'fp8'"):
        resolve_dtype("fp8", torch.device("cpu"))


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(EfftuneError, match="GGUF file .*nope.gguf does not exist"):
        load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(EfftuneError, match="local directory .*missing does not exist"):
        load_model(str(tmp_path / "missing"))


@pytest.mark.parametrize("name, path_like", [
    ("./m", True), ("../m", True), ("/abs/m", True), ("~/m", True), ("m.gguf", True), ("a/b/c", True),
    ("has space", True), ("trailing-", True),
    ("gpt2", False), ("HuggingFaceTB/SmolLM2-135M", False), ("org/name.v1", False),
])
def test_what_counts_as_a_path(name, path_like):
    from efftune.models import is_path_like
    assert is_path_like(name) is path_like


def test_owner_slash_name_beside_a_local_folder_is_a_path(tmp_path, monkeypatch):
    from efftune.models import is_path_like
    monkeypatch.chdir(tmp_path)
    assert not is_path_like("runs/model")
    (tmp_path / "runs").mkdir()
    assert is_path_like("runs/model")  # `runs/` is here: the user means a local directory
    with pytest.raises(EfftuneError, match="local directory runs/model does not exist"):
        load_model("runs/model")


def test_model_directories_missing_a_part_are_named(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(EfftuneError, match="holds no config.json: not a transformers model directory"):
        load_model(str(tmp_path / "m"))
    (tmp_path / "m" / "adapter_config.json").write_text("{}")
    with pytest.raises(EfftuneError, match="holds no config.json: an adapter directory \\(pass it with --adapter\\)"):
        load_model(str(tmp_path / "m"))
    tiny_llama().save_pretrained(tmp_path / "m")
    with pytest.raises(EfftuneError, match="holds no tokenizer"):
        load_model(str(tmp_path / "m"))
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(EfftuneError, match="x.gguf is not a GGUF file"):
        load_model(str(tmp_path / "x.gguf"))


def test_devices_this_machine_lacks_are_refused():
    from efftune.models import check_device
    check_device("cpu")
    check_device("auto")
    with pytest.raises(EfftuneError, match="unknown device 'gpu'"):
        check_device("gpu")
    with pytest.raises(EfftuneError, match="'cuda:99' asked for"):
        check_device("cuda:99")


def test_empty_model_reads_no_weights_and_matches_the_loaded_one(tmp_path):
    """`empty_model` (the ranks other than 0 under torchrun) builds the model `load_model` loads on the
    meta device from the config alone: a corrupt weight file is never opened; the names, shapes, dtypes
    and tied embeddings are the loaded model's."""
    import shutil

    from efftune.models import empty_model
    from efftune.train.distributed import to_empty_keeping_ties
    tiny_llama(tie=True).save_pretrained(tmp_path / "m")
    make_tokenizer().save_pretrained(tmp_path / "m")
    loaded, _ = load_model(str(tmp_path / "m"), dtype="float64", device="cpu")
    shutil.copytree(tmp_path / "m", tmp_path / "empty")
    (tmp_path / "empty" / "model.safetensors").write_bytes(b"not a safetensors file")
    empty, tokenizer = empty_model(str(tmp_path / "empty"), dtype="float64", device="cpu")
    assert tokenizer.pad_token is not None and empty.name_or_path == str(tmp_path / "empty")
    shapes = lambda m: [(n, t.shape, t.dtype) for n, t in m.state_dict().items()]  # noqa: E731
    assert shapes(empty) == shapes(loaded) and all(t.is_meta for t in empty.state_dict().values())
    assert empty.lm_head.weight is empty.model.embed_tokens.weight
    to_empty_keeping_ties(empty, torch.device("cpu"))  # storage, ties kept (to_empty alone unties them)
    assert empty.lm_head.weight is empty.model.embed_tokens.weight and not empty.lm_head.weight.is_meta


def test_gguf_special_tokens_are_the_files_own(tmp_path):
    """transformers' GGUF conversion named SmolLM2's eos `<|im_start|>` in 5.17 and `<|im_end|>` in 5.25;
    efftune takes them from the file's metadata, whichever release converts it."""
    from gguf import GGUFWriter

    from efftune.models import gguf_special_tokens
    path = tmp_path / "t.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_token_list(["<unk>", "<s>", "</s>", "hello", "<pad>"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert gguf_special_tokens(path) == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                         "pad_token": "<pad>"}


def test_a_default_model_converted_before_the_special_token_fix_is_converted_again(tmp_path, monkeypatch):
    """A cached conversion without the marker (or of an older version) may carry the wrong eos: it is
    made again from the GGUF file; one with the current marker is used as it is."""
    import json

    from efftune import models

    class Converting(Exception):
        pass

    def convert():
        raise Converting
    monkeypatch.setattr(models, "cache_dir", lambda name: tmp_path / name)
    monkeypatch.setattr(models, "default_gguf_path", convert)
    target = tmp_path / "models" / "SmolLM2-135M-Instruct"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    with pytest.raises(Converting):
        models.default_model_dir()
    (target / models.CONVERSION_FILE).write_text(json.dumps({"version": 1}))
    with pytest.raises(Converting):
        models.default_model_dir()
    (target / models.CONVERSION_FILE).write_text("{not json")
    with pytest.raises(Converting):
        models.default_model_dir()
    (target / models.CONVERSION_FILE).write_text(json.dumps({"version": models.CONVERSION_VERSION}))
    assert models.default_model_dir() == target

"""One rank of the multi-process tests (tests/train/test_distributed.py): a tiny float64 LoRA
model trained by `efftune.train.loop.train` under a gloo process group, as torchrun would start it."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


def lora_model(seed: int = 0):
    from efftune.methods.lora.config import LoraConfig
    from efftune.methods.lora.model import add_lora
    from tests.conftest import tiny_llama
    m = tiny_llama(dtype=torch.float64, seed=seed)
    torch.manual_seed(seed)
    add_lora(m, LoraConfig(r=4))
    return m


def method_model(method: str = "lora"):
    """A tiny float64 model with `method` attached (the same weights in every process), and a function
    that saves the method's result into a directory. MoE methods on the tiny MoE models of the MoE
    tests: expert LoRA on Qwen3-MoE's fused experts, ESFT (full mode) training two experts a layer,
    MixLoRA on a Llama; full fine-tuning of the tiny Llama."""
    if method == "lora":
        from efftune.methods.lora.config import LoraConfig
        from efftune.methods.lora.peft_format import save_adapter
        return lora_model(), lambda model, d: save_adapter(model, d, LoraConfig(r=4))
    if method in ("qlora", "qlora-int8"):  # LoRA on an NF4 (int8) base whose every block linear is quantised
        from efftune.methods.lora.config import LoraConfig
        from efftune.methods.lora.model import add_lora
        from efftune.methods.lora.peft_format import save_adapter
        from efftune.quantize import quantize_model
        from tests.quantize.test_model import llama64
        model = llama64()
        quantize_model(model, "nf4" if method == "qlora" else "int8")
        torch.manual_seed(0)
        add_lora(model, LoraConfig(r=4))
        return model, lambda m, d: save_adapter(m, d, LoraConfig(r=4))
    if method == "expert-qlora":  # expert LoRA on a Qwen3-MoE whose block linears and fused experts are NF4
        from efftune.methods.expert_lora import ExpertLoraConfig, add_expert_lora, save_expert_lora
        from efftune.quantize import quantize_model
        from tests.quantize.test_experts import moe64
        config = ExpertLoraConfig(r=4, alpha=8.0, target_modules=["q_proj"])
        model = moe64(vocab=300)
        quantize_model(model, "nf4")
        torch.manual_seed(0)
        add_expert_lora(model, config)
        return model, lambda m, d: save_expert_lora(m, d, config)
    if method == "expert-lora":
        from efftune.methods.expert_lora import ExpertLoraConfig, add_expert_lora, save_expert_lora
        from tests.moe.test_expert_lora import tiny_moe
        config = ExpertLoraConfig(r=4, alpha=8.0, target_modules=["q_proj"])
        model = tiny_moe(vocab=300, experts=4)
        torch.manual_seed(0)
        add_expert_lora(model, config)
        return model, lambda m, d: save_expert_lora(m, d, config)
    if method == "esft":
        from efftune.methods.esft import EsftConfig, add_esft_full, save_esft
        from efftune.moe.experts import experts_modules
        from tests.moe.test_expert_lora import tiny_moe
        model = tiny_moe(vocab=300, experts=4)
        add_esft_full(model, {path: [0, 2] for path, _ in experts_modules(model)})
        return model, lambda m, d: save_esft(m, d, EsftConfig())
    if method == "mixlora":
        from efftune.methods.mixlora import MixLoraConfig, add_mixlora, save_mixlora
        from tests.methods.test_mixlora import tiny
        config = MixLoraConfig(num_experts=4, top_k=2, r=4, alpha=8.0, attn_r=4, attn_alpha=8.0)
        model = tiny(vocab=300)
        torch.manual_seed(0)
        add_mixlora(model, config)
        return model, lambda m, d: save_mixlora(m, d, config)
    if method in ("full", "full-wide"):  # every weight trains; the result is the whole model
        from efftune.methods.full import FullConfig, add_full, save_full
        from tests.conftest import tiny_llama
        # full-wide: matrices of 64 x 64 and 64 x 128 values, whose moments adamw8bit keeps in 8 bits (from 4,096)
        model = tiny_llama(dtype=torch.float64) if method == "full" else \
            tiny_llama(dtype=torch.float64, hidden_size=64, intermediate_size=128)
        add_full(model, FullConfig())
        return model, lambda m, d, **gathered: save_full(m, d, FullConfig(), **gathered)
    raise ValueError(method)


def sequences():
    from efftune.data import Formatter, MultipleChoice
    from tests.conftest import make_tokenizer
    prompts = ["Q: Is the sky blue?\nA: ", "Q: Is grass red?\nA: ", "Take 3 steps forward.\nA: ",
               "Always face forward.\nA: ", "0123456789 =\nA: ", "The quick brown fox\nA: "]
    f = Formatter(make_tokenizer())
    return [f.encode(MultipleChoice(p, ("yes", "no"), i % 2)) for i, p in enumerate(prompts * 2)]


def two_adapters():
    """The tiny float64 model with LoRA adapters a and b, both trainable (k adapters at once)."""
    from efftune.methods.lora.config import LoraConfig
    from efftune.methods.lora.model import add_lora, set_trainable_adapters
    from tests.conftest import tiny_llama
    m = tiny_llama(dtype=torch.float64)
    torch.manual_seed(0)
    for name in ("a", "b"):
        add_lora(m, LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"]), adapter=name)
    set_trainable_adapters(m, ["a", "b"])
    return m


def two_sequences() -> dict:
    """Adapter a's examples and adapter b's (the same prompts, other answers)."""
    seqs = sequences()
    return {"a": seqs, "b": seqs[::-1]}


def evaluation(sharded: bool):
    """`efftune.finetune.evaluator` on 7 multiple-choice and 5 completion examples held out: accuracy and
    perplexity (`sharded`: each rank scores its share, as under ddp)."""
    from efftune.data import Completion, Formatter, MultipleChoice
    from efftune.finetune import evaluator
    from tests.conftest import make_tokenizer
    held = [MultipleChoice(f"Q: {w}?\nA: ", ("yes", "no"), i % 2) for i, w in enumerate("abcdefg")] + \
        [Completion(f"Say {w}:", f" {w} {w}") for w in ("sky", "fox", "sea", "leaf", "snow")]
    return evaluator(Formatter(make_tokenizer()), held, sharded=sharded)


def run(out: str, config: dict, resume: bool = False, evaluate: bool = False, method: str = "lora") -> None:
    """Train and write this rank's trainable weights to out/rank-R.safetensors; rank 0 saves the
    method's result into out/result. `config["together"]` (popped): adapters a and b at once
    (`two_adapters`) instead of `method`, nothing saved into out/result."""
    from safetensors.torch import save_file

    from efftune.train.distributed import restarted, whole_state_dict, world
    from efftune.train.loop import TrainConfig, train
    config = dict(config)
    together = config.pop("together", False)
    seqs = two_sequences() if together else sequences()
    resume = resume or (restarted() and (Path(out) / "run" / "checkpoints" / "latest").exists())
    model, save = (two_adapters(), None) if together else method_model(method)
    ev = evaluation(sharded=config.get("distributed", "ddp") == "ddp") if evaluate else None
    whole = method == "full"  # as efftune.finetune does: a whole model stays sharded and is gathered to save it
    result = train(model, seqs, TrainConfig(**config), Path(out) / "run", pad_id=1, resume=resume, evaluate=ev,
                   unshard=not whole)
    rank = world().rank
    if not whole:
        state = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(state, str(Path(out) / f"rank-{rank}.safetensors"))
    if method in QUANTISED:
        packed_shards(model, Path(out), rank)
    gathered = {"state_dict": whole_state_dict(model)} if whole and config.get("distributed") == "fsdp" else {}
    if rank == 0 and save is not None:
        save(model, Path(out) / "result", **gathered)
    sharded = sum(type(p).__name__ == "DTensor" for p in model.parameters())  # FSDP's, after train()
    (Path(out) / f"rank-{rank}.json").write_text(json.dumps({"final_loss": result.final_loss,
                                                             "tokens": result.tokens, "evals": result.evals,
                                                             "start_step": result.start_step,
                                                             "sharded_parameters": sharded}))


QUANTISED = ("qlora", "qlora-int8", "expert-qlora")  # methods on a quantised base


def packed_shards(model, out: Path, rank: int) -> None:
    """The quantised base's packed (integer) tensors: out/rank-R-packed.json {name: [this rank's
    elements, the whole tensor's]}, and (rank 0) out/packed.safetensors with each gathered whole."""
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor
    packed = {n: p for n, p in model.named_parameters() if not p.is_floating_point()}
    local = {n: p.to_local() if isinstance(p, DTensor) else p for n, p in packed.items()}
    (out / f"rank-{rank}-packed.json").write_text(json.dumps({n: [local[n].numel(), p.numel()]
                                                              for n, p in packed.items()}))
    whole = {n: p.full_tensor() if isinstance(p, DTensor) else p for n, p in packed.items()}  # every rank
    if rank == 0:
        save_file({n: t.contiguous() for n, t in whole.items()}, str(out / "packed.safetensors"))


def spawned(rank: int, world_size: int, port: int, out: str, config: dict, resume: bool, evaluate: bool,
            method: str = "lora") -> None:
    """torch.multiprocessing.spawn's entry: torchrun's environment, then `run`."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    torch.set_num_threads(1)
    from efftune.train.distributed import finish
    try:
        run(out, config, resume, evaluate, method)
    finally:
        finish()  # after `run` returned: the model is garbage by then (finish collects it before leaving)
    leave()


def spawned_job(rank: int, world_size: int, port: int, overrides: list[dict]) -> None:
    """torch.multiprocessing.spawn's entry for a whole `efftune train` job (`efftune.finetune.run`),
    each rank with its own config overrides (`overrides[rank]`)."""
    from efftune.config import load_config
    from efftune.finetune import run as finetune
    from efftune.train.distributed import finish
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    torch.set_num_threads(1)
    try:
        finetune(load_config(None, overrides[rank]), log=lambda m: None)
    finally:
        finish()
    leave()


def spawned_build(rank: int, world_size: int, port: int, models: list[str], kwargs: dict,
                  outcome: str | None = None) -> None:
    """torch.multiprocessing.spawn's entry for a whole `efftune hub build` (`build_library(models[rank],
    **kwargs)`: each rank with its own model path). `outcome`: a directory where the rank writes
    rank-R.outcome ("ok", or what the build raised as "Type: message") and then ends normally, so that
    a failed rank does not make torch.multiprocessing stop the others: each must end on its own."""
    from efftune.compose.library import build_library
    from efftune.train.distributed import finish
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    torch.set_num_threads(1)
    result = "ok"
    try:
        build_library(models[rank], log=lambda m: None, **kwargs)
    except BaseException as exc:
        if outcome is None:
            raise
        result = f"{type(exc).__name__}: {exc}"
    finally:
        finish()
    if outcome is not None:
        (Path(outcome) / f"rank-{rank}.outcome").write_text(result)
    leave()


def stop_at(step: int, record: str, names: list[str], done: int) -> None:
    """A build's `on_step` (with `functools.partial(stop_at, step, record)`, which a spawned process can
    take): appends "RANK DONE" to the file `record`, and raises KeyboardInterrupt after step `step`."""
    with open(record, "a") as f:
        f.write(f"{os.environ.get('RANK', '-')} {done}\n")
    if done == step:
        raise KeyboardInterrupt


def leave() -> None:
    """End a spawned rank whose job finished (its files written, the process group left) without
    Python's interpreter teardown: once in about a dozen CI runs a finished fsdp rank aborted there
    ("terminate called without an active exception", after its outputs were complete), which
    mp.spawn reports as a failed rank. Not seen under torchrun; see the session-15 issue note. The
    likely cause, FSDP2's model in reference cycles destroyed at teardown after the process group,
    is removed by `finish` (it collects them first); this exit stays until CI has shown that."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":  # under torchrun: python -m tests.train.dist_worker OUT CONFIG_JSON [resume]
    import faulthandler
    import signal
    faulthandler.register(signal.SIGUSR1)  # a stuck rank's stacks on `kill -USR1` (the tests' diagnosis)
    torch.set_num_threads(1)
    from efftune.train.distributed import finish
    try:
        run(sys.argv[1], json.loads(sys.argv[2]), resume="resume" in sys.argv[3:], evaluate="eval" in sys.argv[3:])
    finally:
        finish()

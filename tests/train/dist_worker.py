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


def run(out: str, config: dict, resume: bool = False, evaluate: bool = False, method: str = "lora") -> None:
    """Train and write this rank's trainable weights to out/rank-R.safetensors; rank 0 saves the
    method's result into out/result."""
    from safetensors.torch import save_file

    from efftune.train.distributed import finish, restarted, whole_state_dict, world
    from efftune.train.loop import TrainConfig, train
    seqs = sequences()
    resume = resume or (restarted() and (Path(out) / "run" / "checkpoints" / "latest").exists())
    model, save = method_model(method)
    ev = None
    if evaluate:
        from efftune.data import Formatter, MultipleChoice
        from efftune.finetune import evaluator
        from tests.conftest import make_tokenizer
        held = [MultipleChoice(f"Q: {w}?\nA: ", ("yes", "no"), i % 2) for i, w in enumerate("abcdefg")]
        ev = evaluator(Formatter(make_tokenizer()), held, sharded=config.get("distributed", "ddp") == "ddp")
    whole = method == "full"  # as efftune.finetune does: a whole model stays sharded and is gathered to save it
    result = train(model, seqs, TrainConfig(**config), Path(out) / "run", pad_id=1, resume=resume, evaluate=ev,
                   unshard=not whole)
    rank = world().rank
    if not whole:
        state = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(state, str(Path(out) / f"rank-{rank}.safetensors"))
    gathered = {"state_dict": whole_state_dict(model)} if whole and config.get("distributed") == "fsdp" else {}
    if rank == 0:
        save(model, Path(out) / "result", **gathered)
    (Path(out) / f"rank-{rank}.json").write_text(json.dumps({"final_loss": result.final_loss,
                                                             "tokens": result.tokens, "evals": result.evals}))
    finish()


def spawned(rank: int, world_size: int, port: int, out: str, config: dict, resume: bool, evaluate: bool,
            method: str = "lora") -> None:
    """torch.multiprocessing.spawn's entry: torchrun's environment, then `run`."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    torch.set_num_threads(1)
    run(out, config, resume, evaluate, method)


if __name__ == "__main__":  # under torchrun: python -m tests.train.dist_worker OUT CONFIG_JSON [resume]
    torch.set_num_threads(1)
    run(sys.argv[1], json.loads(sys.argv[2]), resume="resume" in sys.argv[3:], evaluate="eval" in sys.argv[3:])

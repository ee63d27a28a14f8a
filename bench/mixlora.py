"""MixLoRA training throughput and peak memory: efftune vs moe-peft (the MixLoRA authors' framework).

Random-init Llama of a `bench/throughput.py` shape (e.g. `smollm2-135m`, the default model's architecture), bf16, no
downloads; MixLoRA with E=8 experts, top-2, r=8 alpha=16 on gate/up/down, plain LoRA r=8 alpha=16
on q/k/v/o, LoRA dropout 0.05 (moe-peft accepts no 0), load-balancing coefficient 0.01; random
token ids, every position labelled. A step is forward under bf16 autocast (efftune) / bf16
compute (moe-peft), loss + router aux loss, backward, AdamW step, zero_grad. Cases:

  efftune-mixlora       efftune.methods.mixlora.add_mixlora, loss through labelled_logprobs
  efftune-mixlora-ckpt  the same with activation checkpointing (non-reentrant)
  efftune-mixlora-dense MixLoraConfig(dense=True): the masked form without sorting by expert
  efftune-lora          plain efftune LoRA r=8 on every linear layer (the dense reference)
  moe-peft              moe_peft.LLMModel + adapter_factory("MIXLORA", routing_strategy="mixlora"),
                        its efficient operator, no gradient checkpointing
  moe-peft-ckpt         the same with gradient_checkpoint_="recompute" (what moe_peft.train uses)

Each case runs in its own subprocess and prints one JSON line (tokens/s, step seconds, peak GiB of
torch.cuda.max_memory_allocated, trainable parameters, loss). `--shape tiny` runs on CPU in seconds.

What the moe-peft cases need: moe-peft==2.0.2 pins torch>=2.4,<2.6 and transformers>=4.44,<4.47,
which conflict with efftune (transformers 5), so they run under another interpreter given by
`--moe-peft-python PATH`, a venv made e.g. with
    python -m venv /opt/moepeft && /opt/moepeft/bin/pip install "torch==2.5.1" moe-peft==2.0.2
(plus `flash-attn` for `--moe-peft-attn flash_attn`; its default is eager attention, which at
seq 4096 holds the full attention matrix). The worker imports only torch, transformers and
moe_peft (never efftune): it builds the same random Llama with that transformers, saves it to a
temporary directory (moe_peft.LLMModel.from_pretrained reads a directory) and trains it through
LLMModel.forward(LLMModelInput(...)), adding each output's `aux_loss` as moe_peft.train does.
Lighter, and what was tried here: keep this interpreter's torch (moe_peft asserts only
torch>=2.3 at import; its <2.6 pin is packaging metadata) and put moe-peft's transformers first:
    pip install --no-deps --target /tmp/mp_pkgs transformers==4.46.3 tokenizers==0.20.3 moe-peft==2.0.2 \
        huggingface_hub==0.26.5
    ... bench/mixlora.py --moe-peft-path /tmp/mp_pkgs
(huggingface_hub < 1.0 because transformers 4.46 refuses newer ones). tokenizers' compiled module
must match the worker's Python: for Python 3.12 copy tokenizers.cpython-312-*.so out of the cp312
wheel (`pip download --python-version 3.12 --only-binary=:all: tokenizers==0.20.3`).
Measured this way on one H100 (torch 2.11, llama3.2-1b shape, seq 2048, batch 1, 5 steps):
efftune-mixlora 4,991 tok/s, 13.6 GiB; moe-peft (eager attention) 3,111 tok/s, 29.3 GiB;
efftune-mixlora-ckpt 2,147 tok/s, 5.2 GiB; moe-peft-ckpt 2,578 tok/s, 7.3 GiB; efftune-lora
15,872 tok/s, 8.1 GiB (33.4 M trainable parameters in both MixLoRA setups).
moe_peft imports `datasets` and `evaluate` only to load its own task data; the worker gives them
empty stand-ins when they are absent.
Without either option the moe-peft cases report an error line and the others still run.

    PYTHONPATH=. python bench/mixlora.py --shape tiny --steps 2                 # CPU smoke test
    PYTHONPATH=. python bench/mixlora.py --shape llama3.2-1b --seq 2048 --moe-peft-python /opt/moepeft/bin/python
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import throughput  # noqa: E402  (bench/throughput.py: shapes and model builder)

SHAPES = throughput.SHAPES
CASES = ("efftune-mixlora", "efftune-mixlora-ckpt", "efftune-mixlora-dense", "efftune-lora", "moe-peft",
         "moe-peft-ckpt")
E, K, R, ALPHA, AUX, DROPOUT = 8, 2, 8, 16, 0.01, 0.05  # moe-peft requires dropout > 0
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
FFN = ["gate_proj", "up_proj", "down_proj"]


def _timed(step, steps: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """(seconds per step, last loss), after `warmup` untimed steps."""
    step_s, loss, _ = throughput.timed_steps(step, steps, warmup, device)
    return step_s, float(loss)


def _result(shape, case, seq, batch, steps, step_s, loss, trainable, device) -> dict:
    cuda = device.type == "cuda"
    return dict(shape=shape, case=case, seq=seq, batch=batch, steps=steps,
                tokens_s=round(batch * seq / step_s, 1), step_s=round(step_s, 4),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
                trainable=trainable, loss=round(loss, 4),
                device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__)


def run_efftune(shape: str, case: str, steps: int, warmup: int, seq: int, batch: int) -> dict:
    from efftune.forward.logprobs import labelled_logprobs
    from efftune.methods.lora.config import LoraConfig
    from efftune.methods.lora.model import add_lora
    from efftune.methods.mixlora import MixLoraConfig, add_mixlora
    from efftune.moe.layer import collect_aux_losses
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = throughput.build_model(shape, device)
    if case == "efftune-lora":
        add_lora(model, LoraConfig(r=R, alpha=ALPHA, dropout=DROPOUT))
    else:
        add_mixlora(model, MixLoraConfig(num_experts=E, top_k=K, r=R, alpha=ALPHA, attn_r=R, attn_alpha=ALPHA,
                                         aux_loss_coef=AUX, dropout=DROPOUT, dense=case.endswith("-dense")))
    if case.endswith("-ckpt"):
        from efftune.train.loop import enable_activation_checkpointing  # 5.24+ renamed the switch
        enable_activation_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(0, SHAPES[shape]["vocab_size"], (batch, seq), device=device,
                        generator=torch.Generator(device=device).manual_seed(1))
    labels = ids.clone()
    labels[:, 0] = -100
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def compute_loss() -> torch.Tensor:
        loss = -labelled_logprobs(model, ids, labels).mean()
        aux, _ = collect_aux_losses(model)
        return loss if aux is None else loss + aux

    step_s, loss = _timed(throughput.train_step(compute_loss, opt, device), steps, warmup, device)
    return _result(shape, case, seq, batch, steps, step_s, loss, sum(p.numel() for p in params), device)


def run_moe_peft(shape: str, case: str, steps: int, warmup: int, seq: int, batch: int, attn: str) -> dict:
    """Inside the moe-peft interpreter: torch<2.6, transformers<4.47, moe_peft; no efftune."""
    import importlib.util
    import types

    import transformers  # noqa: F401  (before the stand-ins below, which it would probe)
    for name in ("datasets", "evaluate"):  # imported by moe_peft's data/task code, unused here
        if importlib.util.find_spec(name) is None:
            sys.modules[name] = types.ModuleType(name)
    import moe_peft
    from transformers import LlamaConfig, LlamaForCausalLM
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        config = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(seq, 2048), use_cache=False)
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp)
        model = moe_peft.LLMModel.from_pretrained(tmp, device=str(device), attn_impl=attn,
                                                  load_dtype=torch.bfloat16)
    cfg = moe_peft.adapter_factory("MIXLORA", "mixlora", r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                   target_modules=ATTN + FFN, routing_strategy="mixlora", num_experts=E,
                                   top_k=K, router_aux_loss_coef=AUX)
    model.init_adapter(cfg)
    params = [p for p in model.get_adapter_weight_dict("mixlora").values() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(0, SHAPES[shape]["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(1))
    tokens = ids.tolist()
    masks = [[1] * seq for _ in range(batch)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        inputs = moe_peft.LLMModelInput(
            batch_configs_=[moe_peft.LLMBatchConfig(adapter_name_="mixlora", batch_start_idx_=0, batch_end_idx_=batch)],
            batch_tokens_=tokens, batch_labels_=tokens, batch_masks_=masks,
            gradient_checkpoint_="recompute" if case.endswith("-ckpt") else "none")
        out = model.forward(inputs)[0]
        loss = out.loss + out.aux_loss if out.aux_loss is not None else out.loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    step_s, loss = _timed(step, steps, warmup, device)
    return _result(shape, case, seq, batch, steps, step_s, loss, sum(p.numel() for p in params), device)


def spawn(args: argparse.Namespace, shape: str, case: str, batch: int, seq: int) -> dict:
    head = dict(shape=shape, case=case, batch=batch, seq=seq)
    python = sys.executable
    if case.startswith("moe-peft"):
        if not (args.moe_peft_python or args.moe_peft_path):
            return dict(head, error="skipped: no --moe-peft-python / --moe-peft-path (moe-peft==2.0.2 with "
                                    "transformers<4.47; see the docstring)")
        python = args.moe_peft_python or sys.executable
    cmd = [python, os.path.abspath(__file__), "--worker", case, "--shape", shape, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--seq", str(seq), "--batch", str(batch), "--moe-peft-attn", args.moe_peft_attn]
    # moe-peft's packages go first, so its transformers shadows efftune's; efftune cases get the repo
    front = [args.moe_peft_path] if case.startswith("moe-peft") else [os.getcwd()]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [*front, os.environ.get("PYTHONPATH")])))
    return throughput.run_worker(cmd, head, args.case_timeout, env)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", nargs="+", default=["llama3.2-1b"], choices=sorted(SHAPES))
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seq", type=int, default=None, help="default 2048 (128 for tiny)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--moe-peft-python", default=None, help="interpreter of a venv with moe-peft==2.0.2")
    ap.add_argument("--moe-peft-path", default=None,
                    help="a directory of packages (pip install --target) put first on the worker's PYTHONPATH")
    ap.add_argument("--moe-peft-attn", default="eager", choices=("eager", "flash_attn"))
    ap.add_argument("--case-timeout", type=int, default=600)
    ap.add_argument("--worker", choices=CASES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        shape, seq = args.shape[0], args.seq
        if args.worker.startswith("moe-peft"):
            out = run_moe_peft(shape, args.worker, args.steps, args.warmup, seq, args.batch[0], args.moe_peft_attn)
        else:
            out = run_efftune(shape, args.worker, args.steps, args.warmup, seq, args.batch[0])
        print(json.dumps(out))
        return
    for shape in args.shape:
        seq = args.seq or (128 if shape == "tiny" else 2048)
        for batch in args.batch:
            for case in args.cases:
                print(json.dumps(spawn(args, shape, case, batch, seq)), flush=True)


if __name__ == "__main__":
    main()

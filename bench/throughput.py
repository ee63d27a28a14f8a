"""LoRA training throughput: efftune vs Hugging Face peft on one GPU.

Builds a random-init Llama (bf16, sdpa attention, no downloads), attaches LoRA r=16, alpha=32,
dropout 0 to every linear layer but lm_head, and times full training steps (forward under bf16
autocast, loss, backward, fused AdamW step, zero_grad) on random token ids. Cases:

  peft            peft.get_peft_model, loss = model(input_ids=ids, labels=ids).loss
  efftune         efftune.add_lora, loss through efftune.forward.logprobs.target_logprobs (chunked LM head)
  efftune-plain   efftune.add_lora, loss = model(input_ids=ids, labels=ids).loss
  efftune-fa      efftune.add_lora_fa (A frozen, cached gradient correction), loss as `efftune`
  efftune-fa-nocorr  the same with LoraFAConfig(correction=False)
  peft-fa         peft.get_peft_model LoRA + peft.optimizers.create_lorafa_optimizer (freezes A,
                  corrects B's step itself, replaces fused AdamW), loss as `peft`
  peft-ckpt       `peft` with transformers' gradient checkpointing (non-reentrant)
  efftune-ckpt    `efftune` with activation checkpointing (non-reentrant), as
                  TrainConfig(activation_checkpointing=True) does
  efftune-compile `efftune` with every decoder block compiled (efftune.train.compile), as
                  TrainConfig(compile=True) does
  efftune-compile-ckpt  both of the above: checkpointing by the compiler's recomputation, as train()
                  does it for compiled blocks (--ckpt-fraction below 1: on that share of the
                  blocks); efftune-compile-ckpt-cg: and replayed as CUDA graphs
  efftune-fa-compile    `efftune-fa` with every decoder block compiled
  efftune-fp8     `efftune` with the frozen base linears in FP8 (efftune.train.fp8, train.fp8_base)
  efftune-compile-fp8   both
  efftune-compile-cg    `efftune-compile` replayed as CUDA graphs (TrainConfig(compile=True,
                        cuda_graphs=True)); efftune-compile-fp8-cg: with FP8 too
  full-plain      full fine-tuning as plain PyTorch/transformers does it: every weight trains in fp32
                  under bf16 autocast, loss = model(input_ids=ids, labels=ids).loss, fused AdamW
  efftune-full    efftune's --method full (efftune.methods.full: fp32 masters under the bf16 model),
                  loss as `efftune` (chunked LM head), fused AdamW
  efftune-full-8bit     `efftune-full` with train.optimizer adamw8bit (torchao; embeddings' moments fp32)
  efftune-full-compile  `efftune-full` with every decoder block compiled; efftune-full-compile-cg:
                        and replayed as CUDA graphs; efftune-full-8bit-compile-cg: with adamw8bit;
                        efftune-full-compile-ckpt-cg: with activation checkpointing (the compiler's);
                        efftune-full-adamwfp8-compile-cg: with adamwfp8 (torchao's fp8 moments)
  full-plain-ckpt `full-plain` with transformers' gradient checkpointing (what fits an 8B one GPU)
  efftune-nf4     `efftune` on an NF4 base: the decoder blocks' linears quantised first
                  (efftune.quantize.quantize_model, as `quantize: nf4` does); efftune-nf4-ckpt:
                  with activation checkpointing; efftune-compile-nf4: compiled;
                  efftune-compile-nf4-ckpt: compiled and checkpointed; efftune-compile-nf4-cg:
                  compiled and replayed as CUDA graphs; efftune-compile-nf4-ckpt-cg: all three
  peft-qlora      `peft` on a bitsandbytes NF4 base (Linear4bit, double-quantised scales, bf16
                  compute: QLoRA as peft users run it); needs bitsandbytes and a GPU; peft-qlora-ckpt:
                  with transformers' gradient checkpointing (non-reentrant)
  peft-qlora-kbit-ckpt  `peft-qlora-ckpt` after peft.prepare_model_for_kbit_training, the step peft's
                  quantization guide puts before get_peft_model: it casts every weight that is not
                  4-bit (embeddings, norms, lm_head) to fp32; the issue's reference table (16.72 GiB
                  on an H200) is this peer's memory, the bare `peft-qlora-ckpt` keeps them bf16
  peft-dora       `peft` with LoraConfig(use_dora=True)
  efftune-dora    efftune.methods.dora.add_dora (DoRA on lora_linears, SwiGLU unfused), loss as `efftune`;
                  efftune-dora-compile, efftune-dora-compile-cg: compiled, and replayed as CUDA graphs

Each case runs in its own subprocess (clean peak memory; an OOM kills only that case) and prints
one JSON line: tokens/s, peak GiB (max_memory_allocated since just before warm-up) and MFU, where
FLOPs/token = 4·frozen + 6·trainable + 6·layers·seq·attn_width over 989 TFLOP/s (H100 bf16 dense).
`frozen` counts every base parameter, the embedding and lm_head both (a tied matrix twice), and a
frozen LoRA-FA `A` (counted after the optimizer is made, as peft-fa freezes A there).
`--batch` takes several sizes (a sweep); a case that runs out of memory reports error "OOM".
With NVML (`pip install nvidia-ml-py`) each line also gives the GPU's joules per step, mean power
against the enforced power limit, the SM clock at the end and tokens per joule: a case at the limit
runs at a lowered clock (see EnergyMeter).
A final JSON line gives each case's ratios to efftune (LoRA) and peft (LoRA) per shape and batch, and
the DoRA bar (issue 25): efftune DoRA >= 2.5x peft DoRA's tokens/s at <= 0.5x its peak, and >= 0.9x
efftune LoRA's tokens/s in the same mode (eager, compiled, compiled + CUDA graphs), and the QLoRA bars
(issue 24): a checkpointed efftune NF4 case >= 2x each peft-qlora peer with checkpointing at <= 0.75x its
peak, one without checkpointing >= 0.9x efftune bf16 LoRA in the same mode.
Variants of the efftune cases: `--torch-partitioner` (train.compile_lean: false), `--autotune`
(train.compile_autotune), `--unfused` (each LoRA layer runs its base linear and its two LoRA GEMMs
apart, without the `lora_linears` op), `--unfused-mlp` (SwiGLU MLPs on the `lora_linears` ops, without
the fused `swiglu_lora` op), `--memory-budget` (train.compile_memory_budget), `--attention flash4`
(train.attention: FlashAttention-4 for the efftune cases' attention; peft keeps SDPA).
`--rows packed|tree` trains on rows with a mask instead of one sequence per row: 8 documents side by
side, or a 256-token prompt with 15 continuations as branches (efftune.data.layout). Every case gets
the same boolean mask and position ids (peft through the model's own forward, labels shifted as
transformers does, so a branch's first token is not a target there); `--masked-attention flex`
runs the efftune cases' masked attention through FlexAttention (train.masked_attention).

    PYTHONPATH=. python bench/throughput.py --shape llama3.2-1b llama3-8b
    PYTHONPATH=. python bench/throughput.py --cases efftune efftune-fa peft-fa --batch 1 2
    PYTHONPATH=. python bench/throughput.py --shape tiny --steps 2      # CPU smoke test
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

SHAPES: dict[str, dict] = {
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    # bench/distributed.py's FSDP shape: whole, in bf16, it fills one 141 GB GPU before anything trains,
    # so there rank 0 alone builds it, in host memory (--rank0-base)
    "llama3-70b": dict(hidden_size=8192, num_hidden_layers=80, intermediate_size=28672, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "llama3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    # the default model's architecture (SmolLM2-135M-Instruct), random init: no download needed
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, intermediate_size=1536, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False),
}
CASES = ("peft", "peft-ckpt", "efftune", "efftune-plain", "efftune-fa", "efftune-fa-nocorr", "peft-fa", "efftune-ckpt",
         "efftune-compile", "efftune-compile-ckpt", "efftune-fa-compile", "efftune-fp8",
         "efftune-compile-fp8", "efftune-compile-cg", "efftune-compile-fp8-cg",
         "full-plain", "full-plain-ckpt", "efftune-full", "efftune-full-8bit", "efftune-full-compile",
         "efftune-full-compile-cg", "efftune-full-8bit-compile-cg", "efftune-full-compile-ckpt-cg",
         "efftune-full-adamwfp8-compile-cg",
         "efftune-nf4", "efftune-nf4-ckpt", "efftune-compile-nf4", "efftune-compile-nf4-ckpt",
         "efftune-compile-nf4-cg", "efftune-compile-nf4-ckpt-cg", "efftune-compile-ckpt-cg", "peft-qlora", "peft-qlora-ckpt", "peft-qlora-kbit-ckpt", "peft-dora",
         "efftune-dora", "efftune-dora-compile", "efftune-dora-compile-cg")
LOGPROBS_LOSS = tuple(c for c in CASES if c.startswith("efftune") and c != "efftune-plain")
PEAK_FLOPS = 989e12
MEMORY_BUDGET: float | None = None  # --memory-budget: compiled cases' activation budget
CKPT_FRACTION = 1.0  # --ckpt-fraction: the share of layers the -ckpt cases checkpoint
TORCH_PARTITIONER = False  # --torch-partitioner: compiled cases keep torch's default recompute rules
UNFUSED = False  # --unfused: efftune LoRA layers compute apart, without the fused lora_linears op
UNFUSED_MLP = False  # --unfused-mlp: the MLPs' LoRA layers on lora_linears ops, without swiglu_lora
AUTOTUNE = False  # --autotune: compiled cases benchmark GEMM kernels per shape (train.compile_autotune)
ATTENTION = "sdpa"  # --attention flash4: efftune cases' maskless attention kernel (train.attention)
ROWS = "single"  # --rows packed | tree: rows with a mask (efftune.data.layout)
MASKED_ATTENTION = "sdpa"  # --masked-attention flex: efftune cases' masked attention (train.masked_attention)
LAYERS: int | None = None  # --layers: the shape's decoder layers cut to this many (a deep shape's step on a smaller GPU)


def default_seq(shape: str) -> int:
    return 128 if shape == "tiny" else 4096


def llama_config(shape: str):
    """The transformers LlamaConfig of `shape` (sdpa attention, no KV cache)."""
    from transformers import LlamaConfig
    layers = {"num_hidden_layers": LAYERS} if LAYERS else {}
    return LlamaConfig(**{**SHAPES[shape], **layers}, max_position_embeddings=131072, use_cache=False,
                       attn_implementation="sdpa")


def build_model(shape: str, device: torch.device) -> torch.nn.Module:
    """The random-init bf16 Llama of `shape` on `device`, transformers' own init (seed 0)."""
    from transformers import LlamaForCausalLM
    config = llama_config(shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    return model.train()


def bnb_nf4(model: torch.nn.Module) -> None:
    """Swap the decoder blocks' linears for bitsandbytes Linear4bit (NF4, double-quantised scales,
    bf16 compute), as transformers does for `BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)`: the weight is quantised when it
    moves to the GPU."""
    import bitsandbytes as bnb

    from efftune.attach import replace_module
    from efftune.attach import decoder_blocks
    for block in decoder_blocks(model):
        for name, m in list(block.named_modules()):
            if type(m) is torch.nn.Linear:
                q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None,
                                      compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(m.weight.data.cpu(), requires_grad=False, compress_statistics=True,
                                             quant_type="nf4")
                if m.bias is not None:
                    q.bias = torch.nn.Parameter(m.bias.data, requires_grad=False)
                replace_module(block, name, q.to(m.weight.device))


def attach(model: torch.nn.Module, case: str) -> torch.nn.Module:
    if case.startswith("peft-qlora"):
        bnb_nf4(model)
    if case.startswith("peft-qlora-kbit"):
        import peft
        # checkpointing stays transformers' non-reentrant switch below, as in peft-qlora-ckpt: the
        # one difference between the two peers is the fp32 cast
        peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if "-nf4" in case:  # before LoRA attaches, as the main job does
        from efftune.quantize import quantize_model
        quantize_model(model, "nf4")
    if case.startswith("peft"):
        import peft
        wrapped = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                             lora_dropout=0.0, use_dora=case == "peft-dora"))
        if case.endswith("-ckpt"):  # transformers' own switch (non-reentrant), as a peft user turns it on
            from efftune.train.loop import enable_activation_checkpointing  # 5.24+ renamed the switch
            enable_activation_checkpointing(model)
        return wrapped
    if case.startswith("full-plain"):  # every weight trains, in fp32 (the precision AdamW steps want) under autocast
        if case.endswith("-ckpt"):  # transformers' own switch, as a plain user turns it on to fit
            from efftune.train.loop import enable_activation_checkpointing
            enable_activation_checkpointing(model)
        return model.float()
    if case.startswith("efftune-full"):
        from efftune.methods.full import add_full
        add_full(model)  # fp32 masters of every weight; the forward runs under bf16 autocast
    elif case.startswith("efftune-fa"):
        from efftune.methods.lora_fa import LoraFAConfig, add_lora_fa
        add_lora_fa(model, LoraFAConfig(r=16, alpha=32, correction=case != "efftune-fa-nocorr"))
    else:
        from efftune.methods.lora.config import LoraConfig
        from efftune.methods.lora.model import add_lora
        add_lora(model, LoraConfig(r=16, alpha=32, use_dora=case.startswith("efftune-dora")))
        if UNFUSED:
            from efftune.methods.lora.layer import lora_layers
            for _, layer in lora_layers(model):
                layer.fused = None
        if UNFUSED_MLP:
            from efftune.methods.lora.swiglu import unwrap_swiglu_mlps
            unwrap_swiglu_mlps(model)
    forward_options(case).check(model)  # flash4 / flex available here, as train() checks
    if "-fp8" in case:  # before compiling, as train() does
        from efftune.train.fp8 import Fp8Base
        Fp8Base(model)  # the exact weights go to host memory; this benchmark never restores them
    config = train_config(case, MEMORY_BUDGET, CKPT_FRACTION)
    if config.activation_checkpointing and not config.compiler_checkpoints:  # as train() switches it on
        from efftune.train.loop import enable_activation_checkpointing  # 5.24+ renamed the switch
        enable_activation_checkpointing(model, CKPT_FRACTION)
    if "-compile" in case:
        from efftune.train.compile import compile_blocks
        compile_blocks(model, cuda_graphs=case.endswith("-cg"), autotune=AUTOTUNE,
                       checkpoint_fraction=config.compiled_checkpoint_fraction())
    return model


def train_config(case: str, memory_budget: float | None, ckpt_fraction: float = 1.0):
    """The TrainConfig settings an efftune case stands for (compile, CUDA graphs, checkpointing, the
    memory budget), so the case checkpoints and partitions as train() would: compiled and fully
    checkpointed, by the compiler's recomputation (`TrainConfig.compiler_checkpoints`).
    bench/moe_lora.py names its cases the same way."""
    from efftune.train.loop import TrainConfig
    compiled, checkpointed = "-compile" in case, "-ckpt" in case and case.startswith("efftune")
    return TrainConfig(compile=compiled, cuda_graphs=case.endswith("-cg"), activation_checkpointing=checkpointed,
                       activation_checkpointing_fraction=ckpt_fraction if checkpointed else 1.0,
                       compile_memory_budget=memory_budget if compiled else None)


def forward_options(case: str):
    """The options train() would pass with the case's forwards (efftune.forward.options): --attention,
    --masked-attention for efftune cases, block masks kept in place for CUDA graphs (-cg), the LM
    head's softmax work compiled with compiled blocks (-compile), a trainable head's logit gradient
    kept from forward unless the case checkpoints (-ckpt)."""
    from efftune.forward.options import ForwardOptions
    ours = case.startswith("efftune")
    return ForwardOptions(attention=ATTENTION, masked_attention=MASKED_ATTENTION if ours else "sdpa",
                          static_masks=ours and case.endswith("-cg"), fused_head="-compile" in case,
                          keep_logit_grads="-ckpt" not in case)


def make_optimizer(model: torch.nn.Module, case: str) -> torch.optim.Optimizer:
    if case == "peft-fa":
        from peft.optimizers import create_lorafa_optimizer
        return create_lorafa_optimizer(model, r=16, lora_alpha=32, lr=1e-4)
    if case.startswith(("efftune-full-8bit", "efftune-full-adamwfp8")):
        from efftune.train.optimizers import build_optimizer, embedding_weights
        params = [p for p in model.parameters() if p.requires_grad]
        return build_optimizer("adamw8bit" if "-8bit" in case else "adamwfp8", [{"params": params, "weight_decay": 0.0}], 1e-4,
                               next(model.parameters()).device, embedding_weights(model))
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)


def loss_fn(model: torch.nn.Module, case: str, ids: torch.Tensor, options=None) -> torch.Tensor:
    """The case's loss over `ids`; `options`: the forward options (default: the case's, `forward_options`)."""
    if case in LOGPROBS_LOSS:
        from efftune.forward.logprobs import target_logprobs
        # every token but the first is a target, predicted from the one before; the index tensors
        # are built without a host sync, as train() builds them on the host
        b, n = ids.shape
        rows = torch.arange(b, device=ids.device).repeat_interleave(n - 1)
        cols = torch.arange(1, n, device=ids.device).repeat(b)
        return -target_logprobs(model, ids, rows, cols - 1, ids[rows, cols],
                                options=options or forward_options(case)).mean()
    return model(input_ids=ids, labels=ids).loss


def masked_batch(ids: torch.Tensor, kind: str):
    """`ids` laid out as rows with a mask (efftune.data.layout.Batch, on ids' device): "packed", 8
    documents side by side, each token but a document's first a target; "tree", the first 256
    tokens (a quarter of a shorter row) a prompt with no targets and the rest 15 continuations of
    it, every token a target."""
    from efftune.data.layout import Row, collate
    from efftune.data.tokenize import IGNORE

    def split(tokens: list[int], parts: int) -> list[list[int]]:
        size = len(tokens) // parts
        return [tokens[i * size:(i + 1) * size if i < parts - 1 else len(tokens)] for i in range(parts)]
    rows = []
    for tokens in ids.tolist():
        row = Row()
        if kind == "packed":
            for doc in split(tokens, 8):
                row.add(doc, labels=[IGNORE] + doc[1:])
        else:
            prompt = min(256, len(tokens) // 4)
            row.add(tokens[:prompt])
            for branch in split(tokens[prompt:], 15):
                row.add(branch, parent=0, labels=branch)
        rows.append(row)
    return collate(rows, 0, "sdpa", length=ids.shape[1]).to(ids.device)


def masked_loss_fn(model: torch.nn.Module, case: str, batch) -> torch.Tensor:
    """`loss_fn` over a masked batch: efftune's log-probs of its targets, or the model's own loss
    with the same mask and positions (labels: a target whose predicting token is the one before it)."""
    if case in LOGPROBS_LOSS:
        from efftune.forward.logprobs import target_logprobs
        return -target_logprobs(model, batch.input_ids, batch.rows, batch.sources, batch.targets,
                                batch.position_ids, batch.mask, options=forward_options(case)).mean()
    labels = torch.full_like(batch.input_ids, -100)
    shifted = batch.sources + 1 < batch.input_ids.shape[1]
    keep = shifted & (batch.input_ids[batch.rows, (batch.sources + 1).clamp(max=batch.input_ids.shape[1] - 1)]
                      == batch.targets)
    labels[batch.rows[keep], batch.sources[keep] + 1] = batch.targets[keep]
    return model(input_ids=batch.input_ids, attention_mask=batch.mask, position_ids=batch.position_ids,
                 labels=labels).loss


def param_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(frozen, trainable); a tied lm_head counts again, as its matmul still runs."""
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    frozen += sum(b.numel() for n, b in model.named_buffers() if n.endswith("weight_fp8"))  # train.fp8_base
    for m in model.modules():  # quantised linears: their weights' elements, not their packed storage
        if type(m).__name__ in ("Nf4Linear", "Int8Linear", "Linear4bit"):
            frozen += m.in_features * m.out_features - sum(p.numel() for p in m.parameters(recurse=False)
                                                            if not p.requires_grad and p is not m.bias)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if inner.lm_head.weight is inner.get_input_embeddings().weight:
        frozen += inner.lm_head.weight.numel()
    return frozen, trainable


def train_step(compute_loss, opt: torch.optim.Optimizer, device: torch.device, cuda_graphs: bool = False,
               mark=None):
    """One training step as every benchmark times it: loss under bf16 autocast, backward,
    optimizer step, zero_grad; returns the detached loss. `cuda_graphs`: mark the step's start for
    the graphs' memory (as train() does with train.cuda_graphs). `mark(phase)`, if given, is called
    as "forward", "backward" and "optimizer" end (bench/profile_step.py times the phases)."""
    mark = mark or (lambda phase: None)

    def step() -> torch.Tensor:
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = compute_loss()
        mark("forward")
        loss.backward()
        mark("backward")
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark("optimizer")
        return loss.detach()
    return step


def timed_steps(step, steps: int, warmup: int, device: torch.device) -> tuple[float, torch.Tensor, dict]:
    """(seconds per timed step, last loss, the GPU's energy over the timed steps) after `warmup`
    untimed steps (compilation happens there)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        loss = step()
    sync()
    meter = EnergyMeter(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    seconds = time.perf_counter() - start
    return seconds / steps, loss, meter.read(seconds, steps)


class EnergyMeter:
    """The GPU's energy counter through NVML (`pip install nvidia-ml-py`), read at construction and
    in `read`: mean power against the enforced power limit shows whether a case ran power-capped,
    where the chip lowers its clock and time saved in memory-bound kernels buys less. The counter
    moves in coarse updates: trust it over a second or more of timed steps. Empty without NVML or a GPU."""

    def __init__(self, device: torch.device):
        self.nvml, self.handle, self.start, self.error = None, None, None, None
        if device.type != "cuda":
            return
        try:
            import pynvml
            pynvml.nvmlInit()
            # by UUID: NVML numbers every GPU on the host, CUDA only the visible ones
            self.handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{torch.cuda.get_device_properties(device).uuid}")
            self.nvml, self.start = pynvml, pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        except Exception as e:  # no NVML, or a driver without the energy counter
            self.nvml, self.error = None, f"{type(e).__name__}: {e}"[:120]

    def read(self, seconds: float, steps: int) -> dict:
        if self.nvml is None:
            return {} if self.error is None else dict(energy_error=self.error)
        joules = (self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) - self.start) / 1000
        if joules <= 0:  # the counter moves in coarse updates: too short a run reads nothing
            return dict(energy_error=f"the energy counter did not advance in {seconds:.3f} s")
        return dict(joules_per_step=round(joules / steps, 2), mean_power_w=round(joules / seconds, 1),
                    power_limit_w=self.nvml.nvmlDeviceGetEnforcedPowerLimit(self.handle) / 1000,
                    sm_clock_mhz=self.nvml.nvmlDeviceGetClockInfo(self.handle, self.nvml.NVML_CLOCK_SM))


def run_case(shape: str, case: str, steps: int, warmup: int, seq: int, batch: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = attach(build_model(shape, device), case)
    opt = make_optimizer(model, case)  # before counting: peft-fa freezes lora_A here
    frozen, trainable = param_counts(model)
    gen = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(0, SHAPES[shape]["vocab_size"], (batch, seq), device=device, generator=gen)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if ROWS == "single":
        step = train_step(lambda: loss_fn(model, case, ids), opt, device, cuda_graphs=case.endswith("-cg"))
    else:
        batch_rows = masked_batch(ids, ROWS)
        step = train_step(lambda: masked_loss_fn(model, case, batch_rows), opt, device,
                          cuda_graphs=case.endswith("-cg"))
    from efftune.train.compile import partitioner
    compiled = "-compile" in case
    budget = train_config(case, MEMORY_BUDGET, CKPT_FRACTION).compile_memory_budget
    with partitioner(budget, lean=not TORCH_PARTITIONER):  # compiles in warm-up
        step_s, loss, energy = timed_steps(step, steps, warmup, device)
    cfg = SHAPES[shape]
    tokens_s = batch * seq / step_s
    flops_token = 4 * frozen + 6 * trainable + 6 * cfg["num_hidden_layers"] * seq * cfg["hidden_size"]
    return dict(shape=shape, case=case, memory_budget=budget,
                ckpt_fraction=CKPT_FRACTION if "-ckpt" in case and case.startswith("efftune") else None,
                partitioner=("torch" if TORCH_PARTITIONER else "lean") if compiled else None,
                autotune=AUTOTUNE if compiled else None,
                attention=ATTENTION if case.startswith("efftune") else "sdpa", rows=ROWS,
                masked_attention=MASKED_ATTENTION if case.startswith("efftune") and ROWS != "single" else None,
                fused=(not UNFUSED) if case.startswith("efftune") else None,
                fused_mlp=(not UNFUSED and not UNFUSED_MLP) if case.startswith("efftune") else None, seq=seq,
                batch=batch, steps=steps, tokens_s=round(tokens_s, 1), step_s=round(step_s, 4),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
                mfu=round(tokens_s * flops_token / PEAK_FLOPS, 4), frozen=frozen, trainable=trainable,
                loss=round(loss.item(), 4), device=torch.cuda.get_device_name() if cuda else "cpu", **energy,
                tokens_per_joule=round(batch * seq / energy["joules_per_step"], 1) if "joules_per_step" in energy else None)


def run_worker(cmd: list[str], head: dict, timeout: int, env: dict | None = None) -> dict:
    """Run one benchmark case in its own interpreter (clean peak memory; an OOM kills only that
    case); its last stdout line is its JSON result, else `head` with the error."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(head, error=f"timed out after {timeout} s")
    if proc.returncode != 0:
        oom = "OutOfMemoryError" in proc.stderr or "CUDA out of memory" in proc.stderr
        return dict(head, error="OOM" if oom else f"exit {proc.returncode}", stderr_tail=proc.stderr[-1500:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def spawn(args: argparse.Namespace, shape: str, case: str, batch: int) -> dict:
    """Run one case in a fresh interpreter; its last stdout line is its JSON result."""
    cmd = [sys.executable, __file__, "--worker", case, "--shape", shape, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--seq", str(args.seq), "--batch", str(batch)]
    if args.memory_budget is not None:
        cmd += ["--memory-budget", str(args.memory_budget)]
    cmd += ["--ckpt-fraction", str(args.ckpt_fraction)] + (["--layers", str(args.layers)] if args.layers else [])
    cmd += (["--torch-partitioner"] * args.torch_partitioner + ["--autotune"] * args.autotune
            + ["--unfused"] * args.unfused + ["--unfused-mlp"] * args.unfused_mlp
            + ["--attention", args.attention, "--rows", args.rows, "--masked-attention", args.masked_attention])
    head = dict(shape=shape, case=case, batch=batch, **({"layers": args.layers} if args.layers else {}))
    return run_worker(cmd, head, args.case_timeout)


def _ratio(r: dict, base: dict | None, key: str) -> float | None:
    if base is None or not r.get(key) or not base.get(key):
        return None
    return round(r[key] / base[key], 3)


def meets(r: dict, base: dict | None, speed: float, peak: float | None = None) -> bool | None:
    """A bar: case line `r`'s tokens/s >= speed x `base`'s and, with `peak`, its peak GiB <= peak x base's;
    None (no verdict) where the base did not run or a peak is not measured (CPU)."""
    if base is None or (peak is not None and (r["peak_gib"] is None or base["peak_gib"] is None)):
        return None
    return r["tokens_s"] >= speed * base["tokens_s"] and (peak is None or r["peak_gib"] <= peak * base["peak_gib"])


def dora_bar(ok: dict[str, dict]) -> dict | None:
    """Issue 25's bar per efftune DoRA case run: tokens/s and peak against peft-dora (>= 2.5x at
    <= 0.5x), tokens/s against efftune LoRA in the same mode (>= 0.9x)."""
    peft_dora, bar = ok.get("peft-dora"), {}
    for mode, lora_case in (("", "efftune"), ("-compile", "efftune-compile"), ("-compile-cg", "efftune-compile-cg")):
        dora, lora = ok.get(f"efftune-dora{mode}"), ok.get(lora_case)
        if dora is None:
            continue
        vs_peft, vs_lora = meets(dora, peft_dora, 2.5, 0.5), meets(dora, lora, 0.9)
        bar[f"efftune-dora{mode}"] = dict(
            speed_vs_peft_dora=_ratio(dora, peft_dora, "tokens_s"), peak_vs_peft_dora=_ratio(dora, peft_dora, "peak_gib"),
            speed_vs_efftune_lora=_ratio(dora, lora, "tokens_s"),
            passes=None if vs_peft is None or vs_lora is None else vs_peft and vs_lora)
    return bar or None


def qlora_bar(ok: dict[str, dict]) -> dict | None:
    """Issue 24's bars per efftune NF4 case run. A checkpointed one against each peft + bitsandbytes QLoRA
    peer with checkpointing that ran (>= 2x its tokens/s at <= 0.75x its peak): `peft-qlora-kbit-ckpt`,
    peft's documented preparation and the issue's reference peer, and the bare `peft-qlora-ckpt`. One
    without checkpointing against efftune bf16 LoRA in the same mode (>= 0.9x its tokens/s)."""
    bar = {}
    for case, r in ok.items():
        if not (case.startswith("efftune") and "-nf4" in case):
            continue
        if "-ckpt" not in case:
            bf16 = ok.get(case.replace("-nf4", ""))
            bar[case] = dict(speed_vs_bf16=_ratio(r, bf16, "tokens_s"), passes=meets(r, bf16, 0.9))
            continue
        against = {}
        for peer_case in ("peft-qlora-kbit-ckpt", "peft-qlora-ckpt"):
            peer = ok.get(peer_case)
            if peer is None:
                continue
            against[peer_case] = dict(speed=_ratio(r, peer, "tokens_s"), peak=_ratio(r, peer, "peak_gib"),
                                      passes=meets(r, peer, 2, 0.75))
        bar[case] = against or None
    return bar or None


def summarize(results: list[dict]) -> dict:
    """Per shape and batch: each case's tokens/s and peak-memory ratios to efftune (LoRA), peft (LoRA)
    and plain full fine-tuning (full-plain), and the LoRA-FA bar: efftune-fa peak <= peft-fa's and <= 0.7x efftune's, at >= 0.95x
    efftune's tokens/s."""
    summary: dict[str, dict] = {}
    for shape, batch in dict.fromkeys((r["shape"], r["batch"]) for r in results):
        by_case = {r["case"]: r for r in results if r["shape"] == shape and r["batch"] == batch}
        ok = {c: r for c, r in by_case.items() if "error" not in r}
        ratios = {}
        for case, r in by_case.items():
            if "error" in r:
                ratios[case] = r["error"]
                continue
            ratios[case] = {f"{k}_vs_{b}": _ratio(r, ok.get(b), k)
                            for b in ("efftune", "peft", "full-plain") for k in ("tokens_s", "peak_gib")}
        fa, lora, pfa = ok.get("efftune-fa"), ok.get("efftune"), ok.get("peft-fa")
        bar = None
        if fa and lora and fa["peak_gib"] is not None:
            bar = dict(mem_vs_efftune=fa["peak_gib"] <= 0.7 * lora["peak_gib"],
                       speed_vs_efftune=fa["tokens_s"] >= 0.95 * lora["tokens_s"],
                       mem_vs_peft_fa=(fa["peak_gib"] <= pfa["peak_gib"]) if pfa else None)
        summary[f"{shape} batch {batch}"] = dict(ratios=ratios, lora_fa_bar=bar, dora_bar=dora_bar(ok),
                                                 qlora_bar=qlora_bar(ok))
    return {"summary": "per shape and batch", "results": summary}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", nargs="+", default=["llama3-8b"], choices=sorted(SHAPES))
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seq", type=int, default=None, help="default 4096 (128 for tiny)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1], help="one or more batch sizes (a sweep)")
    ap.add_argument("--case-timeout", type=int, default=240, help="seconds per case subprocess")
    ap.add_argument("--memory-budget", type=float, default=None,
                    help="compiled cases: activation memory budget in (0, 1] (efftune.train.compile)")
    ap.add_argument("--ckpt-fraction", type=float, default=1.0,
                    help="efftune -ckpt cases: the share of decoder layers checkpointed "
                         "(train.activation_checkpointing_fraction)")
    ap.add_argument("--torch-partitioner", action="store_true",
                    help="compiled cases: torch's default recompute rules (train.compile_lean: false)")
    ap.add_argument("--autotune", action="store_true",
                    help="compiled cases: benchmark GEMM kernels per shape (efftune's train.compile_autotune)")
    ap.add_argument("--unfused", action="store_true",
                    help="efftune LoRA: base linear and LoRA GEMMs apart in each layer (no lora_linears op)")
    ap.add_argument("--unfused-mlp", action="store_true",
                    help="efftune LoRA: SwiGLU MLPs on the lora_linears ops, without the swiglu_lora op")
    ap.add_argument("--attention", choices=("sdpa", "flash4"), default="sdpa",
                    help="efftune cases: kernel for the maskless causal attention (train.attention; flash4 "
                         "needs the flash-attn-4 package)")
    ap.add_argument("--rows", choices=("single", "packed", "tree"), default="single",
                    help="one sequence per row, or rows with a mask: 8 packed documents, or a prompt with 15 "
                         "continuations as a token tree")
    ap.add_argument("--masked-attention", choices=("sdpa", "flex"), default="sdpa",
                    help="efftune cases with --rows packed|tree: kernel for the masked attention "
                         "(train.masked_attention)")
    ap.add_argument("--layers", type=int, default=None,
                    help="the shape with only this many decoder layers (a deep shape's step where it does not fit)")
    ap.add_argument("--worker", choices=CASES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    global MEMORY_BUDGET, LAYERS, TORCH_PARTITIONER, AUTOTUNE, UNFUSED, UNFUSED_MLP
    global ATTENTION, ROWS, MASKED_ATTENTION
    global CKPT_FRACTION
    MEMORY_BUDGET, TORCH_PARTITIONER, AUTOTUNE = args.memory_budget, args.torch_partitioner, args.autotune
    CKPT_FRACTION, LAYERS = args.ckpt_fraction, args.layers
    ATTENTION, ROWS, MASKED_ATTENTION = args.attention, args.rows, args.masked_attention
    UNFUSED, UNFUSED_MLP = args.unfused, args.unfused_mlp
    if args.worker:  # inside the subprocess: one shape, one case
        shape = args.shape[0]
        print(json.dumps(run_case(shape, args.worker, args.steps, args.warmup,
                                  args.seq or default_seq(shape), args.batch[0])))
        return
    results = []
    for shape in args.shape:
        sub = argparse.Namespace(**{**vars(args), "seq": args.seq or default_seq(shape)})
        for batch in args.batch:
            for case in args.cases:
                results.append(spawn(sub, shape, case, batch))
                print(json.dumps(results[-1]), flush=True)
    print(json.dumps(summarize(results)), flush=True)


if __name__ == "__main__":
    main()

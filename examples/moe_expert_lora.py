"""LoRA on the experts of an MoE model, ESFT's expert selection, and the peft export, from Python.

Offline there is no MoE checkpoint, so this builds a small random-init Qwen3-MoE with the default
model's tokenizer; with a real one, use `load_model("Qwen/Qwen3-30B-A3B")` (or OLMoE, Mixtral)
and drop `tiny_qwen3_moe`.

    python examples/moe_expert_lora.py       # well under a minute on 2 CPU cores
"""
import torch
import transformers

from efftune.data import Formatter, load_task, split_examples
from efftune.methods.esft import expert_affinity, select_experts
from efftune.methods.expert_lora import (ExpertLoraConfig, add_expert_lora, export_peft, load_expert_lora,
                                         save_expert_lora)
from efftune.models import load_model
from efftune.train.loop import TrainConfig, train


def tiny_qwen3_moe(vocab_size: int) -> torch.nn.Module:
    config = transformers.Qwen3MoeConfig(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=128,
        norm_topk_prob=True, tie_word_embeddings=True, router_aux_loss_coef=0.01)
    torch.manual_seed(0)
    return transformers.Qwen3MoeForCausalLM(config)


_, tokenizer = load_model()                     # the default model's tokenizer
model = tiny_qwen3_moe(len(tokenizer))
fmt = Formatter(tokenizer, max_length=128)
train_set, _ = split_examples(load_task("intent_recognition"), 50, seed=0)
sequences = [fmt.encode(e) for e in train_set[:64]]

# ESFT's first step: which experts does this task route to? (per layer: gate score and token share)
batches = [torch.tensor([s.input_ids]) for s in sequences[:16]]
affinity = expert_affinity(model, batches)
chosen = select_experts(affinity.gate, threshold=0.5)   # the paper's rule: top experts up to 50% of the score
print("experts ESFT would train:", dict(zip(affinity.layers, chosen)))

# Expert LoRA: per-expert A_e, B_e on the fused gate_up / down weights, plus attention LoRA; the
# training loop adds the model's own load-balancing loss and draws routing.png.
cfg = ExpertLoraConfig(r=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
add_expert_lora(model, cfg)
train(model, sequences, TrainConfig(steps=10, batch_size=8, lr=3e-3, warmup_steps=2, eval_every=0),
      "runs/moe-example", pad_id=tokenizer.pad_token_id)

save_expert_lora(model, "runs/moe-example/adapter", cfg, metadata={"task": "intent_recognition"})
export_peft(model, "runs/moe-example/peft", cfg)         # peft's target_parameters layout
fresh = tiny_qwen3_moe(len(tokenizer))
load_expert_lora(fresh, "runs/moe-example/adapter")
ids = torch.tensor([sequences[0].input_ids])
model.eval(), fresh.eval()
with torch.no_grad():
    print("reloaded adapter gives the same logits:", torch.allclose(fresh(ids).logits, model(ids).logits, atol=1e-5))

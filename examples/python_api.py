"""efftune from Python: load, attach LoRA, train, evaluate, save, load, merge.

    python examples/python_api.py            # about 3 minutes on 2 CPU cores
"""
import torch

from efftune.data import Formatter, load_task, split_examples
from efftune.eval.multiple_choice import multiple_choice_accuracy
from efftune.methods.lora import LoraConfig, add_lora, load_adapter, merge_and_unload, save_adapter
from efftune.models import load_model
from efftune.train.loop import TrainConfig, train

model, tokenizer = load_model()                      # the embedded SmolLM2-135M-Instruct
train_set, eval_set = split_examples(load_task("intent_recognition"), 100, seed=0)
fmt = Formatter(tokenizer, max_length=256)

lora = LoraConfig(r=8, alpha=16, target_modules="all-linear")
add_lora(model, lora)
print("before:", multiple_choice_accuracy(model, fmt, eval_set))
train(model, [fmt.encode(e) for e in train_set], TrainConfig(steps=15, batch_size=16, lr=1e-3, warmup_steps=2),
      "runs/api-example", pad_id=tokenizer.pad_token_id)
print("after:", multiple_choice_accuracy(model, fmt, eval_set))
save_adapter(model, "runs/api-example/adapter", lora)   # peft format

fresh, _ = load_model()
load_adapter(fresh, "runs/api-example/adapter")          # or peft.PeftModel.from_pretrained(...)
merge_and_unload(fresh)                                  # a plain transformers model again
ids = torch.tensor([fmt.encode_prompt(eval_set[0].prompt)])
print(torch.allclose(fresh(ids).logits, model(ids).logits, atol=1e-4))

"""Greedy replies to held-out conversations, written at each evaluation to samples.jsonl: what
the model says, beside what the data says, as training goes."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..data.chat import prompt_of
from ..data.examples import Conversation
from ..data.tokenize import Formatter
from ..files import write_text_atomically


@torch.no_grad()
def greedy_replies(model: nn.Module, formatter: Formatter, conversations: Sequence[Conversation],
                   max_new_tokens: int = 64) -> list[dict]:
    """For each conversation: its turns before the last assistant turn as the prompt (rendered
    with the chat template and its generation prompt, after the formatter's prefix for it: prompt
    tuning's virtual tokens, as in training), the model's greedy reply, and the conversation's own
    reply as the reference."""
    tokenizer = formatter.tokenizer
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for conv in conversations:
            found = prompt_of(conv)
            if found is None:
                continue
            messages, reference = found
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            prompt = formatter.prefix_for(conv) + tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt], device=device)
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
            reply = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
            out.append({"prompt": messages, "reply": reply, "reference": reference})
    finally:
        model.train(was_training)
    return out


def append_samples(path: Path, step: int, samples: list[dict]) -> None:
    """Add the replies of the evaluation after `step` steps to `path` (samples.jsonl), one row each.

    Rows at `step` or later can only be an earlier attempt's: a resumed run starts again from its
    checkpoint and evaluates those steps anew. They are replaced (the file rewritten atomically),
    so each evaluation's rows are there once; so is a line a killed run left half-written."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True) if path.is_file() else []
    kept = [line for line in lines if line.endswith("\n") and (at := _step_of(line)) is not None and at < step]
    new = [json.dumps({"step": step, "sample": i, **sample}, ensure_ascii=False) + "\n"
           for i, sample in enumerate(samples)]
    if len(kept) == len(lines):
        with open(path, "a", encoding="utf-8") as f:
            f.writelines(new)
    else:
        write_text_atomically(path, "".join(kept + new))


def _step_of(line: str) -> int | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = row.get("step") if isinstance(row, dict) else None
    return step if isinstance(step, int) else None

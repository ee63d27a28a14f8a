"""Chat templates for the tiny test tokenizer: SmolLM2's own (ChatML), a Llama-3-style one, and the
same Llama-3 one with `{% generation %}` blocks (transformers' assistant mask)."""
from __future__ import annotations

from pathlib import Path

from tests.conftest import make_tokenizer

# SmolLM2-135M-Instruct's chat_template.jinja, as the model ships it
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

LLAMA3_GENERATION = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | trim }}<|eot_id|>{% endgeneration %}"
    "{% else %}{{ m['content'] | trim }}<|eot_id|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# drops the content of every assistant turn but the last, as reasoning templates drop earlier thoughts
REWRITES_HISTORY = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and not loop.last %}"
    "(earlier reply){% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SMOLLM2_DIR = Path.home() / ".cache" / "efftune" / "models" / "SmolLM2-135M-Instruct"


def chatml_tokenizer(template: str = SMOLLM2):
    """The tiny tokenizer with ChatML's special tokens; <|im_end|> is EOS, as in SmolLM2."""
    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "eos_token": "<|im_end|>"})
    tok.chat_template = template
    return tok


def llama3_tokenizer(template: str = LLAMA3):
    """The tiny tokenizer with Llama-3's header and turn tokens; EOS stays <eos> (Llama-3 base's
    <|end_of_text|> is not the end of a turn either)."""
    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                            "bos_token": "<|begin_of_text|>"})
    tok.chat_template = template
    return tok

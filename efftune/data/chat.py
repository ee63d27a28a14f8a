"""Conversations: parse chat rows, render them with the model's chat template, and mark which
tokens the loss covers.

Rows come as OpenAI/TRL `{"messages": [{"role", "content"}, ...]}` or ShareGPT
`{"conversations": [{"from", "value"}, ...]}`. The loss mask is read off the template itself,
never guessed from string offsets of our own:

- a template with `{% generation %}` blocks gets transformers' assistant-token mask;
- any other template is rendered turn by turn: the conversation up to assistant turn k with the
  generation prompt, then up to and including turn k. What lies between the two renderings is
  that turn as the template writes it. Each rendering must be a prefix of the whole conversation's
  (else the template rewrites history, e.g. drops earlier reasoning, and no prefix-based mask is
  exact): such a template is refused, naming the row.

In the turn-by-turn case the text is tokenised piece by piece at those boundaries, as generation
sees it: the prompt up to the assistant header is one piece, the reply the next.
"""
from __future__ import annotations

import re
from typing import Sequence

from ..errors import DataError
from .examples import Conversation

IGNORE = -100  # the same value as tokenize.IGNORE (imported there from here would make a cycle)
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool", "function_response": "tool", "observation": "tool"}
TRAIN_ON = ("assistant", "last_assistant", "all")
_GENERATION_BLOCK = re.compile(r"{%-?\s*generation\s*-?%}")


# ---- rows -> Conversation -------------------------------------------------------------------------------

def is_conversation_row(obj: dict) -> bool:
    return "messages" in obj or "conversations" in obj


def parse_conversation(obj: dict, where: str) -> Conversation:
    """A chat row as a Conversation; a bad row raises DataError naming `where` and the field."""
    field = "messages" if "messages" in obj else "conversations"
    turns = obj[field]
    if not isinstance(turns, (list, tuple)):
        raise DataError(f"{where}: field {field!r} must be a list of turns, found {type(turns).__name__}")
    if not turns:
        raise DataError(f"{where}: field {field!r} is an empty conversation")
    # ShareGPT writes {"from", "value"}; some exports put OpenAI's keys under "conversations"
    sharegpt = field == "conversations" and isinstance(turns[0], dict) and "from" in turns[0]
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    messages = []
    for i, turn in enumerate(turns):
        at = f"{where}: {field}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{at} must be an object with {role_key!r} and {content_key!r}, "
                            f"found {type(turn).__name__}")
        for key in (role_key, content_key):
            if key not in turn:
                raise DataError(f"{at} is missing field {key!r}")
        role, content = turn[role_key], turn[content_key]
        if not isinstance(role, str):  # (a list would not even be hashable for the lookup below)
            raise DataError(f"{at}.{role_key} must be a string, found {type(role).__name__}")
        if sharegpt:
            if role not in SHAREGPT_ROLES:
                raise DataError(f"{at}.from: unknown role {role!r} (known: {', '.join(SHAREGPT_ROLES)})")
            role = SHAREGPT_ROLES[role]
        elif role not in ROLES:
            raise DataError(f"{at}.role: unknown role {role!r} (known: {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise DataError(f"{at}.{content_key} must be a string, found {type(content).__name__}")
        messages.append((role, content))
    return Conversation(tuple(messages), where)


def has_assistant_turn(conv: Conversation) -> bool:
    return any(role == "assistant" for role, _ in conv.messages)


def prompt_of(conv: Conversation) -> tuple[list[dict[str, str]], str] | None:
    """The turns before the last assistant turn, and that turn's text: a held-out prompt and
    its reference reply (None without an assistant turn)."""
    last = max((k for k, (role, _) in enumerate(conv.messages) if role == "assistant"), default=None)
    if last is None:
        return None
    return conv.as_dicts()[:last], conv.messages[last][1]


# ---- Conversation -> token ids and labels ---------------------------------------------------------------

def check_template(tokenizer, where: str = "") -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where + ': ' if where else ''}a conversation needs a chat template, and this model's "
                        "tokenizer has none (use a chat model, or prompt/completion rows)")


def _render(tokenizer, messages: list[dict], generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja's raise_exception (e.g. "roles must alternate"), template errors
        raise DataError(f"{where}: the model's chat template refused this conversation: "
                        f"{' '.join(str(exc).split())}") from None


def turn_pieces(tokenizer, conv: Conversation, where: str) -> list[tuple[str, int | None]]:
    """The conversation's rendering cut at its assistant turns: [(text, turn index or None)], where
    a piece with a turn index is that assistant turn as the template writes it (from after its
    header to the end of its rendering). Raises DataError when a prefix's rendering is not a
    prefix of the whole."""
    messages = conv.as_dicts()
    whole = _render(tokenizer, messages, False, where)
    pieces: list[tuple[str, int | None]] = []
    done = 0  # characters of `whole` placed in pieces
    for k, (role, _) in enumerate(conv.messages):
        if role != "assistant":
            continue
        start = _render(tokenizer, messages[:k], True, where) if k else _empty_generation_prompt(tokenizer, where)
        end = _render(tokenizer, messages[:k + 1], False, where)
        for text, what in ((start, f"the turns before turn {k} with the generation prompt"),
                           (end, f"the turns up to turn {k}")):
            if not whole.startswith(text) or len(text) < done:
                raise DataError(f"{where}: the chat template's rendering of {what} is not a prefix of the whole "
                                "conversation's, so the assistant tokens cannot be found exactly (a template "
                                "that rewrites earlier turns); use a template without that, or train_on: all")
        if not end.startswith(start):
            raise DataError(f"{where}: the chat template renders turn {k} differently with and without the "
                            "generation prompt, so its tokens cannot be found exactly")
        if len(start) > done:
            pieces.append((whole[done:len(start)], None))
        if len(end) > len(start):
            pieces.append((whole[len(start):len(end)], k))
        done = len(end)
    if len(whole) > done:
        pieces.append((whole[done:], None))
    return pieces


def _empty_generation_prompt(tokenizer, where: str) -> str:
    try:
        return _render(tokenizer, [], True, where)
    except DataError:  # a template that needs a message: the header is the whole start
        return ""


def _ids(tokenizer, text: str) -> list[int]:
    # the template writes special tokens (BOS too, where the model wants one) as text
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _spans(mask: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of ones."""
    spans, start = [], None
    for t, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = t
        elif not m and start is not None:
            spans.append((start, t))
            start = None
    return spans


def _with_generation_mask(tokenizer, conv: Conversation, n_assistant: int, where: str
                          ) -> tuple[list[int], list[tuple[int, int]]] | None:
    """(ids, one [start, end) per assistant turn) from transformers' assistant-token mask, or None
    when the template's generation blocks do not give one span per assistant turn."""
    try:
        out = tokenizer.apply_chat_template(conv.as_dicts(), tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    except Exception as exc:
        raise DataError(f"{where}: the model's chat template refused this conversation: "
                        f"{' '.join(str(exc).split())}") from None
    ids = list(out["input_ids"])
    spans = _spans(out["assistant_masks"])
    return (ids, spans) if len(spans) == n_assistant else None


def _turn_by_turn(tokenizer, conv: Conversation, where: str) -> tuple[list[int], list[tuple[int, int]]]:
    ids: list[int] = []
    spans = []
    eos = tokenizer.eos_token_id
    for text, turn in turn_pieces(tokenizer, conv, where):
        piece = _ids(tokenizer, text)
        if turn is not None:
            # what the template writes after the end-of-turn token (ChatML's newline) is never
            # generated: the reply ends at EOS, so the target does too
            end = max((t + 1 for t, i in enumerate(piece) if i == eos), default=len(piece))
            spans.append((len(ids), len(ids) + end))
        ids.extend(piece)
    return ids, spans


def assistant_spans(tokenizer, conv: Conversation, where: str = "") -> tuple[list[int], list[tuple[int, int]]]:
    """The conversation's token ids and, per assistant turn in order, the [start, end) of its tokens."""
    check_template(tokenizer, where)
    n_assistant = sum(role == "assistant" for role, _ in conv.messages)
    if _GENERATION_BLOCK.search(tokenizer.chat_template):
        found = _with_generation_mask(tokenizer, conv, n_assistant, where)
        if found is not None:
            return found
    return _turn_by_turn(tokenizer, conv, where)


def encode_conversation(tokenizer, conv: Conversation, train_on: str = "assistant", max_length: int = 512,
                        prefix_ids: Sequence[int] = (), where: str = "") -> tuple[list[int], list[int], int]:
    """(input_ids, labels, tokens dropped): labels are IGNORE except on the tokens `train_on`
    covers (assistant: every assistant turn; last_assistant: the last one; all: every token but the
    first). `prefix_ids` (prompt tuning's virtual tokens) go first, never targets. A conversation
    longer than `max_length` keeps its start (the system prompt and the first turns)."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
    ids, spans = assistant_spans(tokenizer, conv, where)
    if train_on == "all":
        labels = [IGNORE] + ids[1:]
    else:
        labels = [IGNORE] * len(ids)
        for start, end in spans[-1:] if train_on == "last_assistant" else spans:
            labels[start:end] = ids[start:end]
    prefix = list(prefix_ids)
    ids, labels = prefix + ids, [IGNORE] * len(prefix) + labels
    dropped = max(0, len(ids) - max_length)
    return ids[:max_length], labels[:max_length], dropped

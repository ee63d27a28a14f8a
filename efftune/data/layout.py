"""Rows of token trees: a shared prefix runs once, and the sequences that continue it branch off.

A row holds segments in depth-first order; each segment has a parent (or none). A token attends
to the earlier tokens of its own segment and to every token of its ancestors, and its position
id continues from where its parent ended, so each root-to-leaf path computes exactly what the
sequence alone would. Uses:

- training: the prompts of a batch often share a task instruction; it becomes the root and each
  example's remainder a branch, so the instruction runs once per row instead of once per example;
- scoring multiple choice: the prompt is the parent of every choice;
- plain packing: every sequence a root of its own (block-diagonal causal attention).

A labelled token is predicted from the token before it on its path: the previous token of its
segment, or the last token of the parent segment for a segment's first token.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .tokenize import IGNORE, Encoded

MIN_SHARED = 8  # shorter common prefixes are not worth a tree


@dataclass
class Row:
    ids: list[int] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    seg: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)   # parent segment of each segment (-1: root)
    ends: list[int] = field(default_factory=list)      # position id after each segment's last token
    lasts: list[int] = field(default_factory=list)     # row index of each segment's last token
    sources: list[int] = field(default_factory=list)   # per target: index of the predicting token
    targets: list[int] = field(default_factory=list)
    tags: list[object] = field(default_factory=list)   # per target: caller's bookkeeping

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, ids: Sequence[int], parent: int = -1, labels: Sequence[int] | None = None,
            tag: object = None) -> int:
        """Append a segment under `parent`; `labels[t]` (not IGNORE) makes token t a target."""
        if not ids:
            raise ValueError("a segment needs at least one token")
        s = len(self.parents)
        start_pos = self.ends[parent] if parent >= 0 else 0
        at = len(self.ids)
        prev = self.lasts[parent] if parent >= 0 else None
        self.ids.extend(ids)
        self.pos.extend(range(start_pos, start_pos + len(ids)))
        self.seg.extend([s] * len(ids))
        self.parents.append(parent)
        self.ends.append(start_pos + len(ids))
        self.lasts.append(len(self.ids) - 1)
        for t, label in enumerate(labels if labels is not None else []):
            if label == IGNORE:
                continue
            source = at + t - 1 if t > 0 else prev
            if source is None:
                raise ValueError("the first token of a root segment cannot be a target")
            self.sources.append(source)
            self.targets.append(label)
            self.tags.append(tag)
        return s


@dataclass
class Batch:
    """Tensors for one forward pass over rows. When every row is one sequence counted from position
    0, `mask` and `position_ids` are None: the model's own causal mask and positions are exact (a
    padded tail is never attended by real tokens), and the forward skips transformers' mask
    preparation (`efftune.forward.causal`). `real` (B, L) bool marks the rows' own tokens (False: padding),
    for what counts tokens, such as an MoE balance loss."""
    input_ids: torch.Tensor
    position_ids: torch.Tensor | None
    mask: torch.Tensor | None
    rows: torch.Tensor
    sources: torch.Tensor
    targets: torch.Tensor
    tags: list
    real: torch.Tensor

    def to(self, device) -> "Batch":
        move = lambda t: t.to(device) if t is not None else None
        return Batch(move(self.input_ids), move(self.position_ids), move(self.mask), move(self.rows),
                     move(self.sources), move(self.targets), self.tags, move(self.real))

    @property
    def tokens(self) -> int:
        return int(self.input_ids.numel())


def collate(rows: Sequence[Row], pad_id: int, attention: str = "sdpa", length: int | None = None) -> Batch:
    """Stack rows (padding each to the longest, or to `length`); build the tree attention mask.

    `attention`: the model's attention implementation. sdpa takes a boolean mask (True = may
    attend); eager adds a float mask to the scores, so it gets 0 / -inf-like values.
    """
    L = max(len(r) for r in rows)
    if length is not None:
        if length < L:
            raise ValueError(f"collate: a row has {L} tokens, more than length={length}")
        L = length
    n = len(rows)
    ids = torch.full((n, L), pad_id, dtype=torch.long)
    real = torch.zeros((n, L), dtype=torch.bool)
    pos = torch.zeros((n, L), dtype=torch.long)
    seg = torch.zeros((n, L), dtype=torch.long)
    S = max(len(r.parents) for r in rows) + 1  # one extra segment for the padding
    anc = torch.zeros((n, S, S), dtype=torch.bool)
    trivial = True
    for i, r in enumerate(rows):
        k = len(r)
        ids[i, :k] = torch.tensor(r.ids)
        real[i, :k] = True
        pos[i, :k] = torch.tensor(r.pos)
        pos[i, k:] = torch.arange(L - k)
        seg[i, :k] = torch.tensor(r.seg)
        seg[i, k:] = S - 1
        anc[i, S - 1, S - 1] = True
        for s, parent in enumerate(r.parents):
            anc[i, s, s] = True
            while parent >= 0:
                anc[i, s, parent] = True
                parent = r.parents[parent]
        # one causal sequence per row, counted from 0: the model's own mask and positions are right
        trivial &= len(r.parents) == 1 and list(r.pos) == list(range(k))
    mask = None
    if trivial:
        pos = None
    else:
        seen = anc[torch.arange(n)[:, None, None], seg[:, :, None], seg[:, None, :]]  # (n, L, L)
        allowed = seen & torch.ones(L, L, dtype=torch.bool).tril()
        if attention == "eager":
            mask = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)[:, None]
        elif attention in ("sdpa", "flex_attention"):
            mask = allowed[:, None]
        else:
            raise ValueError(f"tree layouts need sdpa or eager attention, the model uses {attention!r}; "
                             "load it with attn_implementation='sdpa'")
    row_of = torch.tensor([i for i, r in enumerate(rows) for _ in r.targets], dtype=torch.long)
    return Batch(ids, pos, mask, row_of,
                 torch.tensor([s for r in rows for s in r.sources], dtype=torch.long),
                 torch.tensor([t for r in rows for t in r.targets], dtype=torch.long),
                 [tag for r in rows for tag in r.tags], real)


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix all `seqs` share."""
    if not seqs:
        return 0
    first, n = seqs[0], min(len(s) for s in seqs)
    for k in range(n):
        if any(s[k] != first[k] for s in seqs):
            return k
    return n


def training_rows(seqs: Sequence[Encoded], max_length: int) -> list[Row]:
    """Lay out training sequences in rows of at most `max_length` tokens.

    When the prompts share at least MIN_SHARED leading tokens, each row starts with that shared
    prefix once and holds the examples' remainders as branches; otherwise sequences are packed
    side by side as roots.
    """
    prompt_parts = [s.input_ids[:next((t for t, l in enumerate(s.labels) if l != IGNORE), len(s))] for s in seqs]
    shared = common_prefix(prompt_parts)
    shared = shared if shared >= MIN_SHARED and len(seqs) > 1 else 0
    trunk = list(seqs[0].input_ids[:shared]) if shared else []
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    rows: list[Row] = []
    for i in order:
        s = seqs[i]
        need = len(s) - shared
        row = next((r for r in rows if len(r) + need <= max_length), None)
        if row is None:
            row = Row()
            rows.append(row)
            if shared:
                row.add(trunk)
        if shared:
            row.add(s.input_ids[shared:], parent=0, labels=s.labels[shared:], tag=i)
        else:
            row.add(s.input_ids, labels=s.labels, tag=i)
    return rows

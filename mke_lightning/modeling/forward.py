"""Batched teacher forcing and greedy generation over left-padded prompts.

Every row is ``prompt + target[:-1]``, padded on the left, so that the
prediction of each row's last target token sits at the final position. Only
the last ``K = max(len(target))`` positions are sent through the LM head
(``logits_to_keep``): with a 262k-token vocabulary the head dominates memory
and time if every position is projected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T]
    targets: torch.Tensor  # [B, K] target token ids, left-padded with pad_id
    target_mask: torch.Tensor  # [B, K] True where a target token sits

    @property
    def keep(self) -> int:
        return self.targets.shape[1]

    def to(self, device: torch.device | str) -> "PackedBatch":
        return PackedBatch(
            *(
                t.to(device)
                for t in (self.input_ids, self.attention_mask, self.position_ids, self.targets, self.target_mask)
            )
        )


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Prompt ids with the tokenizer's special prefix (e.g. BOS)."""
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def encode_continuation(tokenizer, text: str) -> list[int]:
    """Continuation ids without special tokens (``text`` carries its separator)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {text!r} tokenises to nothing")
    return ids


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, position_ids)``, each ``[B, T]``, left-padded."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


def right_pad(rows: Sequence[Sequence[int]], width: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)``, each ``[B, width]``: rows left-aligned, padded on the right."""
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
            mask[i, : len(r)] = 1
    return ids, mask


def pack(prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], pad_id: int) -> PackedBatch:
    """Rows ``prompt + target[:-1]``; ``targets`` aligned to the last positions."""
    rows = [list(p) + list(t[:-1]) for p, t in zip(prompts, targets)]
    ids, mask, pos = left_pad(rows, pad_id)
    keep = max(len(t) for t in targets)
    tgt = torch.full((len(rows), keep), pad_id, dtype=torch.long)
    tmask = torch.zeros((len(rows), keep), dtype=torch.bool)
    for i, t in enumerate(targets):
        tgt[i, keep - len(t):] = torch.tensor(list(t), dtype=torch.long)
        tmask[i, keep - len(t):] = True
    return PackedBatch(ids, mask, pos, tgt, tmask)


def _head_output(model, batch: PackedBatch) -> torch.Tensor:
    """The model's logits with the head on the last ``batch.keep`` positions, as returned."""
    return model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=batch.keep,
        use_cache=False,
    ).logits


def kept_logits(model, batch: PackedBatch) -> torch.Tensor:
    """Logits of the last ``batch.keep`` positions: ``[B, K, V]``."""
    return _head_output(model, batch)[:, -batch.keep:, :]


def target_logits(model, batch: PackedBatch) -> torch.Tensor:
    """Logits at the target positions only: ``[M, V]``, ``M = batch.target_mask.sum()``, row by row.

    A forward pre-hook on the model's output embeddings hands the LM head just
    those ``M`` hidden states instead of all ``B x K``: where targets differ in
    length (12 languages and 1-token KL anchors in one batch) that is about half
    the head's work. Whatever the model does to the head's output elementwise
    (e.g. soft-capping) still applies. Where the head is not reached with
    ``[B, K, d]`` hidden states, the full ``[B, K, V]`` logits are sliced instead.
    """
    sel = batch.target_mask  # [B, K]
    logits, gathered = head_at(model, sel, lambda: _head_output(model, batch))
    return logits if gathered else logits[:, -batch.keep:, :][sel]  # [M, V]


def head_at(model, sel: torch.Tensor, forward) -> tuple[torch.Tensor, bool]:
    """Run ``forward()`` (returning logits) with the LM head applied only at the positions ``sel``
    ``[B, K]`` marks: ``([M, V], True)``, row by row. Where the head is not reached with ``[B, K, d]``
    hidden states, ``(forward()'s full logits, False)``: the caller selects from them."""
    head = model.get_output_embeddings()
    gathered = []

    def gather(module, args):
        hidden = args[0]  # [B, K, d]
        if hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(sel.shape):
            return None
        gathered.append(True)
        return (hidden[sel].unsqueeze(0), *args[1:])  # [1, M, d]

    handle = head.register_forward_pre_hook(gather) if head is not None else None
    try:
        logits = forward()  # [1, M, V] where the hook gathered, else the full logits
    finally:
        if handle is not None:
            handle.remove()
    return (logits[0], True) if gathered else (logits, False)


PASS_COST_POSITIONS = 48
"""A forward+backward pass's fixed cost, in padded positions: one more pass per step must save more pad
positions than this. Gemma 3 270M on one CPU thread: about 0.34 s per pass against 6.5 ms per
position (bench/length_groups.py)."""


def length_groups(lengths: Sequence[int], max_groups: int, pass_cost: int = PASS_COST_POSITIONS) -> list[list[int]]:
    """Row indices in at most ``max_groups`` groups of similar length, each to be padded to its longest row.

    The split has the fewest padded positions (``sum over groups of rows x longest``) plus
    ``pass_cost`` per group; groups come longest first, rows in each in their original order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))  # longest first
    n = len(order)
    if n == 0:
        return []
    most = max(1, min(max_groups, n))
    inf = float("inf")
    # best[g][j]: cost of the first j rows of ``order`` in g groups; start[g][j]: where the g-th group begins
    best = [[inf] * (n + 1) for _ in range(most + 1)]
    start = [[0] * (n + 1) for _ in range(most + 1)]
    best[0][0] = 0
    for g in range(1, most + 1):
        for j in range(g, n + 1):
            for i in range(g - 1, j):
                cost = best[g - 1][i] + lengths[order[i]] * (j - i) + pass_cost
                if cost < best[g][j]:
                    best[g][j], start[g][j] = cost, i
    g = min(range(1, most + 1), key=lambda k: (best[k][n], k))
    groups, j = [], n
    while g:
        i = start[g][j]
        groups.append(sorted(order[i:j]))
        j, g = i, g - 1
    return groups[::-1]


@dataclass
class GroupedBatch:
    """Rows packed in length groups, one forward pass each: ``rows[g]`` are the original indices of
    ``batches[g]``'s rows."""

    rows: list[list[int]]
    batches: list[PackedBatch]

    def to(self, device: torch.device | str) -> "GroupedBatch":
        return GroupedBatch(self.rows, [b.to(device) for b in self.batches])


def pack_groups(
    prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], pad_id: int, max_groups: int
) -> GroupedBatch:
    """:func:`pack` per length group (:func:`length_groups`): rows of 25 and of 8 tokens no longer pad to 25
    together."""
    rows = length_groups([len(p) + len(t) - 1 for p, t in zip(prompts, targets)], max_groups)
    return GroupedBatch(rows, [pack([prompts[i] for i in r], [targets[i] for i in r], pad_id) for r in rows])


def grouped_target_logits(model, grouped: GroupedBatch) -> list[torch.Tensor]:
    """Each row's logits at its target positions, in the original row order: one ``[len(target), V]`` per row."""
    out: list[torch.Tensor | None] = [None] * sum(len(r) for r in grouped.rows)
    for rows, batch in zip(grouped.rows, grouped.batches):
        logits = target_logits(model, batch)  # [M_g, V]
        for i, part in zip(rows, logits.split(batch.target_mask.sum(-1).tolist())):
            out[i] = part
    return out


def row_logprobs(row_logits: Sequence[torch.Tensor], targets: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Log-probability of each row's target tokens from :func:`grouped_target_logits`: one ``[len(target)]`` per row."""
    logits = torch.cat(list(row_logits))  # [M, V]
    ids = torch.tensor([t for row in targets for t in row], device=logits.device)  # [M]
    lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # [M]
    return list(lp.split([len(t) for t in targets]))


def picked_logprobs(logits: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Log-probability of each target token from :func:`target_logits`' ``[M, V]``, 0 where there is none:
    ``[B, K]``."""
    sel = batch.target_mask
    lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, batch.targets[sel].unsqueeze(-1)).squeeze(-1)  # [M]
    return lp.new_zeros(sel.shape).masked_scatter(sel, lp)


def target_logprobs(logits: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Log-probability of each target token, 0 where there is none: ``[B, K]``."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [B, K, V]
    picked = logp.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)  # [B, K]
    return picked * batch.target_mask


def token_accuracy(logits: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Teacher-forced argmax accuracy over each row's target tokens: ``[B]``."""
    hits = (logits.argmax(-1) == batch.targets) & batch.target_mask  # [B, K]
    return hits.sum(-1).float() / batch.target_mask.sum(-1).clamp(min=1)


@dataclass
class TeacherForced:
    """Per-row results of one teacher-forced pass."""

    accuracy: torch.Tensor  # [B] share of target tokens the argmax predicts
    predicted: list[list[int]]  # argmax token at each target position, per row
    mean_logprob: torch.Tensor  # [B] mean log-probability of the target tokens


def teacher_forced(logits: torch.Tensor, batch: PackedBatch) -> TeacherForced:
    """Accuracy, argmax tokens and mean target log-probability from ``[B, K, V]`` logits."""
    argmax = logits.argmax(-1)  # [B, K]
    n = batch.target_mask.sum(-1)  # [B]
    mean_lp = target_logprobs(logits, batch).sum(-1) / n.clamp(min=1)  # [B]
    predicted = [row[len(row) - int(k):] for row, k in zip(argmax.tolist(), n.tolist())]
    return TeacherForced(token_accuracy(logits, batch), predicted, mean_lp)


@torch.no_grad()
def greedy_generate(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_at_eos: bool = True,
    keep_end: bool = False,
) -> list[list[int]]:
    """Greedy continuations of all prompts in one batched ``generate`` call.

    With ``stop_at_eos`` each continuation is cut at its first end token
    (kept, as the last token, with ``keep_end``). Without it, end tokens are
    suppressed until ``max_new_tokens`` tokens are generated.
    """
    pad_id = tokenizer.pad_token_id
    ids, mask, _ = left_pad(prompts, pad_id)
    device = next(model.parameters()).device
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
        top_p=None,
        top_k=None,
        temperature=None,
        min_new_tokens=0 if stop_at_eos else max_new_tokens,
    )
    new = out[:, ids.shape[1]:].tolist()
    if not stop_at_eos:
        return new
    eos = {tokenizer.eos_token_id} | set(_as_list(getattr(model.generation_config, "eos_token_id", None)))
    cleaned = []
    for row in new:
        cut = next((i for i, t in enumerate(row) if t in eos or t == pad_id), len(row))
        ended = keep_end and cut < len(row) and row[cut] in eos
        cleaned.append(row[: cut + 1] if ended else row[:cut])
    return cleaned


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]

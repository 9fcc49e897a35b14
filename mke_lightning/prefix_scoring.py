"""Teacher forcing and greedy decoding that share one pass over each prompt.

An edit's evaluation asks three things of most prompts: the teacher-forced
scores of one or more targets (the new answer, the old one, a locality
reference) and a greedy continuation. Run naively, every one of them sends
the whole prompt through the model again. Here each prompt goes through once
(:func:`prefill`, left-padded, the KV cache kept); a target is then scored by
sending only its own tokens on top of a copy of that cache
(:func:`score_targets`), and the continuation is decoded from the cache
(:func:`greedy_continue`), each row stopping at its own length or end token
and leaving the batch, so that no step is spent on a finished row.

The results equal those of a full forward pass per row and of
``model.generate`` per prompt, up to floating-point summation order.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch

from mke_lightning.scoring import left_pad


@dataclass
class Prefill:
    """The state after ``U`` prompts went through the model once."""

    cache: object  # the model's KV cache of the U prompts
    mask: torch.Tensor  # [U, T] attention mask of the left-padded prompts
    next_pos: torch.Tensor  # [U] position id of each prompt's next token
    last_logits: torch.Tensor  # [U, V] logits at each prompt's last token


@dataclass
class TargetScore:
    """Teacher-forced scores of one target after its prompt."""

    accuracy: float  # share of target tokens the argmax predicts
    predicted: list[int]  # argmax token at each target position
    mean_logprob: float  # mean log-probability of the target tokens


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def prefill(model, prompts: Sequence[Sequence[int]], pad_id: int) -> Prefill:
    """Send the prompts through the model once, keeping the cache and the last logits."""
    ids, mask, pos = left_pad(prompts, pad_id)  # each [U, T]
    device = _device(model)
    mask, pos = mask.to(device), pos.to(device)
    out = model(input_ids=ids.to(device), attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    return Prefill(out.past_key_values, mask, pos[:, -1] + 1, out.logits[:, -1])


def _cache_rows(cache, rows: torch.Tensor):
    """A copy of ``cache`` holding the given batch rows (repeats allowed)."""
    picked = copy.deepcopy(cache)
    picked.batch_select_indices(rows)
    return picked


@torch.no_grad()
def score_targets(
    model, pre: Prefill, rows: Sequence[int], targets: Sequence[Sequence[int]], batch_rows: int = 32
) -> list[TargetScore]:
    """Teacher-forced scores of ``targets[i]`` after prompt ``rows[i]`` of ``pre``.

    The first target token is predicted by the prompt's last logits; the rest
    by sending ``target[:-1]`` (right-padded) on a copy of the prompt's cache.
    ``pre`` itself is left as it was.
    """
    device = pre.mask.device
    scores: list[TargetScore] = []
    for s in range(0, len(rows), batch_rows):
        idx = torch.tensor(list(rows[s:s + batch_rows]), device=device)  # [R]
        tgts = [list(t) for t in targets[s:s + batch_rows]]
        if any(not t for t in tgts):
            raise ValueError("an empty target cannot be scored")
        longest = max(len(t) for t in tgts)
        logits = pre.last_logits[idx].unsqueeze(1)  # [R, 1, V]
        if longest > 1:
            cont = torch.full((len(tgts), longest - 1), 0, dtype=torch.long)
            cont_mask = torch.zeros((len(tgts), longest - 1), dtype=torch.long)
            for i, t in enumerate(tgts):
                cont[i, : len(t) - 1] = torch.tensor(t[:-1], dtype=torch.long)
                cont_mask[i, : len(t) - 1] = 1
            out = model(
                input_ids=cont.to(device),
                attention_mask=torch.cat([pre.mask[idx], cont_mask.to(device)], dim=1),  # [R, T + K - 1]
                position_ids=pre.next_pos[idx, None] + torch.arange(longest - 1, device=device),  # [R, K - 1]
                past_key_values=_cache_rows(pre.cache, idx),
                use_cache=True,
            )
            logits = torch.cat([logits, out.logits], dim=1)  # [R, K, V]
        logp = torch.log_softmax(logits.float(), dim=-1)  # [R, K, V]
        argmax = logp.argmax(-1).tolist()  # [R][K]
        for i, t in enumerate(tgts):
            n = len(t)
            picked = logp[i, torch.arange(n, device=device), torch.tensor(t, device=device)]  # [n]
            predicted = argmax[i][:n]
            hits = sum(p == q for p, q in zip(predicted, t))
            scores.append(TargetScore(hits / n, predicted, float(picked.mean())))
    return scores


@torch.no_grad()
def greedy_continue(
    model, pre: Prefill, widths: Sequence[int], end_ids: set[int], pad_id: int, keep_end: bool = False
) -> list[list[int]]:
    """Greedy continuation of every prompt of ``pre``, at most ``widths[u]`` tokens for prompt ``u``.

    A row stops at its width or at an end token (kept as its last token with
    ``keep_end``; a generated pad token stops it too and is never kept), and
    leaves the batch. Consumes ``pre``: its cache holds the decoded tokens after.
    """
    if len(widths) != pre.last_logits.shape[0]:
        raise ValueError(f"{len(widths)} widths for {pre.last_logits.shape[0]} prompts")
    out: list[list[int]] = [[] for _ in widths]
    live = [u for u, w in enumerate(widths) if w > 0]  # prompt of each batch row
    cache, mask, pos = pre.cache, pre.mask, pre.next_pos
    logits = pre.last_logits
    if len(live) < len(widths):
        sel = torch.tensor(live, device=mask.device)
        cache, mask, pos, logits = _select(cache, mask, pos, logits, sel)
    while live:
        tokens = logits.argmax(-1)  # [A]
        keep = []
        for j, (u, t) in enumerate(zip(live, tokens.tolist())):
            if t in end_ids or t == pad_id:
                if keep_end and t in end_ids:
                    out[u].append(t)
                continue
            out[u].append(t)
            if len(out[u]) < widths[u]:
                keep.append(j)
        if not keep:
            break
        if len(keep) < len(live):
            sel = torch.tensor(keep, device=mask.device)
            cache, mask, pos, logits = _select(cache, mask, pos, logits, sel)
            tokens = tokens[sel]
            live = [live[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)  # [A, T + 1]
        step = model(
            input_ids=tokens[:, None], attention_mask=mask, position_ids=pos[:, None],
            past_key_values=cache, use_cache=True, logits_to_keep=1,
        )
        cache, logits, pos = step.past_key_values, step.logits[:, -1], pos + 1
    return out


def _select(cache, mask: torch.Tensor, pos: torch.Tensor, logits: torch.Tensor, sel: torch.Tensor):
    """Keep batch rows ``sel`` of the decoding state (the cache in place)."""
    cache.batch_select_indices(sel)
    return cache, mask[sel], pos[sel], logits[sel]

"""Teacher forcing and greedy decoding that share one pass over each prompt.

An edit's evaluation asks three things of most prompts: the teacher-forced
scores of one or more targets (the new answer, the old one, a locality
reference) and a greedy continuation. Run naively, every one of them sends
the whole prompt through the model again. Here each prompt goes through once
(:func:`prefill`, left-padded, the KV cache kept); a target is then scored by
sending only its own tokens on top of a copy of that cache
(:func:`score_targets`), and the continuation is decoded from the cache
(:func:`score_and_continue`, :func:`greedy_continue`), each row stopping at
its own length or end token and leaving the batch, so that no step is spent
on a finished row. Where the greedy continuation agrees with a target, its
tokens are read off the target's teacher-forced pass instead of being decoded
again.

The results equal those of a full forward pass per row and of
``model.generate`` per prompt, up to floating-point summation order.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch

from mke_lightning.modeling.forward import left_pad, right_pad


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
            cont, cont_mask = right_pad([t[:-1] for t in tgts], longest - 1, pad_id=0)  # [R, K - 1] each
            out = model(
                input_ids=cont.to(device),
                attention_mask=torch.cat([pre.mask[idx], cont_mask.to(device)], dim=1),  # [R, T + K - 1]
                position_ids=pre.next_pos[idx, None] + torch.arange(longest - 1, device=device),  # [R, K - 1]
                past_key_values=_cache_rows(pre.cache, idx),
                use_cache=True,
            )
            logits = torch.cat([logits, out.logits], dim=1)  # [R, K, V]
        scores += _target_scores(logits, tgts, logits.argmax(-1).tolist())
    return scores


@torch.no_grad()
def score_and_continue(
    model,
    pre: Prefill,
    targets: Sequence[Sequence[int]],
    widths: Sequence[int],
    end_ids: set[int],
    pad_id: int,
    keep_end: bool = False,
) -> tuple[list[TargetScore | None], list[list[int]]]:
    """Per prompt ``u`` of ``pre``: the teacher-forced score of ``targets[u]``
    (``None`` where it is empty) and its greedy continuation of at most
    ``widths[u]`` tokens.

    The targets are sent through the model on top of the prompts' cache in
    one pass. Greedy decoding follows a target for as long as the model's
    argmax agrees with it, so those tokens, and the one after them, are read
    off that pass; decoding then goes on from the same cache, with the
    target's unused tail masked out. A row stops at its width or at an end
    token (kept as its last token with ``keep_end``; a generated pad token
    stops it too and is never kept) and leaves the batch. Consumes ``pre``.
    """
    count = pre.last_logits.shape[0]
    if len(targets) != count or len(widths) != count:
        raise ValueError(f"{len(targets)} targets and {len(widths)} widths for {count} prompts")
    longest = max((len(t) for t in targets), default=0)
    scores: list[TargetScore | None] = [None] * count
    if longest and not _window_allows(model, pre.mask.shape[1] + longest + max(widths, default=0)):
        # a sliding window shorter than the rows: holes in the cache would shift it, so score apart
        nonempty = [u for u, t in enumerate(targets) if t]
        for u, sc in zip(nonempty, score_targets(model, pre, nonempty, [targets[u] for u in nonempty])):
            scores[u] = sc
        longest = 0
    if longest:
        cache, mask, pos, paths = _targets_on_cache(model, pre, targets, longest, pad_id, scores)
    else:
        cache, mask, pos = pre.cache, pre.mask, pre.next_pos
        paths = [[t] for t in pre.last_logits.argmax(-1).tolist()]
    return scores, _decode(model, cache, mask, pos, paths, widths, end_ids, pad_id, keep_end)


def _targets_on_cache(model, pre: Prefill, targets: Sequence[Sequence[int]], longest: int, pad_id: int,
                      scores: list[TargetScore | None]):
    """One pass of the (right-padded) targets on top of the prompts' cache: fills ``scores`` and returns the
    cache, the attention mask ``[U, T + K]`` (only the tokens the greedy path shares with the target stay
    visible), the next positions ``[U]`` and each row's greedy path so far (shared tokens, then the next one)."""
    device = pre.mask.device
    ids, tmask = right_pad(targets, longest, pad_id)  # [U, K] each
    out = model(
        input_ids=ids.to(device),
        attention_mask=torch.cat([pre.mask, tmask.to(device)], dim=1),  # [U, T + K]
        position_ids=pre.next_pos[:, None] + torch.arange(longest, device=device),  # [U, K]
        past_key_values=pre.cache,
        use_cache=True,
    )
    # [U, K + 1, V]: predicts t[0..K-1], then what follows
    logits = torch.cat([pre.last_logits[:, None], out.logits], dim=1)
    argmax = logits.argmax(-1).tolist()  # [U][K + 1]
    nonempty = [u for u, t in enumerate(targets) if t]
    got = _target_scores(logits[nonempty], [targets[u] for u in nonempty], [argmax[u] for u in nonempty])
    for u, sc in zip(nonempty, got):
        scores[u] = sc
    # per row: how many target tokens the greedy path shares with the target
    followed = [next((k for k in range(len(t)) if argmax[u][k] != t[k]), len(t)) for u, t in enumerate(targets)]
    paths = [list(t[:k]) + [argmax[u][k]] for u, (t, k) in enumerate(zip(targets, followed))]
    seen = (torch.arange(longest)[None, :] < torch.tensor(followed)[:, None]).long()  # [U, K] cache kept visible
    mask = torch.cat([pre.mask, seen.to(device)], dim=1)  # [U, T + K]
    return out.past_key_values, mask, pre.next_pos + torch.tensor(followed, device=device), paths


def _decode(model, cache, mask: torch.Tensor, pos: torch.Tensor, paths: list[list[int]], widths: Sequence[int],
            end_ids: set[int], pad_id: int, keep_end: bool) -> list[list[int]]:
    """Greedy decoding from ``cache`` after each row's ``paths`` (read off already): one token per step for the
    rows still live, a row leaving the batch at its width or an end token (see :func:`score_and_continue`)."""
    device = mask.device
    out_tokens: list[list[int]] = [[] for _ in paths]
    live = [u for u in range(len(paths)) if _walk(paths[u], out_tokens[u], widths[u], end_ids, pad_id, keep_end)]
    if not live:
        return out_tokens
    sel = torch.tensor(live, device=device)
    cache.batch_select_indices(sel)
    tokens = torch.tensor([paths[u][-1] for u in live], device=device)  # [A] the next token to feed
    mask, pos = mask[sel], pos[sel]
    while live:
        mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)  # [A, T + K + steps]
        step = model(
            input_ids=tokens[:, None], attention_mask=mask, position_ids=pos[:, None],
            past_key_values=cache, use_cache=True, logits_to_keep=1,
        )
        cache, pos = step.past_key_values, pos + 1
        tokens = step.logits[:, -1].argmax(-1)  # [A]
        keep = [j for j, (u, t) in enumerate(zip(live, tokens.tolist()))
                if _walk([t], out_tokens[u], widths[u], end_ids, pad_id, keep_end)]
        if len(keep) < len(live):
            if not keep:
                break
            sel = torch.tensor(keep, device=device)
            cache.batch_select_indices(sel)
            tokens, mask, pos = tokens[sel], mask[sel], pos[sel]
            live = [live[j] for j in keep]
    return out_tokens


def greedy_continue(
    model, pre: Prefill, widths: Sequence[int], end_ids: set[int], pad_id: int, keep_end: bool = False
) -> list[list[int]]:
    """Greedy continuation of every prompt of ``pre``, at most ``widths[u]`` tokens for
    prompt ``u`` (stopping rules of :func:`score_and_continue`). Consumes ``pre``."""
    count = pre.last_logits.shape[0]
    if len(widths) != count:
        raise ValueError(f"{len(widths)} widths for {count} prompts")
    return score_and_continue(model, pre, [[] for _ in range(count)], widths, end_ids, pad_id, keep_end)[1]


def _target_scores(
    logits: torch.Tensor, targets: Sequence[Sequence[int]], argmax: list[list[int]]
) -> list[TargetScore]:
    """Scores of each row's target from logits ``[R, >=K, V]`` whose position ``k`` predicts ``target[k]``."""
    norm = torch.logsumexp(logits.float(), dim=-1)  # [R, K']
    scores = []
    for i, t in enumerate(targets):
        n, t = len(t), list(t)
        steps = torch.arange(n, device=logits.device)
        picked = logits[i, steps, torch.tensor(t, device=logits.device)].float() - norm[i, :n]  # [n] log-probabilities
        predicted = argmax[i][:n]
        scores.append(TargetScore(sum(p == q for p, q in zip(predicted, t)) / n, predicted, float(picked.mean())))
    return scores


def _walk(tokens: Sequence[int], out: list[int], width: int, end_ids: set[int], pad_id: int, keep_end: bool) -> bool:
    """Append greedy ``tokens`` to ``out`` until the row ends; True while it goes on."""
    for t in tokens:
        if len(out) >= width:
            return False
        if t in end_ids or t == pad_id:
            if keep_end and t in end_ids:
                out.append(t)
            return False
        out.append(t)
    return len(out) < width


def _window_allows(model, length: int) -> bool:
    """Whether every attention layer sees ``length`` tokens whole (no sliding window shorter)."""
    window = getattr(getattr(model, "config", None), "sliding_window", None)
    return not isinstance(window, int) or window <= 0 or length < window

"""One edit's update: the batch it is made from, the shared training loop, and its result.

:class:`EditStep` is what every method sees: the step's records on this rank
and the whole batch's ids and united mask, the training rows of the shared
objective, and the ranks that train it together. :func:`train_update` is the
loop of every trained method: attach the method's update (seeded by the
batch's ids, so every rank and every rerun starts the same), optimise the
objective until the stopping rule, and return the update as a delta. Nothing
here applies the delta; the editor does.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from mke_lightning.data.records import EditRecord
from mke_lightning.editing.neuron_delta import NeuronDelta
from mke_lightning.editing.objective import edit_loss, kl_from
from mke_lightning.localization.neurons import NeuronMask
from mke_lightning.modeling.forward import grouped_target_logits, pack_groups, row_logprobs

log = logging.getLogger(__name__)


@dataclass
class EditStep:
    """One step's edit, as this rank sees it."""

    records: list[EditRecord]
    """This rank's records of the step (possibly none)."""
    masks: list[NeuronMask | None]
    """Their located neurons, one per record (``None``: not located)."""
    all_ids: list[str]
    """Every rank's record ids, in the order one process with all of them would see."""
    mask: NeuronMask | None
    """The whole batch's masks united (``None`` when no record has one)."""
    prompts: list[list[int]]
    """The objective's prompt rows of this rank's records."""
    targets: list[list[int]]
    """Their target rows."""
    units: list[tuple[int, int, int | None]]
    """Training units ``(record index, new-target row, old-target row)``."""
    n_units: int
    """Training units of the whole batch: the loss is their mean."""
    ranks: object
    """The ranks training this edit together (:class:`~mke_lightning.modeling.collectives.SharedEdit`)."""
    seed: int
    """Seed of the update's random start (the same on every rank)."""
    start: float = field(default_factory=time.perf_counter)


@dataclass
class UpdateResult:
    """A method's update of one batch, before it is applied."""

    delta: NeuronDelta | None
    """The change of the value vectors; ``None``: nothing to apply (no neuron, or rolled back)."""
    steps: int
    loss: float
    p_new: list[float]
    """Per record of this rank: P(target_new) at the last step (the minimum over its languages)."""
    counts: list[int]
    """Per record of this rank: neurons its edit changes."""
    failed: str | None = None
    """Why the update was dropped (a non-finite loss or update)."""


@contextmanager
def seeded(seed: int, device: torch.device):
    """Draw from generators seeded with ``seed`` inside; the global generators' states are untouched outside."""
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(cuda[0]):
                torch.cuda.manual_seed(seed)
        yield


def train_update(method, batch: EditStep) -> UpdateResult:
    """Attach ``method``'s update and optimise the shared objective on it (the loop of every trained method).

    The hot path of an edit: one function so that a step reads top to bottom.
    """
    editor = method.editor
    cfg = editor.loss_config
    ranks = batch.ranks
    # the neighbours' pre-edit distributions, taken before the update is attached
    near, near_logp = editor.neighbours.rows(editor.causal_lm, editor.tokenizer, batch.records, editor.device)
    with seeded(batch.seed, editor.device):
        handle = method.attach(batch.mask)  # the same random start on every rank and in every run
    counts = [method.neuron_count(m, handle) for m in batch.masks]
    if handle is None:
        if ranks.rank == 0:
            log.warning("records %s: no neuron located; the edit changes nothing", batch.all_ids)
        return UpdateResult(None, 0, float("nan"), [float("nan")] * len(batch.records), counts)
    params = handle.parameters()
    anchors = editor.anchors.ids if ranks.rank == 0 and cfg.kl_weight > 0 else []  # one rank carries the batch's KL term
    prompts, targets, units = batch.prompts, batch.targets, batch.units
    pad = editor.tokenizer.pad_token_id
    extra = anchors + near  # rows read at their last position only
    if prompts or extra:
        rows, row_targets = prompts + extra, targets + [[0]] * len(extra)  # each predicts one (unused) token
    else:
        # Padding (no record here this step): a one-token row, so that this rank's forward and
        # backward meet the others' where the weights are partitioned (ZeRO-3 gathers them in both).
        rows, row_targets = [[pad]], [[pad]]
    groups = cfg.length_groups if editor.world_size == 1 else 1  # several ranks: one pass each, in step
    packed = pack_groups(rows, row_targets, pad, groups).to(editor.device)
    opt = editor.optimizer_factory(params)
    steps, loss_v, p_new = 0, float("nan"), [0.0] * len(batch.records)
    for steps in range(1, cfg.max_steps + 1):
        logits = grouped_target_logits(editor.causal_lm, packed)  # per row: [len(target), V] at its target positions
        if prompts or extra:
            lp = row_logprobs(logits[: len(targets)], targets) if targets else []  # per record row: [len(target)]
            loss = edit_loss(lp, units, cfg, batch.n_units) if units else logits[0].new_zeros((), dtype=torch.float32)
            if anchors:
                loss = loss + cfg.kl_weight * editor.anchors(torch.cat(logits[len(targets):len(targets) + len(anchors)]))
            if near:  # this rank's share of the batch's neighbour term
                shown = torch.cat(logits[len(targets) + len(anchors):])  # [N, V] each neighbour's last position
                loss = loss + cfg.neighbour_weight * kl_from(near_logp, shown) * len(units) / batch.n_units
            kept = editor.preservation.penalty(editor, handle) if editor.preservation is not None and ranks.rank == 0 else None
            if kept is not None:
                loss = loss + kept  # output change on ordinary text and earlier edits' keys (one rank carries it)
            part = float(loss.detach())
            p_unit = [float(lp[i].detach().sum().exp()) for _, i, _ in units]
        else:
            loss = (logits[0].float().sum() + sum(p.sum() for p in params)) * 0  # a graph over every parameter: zero grads
            part, p_unit = 0.0, []
        p_new = [min((p for (k, _, _), p in zip(units, p_unit) if k == r), default=float("nan")) for r in range(len(batch.records))]
        below = sum(1 for p in p_new if not p > cfg.stop_prob)
        loss_v, below = ranks.sum(part, below)  # the whole batch's loss; its records not yet above stop_prob
        if not math.isfinite(loss_v):
            handle.discard()
            return UpdateResult(None, steps, loss_v, p_new, counts, f"loss is {loss_v} at step {steps}")
        if loss_v < cfg.stop_loss or below == 0:
            break
        opt.zero_grad(set_to_none=True)
        editor.backward_edit(loss)
        ranks.sum_grads(params)
        opt.step()
        handle.clamp_norms()
    if not all(torch.isfinite(p).all() for p in params):
        handle.discard()
        return UpdateResult(None, steps, loss_v, p_new, counts, "the trained update holds NaN or inf")
    return UpdateResult(handle.to_delta(), steps, loss_v, p_new, counts)

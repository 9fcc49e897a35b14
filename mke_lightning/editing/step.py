"""A training step's edit as every rank sees it, and the update going into the model.

:func:`gather_step`: the whole batch's records, united masks and seed.

The DataModule deals records to ranks in turn, so position ``j`` of rank
``r`` is global ``j * R + r``: gathering every rank's share and sorting by
``(j, r)`` gives the batch in the order one process with every rank's
records would see it. Every rank then starts the same update (seeded by the
records' ids) on the same united mask.

:func:`apply_update`: preservation's bound, the update applied, the delta
file written.
"""

from __future__ import annotations

import zlib

from mke_lightning.data.records import EditRecord
from mke_lightning.editing.delta_files import save_delta
from mke_lightning.editing.describe import delta_metadata
from mke_lightning.editing.edit_loop import EditStep
from mke_lightning.editing.neuron_delta import NeuronDelta, OnTop, Restore, apply_delta
from mke_lightning.localization.neurons import NeuronMask, unite_masks
from mke_lightning.modeling.collectives import SharedEdit


def prepare_objective(editor, records: list[EditRecord]) -> None:
    """Before an edit: the model in eval mode, the anchors' pre-edit distributions, and the neighbour term told
    never to use a subject of the run's records (the DataModule's, else these; as a library, each call's own)."""
    editor.causal_lm.eval()
    editor.anchors.prepare(editor.causal_lm, editor.tokenizer, editor.device)
    if editor._run_subjects_excluded or editor.loss_config.neighbour_weight <= 0:
        return
    trainer = editor._trainer
    every = list(getattr(trainer.datamodule if trainer is not None else None, "records", None) or records)
    editor.neighbours.exclude(f.subject for r in every for f in (r.facts(lang) for lang in r.languages))
    editor._run_subjects_excluded = trainer is not None


def gather_step(records: list[EditRecord], masks: list[NeuronMask | None], rows: tuple[list, list, list],
                ranks: SharedEdit, init_seed: int, require_masks: bool = False) -> EditStep | None:
    """The step's edit from this rank's ``records``, their ``masks`` and training ``rows`` (prompts, targets,
    units); ``None`` when no rank has a record. A collective call on several ranks."""
    prompts, targets, units = rows
    shares = ranks.gather(([r.id for r in records],
                           [None if m is None else NeuronMask(m.record_id, m.layers) for m in masks], len(units)))
    every = sorted((j, r, rid, m) for r, (ids, ms, _) in enumerate(shares) for j, (rid, m) in enumerate(zip(ids, ms)))
    all_ids = [rid for _, _, rid, _ in every]
    if require_masks:
        missing = [rid for _, _, rid, m in every if m is None]
        if missing:  # raised on every rank, none left waiting in a collective
            raise RuntimeError(
                f"no neuron mask for record {missing[0]!r}: add the mke_lightning.callbacks.NeuronLocalization callback"
            )
    if not all_ids:
        return None
    known = [m for _, _, _, m in every if m is not None]
    mask = None if not known else known[0] if len(known) == 1 else unite_masks(known)
    seed = zlib.crc32("\n".join([str(init_seed), *all_ids]).encode())
    return EditStep(records, masks, all_ids, mask, prompts, targets, units, sum(n for _, _, n in shares), ranks, seed)


def apply_update(editor, step: EditStep, delta: NeuronDelta) -> tuple[NeuronDelta, Restore | OnTop]:
    """Apply the step's update to the editor's model, bounded by preservation first (under ``sequential``
    preservation remembers the keys this edit writes on, every rank's, before it is applied); rank 0 writes
    the delta file. Returns the delta applied and what undoes it."""
    ranks = step.ranks
    if editor.preservation is not None:
        delta = editor.preservation.bound(editor, delta)
        if editor.protocol == "sequential":
            mine = [step.prompts[i] for _, i, _ in step.units]
            editor.preservation.remember(editor, [p for part in ranks.gather(mine) for p in part], sorted(delta.layers))
    undo = apply_delta(editor.causal_lm, editor.arch, delta, editor.lora_config.apply)
    if editor.save_deltas and editor._delta_dir is not None and ranks.rank == 0:  # every rank holds the same delta
        number = len(editor.applied) if editor.protocol == "sequential" else None
        save_delta(editor._delta_dir, step.all_ids, delta, number, delta_metadata(editor, step.all_ids))
    return delta, undo

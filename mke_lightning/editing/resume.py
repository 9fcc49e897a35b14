"""The editor's part of a checkpoint, and what a resumed fit does with it.

A checkpoint never holds the model: it holds the edit log (every rank's
edits so far), under ``sequential`` the edits kept in the model as deltas,
the pre-edit model's fingerprint (delta files name it), the delta folder the
run began writing, the method's own state (AlphaEdit's earlier keys) and
preservation's memory of earlier edits, in full precision. A resumed fit
checks that its model is the one the edits were made on, re-applies the kept
edits and tells the DataModule which records are done.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from mke_lightning.editing.delta_files import folder_state
from mke_lightning.editing.edit_log import EditOutcome, every_rank_log
from mke_lightning.editing.neuron_delta import NeuronDelta, apply_delta

log = logging.getLogger(__name__)


@dataclass
class SavedEdits:
    """What a checkpoint gives back to the editor, until the fit starts."""

    outcomes: list[EditOutcome] = field(default_factory=list)
    """Every edit done (on any rank) before the restart."""
    fingerprint: str | None = None
    """The pre-edit model's fingerprint the edits were made on."""
    delta_dir: dict | None = None
    """The delta folder the run began writing (:func:`~mke_lightning.editing.delta_files.folder_state`)."""
    applied: list[tuple[list[str], NeuronDelta]] = field(default_factory=list)
    """``sequential``: the edits kept in the model, in order."""


def save(editor, checkpoint: dict) -> None:
    """Add the ``mke_*`` entries to ``checkpoint`` (a collective call when several ranks run: the edit log)."""
    checkpoint["mke_edit_log"] = every_rank_log(editor.resumed + editor.outcomes, editor.world_size)
    # sequential: the edits kept in the model, as deltas (never the model itself)
    checkpoint["mke_applied"] = [
        {
            "records": ids,
            "layers": {layer: (idx.cpu(), v.detach().float().cpu()) for layer, (idx, v) in d.layers.items()},
        }
        for ids, d in editor.applied
    ]
    checkpoint["mke_base_fingerprint"] = editor._base_fingerprint
    if editor._delta_dir is not None:
        logger = editor.logger if editor._trainer is not None else None
        checkpoint["mke_delta_dir"] = folder_state(editor._delta_dir, logger)
    checkpoint["mke_method_state"] = editor.method_impl.state_dict()  # e.g. AlphaEdit's earlier edits' keys
    if editor.preservation is not None:
        checkpoint["mke_preservation"] = editor.preservation.state()


def load(editor, checkpoint: dict) -> SavedEdits:
    """Take a checkpoint's state back into ``editor``; the kept edits are re-applied now, or (a fit whose
    strategy restores before setup) by :func:`start_fit`, after every callback's ``on_fit_start``, so that
    localisation sees the model the run began with."""
    applied = [(list(item["records"]), NeuronDelta({int(layer): t for layer, t in item["layers"].items()}))
               for item in checkpoint.get("mke_applied", [])]
    saved = SavedEdits([EditOutcome(**d) for d in checkpoint.get("mke_edit_log", [])],
                       checkpoint.get("mke_base_fingerprint"), checkpoint.get("mke_delta_dir"), applied)
    editor.method_impl.load_state_dict(checkpoint.get("mke_method_state", {}))
    kept = checkpoint.get("mke_preservation")
    if kept is not None and editor.preservation is not None:
        editor.preservation.load_state(kept)
    trainer = editor._trainer
    if trainer is not None and trainer.state.fn == "fit" and not trainer.strategy.restore_checkpoint_after_setup:
        return saved
    if applied and editor.causal_lm is None:
        editor.configure_model()
    keep_applied(editor, applied)
    saved.applied = []
    return saved


def keep_applied(editor, applied: list[tuple[list[str], NeuronDelta]]) -> None:
    """Apply kept edits to the editor's model, in order, and keep them."""
    for ids, delta in applied:
        apply_delta(editor.causal_lm, editor.arch, delta, editor.lora_config.apply)
        editor.applied.append((ids, delta))


def start_fit(editor, saved: SavedEdits) -> None:
    """At the start of a resumed fit: the same pre-edit model as the checkpoint's, the kept edits back
    (after what an uninterrupted run takes from the unedited model), the done records skipped."""
    if editor.causal_lm is not None and (editor.save_deltas or saved.fingerprint):
        from mke_lightning.localization.cache import model_fingerprint

        editor._base_fingerprint = model_fingerprint(editor.causal_lm, editor.tokenizer, editor.arch)  # before any edit
        check_same_model(saved.fingerprint, editor._base_fingerprint, editor.lm_config)
    reapply, saved.applied = saved.applied, []
    if reapply:
        _before_reapplying(editor)
        keep_applied(editor, reapply)
    if saved.outcomes:
        skip_done_records(editor.trainer, saved.outcomes)


def _before_reapplying(editor) -> None:
    """What an uninterrupted run takes from the unedited model at its first edit, taken before the kept
    edits come back: the anchors' pre-edit distributions and the preservation statistics."""
    model = editor.causal_lm
    was_training = model.training
    model.eval()
    try:
        editor.anchors.prepare(model, editor.tokenizer, editor.device)
        if editor.preservation is not None and editor.preservation.cfg.penalty > 0:
            editor.preservation._statistics(editor)
    finally:
        model.train(was_training)


def check_same_model(saved: str | None, now: str, lm_config) -> None:
    """A resumed run must edit the model its checkpoint's edits were made on."""
    if saved and saved != now:
        raise ValueError(
            f"resuming: the checkpoint's edits were made on model {saved[:16]}, this run's model is "
            f"{now[:16]} (model.lm.name_or_path {lm_config.name_or_path!r}, dtype "
            f"{lm_config.dtype}); resume with the model the run began with, or start afresh without --ckpt_path")


def skip_done_records(trainer, resumed: list[EditOutcome]) -> None:
    """Tell the DataModule which records were edited before the restart, and how far each rank got."""
    dm = trainer.datamodule
    if not hasattr(dm, "resume_after"):
        raise RuntimeError(f"resuming needs a DataModule with resume_after(); {type(dm).__name__} has none")
    steps = trainer.fit_loop.epoch_loop.batch_progress.current.completed
    dm.resume_after({o.record_id for o in resumed}, steps)
    log.info("resuming after %d edits (%d batches per rank)", len(resumed), steps)


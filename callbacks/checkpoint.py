"""Checkpoints every K edits, for resuming a long run with ``--ckpt_path last``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from weakref import proxy

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy


class EditCheckpoint(ModelCheckpoint):
    """Save ``last.ckpt`` every ``every_n_edits`` edit batches and at the end of the run.

    An editing run steps no Lightning optimiser (each edit trains its own
    adapters), so Lightning's step counter does not move and step-based
    checkpointing never fires; this counts edit batches instead. The
    checkpoint holds the edit log (which edits are done, with their outcomes)
    and the evaluation state, not the model: the ``single`` protocol restores
    the weights after every edit. Resume with ``mke fit ... --ckpt_path last``:
    the run continues at the next edit, none applied twice. A checkpoint is
    written beside ``last.ckpt`` and renamed over it once complete, so a run
    killed while saving keeps its previous checkpoint whole (on one node; a
    sharded DeepSpeed or FSDP checkpoint across nodes is written in place).

    Args:
        dirpath: where ``last.ckpt`` goes; by default ``<save_dir>/<name>/checkpoints``
            of the run's logger (the same folder for every version of the run, so a
            restarted run finds it), else ``<default_root_dir>/checkpoints``.
        every_n_edits: edit batches between two checkpoints.
    """

    def __init__(self, dirpath: str | None = None, every_n_edits: int = 10) -> None:
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0, enable_version_counter=False)
        if every_n_edits < 1:
            raise ValueError("every_n_edits must be >= 1")
        self.every_n_edits = every_n_edits

    def _resolve_dirpath(self, trainer) -> None:
        if self.dirpath is None:
            logger = trainer.logger
            if logger is not None and getattr(logger, "save_dir", None) and getattr(logger, "name", None):
                self.dirpath = str(Path(logger.save_dir) / logger.name / "checkpoints")
            else:
                self.dirpath = str(Path(trainer.default_root_dir) / "checkpoints")

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._resolve_dirpath(trainer)
        super().setup(trainer, pl_module, stage)

    def _find_last_checkpoints(self, trainer) -> set[str]:
        # ``ckpt_path="last"`` is resolved before ``setup``: look in this run's folder, not the logger's version folder
        self._resolve_dirpath(trainer)
        return super()._find_last_checkpoints(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if (batch_idx + 1) % self.every_n_edits == 0:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer, pl_module) -> None:
        return None

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        # Write ``<filepath>.part``, then rename it over ``filepath``: a kill mid-write leaves the
        # previous checkpoint as it was (the run may have taken hours to get there). Across nodes a
        # sharded strategy writes its folder on each node's disk, where rank 0 cannot rename it.
        if trainer.num_nodes > 1 and isinstance(trainer.strategy, (DeepSpeedStrategy, FSDPStrategy)):
            super()._save_checkpoint(trainer, filepath)
            return
        part = f"{filepath}.part"
        trainer.save_checkpoint(part, self.save_weights_only)  # every rank; returns once it is written
        if trainer.is_global_zero:
            _replace(part, filepath)
        trainer.strategy.barrier("EditCheckpoint._save_checkpoint")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))


def _replace(part: str, target: str) -> None:
    """Move the finished checkpoint ``part`` to ``target``: one rename for a file; a folder (DeepSpeed's
    sharded checkpoint) takes the old one's place after the old one is moved aside and before it is removed."""
    if os.path.isdir(part):
        old = f"{target}.old"
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(target):
            os.replace(target, old)
        os.replace(part, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(part, target)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from: missing, or damaged."""


def checkpoint_problem(path: str | os.PathLike[str]) -> str | None:
    """What makes the checkpoint at ``path`` unusable (missing, empty, cut short, changed after it
    was written), or ``None`` when it reads whole. A file is checked entry by entry against the
    CRCs torch's zip format stores; a sharded checkpoint (a folder) only for being there and not empty."""
    import zipfile

    path = os.fspath(path)
    if os.path.isdir(path):
        return None if os.listdir(path) else "the checkpoint folder is empty"
    if not os.path.isfile(path):
        return "the file does not exist"
    size = os.path.getsize(path)
    if size == 0:
        return "the file is empty (0 bytes)"
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as fh:
            if fh.read(4) == b"PK\x03\x04":  # torch's zip format, its end (the central directory) missing
                return f"it was cut short ({size} bytes, the end of its zip archive is missing)"
        try:  # not torch's zip format: an old-style pickle, read whole to see that it is complete
            import torch

            torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 - any failure to read means the same to the user
            return (f"it is not a readable checkpoint ({size} bytes; {type(err).__name__}: {err}); "
                    "it was probably cut short")
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        return f"its archive cannot be read ({err})"
    if bad is not None:
        return f"its entry {bad!r} fails its checksum (the file was changed after it was written)"
    return None


def check_checkpoint(path: str | os.PathLike[str]) -> None:
    """Raise :class:`CheckpointError` naming ``path`` and what to do when it is not a whole checkpoint."""
    if not os.path.exists(path):
        raise CheckpointError(
            f"checkpoint {os.fspath(path)} does not exist; check --ckpt_path, or leave it out to start afresh"
        )
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(
            f"checkpoint {os.fspath(path)} is damaged: {problem}. Resume from another checkpoint "
            "(--ckpt_path PATH), or move this one aside and start afresh without --ckpt_path"
        )

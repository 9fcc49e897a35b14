"""Where a run writes its edits (``model.save_deltas``): ``<log dir>/deltas/``, one file per edit.

``single``/``batch``: ``<first record id>.safetensors`` per batch;
``sequential``: ``<step>_<first record id>.safetensors``, applied in file-name
order. A checkpoint keeps the folder (:func:`folder_state`): a resumed run
goes on writing where the run began (:func:`resumed_folder`), whatever
version folder its logger takes, so that one folder holds every edit once.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info

from mke_lightning.editing.neuron_delta import NeuronDelta

log = logging.getLogger(__name__)


def file_name(record_ids: list[str], step: int | None) -> str:
    """The delta file's name (without ``.safetensors``): the first record's id, after ``step`` when given."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in record_ids[0])
    return f"{step:06d}_{safe}" if step is not None else safe


def save_delta(folder: Path, record_ids: list[str], delta: NeuronDelta, step: int | None, metadata: dict) -> Path:
    """``<folder>/<name>.safetensors`` with ``metadata`` (the records, method, model) in its header."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{file_name(record_ids, step)}.safetensors"
    delta.save(path, metadata=metadata)
    return path


def run_root(logger) -> Path | None:
    """``<save_dir>/<name>`` of the run's logger: the folder that holds every version of the run."""
    if getattr(logger, "save_dir", None) and getattr(logger, "name", None):
        return Path(logger.save_dir) / logger.name
    return None


def folder_state(folder: Path, logger) -> dict:
    """The delta folder for a checkpoint: its absolute path and, inside the run's root, its path there."""
    root = run_root(logger)
    inside = root is not None and folder.resolve().is_relative_to(root.resolve())
    return {"path": str(folder.resolve()),
            "in_run": folder.resolve().relative_to(root.resolve()).as_posix() if inside else None}


def resumed_folder(default: Path, saved: dict, logger) -> Path:
    """Where a resumed run writes its deltas: the folder the run began writing (found under this run's root
    first, so a moved run folder still works), not ``default`` (the logger may have given a new version)."""
    root = run_root(logger)
    where = [root / saved["in_run"]] if root is not None and saved.get("in_run") else []
    where.append(Path(saved["path"]))
    folder = next((p for p in where if p.is_dir()), where[0])
    if not folder.is_dir():
        log.warning("the delta folder this run began writing (%s) is gone; the deltas of the edits made "
                    "before the restart are lost, the later ones go there", folder)
    if folder.resolve() != default.resolve():
        rank_zero_info(f"deltas: this resumed run goes on writing into {folder}, where the run began "
                       f"(not {default})")
    return folder

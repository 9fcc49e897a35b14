"""What the callbacks need from a LightningModule and a DataModule."""

from __future__ import annotations

REQUIRED = ("causal_lm", "tokenizer", "arch", "neuron_masks")


def check_module(pl_module, who: str) -> None:
    missing = [a for a in REQUIRED if getattr(pl_module, a, None) is None]
    if missing:
        raise AttributeError(
            f"{who} needs the LightningModule to offer {', '.join(REQUIRED)}; "
            f"{type(pl_module).__name__} lacks {', '.join(missing)} (see mke_lightning.editor)"
        )


def run_languages(trainer, pl_module) -> tuple[str, list[str]]:
    """(edit language, evaluation languages) of the run, from the DataModule."""
    dm = trainer.datamodule
    edit = getattr(dm, "edit_language", None) or getattr(pl_module, "edit_language", "en")
    evals = list(getattr(dm, "eval_languages", None) or [edit])
    return edit, evals


def run_records(trainer) -> list:
    dm = trainer.datamodule
    if dm is None or not hasattr(dm, "records"):
        raise AttributeError("the callbacks need a DataModule with a `records` list (mke_lightning.data.EditDataModule)")
    return list(dm.records)

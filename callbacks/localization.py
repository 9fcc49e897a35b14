"""Locate the neurons of every edit of the run before fit."""

from __future__ import annotations

import time

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from mke_lightning.callbacks._protocol import check_module, run_languages, run_records
from mke_lightning.localization import LocalizationConfig, locate


class NeuronLocalization(L.Callback):
    """Before fit, computes a :class:`~mke_lightning.neurons.NeuronMask` per record.

    Masks go into ``pl_module.neuron_masks`` (record id -> mask); records that
    already have one are skipped. Timing per record is kept in ``seconds``.
    """

    def __init__(self, settings: LocalizationConfig | None = None) -> None:
        """
        Args:
            settings: attribution method, threshold, cross languages (see LocalizationConfig).
        """
        self.settings = settings or LocalizationConfig()
        self.seconds: dict[str, float] = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        check_module(pl_module, "NeuronLocalization")
        setup = getattr(trainer.datamodule, "setup", None)
        if setup is not None:
            setup("fit")
        edit_lang, _ = run_languages(trainer, pl_module)
        records = run_records(trainer)
        a = self.settings.attribution
        rank_zero_info(
            f"localising {len(records)} edits: {a.method} (ig_path={a.ig_path}, steps={a.steps}, "
            f"baseline={a.baseline}), threshold {self.settings.threshold} x max"
        )
        for record in records:
            if record.id in pl_module.neuron_masks:
                continue
            start = time.perf_counter()
            mask = locate(pl_module.causal_lm, pl_module.tokenizer, pl_module.arch, record, edit_lang, self.settings)
            self.seconds[record.id] = time.perf_counter() - start
            pl_module.neuron_masks[record.id] = mask
            rank_zero_info(
                f"  {record.id}: {mask.count('independent')} language-independent, "
                f"{mask.count('specific')} language-specific neurons ({self.seconds[record.id]:.1f}s)"
            )

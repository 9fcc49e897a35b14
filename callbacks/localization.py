"""Locate the neurons of every edit of the run before fit."""

from __future__ import annotations

import logging
import time

import lightning as L

from mke_lightning.callbacks._protocol import check_module, run_languages, run_records
from mke_lightning.localization import LocalizationConfig, locate

log = logging.getLogger(__name__)


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
        log.info(
            "localising %d edits: %s (ig_path=%s, steps=%d, baseline=%s), threshold %.2f x max",
            len(records), a.method, a.ig_path, a.steps, a.baseline, self.settings.threshold,
        )
        for record in records:
            if record.id in pl_module.neuron_masks:
                continue
            start = time.perf_counter()
            mask = locate(pl_module.causal_lm, pl_module.tokenizer, pl_module.arch, record, edit_lang, self.settings)
            self.seconds[record.id] = time.perf_counter() - start
            pl_module.neuron_masks[record.id] = mask
            log.info("record %s: %d independent, %d specific neurons (%.1fs)", record.id, mask.count("independent"), mask.count("specific"), self.seconds[record.id])

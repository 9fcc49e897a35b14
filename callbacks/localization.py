"""Locate the neurons of every edit of the run before fit."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from mke_lightning.architectures import mlp_out_modules
from mke_lightning.callbacks._protocol import causal_lm_of, languages_of, masks_of, records_of
from mke_lightning.localization import LocalizationConfig
from mke_lightning.localization_report import summarize, write_summary
from mke_lightning.localization_stage import StageResult, localize_records, rank_and_world
from mke_lightning.neuron_cache import MaskCache, model_fingerprint


class NeuronLocalization(L.Callback):
    """Before fit, computes a :class:`~mke_lightning.neurons.NeuronMask` per record.

    The records are split across ranks; each rank localises its share, writes
    one mask file per record into the cache as it goes, and the masks are
    gathered so that every rank's ``pl_module.neuron_masks`` holds all of them.
    A later run with the same model, settings and records reads the cache; a
    killed run recomputes only what it had not finished. Records that already
    have a mask on the module are left alone.

    Works on any LightningModule that offers the small protocol described in
    :mod:`mke_lightning.callbacks._protocol` (``causal_lm`` or
    ``get_causal_lm()``, and ``tokenizer``).
    """

    def __init__(
        self,
        settings: LocalizationConfig | None = None,
        cache: bool = True,
        cache_dir: str | None = None,
        output_dir: str | None = None,
        plots: bool = True,
        fingerprint: str | None = None,
    ) -> None:
        """
        Args:
            settings: attribution method, selection, categories (see LocalizationConfig).
            cache: read and write masks in the on-disk cache (off: always compute, write nothing).
            cache_dir: the cache root (default ``$MKE_CACHE_DIR/neuron-masks`` or ``~/.cache/mke-lightning/neuron-masks``).
            output_dir: where the summary JSON and plots go (default ``<log dir>/localization``; none without a logger).
            plots: write the PNG plots beside the summary.
            fingerprint: the model's identity in the cache key (default: computed from its config and weights).
        """
        self.settings = settings or LocalizationConfig()
        self.cache = cache
        self.cache_dir = cache_dir
        self.output_dir = output_dir
        self.plots = plots
        self.fingerprint = fingerprint
        self.seconds: dict[str, float] = {}
        self.last: StageResult | None = None
        self.summary: dict | None = None
        self.written: list[Path] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        setup = getattr(trainer.datamodule, "setup", None)
        if setup is not None:
            setup("fit")
        self.localize(pl_module, trainer.datamodule, self._default_output(trainer))

    def localize(self, pl_module, datamodule, output_dir: str | Path | None = None) -> StageResult:
        """Localise every record of ``datamodule`` for ``pl_module`` (also used by ``mke localize``)."""
        model, tokenizer, arch = causal_lm_of(pl_module, "NeuronLocalization")
        edit_lang, _ = languages_of(datamodule, pl_module)
        records = records_of(datamodule)
        masks = masks_of(pl_module)
        cache = None
        if self.cache:
            fingerprint = self.fingerprint or model_fingerprint(model, tokenizer, arch)
            cache = MaskCache(self.cache_dir, fingerprint, self.settings, edit_lang)
        a = self.settings.attribution
        rank, world = rank_and_world()
        rank_zero_info(
            f"localising {len(records)} edits on {world} rank(s): {a.method} (ig_path={a.ig_path}, steps={a.steps}, "
            f"baseline={a.baseline}){' / usual activity' if self.settings.relative_to_background else ''}, "
            f"threshold {self.settings.threshold} x max, top_k {self.settings.top_k}"
            + (f"; cache {cache.folder}" if cache else "")
        )
        was_training = model.training
        model.eval()
        try:
            result = localize_records(
                model, tokenizer, arch, records, edit_lang, self.settings, cache=cache,
                known={r.id: masks[r.id] for r in records if r.id in masks}, report=rank_zero_info if world == 1 else print,
            )
        finally:
            model.train(was_training)
        masks.update(result.masks)
        self.seconds.update(result.seconds)
        self.last = result
        rank_zero_info(f"localisation: {len(result.computed)} computed, {len(result.reused)} read from the cache on rank {rank}")
        self.summary = summarize(result.masks, len(mlp_out_modules(model, arch)), asdict(self.settings))
        folder = Path(self.output_dir) if self.output_dir else (Path(output_dir) if output_dir else None)
        if folder is not None and rank == 0:
            self.written = write_summary(self.summary, folder, plots=self.plots)
            rank_zero_info(f"localisation summary: {', '.join(str(p) for p in self.written)}")
        return result

    @staticmethod
    def _default_output(trainer) -> Path | None:
        log_dir = trainer.log_dir if trainer.loggers else None
        return Path(log_dir) / "localization" if log_dir else None

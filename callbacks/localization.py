"""Locate the neurons of every edit of the run before fit."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from mke_lightning.callbacks.module_access import causal_lm_of, languages_of, masks_of, records_of
from mke_lightning.localization.cache import MaskCache, model_fingerprint, settings_key
from mke_lightning.localization.locate import LocalizationConfig
from mke_lightning.localization.neurons import NeuronMask
from mke_lightning.localization.stage import StageResult, localize_records
from mke_lightning.modeling.architectures import mlp_out_modules
from mke_lightning.modeling.collectives import rank_and_world
from mke_lightning.reporting.localization import summarize, write_summary
from mke_lightning.reporting.run_settings import run_settings


class NeuronLocalization(L.Callback):
    """Before fit, computes a :class:`~mke_lightning.localization.neurons.NeuronMask` per record.

    The records are split across ranks; each rank localises its share, writes
    one mask file per record into the cache as it goes, and the masks are
    gathered so that every rank's ``pl_module.neuron_masks`` holds all of them.
    A later run with the same model, settings and records reads the cache; a
    killed run recomputes only what it had not finished. Records that already
    have a mask on the module are left alone.

    Resume (``--ckpt_path last``): the checkpoint holds the masks of the run's
    records, the fingerprint of the model they were located on (before any
    edit) and the settings (:meth:`state_dict`). A resumed fit takes the masks
    back instead of locating again, so its later edits use the neurons a run
    never stopped would have used, even though a ``sequential`` run's model
    holds the kept edits again by the time the edits go on. A resumed fit
    whose model (fingerprint), settings or records differ from the
    checkpoint's stops with an error that names the difference.

    Works on any LightningModule that offers the few attributes listed in
    :mod:`mke_lightning.callbacks.module_access` (``causal_lm`` or
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
            cache_dir: the cache root (default ``$MKE_CACHE_DIR/neuron-masks`` or
                ``~/.cache/mke-lightning/neuron-masks``).
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
        self._fit_state: dict | None = None  # what this fit's checkpoints hold (state_dict)
        self._resume: dict | None = None  # a checkpoint's state, until the fit starts
        self._fit_started = False

    # -- fit -------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        # Lightning loads a checkpoint's state after this and before on_fit_start (but under DeepSpeed and FSDP)
        self._fit_started = False
        run_settings(trainer).add("localization", lambda: asdict(self.settings))  # results.json: runs told apart

    def on_fit_start(self, trainer, pl_module) -> None:
        self._fit_started = True
        setup = getattr(trainer.datamodule, "setup", None)
        if setup is not None:
            setup("fit")
        resume, self._resume = self._resume, None
        model, tokenizer, arch = causal_lm_of(pl_module, "NeuronLocalization")
        # The model as the run found it: the editor applies a resumed run's kept edits after every callback's
        # on_fit_start (the fingerprint below is checked against the checkpoint's).
        fingerprint = self.fingerprint or model_fingerprint(model, tokenizer, arch)
        edit_lang, _ = languages_of(trainer.datamodule, pl_module)
        if resume is not None:
            result = self._take_back(trainer, pl_module, resume, fingerprint, edit_lang)
        else:
            result = self.localize(
                pl_module, trainer.datamodule, self._default_output(trainer), fingerprint=fingerprint
            )
        self._fit_state = {
            "fingerprint": fingerprint,
            "edit_language": edit_lang,
            "settings": settings_key(self.settings, edit_lang),
            "masks": {rid: m.to_dict() for rid, m in result.masks.items()},
        }

    def localize(self, pl_module, datamodule, output_dir: str | Path | None = None,
                 fingerprint: str | None = None) -> StageResult:
        """Localise every record of ``datamodule`` for ``pl_module`` (also used by ``mke localize``).

        ``fingerprint``: the model's identity in the cache key (default: the callback's, else computed).
        """
        model, tokenizer, arch = causal_lm_of(pl_module, "NeuronLocalization")
        edit_lang, _ = languages_of(datamodule, pl_module)
        records = records_of(datamodule)
        masks = masks_of(pl_module)
        cache = None
        if self.cache:
            fingerprint = fingerprint or self.fingerprint or model_fingerprint(model, tokenizer, arch)
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
                model,
                tokenizer,
                arch,
                records,
                edit_lang,
                self.settings,
                cache=cache,
                known={r.id: masks[r.id] for r in records if r.id in masks},
                report=rank_zero_info if world == 1 else print,
            )
        finally:
            model.train(was_training)
        masks.update(result.masks)
        self.seconds.update(result.seconds)
        rank_zero_info(
            f"localisation: {len(result.computed)} computed, {len(result.reused)} read from the cache on rank {rank}"
        )
        self._summarize(result, model, arch, output_dir)
        return result

    def _summarize(self, result: StageResult, model, arch, output_dir: str | Path | None) -> None:
        self.last = result
        self.summary = summarize(result.masks, len(mlp_out_modules(model, arch)), asdict(self.settings))
        folder = Path(self.output_dir) if self.output_dir else (Path(output_dir) if output_dir else None)
        if folder is not None and rank_and_world()[0] == 0:
            self.written = write_summary(self.summary, folder, plots=self.plots)
            rank_zero_info(f"localisation summary: {', '.join(str(p) for p in self.written)}")

    # -- checkpoint and resume -------------------------------------------------
    def state_dict(self) -> dict:
        """What a resumed fit needs to edit with the same neurons (empty before the fit has located them).

        ``masks``: record id -> :meth:`NeuronMask.to_dict` for every record of the run (every rank's:
        the same on each rank), as the edits used them (after the busy-neuron filter);
        ``fingerprint``: :func:`~mke_lightning.localization.cache.model_fingerprint` of the model they were
        located on, before any edit; ``settings`` and ``edit_language``: what decided them. Plain
        lists, dicts and strings: the checkpoint loads with ``weights_only``.
        """
        return dict(self._fit_state) if self._fit_state is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        if self._fit_started:  # the strategy restores checkpoints after on_fit_start (DeepSpeed, FSDP)
            rank_zero_warn("NeuronLocalization: the checkpoint's masks arrived after the fit started and are not used; "
                           "the records were located again, on the model as loaded before the kept edits come back")
            return
        self._resume = state_dict  # taken back in on_fit_start, once the model and the records are there

    def _take_back(self, trainer, pl_module, state: dict, fingerprint: str, edit_lang: str) -> StageResult:
        """The checkpoint's masks, after checking that this fit is the one they were made for."""
        model, _, arch = causal_lm_of(pl_module, "NeuronLocalization")
        problems = []
        if state.get("fingerprint") != fingerprint:
            problems.append(f"the model: located on model {str(state.get('fingerprint'))[:16]}, this run's model is "
                            f"{fingerprint[:16]} (model.lm, or a module that applied the kept edits before "
                            "on_fit_start; see docs/scaling.md)")
        now = settings_key(self.settings, edit_lang)
        if state.get("settings") != now:
            changed = _differences(state.get("settings") or {}, now)
            problems.append(
                f"the localisation settings ({'; '.join(changed[:4])}{'; ...' if len(changed) > 4 else ''})"
            )
        saved = state.get("masks") or {}
        missing = [r.id for r in records_of(trainer.datamodule) if r.id not in saved]
        if missing:
            problems.append(f"the records: {len(missing)} of this run's are not in the checkpoint "
                            f"({', '.join(repr(m) for m in missing[:3])}{', ...' if len(missing) > 3 else ''})")
        if trainer.strategy.reduce_boolean_decision(bool(problems), all=False):  # every rank stops, none left waiting
            raise ValueError("NeuronLocalization: the checkpoint was made for another run: "
                             + "; ".join(problems or ["see rank 0's message"])
                             + ". Resume with the model, settings and data the run began with, or start afresh "
                             "without --ckpt_path")
        masks = masks_of(pl_module)
        result = StageResult(masks={rid: NeuronMask.from_dict(d) for rid, d in saved.items()}, reused=list(saved))
        for rid, mask in result.masks.items():
            masks.setdefault(rid, mask)
        rank_zero_info(f"localisation: the masks of {len(saved)} records taken from the checkpoint (located on model "
                       f"{fingerprint[:16]} before any edit)")
        self._summarize(result, model, arch, self._default_output(trainer))
        return result

    @staticmethod
    def _default_output(trainer) -> Path | None:
        log_dir = trainer.log_dir if trainer.loggers else None
        return Path(log_dir) / "localization" if log_dir else None


def _differences(then: dict, now: dict, prefix: str = "") -> list[str]:
    """``key: <then> then, <now> now`` for every setting that differs (nested keys dotted)."""
    out = []
    for key in sorted(set(then) | set(now), key=str):
        a, b = then.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} then, {b!r} now")
    return out

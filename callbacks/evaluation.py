"""Evaluate each edit in every evaluation language, and report at the end.

During fit, the pre-edit locality references are taken at batch start and
the edited model is scored at batch end (before the module restores it); the
perplexity of a multilingual text sample is measured once before any edit
and again after every ``perplexity.every_n_edits``-th edit. During
validate/test, the unedited model is scored. Per-edit figures go to the
Lightning loggers as they are computed, and the progress bar shows the
running reliability in the edit language. At the end, the aggregate (synced
across ranks) is printed as a table and ``results.json``, ``edits.csv``,
``perplexity.csv`` and ``heatmap_<protocol>.png`` are written to the run's
log dir (or ``output_dir``). ``results.json`` also says what the run was: the
sections the run's parts wrote into its run settings
(:mod:`mke_lightning.reporting.run_settings`: the module's method, protocol,
training languages and settings; the DataModule's data and selection; the
localisation settings).

Retention (``protocol == "sequential"`` on the module, during fit): every
``retention_every_n_edits`` edits and at the end of fit, all edits done so
far on this rank are scored again on the current model
(:mod:`mke_lightning.evaluation.retention`); each pass is one checkpoint of
the ``retention`` block of ``results.json``, the last pass goes to
``retention.csv`` and is printed beside the immediate figures.

Resume (``--ckpt_path last`` with :class:`~mke_lightning.callbacks.EditCheckpoint`):
the evaluation so far is in the checkpoint (:meth:`EditEvaluation.state_dict`,
:mod:`mke_lightning.evaluation.resume`), so a resumed run's files are those of
a run never stopped.

Neighbourhood (the ``neighborhood`` measure): each edit's question asked
about other subjects of the run, ``neighbourhood.per_edit`` neighbour records
chosen by a seeded rule from the DataModule's ``all_records`` (or
``records``), scored as locality against the pre-edit model
(:mod:`mke_lightning.evaluation.neighbourhood`).

The scoring itself, the rows and the aggregate are
:class:`~mke_lightning.evaluation.session.EvalSession`'s; this callback
forwards Lightning's hooks to it and writes the results
(:mod:`mke_lightning.reporting.results`).
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from mke_lightning.callbacks.module_access import (
    all_records_of,
    edit_protocol_of,
    languages_of,
    model_and_tokenizer,
    own_record_ids,
    resumed_ids_of,
)
from mke_lightning.evaluation import resume
from mke_lightning.evaluation.evaluator import MEASURES, EditEvaluator
from mke_lightning.evaluation.neighbourhood import NeighbourhoodConfig, neighbour_pool
from mke_lightning.evaluation.perplexity import PerplexityConfig, PerplexityProbe, load_sample
from mke_lightning.evaluation.session import EvalPlan, EvalSession, check_choices
from mke_lightning.reporting.results import (
    eval_facts,
    flat_metrics,
    print_results,
    results_meta,
    view_metrics,
    write_results,
)
from mke_lightning.reporting.run_settings import run_settings

DEFAULT_PROTOCOLS = ("token_acc", "gen_em")


class EditEvaluation(L.Callback):
    """Every measure of every edit, in every evaluation language, under every metric protocol (see the module).

    Works on any LightningModule that offers ``causal_lm`` (or ``get_causal_lm()``) and ``tokenizer``, with a
    DataModule offering ``records``, ``edit_language`` and ``eval_languages`` (:mod:`.module_access`).
    """

    def __init__(
        self,
        measures: list[str] | None = None,
        batch_rows: int = 32,
        max_new_tokens: int = 24,
        perplexity: PerplexityConfig | None = None,
        output_dir: str | None = None,
        print_table: bool = True,
        table_protocols: list[str] | None = None,
        log_protocols: list[str] | None = None,
        plots: bool = True,
        plot_protocols: list[str] | None = None,
        retention_every_n_edits: int | None = None,
        neighbourhood: NeighbourhoodConfig | None = None,
    ) -> None:
        """
        Args:
            measures: which measures to evaluate (default all: reliability, generality, locality,
                locality_gold, neighborhood, portability, multi_hop).
            batch_rows: prompts (and teacher-forced rows) per forward pass.
            max_new_tokens: cap on the greedy generation length.
            perplexity: downstream impact settings (text sample, languages, how often); default on.
            output_dir: where to write results (default: the trainer's log dir).
            print_table: print the per-language table at the end.
            table_protocols: protocols shown in the printed table (default token_acc, gen_em).
            log_protocols: protocols sent to the loggers per edit (default token_acc, gen_em).
            plots: write the heatmap PNGs.
            plot_protocols: one heatmap per protocol (default token_acc, gen_em).
            retention_every_n_edits: sequential protocol only: also re-score every edit done so far
                after each K-th edit (``None``: only once, at the end of fit, which always happens).
            neighbourhood: the ``neighborhood`` measure's settings (neighbours per edit, seed).
        """
        self.measures = tuple(measures or MEASURES)
        self.table_protocols = tuple(table_protocols or DEFAULT_PROTOCOLS)
        self.log_protocols = tuple(log_protocols or DEFAULT_PROTOCOLS)
        self.plot_protocols = tuple(plot_protocols or DEFAULT_PROTOCOLS)
        check_choices(self.measures, {"table_protocols": self.table_protocols, "log_protocols": self.log_protocols,
                                      "plot_protocols": self.plot_protocols}, retention_every_n_edits)
        self.retention_every_n_edits = retention_every_n_edits
        self.neighbourhood = neighbourhood or NeighbourhoodConfig()
        self._measures_asked = self.measures  # a resume from an older checkpoint may drop neighborhood for that fit
        self.batch_rows = batch_rows
        self.max_new_tokens = max_new_tokens
        self.perplexity = perplexity or PerplexityConfig()
        self.output_dir = output_dir
        self.print_table = print_table
        self.plots = plots
        self.session: EvalSession | None = None  # the stage's evaluation, from its start
        self.summary: dict | None = None
        self.written: dict[str, Path] = {}
        self.edit_lang, self.eval_langs = "en", ["en"]
        self._ppl_langs: list[str] = []
        self._sequential = False
        self._resume: dict | None = None  # a checkpoint's evaluation, until the fit starts
        self._fit_set_up = False  # set up for fit: state_dict() has something to save

    # -- what the stage keeps (the session's) ----------------------------------
    @property
    def rows(self) -> list[dict]:
        return self.session.rows if self.session is not None else []

    @property
    def ppl_pre(self) -> dict[str, float]:
        return self.session.ppl_pre if self.session is not None else {}

    @property
    def seconds(self) -> dict[str, float]:
        return self.session.seconds if self.session is not None else {}

    @property
    def retention(self) -> list[dict]:
        """One checkpoint per retention pass, in order (sequential protocol)."""
        return self.session.retention.checkpoints if self.session and self.session.retention else []

    # -- set-up -------------------------------------------------------------
    def _setup(self, trainer, pl_module, stage: str) -> None:
        model, tokenizer = model_and_tokenizer(pl_module, "EditEvaluation")
        self.edit_lang, self.eval_langs = languages_of(trainer.datamodule, pl_module)
        self.summary, self.written = None, {}
        self._sequential = stage == "fit" and edit_protocol_of(pl_module) == "sequential"
        saved, self._resume = (self._resume if stage == "fit" else None), None
        self.measures = self._measures_asked
        cfg = self.perplexity
        sample = load_sample(cfg.path) if cfg.enabled else {}
        self._ppl_langs = (cfg.languages or [lang for lang in self.eval_langs if lang in sample]) if cfg.enabled else []
        if saved is not None:
            self._check_resumable(saved)
        all_records = getattr(trainer.datamodule, "all_records", None)
        ids = getattr(all_records, "ids", None) if stage == "fit" else None
        plan = EvalPlan(
            EditEvaluator(tokenizer, self.batch_rows, self.max_new_tokens), self.edit_lang, self.eval_langs,
            self.measures, self.log_protocols, cfg.every_n_edits,
            probe=PerplexityProbe(tokenizer, sample, self._ppl_langs, cfg) if self._ppl_langs else None,
            pool=neighbour_pool(all_records_of(trainer.datamodule), self.eval_langs, self.edit_lang,
                                self.neighbourhood) if "neighborhood" in self.measures else None,
            sequential=self._sequential,
            positions={rid: i for i, rid in enumerate(ids() if callable(ids) else (ids or []))},
        )
        self.session = EvalSession(plan, pl_module.device)
        if plan.probe is not None:
            if saved is not None:
                self.session.ppl_pre = resume.pre_edit_perplexity(saved, trainer.global_rank)
            else:
                start = time.perf_counter()
                self.session.measure_pre_edit_perplexity(model)
                rank_zero_info(f"pre-edit perplexity ({time.perf_counter() - start:.1f} s): "
                               + ", ".join(f"{lang} {v:.1f}" for lang, v in self.ppl_pre.items()))
        if saved is not None:  # this rank's share: the edits of the records it holds now
            own = own_record_ids(trainer.datamodule, trainer.global_rank)
            resume.take_back(self.session, saved, own, trainer.global_rank, resumed_ids_of(pl_module))
        elif stage == "fit" and resumed_ids_of(pl_module):
            rank_zero_warn(
                "EditEvaluation: resumed from a checkpoint without an evaluation state (the callback was not in "
                "that run?); the results cover only the edits made from here on"
            )
        self._fit_set_up = stage == "fit"

    # -- scoring --------------------------------------------------------------
    def _score(self, pl_module, batch, edited: bool) -> None:
        model, _ = model_and_tokenizer(pl_module, "EditEvaluation")
        was_training = model.training
        model.eval()
        try:
            for record in batch:
                metrics, progress = self.session.score(model, record, edited)
                pl_module.log_dict(metrics, batch_size=1, on_step=True, on_epoch=False)
                pl_module.log_dict(progress, batch_size=1, on_step=True, on_epoch=False, prog_bar=True, logger=False)
        finally:
            model.train(was_training)

    def _retention_pass(self, trainer, pl_module) -> None:
        """Score every edit done so far (this rank) on the current model; one checkpoint, synced across ranks."""
        model, _ = model_and_tokenizer(pl_module, "EditEvaluation")
        checkpoint = self.session.retention.run_pass(self.session.plan.evaluator, model, pl_module.device)
        summary = checkpoint["summary"]
        rank_zero_info(f"retention pass over {summary['edits']} edits ({checkpoint['seconds_rank0']:.1f} s)")
        metrics = {"retention/edits_done": float(summary["edits"]),
                   **view_metrics(summary, self.edit_lang, self.log_protocols, "retention")}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=summary["edits"])

    # -- fit: score the edited model --------------------------------------
    def on_fit_start(self, trainer, pl_module) -> None:
        self._setup(trainer, pl_module, "fit")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        model, _ = model_and_tokenizer(pl_module, "EditEvaluation")
        for record in batch:  # the pre-edit references, before the module edits
            self.session.take_references(model, record)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._score(pl_module, batch, edited=True)
        k, kept = self.retention_every_n_edits, self.session.retention
        # Every rank makes the pass or none does: the aggregate's sync is a collective call.
        if kept is not None and k is not None and trainer.strategy.reduce_boolean_decision(kept.crossed(k), all=False):
            self._retention_pass(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        # The last checkpoint is the end of the run: skipped when the model has not changed since a pass.
        kept = self.session.retention if self.session is not None else None
        if kept is not None and trainer.strategy.reduce_boolean_decision(kept.pending(), all=False):
            self._retention_pass(trainer, pl_module)
        self._finish(trainer, pl_module, "edited")

    # -- checkpoint and resume ------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        # Lightning loads a checkpoint's state after this, and before on_fit_start (but under DeepSpeed and FSDP)
        self._fit_set_up = False

    def state_dict(self) -> dict:
        """The fit's evaluation so far, for a checkpoint (empty outside fit); :mod:`mke_lightning.evaluation.resume`.

        Lightning calls this on every rank and rank 0 writes the file, so each rank's part is gathered
        here (collective calls).
        """
        if not self._fit_set_up:
            return {}
        return resume.saved_state(self.session, self._settings())

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        if self._fit_set_up:  # the strategy restores checkpoints after on_fit_start (DeepSpeed, FSDP)
            rank_zero_warn(
                "EditEvaluation: the checkpoint's evaluation arrived after the fit started and is not restored; "
                "the results cover only the edits made from here on"
            )
            return
        self._resume = state_dict  # taken back in _setup, once the languages and this rank's records are known

    def _settings(self) -> dict:
        """What the saved figures depend on: a resumed run must have the same."""
        return resume.settings_of(self.edit_lang, self.eval_langs, self.measures, self._ppl_langs, self._sequential,
                                  self.neighbourhood)

    def _check_resumable(self, state: dict) -> None:
        self.measures = resume.resumable_measures(state["settings"], self.measures)
        resume.check_same_settings(state["settings"], self._settings())


    # -- validate / test: score the unedited model ---------------------------
    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and trainer.state.fn != "fit":
            self._setup(trainer, pl_module, "validate")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.state.fn != "fit" and not trainer.sanity_checking:
            self._score(pl_module, batch, edited=False)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn != "fit" and not trainer.sanity_checking:
            self._finish(trainer, pl_module, "unedited")

    def on_test_start(self, trainer, pl_module) -> None:
        self._setup(trainer, pl_module, "test")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._score(pl_module, batch, edited=False)

    def on_test_end(self, trainer, pl_module) -> None:
        self._finish(trainer, pl_module, "unedited")

    # -- reporting ------------------------------------------------------------
    def _finish(self, trainer, pl_module, model_state: str) -> None:
        if self.session is None:
            return
        summary = self.summary = self.session.finish()  # every rank takes part: collective calls
        log_dir = trainer.log_dir  # a collective call under DDP: every rank makes it
        if summary["edits"] == 0 or not trainer.is_global_zero:
            return
        facts = eval_facts(model_state, self.session, trainer.world_size, self.perplexity, self.neighbourhood)
        meta = results_meta(facts, summary, run_settings(trainer), type(pl_module).__name__,
                            type(model_and_tokenizer(pl_module, "EditEvaluation")[0]).__name__)
        kept = self.session.retention
        retention = kept.block(self.retention_every_n_edits) if kept is not None else None
        self.written = write_results(Path(self.output_dir or log_dir or "."), summary, meta, self.rows,
                                     self.session.perplexity_rows, retention, kept.rows if kept is not None else [],
                                     self.plot_protocols if self.plots else None, self.edit_lang)
        for logger in trainer.loggers:
            logger.log_metrics(flat_metrics(summary), step=trainer.global_step)
        if self.print_table:
            print_results(summary, meta, retention, self.written, self.table_protocols)

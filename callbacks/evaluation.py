"""Evaluate each edit in every evaluation language, and report at the end."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from mke_lightning.evaluation.aggregate import EvalAggregate
from mke_lightning.callbacks.module_access import languages_of, model_and_tokenizer
from mke_lightning.evaluation.evaluator import MEASURES, EditEvaluator, Item, build_items, target_group
from mke_lightning.localization.locate import LocalizationConfig
from mke_lightning.evaluation.metrics import PROTOCOLS
from mke_lightning.evaluation.neighbourhood import NeighbourhoodConfig, NeighbourPool
from mke_lightning.evaluation.perplexity import PerplexityConfig, PerplexityProbe, load_sample, ratios
from mke_lightning.reporting.tables import format_retention_table, format_table, legend, write_reports
from mke_lightning.reporting.plots import plot_heatmap


class EditEvaluation(L.Callback):
    """Every measure of every edit, in every evaluation language, under every metric protocol.

    During fit, the pre-edit locality references are taken at batch start and
    the edited model is scored at batch end (before the module restores it);
    the perplexity of a multilingual text sample is measured once before any
    edit and again after every ``perplexity.every_n_edits``-th edit. During
    validate/test, the unedited model is scored. Per-edit figures go to the
    Lightning loggers as they are computed, and the progress bar shows the
    running reliability in the edit language. At the end, the aggregate
    (synced across ranks) is printed as a table and ``results.json``,
    ``edits.csv``, ``perplexity.csv`` and ``heatmap_<protocol>.png`` are
    written to the run's log dir (or ``output_dir``). ``results.json`` also
    says what the run was: the module's ``run_info()`` (method, protocol,
    training languages, settings) and the DataModule's ``describe()`` (data
    and selection), where they offer them.

    Retention (``protocol == "sequential"`` on the module, during fit): every
    edit stays in the model, so a later edit can undo an earlier one. Every
    ``retention_every_n_edits`` edits and at the end of fit, all edits done so
    far on this rank are scored again on the current model, with their own
    items and the locality references taken just before each of them (the
    reference is the model the edit was made on, so locality asks "is what
    that edit left alone still there?"). Each such pass is one checkpoint of
    the ``retention`` block of ``results.json`` (per-language summary, as the
    main one); the last pass goes to ``retention.csv`` and is printed beside
    the immediate figures. A pass costs one immediate evaluation per edit done.

    Resume (``--ckpt_path last`` with :class:`~mke_lightning.callbacks.EditCheckpoint`):
    the evaluation so far is in the checkpoint (:meth:`state_dict`): every
    rank's rows, per-edit seconds and perplexity rows, the pre-edit perplexity,
    the retention items and references, gathered rank by rank, and the
    aggregate's states summed over the ranks. A resumed fit gives each rank the
    rows of the records it holds now, adds the saved states to rank 0's, and
    takes the pre-edit perplexity from the checkpoint (the model may already
    hold re-applied edits), so its files are those of a run never stopped.

    Neighbourhood (the ``neighborhood`` measure): each edit's question asked
    about other subjects of the run, ``neighbourhood.per_edit`` neighbour
    records chosen by a seeded rule from the DataModule's ``all_records`` (or
    ``records``), scored as locality against the pre-edit model
    (:mod:`mke_lightning.evaluation.neighbourhood`).

    Works on any LightningModule that offers ``causal_lm`` (or
    ``get_causal_lm()``) and ``tokenizer``, with a DataModule offering
    ``records``, ``edit_language`` and ``eval_languages``
    (:mod:`mke_lightning.callbacks.module_access`).
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
        unknown = set(self.measures) - set(MEASURES)
        if unknown:
            raise ValueError(f"EditEvaluation: unknown measures {sorted(unknown)}; choose from {list(MEASURES)}")
        self.table_protocols = tuple(table_protocols or ("token_acc", "gen_em"))
        self.log_protocols = tuple(log_protocols or ("token_acc", "gen_em"))
        self.plot_protocols = tuple(plot_protocols or ("token_acc", "gen_em"))
        for name, chosen in (("table_protocols", self.table_protocols), ("log_protocols", self.log_protocols),
                             ("plot_protocols", self.plot_protocols)):
            if set(chosen) - set(PROTOCOLS):
                raise ValueError(f"EditEvaluation: {name} {sorted(set(chosen) - set(PROTOCOLS))} unknown; choose from {list(PROTOCOLS)}")
        if retention_every_n_edits is not None and (isinstance(retention_every_n_edits, bool) or retention_every_n_edits < 1):
            raise ValueError(f"EditEvaluation: retention_every_n_edits must be >= 1 or None, got {retention_every_n_edits!r}")
        self.retention_every_n_edits = retention_every_n_edits
        self.neighbourhood = neighbourhood or NeighbourhoodConfig()
        self._measures_asked = self.measures  # a resume from an older checkpoint may drop neighborhood for that fit
        self._pool: NeighbourPool | None = None
        self.batch_rows = batch_rows
        self.max_new_tokens = max_new_tokens
        self.perplexity = perplexity or PerplexityConfig()
        self.output_dir = output_dir
        self.print_table = print_table
        self.plots = plots
        self.aggregate: EvalAggregate | None = None
        self.rows: list[dict] = []  # this rank's rows (all ranks' after the end of a stage)
        self.perplexity_rows: list[dict] = []
        self.ppl_pre: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.summary: dict | None = None
        self.written: dict[str, Path] = {}
        self._pending: dict[str, tuple[list, dict]] = {}
        self._probe: PerplexityProbe | None = None
        self._position: dict[str, int] = {}
        self._running: dict[str, list[float]] = {}
        self.retention: list[dict] = []  # sequential: one checkpoint per retention pass, in order
        self.retention_rows: list[dict] = []  # the last pass's rows (all ranks' after the end of fit)
        self._sequential = False
        # sequential: (record id, items, pre-edit references, target group per language) per edit of this rank, in order
        self._done: list[tuple] = []
        self._passed = 0  # len(self._done) at the last retention pass
        self._ppl_langs: list[str] = []
        self._resume: dict | None = None  # a checkpoint's evaluation, until the fit starts
        self._fit_set_up = False  # set up for fit: state_dict() has something to save

    # -- set-up -------------------------------------------------------------
    def _setup(self, trainer, pl_module, stage: str) -> None:
        model, tokenizer = model_and_tokenizer(pl_module, "EditEvaluation")
        self.edit_lang, self.eval_langs = languages_of(trainer.datamodule, pl_module)
        self.evaluator = EditEvaluator(tokenizer, self.batch_rows, self.max_new_tokens)
        # The same states on every rank, whatever languages this rank's records have (see EvalAggregate).
        self.aggregate = EvalAggregate(self.eval_langs, self.edit_lang).to(pl_module.device)
        self.rows, self.perplexity_rows, self.seconds, self.summary, self.written = [], [], {}, None, {}
        self._pending, self._running = {}, {"token_acc": [0.0, 0.0], "gen_em": [0.0, 0.0]}
        self._probe, self.ppl_pre = None, {}
        self._sequential = stage == "fit" and getattr(pl_module, "protocol", None) == "sequential"
        self.retention, self.retention_rows, self._done, self._passed = [], [], [], 0
        resume, self._resume = (self._resume if stage == "fit" else None), None
        self.measures = self._measures_asked
        cfg = self.perplexity
        sample = load_sample(cfg.path) if cfg.enabled else {}
        self._ppl_langs = (cfg.languages or [l for l in self.eval_langs if l in sample]) if cfg.enabled else []
        if resume is not None:
            self._check_resumable(resume)
        self._pool = self._neighbour_pool(trainer) if "neighborhood" in self.measures else None
        if self._ppl_langs:
            self._probe = PerplexityProbe(tokenizer, sample, self._ppl_langs, cfg)
            if resume is not None:  # the model may hold re-applied edits (sequential): the saved one is the pre-edit one
                parts = [part["ppl_pre"] for part in resume["ranks"]]
                self.ppl_pre = dict(parts[trainer.global_rank] if trainer.global_rank < len(parts) else parts[0])
            else:
                start = time.perf_counter()
                self.ppl_pre = self._probe.measure(model)  # once per run: every edit starts from this model
                rank_zero_info(f"pre-edit perplexity ({time.perf_counter() - start:.1f} s): "
                               + ", ".join(f"{l} {v:.1f}" for l, v in self.ppl_pre.items()))
        all_records = getattr(trainer.datamodule, "all_records", None)
        ids = getattr(all_records, "ids", None) if stage == "fit" else None
        self._position = {rid: i for i, rid in enumerate(ids() if callable(ids) else (ids or []))}
        if resume is not None:
            self._restore(trainer, pl_module, resume)
        elif stage == "fit" and getattr(pl_module, "resumed", None):
            rank_zero_warn("EditEvaluation: resumed from a checkpoint without an evaluation state (the callback was not in "
                           "that run?); the results cover only the edits made from here on")
        self._fit_set_up = stage == "fit"

    def _neighbour_pool(self, trainer) -> NeighbourPool | None:
        """The run's records (every rank's, the same pool everywhere) indexed for neighbour prompts."""
        dm = trainer.datamodule
        records = getattr(dm, "all_records", None)
        if records is None:
            records = getattr(dm, "records", None)
        if records is None:
            rank_zero_warn("EditEvaluation: the DataModule offers no `all_records` or `records`: no neighbour "
                           "records to draw from, so no neighborhood measure")
            return None
        start = time.perf_counter()
        pool = NeighbourPool(records, self.eval_langs, self.edit_lang, self.neighbourhood)
        rank_zero_info(f"neighbourhood: {len(pool)} records to draw {self.neighbourhood.per_edit} neighbours per edit "
                       f"from (seed {self.neighbourhood.seed}; {time.perf_counter() - start:.1f} s)")
        return pool

    # -- scoring --------------------------------------------------------------
    def _items(self, record) -> list[Item]:
        """The record's items; with the pool, its neighbourhood items too."""
        neighbours = self._pool.prompts(record) if self._pool is not None else None
        return build_items(record, self.eval_langs, self.measures, neighbours)

    def _references(self, pl_module, batch) -> None:
        model, _ = model_and_tokenizer(pl_module, "EditEvaluation")
        for record in batch:
            start = time.perf_counter()
            items = self._items(record)
            self._pending[record.id] = (items, self.evaluator.references(model, items))
            self.seconds[record.id] = time.perf_counter() - start

    def _score(self, pl_module, batch, edited: bool) -> None:
        model, _ = model_and_tokenizer(pl_module, "EditEvaluation")
        was_training = model.training
        model.eval()
        try:
            for record in batch:
                start = time.perf_counter()
                if record.id in self._pending:
                    items, refs = self._pending.pop(record.id)
                else:
                    items = self._items(record)
                    refs = self.evaluator.references(model, items)
                rows = self.evaluator.score(model, items, refs)
                groups = {lang: target_group(record, self.edit_lang, lang) for lang in dict.fromkeys(it.lang for it in items)}
                if edited and self._sequential:
                    self._done.append((record.id, items, refs, groups))
                for row in rows:
                    row.update(record_id=record.id, edit_lang=self.edit_lang, group=groups[row["eval_lang"]])
                self.aggregate.update(rows, edits=1)
                self.rows += rows
                metrics = self._edit_metrics(rows)
                if edited and self._probe is not None and self._measure_perplexity(record.id):
                    post = self._probe.measure(model)
                    r = ratios(post, self.ppl_pre)
                    self.aggregate.update_perplexity(r)
                    self.perplexity_rows += [{"record_id": record.id, "lang": l, "ppl_pre": round(self.ppl_pre[l], 4),
                                              "ppl_post": round(post[l], 4), "ratio": round(v, 6)} for l, v in r.items()]
                    metrics["eval/perplexity_ratio"] = sum(r.values()) / len(r)
                self.seconds[record.id] = self.seconds.get(record.id, 0.0) + time.perf_counter() - start
                pl_module.log_dict(metrics, batch_size=1, on_step=True, on_epoch=False)
                pl_module.log_dict(self._running_reliability(rows), batch_size=1, on_step=True, on_epoch=False,
                                   prog_bar=True, logger=False)
        finally:
            model.train(was_training)

    # -- retention (sequential protocol) ----------------------------------------
    def _retention_pass(self, trainer, pl_module) -> None:
        """Score every edit done so far (this rank) on the current model; one checkpoint, synced across ranks."""
        model, _ = model_and_tokenizer(pl_module, "EditEvaluation")
        start = time.perf_counter()
        was_training = model.training
        model.eval()
        rows: list[dict] = []
        try:
            for number, (record_id, items, refs, groups) in enumerate(self._done, 1):
                scored = self.evaluator.score(model, items, refs)  # batched as the edit's own evaluation
                for row in scored:
                    row.update(record_id=record_id, edit_number=number, edit_lang=self.edit_lang,
                               group=groups[row["eval_lang"]])
                rows += scored
        finally:
            model.train(was_training)
        aggregate = EvalAggregate(self.eval_langs, self.edit_lang).to(pl_module.device)
        aggregate.update(rows, edits=len(self._done))
        summary = aggregate.compute()  # every rank takes part (see on_train_batch_end)
        summary.pop("perplexity_ratio", None)  # no perplexity in a retention pass
        seconds = time.perf_counter() - start
        self.retention.append({"edits_done": summary["edits"], "seconds_rank0": round(seconds, 3), "summary": summary})
        self.retention_rows, self._passed = rows, len(self._done)
        rank_zero_info(f"retention pass over {summary['edits']} edits ({seconds:.1f} s)")
        metrics = {"retention/edits_done": float(summary["edits"]), **_view_metrics(summary, self.edit_lang, self.log_protocols, "retention")}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=summary["edits"])

    def _measure_perplexity(self, record_id: str) -> bool:
        n = self.perplexity.every_n_edits
        position = self._position.get(record_id)
        if position is None:  # no run order from the DataModule: this rank's order
            position = len(self._position)
            self._position[record_id] = position
        return position % n == 0

    def _edit_metrics(self, rows: list[dict]) -> dict[str, float]:
        """This edit's means: edit language and the mean over the other languages, per measure and protocol."""
        out: dict[str, float] = {}
        for scope, keep in (("edit_lang", lambda r: r["eval_lang"] == self.edit_lang),
                            ("other_langs", lambda r: r["eval_lang"] != self.edit_lang)):
            for measure in self.measures:
                for proto in self.log_protocols:
                    values = [r[proto] for r in rows if r["measure"] == measure and keep(r) and r[proto] is not None]
                    if values:
                        out[f"eval/{scope}/{measure}/{proto}"] = sum(values) / len(values)
        return out

    def _running_reliability(self, rows: list[dict]) -> dict[str, float]:
        """Running mean over this rank's edits of the edit-language reliability (progress bar)."""
        for proto, acc in self._running.items():
            values = [r[proto] for r in rows if r["measure"] == "reliability" and r["eval_lang"] == self.edit_lang]
            if values:
                acc[0] += sum(values) / len(values)
                acc[1] += 1
        return {f"rel_{'tok' if p == 'token_acc' else 'gen'}": a[0] / a[1] for p, a in self._running.items() if a[1]}

    # -- fit: score the edited model --------------------------------------
    def on_fit_start(self, trainer, pl_module) -> None:
        self._setup(trainer, pl_module, "fit")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._references(pl_module, batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._score(pl_module, batch, edited=True)
        k = self.retention_every_n_edits
        if self._sequential and k is not None:
            crossed = len(self._done) // k > self._passed // k  # this rank's edits passed a multiple of K
            # Every rank makes the pass or none does: the aggregate's sync is a collective call.
            if trainer.strategy.reduce_boolean_decision(crossed, all=False):
                self._retention_pass(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        # The last checkpoint is the end of the run: skipped when the model has not changed since a pass.
        if self._sequential and trainer.strategy.reduce_boolean_decision(len(self._done) > self._passed, all=False):
            self._retention_pass(trainer, pl_module)
        self._finish(trainer, pl_module, "edited")

    # -- checkpoint and resume ------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        # Lightning loads a checkpoint's state after this, and before on_fit_start (but under DeepSpeed and FSDP)
        self._fit_set_up = False

    def state_dict(self) -> dict:
        """The fit's evaluation so far, for a checkpoint (empty outside fit).

        Lightning calls this on every rank and rank 0 writes the file, so each
        rank's part is gathered here (collective calls): ``ranks`` holds one
        part per rank, each with its edits' record ids (in the order made),
        rows, perplexity rows, seconds, run positions, pre-edit perplexity and,
        under the sequential protocol, retention items and references;
        ``aggregate`` holds the aggregate's states summed over the ranks. Plain
        lists, dicts and tensors: the file loads with ``weights_only``.
        """
        if not self._fit_set_up:
            return {}
        mine = [rid for rid in self.seconds if rid not in self._pending]
        own = set(mine)  # after the end of fit the row lists hold every rank's rows: keep this rank's
        part = {
            "records": mine,
            "rows": [r for r in self.rows if r["record_id"] in own],
            "perplexity_rows": [r for r in self.perplexity_rows if r["record_id"] in own],
            "seconds": {rid: self.seconds[rid] for rid in mine},
            "positions": {rid: self._position[rid] for rid in mine if rid in self._position},
            "ppl_pre": dict(self.ppl_pre),
            "done": [{"record_id": rid, "items": [asdict(it) for it in items], "refs": refs, "groups": groups}
                     for rid, items, refs, groups in self._done],
            "retained": [rid for rid, *_ in self._done[: self._passed]],
            "retention_rows": [r for r in self.retention_rows if r["record_id"] in own],
        }
        return {
            "settings": self._settings(),
            "ranks": _gather_parts(part),
            "aggregate": self.aggregate.saved_states(),
            "aggregate_measures": list(self.aggregate.measures),  # the states' measure axis
            "retention": self.retention,  # the passes' summaries, synced: the same on every rank
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        if self._fit_set_up:  # the strategy restores checkpoints after on_fit_start (DeepSpeed, FSDP)
            rank_zero_warn("EditEvaluation: the checkpoint's evaluation arrived after the fit started and is not restored; "
                           "the results cover only the edits made from here on")
            return
        self._resume = state_dict  # taken back in _setup, once the languages and this rank's records are known

    def _settings(self) -> dict:
        """What the saved figures depend on: a resumed run must have the same."""
        out = {"edit_language": self.edit_lang, "eval_languages": list(self.eval_langs), "measures": list(self.measures),
               "perplexity_languages": list(self._ppl_langs), "sequential": self._sequential}
        if "neighborhood" in self.measures:
            out["neighbourhood"] = asdict(self.neighbourhood)
        return out

    def _check_resumable(self, state: dict) -> None:
        saved = state["settings"]
        if "neighborhood" in self.measures and "neighborhood" not in saved.get("measures", []):
            # a checkpoint from before the measure (or from a run without it): its edits have no neighbourhood
            # figures, so this fit goes on without the measure rather than report it for part of the edits
            rank_zero_warn("EditEvaluation: the checkpoint's evaluation has no neighborhood measure; the resumed "
                           "run goes on without it (start afresh for neighbourhood figures)")
            self.measures = tuple(m for m in self.measures if m != "neighborhood")
        now = self._settings()
        changed = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
        if changed:
            raise ValueError("EditEvaluation: the checkpoint's evaluation was made with other settings ("
                             + "; ".join(f"{k}: {a} then, {b} now" for k, (a, b) in changed.items())
                             + "); resume with the same ones, or start afresh without --ckpt_path")

    def _restore(self, trainer, pl_module, state: dict) -> None:
        """Take back this rank's share of a checkpoint's evaluation: the edits of the records this rank holds
        (every rank's part is read, so a run resumed on other ranks splits the edits as its data does)."""
        records = getattr(trainer.datamodule, "records", None)
        own = {r.id for r in records} if records is not None else None
        if own is None and trainer.global_rank != 0:
            own = set()  # no record list to go by: rank 0 takes every edit
        keep = lambda rid: own is None or rid in own
        saved_ids: set[str] = set()
        retained: set[str] = set()
        for part in state["ranks"]:
            saved_ids.update(part["records"])
            retained.update(part["retained"])
            mine = [rid for rid in part["records"] if keep(rid)]
            self.seconds.update({rid: part["seconds"][rid] for rid in mine})
            self._position.update({rid: p for rid, p in part["positions"].items() if keep(rid)})
            self.rows += [r for r in part["rows"] if keep(r["record_id"])]
            self.perplexity_rows += [r for r in part["perplexity_rows"] if keep(r["record_id"])]
            self.retention_rows += [r for r in part["retention_rows"] if keep(r["record_id"])]
            self._done += [(d["record_id"], [Item(**{**it, "answers": tuple(it["answers"])}) for it in d["items"]],
                            dict(d["refs"]), dict(d["groups"])) for d in part["done"] if keep(d["record_id"])]
        by_record: dict[str, list[dict]] = {}
        for row in self.rows:
            by_record.setdefault(row["record_id"], []).append(row)
        for rid in self.seconds:  # the progress bar's running reliability, edit by edit as it was
            self._running_reliability(by_record.get(rid, []))
        self._passed = sum(rid in retained for rid, *_ in self._done)
        self.retention = list(state["retention"])
        if trainer.global_rank == 0:  # the sum over the ranks, once: the final sync adds the other ranks' new edits
            self.aggregate.add_states(state["aggregate"], state.get("aggregate_measures"))
        rank_zero_info(f"evaluation of {len(saved_ids)} edits restored from the checkpoint")
        resumed = {o.record_id for o in getattr(pl_module, "resumed", None) or []}
        if resumed and resumed != saved_ids:
            rank_zero_warn(f"EditEvaluation: the checkpoint's evaluation covers {len(saved_ids)} edits, its edit log "
                           f"{len(resumed)}; the results cover the evaluated ones")

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
        if self.aggregate is None:
            return
        summary = self.aggregate.compute()  # every rank takes part: the states are summed across ranks
        summary["perplexity_pre"] = {l: round(v, 4) for l, v in self.ppl_pre.items()}
        self.summary = summary
        self.rows = _gather(self.rows)
        self.perplexity_rows = _gather(self.perplexity_rows)
        if self._sequential:
            self.retention_rows = _gather(self.retention_rows)
        seconds = sorted(self.seconds.values())
        log_dir = trainer.log_dir  # a collective call under DDP: every rank makes it
        if summary["edits"] == 0 or not trainer.is_global_zero:
            return
        run_info = getattr(pl_module, "run_info", None)
        info = run_info() if callable(run_info) else {}  # a user's own module may not say
        describe = getattr(trainer.datamodule, "describe", None)
        meta = {
            "model_state": model_state,
            "method": info.get("method") or getattr(pl_module, "method_name", type(pl_module).__name__),
            **_picked(info, "protocol"),
            "model": getattr(getattr(pl_module, "lm_config", None), "name_or_path", None)
                     or type(model_and_tokenizer(pl_module, "EditEvaluation")[0]).__name__,
            **({"data": describe()} if callable(describe) else {}),
            "edit_language": self.edit_lang,
            "eval_languages": self.eval_langs,
            **_picked(info, "train_languages"),
            "records": summary["edits"],
            "world_size": trainer.world_size,
            "eval_seconds_per_edit_median_rank0": round(seconds[len(seconds) // 2], 3) if seconds else None,
            "perplexity": {"every_n_edits": self.perplexity.every_n_edits, "texts_per_language": self.perplexity.texts_per_language,
                           "max_tokens": self.perplexity.max_tokens, "sample": self.perplexity.path or "packaged"},
            **({"neighbourhood": {**asdict(self.neighbourhood), "pool_records": len(self._pool)}} if self._pool is not None else {}),
            **_picked(_with_localization(info, trainer), "settings"),
        }
        retention = None
        if self.retention:
            retention = {"every_n_edits": self.retention_every_n_edits,
                         "locality_reference": "the model each edit was made on (taken just before it)",
                         "checkpoints": self.retention}
        out_dir = Path(self.output_dir or log_dir or ".")
        self.written = write_reports(out_dir, summary, self.rows, meta, self.perplexity_rows,
                                     retention, self.retention_rows if retention else None)
        if self.plots:
            doc = {**meta, "results": summary}
            for proto in self.plot_protocols:
                self.written[f"heatmap_{proto}"] = plot_heatmap([(self.edit_lang, doc)], out_dir / f"heatmap_{proto}.png", proto)
        for logger in trainer.loggers:
            logger.log_metrics(_flatten(summary), step=trainer.global_step)
        if self.print_table:
            print(f"\n{model_state} model, edit language {self.edit_lang}, {meta['records']} edits ({legend(self.table_protocols)})")
            print(format_table(summary, self.eval_langs, self.table_protocols))
            if retention:
                print(f"\nretention (sequential protocol): imm = right after each edit, @N = after N edits; "
                      f"edit language {self.edit_lang} and the mean over the other languages")
                print(format_retention_table(summary, self.retention, self.edit_lang, self.table_protocols))
            print("\n".join(f"{name}: {path}" for name, path in self.written.items()))


def _gather(rows: list[dict]) -> list[dict]:
    """Every rank's rows, on every rank (one collective call; a no-op on one process)."""
    return [r for part in _gather_parts(rows) for r in (part or [])]


def _gather_parts(obj):
    """Every rank's ``obj`` in rank order, on every rank (one collective call; ``[obj]`` on one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def _with_localization(info: dict, trainer) -> dict:
    """``info`` with the run's localisation settings under ``settings.localization`` (where a callback
    of the run localises), so that runs differing only there are told apart."""
    loc = next((cb.settings for cb in trainer.callbacks if isinstance(getattr(cb, "settings", None), LocalizationConfig)), None)
    if loc is None:
        return info
    return {**info, "settings": {**info.get("settings", {}), "localization": asdict(loc)}}


def _picked(info: dict, key: str) -> dict:
    """``{key: info[key]}``, or nothing where ``info`` lacks it (results.json leaves the key out)."""
    return {key: info[key]} if key in info else {}


def _view_metrics(summary: dict, edit_lang: str, protocols: tuple[str, ...], prefix: str) -> dict[str, float]:
    """``<prefix>/edit_lang/<measure>/<protocol>`` and ``<prefix>/other_langs/...`` of a summary, for the loggers."""
    out: dict[str, float] = {}
    for scope, block in (("edit_lang", summary.get("language", {}).get(edit_lang, {})),
                         ("other_langs", summary.get("average", {}).get("non_edit_languages", {}))):
        for measure, cell in block.items():
            for proto in protocols:
                if proto in cell:
                    out[f"{prefix}/{scope}/{measure}/{proto}"] = float(cell[proto])
    return out


def _flatten(summary: dict) -> dict[str, float]:
    """``final/<kind>/<key>/<measure>/<protocol>`` numbers for the loggers."""
    out: dict[str, float] = {}
    for kind in ("language", "group", "average"):
        for key, block in summary.get(kind, {}).items():
            for measure, cell in block.items():
                for proto, value in cell.items():
                    out[f"final/{kind}/{key}/{measure}/{proto}"] = float(value)
    for lang, value in summary.get("perplexity_ratio", {}).items():
        out[f"final/perplexity_ratio/{lang}"] = float(value)
    return out

"""Evaluate each edit in every evaluation language, and report at the end."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L

from mke_lightning.callbacks._protocol import check_module, run_languages
from mke_lightning.evaluation import EditEvaluator, build_items, target_group
from mke_lightning.report import ResultAggregator, format_table, write_reports


class EditEvaluation(L.Callback):
    """Reliability, generality, locality and portability of every edit.

    During fit, the pre-edit locality references are taken at batch start and
    the edited model is scored at batch end (before the module restores it).
    During validate/test, the unedited model is scored. At the end, a
    per-language table is printed and ``results.json`` and ``edits.csv`` are
    written to the run's log dir (or ``output_dir``).
    """

    def __init__(self, batch_rows: int = 32, output_dir: str | None = None, print_table: bool = True) -> None:
        """
        Args:
            batch_rows: teacher-forced rows per forward pass.
            output_dir: where to write results (default: the trainer's log dir).
            print_table: print the per-language table at the end.
        """
        self.batch_rows = batch_rows
        self.output_dir = output_dir
        self.print_table = print_table
        self.aggregator = ResultAggregator()
        self.seconds: dict[str, float] = {}
        self.summary: dict | None = None
        self._pending: dict[str, tuple[list, dict]] = {}

    def _setup(self, pl_module) -> EditEvaluator:
        check_module(pl_module, "EditEvaluation")
        self.aggregator = ResultAggregator(pl_module.device)
        self.summary = None
        return EditEvaluator(pl_module.tokenizer, self.batch_rows)

    def _score(self, trainer, pl_module, batch, use_pending: bool = False) -> None:
        edit_lang, eval_langs = run_languages(trainer, pl_module)
        for record in batch:
            start = time.perf_counter()
            if use_pending:
                items, refs = self._pending.pop(record.id)
            else:
                items = build_items(record, eval_langs)
                refs = self.evaluator.references(pl_module.causal_lm, items)
            rows = self.evaluator.score(pl_module.causal_lm, items, refs)
            for row in rows:
                row.update(record_id=record.id, edit_lang=edit_lang, group=target_group(record, edit_lang, row["eval_lang"]))
            self.aggregator.update(rows)
            self.seconds[record.id] = self.seconds.get(record.id, 0.0) + time.perf_counter() - start
            rel = [r["token_acc"] for r in rows if r["measure"] == "reliability" and r["eval_lang"] == edit_lang]
            if rel:
                pl_module.log("eval/reliability", sum(rel) / len(rel), batch_size=1, prog_bar=True, on_step=True)

    # -- fit: score the edited model --------------------------------------
    def on_fit_start(self, trainer, pl_module) -> None:
        self.evaluator = self._setup(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        _, eval_langs = run_languages(trainer, pl_module)
        for record in batch:
            start = time.perf_counter()
            items = build_items(record, eval_langs)
            self._pending[record.id] = (items, self.evaluator.references(pl_module.causal_lm, items))
            self.seconds[record.id] = time.perf_counter() - start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._score(trainer, pl_module, batch, use_pending=True)

    def on_train_end(self, trainer, pl_module) -> None:
        self._finish(trainer, pl_module, "edited")

    # -- validate / test: score the unedited model ---------------------------
    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and trainer.state.fn != "fit":
            self.evaluator = self._setup(pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.state.fn != "fit":
            self._score(trainer, pl_module, batch)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn != "fit":
            self._finish(trainer, pl_module, "unedited")

    def on_test_start(self, trainer, pl_module) -> None:
        self.evaluator = self._setup(pl_module)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._score(trainer, pl_module, batch)

    def on_test_end(self, trainer, pl_module) -> None:
        self._finish(trainer, pl_module, "unedited")

    # -- reporting ------------------------------------------------------------
    def _finish(self, trainer, pl_module, model_state: str) -> None:
        if not self.aggregator.rows:
            return
        edit_lang, eval_langs = run_languages(trainer, pl_module)
        self.summary = self.aggregator.compute()
        out_dir = Path(self.output_dir or trainer.log_dir or ".")
        meta = {
            "model_state": model_state,
            "model": getattr(getattr(pl_module, "lm_config", None), "name_or_path", type(pl_module.causal_lm).__name__),
            "edit_language": edit_lang,
            "eval_languages": eval_langs,
            "records": len({r["record_id"] for r in self.aggregator.rows}),
        }
        if trainer.is_global_zero:
            results, per_edit = write_reports(out_dir, self.summary, self.aggregator.rows, meta)
            if self.print_table:
                print(f"\n{model_state} model, edit language {edit_lang}, {meta['records']} edits "
                      "(tok = token_acc, teacher forced; gen = gen_em, greedy generation)")
                print(format_table(self.summary, eval_langs))
                print(f"results: {results}\nper edit: {per_edit}")

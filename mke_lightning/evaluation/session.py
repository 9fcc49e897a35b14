"""One stage's evaluation (a fit's edits, or the unedited model under validate/test), without Lightning.

:class:`EvalSession` takes the pre-edit references of a record, scores it,
keeps the rows, the seconds per edit and the perplexity rows, feeds the
aggregate (synced across ranks at the end) and, under the ``sequential``
protocol, remembers each edit for the retention passes
(:mod:`mke_lightning.evaluation.retention`). The evaluation callback owns one
per stage and only forwards Lightning's hooks to it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from mke_lightning.evaluation.aggregate import EvalAggregate
from mke_lightning.evaluation.evaluator import MEASURES, EditEvaluator, Item, build_items, target_group
from mke_lightning.evaluation.metrics import PROTOCOLS
from mke_lightning.evaluation.neighbourhood import NeighbourPool
from mke_lightning.evaluation.perplexity import PerplexityProbe, ratios
from mke_lightning.evaluation.retention import Retention
from mke_lightning.modeling.collectives import gather_rows

RUNNING = ("token_acc", "gen_em")  # the protocols of the progress bar's running reliability


def check_choices(measures: tuple[str, ...], protocols: dict[str, tuple[str, ...]], retention_every_n_edits) -> None:
    """Refuse an unknown measure or metric protocol (``protocols``: setting -> chosen), or a bad retention period."""
    unknown = set(measures) - set(MEASURES)
    if unknown:
        raise ValueError(f"EditEvaluation: unknown measures {sorted(unknown)}; choose from {list(MEASURES)}")
    for name, chosen in protocols.items():
        if set(chosen) - set(PROTOCOLS):
            raise ValueError(f"EditEvaluation: {name} {sorted(set(chosen) - set(PROTOCOLS))} unknown; "
                             f"choose from {list(PROTOCOLS)}")
    k = retention_every_n_edits
    if k is not None and (isinstance(k, bool) or k < 1):
        raise ValueError(f"EditEvaluation: retention_every_n_edits must be >= 1 or None, got {k!r}")


@dataclass
class EvalPlan:
    """What a stage evaluates: the languages, the measures and how each edit is scored."""

    evaluator: EditEvaluator
    edit_lang: str
    eval_langs: list[str]
    measures: tuple[str, ...]
    log_protocols: tuple[str, ...]
    perplexity_every: int = 1
    """Perplexity after every N-th edit of the run (by its position in the run)."""
    probe: PerplexityProbe | None = None
    pool: NeighbourPool | None = None
    sequential: bool = False
    """Every edit stays in the model: remember each for the retention passes."""
    positions: dict[str, int] = field(default_factory=dict)
    """Record id -> its position in the run (the DataModule's order), for the perplexity rule."""


class EvalSession:
    """The rows, seconds, perplexity and aggregate of one stage (this rank's)."""

    def __init__(self, plan: EvalPlan, device) -> None:
        self.plan = plan
        # The same states on every rank, whatever languages this rank's records have (see EvalAggregate).
        self.aggregate = EvalAggregate(plan.eval_langs, plan.edit_lang).to(device)
        self.rows: list[dict] = []  # this rank's rows (all ranks' after the end of a stage)
        self.perplexity_rows: list[dict] = []
        self.ppl_pre: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.pending: dict[str, tuple[list[Item], dict]] = {}
        self.running: dict[str, list[float]] = {p: [0.0, 0.0] for p in RUNNING}
        self.retention = Retention(plan.eval_langs, plan.edit_lang) if plan.sequential else None

    def items(self, record) -> list[Item]:
        """The record's items; with the pool, its neighbourhood items too."""
        neighbours = self.plan.pool.prompts(record) if self.plan.pool is not None else None
        return build_items(record, self.plan.eval_langs, self.plan.measures, neighbours)

    def take_references(self, model, record) -> None:
        """The record's items and their pre-edit references, before the edit."""
        start = time.perf_counter()
        items = self.items(record)
        self.pending[record.id] = (items, self.plan.evaluator.references(model, items))
        self.seconds[record.id] = time.perf_counter() - start

    def score(self, model, record, edited: bool) -> tuple[dict[str, float], dict[str, float]]:
        """Score ``record`` on ``model`` (eval mode); the edit's figures for the loggers and the progress bar."""
        start = time.perf_counter()
        plan = self.plan
        if record.id in self.pending:
            items, refs = self.pending.pop(record.id)
        else:
            items = self.items(record)
            refs = plan.evaluator.references(model, items)
        rows = plan.evaluator.score(model, items, refs)
        groups = {lang: target_group(record, plan.edit_lang, lang) for lang in dict.fromkeys(it.lang for it in items)}
        if edited and self.retention is not None:
            self.retention.remember(record.id, items, refs, groups)
        for row in rows:
            row.update(record_id=record.id, edit_lang=plan.edit_lang, group=groups[row["eval_lang"]])
        self.aggregate.update(rows, edits=1)
        self.rows += rows
        metrics = self.edit_metrics(rows)
        if edited and plan.probe is not None and self._perplexity_due(record.id):
            metrics["eval/perplexity_ratio"] = self._perplexity(model, record.id)
        self.seconds[record.id] = self.seconds.get(record.id, 0.0) + time.perf_counter() - start
        return metrics, self.running_reliability(rows)

    def measure_pre_edit_perplexity(self, model) -> None:
        self.ppl_pre = self.plan.probe.measure(model)  # once per run: every edit starts from this model

    def _perplexity(self, model, record_id: str) -> float:
        """Perplexity ratios after this edit, per language; their mean."""
        post = self.plan.probe.measure(model)
        r = ratios(post, self.ppl_pre)
        self.aggregate.update_perplexity(r)
        self.perplexity_rows += [{"record_id": record_id, "lang": l, "ppl_pre": round(self.ppl_pre[l], 4),
                                  "ppl_post": round(post[l], 4), "ratio": round(v, 6)} for l, v in r.items()]
        return sum(r.values()) / len(r)

    def _perplexity_due(self, record_id: str) -> bool:
        position = self.plan.positions.get(record_id)
        if position is None:  # no run order from the DataModule: this rank's order
            position = len(self.plan.positions)
            self.plan.positions[record_id] = position
        return position % self.plan.perplexity_every == 0

    def edit_metrics(self, rows: list[dict]) -> dict[str, float]:
        """This edit's means: edit language and the mean over the other languages, per measure and protocol."""
        out: dict[str, float] = {}
        edit_lang = self.plan.edit_lang
        for scope, keep in (("edit_lang", lambda r: r["eval_lang"] == edit_lang),
                            ("other_langs", lambda r: r["eval_lang"] != edit_lang)):
            for measure in self.plan.measures:
                for proto in self.plan.log_protocols:
                    values = [r[proto] for r in rows if r["measure"] == measure and keep(r) and r[proto] is not None]
                    if values:
                        out[f"eval/{scope}/{measure}/{proto}"] = sum(values) / len(values)
        return out

    def running_reliability(self, rows: list[dict]) -> dict[str, float]:
        """Running mean over this rank's edits of the edit-language reliability (progress bar)."""
        for proto, acc in self.running.items():
            values = [r[proto] for r in rows if r["measure"] == "reliability" and r["eval_lang"] == self.plan.edit_lang]
            if values:
                acc[0] += sum(values) / len(values)
                acc[1] += 1
        return {f"rel_{'tok' if p == 'token_acc' else 'gen'}": a[0] / a[1] for p, a in self.running.items() if a[1]}

    def finish(self) -> dict:
        """The summary over every rank's edits, and every rank's rows here (collective calls: every rank)."""
        summary = self.aggregate.compute()  # the states are summed across ranks
        summary["perplexity_pre"] = {l: round(v, 4) for l, v in self.ppl_pre.items()}
        self.rows = gather_rows(self.rows)
        self.perplexity_rows = gather_rows(self.perplexity_rows)
        if self.retention is not None:
            self.retention.rows = gather_rows(self.retention.rows)
        return summary

    def median_seconds(self) -> float | None:
        """The median evaluation time per edit on this rank."""
        seconds = sorted(self.seconds.values())
        return round(seconds[len(seconds) // 2], 3) if seconds else None

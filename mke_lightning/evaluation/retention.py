"""Retention under the ``sequential`` protocol: what the later edits left of the earlier ones.

Every edit stays in the model, so a later edit can undo an earlier one. Each
edit's items, the locality references taken just before it (the model the
edit was made on: locality then asks "is what that edit left alone still
there?") and its target groups are remembered; a pass scores every edit done
so far on this rank again, on the current model, and adds one checkpoint
(a summary synced across ranks) to :attr:`Retention.checkpoints`. The last
pass's rows are :attr:`Retention.rows`. A pass costs one immediate
evaluation per edit done.
"""

from __future__ import annotations

import time
from dataclasses import asdict

from mke_lightning.evaluation.aggregate import EvalAggregate
from mke_lightning.evaluation.evaluator import EditEvaluator, Item

LOCALITY_REFERENCE = "the model each edit was made on (taken just before it)"


class Retention:
    """The edits done so far on this rank and the retention passes over them."""

    def __init__(self, eval_langs: list[str], edit_lang: str) -> None:
        self.eval_langs, self.edit_lang = eval_langs, edit_lang
        # (record id, items, pre-edit references, target group per language) per edit of this rank, in order
        self.done: list[tuple[str, list[Item], dict, dict[str, str]]] = []
        self.passed = 0  # len(self.done) at the last pass
        self.checkpoints: list[dict] = []  # one per pass, in order (synced: the same on every rank)
        self.rows: list[dict] = []  # the last pass's rows (every rank's after the end of fit)

    def remember(self, record_id: str, items: list[Item], refs: dict, groups: dict[str, str]) -> None:
        self.done.append((record_id, items, refs, groups))

    def crossed(self, every_n_edits: int) -> bool:
        """Whether this rank's edits passed a multiple of ``every_n_edits`` since the last pass."""
        return len(self.done) // every_n_edits > self.passed // every_n_edits

    def pending(self) -> bool:
        """Whether an edit was made since the last pass."""
        return len(self.done) > self.passed

    def run_pass(self, evaluator: EditEvaluator, model, device) -> dict:
        """Score every edit done so far (this rank) on the current model; one checkpoint, synced across ranks.

        Every rank must call it together: the aggregate's sync is a collective call. Returns the checkpoint.
        """
        start = time.perf_counter()
        was_training = model.training
        model.eval()
        rows: list[dict] = []
        try:
            for number, (record_id, items, refs, groups) in enumerate(self.done, 1):
                scored = evaluator.score(model, items, refs)  # batched as the edit's own evaluation
                for row in scored:
                    row.update(record_id=record_id, edit_number=number, edit_lang=self.edit_lang,
                               group=groups[row["eval_lang"]])
                rows += scored
        finally:
            model.train(was_training)
        aggregate = EvalAggregate(self.eval_langs, self.edit_lang).to(device)
        aggregate.update(rows, edits=len(self.done))
        summary = aggregate.compute()  # every rank takes part
        summary.pop("perplexity_ratio", None)  # no perplexity in a retention pass
        seconds = time.perf_counter() - start
        checkpoint = {"edits_done": summary["edits"], "seconds_rank0": round(seconds, 3), "summary": summary}
        self.checkpoints.append(checkpoint)
        self.rows, self.passed = rows, len(self.done)
        return checkpoint

    def block(self, every_n_edits: int | None) -> dict | None:
        """The ``retention`` block of ``results.json`` (``None`` when no pass was made)."""
        if not self.checkpoints:
            return None
        return {"every_n_edits": every_n_edits, "locality_reference": LOCALITY_REFERENCE,
                "checkpoints": self.checkpoints}

    # -- checkpoint and resume ---------------------------------------------------
    def saved(self, own: set[str]) -> dict:
        """This rank's share for a checkpoint (plain lists and dicts)."""
        return {
            "done": [{"record_id": rid, "items": [asdict(it) for it in items], "refs": refs, "groups": groups}
                     for rid, items, refs, groups in self.done],
            "retained": [rid for rid, *_ in self.done[: self.passed]],
            "retention_rows": [r for r in self.rows if r["record_id"] in own],
        }

    def take_back(self, part: dict, keep) -> None:
        """Add the edits of a saved part whose record ``keep(record id)`` accepts."""
        self.rows += [r for r in part["retention_rows"] if keep(r["record_id"])]
        self.done += [(d["record_id"], [Item(**{**it, "answers": tuple(it["answers"])}) for it in d["items"]],
                       dict(d["refs"]), dict(d["groups"])) for d in part["done"] if keep(d["record_id"])]

    def count_passed(self, retained: set[str], checkpoints: list[dict]) -> None:
        """After every part is taken back: the edits the last saved pass covered, and the saved passes."""
        self.passed = sum(rid in retained for rid, *_ in self.done)
        self.checkpoints = list(checkpoints)

"""Means of the evaluation rows, as one torchmetrics state that syncs across ranks.

Every rank must hold the *same* states for a sync: a metric created lazily
per language or group on the rank that first saw it would leave the ranks
with different state lists, and the collective calls of the sync would then
wait on each other forever. So the key set is fixed up front, from the run's
configuration: ``slots`` (each evaluation language, the target groups and two
averages) x ``MEASURES`` x ``PROTOCOLS``. The state is two float64 tensors of
that shape, a sum and a count, reduced by summing; the mean of a slot is
sum / count. Sums of the same numbers in another order can differ in the
last bits, so reported figures are rounded to 4 decimals (float64 leaves
them identical on 1 rank and on R ranks).

Downstream impact sits beside them: per language, the sum and count of the
post-/pre-edit perplexity ratios.

A checkpoint keeps the states summed over the ranks (:meth:`EvalAggregate.saved_states`);
a resumed run adds them to one rank's states (:meth:`EvalAggregate.add_states`),
so the next sync sums the edits before and after the restart. States saved
before the ``neighborhood`` measure existed (one measure fewer) are placed by
measure name.
"""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric

from mke_lightning.evaluation.evaluator import GROUPS, MEASURES
from mke_lightning.evaluation.metrics import PROTOCOLS

AVERAGES = ("all_languages", "non_edit_languages")
# the measure axis of states saved before ``neighborhood`` was added (older checkpoints)
MEASURES_BEFORE_NEIGHBORHOOD = ("reliability", "generality", "locality", "locality_gold", "portability", "multi_hop")
DIGITS = 4  # reported precision: sums over ranks agree to ~1e-15, far below it


class EvalAggregate(Metric):
    """Sums and counts per (slot, measure, protocol) for a fixed language list.

    Args:
        languages: the run's evaluation languages (the same list on every rank).
        edit_language: the language edits are made in (its rows are kept out of ``non_edit_languages``).
    """

    full_state_update = False
    higher_is_better = None

    def __init__(self, languages: list[str], edit_language: str, **kwargs) -> None:
        super().__init__(**kwargs)
        if not languages or len(set(languages)) != len(languages):
            raise ValueError(f"languages must be a non-empty list without repeats, got {languages}")
        self.languages = list(languages)
        self.edit_language = edit_language
        self.slots = [*self.languages, *GROUPS, *AVERAGES]
        self.measures = list(MEASURES)
        self.protocols = list(PROTOCOLS)
        shape = (len(self.slots), len(self.measures), len(self.protocols))
        self.add_state("sums", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")  # [S, M, P]
        self.add_state("counts", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")  # [S, M, P]
        n = len(self.languages)
        self.add_state("ppl_ratio_sums", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")  # [L]
        self.add_state("ppl_ratio_counts", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")  # [L]
        self.add_state("edits", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def _slot(self, name: str, what: str) -> int:
        try:
            return self.slots.index(name)
        except ValueError:
            raise ValueError(f"{what} {name!r} is not among the run's evaluation languages {self.languages}") from None

    def update(self, rows: list[dict], edits: int = 0) -> None:  # type: ignore[override]
        """Add evaluation rows (``eval_lang``, ``group``, ``measure`` and one value per protocol; ``None`` = n/a)."""
        sums = torch.zeros(self.sums.shape, dtype=torch.float64)  # filled on the CPU, added to the state once
        counts = torch.zeros(self.counts.shape, dtype=torch.float64)
        for row in rows:
            m = self.measures.index(row["measure"])
            slots = [
                self._slot(row["eval_lang"], "language"),
                self.slots.index(row["group"]),
                self._slot("all_languages", ""),
            ]
            if row["eval_lang"] != self.edit_language:
                slots.append(self.slots.index("non_edit_languages"))
            for p, proto in enumerate(self.protocols):
                value = row.get(proto)
                if value is None or (isinstance(value, float) and math.isnan(value)):
                    continue
                for s in slots:
                    sums[s, m, p] += float(value)
                    counts[s, m, p] += 1
        self.sums += sums.to(self.sums.device)
        self.counts += counts.to(self.counts.device)
        self.edits += edits

    def update_perplexity(self, ratios: dict[str, float]) -> None:
        """Add one edit's post-/pre-edit perplexity ratio per language."""
        for lang, ratio in ratios.items():
            i = self._slot(lang, "perplexity language")
            self.ppl_ratio_sums[i] += ratio
            self.ppl_ratio_counts[i] += 1

    def saved_states(self) -> dict[str, torch.Tensor]:
        """Every state summed over the ranks, on the CPU (a collective call under several ranks; the local
        states are left as they were)."""
        with self.sync_context():
            return {name: value.detach().cpu().clone() for name, value in self.metric_state.items()}

    def add_states(self, states: dict[str, torch.Tensor], measures: list[str] | None = None) -> None:
        """Add states from :meth:`saved_states` (of a run with the same languages) to this rank's.

        ``measures`` names the saved measure axis (default: this version's ``MEASURES``, or, for a
        checkpoint with one measure fewer, the measures before ``neighborhood``)."""
        own = self.metric_state
        states = dict(states)
        width = len(self.measures)
        if measures is None and states.get("sums") is not None and states["sums"].dim() == 3 \
                and states["sums"].shape[1] == len(MEASURES_BEFORE_NEIGHBORHOOD) != width:
            measures = list(MEASURES_BEFORE_NEIGHBORHOOD)
        if measures is not None and list(measures) != self.measures:
            unknown = set(measures) - set(self.measures)
            if unknown:
                raise ValueError(f"saved evaluation states hold measures {sorted(unknown)} this version does not know")
            where = torch.tensor([self.measures.index(m) for m in measures])
            for name in ("sums", "counts"):  # [S, M_saved, P] -> [S, M, P], zeros for the measures it lacks
                if name in states and states[name].dim() == 3 and states[name].shape[1] == len(measures):
                    full = torch.zeros(states[name].shape[0], width, states[name].shape[2], dtype=states[name].dtype)
                    full[:, where] = states[name]
                    states[name] = full
        if set(states) != set(own) or any(states[k].shape != own[k].shape for k in own):
            raise ValueError(
                f"saved evaluation states {sorted(states)} do not fit this run's ({len(self.languages)} languages)"
            )
        for name, value in own.items():
            value += states[name].to(device=value.device, dtype=value.dtype)
        self._update_count += 1  # counts as an update: torchmetrics warns on compute() before any
        self._computed = None

    def compute(self) -> dict:  # type: ignore[override]
        """``{"language": {lang: {measure: {protocol: mean}}}, "group": ..., "average": ...,
        "counts": {lang: {measure: n}}, "perplexity_ratio": {lang: mean}, "edits": n}``."""
        means = self.sums / self.counts.clamp(min=1)  # [S, M, P]
        out: dict = {"language": {}, "group": {}, "average": {}, "counts": {}}
        kinds = {
            **{s: "language" for s in self.languages},
            **{g: "group" for g in GROUPS},
            **{a: "average" for a in AVERAGES},
        }
        for s, slot in enumerate(self.slots):
            block = {}
            for m, measure in enumerate(self.measures):
                cell = {
                    proto: round(float(means[s, m, p]), DIGITS)
                    for p, proto in enumerate(self.protocols)
                    if self.counts[s, m, p] > 0
                }
                if cell:
                    block[measure] = cell
            if block:
                out[kinds[slot]][slot] = block
            if kinds[slot] == "language":
                n = {
                    measure: int(self.counts[s, m].max())
                    for m, measure in enumerate(self.measures)
                    if self.counts[s, m].max() > 0
                }
                if n:
                    out["counts"][slot] = n
        ratio = self.ppl_ratio_sums / self.ppl_ratio_counts.clamp(min=1)
        out["perplexity_ratio"] = {
            lang: round(float(ratio[i]), DIGITS)
            for i, lang in enumerate(self.languages)
            if self.ppl_ratio_counts[i] > 0
        }
        out["edits"] = int(self.edits)
        return out

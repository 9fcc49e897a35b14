"""A fit's evaluation in a checkpoint, and taking it back on resume (``--ckpt_path last``).

The checkpoint holds, per rank, the edits' record ids (in the order made),
rows, perplexity rows, seconds, run positions, the pre-edit perplexity and,
under the sequential protocol, the retention items and references
(:func:`saved_part`, gathered rank by rank); and the aggregate's states
summed over the ranks. A resumed fit gives each rank the rows of the records
it holds now and adds the saved states to rank 0's (:func:`take_back`), so its
files are those of a run never stopped. Plain lists, dicts and tensors: the
file loads with ``weights_only``.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Callable

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from mke_lightning.evaluation.neighbourhood import NeighbourhoodConfig
from mke_lightning.evaluation.session import EvalSession
from mke_lightning.modeling.collectives import gather_all


def settings_of(edit_lang: str, eval_langs: list[str], measures: tuple[str, ...], ppl_langs: list[str],
                sequential: bool, neighbourhood: NeighbourhoodConfig) -> dict:
    """What the saved figures depend on: a resumed run must have the same."""
    out = {"edit_language": edit_lang, "eval_languages": list(eval_langs), "measures": list(measures),
           "perplexity_languages": list(ppl_langs), "sequential": sequential}
    if "neighborhood" in measures:
        out["neighbourhood"] = asdict(neighbourhood)
    return out


def resumable_measures(saved: dict, measures: tuple[str, ...]) -> tuple[str, ...]:
    """The measures a resumed fit goes on with: without ``neighborhood`` when the checkpoint has none."""
    if "neighborhood" in measures and "neighborhood" not in saved.get("measures", []):
        # a checkpoint from before the measure (or from a run without it): its edits have no neighbourhood
        # figures, so this fit goes on without the measure rather than report it for part of the edits
        rank_zero_warn("EditEvaluation: the checkpoint's evaluation has no neighborhood measure; the resumed "
                       "run goes on without it (start afresh for neighbourhood figures)")
        return tuple(m for m in measures if m != "neighborhood")
    return measures


def check_same_settings(saved: dict, now: dict) -> None:
    changed = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
    if changed:
        raise ValueError("EditEvaluation: the checkpoint's evaluation was made with other settings ("
                         + "; ".join(f"{k}: {a} then, {b} now" for k, (a, b) in changed.items())
                         + "); resume with the same ones, or start afresh without --ckpt_path")


def saved_state(session: EvalSession, settings: dict) -> dict:
    """The fit's evaluation so far, for a checkpoint: every rank's part (a collective call)."""
    retention = session.retention
    return {
        "settings": settings,
        "ranks": gather_all(saved_part(session)),
        "aggregate": session.aggregate.saved_states(),
        "aggregate_measures": list(session.aggregate.measures),  # the states' measure axis
        "retention": retention.checkpoints if retention is not None else [],  # synced: the same on every rank
    }


def saved_part(session: EvalSession) -> dict:
    """This rank's part of the evaluation (its edits only: after the end of fit the rows are every rank's)."""
    mine = [rid for rid in session.seconds if rid not in session.pending]
    own = set(mine)
    positions = session.plan.positions
    part = {
        "records": mine,
        "rows": [r for r in session.rows if r["record_id"] in own],
        "perplexity_rows": [r for r in session.perplexity_rows if r["record_id"] in own],
        "seconds": {rid: session.seconds[rid] for rid in mine},
        "positions": {rid: positions[rid] for rid in mine if rid in positions},
        "ppl_pre": dict(session.ppl_pre),
        "done": [], "retained": [], "retention_rows": [],
    }
    if session.retention is not None:
        part.update(session.retention.saved(own))
    return part


def pre_edit_perplexity(state: dict, rank: int) -> dict[str, float]:
    """The saved pre-edit perplexity (the model may hold re-applied edits by now: the saved one is the pre-edit one)."""
    parts = [part["ppl_pre"] for part in state["ranks"]]
    return dict(parts[rank] if rank < len(parts) else parts[0])


def take_back(session: EvalSession, state: dict, own: set[str] | None, rank: int,
              resumed: set[str]) -> None:
    """Take back this rank's share of a checkpoint's evaluation: the edits of the records in ``own`` (``None``:
    every edit). Every rank's part is read, so a run resumed on other ranks splits the edits as its data does."""
    keep: Callable[[str], bool] = lambda rid: own is None or rid in own  # noqa: E731 - a one-line filter
    saved_ids: set[str] = set()
    retained: set[str] = set()
    for part in state["ranks"]:
        saved_ids.update(part["records"])
        retained.update(part["retained"])
        mine = [rid for rid in part["records"] if keep(rid)]
        session.seconds.update({rid: part["seconds"][rid] for rid in mine})
        session.plan.positions.update({rid: p for rid, p in part["positions"].items() if keep(rid)})
        session.rows += [r for r in part["rows"] if keep(r["record_id"])]
        session.perplexity_rows += [r for r in part["perplexity_rows"] if keep(r["record_id"])]
        if session.retention is not None:
            session.retention.take_back(part, keep)
    by_record: dict[str, list[dict]] = {}
    for row in session.rows:
        by_record.setdefault(row["record_id"], []).append(row)
    for rid in session.seconds:  # the progress bar's running reliability, edit by edit as it was
        session.running_reliability(by_record.get(rid, []))
    if session.retention is not None:
        session.retention.count_passed(retained, state["retention"])
    if rank == 0:  # the sum over the ranks, once: the final sync adds the other ranks' new edits
        session.aggregate.add_states(state["aggregate"], state.get("aggregate_measures"))
    rank_zero_info(f"evaluation of {len(saved_ids)} edits restored from the checkpoint")
    if resumed and resumed != saved_ids:
        rank_zero_warn(f"EditEvaluation: the checkpoint's evaluation covers {len(saved_ids)} edits, its edit log "
                       f"{len(resumed)}; the results cover the evaluated ones")

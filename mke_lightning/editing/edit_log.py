"""The edit log: one outcome per edit, shown as the run goes, kept in checkpoints, written at the end of fit.

``edit_log.jsonl`` (``edit_log.rank<R>.jsonl`` on several ranks) holds one
JSON line per edit of the rank: record id, steps, final loss, P(new target),
neurons trained, seconds, and why the edit was rolled back (``failed``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from mke_lightning.modeling.collectives import gather_object

log = logging.getLogger(__name__)


@dataclass
class EditOutcome:
    record_id: str
    steps: int
    loss: float
    p_new: float
    neurons: int
    seconds: float
    failed: str | None = None
    """Why the edit was rolled back (a non-finite loss or update); ``None`` when it was applied."""


def step_metrics(outcomes: list[EditOutcome]) -> dict[str, float]:
    """One training step's figures for the loggers (the step's edits were made together)."""
    first = outcomes[0]
    return {"edit/steps": float(first.steps), "edit/p_new": min(o.p_new for o in outcomes),
            "edit/neurons": float(sum(o.neurons for o in outcomes)), "edit/seconds": first.seconds,
            "edit/failed": float(first.failed is not None)}


def step_line(number: int, outcomes: list[EditOutcome]) -> str:
    """``edit N (ids): steps, P(new), neurons, seconds[, rolled back: why]`` for the console."""
    first = outcomes[0]
    failed = f", rolled back: {first.failed}" if first.failed else ""
    return (f"edit {number} ({', '.join(o.record_id for o in outcomes)}): {first.steps} steps, "
            f"P(new) {min(o.p_new for o in outcomes):.3f}, {sum(o.neurons for o in outcomes)} neurons, "
            f"{first.seconds:.1f} s{failed}")


def every_rank_log(outcomes: list[EditOutcome], world_size: int) -> list[dict]:
    """Every edit done so far on every rank, once each (a collective call when several ranks run)."""
    mine = [asdict(o) for o in outcomes]
    if world_size > 1:
        mine = [d for part in gather_object(mine, world_size) for d in part]
    seen: dict[str, dict] = {}
    for d in mine:
        seen.setdefault(d["record_id"], d)
    return list(seen.values())


def write_edit_log(outcomes: list[EditOutcome], log_dir: str | None, world_size: int, rank: int) -> Path | None:
    """Warn about the rolled-back edits, then write ``outcomes`` (this rank's) as JSON lines into ``log_dir``."""
    failed = [o for o in outcomes if o.failed]
    if failed:
        log.warning("%d of %d edits rolled back: %s", len(failed), len(outcomes),
                    "; ".join(f"{o.record_id}: {o.failed}" for o in failed))
    if not log_dir:
        return None
    name = "edit_log.jsonl" if world_size == 1 else f"edit_log.rank{rank}.jsonl"
    path = Path(log_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(asdict(o)) + "\n" for o in outcomes), encoding="utf-8")
    return path

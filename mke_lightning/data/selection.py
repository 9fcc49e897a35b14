"""Which records a run uses, and which of them each rank edits.

Both steps work on record numbers (positions in a :class:`RecordSource`), so
nothing is read but the few records named in errors.

1. :func:`select_records`: ``ids`` (file order kept), then ``offset`` and ``limit``.
2. :func:`shard`: order the selection (file order, or shuffled by ``seed``)
   and deal it to ``world_size`` ranks in turn. Every record lands on exactly
   one rank; shard sizes differ by at most one unit when the count is not a
   multiple of the ranks. Records from one item (the edits of an MQuAKE case)
   form one unit and stay together.
"""

from __future__ import annotations

import numpy as np

from mke_lightning.data.records import RecordError
from mke_lightning.data.source import RecordSource, id_hash


def select_records(
    source: RecordSource, ids: list[str] | None = None, offset: int = 0, limit: int | None = None
) -> np.ndarray:
    """Record numbers of the run, in file order (int64 array)."""
    positions = np.arange(len(source), dtype=np.int64)
    if ids is not None:
        positions = _with_ids(source, list(dict.fromkeys(ids)))
    end = None if limit is None else offset + limit
    return positions[offset:end]


def _with_ids(source: RecordSource, ids: list[str]) -> np.ndarray:
    wanted = set(ids)
    hashes = np.array([id_hash(rid) for rid in ids], dtype=np.int64)
    # Hashes narrow the search; the ids of the candidates are then read to confirm.
    candidates = np.flatnonzero(np.isin(source.id_hashes, hashes))
    found = [k for k in candidates.tolist() if source[k].id in wanted]
    missing = wanted - {source[k].id for k in found}
    if missing:
        shown = [rid for rid in ids if rid in missing]
        more = f" and {len(shown) - 10} more" if len(shown) > 10 else ""
        raise RecordError(
            f"{len(missing)} of the requested ids are not in the data: {shown[:10]}{more}", source=source.parser.name
        )
    return np.array(found, dtype=np.int64)


def shard(
    positions: np.ndarray, groups: np.ndarray, rank: int = 0, world_size: int = 1, seed: int | None = None
) -> np.ndarray:
    """The record numbers rank ``rank`` of ``world_size`` edits, in its order.

    Args:
        positions: the selection (from :func:`select_records`).
        groups: for each position, a key; neighbours with equal keys are one
            unit (the raw item index: an MQuAKE case's edits share it).
        seed: ``None`` keeps file order; an integer shuffles the units with
            NumPy's PCG64 generator (the same order on every rank).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    n = len(positions)
    if n == 0:
        return positions
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])  # [units]
    order = np.arange(len(starts)) if seed is None else np.random.default_rng(seed).permutation(len(starts))
    mine = order[rank::world_size]  # units dealt in turn: rank r gets units r, r+R, r+2R ...
    if len(starts) == n:  # every unit one record: no regrouping needed
        return positions[mine]
    ends = np.r_[starts[1:], n]
    if not len(mine):
        return positions[:0]
    return np.concatenate([positions[starts[u]:ends[u]] for u in mine.tolist()])

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
from mke_lightning.data.source import MAX_REASONS, RecordSource, id_hash


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


def keep_complete(data: RecordSource, selected: np.ndarray, required: list[str], edit_language: str, on_error: str,
                  reasons: list[str]) -> np.ndarray:
    """The selected records that have every ``required`` language. ``on_error: raise``: a record lacking one
    is refused, naming it; ``skip``: it is left out and its reason added to ``reasons`` (up to MAX_REASONS)."""
    complete = np.array([all(lang in sig for lang in required) for sig in data.signatures], dtype=bool)
    lacking = selected[~complete[data.signature_indices[selected]]]
    for k in lacking.tolist()[: 1 if on_error == "raise" else MAX_REASONS]:
        record = data[k]
        missing = [lang for lang in required if lang not in record.languages]
        err = RecordError(
            f"language {missing[0]!r} is missing (record has {sorted(record.languages)}; "
            f"edit_language={edit_language!r}, eval_languages={required})",
            source=data.source_of(k), index=data.raw_index(k), record_id=record.id, field=f"languages.{missing[0]}",
        )
        if on_error == "raise":
            raise err
        if len(reasons) < MAX_REASONS:
            reasons.append(str(err))
    if not len(lacking):
        return selected
    return selected[complete[data.signature_indices[selected]]]


def run_languages(data: RecordSource, selected: np.ndarray, edit_language: str,
                  requested: list[str] | None) -> list[str]:
    """The run's evaluation languages, the edit language first: ``requested``, or (``None``) the languages every
    selected record has, in the first record's order."""
    if requested is None:
        used = [data.signatures[s] for s in np.unique(data.signature_indices[selected]).tolist()]
        first = data.signatures[int(data.signature_indices[selected[0]])]
        shared = [lang for lang in first if all(lang in sig for sig in used)]
    else:
        shared = list(dict.fromkeys(requested))
    return [edit_language, *(lang for lang in shared if lang != edit_language)]


def select_run(data: RecordSource, ids: list[str] | None, offset: int, limit: int | None, required: list[str],
               edit_language: str, on_error: str, where: str) -> tuple[np.ndarray, int, list[str]]:
    """The run's records (:func:`select_records`, then those with every ``required`` language), how many were
    left out for a missing language, and the reasons of the bad records left out so far (``on_error: skip``).
    :class:`RecordError` naming ``where`` when no record is selected, or none is left."""
    selected = select_records(data, ids, offset, limit)
    if not len(selected):
        raise RecordError(
            f"no records selected: the data has {len(data)}, offset={offset}, limit={limit}"
            + ("" if ids is None else f", {len(ids)} ids"),
            source=where,
        )
    reasons = list(data.skip_reasons)  # after the selection: reading it may have skipped bad records
    kept = keep_complete(data, selected, required, edit_language, on_error, reasons)
    if not len(kept):
        raise RecordError(
            f"no records left: all {len(selected)} selected records lack one of {required} (on_error: skip)",
            source=where,
        )
    return kept, len(selected) - len(kept), reasons


def shard_run(data: RecordSource, selected: np.ndarray, rank: int, world_size: int, seed: int | None,
              where: str) -> np.ndarray:
    """This rank's share of the run (:func:`shard`); :class:`RecordError` when a rank would get nothing."""
    groups = data.raw_indices[selected]
    units = int(np.count_nonzero(np.r_[True, groups[1:] != groups[:-1]]))
    if units < world_size:
        raise RecordError(
            f"{len(selected)} selected records ({units} units) cannot give each of {world_size} ranks "
            "at least one; select more records or run on fewer devices",
            source=where,
        )
    return shard(selected, groups, rank, world_size, seed)

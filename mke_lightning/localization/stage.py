"""Localisation as a stage of its own: every record of a run, split across
ranks, cached on disk, resumable, gathered so that every rank holds all masks.

Used by the :class:`~mke_lightning.callbacks.NeuronLocalization` callback
(before fit) and by ``mke localize``; callable directly as a library.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from mke_lightning.data.records import EditRecord
from mke_lightning.localization.background import drop_busy, usual_activity
from mke_lightning.localization.cache import MaskCache
from mke_lightning.localization.locate import LocalizationConfig, locate
from mke_lightning.localization.neurons import NeuronMask
from mke_lightning.modeling.architectures import ArchSpec
from mke_lightning.modeling.collectives import gather_object, rank_and_world

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    """What one rank did, and every rank's masks after the gather."""

    masks: dict[str, NeuronMask]
    """Record id -> mask, for every record of the run (all ranks)."""
    computed: list[str] = field(default_factory=list)
    """Records this rank localised (neither known nor in the cache)."""
    reused: list[str] = field(default_factory=list)
    """Records this rank read from the cache."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Localisation seconds per computed record (this rank)."""


def assign(ids_per_rank: list[list[str]]) -> dict[str, int]:
    """Which rank localises each record: ``id -> rank``.

    Works whether every rank sees the whole list (as a plain DataModule
    gives) or only its own share (as a DataModule that shards by rank gives):
    the record at position ``i`` of the union of all lists goes to the
    ``i``-th of the ranks that hold it, in turn. For identical lists that is
    rank ``i mod world``; for disjoint shards, the rank that holds it.
    """
    holders: dict[str, list[int]] = {}
    for rank, ids in enumerate(ids_per_rank):
        for rid in dict.fromkeys(ids):
            holders.setdefault(rid, []).append(rank)
    return {rid: ranks[i % len(ranks)] for i, (rid, ranks) in enumerate(holders.items())}


def localize_records(
    model,
    tokenizer,
    arch: ArchSpec,
    records: list[EditRecord],
    edit_language: str,
    cfg: LocalizationConfig,
    *,
    cache: MaskCache | None = None,
    known: dict[str, NeuronMask] | None = None,
    report: Callable[[str], None] = log.info,
) -> StageResult:
    """Masks for the records of every rank; each record is computed by one rank.

    ``records`` are the records this rank sees (all of them, or its shard).
    ``known`` masks (e.g. already on the module) are kept as they are. With a
    ``cache``, a record whose file matches is read instead of computed, and
    every computed mask is written at once: a run killed half-way and started
    again recomputes only the records that had no file yet. Afterwards every
    rank holds the masks of every rank's records.
    """
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"record ids must be unique for localisation; repeated: {dupes[:5]}")
    rank, world = rank_and_world()
    owner = assign(gather_object(ids, world))
    mine = [r for r in records if owner[r.id] == rank]
    result = _locate_own(model, tokenizer, arch, mine, edit_language, cfg, cache, dict(known or {}), report, rank)
    result.masks = _gather_masks(result.masks, list(owner), world)
    if cfg.background is not None:  # the same on every rank: same model, same prompts
        result.masks, busy = drop_busy(model, tokenizer, arch, result.masks, cfg.background)
        dropped = sum(m.metadata["background_dropped"] for m in result.masks.values())
        report(
            f"  busy neurons (mean |activation| > {cfg.background.max_ratio:g} x layer median on unrelated prompts): "
            f"{sum(len(v) for v in busy.values())} in {len(busy)} layers; "
            f"{dropped} dropped from {len(result.masks)} masks"
        )
    if world > 1:
        report(
            f"  [rank {rank}] holds the masks of {len(result.masks)} records "
            f"({len(result.computed)} computed, {len(result.reused)} from the cache here)"
        )
    return result


def _locate_own(model, tokenizer, arch: ArchSpec, mine: list[EditRecord], edit_language: str, cfg: LocalizationConfig,
                cache: MaskCache | None, known: dict[str, NeuronMask], report: Callable[[str], None],
                rank: int) -> StageResult:
    """The masks of the records this rank owns: known, read from the cache, or located (and cached at once)."""
    result = StageResult(masks={})
    usual = None  # relative_to_background: measured once, when the first record needs it
    for i, record in enumerate(mine, start=1):
        mask = known.get(record.id)
        if mask is None and cache is not None:
            mask = cache.load(record)
            if mask is not None:
                result.reused.append(record.id)
        if mask is None:
            if cfg.relative_to_background and usual is None:
                usual = usual_activity(model, tokenizer, arch, cfg.background)
            start = time.perf_counter()
            mask = locate(model, tokenizer, arch, record, edit_language, cfg, usual)
            result.seconds[record.id] = time.perf_counter() - start
            result.computed.append(record.id)
            if cache is not None:
                cache.save(record, mask)
            report(
                f"  [rank {rank}] {i}/{len(mine)} {record.id}: {mask.count('independent')} language-independent, "
                f"{mask.count('specific')} language-specific neurons ({result.seconds[record.id]:.1f}s)"
            )
        result.masks[record.id] = mask
    return result


def _gather_masks(own: dict[str, NeuronMask], order: list[str], world: int) -> dict[str, NeuronMask]:
    """Every rank's masks, in the run's record order, on every rank (this rank's own objects, metadata intact)."""
    parts = gather_object({rid: m.to_dict() for rid, m in own.items()}, world)
    gathered = {rid: NeuronMask.from_dict(d) for part in parts for rid, d in part.items()}
    gathered.update(own)
    missing = [i for i in order if i not in gathered]
    if missing:
        raise RuntimeError(f"localisation lost records {missing[:5]} in the gather across {world} ranks")
    return {i: gathered[i] for i in order}

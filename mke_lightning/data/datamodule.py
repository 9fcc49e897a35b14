"""A LightningDataModule that serves edit records (no tensors) to an editing run.

Tokenisation belongs to the model side: every dataloader yields plain lists of
:class:`EditRecord`, ``batch_size`` of them at a time. Records are read from
disk as they are served; under DDP each rank gets its own share (its shard),
taken from the trainer's ``global_rank`` and ``world_size``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Iterator

import lightning as L
import numpy as np
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mke_lightning.data import formats
from mke_lightning.data.context import check_module_masks, check_run_context, reader_of
from mke_lightning.data.jsonl import JsonlParser, demo_path
from mke_lightning.data.records import EditRecord, RecordError, is_language_code
from mke_lightning.data.selection import run_languages, select_run, shard, shard_run
from mke_lightning.data.source import ON_ERROR, RecordSource, skip_summary
from mke_lightning.reporting.run_settings import run_settings

FORMAT_CHOICES = ("demo", "auto", *formats.FORMATS)  # what `format` accepts: the adapters and two more


class EditBatch:
    """The records of one batch, in order (indexable, iterable, sized).

    A plain container, neither a list nor a dataclass, so that Lightning's
    precision plugins, which walk a batch to cast its floating-point tensors,
    pass the text records through untouched.
    """

    def __init__(self, records) -> None:
        self.records: list[EditRecord] = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]

    def __iter__(self):
        return iter(self.records)

    def __repr__(self) -> str:
        return f"EditBatch({[r.id for r in self.records]})"


def collate_records(batch: list[EditRecord | None]) -> EditBatch:
    """A batch of records, padding left out (module level, so it pickles)."""
    return EditBatch(r for r in batch if r is not None)


class RecordList(Sequence[EditRecord]):
    """Some records of a :class:`RecordSource`, read from disk on access."""

    def __init__(self, source: RecordSource, positions: np.ndarray) -> None:
        self.source = source
        self.positions = positions  # [n] record numbers in the source, in serving order

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self.source[int(k)] for k in self.positions[i]]
        return self.source[int(self.positions[i])]

    def __iter__(self) -> Iterator[EditRecord]:
        for k in self.positions.tolist():
            yield self.source[k]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str) or len(other) != len(self):
            return False
        return all(a == b for a, b in zip(self, other))

    def __repr__(self) -> str:
        return f"RecordList({len(self)} records from {self.source.parser.name!r})"

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self]


class _ShardDataset(IterableDataset):
    """This rank's records in order, then ``None`` up to ``length``; DataLoader workers split them in turn.

    Every rank is given the same ``length`` (the largest share), so every rank
    runs the same number of steps: Lightning's loop meets the other ranks in
    collective calls each step, and a rank that ran out of batches would leave
    them waiting. The padding collates into empty batches, which the editor
    and the callbacks pass over.
    """

    def __init__(self, records, length: int | None = None, reported: int | None = None) -> None:
        self.records = records
        self.length = len(records) if length is None else length
        self.reported = self.length if reported is None else reported  # what ``len`` says (see resume_after)

    def __len__(self) -> int:
        return self.reported

    def __iter__(self) -> Iterator[EditRecord | None]:
        info = get_worker_info()
        step, first = (1, 0) if info is None else (info.num_workers, info.id)
        for i in range(first, self.length, step):
            yield self.records[i] if i < len(self.records) else None


class EditDataModule(L.LightningDataModule):
    """Edit records for one run: which data, which records, which languages.

    Args:
        path: the data file, or the folder for MzsRE (pair files) and MLaKE;
            ignored for ``format="demo"``.
        format: ``"demo"`` (the packaged demo edits), ``"auto"`` (detected
            from the data) or one of ``jsonl``, ``mzsre``, ``bizsre``, ``mkeb``,
            ``mlake``, ``mquake``, ``zsre`` (docs/data.md).
        edit_language: ISO 639-1 code of the language the edit is made in.
        eval_languages: languages to evaluate in; the edit language is always
            included and comes first. ``None``: every language all selected
            records share.
        limit: how many records to use (``None``: all from ``offset`` on).
        offset: index of the first record to use (after ``ids``).
        batch_size: records per batch.
        ids: use only the records with these ids (kept in file order).
        seed: ``None`` serves records in file order; an integer shuffles them
            (the same order on every rank) before they are dealt to ranks.
        on_error: ``"raise"`` stops at the first bad record; ``"skip"`` leaves
            bad records out, counts them (:attr:`skipped`) and reports the
            count when setting up and at the end of the run.
    """

    def __init__(
        self,
        path: str | None = None,
        format: str = "demo",
        edit_language: str = "en",
        eval_languages: list[str] | None = None,
        limit: int | None = None,
        offset: int = 0,
        batch_size: int = 1,
        ids: list[str] | None = None,
        seed: int | None = None,
        on_error: str = "raise",
    ) -> None:
        super().__init__()
        _check_arguments(path, format, edit_language, eval_languages, limit, offset, batch_size, ids, seed, on_error)
        self.save_hyperparameters()
        self.path = path
        self.format = format
        self.edit_language = edit_language
        self.limit = limit
        self.offset = offset
        self.batch_size = batch_size
        self.ids = None if ids is None else list(ids)
        self.seed = seed
        self.on_error = on_error
        self._requested_eval = None if eval_languages is None else list(eval_languages)
        self._data: RecordSource | None = None
        self._selected: np.ndarray | None = None  # [n] record numbers of the run, all ranks
        self._eval_languages: list[str] | None = None
        self._shard_key: tuple[int, int] | None = None
        self._records: RecordList | None = None
        self._resume: tuple[set[str], int] = (set(), 0)  # records edited before a restart, batches done
        self.skipped = 0
        self.skip_reasons: list[str] = []
        self._module = None  # the LightningModule whose model reads the records (connect(), else the trainer's)
        self._context_checked: int | None = None  # id() of the model the records were last checked against

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_module"], state["_context_checked"] = None, None  # never pickle the model along with the data
        return state

    def connect(self, module) -> None:
        """Name the LightningModule whose model will read the records (its ``causal_lm`` or
        ``get_causal_lm()`` and ``tokenizer``), for runs without a Trainer attached to this
        DataModule (``mke localize``). Under ``trainer.fit`` the trainer's module is used."""
        self._module = module

    # ------------------------------------------------------------------ loading

    def _source_name(self) -> str:
        return "<demo>" if self.format == "demo" else str(self.path)

    def _open(self) -> RecordSource:
        if self.format == "demo":
            return RecordSource(JsonlParser(demo_path()), on_error=self.on_error)
        languages = None
        if self._requested_eval is not None:  # read only the files these need
            languages = list(dict.fromkeys([self.edit_language, *self._requested_eval]))
        return formats.open_source(self.path, self.format, languages, self.on_error)

    def _load(self) -> None:
        if self._data is None:
            data = self._open()
            required = list(dict.fromkeys([self.edit_language, *(self._requested_eval or [])]))
            selected, lacking, self.skip_reasons = select_run(data, self.ids, self.offset, self.limit, required,
                                                              self.edit_language, self.on_error, self._source_name())
            self.skipped = data.skipped + lacking
            self._eval_languages = run_languages(data, selected, self.edit_language, self._requested_eval)
            self._data, self._selected = data, selected
            self._report_at_setup()
        rank, world_size = self._rank()
        if self._records is None or self._shard_key != (rank, world_size):
            assert self._data is not None and self._selected is not None
            share = shard_run(self._data, self._selected, rank, world_size, self.seed, self._source_name())
            self._records = RecordList(self._data, share)
            self._shard_key = (rank, world_size)

    def _rank(self) -> tuple[int, int]:
        """(global rank, world size) from the trainer; (0, 1) without one."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def _report_at_setup(self) -> None:
        if self.skipped:
            rank_zero_warn(skip_summary(self.skipped, self.skip_reasons, self._source_name()))
        unlinked = (self.notes.get("multi_hop_unlinked") or {}) if self._data is not None else {}
        if any(unlinked.values()):
            rank_zero_warn(f"{sum(unlinked.values())} multi-hop questions link to no edit and are not used: {unlinked}")

    # -------------------------------------------------------------- lifecycle

    def prepare_data(self) -> None:
        """Nothing to download: data is read from local files in :meth:`setup`."""

    def setup(self, stage: str | None = None) -> None:
        """Check the data and pick this rank's records (the data is read once); the run's settings
        get the data's description (``results.json``'s ``data``, taken when the results are written)."""
        self._load()
        run_settings(self.trainer).add("data", self.describe)

    def teardown(self, stage: str | None = None) -> None:
        """At the end of a run, report the skipped records again."""
        if self.skipped:
            summary = skip_summary(self.skipped, self.skip_reasons, self._source_name())
            rank_zero_warn(f"end of {stage or 'run'}: {summary}")

    @property
    def records(self) -> RecordList:
        """This rank's records, read on access (loads the data on first use; once the model is
        built, checks that every prompt of the run fits in its context)."""
        self._load()
        self._check_context()
        assert self._records is not None
        return self._records

    @property
    def all_records(self) -> RecordList:
        """The records of the run over all ranks, in serving order (seeded when ``seed`` is set)."""
        self._load()
        self._check_context()
        assert self._data is not None and self._selected is not None
        groups = self._data.raw_indices[self._selected]
        return RecordList(self._data, shard(self._selected, groups, 0, 1, self.seed))

    @property
    def eval_languages(self) -> list[str]:
        """Languages to evaluate in, edit language first (loads the data on first use)."""
        self._load()
        assert self._eval_languages is not None
        return list(self._eval_languages)

    @property
    def num_selected(self) -> int:
        """Records of the run over all ranks (this rank has ``len(records)``)."""
        self._load()
        assert self._selected is not None
        return len(self._selected)

    @property
    def notes(self) -> dict[str, Any]:
        """Counts the adapter reports (MLaKE: linked and unlinked multi-hop questions)."""
        return {} if self._data is None else self._data.notes()

    def describe(self) -> dict[str, Any]:
        """Which data the run used and how its records were picked (``results.json``'s ``data``; loads the data).

        ``format`` is the one read (detected, for ``"auto"``); ``files`` the files read
        side by side (MzsRE: one pair file per language); ``selection`` the settings that
        pick the records (``seed``: ``None`` = file order, else the shuffle's seed);
        ``records_selected`` counts them over all ranks, after records lacking a needed
        language were left out; ``skipped``: bad records left out (``on_error: skip``).
        """
        return describe_data(self)

    # ------------------------------------------------- checks against the model

    def _check_context(self) -> None:
        """Refuse the run when a prompt (with its answer) is longer than the model's context.

        Every selected record of every rank is checked (the same error on every rank, none left
        waiting), once per model, in the languages the run reads: the evaluation languages and
        the module's ``train_languages``.
        """
        module, model, tokenizer = reader_of(self._module, getattr(self, "trainer", None))
        if model is None or tokenizer is None or self._context_checked == id(model):
            return
        self._context_checked = id(model)
        assert self._data is not None and self._selected is not None and self._eval_languages is not None
        try:
            check_run_context(module, model, tokenizer, self._data, self._selected.tolist(), self._eval_languages)
        except RecordError:
            self._context_checked = None
            raise

    # -------------------------------------------------------------- dataloaders

    def _largest_share(self) -> int:
        rank, world_size = self._rank()
        if world_size == 1:
            return len(self.records)
        groups = self._data.raw_indices[self._selected]
        return max(len(shard(self._selected, groups, r, world_size, self.seed)) for r in range(world_size))

    def resume_after(self, done_ids: set[str], steps_done: int) -> None:
        """Leave out records already edited before a restart (``steps_done`` batches on every rank).

        Lightning restarts the loader from its first batch but keeps counting
        from ``steps_done``; the loader then yields only this rank's records not
        in ``done_ids`` (padded to the same count on every rank) while its length
        stays that of the whole epoch, so the loop ends where it would have.
        """
        self._resume = (set(done_ids), int(steps_done))

    def _loader(self) -> DataLoader[Any]:
        # An iterable dataset: Lightning adds no DistributedSampler, so the
        # shard above is the whole split across ranks.
        full = self._largest_share()
        done, steps = self._resume
        if not done:
            dataset = _ShardDataset(self.records, full)
        else:
            left = [r for r in self.records if r.id not in done]
            per_batch = self.batch_size
            dataset = _ShardDataset(left, max(len(left), full - steps * per_batch), reported=full)
        return DataLoader(dataset, batch_size=self.batch_size, collate_fn=collate_records)

    def train_dataloader(self) -> DataLoader[Any]:
        # Lightning asks for it after every on_fit_start (localisation included), before the first edit.
        check_module_masks(*reader_of(self._module, getattr(self, "trainer", None))[:2])
        return self._loader()

    def val_dataloader(self) -> DataLoader[Any]:
        return self._loader()

    def test_dataloader(self) -> DataLoader[Any]:
        return self._loader()

    def predict_dataloader(self) -> DataLoader[Any]:
        return self._loader()


def _check_arguments(path, format, edit_language, eval_languages, limit, offset, batch_size, ids, seed,
                     on_error) -> None:
    """Refuse a bad argument of :class:`EditDataModule`, naming it and what it takes."""
    if format not in FORMAT_CHOICES:
        raise ValueError(f"format must be one of {list(FORMAT_CHOICES)}, got {format!r}")
    if format != "demo" and not path:
        raise ValueError(f"format {format!r} needs a path (the data file, or the MzsRE / MLaKE folder)")
    _check_language(edit_language, "edit_language")
    if eval_languages is not None:
        if isinstance(eval_languages, str) or not isinstance(eval_languages, (list, tuple)):
            raise ValueError(f"eval_languages must be a list of language codes, got {eval_languages!r}")
        for lang in eval_languages:
            _check_language(lang, "eval_languages")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of records or None, got {limit}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if ids is not None and (isinstance(ids, str) or not all(isinstance(i, str) and i for i in ids) or not ids):
        raise ValueError(f"ids must be a non-empty list of record ids, got {ids!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {list(ON_ERROR)}, got {on_error!r}")


def describe_data(dm: EditDataModule) -> dict[str, Any]:
    """:meth:`EditDataModule.describe` (loads the data)."""
    dm._load()
    assert dm._data is not None
    demo = dm.format == "demo"
    out: dict[str, Any] = {
        "format": "jsonl" if demo else formats.detect_format(dm.path) if dm.format == "auto" else dm.format,
        "format_option": dm.format,
        "path": str(demo_path()) if demo else str(dm.path),
        "files": [str(f.path) for f in dm._data.parser.files],
        "edit_language": dm.edit_language,
        "eval_languages": dm.eval_languages,
        "selection": {"ids": dm.ids, "offset": dm.offset, "limit": dm.limit, "seed": dm.seed},
        "batch_size": dm.batch_size,
        "records_in_data": len(dm._data),
        "records_selected": dm.num_selected,
        "on_error": dm.on_error,
        "skipped": dm.skipped,
    }
    if dm.notes:
        out["notes"] = dm.notes
    return out


def _check_language(code: Any, name: str) -> None:
    if is_language_code(code):
        return
    hints = [
        f"{fmt} writes {iso!r} as {code!r}: use {iso!r}"
        for fmt, quirks in formats.QUIRK_CODES.items()
        for quirk, iso in quirks.items()
        if quirk == code
    ]
    hint = "; ".join(hints) or "two lower-case letters, e.g. 'en', 'cs'"
    raise ValueError(f"{name}: {code!r} is not an ISO 639-1 language code ({hint})")

"""A LightningDataModule that serves edit records (no tensors) to an editing run.

Tokenisation belongs to the model side: every dataloader yields plain lists of
:class:`EditRecord`, ``batch_size`` of them at a time, always in file order.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from mke_lightning.data.jsonl import demo_records, read_jsonl
from mke_lightning.data.mzsre import read_mzsre
from mke_lightning.records import EditRecord, RecordError

FORMATS = ("demo", "jsonl", "mzsre")


def collate_records(batch: list[EditRecord]) -> list[EditRecord]:
    """Keep a batch as the list of records (module level, so it pickles)."""
    return list(batch)


class EditDataModule(L.LightningDataModule):
    """Edit records for one run: which file, which slice, which languages.

    Args:
        path: the JSONL file (``format="jsonl"``) or the MzsRE folder
            (``format="mzsre"``); ignored for ``format="demo"``.
        format: ``"demo"`` (the packaged demo edits), ``"jsonl"`` (the native
            format, docs/data.md) or ``"mzsre"`` (a folder of MzsRE pair files).
        edit_language: ISO 639-1 code of the language the edit is made in.
        eval_languages: languages to evaluate in; the edit language is always
            included and comes first. ``None``: every language all selected
            records share.
        limit: how many records to use (``None``: all from ``offset`` on).
        offset: index of the first record to use.
        batch_size: records per batch.
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
    ) -> None:
        super().__init__()
        if format not in FORMATS:
            raise ValueError(f"format must be one of {list(FORMATS)}, got {format!r}")
        if format != "demo" and not path:
            raise ValueError(f"format {format!r} needs a path (the {'JSONL file' if format == 'jsonl' else 'MzsRE folder'})")
        if not isinstance(edit_language, str) or not edit_language:
            raise ValueError(f"edit_language must be a language code such as 'en', got {edit_language!r}")
        if eval_languages is not None and not all(isinstance(lang, str) and lang for lang in eval_languages):
            raise ValueError(f"eval_languages must be a list of language codes, got {eval_languages!r}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be a positive number of records or None, got {limit}")
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.save_hyperparameters()
        self.path = path
        self.format = format
        self.edit_language = edit_language
        self.limit = limit
        self.offset = offset
        self.batch_size = batch_size
        self._requested_eval = None if eval_languages is None else list(eval_languages)
        self._records: list[EditRecord] | None = None
        self._eval_languages: list[str] | None = None

    # ------------------------------------------------------------------ loading

    def _source(self) -> str:
        return "<demo>" if self.format == "demo" else str(self.path)

    def _read(self) -> list[EditRecord]:
        if self.format == "demo":
            return demo_records()
        if self.format == "jsonl":
            return read_jsonl(self.path)
        # MzsRE: read only the files the run needs when the languages are known.
        languages = None
        if self._requested_eval is not None:
            languages = list(dict.fromkeys([self.edit_language, *self._requested_eval]))
        return read_mzsre(self.path, languages)

    def _load(self) -> None:
        if self._records is not None:
            return
        everything = self._read()
        end = None if self.limit is None else self.offset + self.limit
        selected = everything[self.offset : end]
        if not selected:
            raise RecordError(
                f"no records selected: the data has {len(everything)}, offset={self.offset}, limit={self.limit}",
                source=self._source(),
            )
        if self._requested_eval is None:
            # Languages every selected record has, in the first record's order.
            shared = [lang for lang in selected[0].languages if all(lang in r.languages for r in selected)]
            others = [lang for lang in shared if lang != self.edit_language]
        else:
            others = [lang for lang in dict.fromkeys(self._requested_eval) if lang != self.edit_language]
        eval_languages = [self.edit_language, *others]
        for i, record in enumerate(selected, start=self.offset):
            for lang in eval_languages:
                if lang not in record.languages:
                    raise RecordError(
                        f"language {lang!r} is missing (record has {sorted(record.languages)}; "
                        f"edit_language={self.edit_language!r}, eval_languages={eval_languages})",
                        source=self._source(),
                        index=i,
                        record_id=record.id,
                        field=f"languages.{lang}",
                    )
        self._records = selected
        self._eval_languages = eval_languages

    def prepare_data(self) -> None:
        """Nothing to download: data is read from local files in :meth:`setup`."""

    def setup(self, stage: str | None = None) -> None:
        """Read and check the records (once; later calls do nothing)."""
        self._load()

    @property
    def records(self) -> list[EditRecord]:
        """The records of this run (loads them on first use)."""
        self._load()
        assert self._records is not None
        return self._records

    @property
    def eval_languages(self) -> list[str]:
        """Languages to evaluate in, edit language first (loads records on first use)."""
        self._load()
        assert self._eval_languages is not None
        return list(self._eval_languages)

    # -------------------------------------------------------------- dataloaders

    def _loader(self) -> DataLoader[Any]:
        return DataLoader(
            self.records,  # a list is a valid map-style dataset
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=collate_records,
        )

    def train_dataloader(self) -> DataLoader[Any]:
        return self._loader()

    def val_dataloader(self) -> DataLoader[Any]:
        return self._loader()

    def test_dataloader(self) -> DataLoader[Any]:
        return self._loader()

    def predict_dataloader(self) -> DataLoader[Any]:
        return self._loader()

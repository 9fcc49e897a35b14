"""The native JSONL format: one :class:`EditRecord` per line (see docs/data.md).

A line is exactly what ``json.dumps(record.to_dict())`` writes. Blank lines are
skipped. Errors name the file, the record index (0-based, counting records,
not blank lines), the line number and, where there is one, the field.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

from mke_lightning.data.records import EditRecord, record_from_dict
from mke_lightning.data.source import Parser, RecordSource
from mke_lightning.data.spans import ItemFile

DEMO_RESOURCE = "demo_edits.jsonl"


class JsonlParser(Parser):
    """Native records, one per line of ``path``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.name = os.fspath(path)
        self.files = (ItemFile(path, "jsonl"),)

    def parse(self, items: tuple[Any, ...], index: int) -> list[EditRecord]:
        return [record_from_dict(items[0], source=self.name, index=index)]


def read_jsonl(path: str | os.PathLike[str]) -> list[EditRecord]:
    """Read a native JSONL file into records; raises :class:`RecordError` on bad input."""
    return list(RecordSource(JsonlParser(path)))


def demo_path() -> Path:
    """Where the packaged demo edits are (a JSONL file inside the package)."""
    resource = resources.files("mke_lightning.data").joinpath(DEMO_RESOURCE)
    if not resource.is_file():
        raise FileNotFoundError(
            f"the packaged demo data {DEMO_RESOURCE} is missing from mke_lightning/data "
            "(was the package built without its package data?)"
        )
    if not isinstance(resource, Path):
        raise FileNotFoundError(f"the packaged demo data must be a file on disk, got {resource!r} (zipped install?)")
    return resource


def demo_records() -> list[EditRecord]:
    """The small multilingual demo set shipped inside the package."""
    return read_jsonl(demo_path())

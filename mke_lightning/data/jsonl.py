"""The native JSONL format: one :class:`EditRecord` per line (see docs/data.md).

A line is exactly what ``json.dumps(record.to_dict())`` writes. Blank lines are
skipped. Errors name the file, the record index (0-based, counting records,
not blank lines), the line number and, where there is one, the field.
"""

from __future__ import annotations

import json
import os
from importlib import resources

from mke_lightning.records import EditRecord, RecordError, check_unique_ids, record_from_dict

DEMO_RESOURCE = "demo_edits.jsonl"


def _with_line(err: RecordError, lineno: int) -> RecordError:
    """The same error with the line number added to its message."""
    return RecordError(
        f"{err.reason} (line {lineno})",
        source=err.source,
        index=err.index,
        record_id=err.record_id,
        field=err.field,
    )


def read_jsonl(path: str | os.PathLike[str]) -> list[EditRecord]:
    """Read a native JSONL file into records; raises :class:`RecordError` on bad input."""
    source = os.fspath(path)
    records: list[EditRecord] = []
    linenos: list[int] = []  # linenos[i] is the line that holds record #i
    # Binary lines, decoded one by one: text-mode splitting would also be fine
    # for "\n", but this way a bad byte is reported with its line number.
    with open(source, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            index = len(records)
            try:
                # utf-8-sig on the first line tolerates a byte-order mark from editors.
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise RecordError(f"line {lineno} is not valid UTF-8: {exc}", source=source, index=index) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RecordError(
                    f"invalid JSON at line {lineno}, column {exc.colno}: {exc.msg}", source=source, index=index
                ) from None
            try:
                records.append(record_from_dict(obj, source=source, index=index))
            except RecordError as err:
                raise _with_line(err, lineno) from None
            linenos.append(lineno)
    try:
        return check_unique_ids(records, source=source)
    except RecordError as err:
        raise _with_line(err, linenos[err.index]) from None


def demo_records() -> list[EditRecord]:
    """The small multilingual demo set shipped inside the package."""
    resource = resources.files("mke_lightning.data").joinpath(DEMO_RESOURCE)
    if not resource.is_file():
        raise FileNotFoundError(
            f"the packaged demo data {DEMO_RESOURCE} is missing from mke_lightning/data "
            "(was the package built without its package data?)"
        )
    # as_file gives a real path even when the package is imported from a zip.
    with resources.as_file(resource) as path:
        return read_jsonl(path)

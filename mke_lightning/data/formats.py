"""Which adapter reads a path: by name (``data.format``) or detected from the data.

Detection looks at the folder layout or at the first record of the file and
only answers when exactly one format fits. MzsRE pair files and the Bi-ZsRE
file share one schema; only the authors' file names tell them apart
(``mzsre_test_duplicate_<a><b>.json``, ``bizsre_test*.json``), and a file with
that schema under any other name is ambiguous: set the format.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mke_lightning.data import bizsre, jsonl, mkeb, mlake, mquake, mzsre, zsre
from mke_lightning.data.records import RecordError
from mke_lightning.data.source import Parser, RecordSource
from mke_lightning.data.spans import BadItem, ItemFile

FORMATS = ("jsonl", "mzsre", "bizsre", "mkeb", "mlake", "mquake", "zsre")

# Language codes a benchmark writes that are not ISO 639-1, per adapter (for hints).
QUIRK_CODES = {"mzsre": mzsre.QUIRK_CODES}


def make_parser(format: str, path: str | os.PathLike[str], languages: list[str] | None = None) -> Parser:
    """The parser of ``format`` for ``path``; ``languages`` picks the files of
    multi-file formats (MzsRE, Bi-ZsRE, MLaKE) and is ignored by the others."""
    if format == "jsonl":
        return jsonl.JsonlParser(path)
    if format == "mzsre":
        return mzsre.MzsreParser(path, languages)
    if format == "bizsre":
        return bizsre.BizsreParser(path, languages)
    if format == "mkeb":
        return mkeb.MkebParser(path)
    if format == "mlake":
        return mlake.MlakeParser(path, languages)
    if format == "mquake":
        return mquake.MquakeParser(path)
    if format == "zsre":
        return zsre.ZsreParser(path)
    raise ValueError(f"format must be one of {list(FORMATS)} or 'auto', got {format!r}")


def open_source(
    path: str | os.PathLike[str],
    format: str = "auto",
    languages: list[str] | None = None,
    on_error: str = "raise",
) -> RecordSource:
    """Check ``path`` in one streaming pass and return its records, read lazily.

    Args:
        path: a file, or a folder for MzsRE and MLaKE.
        format: one of :data:`FORMATS`, or ``"auto"`` to detect it.
        languages: ISO 639-1 codes to read, for formats that split languages
            over files; ``None``: all.
        on_error: ``"raise"`` at the first bad record, or ``"skip"`` bad records
            (counted in ``source.skipped``).
    """
    if format == "auto":
        format = detect_format(path)
    return RecordSource(make_parser(format, path, languages), on_error=on_error)


def detect_format(path: str | os.PathLike[str]) -> str:
    """The one format ``path`` is in; :class:`RecordError` when none or several fit."""
    path = Path(path)
    if path.is_dir():
        return _detect_folder(path)
    if not path.is_file():
        raise RecordError("cannot detect the format: the path does not exist", source=str(path))
    first = _first_char(path)
    if first == "{":
        return _detect_jsonl(path)
    if first == "[":
        return _detect_array(path)
    raise RecordError(
        "cannot detect the format: the file is neither a JSON list nor JSON Lines"
        + (" (it is empty)" if not first else ""),
        source=str(path),
    )


def _detect_folder(path: Path) -> str:
    fits = []
    if any(mzsre.FILE_PATTERN.match(name) for name in os.listdir(path)):
        fits.append("mzsre")
    if mlake.dataset_folder(path) is not None:
        fits.append("mlake")
    if len(fits) == 1:
        return fits[0]
    if fits:
        raise _ambiguous(path, fits)
    raise RecordError(
        "cannot detect the format of this folder: expected MzsRE pair files (mzsre_test_duplicate_<a><b>.json) "
        "or MLaKE's single_hop/ and multi_hop/ folders; give a file, or set the format",
        source=str(path),
    )


def _first_char(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head[:1].decode("ascii", errors="replace")


def _detect_jsonl(path: Path) -> str:
    item = _first_item(ItemFile(path, "jsonl"))
    if isinstance(item, dict) and "languages" in item and "id" in item:
        return "jsonl"
    raise RecordError(
        "cannot detect the format: the first line is a JSON object but not a native record "
        "(with 'id' and 'languages'); benchmark files are read as JSON lists",
        source=str(path), index=0, line=1,
    )


def _detect_array(path: Path) -> str:
    item = _first_item(ItemFile(path, "array"))
    fits = _formats_of(item) if isinstance(item, dict) else []
    if len(fits) > 1 and set(fits) == {"mzsre", "bizsre"}:
        by_name = _pair_by_name(path.name)
        if by_name:
            fits = [by_name]
    if len(fits) == 1:
        return fits[0]
    if fits:
        raise _ambiguous(path, fits)
    if isinstance(item, dict) and {"e_prompt", "question"} <= set(item):
        raise RecordError(
            "this looks like one MLaKE file; MLaKE is read from its dataset folder "
            "(the one holding single_hop/ and multi_hop/)",
            source=str(path),
        )
    keys = sorted(item)[:8] if isinstance(item, dict) else type(item).__name__
    raise RecordError(
        f"cannot detect the format from the first record (keys {keys}); set the format", source=str(path), index=0
    )


def _first_item(items: ItemFile) -> Any:
    scan = items.scan()
    first = next(scan, None)
    scan.close()
    if first is None:
        raise RecordError("cannot detect the format: the file holds no records", source=items.path)
    value = first[1]
    if isinstance(value, BadItem):
        raise value.error
    return value


def _formats_of(item: dict[str, Any]) -> list[str]:
    fits = []
    if "requested_rewrite" in item:
        fits.append("mquake")
    if "edit" in item and "example_id" in item:
        fits.append("mkeb")
    if {"src", "alt", "loc"} <= set(item):
        fits.append("zsre")
    blocks = [v for v in item.values() if isinstance(v, dict)]
    if len(item) == 2 and len(blocks) == 2 and all({"src", "alt"} <= set(b) for b in blocks):
        fits += ["mzsre", "bizsre"]
    return fits


def _pair_by_name(name: str) -> str | None:
    if mzsre.FILE_PATTERN.match(name):
        return "mzsre"
    if name.startswith("bizsre_test") and name.endswith(".json"):
        return "bizsre"
    return None


def _ambiguous(path: Path, fits: list[str]) -> RecordError:
    return RecordError(
        f"the format is ambiguous: the data fits {' and '.join(fits)}; set it (data.format: {fits[0]})",
        source=str(path),
    )

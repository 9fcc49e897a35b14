"""Adapter for MzsRE (ReMaKE, Wang, Haddow & Birch 2023, arXiv:2312.13040).

The benchmark is a folder of pair files ``mzsre_test_duplicate_<a><b>.json``.
Each file is a JSON list of 743 records; each record holds two language blocks::

    {"en": {"subject", "src", "rephrase", "alt", "loc", "loc_ans",
            "portability": {"New Question", "New Answer"}},
     "zh": {...same keys...}}

A language block is identical in every file that has it, so one file per
language is enough, and records are aligned by their position in the file.
The files a run needs are read side by side, item by item (never whole).
MzsRE writes Czech as ``cz`` and Dutch as ``du``; this module is the only place
those codes exist: everything it returns uses ISO 639-1 (``cs``, ``nl``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from mke_lightning.data.fields import Where, strip_nq_prefix
from mke_lightning.data.records import EditRecord, LanguageFacts, Probe, RecordError
from mke_lightning.data.source import Parser, RecordSource
from mke_lightning.data.spans import ItemFile

FILE_PATTERN = re.compile(r"^mzsre_test_duplicate_([a-z]{2})([a-z]{2})\.json$")

# MzsRE code -> ISO 639-1, for the two codes where they differ.
QUIRK_CODES = {"cz": "cs", "du": "nl"}
_FROM_ISO = {iso: code for code, iso in QUIRK_CODES.items()}

# Fields every language block must have (portability is optional).
_REQUIRED = ("subject", "src", "alt", "rephrase", "loc", "loc_ans")
_PORT_QUESTION = "New Question"
_PORT_ANSWER = "New Answer"


def _iso(code: str) -> str:
    return QUIRK_CODES.get(code, code)


def _scan(folder: Path) -> dict[str, tuple[str, str]]:
    """File name -> its two languages (ISO codes), for every pair file in ``folder``."""
    if not folder.is_dir():
        raise RecordError(f"MzsRE folder {str(folder)!r} does not exist or is not a directory")
    pairs = {}
    for entry in sorted(os.listdir(folder)):
        match = FILE_PATTERN.match(entry)
        if match:
            pairs[entry] = (_iso(match.group(1)), _iso(match.group(2)))
    if not pairs:
        raise RecordError(
            f"MzsRE folder {str(folder)!r} holds no files named mzsre_test_duplicate_<a><b>.json"
        )
    return pairs


def _plan(pairs: dict[str, tuple[str, str]], wanted: list[str]) -> dict[str, str]:
    """Language -> the file to take it from, reading as few files as possible.

    Greedy: repeatedly take the file that covers the most languages still
    needed (ties: first file name). Each file is then read once.
    """
    source_of: dict[str, str] = {}
    needed = set(wanted)
    while needed:
        # max() keeps the first of equal keys, and ``pairs`` is in name order.
        name = max(pairs, key=lambda n: len(needed.intersection(pairs[n])))
        for lang in pairs[name]:
            if lang in needed:
                source_of[lang] = name
                needed.discard(lang)
    return source_of


def parse_block(record: Any, code: str, source: str, index: int, record_id: str | None = None) -> LanguageFacts:
    """The block ``code`` (as the file writes it) of one MzsRE / Bi-ZsRE record."""
    where = Where(source, index, record_id)
    block = where.member(where.obj(record, "<record>"), code, "")
    values = {key: where.text(block, key, code) for key in _REQUIRED}
    loc = strip_nq_prefix(where, values["loc"], f"{code}.loc")
    portability: tuple[Probe, ...] = ()
    if block.get("portability") is not None:
        port = where.member(block, "portability", code)
        path = f"{code}.portability"
        portability = (Probe(where.text(port, _PORT_QUESTION, path), where.text(port, _PORT_ANSWER, path)),)
    return LanguageFacts(
        subject=values["subject"],
        prompt=values["src"],
        target_new=values["alt"],
        target_true=None,  # MzsRE does not give the pre-edit answer
        paraphrases=(values["rephrase"],),
        locality=(Probe(prompt=loc, answer=values["loc_ans"]),),
        portability=portability,
    )


class MzsreParser(Parser):
    """MzsRE records in ``languages`` from a folder of pair files or one pair file.

    Args:
        path: the folder, or a single ``mzsre_test_duplicate_<a><b>.json``.
        languages: ISO 639-1 codes to read, in this order; ``None``: all the
            path has, sorted.
        prefix: record ids are ``<prefix>-<index>``.
    """

    def __init__(self, path: str | os.PathLike[str], languages: list[str] | None = None, prefix: str = "mzsre") -> None:
        path = Path(path)
        self.name = str(path)
        self.prefix = prefix
        pairs = _scan(path) if path.is_dir() else _single(path)
        folder = path if path.is_dir() else path.parent
        self.languages = _wanted(pairs, languages, self.name)
        source_of = _plan(pairs, self.languages)
        names = list(dict.fromkeys(source_of.values()))
        self.files = tuple(ItemFile(folder / name, "array") for name in names)
        # language -> (which file, the code the file writes it with)
        self.blocks = {lang: (names.index(source_of[lang]), _FROM_ISO.get(lang, lang)) for lang in self.languages}

    def parse(self, items: tuple[Any, ...], index: int) -> list[EditRecord]:
        rid = f"{self.prefix}-{index}"
        facts = {}
        for lang, (which, code) in self.blocks.items():
            facts[lang] = parse_block(items[which], code, self.files[which].path, index, rid)
        return [EditRecord(id=rid, languages=facts)]


def _single(path: Path) -> dict[str, tuple[str, str]]:
    """The two languages of one pair file, from its name."""
    if not path.is_file():
        raise RecordError(f"MzsRE path {str(path)!r} does not exist")
    match = FILE_PATTERN.match(path.name)
    if not match:
        raise RecordError(
            f"cannot tell the languages of {path.name!r}: an MzsRE file is named mzsre_test_duplicate_<a><b>.json "
            "(or give the folder that holds the pair files)"
        )
    return {path.name: (_iso(match.group(1)), _iso(match.group(2)))}


def _wanted(pairs: dict[str, tuple[str, str]], languages: list[str] | None, where: str) -> list[str]:
    available = sorted({lang for pair in pairs.values() for lang in pair})
    if languages is None:
        return available
    wanted = list(dict.fromkeys(languages))  # de-duplicate, keep order
    if not wanted:
        raise RecordError(f"no languages requested from MzsRE path {where!r}; available: {available}")
    unknown = [lang for lang in wanted if lang not in available]
    if unknown:
        hint = "".join(f" (MzsRE's {lang!r} is {QUIRK_CODES[lang]!r} here)" for lang in unknown if lang in QUIRK_CODES)
        raise RecordError(f"language(s) {unknown} not in MzsRE path {where!r}; available: {available}{hint}")
    return wanted


def read_mzsre(path: str | os.PathLike[str], languages: list[str] | None = None) -> list[EditRecord]:
    """Read the MzsRE test set: one record per index, ids ``mzsre-<index>``.

    ``path`` is the folder of pair files or one pair file. ``languages`` are
    ISO 639-1 codes (``cs`` and ``nl``, not MzsRE's ``cz`` and ``du``), kept in
    the given order; ``None`` means every language the path has, sorted.
    """
    return list(RecordSource(MzsreParser(path, languages)))

"""Adapter for MzsRE (ReMaKE, Wang, Haddow & Birch 2023, arXiv:2312.13040).

The benchmark is a folder of pair files ``mzsre_test_duplicate_<a><b>.json``.
Each file is a JSON list of 743 records; each record holds two language blocks::

    {"en": {"subject", "src", "rephrase", "alt", "loc", "loc_ans",
            "portability": {"New Question", "New Answer"}},
     "zh": {...same keys...}}

A language block is identical in every file that has it, so one file per
language is enough, and records are aligned by their position in the file.
MzsRE writes Czech as ``cz`` and Dutch as ``du``; this module is the only place
those codes exist: everything it returns uses ISO 639-1 (``cs``, ``nl``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from mke_lightning.records import EditRecord, LanguageFacts, Probe, RecordError

FILE_PATTERN = re.compile(r"^mzsre_test_duplicate_([a-z]{2})([a-z]{2})\.json$")

# MzsRE code -> ISO 639-1, for the two codes where they differ.
_TO_ISO = {"cz": "cs", "du": "nl"}
_FROM_ISO = {iso: code for code, iso in _TO_ISO.items()}

# The English locality questions come from Natural Questions and keep its task
# prefix ("nq question: who sang ..."); the translations dropped it. Stripped
# so that every language gets the bare question.
_LOC_PREFIX = "nq question: "

# MzsRE field -> what it becomes in LanguageFacts (for error messages).
_REQUIRED = {
    "subject": "subject",
    "src": "prompt",
    "alt": "target_new",
    "rephrase": "paraphrases",
    "loc": "locality prompt",
    "loc_ans": "locality answer",
}
_PORT_QUESTION = "New Question"
_PORT_ANSWER = "New Answer"


def _iso(code: str) -> str:
    return _TO_ISO.get(code, code)


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


def _load(path: Path) -> list[Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise RecordError(f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}", source=str(path)) from None
    except UnicodeDecodeError as exc:
        raise RecordError(f"not valid UTF-8: {exc}", source=str(path)) from None
    if not isinstance(data, list):
        raise RecordError(f"must be a JSON list of records, got {type(data).__name__}", source=str(path))
    return data


def _text(block: dict[str, Any], key: str, where: str, source: str, index: int) -> str:
    value = block.get(key)
    if value is None:
        raise RecordError("is missing", source=source, index=index, field=f"{where}.{key}")
    if not isinstance(value, str):
        raise RecordError(f"must be a string, got {type(value).__name__}", source=source, index=index, field=f"{where}.{key}")
    if not value.strip():
        raise RecordError("is empty", source=source, index=index, field=f"{where}.{key}")
    return value.strip()


def _facts(record: Any, code: str, source: str, index: int) -> LanguageFacts:
    """One MzsRE language block (``code`` as written in the file) as LanguageFacts."""
    if not isinstance(record, dict):
        raise RecordError(f"must be a JSON object, got {type(record).__name__}", source=source, index=index, field="<record>")
    block = record.get(code)
    if not isinstance(block, dict):
        what = "is missing" if block is None else f"must be an object, got {type(block).__name__}"
        raise RecordError(what, source=source, index=index, field=code)
    values = {key: _text(block, key, code, source, index) for key in _REQUIRED}
    loc = values["loc"]
    if loc.startswith(_LOC_PREFIX):
        loc = loc[len(_LOC_PREFIX):].strip()
        if not loc:
            raise RecordError("is empty after the 'nq question: ' prefix", source=source, index=index, field=f"{code}.loc")
    portability: tuple[Probe, ...] = ()
    port = block.get("portability")
    if port is not None:
        where = f"{code}.portability"
        if not isinstance(port, dict):
            raise RecordError(f"must be an object, got {type(port).__name__}", source=source, index=index, field=where)
        portability = (
            Probe(prompt=_text(port, _PORT_QUESTION, where, source, index), answer=_text(port, _PORT_ANSWER, where, source, index)),
        )
    return LanguageFacts(
        subject=values["subject"],
        prompt=values["src"],
        target_new=values["alt"],
        target_true=None,  # MzsRE does not give the pre-edit answer
        paraphrases=(values["rephrase"],),
        locality=(Probe(prompt=loc, answer=values["loc_ans"]),),
        portability=portability,
    )


def read_mzsre(folder: str | os.PathLike[str], languages: list[str] | None = None) -> list[EditRecord]:
    """Read the MzsRE test set from ``folder``: one record per index, ids ``mzsre-<index>``.

    ``languages`` are ISO 639-1 codes (``cs`` and ``nl``, not MzsRE's ``cz``
    and ``du``), kept in the given order; ``None`` means every language the
    folder has, sorted.
    """
    folder = Path(folder)
    pairs = _scan(folder)
    available = sorted({lang for pair in pairs.values() for lang in pair})
    if languages is None:
        wanted = available
    else:
        wanted = list(dict.fromkeys(languages))  # de-duplicate, keep order
        if not wanted:
            raise RecordError(f"no languages requested from MzsRE folder {str(folder)!r}; available: {available}")
        unknown = [lang for lang in wanted if lang not in available]
        if unknown:
            hint = "".join(
                f" (MzsRE's {lang!r} is {_TO_ISO[lang]!r} here)" for lang in unknown if lang in _TO_ISO
            )
            raise RecordError(
                f"language(s) {unknown} not in MzsRE folder {str(folder)!r}; available: {available}{hint}"
            )

    source_of = _plan(pairs, wanted)
    loaded: dict[str, list[Any]] = {}
    for name in dict.fromkeys(source_of.values()):
        loaded[name] = _load(folder / name)

    count = None
    first_name = None
    for name, data in loaded.items():
        if count is None:
            count, first_name = len(data), name
        elif len(data) != count:
            raise RecordError(
                f"has {len(data)} records but {first_name} has {count}; the files must be aligned",
                source=str(folder / name),
            )

    records = []
    for index in range(count or 0):
        facts = {}
        for lang in wanted:
            name = source_of[lang]
            facts[lang] = _facts(loaded[name][index], _FROM_ISO.get(lang, lang), str(folder / name), index)
        records.append(EditRecord(id=f"mzsre-{index}", languages=facts))
    return records

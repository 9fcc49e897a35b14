"""Adapter for Bi-ZsRE (Wang et al. 2023, arXiv:2309.08952): the en/zh test file.

A JSON list; each record holds an ``en`` and a ``zh`` block in the MzsRE
schema (``subject``, ``src``, ``rephrase``, ``alt``, ``loc``, ``loc_ans``,
``portability``), so the blocks are parsed exactly as MzsRE's. Ids are
``bizsre-<index>``.
"""

from __future__ import annotations

import os
from typing import Any

from mke_lightning.data.mzsre import parse_block
from mke_lightning.data.records import EditRecord, RecordError
from mke_lightning.data.source import Parser, RecordSource
from mke_lightning.data.spans import ItemFile

LANGUAGES = ("en", "zh")


class BizsreParser(Parser):
    """Bi-ZsRE records, in ``languages`` (default both, en first)."""

    def __init__(self, path: str | os.PathLike[str], languages: list[str] | None = None) -> None:
        self.name = os.fspath(path)
        self.files = (ItemFile(path, "array"),)
        wanted = list(dict.fromkeys(languages or LANGUAGES))
        unknown = [lang for lang in wanted if lang not in LANGUAGES]
        if unknown:
            raise RecordError(f"language(s) {unknown} not in Bi-ZsRE (it has {list(LANGUAGES)})", source=self.name)
        self.languages = wanted

    def parse(self, items: tuple[Any, ...], index: int) -> list[EditRecord]:
        rid = f"bizsre-{index}"
        facts = {lang: parse_block(items[0], lang, self.name, index, rid) for lang in self.languages}
        return [EditRecord(id=rid, languages=facts)]


def read_bizsre(path: str | os.PathLike[str], languages: list[str] | None = None) -> list[EditRecord]:
    """Read a Bi-ZsRE test file (JSON list of en/zh records)."""
    return list(RecordSource(BizsreParser(path, languages)))

"""Adapter for MLaKE (Wei et al. 2024, arXiv:2404.04990): en, zh, ja, fr, de.

The ``dataset`` folder holds parallel single-hop files (record ``i`` is the
same edit in every language) and, per language, multi-hop questions about
the edited facts::

    single_hop/<l>_qa.json       {question, o_prompt, o_answer, o_answer_aliases,
                                  e_prompt, e_answer, e_answer_aliases}
    multi_hop/new_<l>_qa.json    {question, e_prompt, e_answer, e_answer_aliases}

A multi-hop question names its edit by ``e_prompt``, the **English** edit
sentence in every language's file; it is linked to the single-hop record
whose English ``e_prompt`` is the same. Questions that match no record are
counted (:meth:`MlakeParser.notes`), never dropped silently. The
``multi_hop/old_*`` files (answers before the edit) are not read.

One record per single-hop index, id ``mlake-<index>``:

=====================================  ==================================
MLaKE single hop                       LanguageFacts
=====================================  ==================================
``question``                           ``prompt``
``e_answer`` / ``e_answer_aliases``    ``target_new`` / ``target_new_aliases``
``o_answer``                           ``target_true``
(none)                                 ``subject`` = ``None``
linked ``new_<l>`` questions           ``multi_hop`` (``e_answer`` + aliases)
=====================================  ==================================
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from mke_lightning.data.fields import Where
from mke_lightning.data.records import EditRecord, LanguageFacts, Probe, RecordError
from mke_lightning.data.source import Parser, RecordSource
from mke_lightning.data.spans import BadItem, ItemFile

LANGUAGES = ("de", "en", "fr", "ja", "zh")
LINK_LANGUAGE = "en"  # the language of every multi-hop file's e_prompt


def dataset_folder(path: str | os.PathLike[str]) -> Path | None:
    """The folder holding ``single_hop/`` and ``multi_hop/`` (``path`` or ``path/dataset``)."""
    path = Path(path)
    for folder in (path, path / "dataset"):
        if (folder / "single_hop").is_dir() and (folder / "multi_hop").is_dir():
            return folder
    return None


class MlakeParser(Parser):
    """MLaKE records in ``languages`` (default: every language with a single-hop file, sorted)."""

    def __init__(self, path: str | os.PathLike[str], languages: list[str] | None = None) -> None:
        self.name = os.fspath(path)
        folder = dataset_folder(path)
        if folder is None:
            raise RecordError(
                f"MLaKE path {self.name!r} holds no single_hop/ and multi_hop/ folders (nor dataset/ with them)"
            )
        self.folder = folder
        available = [lang for lang in LANGUAGES if (folder / "single_hop" / f"{lang}_qa.json").is_file()]
        if LINK_LANGUAGE not in available:
            raise RecordError(
                f"MLaKE folder {str(folder)!r} lacks single_hop/{LINK_LANGUAGE}_qa.json, "
                "which the multi-hop questions link to"
            )
        self.languages = list(dict.fromkeys(languages or available))
        unknown = [lang for lang in self.languages if lang not in available]
        if unknown:
            raise RecordError(
                f"language(s) {unknown} not in MLaKE folder {str(folder)!r} (it has {available})", source=self.name
            )
        # English is always read: its e_prompt is the key multi-hop questions link by.
        order = list(dict.fromkeys([LINK_LANGUAGE, *self.languages]))
        self.files = tuple(ItemFile(folder / "single_hop" / f"{lang}_qa.json", "array") for lang in order)
        self.file_of = {lang: order.index(lang) for lang in self.languages}
        self.links: dict[int, dict[str, list[Probe]]] = {}  # single-hop index -> language -> questions
        self.linked = {lang: 0 for lang in self.languages}
        self.unlinked = {lang: 0 for lang in self.languages}

    def prepare(self, reject: Callable[[RecordError], None]) -> None:
        self.links = {}
        self.linked = {lang: 0 for lang in self.languages}
        self.unlinked = {lang: 0 for lang in self.languages}
        index_of: dict[str, int] = {}
        for index, item in ItemFile(self.files[0].path, "array").scan():
            if isinstance(item, dict) and isinstance(item.get("e_prompt"), str):
                index_of.setdefault(item["e_prompt"].strip(), index)  # bad items are reported by the main pass
        for lang in self.languages:
            questions = ItemFile(self.folder / "multi_hop" / f"new_{lang}_qa.json", "array")
            for index, item in questions.scan():
                try:
                    if isinstance(item, BadItem):
                        raise item.error
                    key, probe = _question(Where(questions.path, index), item)
                except RecordError as err:
                    reject(err.replace(line=questions.line_of(index)))
                    continue
                target = index_of.get(key)
                if target is None:
                    self.unlinked[lang] += 1
                else:
                    self.links.setdefault(target, {}).setdefault(lang, []).append(probe)
                    self.linked[lang] += 1

    def parse(self, items: tuple[Any, ...], index: int) -> list[EditRecord]:
        rid = f"mlake-{index}"
        # Every file read (English always) must give a usable record; the
        # English e_prompt is the key the multi-hop questions link by.
        checked = [self._checked(items, which, index, rid) for which in range(len(self.files))]
        facts = {}
        for lang, which in self.file_of.items():
            where, item = checked[which]
            facts[lang] = LanguageFacts(
                subject=None,  # MLaKE does not name the subject
                prompt=where.text(item, "question", ""),
                target_new=where.text(item, "e_answer", ""),
                target_true=where.text(item, "o_answer", ""),
                target_new_aliases=where.texts(item, "e_answer_aliases", ""),
                multi_hop=tuple(self.links.get(index, {}).get(lang, ())),
            )
        return [EditRecord(id=rid, languages=facts)]

    def _checked(self, items: tuple[Any, ...], which: int, index: int, rid: str) -> tuple[Where, dict[str, Any]]:
        where = Where(self.files[which].path, index, rid)
        item = where.obj(items[which], "<record>")
        where.text(item, "e_prompt", "")
        return where, item

    def notes(self) -> dict[str, Any]:
        return {"multi_hop_linked": dict(self.linked), "multi_hop_unlinked": dict(self.unlinked)}


def _question(where: Where, item: Any) -> tuple[str, Probe]:
    """(English e_prompt it links by, the question as a probe) of one multi-hop item."""
    item = where.obj(item, "<record>")
    probe = Probe(
        where.text(item, "question", ""), where.text(item, "e_answer", ""), where.texts(item, "e_answer_aliases", "")
    )
    return where.text(item, "e_prompt", ""), probe


def read_mlake(path: str | os.PathLike[str], languages: list[str] | None = None) -> list[EditRecord]:
    """Read MLaKE single-hop edits with their linked multi-hop questions."""
    return list(RecordSource(MlakeParser(path, languages)))

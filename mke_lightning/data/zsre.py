"""Adapter for the classic English zsRE eval file (ROME/MEMIT ``zsre_mend_eval.json``).

A JSON list of ``{subject, src, pred, rephrase, alt, answers, loc, loc_ans,
cond}``. One English record per item, id ``zsre-<index>``:

==============  ===========================================================
zsRE            LanguageFacts (``en``)
==============  ===========================================================
``subject``     ``subject``
``src``         ``prompt``
``alt``         ``target_new``
``answers[0]``  ``target_true`` (the gold answer; ``None`` if the list is empty)
``rephrase``    ``paraphrases``
``loc``         ``locality`` prompt, ``nq question: `` prefix removed
``loc_ans``     ``locality`` answer
==============  ===========================================================

``pred`` (a MEND-era model's prediction) and ``cond`` are not used.
"""

from __future__ import annotations

import os
from typing import Any

from mke_lightning.data.fields import Where, strip_nq_prefix
from mke_lightning.data.records import EditRecord, LanguageFacts, Probe
from mke_lightning.data.source import Parser, RecordSource
from mke_lightning.data.spans import ItemFile


class ZsreParser(Parser):
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.name = os.fspath(path)
        self.files = (ItemFile(path, "array"),)

    def parse(self, items: tuple[Any, ...], index: int) -> list[EditRecord]:
        where = Where(self.name, index, f"zsre-{index}")
        item = where.obj(items[0], "<record>")
        answers = where.texts(item, "answers", "")
        facts = LanguageFacts(
            subject=where.text(item, "subject", ""),
            prompt=where.text(item, "src", ""),
            target_new=where.text(item, "alt", ""),
            target_true=answers[0] if answers else None,
            paraphrases=(where.text(item, "rephrase", ""),),
            locality=(
                Probe(strip_nq_prefix(where, where.text(item, "loc", ""), "loc"), where.text(item, "loc_ans", "")),
            ),
        )
        return [EditRecord(id=where.record_id, languages={"en": facts})]


def read_zsre(path: str | os.PathLike[str]) -> list[EditRecord]:
    """Read a zsRE eval file (English)."""
    return list(RecordSource(ZsreParser(path)))

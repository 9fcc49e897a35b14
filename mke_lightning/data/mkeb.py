"""Adapter for MKEB, the benchmark of MEMLA (arXiv:2406.11566).

The data was not published; the schema is the one the authors' code reads
(``memla/main.py``): a JSON list of ::

    {"example_id": 3, "relation_description": "...",
     "edit": {lang: {"prompt": "{} was born in", "subject": ..., "target_new": ..., "target_true": ...}},
     "paraphrase_prompts": {lang: [...]},
     "neighborhood_prompts": {lang: [...]}, "neighborhood_answers": {lang: [...]},
     "multi_hop_questions": {lang: [...]}, "multi_hop_new_answer": {lang: "..."}}

Languages are ISO 639-1 codes already (en zh fr de it es pt pl ru ja ko th).
One record per item, id ``mkeb-<example_id>``, with every language of
``edit``; each of those languages must be in the other per-language fields
too. The multi-hop fields may be absent as a pair (the authors' code checks).

==========================================  ===============================
MKEB (per language)                         LanguageFacts
==========================================  ===============================
``edit.prompt`` with ``{}`` := ``subject``  ``prompt``
``edit.subject``                            ``subject``
``edit.target_new`` / ``target_true``       ``target_new`` / ``target_true``
``paraphrase_prompts``                      ``paraphrases``
``neighborhood_prompts`` + ``_answers``     ``locality`` (paired in order)
``multi_hop_questions`` +                   ``multi_hop`` (each question with
``multi_hop_new_answer``                    the one answer)
==========================================  ===============================
"""

from __future__ import annotations

import os
from typing import Any

from mke_lightning.data.fields import Where
from mke_lightning.data.records import EditRecord, LanguageFacts, Probe
from mke_lightning.data.source import Parser, RecordSource
from mke_lightning.data.spans import ItemFile

_PER_LANGUAGE = ("paraphrase_prompts", "neighborhood_prompts", "neighborhood_answers")


class MkebParser(Parser):
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.name = os.fspath(path)
        self.files = (ItemFile(path, "array"),)

    def parse(self, items: tuple[Any, ...], index: int) -> list[EditRecord]:
        where = Where(self.name, index)
        item = where.obj(items[0], "<record>")
        where.record_id = f"mkeb-{where.identifier(item, 'example_id')}"
        edit = where.member(item, "edit", "")
        if not edit:
            raise where.error("edit", "has no language")
        per_lang = {key: where.member(item, key, "") for key in _PER_LANGUAGE}
        has_multi_hop = item.get("multi_hop_questions") is not None or item.get("multi_hop_new_answer") is not None
        if has_multi_hop:
            for key in ("multi_hop_questions", "multi_hop_new_answer"):
                per_lang[key] = where.member(item, key, "")
        facts = {}
        for lang in edit:
            where.language(lang, f"edit.{lang}")
            for key, values in per_lang.items():
                if lang not in values:
                    raise where.error(f"{key}.{lang}", f"is missing (the record edits in {lang!r})")
            facts[lang] = _facts(where, edit, lang, per_lang, has_multi_hop)
        return [EditRecord(id=where.record_id, languages=facts)]


def _facts(
    where: Where, edit: dict[str, Any], lang: str, per_lang: dict[str, dict[str, Any]], has_multi_hop: bool
) -> LanguageFacts:
    block = where.member(edit, lang, "edit")
    path = f"edit.{lang}"
    subject = where.text(block, "subject", path)
    prompt = where.fill_subject(where.text(block, "prompt", path), subject, f"{path}.prompt")
    prompts = where.texts(per_lang["neighborhood_prompts"], lang, "neighborhood_prompts", required=True)
    answers = where.texts(per_lang["neighborhood_answers"], lang, "neighborhood_answers", required=True)
    if len(prompts) != len(answers):
        raise where.error(
            f"neighborhood_answers.{lang}", f"has {len(answers)} answers for {len(prompts)} neighborhood prompts"
        )
    multi_hop: tuple[Probe, ...] = ()
    if has_multi_hop:
        answer = where.text(per_lang["multi_hop_new_answer"], lang, "multi_hop_new_answer")
        questions = where.texts(per_lang["multi_hop_questions"], lang, "multi_hop_questions", required=True)
        multi_hop = tuple(Probe(q, answer) for q in questions)
    return LanguageFacts(
        subject=subject,
        prompt=prompt,
        target_new=where.text(block, "target_new", path),
        target_true=where.text(block, "target_true", path),
        paraphrases=where.texts(per_lang["paraphrase_prompts"], lang, "paraphrase_prompts", required=True),
        locality=tuple(Probe(p, a) for p, a in zip(prompts, answers)),
        multi_hop=multi_hop,
    )


def read_mkeb(path: str | os.PathLike[str]) -> list[EditRecord]:
    """Read an MKEB file (JSON list in the MEMLA schema)."""
    return list(RecordSource(MkebParser(path)))

"""Adapter for MQuAKE (Zhong et al. 2023, arXiv:2305.14795), CF schema, English.

A JSON list of cases. A case holds several edits (``requested_rewrite``) and
multi-hop ``questions`` whose answer becomes ``new_answer`` (or one of
``new_answer_alias``) only once all of the case's edits are made. Each edit
becomes one record, id ``mquake-<case_id>-<k>`` (``k``: its place in
``requested_rewrite``), and the records of a case share ``case =
"mquake-<case_id>"``:

======================================  =====================================
``requested_rewrite[k]``                LanguageFacts (``en``)
======================================  =====================================
``prompt`` with ``{}`` := ``subject``   ``prompt``
``subject``                             ``subject``
``target_new.str`` / ``target_true.str``  ``target_new`` / ``target_true``
``question``                            ``paraphrases`` (when present)
``new_single_hops[j].answer_alias``     ``target_new_aliases`` (the hop asking
                                        the same ``question``)
======================================  =====================================

The case's multi-hop questions go on its **last** edit only, so that each is
counted once; they hold after all of the case's edits.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from mke_lightning.data.fields import Where
from mke_lightning.data.records import EditRecord, LanguageFacts, Probe
from mke_lightning.data.source import Parser, RecordSource
from mke_lightning.data.spans import ItemFile


class MquakeParser(Parser):
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.name = os.fspath(path)
        self.files = (ItemFile(path, "array"),)

    def parse(self, items: tuple[Any, ...], index: int) -> list[EditRecord]:
        where = Where(self.name, index)
        item = where.obj(items[0], "<record>")
        case = f"mquake-{where.identifier(item, 'case_id')}"
        where.record_id = case
        rewrites = item.get("requested_rewrite")
        if not isinstance(rewrites, list) or not rewrites:
            raise where.error("requested_rewrite", "must be a non-empty list of edits")
        multi_hop = tuple(
            Probe(q, where.text(item, "new_answer", ""), where.texts(item, "new_answer_alias", ""))
            for q in where.texts(item, "questions", "", required=True)
        )
        if not multi_hop:
            raise where.error("questions", "is empty")
        aliases = _hop_aliases(where, item)
        records = []
        for k, rewrite in enumerate(rewrites):
            facts = _edit(where, rewrite, f"requested_rewrite[{k}]", aliases)
            if k == len(rewrites) - 1:
                facts = replace(facts, multi_hop=multi_hop)
            records.append(EditRecord(id=f"{case}-{k}", languages={"en": facts}, case=case))
        return records


def _edit(where: Where, rewrite: Any, path: str, aliases: dict[str, tuple[str, ...]]) -> LanguageFacts:
    rewrite = where.obj(rewrite, path)
    subject = where.text(rewrite, "subject", path)
    prompt = where.fill_subject(where.text(rewrite, "prompt", path), subject, f"{path}.prompt")
    question = where.text(rewrite, "question", path, required=False)
    return LanguageFacts(
        subject=subject,
        prompt=prompt,
        target_new=where.text(where.member(rewrite, "target_new", path), "str", f"{path}.target_new"),
        target_true=where.text(where.member(rewrite, "target_true", path), "str", f"{path}.target_true"),
        paraphrases=(question,) if question else (),
        target_new_aliases=aliases.get(question or "", ()),
    )


def _hop_aliases(where: Where, item: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    """Question of each new single hop -> the aliases of its (new) answer."""
    hops = item.get("new_single_hops")
    if hops is None:
        return {}
    if not isinstance(hops, list):
        raise where.error("new_single_hops", f"must be a list, got {type(hops).__name__}")
    out = {}
    for j, hop in enumerate(hops):
        path = f"new_single_hops[{j}]"
        hop = where.obj(hop, path)
        out[where.text(hop, "question", path)] = where.texts(hop, "answer_alias", path)
    return out


def read_mquake(path: str | os.PathLike[str]) -> list[EditRecord]:
    """Read an MQuAKE file (CF schema): one record per requested rewrite."""
    return list(RecordSource(MquakeParser(path)))

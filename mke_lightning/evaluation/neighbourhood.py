"""Neighbourhood prompts: the edit's question, asked about other subjects.

An edit should change one subject's answer, not every answer to its
question. ``locality`` probes unrelated prompts; the ``neighborhood`` measure
probes the closest ones: the edit's own question about the subjects of other
records of the run. Both are scored the same way, against the pre-edit
model's own continuation (see :mod:`mke_lightning.evaluation.evaluator`).

For an edit record ``R``, ``per_edit`` neighbour records are chosen from the
run's records (never ``R``, nor a record with ``R``'s subject, nor two with
one subject; subjects compared in the edit language, normalised):

1. first the records whose edit-language prompt has ``R``'s question
   template (the prompt with its subject replaced by a placeholder is the
   same string), in an order drawn from ``seed`` and the two record ids;
2. then, while fewer than ``per_edit``, other records drawn by a generator
   seeded by ``seed`` and ``R``'s id from the id-sorted record list.

The choice depends only on the seed, the ids and the records' texts: the
same on any number of ranks, in any serving order, after a resume.

Each neighbour ``O`` gives at most one prompt per evaluation language ``L``:

* ``template``: ``O``'s own prompt in ``L`` when it has ``R``'s template in ``L``;
* ``subject``: else ``R``'s prompt in ``L`` with ``R``'s subject replaced by
  ``O``'s subject in ``L`` (where ``R``'s subject occurs in its prompt);
* ``edit_template``: else, for a neighbour of rule 1 (the same question in
  the edit language), ``O``'s own prompt in ``L``: the same question, phrased
  by the benchmark, where ``R``'s subject cannot be placed in ``L`` (an
  inflected name).

A prompt equal to ``R``'s own prompt or a paraphrase of it in ``L`` is left
out, and so is a repeat. A language where no neighbour can be placed has no
neighbourhood item: the record reports nothing there, not zero.
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass
from typing import Iterable

from mke_lightning.data.records import EditRecord
from mke_lightning.evaluation.metrics import normalize

SOURCES = ("template", "subject", "edit_template")
_HOLE = "\x00"  # stands for the subject in a template; never part of a benchmark's text
_DRAW_SLACK = 8  # extra records drawn at once for rule 2, for the ones refused (same subject, no subject)

__all__ = ["NeighbourhoodConfig", "NeighbourPool", "SOURCES", "template_of"]


@dataclass
class NeighbourhoodConfig:
    """Settings of the ``neighborhood`` measure (``EditEvaluation(neighbourhood=...)``)."""

    per_edit: int = 5
    """Neighbour records per edit; each gives at most one prompt per evaluation language."""
    seed: int = 0
    """Seeds the choice of neighbours (the same neighbours for the same seed and records)."""

    def __post_init__(self) -> None:
        if isinstance(self.per_edit, bool) or not isinstance(self.per_edit, int) or self.per_edit < 1:
            raise ValueError(f"neighbourhood.per_edit must be an integer >= 1, got {self.per_edit!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"neighbourhood.seed must be an integer, got {self.seed!r}")


def template_of(subject: str | None, prompt: str) -> str | None:
    """``prompt`` with every occurrence of ``subject`` replaced by a placeholder;
    ``None`` where the subject is unknown or not in the prompt as written."""
    if not subject or subject not in prompt:
        return None
    return prompt.replace(subject, _HOLE)


def _key(*parts: object) -> int:
    """A stable 64-bit number of ``parts`` (Python's ``hash`` of a string changes between processes)."""
    text = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")


class NeighbourPool:
    """The run's records, indexed for neighbour prompts.

    Args:
        records: the records of the run (all ranks: the same pool everywhere).
        languages: the evaluation languages.
        edit_language: the language whose template picks the first neighbours.
        config: how many neighbours, and the seed.
    """

    def __init__(self, records: Iterable[EditRecord], languages: list[str], edit_language: str,
                 config: NeighbourhoodConfig | None = None) -> None:
        self.config = config or NeighbourhoodConfig()
        self.languages = list(languages)
        self.edit_language = edit_language
        # record id -> language -> (subject, prompt); only the languages the record has
        self._facts: dict[str, dict[str, tuple[str | None, str]]] = {}
        for record in records:
            self._facts[record.id] = {lang: (f.subject, f.prompt) for lang, f in record.languages.items()
                                      if lang in self.languages or lang == edit_language}
        self.ids = sorted(self._facts)  # rule 2 draws from this order: independent of the serving order
        # edit-language template -> ids of the records that ask it
        self._by_template: dict[str, list[str]] = {}
        for rid in self.ids:
            t = self._template(rid, edit_language)
            if t is not None:
                self._by_template.setdefault(t, []).append(rid)

    def __len__(self) -> int:
        return len(self.ids)

    def _template(self, rid: str, lang: str) -> str | None:
        subject, prompt = self._facts[rid].get(lang, (None, ""))
        return template_of(subject, prompt)

    def _subject(self, rid: str, lang: str) -> str | None:
        return self._facts[rid].get(lang, (None, ""))[0]

    def shares_template(self, record: EditRecord) -> list[str]:
        """Ids of the other records whose edit-language prompt has ``record``'s template."""
        f = record.languages.get(self.edit_language)
        t = template_of(f.subject, f.prompt) if f is not None else None
        return [rid for rid in self._by_template.get(t, []) if rid != record.id] if t is not None else []

    def neighbours(self, record: EditRecord) -> list[str]:
        """The ids of ``record``'s neighbour records, in order: rule 1 (same template), then rule 2."""
        k, seed = self.config.per_edit, self.config.seed
        own = record.languages.get(self.edit_language)
        own_subject = normalize(own.subject) if own is not None and own.subject else None
        subjects: set[str | None] = {own_subject}  # one neighbour per subject: two would ask the same prompt

        def take(rid: str) -> bool:
            subject = self._subject(rid, self.edit_language)
            if rid == record.id or not subject or normalize(subject) in subjects:
                return False
            subjects.add(normalize(subject))
            return True

        chosen: list[str] = []
        for rid in sorted(self.shares_template(record), key=lambda rid: _key(seed, record.id, rid)):
            if len(chosen) == k:
                break
            if take(rid):
                chosen.append(rid)
        if len(chosen) < k:
            rng = random.Random(_key(seed, record.id))
            n = len(self.ids)
            # a few at a time (cheap on a large pool), then the rest in a seeded order
            order = rng.sample(range(n), min(n, k + _DRAW_SLACK))
            picked = set(order)
            order += [i for i in rng.sample(range(n), n) if i not in picked] if len(order) < n else []
            for i in order:
                if self.ids[i] not in chosen and take(self.ids[i]):
                    chosen.append(self.ids[i])
                    if len(chosen) == k:
                        break
        return chosen

    def prompts(self, record: EditRecord) -> dict[str, list[tuple[str, str, str]]]:
        """Per evaluation language, ``(prompt, neighbour id, source)`` of each placeable neighbour
        (``source`` one of :data:`SOURCES`); a language without any is left out."""
        chosen = self.neighbours(record)
        same_question = set(self.shares_template(record))
        out: dict[str, list[tuple[str, str, str]]] = {}
        for lang in self.languages:
            f = record.languages.get(lang)
            if f is None:
                continue
            own_template = template_of(f.subject, f.prompt)
            own_prompts = {normalize(p) for p in (f.prompt, *f.paraphrases)}
            got: list[tuple[str, str, str]] = []
            seen: set[str] = set()
            for rid in chosen:
                subject, prompt = self._facts[rid].get(lang, (None, None))
                if prompt is None:
                    continue
                if own_template is not None and template_of(subject, prompt) == own_template:
                    text, source = prompt, "template"
                elif own_template is not None and subject:
                    text, source = own_template.replace(_HOLE, subject), "subject"
                elif rid in same_question:
                    text, source = prompt, "edit_template"
                else:
                    continue
                norm = normalize(text)
                if norm in own_prompts or norm in seen:
                    continue
                seen.add(norm)
                got.append((text, rid, source))
            if got:
                out[lang] = got
        return out


def neighbour_pool(records, languages: list[str], edit_language: str, cfg: NeighbourhoodConfig) -> NeighbourPool | None:
    """The run's records (every rank's: the same pool everywhere) indexed for neighbour prompts; ``None``, with a
    warning, when the DataModule offers none."""
    from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

    if records is None:
        rank_zero_warn("EditEvaluation: the DataModule offers no `all_records` or `records`: no neighbour "
                       "records to draw from, so no neighborhood measure")
        return None
    start = time.perf_counter()
    pool = NeighbourPool(records, languages, edit_language, cfg)
    rank_zero_info(f"neighbourhood: {len(pool)} records to draw {cfg.per_edit} neighbours per edit "
                   f"from (seed {cfg.seed}; {time.perf_counter() - start:.1f} s)")
    return pool

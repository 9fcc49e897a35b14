"""The edit objective shared by every trained method: its settings, its rows and its value.

An edit trains on *units*: one per record and training language, each a
prompt with its new target (NLL, mean over the target's tokens) and, where the
record has one, its old target (sequence probability, pushed down). Optional
anchors add KL(pre-edit || edited) of the next-token distribution on unrelated
prompts. The stopping rule reads the loss and P(target_new).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from mke_lightning.data.records import EditRecord, join_prompt
from mke_lightning.localization.background import unrelated_prompts
from mke_lightning.modeling.forward import encode_continuation, encode_prompt, kept_logits, pack


@dataclass
class EditLossConfig:
    """The edit objective and its stopping rule (defaults: the MEMLA authors')."""

    new_weight: float = 2.5
    """Weight of NLL(target_new | prompt), mean over target tokens."""
    true_weight: float = 2.0
    """Weight of P(target_true | prompt) (sequence probability); skipped where a record has no old target."""
    kl_weight: float = 0.0
    """Weight of KL(pre-edit || edited) of the next-token distribution on unrelated anchor prompts."""
    anchors: str | None = None
    """JSON file ``{lang: [prompt, ...]}`` of anchor prompts for the KL term (default: the packaged set)."""
    anchor_languages: list[str] | None = None
    """Languages of the anchors used (default: the edit language only; each anchor adds a row to every step)."""
    neighbour_weight: float = 0.0
    """Weight of KL(pre-edit || edited) on the edit's own prompt asked about other subjects (its subject
    replaced by names from ``neighbour_subjects``), at the last prompt position: the edit should change
    what is said about its subject, not the answer to its question about anything. 0: off."""
    neighbour_subjects: str | None = None
    """JSON file ``{lang: [name, ...]}`` of replacement subjects (default: the packaged list). Names that
    are the subject of any record of the run are never used, so no evaluated prompt is trained on."""
    neighbours: int = 4
    """Replacement subjects per edit and training language (drawn by a rule seeded with the record's id)."""
    max_steps: int = 60
    """Optimisation steps per edit at most."""
    stop_loss: float = 0.01
    """Stop when the loss falls below this."""
    stop_prob: float = 0.96
    """Stop when P(target_new | prompt) exceeds this."""
    length_groups: int = 3
    """Forward passes per step at most: the step's rows (languages, anchors) grouped by length, each group
    padded only to its own longest row; 1: one padded batch. Speed only, the loss is the same.
    One process only (several ranks keep one pass, so that their passes stay in step)."""

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError("loss.max_steps must be >= 1")
        if self.length_groups < 1:
            raise ValueError("loss.length_groups must be >= 1")
        if self.neighbour_weight < 0 or self.neighbours < 1:
            raise ValueError("loss.neighbour_weight must be >= 0 and loss.neighbours >= 1")


Unit = tuple[int, int, "int | None"]  # (record index, new-target row, old-target row or None)


def training_rows(tokenizer, records: list[EditRecord], languages: list[str], edit_language: str,
                  cfg: EditLossConfig) -> tuple[list[list[int]], list[list[int]], list[Unit]]:
    """Prompt and target token rows, and the training units: one per record and training language it has."""
    prompts, targets, units = [], [], []
    for k, record in enumerate(records):
        for lang in languages:
            if lang not in record.languages and lang != edit_language:
                continue  # a record without this training language trains on the others
            facts = record.facts(lang)
            prompt, new = join_prompt(facts.prompt, facts.target_new, lang)
            p_ids = encode_prompt(tokenizer, prompt)
            new_row, true_row = len(targets), None
            prompts.append(p_ids)
            targets.append(encode_continuation(tokenizer, new))
            if facts.target_true and cfg.true_weight:
                true_row = len(targets)
                prompts.append(p_ids)
                targets.append(encode_continuation(tokenizer, join_prompt(facts.prompt, facts.target_true, lang)[1]))
            units.append((k, new_row, true_row))
    return prompts, targets, units


def edit_loss(lp: list[torch.Tensor], units: list[Unit], cfg: EditLossConfig, n_units: int) -> torch.Tensor:
    """The units' loss, divided by the whole batch's unit count ``n_units``; ``lp[i]``: row i's ``[len(target)]`` log-probs."""
    loss = lp[0].new_zeros((), dtype=torch.float32)
    for _, i, j in units:
        loss = loss + cfg.new_weight * (-lp[i].sum() / lp[i].numel())
        if j is not None:
            loss = loss + cfg.true_weight * lp[j].sum().exp()
    return loss / n_units


class AnchorKL:
    """The anchors' KL term: pre-edit next-token distributions on unrelated prompts, taken once."""

    def __init__(self, cfg: EditLossConfig, edit_language: str) -> None:
        self.cfg = cfg
        self.edit_language = edit_language
        self.ids: list[list[int]] = []  # token rows of the anchors
        self.logp: torch.Tensor | None = None  # [A, V] pre-edit log-probs at the anchors' last position

    def prompts(self) -> list[str]:
        data = unrelated_prompts(self.cfg.anchors)
        langs = self.cfg.anchor_languages or [self.edit_language]
        return [p for lang in langs for p in data.get(lang, [])]

    @torch.no_grad()
    def prepare(self, model, tokenizer, device) -> None:
        """Take the pre-edit distributions (once; nothing when the KL weight is 0)."""
        if self.cfg.kl_weight <= 0 or self.logp is not None:
            return
        self.ids = [encode_prompt(tokenizer, p) for p in self.prompts()]
        batch = pack(self.ids, [[0]] * len(self.ids), tokenizer.pad_token_id).to(device)
        self.logp = torch.log_softmax(kept_logits(model, batch)[:, -1].float(), -1)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """KL(pre-edit || now), mean over the anchors: ``logits`` ``[A, V]`` at their last positions."""
        return kl_from(self.logp, logits)


class NeighbourKL:
    """The neighbours' KL term: the edit prompt with its subject replaced by other names, held to the
    pre-edit model's next-token distribution at the last position.

    Keying a fact to its subject is what separates "the answer about Y changed" from "the answer to this
    question changed"; these rows say so to the optimiser. The names come from a fixed list (never a
    subject of the run's records: :meth:`exclude`), so the evaluation's neighbourhood prompts, built from
    the run's own subjects, are never among them.
    """

    def __init__(self, cfg: EditLossConfig, languages: list[str]) -> None:
        self.cfg = cfg
        self.languages = languages
        if cfg.neighbour_subjects:
            text = Path(cfg.neighbour_subjects).read_text(encoding="utf-8")
        else:
            text = resources.files("mke_lightning.data").joinpath("neighbour_subjects.json").read_text(encoding="utf-8")
        self.names: dict[str, list[str]] = json.loads(text)
        self.excluded: set[str] = set()

    def exclude(self, subjects) -> None:
        """Never use these names (the subjects of the run's records, in any language)."""
        self.excluded |= {s.strip().casefold() for s in subjects if s}

    def prompts(self, record: EditRecord) -> list[str]:
        """The record's training prompts with the subject replaced (none where the subject is not in the prompt)."""
        out = []
        for lang in self.languages:
            if lang not in record.languages:
                continue
            facts = record.facts(lang)
            if not facts.subject or facts.subject not in facts.prompt:
                continue
            pool = [n for n in self.names.get(lang, []) if n.casefold() not in self.excluded
                    and n.casefold() != facts.subject.casefold()]
            start = zlib.crc32(f"{record.id}/{lang}".encode()) % max(len(pool), 1)
            picked = [pool[(start + i) % len(pool)] for i in range(min(self.cfg.neighbours, len(pool)))]
            out += [facts.prompt.replace(facts.subject, name) for name in picked]
        return out

    @torch.no_grad()
    def rows(self, model, tokenizer, records: list[EditRecord], device) -> tuple[list[list[int]], torch.Tensor | None]:
        """Token rows of the records' neighbour prompts and their pre-edit log-probs ``[N, V]`` at the last position."""
        if self.cfg.neighbour_weight <= 0:
            return [], None
        ids = [encode_prompt(tokenizer, p) for r in records for p in self.prompts(r)]
        if not ids:
            return [], None
        batch = pack(ids, [[0]] * len(ids), tokenizer.pad_token_id).to(device)
        return ids, torch.log_softmax(kept_logits(model, batch)[:, -1].float(), -1)


def kl_from(logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(pre || now) mean over rows: ``logp`` ``[N, V]`` pre-edit log-probs, ``logits`` ``[N, V]`` now."""
    post = torch.log_softmax(logits.float(), -1)  # [N, V]
    return (logp.exp() * (logp - post)).sum(-1).mean()

"""Evaluating one edit in every evaluation language, batched.

Measures per language: ``reliability`` (edit prompt -> new target),
``generality`` (paraphrases -> new target), ``locality`` (unrelated prompts:
agreement with the pre-edit model's own continuation), ``locality_gold``
(unrelated prompts -> their gold answer) and ``portability`` (questions whose
answer follows from the edit).

Metric protocols (every reported number names one):

* ``token_acc``: teacher-forced argmax accuracy over the target tokens (partial credit);
* ``gen_em``: greedy generation, normalised (NFKC, case-folded, punctuation
  removed, whitespace collapsed); a hit when the generation starts with the
  answer or one of its aliases at a word boundary (a plain prefix for
  languages written without spaces). For ``locality`` it is a hit when the
  post-edit generation starts with the pre-edit generation.

All teacher-forced rows of an edit go through the model in one padded batch
(chunked by ``batch_rows``), and all generations in one ``generate`` call.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

import torch

from mke_lightning.records import NO_SPACE_LANGUAGES, EditRecord, join_prompt
from mke_lightning.scoring import encode_continuation, encode_prompt, greedy_generate, kept_logits, pack, token_accuracy

MEASURES = ("reliability", "generality", "locality", "locality_gold", "portability")
PROTOCOLS = ("token_acc", "gen_em")
_EXTRA_GEN_TOKENS = 2  # room to see where the answer's word ends, or a word the model spells in more tokens


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    return re.sub(r"\s+", " ", text).strip()


def starts_with_answer(generated: str, answers: tuple[str, ...], lang: str) -> bool:
    gen = normalize(generated)
    for ans in answers:
        a = normalize(ans)
        if not a:
            continue
        if lang in NO_SPACE_LANGUAGES:
            if gen.startswith(a):
                return True
        elif gen == a or gen.startswith(a + " "):
            return True
    return False


@dataclass
class Item:
    lang: str
    measure: str
    prompt: str
    answers: tuple[str, ...]


def build_items(record: EditRecord, eval_languages: list[str]) -> list[Item]:
    items = []
    for lang in eval_languages:
        f = record.facts(lang)
        items.append(Item(lang, "reliability", f.prompt, (f.target_new,)))
        items += [Item(lang, "generality", p, (f.target_new,)) for p in f.paraphrases]
        for probe in f.locality:
            items.append(Item(lang, "locality", probe.prompt, probe.answers))
            items.append(Item(lang, "locality_gold", probe.prompt, probe.answers))
        items += [Item(lang, "portability", p.prompt, p.answers) for p in f.portability]
    return items


class EditEvaluator:
    """Scores items of a record; locality needs the pre-edit references first."""

    def __init__(self, tokenizer, batch_rows: int = 32) -> None:
        self.tokenizer = tokenizer
        self.batch_rows = batch_rows

    def _encode(self, item: Item) -> tuple[list[int], list[int]]:
        prompt, cont = join_prompt(item.prompt, item.answers[0], item.lang)
        return encode_prompt(self.tokenizer, prompt), encode_continuation(self.tokenizer, cont)

    @torch.no_grad()
    def references(self, model, items: list[Item]) -> dict[int, list[int]]:
        """Pre-edit greedy continuation of each locality item (as long as its gold answer)."""
        loc = [i for i, it in enumerate(items) if it.measure == "locality"]
        if not loc:
            return {}
        enc = [self._encode(items[i]) for i in loc]
        width = max(len(t) for _, t in enc)
        gens = greedy_generate(model, self.tokenizer, [p for p, _ in enc], width, stop_at_eos=False)
        return {i: g[: len(t)] for i, (_, t), g in zip(loc, enc, gens)}

    @torch.no_grad()
    def score(self, model, items: list[Item], refs: dict[int, list[int]]) -> list[dict]:
        """One row per item: ``token_acc`` and ``gen_em``."""
        enc = [self._encode(it) for it in items]
        targets = [refs[i] if items[i].measure == "locality" else t for i, (_, t) in enumerate(enc)]
        acc = self._teacher_forced_accuracy(model, [p for p, _ in enc], targets)
        width = max(len(t) for t in targets) + _EXTRA_GEN_TOKENS
        unique = list(dict.fromkeys(tuple(p) for p, _ in enc))  # locality and locality_gold share prompts
        gen_of = dict(zip(unique, greedy_generate(model, self.tokenizer, [list(p) for p in unique], width)))
        gens = [gen_of[tuple(p)] for p, _ in enc]
        rows = []
        for i, (it, gen) in enumerate(zip(items, gens)):
            if it.measure == "locality":
                ref = refs[i]
                hit = gen[: len(ref)] == ref
            else:
                hit = starts_with_answer(self.tokenizer.decode(gen, skip_special_tokens=True), it.answers, it.lang)
            rows.append({"eval_lang": it.lang, "measure": it.measure, "token_acc": acc[i], "gen_em": float(hit)})
        return rows


    def _teacher_forced_accuracy(self, model, prompts: list[list[int]], targets: list[list[int]]) -> list[float]:
        """token_acc per row; identical rows run once, and rows are grouped by
        target length so the LM head projects no position that is not needed."""
        device = next(model.parameters()).device
        unique = list(dict.fromkeys((tuple(p), tuple(t)) for p, t in zip(prompts, targets)))
        by_len: dict[int, list[tuple]] = {}
        for key in unique:
            by_len.setdefault(len(key[1]), []).append(key)
        result: dict[tuple, float] = {}
        for keys in by_len.values():
            for s in range(0, len(keys), self.batch_rows):
                chunk = keys[s:s + self.batch_rows]
                batch = pack([k[0] for k in chunk], [k[1] for k in chunk], self.tokenizer.pad_token_id).to(device)
                result.update(zip(chunk, token_accuracy(kept_logits(model, batch), batch).tolist()))
        return [result[(tuple(p), tuple(t))] for p, t in zip(prompts, targets)]


def target_group(record: EditRecord, edit_language: str, lang: str) -> str:
    """``edit`` for the edit language; else ``identical`` when the new target is
    the same string as the edit language's (a copy suffices), or ``translated``."""
    if lang == edit_language:
        return "edit"
    same = normalize(record.facts(lang).target_new) == normalize(record.facts(edit_language).target_new)
    return "identical" if same else "translated"

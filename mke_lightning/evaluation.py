"""Evaluating one edit in every evaluation language, batched.

Measures per language (``MEASURES``):

* ``reliability``: the edit prompt -> the new target;
* ``generality``: the paraphrases -> the new target;
* ``locality``: unrelated prompts, scored against the pre-edit model's own
  greedy continuation (agreement: did the edit leave them alone?);
* ``locality_gold``: the same prompts against their gold answer;
* ``portability``: questions whose answer follows from the edit;
* ``multi_hop``: questions tied to the edit (MLaKE multi-hop, MQuAKE), whose
  answer changes with it; the headline protocol is ``gen_em`` with aliases.

Every item is scored under every protocol of :mod:`mke_lightning.metrics`
that applies to it (``prob`` needs the old target: reliability and
generality of records that have one; elsewhere it is ``None``).

Batching: all teacher-forced rows of an edit (every language and measure,
new and old targets) go through the model in padded batches grouped by
target length (``batch_rows`` rows at most), and all prompts of the edit are
generated in one ``generate`` call; identical rows run once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mke_lightning.metrics import exact_match, f1_scores, normalize, prefers_new, starts_with_answer
from mke_lightning.records import EditRecord, join_prompt
from mke_lightning.scoring import encode_continuation, encode_prompt, greedy_generate, kept_logits, pack, teacher_forced

MEASURES = ("reliability", "generality", "locality", "locality_gold", "portability", "multi_hop")
GROUPS = ("edit", "identical", "translated")
_EXTRA_GEN_TOKENS = 2  # room to see where the answer's word ends, or a word the model spells in more tokens

__all__ = ["MEASURES", "GROUPS", "Item", "build_items", "EditEvaluator", "target_group", "normalize", "starts_with_answer"]


@dataclass(frozen=True)
class Item:
    """One prompt to score: ``answers[0]`` is the teacher-forced target, all of them count for ``gen_em``."""

    lang: str
    measure: str
    prompt: str
    answers: tuple[str, ...]
    old: str | None = None  # the old target, for the ``prob`` protocol


def build_items(record: EditRecord, eval_languages: list[str], measures: tuple[str, ...] = MEASURES) -> list[Item]:
    """The items of one record in each evaluation language, for the chosen measures."""
    unknown = set(measures) - set(MEASURES)
    if unknown:
        raise ValueError(f"unknown measures {sorted(unknown)}; choose from {list(MEASURES)}")
    items: list[Item] = []
    for lang in eval_languages:
        f = record.facts(lang)
        new = tuple(dict.fromkeys((f.target_new, *f.target_new_aliases)))
        if "reliability" in measures:
            items.append(Item(lang, "reliability", f.prompt, new, f.target_true))
        if "generality" in measures:
            items += [Item(lang, "generality", p, new, f.target_true) for p in f.paraphrases]
        for probe in f.locality:
            if "locality" in measures:
                items.append(Item(lang, "locality", probe.prompt, probe.answers))
            if "locality_gold" in measures:
                items.append(Item(lang, "locality_gold", probe.prompt, probe.answers))
        if "portability" in measures:
            items += [Item(lang, "portability", p.prompt, p.answers) for p in f.portability]
        if "multi_hop" in measures:
            items += [Item(lang, "multi_hop", p.prompt, p.answers) for p in f.multi_hop]
    return items


def target_group(record: EditRecord, edit_language: str, lang: str) -> str:
    """``edit`` for the edit language; else ``identical`` when the new target is
    the same string as the edit language's (a copy suffices), or ``translated``."""
    if lang == edit_language:
        return "edit"
    same = normalize(record.facts(lang).target_new) == normalize(record.facts(edit_language).target_new)
    return "identical" if same else "translated"


class EditEvaluator:
    """Scores items of a record; locality needs the pre-edit references first.

    Args:
        tokenizer: the model's tokenizer (with a pad token).
        batch_rows: teacher-forced rows per forward pass at most.
        max_new_tokens: cap on the generation length (the longest answer or alias, plus two).
    """

    def __init__(self, tokenizer, batch_rows: int = 32, max_new_tokens: int = 24) -> None:
        if batch_rows < 1 or max_new_tokens < 1:
            raise ValueError("batch_rows and max_new_tokens must be >= 1")
        self.tokenizer = tokenizer
        self.batch_rows = batch_rows
        self.max_new_tokens = max_new_tokens

    def _target(self, item: Item, answer: str) -> tuple[list[int], list[int]]:
        prompt, cont = join_prompt(item.prompt, answer, item.lang)
        return encode_prompt(self.tokenizer, prompt), encode_continuation(self.tokenizer, cont)

    @torch.no_grad()
    def references(self, model, items: list[Item]) -> dict[int, list[int]]:
        """Pre-edit greedy continuation of each locality item: as many tokens as its gold
        answer, or fewer ending with the end token where the model stops earlier."""
        loc = [i for i, it in enumerate(items) if it.measure == "locality"]
        if not loc:
            return {}
        enc = [self._target(items[i], items[i].answers[0]) for i in loc]
        width = max(len(t) for _, t in enc)
        gens = greedy_generate(model, self.tokenizer, [p for p, _ in enc], width, keep_end=True)
        refs = {i: g[: len(t)] for i, (_, t), g in zip(loc, enc, gens)}
        empty = [i for i, r in refs.items() if not r]
        if empty:
            raise ValueError(f"no pre-edit continuation for locality items {empty} (the tokenizer has no end token?)")
        return refs

    @torch.no_grad()
    def score(self, model, items: list[Item], refs: dict[int, list[int]]) -> list[dict]:
        """One row per item: ``eval_lang``, ``measure`` and a value per protocol (``prob`` may be ``None``)."""
        if not items:
            return []
        missing = [i for i, it in enumerate(items) if it.measure == "locality" and i not in refs]
        if missing:
            raise ValueError(f"locality items {missing} have no pre-edit reference: call references() before the edit")
        enc = [self._target(it, it.answers[0]) for it in items]
        prompts = [p for p, _ in enc]
        targets = [refs[i] if it.measure == "locality" else t for i, (it, (_, t)) in enumerate(zip(items, enc))]
        olds = {i: self._target(it, it.old)[1] for i, it in enumerate(items) if it.old and it.measure != "locality"}
        rows_tf = [(p, t) for p, t in zip(prompts, targets)] + [(prompts[i], t) for i, t in olds.items()]
        tf = self._teacher_forced(model, rows_tf)

        width = max(len(t) for t in targets)
        for it in items:  # an alias may be longer than the answer
            if it.measure != "locality":
                width = max(width, *(len(self._target(it, a)[1]) for a in it.answers[1:]), 0)
        width = min(width + _EXTRA_GEN_TOKENS, self.max_new_tokens)
        unique = list(dict.fromkeys(tuple(p) for p in prompts))  # locality and locality_gold share prompts
        gen_of = dict(zip(unique, greedy_generate(model, self.tokenizer, [list(p) for p in unique], width)))

        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)
        rows = []
        for i, it in enumerate(items):
            acc, predicted, logp = tf[(tuple(prompts[i]), tuple(targets[i]))]
            gen = gen_of[tuple(prompts[i])]
            if it.measure == "locality":
                ref = refs[i]
                gold_text = decode(ref)
                ends = ref[-1] in self._end_ids(model)  # the pre-edit model stopped there: so must the edited one
                body = ref[:-1] if ends else ref
                gen_hit = gen[: len(body)] == body and (not ends or len(gen) == len(body))
            else:
                gold_text = it.answers[0]
                gen_hit = starts_with_answer(decode(gen), it.answers, it.lang)
            pred_text = decode(predicted)
            f1, f1_legacy = f1_scores(pred_text, gold_text, it.lang)
            prob = None
            if i in olds:
                prob = prefers_new(logp, tf[(tuple(prompts[i]), tuple(olds[i]))][2])
            rows.append({
                "eval_lang": it.lang, "measure": it.measure,
                "token_acc": acc, "em": exact_match(pred_text, gold_text), "f1": f1, "f1_legacy": f1_legacy,
                "prob": prob, "gen_em": float(gen_hit),
            })
        return rows

    def _end_ids(self, model) -> set[int]:
        ids = getattr(model.generation_config, "eos_token_id", None)
        ids = set(ids if isinstance(ids, (list, tuple)) else [] if ids is None else [ids])
        return ids | ({self.tokenizer.eos_token_id} - {None})

    def _teacher_forced(self, model, rows: list[tuple[list[int], list[int]]]) -> dict[tuple, tuple[float, list[int], float]]:
        """``(prompt, target) -> (token_acc, argmax tokens, mean log-prob)``; identical rows run
        once, and rows are grouped by target length so the LM head projects no position not needed."""
        device = next(model.parameters()).device
        unique = list(dict.fromkeys((tuple(p), tuple(t)) for p, t in rows))
        by_len: dict[int, list[tuple]] = {}
        for key in unique:
            by_len.setdefault(len(key[1]), []).append(key)
        result: dict[tuple, tuple[float, list[int], float]] = {}
        for keys in by_len.values():
            for s in range(0, len(keys), self.batch_rows):
                chunk = keys[s:s + self.batch_rows]
                batch = pack([k[0] for k in chunk], [k[1] for k in chunk], self.tokenizer.pad_token_id).to(device)
                out = teacher_forced(kept_logits(model, batch), batch)
                result.update(zip(chunk, zip(out.accuracy.tolist(), out.predicted, out.mean_logprob.tolist())))
        return result

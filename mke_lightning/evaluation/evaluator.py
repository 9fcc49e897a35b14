"""Evaluating one edit in every evaluation language, batched.

Measures per language (``MEASURES``):

* ``reliability``: the edit prompt -> the new target;
* ``generality``: the paraphrases -> the new target;
* ``locality``: unrelated prompts, scored against the pre-edit model's own
  greedy continuation (agreement: did the edit leave them alone?);
* ``locality_gold``: the same prompts against their gold answer;
* ``neighborhood``: the edit's question about other subjects of the run
  (:mod:`mke_lightning.evaluation.neighbourhood`), scored as ``locality`` against the
  pre-edit model's own continuation (as many tokens as the edit's new target);
* ``portability``: questions whose answer follows from the edit;
* ``multi_hop``: questions tied to the edit (MLaKE multi-hop, MQuAKE), whose
  answer changes with it; the headline protocol is ``gen_em`` with aliases.

Every item is scored under every protocol of :mod:`mke_lightning.evaluation.metrics`
that applies to it (``prob`` needs the old target: reliability and
generality of records that have one; elsewhere it is ``None``).

Batching: every distinct prompt of an edit (every language and measure) goes
through the model once, ``batch_rows`` prompts per padded batch; its targets
(new, old, locality reference) are scored and its greedy continuation
decoded from that pass's KV cache, each continuation leaving the batch when
it reaches its own length or an end token. Identical rows run once.
Neighbourhood items go through passes of their own, so that the batches of
the other measures (and their figures) are those of a run without them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from mke_lightning.data.records import EditRecord, join_prompt
from mke_lightning.evaluation.metrics import exact_match, f1_scores, normalize, prefers_new, starts_with_answer
from mke_lightning.modeling.forward import encode_continuation, encode_prompt
from mke_lightning.modeling.prefix_scoring import TargetScore, prefill, score_and_continue, score_targets

MEASURES = ("reliability", "generality", "locality", "locality_gold", "neighborhood", "portability", "multi_hop")
# measures scored against the pre-edit model's own continuation (a reference taken before the edit)
REFERENCE_MEASURES = ("locality", "neighborhood")
_APART = ("neighborhood",)  # measures scored in passes of their own
GROUPS = ("edit", "identical", "translated")
_EXTRA_GEN_TOKENS = 2  # room to see where the answer's word ends, or a word the model spells in more tokens

__all__ = [
    "MEASURES",
    "REFERENCE_MEASURES",
    "GROUPS",
    "Item",
    "ScorePlan",
    "build_items",
    "EditEvaluator",
    "target_group",
    "normalize",
    "starts_with_answer",
]


@dataclass(frozen=True)
class Item:
    """One prompt to score: ``answers[0]`` is the teacher-forced target, all of them count for ``gen_em``."""

    lang: str
    measure: str
    prompt: str
    answers: tuple[str, ...]
    old: str | None = None  # the old target, for the ``prob`` protocol


@dataclass
class ScorePlan:
    """What scoring a list of items asks of the model (see :meth:`EditEvaluator.plan`)."""

    prompts: list[tuple]  # prompt ids of each item
    targets: list[tuple]  # teacher-forced target ids of each item (a locality item: its reference)
    olds: dict[int, tuple]  # item index -> old-target ids, for the ``prob`` protocol
    widths: list[int]  # generation width of each item
    rows: list[tuple[tuple, tuple]]  # distinct (prompt, target) rows to teacher-force
    prompt_widths: dict[tuple, int]  # distinct prompt -> the widest of its items' widths


def build_items(record: EditRecord, eval_languages: list[str], measures: tuple[str, ...] = MEASURES,
                neighbours: Mapping[str, Sequence] | None = None) -> list[Item]:
    """The items of one record in each evaluation language, for the chosen measures.

    ``neighbours``: per language, the record's neighbour prompts (a prompt, or a tuple whose first
    element is the prompt: :meth:`~mke_lightning.evaluation.neighbourhood.NeighbourPool.prompts`); without
    them there is no ``neighborhood`` item. Each one's teacher-forced answer is the record's new
    target, which only sets the length of the pre-edit reference.
    """
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
        if "neighborhood" in measures and neighbours:
            for entry in neighbours.get(lang, ()):
                items.append(Item(lang, "neighborhood", entry if isinstance(entry, str) else entry[0], (f.target_new,)))
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
        batch_rows: prompts (and teacher-forced rows) per forward pass at most.
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

    def _width(self, item: Item, target: list[int]) -> int:
        """How many tokens to generate for ``item``: its longest answer (or reference) plus two, capped."""
        longest = len(target)
        if item.measure not in REFERENCE_MEASURES:  # an alias may be longer than the answer
            longest = max(longest, *(len(self._target(item, a)[1]) for a in item.answers[1:]), 0)
        return min(longest + _EXTRA_GEN_TOKENS, self.max_new_tokens)

    @staticmethod
    def _passes(items: list[Item]) -> list[list[int]]:
        """Item indices per pass: the measures of ``_APART`` (one pass each), then all the others."""
        passes = [[i for i, it in enumerate(items) if it.measure not in _APART]]
        passes += [[i for i, it in enumerate(items) if it.measure == m] for m in _APART]
        return [p for p in passes if p]

    @torch.no_grad()
    def references(self, model, items: list[Item]) -> dict[int, list[int]]:
        """Pre-edit greedy continuation of each locality and neighbourhood item: as many tokens as its
        first answer (locality: the gold answer; neighbourhood: the edit's new target), or fewer ending
        with the end token where the model stops earlier."""
        refs: dict[int, list[int]] = {}
        for part in self._passes(items):
            loc = [i for i in part if items[i].measure in REFERENCE_MEASURES]
            if not loc:
                continue
            enc = [self._target(items[i], items[i].answers[0]) for i in loc]
            width: dict[tuple, int] = {}
            for p, t in enc:  # items of one prompt share its continuation
                width[tuple(p)] = max(width.get(tuple(p), 0), len(t))
            gens = self._run(model, [], width, keep_end=True)[1]
            refs.update({i: gens[tuple(p)][: len(t)] for i, (p, t) in zip(loc, enc)})
        empty = [i for i, r in refs.items() if not r]
        if empty:
            raise ValueError(f"no pre-edit continuation for locality items {empty} (the tokenizer has no end token?)")
        return refs

    def plan(self, items: list[Item], refs: dict[int, list[int]]) -> ScorePlan:
        """What scoring ``items`` asks of the model: the teacher-forced rows and each prompt's generation width."""
        missing = [i for i, it in enumerate(items) if it.measure in REFERENCE_MEASURES and i not in refs]
        if missing:
            raise ValueError(f"locality items {missing} have no pre-edit reference: call references() before the edit")
        enc = [self._target(it, it.answers[0]) for it in items]
        prompts = [tuple(p) for p, _ in enc]
        targets = [
            tuple(refs[i]) if it.measure in REFERENCE_MEASURES else tuple(t)
            for i, (it, (_, t)) in enumerate(zip(items, enc))
        ]
        olds = {
            i: tuple(self._target(it, it.old)[1])
            for i, it in enumerate(items)
            if it.old and it.measure not in REFERENCE_MEASURES
        }
        widths = [self._width(it, list(t)) for it, t in zip(items, targets)]
        prompt_widths: dict[tuple, int] = {}
        for p, w in zip(prompts, widths):  # locality and locality_gold share prompts
            prompt_widths[p] = max(prompt_widths.get(p, 0), w)
        rows = list(dict.fromkeys([*zip(prompts, targets), *((prompts[i], t) for i, t in olds.items())]))
        return ScorePlan(prompts, targets, olds, widths, rows, prompt_widths)

    @torch.no_grad()
    def score(self, model, items: list[Item], refs: dict[int, list[int]]) -> list[dict]:
        """One row per item: ``eval_lang``, ``measure`` and a value per protocol (``prob`` may be ``None``).

        Each distinct prompt goes through the model once per pass; its targets
        (new, old, locality reference) are scored and its continuation
        generated from that one pass (:mod:`mke_lightning.modeling.prefix_scoring`).
        Neighbourhood items are scored in a pass of their own.
        """
        missing = [i for i, it in enumerate(items) if it.measure in REFERENCE_MEASURES and i not in refs]
        if missing:
            raise ValueError(f"locality items {missing} have no pre-edit reference: call references() before the edit")
        out: list[dict | None] = [None] * len(items)
        for part in self._passes(items):
            sub = [items[i] for i in part]
            sub_refs = {k: refs[i] for k, i in enumerate(part) if i in refs}
            plan = self.plan(sub, sub_refs)
            scores, gens = self._run(model, plan.rows, plan.prompt_widths)
            for i, row in zip(part, self.rows(model, sub, sub_refs, plan, scores, gens)):
                out[i] = row
        return out  # type: ignore[return-value]

    def rows(self, model, items: list[Item], refs: dict[int, list[int]], plan: ScorePlan,
             scores: dict[tuple, TargetScore], gens: dict[tuple, list[int]]) -> list[dict]:
        """The per-item rows from the teacher-forced ``scores`` of ``plan.rows`` and the
        continuations ``gens`` of each prompt (``plan.prompt_widths`` tokens at most)."""
        prompts, targets, olds, widths = plan.prompts, plan.targets, plan.olds, plan.widths

        def decode(ids):
            return self.tokenizer.decode(ids, skip_special_tokens=True)

        end_ids = self._end_ids(model)
        rows = []
        for i, it in enumerate(items):
            res = scores[(prompts[i], targets[i])]
            gen = gens[prompts[i]][: widths[i]]  # greedy: the item's own width is a prefix of the prompt's
            if it.measure in REFERENCE_MEASURES:
                ref = refs[i]
                gold_text = decode(ref)
                ends = ref[-1] in end_ids  # the pre-edit model stopped there: so must the edited one
                body = ref[:-1] if ends else ref
                gen_hit = gen[: len(body)] == body and (not ends or len(gen) == len(body))
            else:
                gold_text = it.answers[0]
                gen_hit = starts_with_answer(decode(gen), it.answers, it.lang)
            pred_text = decode(res.predicted)
            f1, f1_legacy = f1_scores(pred_text, gold_text, it.lang)
            prob = None
            if i in olds:
                prob = prefers_new(res.mean_logprob, scores[(prompts[i], olds[i])].mean_logprob)
            rows.append({
                "eval_lang": it.lang, "measure": it.measure,
                "token_acc": res.accuracy, "em": exact_match(pred_text, gold_text), "f1": f1, "f1_legacy": f1_legacy,
                "prob": prob, "gen_em": float(gen_hit),
            })
        return rows

    def _end_ids(self, model) -> set[int]:
        ids = getattr(model.generation_config, "eos_token_id", None)
        ids = set(ids if isinstance(ids, (list, tuple)) else [] if ids is None else [ids])
        return ids | ({self.tokenizer.eos_token_id} - {None})

    def _chunks(self, prompts: list[tuple]) -> list[list[tuple]]:
        """Prompts sorted by length (least padding), ``batch_rows`` per chunk."""
        ordered = sorted(prompts, key=len)
        return [ordered[s:s + self.batch_rows] for s in range(0, len(ordered), self.batch_rows)]

    def _run(
        self, model, rows: list[tuple[tuple, tuple]], widths: dict[tuple, int], keep_end: bool = False
    ) -> tuple[dict, dict]:
        """Teacher-forced scores of the ``(prompt, target)`` rows (identical rows once) and the
        greedy continuation of each prompt in ``widths`` (an end token kept with ``keep_end``),
        one prefill per prompt."""
        unique = list(dict.fromkeys(rows))
        by_prompt: dict[tuple, list[tuple]] = {}
        for p, t in unique:
            by_prompt.setdefault(p, []).append(t)
        prompts = list(dict.fromkeys([*by_prompt, *widths]))
        pad = self.tokenizer.pad_token_id
        scores: dict[tuple, TargetScore] = {}
        gens: dict[tuple, list[int]] = {}
        end_ids = self._end_ids(model)
        for chunk in self._chunks(prompts):
            pre = prefill(model, chunk, pad)
            # the first target of each prompt also guides its continuation; any others are scored apart
            others = [(u, p, t) for u, p in enumerate(chunk) for t in by_prompt.get(p, [])[1:]]
            if others:
                got = score_targets(model, pre, [u for u, _, _ in others], [t for _, _, t in others], self.batch_rows)
                scores.update({(p, t): sc for (_, p, t), sc in zip(others, got)})
            first = [by_prompt[p][0] if p in by_prompt else () for p in chunk]
            got, done = score_and_continue(model, pre, first, [widths.get(p, 0) for p in chunk], end_ids, pad, keep_end)
            scores.update({(p, t): sc for p, t, sc in zip(chunk, first, got) if t})
            gens.update((p, g) for p, g in zip(chunk, done) if p in widths)
        return scores, gens

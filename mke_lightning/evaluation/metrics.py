"""Metric protocols: how one prediction is scored against its answer.

Three families of metrics share the same names in knowledge-editing papers,
so every number we report names its protocol (``PROTOCOLS``):

* ``token_acc``: teacher-forced argmax accuracy over the target's tokens
  (EasyEdit's default; partial credit).
* ``em``: the teacher-forced argmax tokens decoded to text equal the target
  text, after :func:`normalize`.
* ``f1``: F1 = 2PR / (P + R) between the words of that decoded text and the
  target's words (characters in languages written without spaces), counted
  as multisets, as SQuAD does: a repeated word is matched at most as often as
  it appears on both sides.
* ``f1_legacy``: P x R, the product form older Bi-ZsRE-based papers report;
  kept by name only for comparison with them.
* ``prob``: P(target_new | prompt) > P(target_true | prompt), with the mean
  per-token log-probability of each target (as ROME's CounterFact metric);
  only where the record has the old target.
* ``gen_em``: greedy generation, normalised; a hit when it starts with the
  answer or one of its aliases at a word boundary (a plain prefix in
  languages written without spaces).

The functions here are pure (text and numbers in, numbers out); the model
side is in :mod:`mke_lightning.evaluation.evaluator`.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

from mke_lightning.data.records import NO_SPACE_LANGUAGES

PROTOCOLS: dict[str, str] = {
    "token_acc": "teacher-forced argmax accuracy over the target tokens (partial credit)",
    "em": "teacher-forced argmax tokens decoded to text, normalised, equal to the target",
    "f1": "teacher-forced decoded text vs target, word-level F1 = 2PR/(P+R) (characters for zh/ja/th)",
    "f1_legacy": "the same P and R combined as P x R (older Bi-ZsRE papers); for comparison only",
    "prob": "P(target_new) > P(target_true), mean per-token log-probability; only with an old target",
    "gen_em": "greedy generation, normalised; starts with the answer or an alias",
}


def normalize(text: str) -> str:
    """NFKC, case-folded, punctuation to spaces, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    return re.sub(r"\s+", " ", text).strip()


def words(text: str, lang: str) -> list[str]:
    """The units F1 counts: normalised words, or characters where words are not spaced."""
    norm = normalize(text)
    if lang in NO_SPACE_LANGUAGES:
        return [ch for ch in norm if not ch.isspace()]
    return norm.split()


def exact_match(predicted: str, gold: str) -> float:
    return float(normalize(predicted) == normalize(gold))


def precision_recall(predicted: list[str], gold: list[str]) -> tuple[float, float]:
    """Multiset overlap: each unit counts at most min(times predicted, times in gold)."""
    common = sum((Counter(predicted) & Counter(gold)).values())
    if common == 0:
        return 0.0, 0.0
    return common / len(predicted), common / len(gold)


def f1_scores(predicted: str, gold: str, lang: str) -> tuple[float, float]:
    """``(f1, f1_legacy)``: 2PR/(P+R) and P x R over :func:`words`; both empty is a full match
    (a locality reference where the pre-edit model said nothing but its end token)."""
    pred, ref = words(predicted, lang), words(gold, lang)
    if not pred and not ref:
        return 1.0, 1.0
    p, r = precision_recall(pred, ref)
    if p + r == 0:
        return 0.0, 0.0
    return 2 * p * r / (p + r), p * r


def starts_with_answer(generated: str, answers: tuple[str, ...], lang: str) -> bool:
    """True when the normalised generation starts with one of ``answers`` (aliases included)."""
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


def prefers_new(logp_new: float, logp_old: float) -> float:
    """``prob``: 1.0 when the new target's mean log-probability beats the old one's."""
    return float(logp_new > logp_old)

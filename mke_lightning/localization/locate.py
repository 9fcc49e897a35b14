"""Neuron localisation for one edit record (MEMLA, and LAFN's reading).

For every language in ``cross_languages`` plus the edit language, the prompts
are the edit prompt and its paraphrases and the answer is the *old* target
(the fact being replaced; where a record has none, the model's own greedy
answer). Scores come from :mod:`mke_lightning.localization.attribution`.

Selection, per prompt: a neuron is kept when it passes every criterion that
is set: score above ``threshold x`` the prompt's maximum (relative), among
the prompt's ``top_k`` highest scores (absolute), in one of ``layers``.

Per language: the neurons kept by at least ``prompt_fraction`` of its prompts.

Categories: *language-independent* neurons are in the sets of at least
``language_fraction`` of the cross languages (1.0: the intersection, as the
MEMLA authors); *language-specific* ones are the edit language's set minus
those. ``max_per_layer`` then caps each layer of each category (highest summed
scores kept). The per-language sets travel with the mask for inspection.

With ``relative_to_background``, each neuron's score is first divided by its
mean |activation| on unrelated prompts (floored at its layer's median), so a
neuron that fires on any text no longer outranks one that fires for this
fact. With ``background`` set, neurons busy on unrelated text are dropped from
every mask after selection (:mod:`mke_lightning.localization.background`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mke_lightning.data.records import EditRecord, RecordError, join_prompt
from mke_lightning.localization.attribution import AttributionConfig, attribute_rows
from mke_lightning.localization.background import BackgroundConfig, usual_activity
from mke_lightning.localization.neurons import NeuronMask
from mke_lightning.modeling.architectures import ArchSpec
from mke_lightning.modeling.forward import encode_continuation, encode_prompt, greedy_generate


@dataclass
class LocalizationConfig:
    """Which neurons an edit may change."""

    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    """How neuron scores are computed (method, IG path, points and quadrature rule, baseline, memory budget)."""
    threshold: float | None = 0.3
    """Keep neurons scoring above this fraction of the prompt's maximum score (null: no relative criterion)."""
    top_k: int | None = None
    """Keep at most this many neurons per prompt, the highest scores (null: no absolute criterion)."""
    layers: list[int] | None = None
    """Layers that may hold neurons (null: every layer); negative indices count from the last layer."""
    cross_languages: list[str] = field(default_factory=lambda: ["en", "zh", "fr"])
    """Languages whose shared neurons are the language-independent set."""
    prompt_fraction: float = 0.5
    """A language keeps a neuron kept by at least this fraction of its prompts."""
    language_fraction: float = 1.0
    """Language-independent: in the sets of at least this fraction of the cross languages (1.0: all)."""
    max_per_layer: int | None = None
    """Optional cap on neurons per layer and category (highest scores kept)."""
    use_paraphrases: bool = True
    """Attribute the paraphrases as well as the edit prompt."""
    max_paraphrases: int | None = None
    """Paraphrases per language attributed, the first ones (null: all)."""
    templates: list[str] = field(default_factory=list)
    """Extra prompts made from each language's edit prompt, each template holding ``{prompt}``
    (e.g. ``"Q: {prompt} A:"``); attributed like paraphrases."""
    background: BackgroundConfig | None = None
    """Drop neurons busy on unrelated text from every mask (null: keep them, as the authors);
    applied after the mask cache (:mod:`mke_lightning.localization.background`)."""
    relative_to_background: bool = False
    """Divide every neuron's score by its mean |activation| on unrelated prompts, floored at its
    layer's median, before selection (the prompts of ``background`` when set, else the packaged
    ones). Ranks neurons by how much more active they are for this fact than usual."""

    def __post_init__(self) -> None:
        if self.threshold is None and self.top_k is None:
            raise ValueError("localization needs a selection criterion: set threshold, top_k, or both")
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"localization.threshold must be in (0, 1] or null, got {self.threshold}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"localization.top_k must be >= 1 or null, got {self.top_k}")
        if self.max_per_layer is not None and self.max_per_layer < 1:
            raise ValueError(f"localization.max_per_layer must be >= 1 or null, got {self.max_per_layer}")
        if self.layers is not None and not self.layers:
            raise ValueError("localization.layers is empty; use null for every layer")
        for name in ("prompt_fraction", "language_fraction"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"localization.{name} must be in (0, 1], got {value}")
        if not self.cross_languages:
            raise ValueError("localization.cross_languages is empty")
        for t in self.templates:
            if "{prompt}" not in t:
                raise ValueError(f"localization.templates: {t!r} has no {{prompt}} slot")
        if self.max_paraphrases is not None and self.max_paraphrases < 0:
            raise ValueError(f"localization.max_paraphrases must be >= 0 or null, got {self.max_paraphrases}")


def old_answers(model, tokenizer, entries: list[tuple[list[int], str, str, str | None]]) -> list[list[int]]:
    """Answer ids per (prompt ids, lang, target_new, target_true): the old target,
    or where there is none the model's own greedy answer (one batched call)."""
    answers: list[list[int] | None] = []
    missing: list[tuple[int, int]] = []  # (entry index, tokens wanted)
    for i, (_, lang, new, old) in enumerate(entries):
        if old:
            answers.append(encode_continuation(tokenizer, join_prompt("x", old, lang)[1]))
        else:
            answers.append(None)
            missing.append((i, len(encode_continuation(tokenizer, join_prompt("x", new, lang)[1]))))
    if missing:
        width = max(n for _, n in missing)
        gens = greedy_generate(model, tokenizer, [entries[i][0] for i, _ in missing], width, stop_at_eos=False)
        for (i, n), gen in zip(missing, gens):
            answers[i] = gen[:n]
    return answers


def answer_rows(
    model, tokenizer, prompts: list[tuple[list[int], list[int]]]
) -> tuple[list[list[int]], list[int], list[int]]:
    """One row per (prompt, answer token): ``(rows, target ids, prompt index)``.

    For answer token j the row is the prompt followed by the model's own first
    j greedy tokens (the authors' way of scoring multi-token answers)."""
    longest = max(len(ans) for _, ans in prompts)
    own = greedy_generate(model, tokenizer, [p for p, _ in prompts], max(longest - 1, 1), stop_at_eos=False)
    rows, targets, owner = [], [], []
    for k, ((p, ans), gen) in enumerate(zip(prompts, own)):
        for j, tok in enumerate(ans):
            rows.append(list(p) + gen[:j])
            targets.append(tok)
            owner.append(k)
    return rows, targets, owner


def sum_per_prompt(scores: torch.Tensor, owner: list[int], n_prompts: int) -> torch.Tensor:
    """Row scores ``[R, L, F]`` summed into their prompts: ``[P, L, F]``."""
    owner_t = torch.tensor(owner, device=scores.device)
    return torch.zeros((n_prompts, *scores.shape[1:]), device=scores.device).index_add_(0, owner_t, scores)


def prompt_scores(
    model, tokenizer, arch: ArchSpec, prompts: list[tuple[list[int], list[int] | None]], cfg: AttributionConfig
) -> torch.Tensor:
    """Scores ``[P, L, d_ff]`` for (prompt ids, answer ids) pairs, summed over answer tokens.

    With ``method: activation`` the answers are not used (pass ``None``)."""
    if not cfg.needs_answer:
        return attribute_rows(model, arch, [p for p, _ in prompts], None, cfg, pad_id=tokenizer.pad_token_id)
    rows, targets, owner = answer_rows(model, tokenizer, prompts)
    scores = attribute_rows(
        model, arch, rows, targets, cfg, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
        skip_first=tokenizer.bos_token_id is not None,
    )  # [rows, L, F]
    return sum_per_prompt(scores, owner, len(prompts))


def select_neurons(scores: torch.Tensor, cfg: LocalizationConfig) -> torch.Tensor:
    """Boolean ``[P, L, d_ff]``: the neurons each prompt keeps (every set criterion holds)."""
    n_prompts, n_layers, width = scores.shape
    keep = scores > 0
    if cfg.layers is not None:
        allowed = torch.zeros(n_layers, dtype=torch.bool, device=scores.device)
        for layer in cfg.layers:
            if not -n_layers <= layer < n_layers:
                raise ValueError(f"localization.layers holds {layer}, but the model has {n_layers} layers")
            allowed[layer] = True
        keep &= allowed[None, :, None]
        scores = scores.masked_fill(~allowed[None, :, None], float("-inf"))
    if cfg.threshold is not None:
        peak = scores.flatten(1).max(dim=1).values.clamp(min=0)  # [P]
        keep &= scores > cfg.threshold * peak[:, None, None]
    if cfg.top_k is not None:
        k = min(cfg.top_k, n_layers * width)
        top = scores.flatten(1).topk(k, dim=1).indices  # [P, k]
        in_top = torch.zeros((n_prompts, n_layers * width), dtype=torch.bool, device=scores.device)
        in_top.scatter_(1, top, True)
        keep &= in_top.view_as(keep)
    return keep


def _check_languages(record: EditRecord, cfg: LocalizationConfig, edit_language: str) -> list[str]:
    missing = [l for l in dict.fromkeys([*cfg.cross_languages, edit_language]) if l not in record.languages]
    if missing:
        raise RecordError(
            f"language(s) {missing} missing (record has {sorted(record.languages)}); "
            "set localization.cross_languages (and the edit language) to languages the data has",
            record_id=record.id, field="languages",
        )
    return list(dict.fromkeys([*cfg.cross_languages, edit_language]))


def localisation_prompts(
    tokenizer, record: EditRecord, languages: list[str], cfg: LocalizationConfig
) -> tuple[list[tuple[list[int], str, str, str | None]], list[str]]:
    """``(entries, language of each)``; an entry is (prompt ids, language, target_new, target_true)."""
    entries, lang_of = [], []
    for lang in languages:
        facts = record.facts(lang)
        paraphrases = list(facts.paraphrases) if cfg.use_paraphrases else []
        if cfg.max_paraphrases is not None:
            paraphrases = paraphrases[: cfg.max_paraphrases]
        templated = [t.replace("{prompt}", facts.prompt) for t in cfg.templates]
        for text in [facts.prompt, *paraphrases, *templated]:
            entries.append(
                (encode_prompt(tokenizer, join_prompt(text, "x", lang)[0]), lang, facts.target_new, facts.target_true)
            )
            lang_of.append(lang)
    return entries, lang_of


def locate(model, tokenizer, arch: ArchSpec, record: EditRecord, edit_language: str, cfg: LocalizationConfig,
           usual: torch.Tensor | None = None) -> NeuronMask:
    """The neuron mask of one record: categories, plus each language's own set.

    ``usual`` ``[L, d_ff]``: each neuron's usual activity (:func:`.background.usual_activity`),
    needed with ``relative_to_background`` (computed here when not given)."""
    langs = _check_languages(record, cfg, edit_language)
    entries, lang_of = localisation_prompts(tokenizer, record, langs, cfg)
    if cfg.attribution.needs_answer:
        answers = old_answers(model, tokenizer, entries)
    else:
        answers = [None] * len(entries)
    prompts = list(zip([e[0] for e in entries], answers))
    scores = prompt_scores(model, tokenizer, arch, prompts, cfg.attribution)  # [P, L, F]
    if cfg.relative_to_background:
        if usual is None:
            usual = usual_activity(model, tokenizer, arch, cfg.background)
        scores = scores / usual.to(scores.device)[None]
    kept = select_neurons(scores, cfg)  # [P, L, F]

    per_lang: dict[str, torch.Tensor] = {}
    for lang in langs:
        idx = [i for i, l in enumerate(lang_of) if l == lang]
        per_lang[lang] = kept[idx].sum(0) >= _at_least(cfg.prompt_fraction, len(idx))  # [L, F]
    votes = torch.stack([per_lang[l] for l in cfg.cross_languages]).sum(0)  # [L, F]
    independent = votes >= _at_least(cfg.language_fraction, len(cfg.cross_languages))
    specific = per_lang[edit_language] & ~independent
    total = scores.sum(0)  # [L, F] ranks neurons for the optional cap
    return NeuronMask(
        record_id=record.id,
        layers={
            "independent": _to_layers(independent, total, cfg.max_per_layer),
            "specific": _to_layers(specific, total, cfg.max_per_layer),
        },
        languages={lang: _to_layers(sel, total, None) for lang, sel in per_lang.items()},
    )


def _at_least(fraction: float, count: int) -> int:
    """The smallest whole number of ``count`` items that makes up ``fraction`` (at least 1)."""
    return max(1, math.ceil(fraction * count - 1e-9))


def _to_layers(chosen: torch.Tensor, score: torch.Tensor, cap: int | None) -> dict[int, list[int]]:
    out = {}
    for layer in range(chosen.shape[0]):
        idx = chosen[layer].nonzero().flatten()
        if cap is not None and idx.numel() > cap:
            idx = idx[score[layer, idx].argsort(descending=True)[:cap]]
        if idx.numel():
            out[layer] = sorted(idx.tolist())
    return out

"""MEMLA neuron localisation for one edit record.

For every language in ``cross_languages`` plus the edit language, the prompts
are the edit prompt and its paraphrases and the answer is the *old* target
(the fact being replaced; where a record has none, the model's own greedy
answer). Per prompt, neurons scoring above ``threshold x`` that prompt's
maximum are kept; a language's set holds the neurons kept by at least
``prompt_fraction`` of its prompts. Language-independent neurons are the
intersection of the cross languages' sets; language-specific ones are the edit
language's set minus those.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mke_lightning.architectures import ArchSpec
from mke_lightning.attribution import AttributionConfig, attribute_rows
from mke_lightning.neurons import NeuronMask
from mke_lightning.records import EditRecord, RecordError, join_prompt
from mke_lightning.scoring import encode_continuation, encode_prompt, greedy_generate


@dataclass
class LocalizationConfig:
    """Which neurons an edit may change."""

    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    """How neuron scores are computed (method, IG path, steps, baseline, batch size)."""
    threshold: float = 0.3
    """Keep neurons scoring above this fraction of the prompt's maximum score."""
    cross_languages: list[str] = field(default_factory=lambda: ["en", "zh", "fr"])
    """Languages whose shared neurons are the language-independent set."""
    prompt_fraction: float = 0.5
    """A language keeps a neuron kept by at least this fraction of its prompts."""
    max_per_layer: int | None = None
    """Optional cap on neurons per layer and category (highest scores kept)."""
    use_paraphrases: bool = True
    """Attribute the paraphrases as well as the edit prompt."""

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"localization.threshold must be in (0, 1], got {self.threshold}")
        if not 0.0 < self.prompt_fraction <= 1.0:
            raise ValueError(f"localization.prompt_fraction must be in (0, 1], got {self.prompt_fraction}")
        if not self.cross_languages:
            raise ValueError("localization.cross_languages is empty")


def _old_answers(model, tokenizer, entries: list[tuple[list[int], str, str, str | None]]) -> list[list[int]]:
    """Answer ids per (prompt ids, lang, target_new, target_true): the old target,
    or where there is none the model's own greedy answer (one batched call)."""
    answers: list[list[int] | None] = []
    missing: list[tuple[int, int]] = []  # (entry index, tokens wanted)
    for i, (p_ids, lang, new, old) in enumerate(entries):
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


def prompt_scores(model, tokenizer, arch: ArchSpec, prompts: list[tuple[list[int], list[int]]], cfg: AttributionConfig) -> torch.Tensor:
    """Scores ``[P, L, d_ff]`` for (prompt ids, answer ids) pairs, summed over answer tokens."""
    # The model's own greedy continuation feeds the later answer tokens.
    longest = max(len(ans) for _, ans in prompts)
    own = greedy_generate(model, tokenizer, [p for p, _ in prompts], max(longest - 1, 1), stop_at_eos=False)
    rows, targets, owner = [], [], []
    for k, ((p, ans), gen) in enumerate(zip(prompts, own)):
        for j, tok in enumerate(ans):
            rows.append(list(p) + gen[:j])
            targets.append(tok)
            owner.append(k)
    scores = attribute_rows(
        model, arch, rows, targets, cfg, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
        skip_first=tokenizer.bos_token_id is not None,
    )  # [rows, L, F]
    owner_t = torch.tensor(owner, device=scores.device)
    return torch.zeros((len(prompts), *scores.shape[1:]), device=scores.device).index_add_(0, owner_t, scores)


def select(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean ``[P, L, d_ff]``: score above ``threshold x`` the prompt's max."""
    peak = scores.flatten(1).max(dim=1).values.clamp(min=0)  # [P]
    return (scores > threshold * peak[:, None, None]) & (scores > 0)


def locate(model, tokenizer, arch: ArchSpec, record: EditRecord, edit_language: str, cfg: LocalizationConfig) -> NeuronMask:
    """The MEMLA neuron mask of one record."""
    missing = [l for l in cfg.cross_languages if l not in record.languages]
    if missing:
        raise RecordError(
            f"cross language(s) {missing} missing (record has {sorted(record.languages)}); "
            "set localization.cross_languages to languages the data has",
            record_id=record.id, field="languages",
        )
    langs = list(dict.fromkeys([*cfg.cross_languages, edit_language]))
    entries, lang_of = [], []
    for lang in langs:
        facts = record.facts(lang)
        texts = [facts.prompt, *(facts.paraphrases if cfg.use_paraphrases else ())]
        for text in texts:
            entries.append((encode_prompt(tokenizer, join_prompt(text, "x", lang)[0]), lang, facts.target_new, facts.target_true))
            lang_of.append(lang)
    prompts = list(zip([e[0] for e in entries], _old_answers(model, tokenizer, entries)))
    scores = prompt_scores(model, tokenizer, arch, prompts, cfg.attribution)  # [P, L, F]
    kept = select(scores, cfg.threshold)

    per_lang: dict[str, torch.Tensor] = {}
    for lang in langs:
        idx = [i for i, l in enumerate(lang_of) if l == lang]
        need = max(1, math.ceil(cfg.prompt_fraction * len(idx) - 1e-9))
        per_lang[lang] = kept[idx].sum(0) >= need  # [L, F]
    independent = torch.stack([per_lang[l] for l in cfg.cross_languages]).all(0)
    specific = per_lang[edit_language] & ~independent
    total = scores.sum(0)  # [L, F] ranks neurons for the optional cap
    return NeuronMask(
        record_id=record.id,
        layers={"independent": _to_layers(independent, total, cfg.max_per_layer), "specific": _to_layers(specific, total, cfg.max_per_layer)},
    )


def _to_layers(chosen: torch.Tensor, score: torch.Tensor, cap: int | None) -> dict[int, list[int]]:
    out = {}
    for layer in range(chosen.shape[0]):
        idx = chosen[layer].nonzero().flatten()
        if cap is not None and idx.numel() > cap:
            idx = idx[score[layer, idx].argsort(descending=True)[:cap]]
        if idx.numel():
            out[layer] = sorted(idx.tolist())
    return out

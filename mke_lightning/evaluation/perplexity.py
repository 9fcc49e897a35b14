"""Downstream impact of an edit: perplexity of a multilingual text sample.

An edit should change one fact and nothing else; a rise in the model's
perplexity on ordinary text in some language is a side effect the fact-level
measures do not see. The package ships a small sample we wrote for this
(``mke_lightning/data/perplexity_sample.json``, ``{lang: [passage, ...]}``,
the 12 MzsRE languages and a few more); any file of that shape can replace it.

Perplexity of a language = exp(total next-token NLL / number of predicted
tokens) over its passages (each cut to ``max_tokens``). It is reported as a
ratio, post-edit / pre-edit: 1.0 means the edit left the language alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from mke_lightning.modeling.forward import encode_prompt, left_pad

_LOGIT_BYTES = 4  # float32 logits; the LM head output dominates memory with large vocabularies


@dataclass
class PerplexityConfig:
    """Which text is scored, how much of it, and after which edits."""

    enabled: bool = True
    """Measure perplexity at all (off: no downstream figures)."""
    path: str | None = None
    """JSON file ``{lang: [passage, ...]}`` (default: the packaged multilingual sample)."""
    languages: list[str] | None = None
    """Languages scored (default: the run's evaluation languages that the sample has)."""
    texts_per_language: int = 2
    """Passages per language at most (the first ones)."""
    max_tokens: int = 48
    """Each passage is cut to this many tokens."""
    every_n_edits: int = 8
    """Post-edit perplexity after edits 0, n, 2n, ... of the run (by position in the run, so the
    same edits on any number of ranks); the pre-edit perplexity is computed once per run."""
    memory_budget_mb: int = 512
    """Memory for the logits of one forward pass; sets how many passages it holds."""

    def __post_init__(self) -> None:
        if self.texts_per_language < 1 or self.max_tokens < 2 or self.every_n_edits < 1 or self.memory_budget_mb < 1:
            raise ValueError(
                "perplexity: texts_per_language >= 1, max_tokens >= 2, every_n_edits >= 1 and memory_budget_mb >= 1 "
                "are required"
            )


def load_sample(path: str | Path | None = None) -> dict[str, list[str]]:
    """The text sample ``{lang: [passage, ...]}`` (the packaged one when ``path`` is None)."""
    if path is None:
        text = resources.files("mke_lightning.data").joinpath("perplexity_sample.json").read_text(encoding="utf-8")
        where = "the packaged perplexity sample"
    else:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"perplexity sample {p} does not exist")
        text, where = p.read_text(encoding="utf-8"), str(p)
    data = json.loads(text)
    if not isinstance(data, dict) or not all(
        isinstance(v, list) and v and all(isinstance(t, str) and t.strip() for t in v) for v in data.values()
    ):
        raise ValueError(f"{where}: expected a JSON object {{language: [non-empty passage, ...]}}")
    return data


class PerplexityProbe:
    """Tokenises the sample once; :meth:`measure` gives perplexity per language.

    Args:
        tokenizer: the model's tokenizer (with a pad token).
        sample: ``{lang: [passage, ...]}``.
        languages: languages to score (each must be in ``sample``).
        config: passages per language, tokens per passage, memory budget.
    """

    def __init__(self, tokenizer, sample: dict[str, list[str]], languages: list[str], config: PerplexityConfig) -> None:
        missing = [l for l in languages if l not in sample]
        if missing:
            raise ValueError(f"the perplexity sample has no text in {missing} (it has {sorted(sample)})")
        self.languages = list(languages)
        self.config = config
        self.pad_id = tokenizer.pad_token_id
        self.rows: list[list[int]] = []
        self.lang_of_row: list[int] = []
        for i, lang in enumerate(self.languages):
            for text in sample[lang][: config.texts_per_language]:
                ids = encode_prompt(tokenizer, text)[: config.max_tokens]
                if len(ids) >= 2:
                    self.rows.append(ids)
                    self.lang_of_row.append(i)

    @torch.no_grad()
    def measure(self, model) -> dict[str, float]:
        """Perplexity per language of ``model`` on the sample."""
        device = next(model.parameters()).device
        vocab = model.get_output_embeddings().weight.shape[0]
        width = max(len(r) for r in self.rows)
        per_pass = max(1, self.config.memory_budget_mb * 2**20 // (width * vocab * _LOGIT_BYTES))
        nll = torch.zeros(len(self.languages), dtype=torch.float64)
        tokens = torch.zeros(len(self.languages), dtype=torch.float64)
        for s in range(0, len(self.rows), per_pass):
            ids, mask, pos = left_pad(self.rows[s:s + per_pass], self.pad_id)  # [B, T] each
            ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[
                :, :-1
            ]  # [B, T-1, V]
            # NLL = logsumexp - logit of the next token; no [B, T-1, V] log-softmax copy
            picked = logits.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1).float()  # [B, T-1]
            token_nll = torch.logsumexp(logits.float(), -1) - picked  # [B, T-1]
            valid = (mask[:, :-1] * mask[:, 1:]).bool()  # a real token predicting a real token
            row_nll = (token_nll * valid).sum(-1).double().cpu()  # [B]
            for b, lang in enumerate(self.lang_of_row[s:s + per_pass]):
                nll[lang] += row_nll[b]
                tokens[lang] += valid[b].sum().item()
        return {lang: float(torch.exp(nll[i] / tokens[i])) for i, lang in enumerate(self.languages) if tokens[i] > 0}


def ratios(post: dict[str, float], pre: dict[str, float]) -> dict[str, float]:
    """Post-edit / pre-edit perplexity per language."""
    return {lang: post[lang] / pre[lang] for lang in post if lang in pre and pre[lang] > 0}

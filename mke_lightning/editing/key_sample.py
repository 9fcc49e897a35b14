"""The text sample behind the key statistics, and its disjointness from evaluation.

The preservation statistics (:mod:`mke_lightning.editing.key_statistics`) need
"ordinary text" in every evaluation language. Nothing can be downloaded at run
time, so by default the model writes it: each passage is one of a few short,
neutral openers we wrote per language (``mke_lightning/data/key_openers.json``)
continued by seeded sampling from the model itself (temperature 1, nucleus
0.95). The keys then follow the model's own distribution over text of that
language, which is what an edit should leave alone. A JSON file
``{lang: [passage, ...]}`` of real text can replace it (``source``).

Whatever the source, the sample must share nothing with what evaluation reads,
or locality would be measured on the very inputs the statistics protect. The
rule, enforced here: no passage of the sample shares an ``n``-token sequence
(``n`` = 8 by default, tokens of the model's tokenizer, no special tokens)
with any string of the packaged perplexity sample, the packaged KL anchors,
or of the benchmark files named in ``exclude`` (every string value in them:
prompts, paraphrases, locality probes, answers). A passage that does is
dropped, and the count is recorded.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PACKAGED_EVALUATION_TEXT = ("perplexity_sample.json", "anchor_prompts.json")
"""Packaged files evaluation reads (perplexity sample, KL anchors / background prompts)."""


def packaged_json(name: str):
    return json.loads(resources.files("mke_lightning.data").joinpath(name).read_text(encoding="utf-8"))


def load_openers(path: str | None = None) -> dict[str, list[str]]:
    """``{lang: [opener, ...]}``: the packaged openers, or those of a JSON file."""
    data = packaged_json("key_openers.json") if path is None else json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not all(isinstance(v, list) and v and all(isinstance(s, str) and s.strip() for s in v) for v in data.values()):
        raise ValueError(f"openers {path or 'key_openers.json'}: expected a JSON object {{language: [non-empty opener, ...]}}")
    return data


def load_text_file(path: str) -> dict[str, list[str]]:
    """``{lang: [passage, ...]}`` from a JSON file (a user's own corpus as ``source``)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"key statistics source {p} does not exist (use 'generated' or a JSON file {{lang: [passage, ...]}})")
    data = json.loads(p.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not all(isinstance(v, list) and all(isinstance(t, str) for t in v) for v in data.values()):
        raise ValueError(f"{p}: expected a JSON object {{language: [passage, ...]}}")
    return data


def _strings(obj) -> Iterator[str]:
    """Every string value inside a parsed JSON document (keys left out)."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def _json_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl"))
    raise FileNotFoundError(f"key statistics exclude path {path} does not exist")


def evaluation_strings(exclude: Iterable[str] = ()) -> list[str]:
    """Every string evaluation may read: the packaged perplexity sample and anchors, and every
    string value of the JSON / JSONL files under each path in ``exclude`` (de-duplicated, sorted)."""
    found: set[str] = set()
    for name in PACKAGED_EVALUATION_TEXT:
        found.update(_strings(packaged_json(name)))
    for entry in exclude:
        for f in _json_files(Path(entry).expanduser()):
            text = f.read_text(encoding="utf-8")
            if f.suffix == ".jsonl":
                for line in text.splitlines():
                    if line.strip():
                        found.update(_strings(json.loads(line)))
            else:
                found.update(_strings(json.loads(text)))
    return sorted(s for s in found if s.strip())


def exclusion_digest(exclude: Iterable[str] = ()) -> str:
    """A digest of :func:`evaluation_strings` (a changed benchmark file changes the sample's key)."""
    h = hashlib.sha256()
    for s in evaluation_strings(exclude):
        h.update(s.encode())
        h.update(b"\0")
    return h.hexdigest()


def _ngram_hashes(ids: list[int], n: int) -> Iterator[int]:
    for i in range(len(ids) - n + 1):
        yield hash(tuple(ids[i : i + n]))  # tuples of ints hash the same in every process


def _token_ids(tokenizer, texts: list[str], batch: int = 2048) -> list[list[int]]:
    out: list[list[int]] = []
    for i in range(0, len(texts), batch):
        out.extend(tokenizer(texts[i : i + batch], add_special_tokens=False)["input_ids"])
    return out


class NgramGuard:
    """The ``n``-token sequences of a set of texts; :meth:`overlaps` tests a passage against them.

    Args:
        tokenizer: the model's tokenizer (texts are compared as its token ids, no special tokens,
            so the rule reads the same in languages written without spaces).
        texts: the strings to stay away from.
        n: sequence length in tokens.
    """

    def __init__(self, tokenizer, texts: Iterable[str], n: int = 8) -> None:
        if n < 1:
            raise ValueError(f"key statistics: ngram must be >= 1, got {n}")
        self.tokenizer = tokenizer
        self.n = n
        self.grams: set[int] = set()
        for ids in _token_ids(tokenizer, list(texts)):
            self.grams.update(_ngram_hashes(ids, n))

    def overlaps(self, text: str) -> bool:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return any(g in self.grams for g in _ngram_hashes(ids, self.n))

    def shared(self, texts: Iterable[str]) -> list[str]:
        """The texts among ``texts`` that share an ``n``-token sequence with the guarded set."""
        return [t for t in texts if self.overlaps(t)]


def sample_digest(sample: dict[str, list[str]]) -> str:
    return hashlib.sha256(json.dumps(sample, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _seed(seed: int, language: str, batch: int) -> int:
    """A per-(language, batch) seed: a language's passages do not depend on which others are drawn."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{language}:{batch}".encode()).digest()[:8], "little") % (2**63)


def generation_plan(languages: list[str], tokens_per_language: int, max_length: int, batch_size: int) -> list[tuple[str, int, int, int]]:
    """``[(language, batch index, first passage, passages in the batch)]``: enough passages of
    ``max_length`` tokens per language for ``tokens_per_language`` keys (each passage gives
    ``max_length - 1``: the first position is not a key, see ``KeyStatsConfig.skip_first``)."""
    per_language = -(-tokens_per_language // (max_length - 1))
    plan = []
    for lang in languages:
        for b, start in enumerate(range(0, per_language, batch_size)):
            plan.append((lang, b, start, min(batch_size, per_language - start)))
    return plan


@torch.no_grad()
def generate_batch(model, tokenizer, openers: list[str], language: str, batch: int, first: int, count: int, *,
                   seed: int, max_length: int, temperature: float, top_p: float, top_k: int = 256) -> list[str]:
    """``count`` passages of ``language``: openers ``first, first + 1, ...`` (cycling) continued by
    sampling until each passage is ``max_length`` tokens long (end-of-sequence suppressed), decoded
    to text. Seeded by ``(seed, language, batch)``.

    Our own sampling loop rather than ``generate``: the LM head runs at the last position only, and
    the nucleus is taken inside the ``top_k`` most likely tokens (``topk`` over the vocabulary instead
    of sorting all of it: Gemma's 262k-token vocabulary made the sort most of the cost on a CPU)."""
    prompts = [openers[(first + i) % len(openers)] for i in range(count)]
    enc = [tokenizer(p, add_special_tokens=True)["input_ids"][:max_length] for p in prompts]
    width = max(len(e) for e in enc)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    banned = sorted({tokenizer.eos_token_id, pad, *tokenizer.all_special_ids} - {None})  # never sampled: decoding drops them
    device = next(model.parameters()).device
    ids = torch.full((count, width), pad, dtype=torch.long)  # [B, T0], left-padded
    mask = torch.zeros((count, width), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, width - len(e):] = torch.tensor(e)
        mask[i, width - len(e):] = 1
    new = max(0, max_length - min(len(e) for e in enc))
    gen = torch.Generator(device="cpu").manual_seed(_seed(seed, language, batch))
    ids, mask = ids.to(device), mask.to(device)
    out = [ids]
    cur, cache = ids, None
    for _ in range(new):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -cur.shape[1]:]  # [B, t]: positions that skip the left padding
        res = model(input_ids=cur, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
        cache = res.past_key_values
        logits = res.logits[:, -1].float() / temperature  # [B, V]
        logits[:, banned] = float("-inf")
        top = logits.topk(min(top_k, logits.shape[-1]), dim=-1)  # values, indices [B, k], descending
        probs = top.values.softmax(-1)  # [B, k]
        keep = probs.cumsum(-1) - probs < top_p  # the nucleus: tokens before the mass reaches top_p (the first always)
        probs = (probs * keep).cpu()
        pick = torch.multinomial(probs, 1, generator=gen).to(device)  # [B, 1]
        cur = top.indices.gather(-1, pick)  # [B, 1]
        out.append(cur)
        mask = torch.cat([mask, torch.ones_like(cur)], dim=-1)
    full = torch.cat(out, dim=-1)  # [B, T0 + new]
    texts = []
    for i, e in enumerate(enc):
        row = full[i, width - len(e):].tolist()[: max_length]  # the opener's ids and its continuation
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts

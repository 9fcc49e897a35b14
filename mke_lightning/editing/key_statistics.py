"""Preservation statistics: the second moment of each layer's keys over ordinary text.

At an MLP output projection ``W [d_model, d_ff]`` the *key* of a token is the
projection's input ``k [d_ff]`` (the neuron activations). An edit ``ΔW``
moves the output of every token by ``ΔW k``; over ordinary text the mean
squared change is ``tr(ΔW C ΔWᵀ)`` with ``C = E[k kᵀ]`` (uncentred). MEMIT
weights its closed form by ``C``, AlphaEdit projects updates onto the null
space of ``C``, and a neuron-masked edit on neurons ``idx`` is measured by
``C[idx][:, idx]``. This module computes ``C`` once per model and keeps it.

The text is a multilingual sample that evaluation never reads
(:mod:`mke_lightning.editing.key_sample`): by default passages the model writes from
short openers in each language. Keys are taken at every position but the
first (the BOS token's activations are outliers no edit key resembles).

Cache layout under ``$MKE_CACHE_DIR/key-stats`` (or
``~/.cache/mke-lightning/key-stats``, or ``cache_dir``)::

    <model fingerprint[:16]>-<settings digest[:16]>/
        settings.json                what the key stands for (for people)
        sample.json                  the text sample, its digest, passages dropped by the disjointness rule
        layers/<l>.safetensors       C of layer l, [d_ff, d_ff] float32, with its token count in the metadata
        partial/rank<r>-of<w>.safetensors   running float64 sums of an unfinished computation
        metadata.json                summary of the last computation (tokens, seconds)

A layer file is reused only when it names the same model fingerprint,
settings digest and sample digest; changing the model's weights or any
setting that changes the sample or the keys recomputes. A computation saves
its running sums every ``checkpoint_tokens`` tokens, so a killed one resumes.
On several ranks (``torch.distributed`` initialised) the sample's batches are
dealt round-robin to the ranks and the sums added up; one process needs no
process group.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, safe_open, save_file

from mke_lightning.editing import key_sample
from mke_lightning.modeling.architectures import ArchSpec, num_layers, num_neurons
from mke_lightning.modeling.collectives import gather_object, rank_and_world
from mke_lightning.modeling.loading import cache_root

log = logging.getLogger(__name__)

MZSRE_LANGUAGES = ["en", "cs", "de", "nl", "es", "fr", "pt", "ru", "th", "tr", "vi", "zh"]
"""The 12 MzsRE evaluation languages (the default sample languages)."""

SPEED_ONLY = ("cache", "cache_dir", "batch_size", "checkpoint_tokens")
"""Settings that change speed, memory or where files go, not the statistics."""

_FORMAT = 2  # bump when the file layout or the definition of C changes


@dataclass
class KeyStatsConfig:
    """Which text the key statistics are taken over, and where they are kept."""

    languages: list[str] | None = None
    """Languages of the sample (default: the 12 MzsRE evaluation languages en cs de nl es fr pt ru th tr vi zh)."""
    tokens_per_language: int = 1024
    """Keys per language. 1,024 x 12 languages = 12,288 keys, 6 x d_ff of the embedded model (2,048):
    a small multiple of the key dimension is enough to estimate C's low-energy directions (see
    docs/preservation.md); raise it for a larger d_ff."""
    max_length: int = 128
    """Tokens per passage (BOS included); a generated passage is exactly this long."""
    seed: int = 0
    """Seed of the sampling that writes the generated passages."""
    cache: bool = True
    """Keep the statistics (and the sample) on disk and reuse them; off: compute in memory every call."""
    cache_dir: str | None = None
    """Cache root (default ``$MKE_CACHE_DIR/key-stats`` or ``~/.cache/mke-lightning/key-stats``)."""
    source: str = "generated"
    """Where the text comes from: ``generated`` (the model continues the packaged openers, offline) or a
    JSON file ``{lang: [passage, ...]}`` of your own text (passages taken in order until each language
    has ``tokens_per_language`` keys)."""
    openers: str | None = None
    """JSON file ``{lang: [opener, ...]}`` for ``generated`` (default: the packaged ``key_openers.json``)."""
    temperature: float = 1.0
    """Sampling temperature of the generated passages (1: the model's own distribution)."""
    top_p: float = 0.95
    """Nucleus sampling of the generated passages (cuts the tail of very unlikely tokens)."""
    top_k: int = 256
    """The nucleus is taken among this many most likely tokens (a bound on the candidates, so that the
    vocabulary is never sorted whole)."""
    generation_batch: int = 12
    """Passages generated together (each batch has its own seed, so this shapes the sample)."""
    ngram: int = 8
    """Disjointness rule: no passage shares this many consecutive tokens with any text evaluation reads."""
    exclude: list[str] = field(default_factory=list)
    """Benchmark files or folders (JSON / JSONL) whose strings the sample must not overlap, besides the
    packaged perplexity sample and KL anchors, which are always excluded."""
    skip_first: bool = True
    """Leave each passage's first position (BOS) out of the keys."""
    batch_size: int = 8
    """Passages per forward pass when collecting keys (speed and memory only)."""
    checkpoint_tokens: int = 4096
    """Save the running sums after about this many keys, so a killed computation resumes (0: never)."""

    def __post_init__(self) -> None:
        if self.tokens_per_language < 1 or self.max_length < 2:
            raise ValueError("key statistics: tokens_per_language >= 1 and max_length >= 2 are required")
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise ValueError("key statistics: temperature > 0 and 0 < top_p <= 1 are required")
        if self.generation_batch < 1 or self.top_k < 1 or self.batch_size < 1 or self.ngram < 1 or self.checkpoint_tokens < 0:
            raise ValueError("key statistics: generation_batch, top_k, batch_size, ngram >= 1 and checkpoint_tokens >= 0 are required")
        if self.languages is not None and not self.languages:
            raise ValueError("key statistics: languages is empty (None means the 12 MzsRE languages)")

    @property
    def resolved_languages(self) -> list[str]:
        return list(dict.fromkeys(self.languages or MZSRE_LANGUAGES))


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str, ensure_ascii=False).encode()).hexdigest()


def _file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()


def settings_key(cfg: KeyStatsConfig) -> dict[str, Any]:
    """What decides the statistics (the cache key's part): every setting but the speed-only ones,
    with files replaced by digests of their content."""
    key = {k: v for k, v in asdict(cfg).items() if k not in SPEED_ONLY}
    key["languages"] = cfg.resolved_languages
    key["exclude"] = key_sample.exclusion_digest(cfg.exclude)
    if cfg.source == "generated":
        key["openers"] = _digest(key_sample.load_openers(cfg.openers))
    else:
        key["source"] = {"file": Path(cfg.source).name, "sha256": _file_digest(cfg.source)}
        for name in ("openers", "temperature", "top_p", "top_k", "generation_batch", "seed"):  # generation only
            key.pop(name)
    key["format"] = _FORMAT
    return key


# --------------------------------------------------------------------------- the result


class KeyStatistics:
    """Per layer, ``C = E[k kᵀ]`` of the MLP output projection's input ``k`` and the number of keys.

    Args:
        moments: ``{layer: C}``, each ``[d_ff, d_ff]`` float32 on CPU, or the path of its file (read when
            first asked for).
        tokens: ``{layer: number of keys}``.
        metadata: model fingerprint, settings, sample digest (JSON-serialisable).
    """

    def __init__(self, moments: dict[int, torch.Tensor | Path], tokens: dict[int, int], metadata: dict[str, Any] | None = None) -> None:
        if set(moments) != set(tokens):
            raise ValueError("key statistics: moments and tokens name different layers")
        self._moments = dict(moments)
        self._tokens = {int(l): int(n) for l, n in tokens.items()}
        self.metadata = dict(metadata or {})

    @property
    def layers(self) -> list[int]:
        return sorted(self._moments)

    def second_moment(self, layer: int) -> torch.Tensor:
        """``E[k kᵀ]`` of ``layer``: ``[d_ff, d_ff]`` float32, symmetric, positive semi-definite."""
        if layer not in self._moments:
            raise KeyError(f"key statistics hold layers {self.layers}, not {layer}")
        c = self._moments[layer]
        if not torch.is_tensor(c):
            c = self._moments[layer] = load_file(str(c))["second_moment"]
        return c

    def tokens(self, layer: int) -> int:
        """How many keys ``layer``'s moment averages."""
        return self._tokens[layer]

    def sub_moment(self, layer: int, idx: list[int] | torch.Tensor) -> torch.Tensor:
        """``C[idx][:, idx]``: the moment of the keys restricted to neurons ``idx`` (``[n, n]``)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        return self.second_moment(layer)[idx][:, idx]

    @staticmethod
    def layer_path(folder: str | Path, layer: int) -> Path:
        return Path(folder) / "layers" / f"{layer}.safetensors"

    def layer_metadata(self, layer: int) -> dict[str, str]:
        m = {k: self.metadata[k] for k in ("model_fingerprint", "settings_digest", "sample_digest") if k in self.metadata}
        return {**{k: str(v) for k, v in m.items()}, "layer": str(layer), "tokens": str(self._tokens[layer]), "format": str(_FORMAT)}

    def save(self, folder: str | Path) -> Path:
        """Write ``layers/<l>.safetensors`` for every layer and ``metadata.json`` into ``folder``."""
        folder = Path(folder)
        (folder / "layers").mkdir(parents=True, exist_ok=True)
        for layer in self.layers:
            _atomic_save({"second_moment": self.second_moment(layer).contiguous()}, self.layer_path(folder, layer), self.layer_metadata(layer))
        about = {**self.metadata, "layers": self.layers, "tokens": {str(l): n for l, n in self._tokens.items()}}
        _atomic_write_text(folder / "metadata.json", json.dumps(about, indent=2, sort_keys=True, default=str))
        return folder

    @classmethod
    def load(cls, folder: str | Path, layers: list[int] | None = None, *, expect: dict[str, str] | None = None,
             lazy: bool = True) -> KeyStatistics:
        """The statistics saved in ``folder`` (the layers asked for that exist there). ``expect``: metadata
        values a layer file must carry to count (e.g. the model fingerprint); others are left out."""
        folder = Path(folder)
        found = sorted(int(p.stem) for p in (folder / "layers").glob("*.safetensors") if p.stem.isdigit())
        wanted = found if layers is None else [l for l in layers if l in found]
        moments: dict[int, torch.Tensor | Path] = {}
        tokens: dict[int, int] = {}
        for layer in wanted:
            path = cls.layer_path(folder, layer)
            try:
                with safe_open(str(path), "pt") as f:
                    meta = f.metadata() or {}
            except Exception as err:  # a truncated or foreign file: recompute that layer
                log.warning("ignoring key statistics file %s: %s", path, err)
                continue
            if meta.get("format") != str(_FORMAT) or any(meta.get(k) != v for k, v in (expect or {}).items()):
                continue
            moments[layer] = path if lazy else load_file(str(path))["second_moment"]
            tokens[layer] = int(meta["tokens"])
        about = folder / "metadata.json"
        metadata = json.loads(about.read_text()) if about.exists() else {}
        for k in ("layers", "tokens"):
            metadata.pop(k, None)
        metadata.update(expect or {})
        return cls(moments, tokens, metadata)


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- projectors


def null_space_projector(C: torch.Tensor, threshold: float, mode: Literal["absolute", "energy"] = "energy", *,
                         min_rank: int = 1) -> torch.Tensor:
    """Projector ``P = U Uᵀ`` onto the low-energy eigen-directions ``U`` of a symmetric PSD ``C [d, d]``.

    ``absolute``: the eigenvectors whose eigenvalue is below ``threshold`` (AlphaEdit's reading; may be
    empty, then ``P = 0``). ``energy``: the smallest eigen-directions whose eigenvalues add up to at most
    ``threshold`` x the trace, and at least ``min_rank`` of them (so never empty unless ``min_rank=0``).
    Computed in float64, returned in ``C``'s dtype: ``[d, d]``, ``P = Pᵀ = P²``.
    """
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"null_space_projector: C must be square, got {tuple(C.shape)}")
    if mode not in ("absolute", "energy"):
        raise ValueError(f"null_space_projector: mode must be 'absolute' or 'energy', got {mode!r}")
    if threshold < 0:
        raise ValueError(f"null_space_projector: threshold must be >= 0, got {threshold}")
    c = C.detach().to(torch.float64)
    c = (c + c.T) / 2
    vals, vecs = torch.linalg.eigh(c)  # ascending: vals [d], vecs [d, d] (columns)
    if mode == "absolute":
        keep = int((vals < threshold).sum())
    else:
        energy = vals.clamp(min=0)
        share = torch.cumsum(energy, 0) / energy.sum().clamp(min=torch.finfo(torch.float64).tiny)  # [d]
        keep = int((share <= threshold).sum())
        keep = max(keep, min(min_rank, c.shape[0]))
    u = vecs[:, :keep]  # [d, keep]
    return (u @ u.T).to(C.dtype)


def masked_null_space_projector(C: torch.Tensor, idx: list[int] | torch.Tensor, threshold: float,
                                mode: Literal["absolute", "energy"] = "energy", *, min_rank: int = 1) -> torch.Tensor:
    """:func:`null_space_projector` of ``C[idx][:, idx]``, for an update confined to neurons ``idx``:
    ``[n, n]`` with ``n = len(idx)``, in the order of ``idx``."""
    idx = torch.as_tensor(idx, dtype=torch.long, device=C.device)
    return null_space_projector(C[idx][:, idx], threshold, mode, min_rank=min_rank)


# --------------------------------------------------------------------------- computing


def _check_languages(available: dict[str, list[str]], languages: list[str], where: str) -> None:
    missing = [l for l in languages if l not in available]
    if missing:
        raise ValueError(f"key statistics: {where} has no text for {missing}; it has {sorted(available)}")


def _generated_passages(model, tokenizer, cfg: KeyStatsConfig, rank: int, world: int) -> dict[str, list[str]]:
    openers = key_sample.load_openers(cfg.openers)
    languages = cfg.resolved_languages
    _check_languages(openers, languages, f"the openers ({cfg.openers or 'key_openers.json'})")
    plan = key_sample.generation_plan(languages, cfg.tokens_per_language, cfg.max_length, cfg.generation_batch)
    mine = {}
    was_training = model.training
    model.eval()
    try:
        for i in range(rank, len(plan), world):  # batch i goes to rank i % world
            lang, b, first, count = plan[i]
            t0 = time.perf_counter()
            mine[i] = key_sample.generate_batch(
                model, tokenizer, openers[lang], lang, b, first, count, seed=cfg.seed, max_length=cfg.max_length,
                temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
            )
            log.info("key statistics: generated batch %d of %d (%s, %d passages) in %.1f s", i + 1, len(plan), lang, count,
                     time.perf_counter() - t0)
    finally:
        model.train(was_training)
    texts = {k: v for part in gather_object(mine, world) for k, v in part.items()}
    sample: dict[str, list[str]] = {l: [] for l in languages}
    for i, (lang, *_rest) in enumerate(plan):
        sample[lang].extend(texts[i])
    return sample


def _file_passages(tokenizer, cfg: KeyStatsConfig) -> dict[str, list[str]]:
    data = key_sample.load_text_file(cfg.source)
    languages = cfg.resolved_languages
    _check_languages(data, languages, cfg.source)
    sample = {}
    for lang in languages:
        taken, keys = [], 0
        for text in data[lang]:
            if keys >= cfg.tokens_per_language:
                break
            n = min(len(tokenizer(text, add_special_tokens=True)["input_ids"]), cfg.max_length) - int(cfg.skip_first)
            if n > 0 and text.strip():
                taken.append(text)
                keys += n
        sample[lang] = taken
    return sample


def build_sample(model, tokenizer, cfg: KeyStatsConfig, folder: Path | None = None, fingerprint: str = "") -> dict[str, Any]:
    """The text sample: ``{"sample": {lang: [passage, ...]}, "digest", "dropped": {lang: n}}``.

    Generated or read per ``cfg.source``, then every passage sharing ``cfg.ngram`` tokens with what
    evaluation reads is dropped. With a cache ``folder`` it is read from / written to ``sample.json``.
    """
    settings_digest = _digest(settings_key(cfg))
    path = folder / "sample.json" if folder is not None else None
    if path is not None and path.exists():
        cached = json.loads(path.read_text(encoding="utf-8"))
        if cached.get("model_fingerprint") == fingerprint and cached.get("settings_digest") == settings_digest:
            return cached
    rank, world = rank_and_world()
    raw = _generated_passages(model, tokenizer, cfg, rank, world) if cfg.source == "generated" else _file_passages(tokenizer, cfg)
    guard = key_sample.NgramGuard(tokenizer, key_sample.evaluation_strings(cfg.exclude), cfg.ngram)
    sample, dropped = {}, {}
    for lang, texts in raw.items():
        sample[lang] = [t for t in texts if not guard.overlaps(t)]
        dropped[lang] = len(texts) - len(sample[lang])
    if sum(dropped.values()):
        log.warning("key statistics: dropped %d passages sharing %d tokens with evaluation text: %s", sum(dropped.values()), cfg.ngram, dropped)
    out = {"sample": sample, "digest": key_sample.sample_digest(sample), "dropped": dropped,
           "model_fingerprint": fingerprint, "settings_digest": settings_digest}
    if path is not None:
        _atomic_write_text(path, json.dumps(out, ensure_ascii=False, indent=1))
    return out


class _Stop(Exception):
    """Raised after the deepest wanted layer: the rest of the model (and its LM head) is not needed."""


def _rows(tokenizer, sample: dict[str, list[str]], max_length: int) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=True)["input_ids"][:max_length] for texts in sample.values() for t in texts]


def _accumulate_batch(model, rows: list[list[int]], pad_id: int, skip_first: bool, grab: dict) -> int:
    """One forward pass over ``rows`` (right-padded); the hooks add each layer's ``kᵀk`` to its sum.
    Returns the number of keys taken."""
    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [B, T]
    attn = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        attn[i, : len(r)] = 1
    keep = attn.bool()
    if skip_first:
        keep[:, 0] = False
    grab["keep"] = keep.to(device)
    try:
        model(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False)
    except _Stop:
        pass
    return int(keep.sum())


@torch.no_grad()
def _collect(model, tokenizer, arch: ArchSpec, layers: list[int], rows: list[list[int]], cfg: KeyStatsConfig,
             partial: Path | None, expect: dict[str, str]) -> tuple[dict[int, torch.Tensor], int]:
    """``({layer: Σ k kᵀ [d_ff, d_ff] float64}, number of keys)`` over this rank's batches, summed over ranks.

    Hot path (every batch of the sample): resume, hooks, the batch loop and its checkpoints read top to bottom."""
    rank, world = rank_and_world()
    device = next(model.parameters()).device
    modules = {l: model.get_submodule(arch.mlp_out_name(l)) for l in layers}
    batches = [rows[i : i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)]
    mine = list(range(rank, len(batches), world))  # batch i goes to rank i % world
    sums: dict[int, torch.Tensor] = {}
    count, start = 0, 0
    state_meta = {**expect, "layers": json.dumps(layers), "batch_size": str(cfg.batch_size), "world": str(world), "rank": str(rank)}
    if partial is not None and partial.exists():
        try:
            with safe_open(str(partial), "pt") as f:
                meta = f.metadata() or {}
                if all(meta.get(k) == v for k, v in state_meta.items()):
                    sums = {l: f.get_tensor(f"sum.{l}").to(device) for l in layers}
                    count, start = int(meta["count"]), int(meta["next"])
                    log.info("key statistics: resuming at batch %d of %d (%d keys done)", start, len(mine), count)
        except Exception as err:  # a truncated file: start over
            log.warning("ignoring partial key statistics %s: %s", partial, err)
            sums, count, start = {}, 0, 0

    grab: dict[str, torch.Tensor] = {}

    def hook(layer):
        def pre(module, args):
            k = args[0][grab["keep"]].float()  # [N, d_ff]: the keys at the kept positions
            kk = (k.T @ k).double()  # [d_ff, d_ff]: fp32 products within one batch, float64 across batches
            sums[layer] = kk if layer not in sums else sums[layer] + kk
        return pre

    def stop(module, args, output):
        raise _Stop

    handles = [m.register_forward_pre_hook(hook(l)) for l, m in modules.items()]
    handles.append(modules[max(layers)].register_forward_hook(stop))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    since = 0
    try:
        for j in range(start, len(mine)):
            n = _accumulate_batch(model, batches[mine[j]], pad, cfg.skip_first, grab)
            count += n
            since += n
            if partial is not None and cfg.checkpoint_tokens and since >= cfg.checkpoint_tokens and j + 1 < len(mine):
                _atomic_save({f"sum.{l}": sums[l].cpu() for l in layers}, partial, {**state_meta, "count": str(count), "next": str(j + 1)})
                since = 0
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not sums:  # this rank had no batch: zeros, so the collective below still adds up
        sums = {l: torch.zeros(num_neurons(modules[l]), num_neurons(modules[l]), dtype=torch.float64, device=device) for l in layers}
    if world > 1:
        total = torch.tensor([count], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(total)
        count = int(total.item())
        for l in layers:
            torch.distributed.all_reduce(sums[l])
    return sums, count


def cache_folder(cfg: KeyStatsConfig, fingerprint: str) -> Path:
    """Where the statistics of this model and these settings live."""
    base = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_root() / "key-stats"
    return base / f"{fingerprint[:16]}-{_digest(settings_key(cfg))[:16]}"


def key_statistics(model, tokenizer, arch: ArchSpec, cfg: KeyStatsConfig, layers: list[int] | None = None,
                   fingerprint: str | None = None) -> KeyStatistics:
    """``E[k kᵀ]`` per layer over the sample of ``cfg``, from the cache where it holds them.

    Args:
        model: a Hugging Face causal LM (any device; hooks read the MLP output projection's input).
        tokenizer: its tokenizer.
        arch: where the layers and MLP output projections are (:mod:`mke_lightning.modeling.architectures`).
        cfg: the sample and the cache.
        layers: layers to compute (default: every layer).
        fingerprint: the model's identity for the cache (default:
            :func:`mke_lightning.localization.cache.model_fingerprint`; give one for models whose weights are
            partitioned away, e.g. DeepSpeed stage 3).
    """
    n_layers = num_layers(model, arch)
    layers = sorted(set(range(n_layers) if layers is None else layers))
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad or not layers:
        raise ValueError(f"key statistics: layers {bad or layers} out of range for a {n_layers}-layer model")
    if fingerprint is None:
        from mke_lightning.localization.cache import model_fingerprint

        fingerprint = model_fingerprint(model, tokenizer, arch)
    settings = settings_key(cfg)
    folder = cache_folder(cfg, fingerprint) if cfg.cache else None
    have, sample_info = _cached(folder, layers, fingerprint, _digest(settings))
    missing = [l for l in layers if l not in have.layers]
    if not missing:
        log.info("key statistics: layers %s from %s", layers, folder)
        return have
    fresh = _compute(model, tokenizer, arch, cfg, missing, folder, fingerprint, sample_info)
    merged = {l: have._moments[l] for l in have.layers}
    merged.update(fresh._moments)
    tokens = {**{l: have.tokens(l) for l in have.layers}, **{l: fresh.tokens(l) for l in missing}}
    return KeyStatistics(merged, tokens, fresh.metadata)


def _cached(folder: Path | None, layers: list[int], fingerprint: str, settings_digest: str):
    """What the cache ``folder`` holds for this model and settings: ``(statistics of the layers it has, the
    sample's record or None)``."""
    have = KeyStatistics({}, {})
    if folder is None or not (folder / "sample.json").exists():
        return have, None
    sample_info = json.loads((folder / "sample.json").read_text(encoding="utf-8"))
    if sample_info.get("model_fingerprint") != fingerprint or sample_info.get("settings_digest") != settings_digest:
        return have, None
    expect = {"model_fingerprint": fingerprint, "settings_digest": settings_digest, "sample_digest": sample_info["digest"]}
    return KeyStatistics.load(folder, layers, expect=expect), sample_info


def _compute(model, tokenizer, arch: ArchSpec, cfg: KeyStatsConfig, missing: list[int], folder: Path | None,
             fingerprint: str, sample_info: dict | None) -> KeyStatistics:
    """The statistics of the ``missing`` layers (the sample built first when ``sample_info`` is None), saved
    into ``folder`` when it is given."""
    settings = settings_key(cfg)
    t0 = time.perf_counter()
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        about = folder / "settings.json"
        if not about.exists():
            _atomic_write_text(about, json.dumps({"model_fingerprint": fingerprint, "settings": settings}, indent=2, sort_keys=True, ensure_ascii=False))
    if sample_info is None:
        sample_info = build_sample(model, tokenizer, cfg, folder, fingerprint)
    t_sample = time.perf_counter() - t0
    expect = {"model_fingerprint": fingerprint, "settings_digest": _digest(settings), "sample_digest": sample_info["digest"]}
    rows = _rows(tokenizer, sample_info["sample"], cfg.max_length)
    if not rows:
        raise ValueError("key statistics: the sample is empty (every passage was dropped or the source has no text)")
    rank, world = rank_and_world()
    partial = folder / "partial" / f"rank{rank}-of{world}.safetensors" if folder is not None else None
    t1 = time.perf_counter()
    sums, count = _collect(model, tokenizer, arch, missing, rows, cfg, partial, expect)
    if count == 0:
        raise ValueError("key statistics: no keys (every passage is a single token)")
    moments = {}
    for l in missing:
        c = sums[l].cpu() / count  # [d_ff, d_ff] float64
        moments[l] = ((c + c.T) / 2).float()  # exact symmetry: the per-batch products are symmetric only to rounding
    metadata = {
        **expect, "settings": settings, "dropped": sample_info.get("dropped", {}),
        "passages": sum(len(v) for v in sample_info["sample"].values()),
        "seconds_sample": round(t_sample, 2), "seconds_keys": round(time.perf_counter() - t1, 2), "world_size": world,
    }
    fresh = KeyStatistics(moments, {l: count for l in missing}, metadata)
    if folder is not None:
        fresh.save(folder)
        if partial is not None and partial.exists():
            partial.unlink()
        log.info("key statistics: layers %s computed over %d keys in %.1f s into %s", missing, count, time.perf_counter() - t0, folder)
    return fresh


# --------------------------------------------------------------------------- command line


def compute_main(args: list[str] | None = None) -> dict[str, Any]:
    """``mke key-stats``-style entry point: compute (or find in the cache) the statistics of a model.

    Prints and returns a JSON summary (folder, layers, keys, seconds, MB on disk)."""
    import argparse

    from mke_lightning.modeling.loading import ModelConfig, load_causal_lm

    p = argparse.ArgumentParser(prog="mke key-stats", description="Compute the preservation statistics E[k kᵀ] of a model's MLP keys ahead of time.")
    p.add_argument("--model", default=ModelConfig.name_or_path, help="model.lm.name_or_path (default: the embedded gemma-3-270m)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--layers", type=int, nargs="*", default=None, help="layers (default: all)")
    p.add_argument("--languages", nargs="*", default=None, help="sample languages (default: the 12 MzsRE languages)")
    p.add_argument("--tokens-per-language", type=int, default=KeyStatsConfig.tokens_per_language)
    p.add_argument("--max-length", type=int, default=KeyStatsConfig.max_length)
    p.add_argument("--seed", type=int, default=KeyStatsConfig.seed)
    p.add_argument("--source", default=KeyStatsConfig.source, help="'generated' or a JSON file {lang: [passage, ...]}")
    p.add_argument("--exclude", nargs="*", default=[], help="benchmark files/folders the sample must not overlap")
    p.add_argument("--cache-dir", default=None)
    ns = p.parse_args(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # progress of the generation and of the sums
    model, tokenizer, arch = load_causal_lm(ModelConfig(name_or_path=ns.model, dtype=ns.dtype))
    cfg = KeyStatsConfig(languages=ns.languages, tokens_per_language=ns.tokens_per_language, max_length=ns.max_length,
                         seed=ns.seed, source=ns.source, exclude=ns.exclude, cache_dir=ns.cache_dir)
    t0 = time.perf_counter()
    stats = key_statistics(model, tokenizer, arch, cfg, ns.layers)
    seconds = time.perf_counter() - t0
    folder = cache_folder(cfg, stats.metadata["model_fingerprint"])
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    out = {"folder": str(folder), "layers": stats.layers, "keys_per_layer": stats.tokens(stats.layers[0]),
           "seconds": round(seconds, 1), "mb_on_disk": round(size / 2**20, 1)}
    print(json.dumps(out, indent=2))
    return out

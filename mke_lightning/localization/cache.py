"""A disk cache of neuron masks, keyed by model, settings and record.

Layout under the cache root (default ``$MKE_CACHE_DIR/neuron-masks`` or
``~/.cache/mke-lightning/neuron-masks``)::

    <model fingerprint[:16]>-<settings digest[:16]>/
        settings.json                 what the key stands for (for people)
        masks/<record digest>.safetensors   one file per record (NeuronMask.save)

A mask is reused only when its file's metadata names the same model
fingerprint, the same settings digest and the same record content: changing
any setting that changes which neurons are found, the model's weights, its
tokenizer, or the record's text, recomputes. Settings that only change how
fast the same scores are computed (``memory_budget_mb``, ``batch_rows``,
``prefix_cache``) are not part of the key. Files are written atomically, one
per record as soon as it is done, so a killed run loses at most the record in
progress; each rank writes the files of its own records.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from mke_lightning.data.records import EditRecord
from mke_lightning.localization.locate import LocalizationConfig
from mke_lightning.localization.neurons import NeuronMask
from mke_lightning.modeling.architectures import ArchSpec
from mke_lightning.modeling.loading import cache_root

log = logging.getLogger(__name__)

SPEED_ONLY = ("memory_budget_mb", "batch_rows", "prefix_cache")
"""Attribution settings that change speed and memory, not the scores."""

ADDED_LATER = {"relative_to_background": False}
"""Localisation settings added after the cache format, with the default that leaves the key as it was."""

_SAMPLE = 4096  # values per tensor in the fingerprint's strided sample
_PROBE_TEXT = "The capital of France is Paris. 東京 Москва ø"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str, ensure_ascii=False).encode()).hexdigest()


@torch.no_grad()
def model_fingerprint(model, tokenizer, arch: ArchSpec) -> str:
    """A digest of the model's config, weights, neuron modules and tokenizer.

    Weights enter as, per tensor, its name, shape, dtype, an exact checksum
    (the sum of its values' bit patterns as integers: any changed value moves
    it) and a strided sample of its values. Integer sums do not depend on the
    order of addition, so the digest is the same on CPU and GPU and for any
    number of threads: a delta made on a GPU checks against the same model
    loaded on a CPU. Reading every weight once costs about a second for a
    270M model. Models whose weights are partitioned away (DeepSpeed stage 3)
    should be given an explicit fingerprint instead.
    """
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    h = hashlib.sha256()
    h.update(_digest({"config": config, "arch": asdict(arch)}).encode())
    special = {k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")}
    probe = tokenizer(_PROBE_TEXT, add_special_tokens=True)["input_ids"]
    h.update(
        _digest(
            {"tokenizer": type(tokenizer).__name__, "size": len(tokenizer), "special": special, "probe": probe}
        ).encode()
    )
    for name, t in sorted(model.state_dict().items()):
        if not torch.is_tensor(t) or t.numel() == 0:
            h.update(f"{name}:empty".encode())
            continue
        flat = t.detach().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(_checksum(flat).to_bytes(8, "little", signed=True))
        stride = max(1, flat.numel() // _SAMPLE)
        sample = flat[::stride][:_SAMPLE]
        sample = (
            sample.float() if torch.is_floating_point(sample) else sample.to(torch.float64)
        )  # int8 weights, quantisation statistics
        h.update(sample.cpu().numpy().tobytes())
    return h.hexdigest()


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK = 1 << 22  # values summed at once: bounds the int64 copy to 32 MiB


def _checksum(flat: torch.Tensor) -> int:
    """The sum of ``flat``'s values (``[N]``) read as integers of their own width (floats: their bit patterns),
    in int64: exact, so the same on every device; a sum past the int64 range wraps, the same way everywhere."""
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    if torch.is_floating_point(flat) or flat.is_complex():
        flat = flat.view(_INT_OF_SIZE[flat.element_size()])  # [N'] the same bytes as integers
    total = torch.zeros((), dtype=torch.int64, device=flat.device)
    for chunk in flat.split(_CHUNK):
        total += chunk.to(torch.int64).sum()
    return int(total)


def settings_key(cfg: LocalizationConfig, edit_language: str) -> dict[str, Any]:
    """The settings that decide which neurons are found (the cache key's part)."""
    key = asdict(cfg)
    background = key.pop("background", None)  # the busy filter runs after the cache: cached masks are unfiltered
    if cfg.relative_to_background and background is not None:  # but these prompts set the scores' divisor
        key["relative_prompts"] = {k: background[k] for k in ("prompts", "languages")}
    for name in SPEED_ONLY:
        key["attribution"].pop(name, None)
    if (
        key["attribution"].get("quadrature") == "right_riemann"
    ):  # the rule before it was a setting: those masks stay valid
        key["attribution"].pop("quadrature")
    for name, default in ADDED_LATER.items():
        if key.get(name) == default:  # at its default it changes nothing: masks cached before it existed stay valid
            key.pop(name)
    key["edit_language"] = edit_language
    return key


def record_digest(record: EditRecord, languages: list[str] | None = None) -> str:
    """Digest of ``record``, of only its ``languages`` when given (what localisation reads of it)."""
    whole = record.to_dict()
    if languages is not None:
        whole["languages"] = {l: whole["languages"][l] for l in languages if l in whole["languages"]}
    return _digest(whole)


class MaskCache:
    """Masks of one (model, settings) pair on disk."""

    def __init__(self, root: str | Path | None, fingerprint: str, cfg: LocalizationConfig, edit_language: str) -> None:
        self.fingerprint = fingerprint
        self.settings = settings_key(cfg, edit_language)
        self.settings_digest = _digest(self.settings)
        base = Path(root).expanduser() if root else cache_root() / "neuron-masks"
        self.folder = base / f"{fingerprint[:16]}-{self.settings_digest[:16]}"
        self.method = cfg.attribution.method
        # localisation reads the record in these languages only: a run that loads more or fewer
        # evaluation languages of the same records finds the same masks
        self.languages = list(dict.fromkeys([*cfg.cross_languages, edit_language]))

    def path(self, record: EditRecord) -> Path:
        # Record ids are free text; the file is named by a digest of the id.
        return self.folder / "masks" / f"{hashlib.sha256(record.id.encode()).hexdigest()[:24]}.safetensors"

    def metadata(self, record: EditRecord) -> dict[str, Any]:
        return {
            "model_fingerprint": self.fingerprint,
            "settings_digest": self.settings_digest,
            "record_digest": record_digest(record, self.languages),
            "method": self.method,
            "settings": self.settings,
        }

    def load(self, record: EditRecord) -> NeuronMask | None:
        """The cached mask of ``record``, or ``None`` when there is none or it is stale."""
        path = self.path(record)
        if not path.exists():
            return None
        try:
            mask = NeuronMask.load(path)
        except ValueError as err:
            log.warning("ignoring cached mask %s: %s", path, err)
            return None
        want = self.metadata(record)
        meta = mask.metadata
        if mask.record_id != record.id or any(meta.get(k) != want[k] for k in ("model_fingerprint", "settings_digest")):
            return None
        # also valid: a mask saved under the whole record's digest (before the digest covered its languages only)
        if meta.get("record_digest") not in (want["record_digest"], record_digest(record)):
            return None
        return mask

    def save(self, record: EditRecord, mask: NeuronMask) -> Path:
        mask.metadata = {**mask.metadata, **self.metadata(record)}
        self.folder.mkdir(parents=True, exist_ok=True)
        about = self.folder / "settings.json"
        if not about.exists():
            about.write_text(
                json.dumps({"model_fingerprint": self.fingerprint, "settings": self.settings}, indent=2, sort_keys=True)
            )
        return mask.save(self.path(record))

"""The located neurons of one edit, per category and layer, and their file form.

A mask file is one safetensors file: per group (a category, or a language's
own set under ``language.<code>``) an int32 tensor ``[n, 2]`` of
``(layer, neuron)`` pairs, and in the header a JSON metadata string (record
id, model fingerprint, attribution method, settings) under the key ``mke``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence, get_args

import torch

Category = Literal["independent", "specific"]
CATEGORIES: tuple[str, ...] = get_args(Category)
"""MEMLA's two neuron categories: language-independent (shared by the cross
languages) and language-specific (the edit language's own)."""

FORMAT_VERSION = 1
_LANG_PREFIX = "language."

LayerMap = dict[int, list[int]]


def _clean(per_layer: dict) -> LayerMap:
    return {
        int(l): sorted(int(i) for i in idx)
        for l, idx in sorted(per_layer.items(), key=lambda kv: int(kv[0]))
        if len(idx)
    }


def merge_layers(maps: Iterable[LayerMap]) -> LayerMap:
    """Every neuron of ``maps``, per layer: ``layer -> sorted indices``."""
    out: dict[int, set[int]] = {}
    for per_layer in maps:
        for layer, idx in per_layer.items():
            out.setdefault(layer, set()).update(idx)
    return {l: sorted(v) for l, v in sorted(out.items())}


@dataclass
class NeuronMask:
    """Per category, a map ``layer -> sorted neuron indices``.

    ``languages`` holds each language's own set (before categories are
    formed), for inspection; ``metadata`` what produced the mask.
    """

    record_id: str
    layers: dict[str, LayerMap] = field(default_factory=lambda: {c: {} for c in CATEGORIES})
    languages: dict[str, LayerMap] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str | None = field(default=None, compare=False, repr=False)
    """The file the mask was read from (named in errors); ``None`` for a mask built in memory."""

    def __post_init__(self) -> None:
        self.layers = {cat: _clean(per_layer) for cat, per_layer in self.layers.items()}
        self.languages = {lang: _clean(per_layer) for lang, per_layer in self.languages.items()}

    def category(self, name: str) -> LayerMap:
        return self.layers.get(name, {})

    def union(self) -> LayerMap:
        """Neurons of every category, merged per layer."""
        return merge_layers(self.layers.values())

    def count(self, category: str | None = None) -> int:
        cats = [category] if category else list(self.layers)
        return sum(len(idx) for c in cats for idx in self.layers.get(c, {}).values())

    def out_of_range(self, n_layers: int, width: int | Sequence[int]) -> tuple[str, int, int] | None:
        """The first ``(group, layer, neuron)`` outside a model of ``n_layers`` layers of ``width``
        neurons each (one number, or one per layer), or ``None`` when every neuron fits."""
        groups = [*self.layers.items(), *((_LANG_PREFIX + g, m) for g, m in self.languages.items())]
        for group, per_layer in groups:
            for layer, idx in per_layer.items():
                if not 0 <= layer < n_layers:
                    return group, layer, idx[0] if idx else 0
                bad = [i for i in idx if not 0 <= i < (width if isinstance(width, int) else width[layer])]
                if bad:
                    return group, layer, bad[0]
        return None

    def check_bounds(self, n_layers: int, width: int | Sequence[int], model: str = "the model") -> None:
        """Raise :class:`MaskError` naming the mask's file (or record) if a neuron lies outside
        ``n_layers`` layers of ``width`` neurons: such a mask would crash an edit half-way through a run."""
        bad = self.out_of_range(n_layers, width)
        if bad is None:
            return
        group, layer, neuron = bad
        if not isinstance(width, int):
            width = width[layer] if 0 <= layer < n_layers else min(width)
        where = f"neuron-mask file {self.source}" if self.source else f"the neuron mask of record {self.record_id!r}"
        fix = ("delete the file (a cached mask is then located again) or pass a mask made for this model"
               if self.source else "locate the record's neurons again on this model")
        raise MaskError(
            f"{where} (record {self.record_id!r}) names layer {layer}, neuron {neuron} in group {group!r}, but "
            f"{model} has {n_layers} layers of {width} MLP neurons "
            f"(layers 0-{n_layers - 1}, neurons 0-{width - 1}); {fix}"
        )

    def same_neurons(self, other: "NeuronMask") -> bool:
        """Same record, categories and language sets (metadata aside)."""
        return (self.record_id, self.layers, self.languages) == (other.record_id, other.layers, other.languages)

    # -- plain dict (JSON, all_gather_object) ---------------------------------
    def to_dict(self) -> dict:
        return {
            "record_id": self.record_id,
            "layers": {c: {str(l): v for l, v in d.items()} for c, d in self.layers.items()},
            "languages": {g: {str(l): v for l, v in d.items()} for g, d in self.languages.items()},
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, obj: dict) -> "NeuronMask":
        return cls(
            record_id=obj["record_id"],
            layers={c: dict(d) for c, d in obj["layers"].items()},
            languages={g: dict(d) for g, d in obj.get("languages", {}).items()},
            metadata=dict(obj.get("metadata", {})),
        )

    # -- file form -------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the mask as safetensors with JSON metadata; atomic (a kill leaves no half file)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {cat: _pairs(per_layer) for cat, per_layer in self.layers.items()}
        tensors.update({_LANG_PREFIX + lang: _pairs(per_layer) for lang, per_layer in self.languages.items()})
        header = {"format_version": FORMAT_VERSION, "record_id": self.record_id, **self.metadata}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp), metadata={"mke": json.dumps(header, sort_keys=True)})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], bounds: tuple[int, int] | None = None) -> "NeuronMask":
        """Read a file written by :meth:`save`.

        ``bounds``: ``(n_layers, width)`` of the model the mask is for (:func:`model_bounds`); a neuron
        outside it raises :class:`MaskError` naming the file. Negative indices are refused always.
        """
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                header = (f.metadata() or {}).get("mke")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"{path}: not a readable neuron-mask file ({err})") from err
        if header is None:
            raise ValueError(f"{path}: a safetensors file without neuron-mask metadata (no 'mke' header key)")
        meta = json.loads(header)
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path}: mask format version {meta.get('format_version')!r}, this version reads {FORMAT_VERSION}"
            )
        record_id = meta.pop("record_id")
        meta.pop("format_version")
        for name, pairs in tensors.items():
            if pairs.dim() != 2 or pairs.shape[1] != 2 or pairs.dtype.is_floating_point or pairs.dtype == torch.bool:
                raise MaskError(f"{path}: group {name!r} holds a {tuple(pairs.shape)} {pairs.dtype} tensor, not [n, 2] "
                                "integer (layer, neuron) pairs; delete the file (a cached mask is then located again)")
        layers = {k: _layer_map(v) for k, v in tensors.items() if not k.startswith(_LANG_PREFIX)}
        languages = {k[len(_LANG_PREFIX):]: _layer_map(v) for k, v in tensors.items() if k.startswith(_LANG_PREFIX)}
        mask = cls(record_id=record_id, layers=layers, languages=languages, metadata=meta, source=str(path))
        negative = mask.out_of_range(1 << 62, 1 << 62)
        if negative is not None:
            group, layer, neuron = negative
            raise MaskError(f"{path}: group {group!r} holds a negative index (layer {layer}, neuron {neuron}); "
                            "delete the file (a cached mask is then located again)")
        if bounds is not None:
            mask.check_bounds(*bounds)
        return mask


class MaskError(ValueError):
    """A neuron mask that cannot be used: unreadable, or naming neurons the model does not have."""


def unite_masks(masks: list[NeuronMask]) -> NeuronMask:
    """One mask holding every neuron of ``masks``, per category and layer (a batch's edits trained together)."""
    categories = dict.fromkeys([*CATEGORIES, *(c for m in masks for c in m.layers)])
    return NeuronMask("+".join(m.record_id for m in masks),
                      {c: merge_layers(m.layers.get(c, {}) for m in masks) for c in categories})


def model_bounds(model, arch) -> tuple[int, list[int]]:
    """``(n_layers, widths)``: how many layers ``model`` has and how many MLP neurons each holds."""
    from mke_lightning.modeling.architectures import mlp_out_modules, num_neurons

    modules = mlp_out_modules(model, arch)
    return len(modules), [num_neurons(m) for m in modules]


def check_masks(masks, model, arch, model_name: str = "the model") -> None:
    """Bounds-check every mask of ``masks`` (an iterable of :class:`NeuronMask`) against ``model``
    before any edit, naming the first bad one's file or record (see :meth:`NeuronMask.check_bounds`)."""
    masks = list(masks)
    if not masks:
        return
    n_layers, width = model_bounds(model, arch)
    for mask in masks:
        mask.check_bounds(n_layers, width, model_name)


def _pairs(per_layer: LayerMap) -> torch.Tensor:
    """``[n, 2]`` int32 (layer, neuron) pairs."""
    rows = [(l, i) for l, idx in sorted(per_layer.items()) for i in idx]
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, 2)


def _layer_map(pairs: torch.Tensor) -> LayerMap:
    out: dict[int, list[int]] = {}
    for layer, neuron in pairs.tolist():
        out.setdefault(int(layer), []).append(int(neuron))
    return out

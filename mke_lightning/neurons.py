"""The located neurons of one edit, per category and layer."""

from __future__ import annotations

from dataclasses import dataclass, field

CATEGORIES = ("independent", "specific")
"""MEMLA's two neuron categories: language-independent (shared by the cross
languages) and language-specific (the edit language's own)."""


@dataclass
class NeuronMask:
    """Per category, a map ``layer -> sorted neuron indices``."""

    record_id: str
    layers: dict[str, dict[int, list[int]]] = field(default_factory=lambda: {c: {} for c in CATEGORIES})

    def __post_init__(self) -> None:
        for cat in list(self.layers):
            self.layers[cat] = {int(l): sorted(int(i) for i in idx) for l, idx in self.layers[cat].items() if len(idx)}

    def category(self, name: str) -> dict[int, list[int]]:
        return self.layers.get(name, {})

    def union(self) -> dict[int, list[int]]:
        """Neurons of every category, merged per layer."""
        out: dict[int, set[int]] = {}
        for per_layer in self.layers.values():
            for layer, idx in per_layer.items():
                out.setdefault(layer, set()).update(idx)
        return {l: sorted(v) for l, v in sorted(out.items())}

    def count(self, category: str | None = None) -> int:
        cats = [category] if category else list(self.layers)
        return sum(len(idx) for c in cats for idx in self.layers.get(c, {}).values())

    def to_dict(self) -> dict:
        return {"record_id": self.record_id, "layers": {c: {str(l): v for l, v in d.items()} for c, d in self.layers.items()}}

    @classmethod
    def from_dict(cls, obj: dict) -> "NeuronMask":
        return cls(record_id=obj["record_id"], layers={c: {int(l): v for l, v in d.items()} for c, d in obj["layers"].items()})

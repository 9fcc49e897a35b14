"""Plain LoRA: a fixed-rank adapter per layer, nothing masked.

The layers are ``lora.layers``, or, when null, the layers holding the record's
located neurons (then it needs the NeuronLocalization callback).
"""

from __future__ import annotations

from dataclasses import asdict, replace

from mke_lightning.editing.masked_lora import attach, whole_layers
from mke_lightning.editing.methods.registry import EditMethod, register
from mke_lightning.localization.neurons import CATEGORIES


@register
class PlainLoRA(EditMethod):
    name = "lora"

    @property
    def needs_masks(self) -> bool:
        return self.editor.lora_config.layers is None

    def settings(self) -> dict:
        return {"lora": asdict(self.editor.lora_config)}

    def attach(self, mask):
        ed = self.editor
        layers = ed.lora_config.layers or sorted(mask.union())
        if not layers:
            return None
        full = whole_layers(ed.causal_lm, ed.arch, layers, mask.record_id if mask else "")
        return attach(ed.causal_lm, ed.arch, full, replace(ed.lora_config, categories=[CATEGORIES[0]]))

"""MEMLA: LoRA adapters on the MLP output projections, masked to the located neurons.

One adapter per neuron category (language-independent, language-specific) at
each layer holding located neurons; dropping a category in
``lora.categories`` gives the ablations, named ``memla-no_<category>``.
"""

from __future__ import annotations

from dataclasses import asdict

from mke_lightning.editing.masked_lora import attach
from mke_lightning.editing.methods.registry import EditMethod, register
from mke_lightning.localization.neurons import CATEGORIES


@register
class MEMLA(EditMethod):
    name = "memla"

    @property
    def label(self) -> str:
        off = [c for c in CATEGORIES if c not in self.editor.lora_config.categories]
        return self.name + "".join(f"-no_{c}" for c in off)

    def settings(self) -> dict:
        return {"lora": asdict(self.editor.lora_config)}

    def attach(self, mask):
        return attach(self.editor.causal_lm, self.editor.arch, mask, self.editor.lora_config)

    def neuron_count(self, mask, handle) -> int:
        if mask is None:  # a record without its own mask: what the united update changes
            return handle.count() if handle is not None else 0
        return sum(len(idx) for c in self.editor.lora_config.categories for idx in mask.category(c).values())

"""FT-L: constrained fine-tuning of whole output projections (``values.layers``), each entry's change clamped."""

from __future__ import annotations

from dataclasses import asdict

from mke_lightning.editing.methods.registry import EditMethod, register
from mke_lightning.editing.value_update import attach_values


@register
class FTL(EditMethod):
    name = "ft_l"

    def check(self) -> None:
        if self.editor.values_config.layers is None:
            raise ValueError("method ft_l fine-tunes whole output projections: set values.layers (e.g. [12])")

    @property
    def needs_masks(self) -> bool:
        return False

    def settings(self) -> dict:
        return {"values": asdict(self.editor.values_config)}

    def attach(self, mask):
        return attach_values(self.editor.causal_lm, self.editor.arch, mask, self.editor.values_config)

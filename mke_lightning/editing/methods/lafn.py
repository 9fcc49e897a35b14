"""LAFN: the value vectors of the language-agnostic neurons, updated directly (our reading of the paper).

Trained on every language in ``train_languages`` at once; the neurons are the
located ones of ``values.categories`` (the independent set by default).
"""

from __future__ import annotations

from dataclasses import asdict

from mke_lightning.editing.methods.registry import EditMethod, register
from mke_lightning.editing.value_update import attach_values


@register
class LAFN(EditMethod):
    name = "lafn"

    def check(self) -> None:
        if self.editor.values_config.layers is not None:
            raise ValueError("method lafn updates the located neurons: leave values.layers null (ft_l takes whole layers)")

    def settings(self) -> dict:
        return {"values": asdict(self.editor.values_config)}

    def attach(self, mask):
        return attach_values(self.editor.causal_lm, self.editor.arch, mask, self.editor.values_config)

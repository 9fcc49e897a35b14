"""Preservation for the neuron methods: keep a trained update away from what the model already does.

A neuron-masked update changes the value vectors of neurons ``idx`` of a
layer's output projection, so for a key ``k`` (the projection's input, the
neuron activations) the layer's output moves by ``ΔW[:, idx] k[idx]``. Over
ordinary text that change has the mean square

    E ||ΔW_idx k_idx||² = tr(ΔW_idx C_idx ΔW_idxᵀ),   C = E[k kᵀ]   ([d_ff, d_ff], key_statistics.py)

and the preservation term of the loss is that, relative to the layer's own
output energy over the same text, ``tr(W C Wᵀ)``, summed over the edited
layers and weighted by ``penalty``. Under ``sequential`` the keys of earlier
edits (their edit prompts' last-position activations, taken when they were
made) join it: ``earlier_weight`` x Σ_p ||ΔW_idx k_p,idx||² / ||W k_p||², so a
later edit pays for moving what an earlier one wrote. After training, each
neuron's change can be bounded relative to its value vector's norm
(``max_norm_ratio``); the bound acts on the final delta, whatever produced it.

Everything here reads the update through the handle's ``live_delta()``
(layer -> (idx [n], values [n, d_model]) with gradients), so it applies to
every trained method whose handle offers it (MEMLA, LoRA, FT-L, LAFN).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mke_lightning.editing.key_statistics import KeyStatsConfig, key_statistics
from mke_lightning.editing.neuron_delta import NeuronDelta
from mke_lightning.modeling.architectures import neuron_dim


@dataclass
class PreservationConfig:
    """How a neuron method's update is kept away from ordinary text and from earlier edits."""

    penalty: float = 0.0
    """Weight of the relative output change on ordinary text (0: off, the authors' reading)."""
    earlier_weight: float = 0.0
    """``sequential``: weight of the relative output change on the keys of earlier edits (0: off)."""
    max_norm_ratio: float | None = None
    """If set, each neuron's change is scaled back to at most this fraction of its value vector's norm."""
    stats: KeyStatsConfig = field(default_factory=KeyStatsConfig)
    """The text sample and cache of the key statistics."""

    def __post_init__(self) -> None:
        if self.penalty < 0 or self.earlier_weight < 0:
            raise ValueError("preserve.penalty and preserve.earlier_weight must be >= 0")
        if self.max_norm_ratio is not None and self.max_norm_ratio <= 0:
            raise ValueError(f"preserve.max_norm_ratio must be > 0 or null, got {self.max_norm_ratio}")

    @property
    def active(self) -> bool:
        return self.penalty > 0 or self.earlier_weight > 0 or self.max_norm_ratio is not None


def _out_weight(model, arch, layer: int) -> torch.Tensor:
    """The output projection's weight as ``[d_model, d_ff]`` (fp32, detached)."""
    module = model.get_submodule(arch.mlp_out_name(layer))
    w = getattr(module, "base_layer", module).weight.detach().float()
    return w if neuron_dim(module) == 1 else w.t()


class Preservation:
    """The preservation terms of one run: statistics, earlier edits' keys, the bound."""

    def __init__(self, cfg: PreservationConfig) -> None:
        self.cfg = cfg
        self._stats = None
        self._energy: dict[int, float] = {}  # layer -> tr(W C Wᵀ)
        self._sub: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (idx [n], C[idx][:, idx] [n, n]) last used
        self.earlier: dict[int, list[torch.Tensor]] = {}  # layer -> keys [d_ff] of earlier edits, each / ||W k||
        self._stacked: dict[int, torch.Tensor] = {}  # layer -> the same keys stacked [P, d_ff], built once per edit

    def _statistics(self, editor):
        if self._stats is None:
            self._stats = key_statistics(editor.causal_lm, editor.tokenizer, editor.arch, self.cfg.stats)
        return self._stats

    def _layer_energy(self, editor, layer: int) -> float:
        if layer not in self._energy:
            c = self._statistics(editor).second_moment(layer).to(editor.device)  # [d_ff, d_ff]
            w = _out_weight(editor.causal_lm, editor.arch, layer)  # [d_model, d_ff]
            self._energy[layer] = float(((w @ c) * w).sum())
        return self._energy[layer]

    def _sub_moment(self, editor, layer: int, idx: torch.Tensor) -> torch.Tensor:
        """``C[idx][:, idx]`` of ``layer``, kept while an edit's steps ask for the same neurons."""
        known = self._sub.get(layer)
        if known is None or not torch.equal(known[0], idx.cpu()):
            c = self._statistics(editor).second_moment(layer)  # [d_ff, d_ff]
            known = (idx.cpu().clone(), c[idx.cpu()][:, idx.cpu()].clone())
            self._sub[layer] = known
        return known[1]

    def penalty(self, editor, handle) -> torch.Tensor | None:
        """The preservation term of the loss for the handle's current update (``None``: nothing to add)."""
        if self.cfg.penalty <= 0 and (self.cfg.earlier_weight <= 0 or not self.earlier):
            return None
        total = None
        for layer, (idx, values) in handle.live_delta().items():  # idx [n], values [n, d_model]
            term = values.new_zeros((), dtype=torch.float32)
            if self.cfg.penalty > 0:
                c = self._sub_moment(editor, layer, idx).to(values.device)  # [n, n]
                v = values.float()
                term = term + self.cfg.penalty * ((c @ v) * v).sum() / self._layer_energy(editor, layer)
            if self.cfg.earlier_weight > 0 and self.earlier.get(layer):
                if layer not in self._stacked:  # the keys change only between edits, not between steps
                    self._stacked[layer] = torch.stack(self.earlier[layer]).to(values.device)  # [P, d_ff]
                k = self._stacked[layer][:, idx]  # [P, n]
                term = term + self.cfg.earlier_weight * (k @ values.float()).pow(2).sum()
            total = term if total is None else total + term
        return total

    @torch.no_grad()
    def remember(self, editor, prompts: list[list[int]], layers: list[int]) -> None:
        """Keep the last-position keys of an applied edit's prompts at ``layers`` (taken before it is applied)."""
        if self.cfg.earlier_weight <= 0 or not prompts:
            return
        from mke_lightning.modeling.forward import left_pad

        ids, mask, pos = left_pad(prompts, editor.tokenizer.pad_token_id)
        caught: dict[int, torch.Tensor] = {}
        hooks = [editor.causal_lm.get_submodule(editor.arch.mlp_out_name(l)).register_forward_pre_hook(
            lambda m, args, l=l: caught.__setitem__(l, args[0][:, -1].detach().float())) for l in layers]  # [B, d_ff]
        try:
            editor.causal_lm(input_ids=ids.to(editor.device), attention_mask=mask.to(editor.device),
                             position_ids=pos.to(editor.device))
        finally:
            for h in hooks:
                h.remove()
        for layer, k in caught.items():
            w = _out_weight(editor.causal_lm, editor.arch, layer)  # [d_model, d_ff]
            scale = (k @ w.t()).norm(dim=-1, keepdim=True).clamp(min=1e-6)  # [B, 1]: ||W k||
            self.earlier.setdefault(layer, []).extend((k / scale).cpu().unbind(0))
            self._stacked.pop(layer, None)

    def bound(self, editor, delta: NeuronDelta) -> NeuronDelta:
        """Each neuron's change scaled back to ``max_norm_ratio`` x its value vector's norm."""
        ratio = self.cfg.max_norm_ratio
        if ratio is None:
            return delta
        out = {}
        for layer, (idx, values) in delta.layers.items():
            w = _out_weight(editor.causal_lm, editor.arch, layer)  # [d_model, d_ff]
            limit = ratio * w[:, idx.to(w.device)].norm(dim=0).to(values.device)  # [n]
            norms = values.float().norm(dim=1)  # [n]
            scale = (limit / norms.clamp(min=1e-12)).clamp(max=1.0)
            out[layer] = (idx, (values.float() * scale[:, None]).to(values.dtype))
        return NeuronDelta(out)

    def state(self) -> dict:
        """What a checkpoint keeps: the earlier edits' keys (``[P, d_ff]`` per layer) and each layer's output
        energy, taken on the model of the layer's first edit (a resumed run must not take it again on the
        edited model)."""
        return {"earlier": {str(l): torch.stack(k) for l, k in self.earlier.items() if k},
                "energy": {str(l): e for l, e in self._energy.items()}}

    def load_state(self, state: dict) -> None:
        self.earlier = {int(l): list(t.float().unbind(0)) for l, t in state.get("earlier", {}).items()}
        self._energy = {int(l): float(e) for l, e in state.get("energy", {}).items()}
        self._stacked = {}

"""LoRA on the MLP output projections, masked to located neurons.

With PEFT's LoRA on an output projection, ``W' = W + s * B A`` where ``A`` is
``[r, d_ff]``: column ``i`` of ``A`` feeds neuron ``i``'s value vector, and
column ``i`` of ``B A`` is zero whenever column ``i`` of ``A`` is. So the
update stays inside the located neurons if the other columns of ``A`` start
at zero and never receive a gradient: they are zeroed at init and a gradient
hook multiplies every gradient of ``A`` by the neuron mask. ``B`` starts at
zero (PEFT's default), so the edit starts as the identity.

One adapter per neuron category (language-independent, language-specific),
each on the layers that hold neurons of that category, with rank
``rank_factor x`` (neurons of that category in that layer).

:func:`attach` returns a handle; :meth:`MaskedLoRA.finish` removes the
adapters and applies the trained update (``merge_scale * delta``, optionally
with each neuron's update norm clamped) as a
:class:`~mke_lightning.editing.neuron_delta.NeuronDelta`: merged into the weights, or
on top of them where they cannot be written (int8, partitioned). What it
returns undoes the edit exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from mke_lightning.editing.neuron_delta import APPLY_MODES, ApplyMode, NeuronDelta, OnTop, Restore, apply_delta
from mke_lightning.localization.neurons import CATEGORIES, Category, NeuronMask, merge_layers
from mke_lightning.modeling.architectures import ArchSpec, neuron_dim, num_neurons


@dataclass
class LoRAConfig:
    """The masked LoRA adapters and how the trained update is merged."""

    rank_factor: int = 4
    """LoRA rank per layer = rank_factor x located neurons (MEMLA uses 4)."""
    rank: int | None = None
    """A fixed rank per layer instead (plain LoRA, where every neuron of a layer is trainable)."""
    layers: list[int] | None = None
    """Plain LoRA (``model.method: lora``): the layers adapted; null: the layers holding the located neurons."""
    alpha_factor: float = 1.0
    """lora_alpha = alpha_factor x rank, so the LoRA scale alpha/r is alpha_factor."""
    merge_scale: float = 0.5
    """W += merge_scale x (B A) when the edit is merged (MEMLA's fixed 0.5)."""
    max_neuron_norm: float | None = None
    """If set, each neuron's value-vector update is clamped to this L2 norm, in training and at merge."""
    categories: list[Category] = field(default_factory=lambda: list(CATEGORIES))
    """Neuron categories that get an adapter (drop one for an ablation)."""
    apply: ApplyMode = "auto"
    """How a trained edit reaches the model: ``merge`` (written into the weights, undone exactly),
    ``on_top`` (added by forward hooks, weights untouched) or ``auto`` (merge where the weights
    can be written in place, on top where they are int8 or partitioned)."""

    def __post_init__(self) -> None:
        if self.rank_factor < 1:
            raise ValueError("lora.rank_factor must be >= 1")
        if self.rank is not None and self.rank < 1:
            raise ValueError("lora.rank must be >= 1 or null")
        if self.layers is not None and not self.layers:
            raise ValueError("lora.layers is empty; use null for the layers of the located neurons")
        unknown = set(self.categories) - set(CATEGORIES)
        if unknown:
            raise ValueError(f"lora.categories has unknown names {sorted(unknown)}; valid: {CATEGORIES}")
        if self.apply not in APPLY_MODES:
            raise ValueError(f"lora.apply must be one of {APPLY_MODES}, got {self.apply!r}")


class MaskedLoRA:
    """Live masked adapters on a model; finish with :meth:`to_delta` / :meth:`finish`, or :meth:`discard`."""

    def __init__(
        self,
        peft_model,
        model: nn.Module,
        arch: ArchSpec,
        mask: NeuronMask,
        cfg: LoRAConfig,
        layers: dict[str, dict[int, list[int]]],
    ):
        self.peft_model = peft_model
        self.model = model
        self.arch = arch
        self.mask = mask
        self.cfg = cfg
        self.layers = layers  # category -> layer -> neuron indices (the adapters that exist)
        self._hooks: list = []
        self._install_masks()

    def _lora_layer(self, layer: int):
        return self.model.get_submodule(self.arch.mlp_out_name(layer))

    def _install_masks(self) -> None:
        for cat, per_layer in self.layers.items():
            for layer, idx in per_layer.items():
                lora_a = self._lora_layer(layer).lora_A[cat].weight  # [r, d_ff]
                if len(idx) == lora_a.shape[1]:
                    continue  # every neuron of the layer is trainable: nothing to mask
                col = torch.zeros(lora_a.shape[1], dtype=lora_a.dtype, device=lora_a.device)
                col[torch.tensor(idx, device=lora_a.device)] = 1.0
                with torch.no_grad():
                    lora_a.mul_(col)  # [r, d_ff] * [d_ff]: columns outside the neurons start at 0
                self._hooks.append(lora_a.register_hook(lambda g, col=col: g * col))

    def neurons(self) -> dict[int, list[int]]:
        """Layer -> the neurons whose value vectors the adapters can change."""
        return merge_layers(self.layers.values())

    def count(self) -> int:
        return sum(len(idx) for idx in self.neurons().values())

    def parameters(self) -> list[nn.Parameter]:
        out = []
        for cat, per_layer in self.layers.items():
            for layer in per_layer:
                mod = self._lora_layer(layer)
                out += [mod.lora_A[cat].weight, mod.lora_B[cat].weight]
        return out

    @torch.no_grad()
    def clamp_norms(self) -> None:
        """Scale B so that no neuron's update exceeds ``max_neuron_norm`` (after an optimiser step)."""
        if self.cfg.max_neuron_norm is None:
            return
        for cat, per_layer in self.layers.items():
            for layer in per_layer:
                mod = self._lora_layer(layer)
                delta = mod.get_delta_weight(cat)
                norms = delta.norm(dim=1 - neuron_dim(mod.base_layer))  # [d_ff]
                peak = norms.max() * self.cfg.merge_scale  # the bound holds for the merged update
                if peak > self.cfg.max_neuron_norm:
                    mod.lora_B[cat].weight.mul_(self.cfg.max_neuron_norm / peak)

    def live_delta(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Layer -> (neuron indices ``[n]``, their value-vector updates ``[n, d_model]``), with gradients, as merged."""
        out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        per_layer: dict[int, torch.Tensor] = {}
        for cat, layers in self.layers.items():
            for layer in layers:
                d = self._lora_layer(layer).get_delta_weight(cat)  # the weight's shape
                per_layer[layer] = per_layer[layer] + d if layer in per_layer else d
        for layer, idx in self.neurons().items():
            d = per_layer[layer] * self.cfg.merge_scale
            index = torch.tensor(idx, dtype=torch.long, device=d.device)
            cols = d.index_select(neuron_dim(self._lora_layer(layer).base_layer), index)
            out[layer] = (
                index,
                cols if neuron_dim(self._lora_layer(layer).base_layer) == 0 else cols.t(),
            )  # [n, d_model]
        return out

    @torch.no_grad()
    def delta(self) -> dict[int, torch.Tensor]:
        """The full update per layer (all adapters), scaled by ``merge_scale``."""
        out: dict[int, torch.Tensor] = {}
        for cat, per_layer in self.layers.items():
            for layer in per_layer:
                d = self._lora_layer(layer).get_delta_weight(cat)
                out[layer] = out[layer] + d if layer in out else d
        for layer, d in out.items():
            base = self._lora_layer(layer).base_layer
            dim = neuron_dim(base)
            d = d * self.cfg.merge_scale
            if self.cfg.max_neuron_norm is not None:
                norms = d.norm(dim=1 - dim, keepdim=True)  # per neuron
                d = d * (self.cfg.max_neuron_norm / norms.clamp(min=self.cfg.max_neuron_norm))
            out[layer] = d
        return out

    def _unload(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.peft_model.unload()

    @torch.no_grad()
    def to_delta(self) -> NeuronDelta:
        """The trained update as value-vector changes; removes the adapters."""
        deltas = self.delta()
        self._unload()
        dims = {layer: neuron_dim(self.model.get_submodule(self.arch.mlp_out_name(layer))) for layer in deltas}
        return NeuronDelta.from_weight_deltas(deltas, self.neurons(), dims)

    def finish(self) -> Restore | OnTop:
        """Remove the adapters and apply the update as ``cfg.apply`` says; the result undoes it."""
        return apply_delta(self.model, self.arch, self.to_delta(), self.cfg.apply)

    def discard(self) -> None:
        """Remove the adapters without touching the base weights."""
        self._unload()


def whole_layers(model: nn.Module, arch: ArchSpec, layers: list[int], record_id: str = "") -> NeuronMask:
    """A mask holding every neuron of ``layers`` (plain LoRA: one adapter per layer, nothing masked)."""
    n_layers = len(model.get_submodule(arch.layers))
    full = {
        l % n_layers: list(range(num_neurons(model.get_submodule(arch.mlp_out_name(l % n_layers))))) for l in layers
    }
    return NeuronMask(record_id, {CATEGORIES[0]: full})


def attach(model: nn.Module, arch: ArchSpec, mask: NeuronMask, cfg: LoRAConfig) -> MaskedLoRA | None:
    """Wrap ``model`` in place with masked adapters; ``None`` if no neuron is located."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    layers = {c: mask.category(c) for c in cfg.categories if mask.category(c)}
    if not layers:
        return None
    peft_model = None
    for cat, per_layer in layers.items():
        names = [arch.mlp_out_name(l) for l in per_layer]
        ranks = {
            re.escape(arch.mlp_out_name(l)): cfg.rank or cfg.rank_factor * len(idx) for l, idx in per_layer.items()
        }
        alphas = {k: cfg.alpha_factor * r for k, r in ranks.items()}
        first = next(iter(ranks.values()))
        pcfg = PeftLoraConfig(
            r=first,
            lora_alpha=cfg.alpha_factor * first,
            target_modules=names,
            rank_pattern=ranks,
            alpha_pattern=alphas,
            lora_dropout=0.0,
            bias="none",
            fan_in_fan_out=neuron_dim(model.get_submodule(names[0])) == 0,
        )
        if peft_model is None:
            peft_model = get_peft_model(model, pcfg, adapter_name=cat)
        else:
            peft_model.add_adapter(cat, pcfg)
    peft_model.base_model.set_adapter(list(layers))
    return MaskedLoRA(peft_model, model, arch, mask, cfg, layers)

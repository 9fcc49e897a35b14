"""Edits trained directly as value-vector updates (LAFN; constrained fine-tuning).

Where MEMLA trains LoRA factors whose product is confined to the located
neurons, these methods train the update itself: per layer a tensor
``values`` ``[n, d_model]`` for neuron indices ``idx`` ``[n]``, added to the
MLP output by a forward hook (``out + x[..., idx] @ values``, ``x`` the
output projection's input ``[..., d_ff]``). The base weights are never
written while training, so the same code runs on full-precision, int8 and
partitioned weights, and nothing outside ``idx`` can change.

- **LAFN** (our reading of the paper, see docs/methods.md): ``idx`` = the
  language-agnostic neurons located from paraphrases in every language.
- **FT-L** (constrained fine-tuning of one MLP output projection): ``idx`` =
  every neuron of the chosen layer(s), each entry of the update clamped to
  ``[-max_abs, max_abs]`` after every step (the norm ball of the original
  FT-L baseline).

:meth:`ValueUpdate.to_delta` returns the trained update as a
:class:`~mke_lightning.editing.neuron_delta.NeuronDelta`, applied like any other edit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from mke_lightning.editing.neuron_delta import NeuronDelta
from mke_lightning.localization.neurons import CATEGORIES, Category, NeuronMask
from mke_lightning.modeling.architectures import ArchSpec, neuron_dim, num_neurons, weight_shape


@dataclass
class ValueUpdateConfig:
    """Direct value-vector updates: which neurons, and the constraint on their change."""

    layers: list[int] | None = None
    """Update every neuron of these layers (FT-L); null: the located neurons of ``categories``."""
    categories: list[Category] = field(default_factory=lambda: ["independent"])
    """Located neuron categories updated when ``layers`` is null (LAFN's neurons are the independent set)."""
    max_neuron_norm: float | None = None
    """If set, each neuron's update is scaled back to this L2 norm after every step."""
    max_abs: float | None = None
    """If set, each entry of the update is clamped to [-max_abs, max_abs] after every step (FT-L)."""
    init_std: float = 0.0
    """Standard deviation of the update's random start (0: start at no change)."""

    def __post_init__(self) -> None:
        unknown = set(self.categories) - set(CATEGORIES)
        if unknown:
            raise ValueError(f"values.categories has unknown names {sorted(unknown)}; valid: {CATEGORIES}")
        if self.layers is not None and not self.layers:
            raise ValueError("values.layers is empty; use null for the located neurons")
        for name in ("max_neuron_norm", "max_abs"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"values.{name} must be > 0 or null, got {v}")

    def neurons(self, model: nn.Module, arch: ArchSpec, mask: NeuronMask | None) -> dict[int, list[int]]:
        """Layer -> neuron indices the update may change."""
        if self.layers is not None:
            n_layers = len(model.get_submodule(arch.layers))
            out = {}
            for layer in self.layers:
                layer = layer % n_layers
                out[layer] = list(range(num_neurons(model.get_submodule(arch.mlp_out_name(layer)))))
            return out
        assert mask is not None
        merged: dict[int, set[int]] = {}
        for cat in self.categories:
            for layer, idx in mask.category(cat).items():
                merged.setdefault(layer, set()).update(idx)
        return {l: sorted(v) for l, v in sorted(merged.items())}


class ValueUpdate:
    """Trainable value-vector updates hooked into a model; finish with :meth:`to_delta` or :meth:`discard`."""

    def __init__(self, model: nn.Module, arch: ArchSpec, neurons: dict[int, list[int]], cfg: ValueUpdateConfig) -> None:
        self.cfg = cfg
        self.index: dict[int, torch.Tensor] = {}
        self.values: dict[int, nn.Parameter] = {}
        self._handles = []
        for layer, idx in neurons.items():
            module = model.get_submodule(arch.mlp_out_name(layer))
            w = module.weight
            d_model = weight_shape(module)[1 - neuron_dim(module)]
            device = w.device if w.device.type != "meta" else torch.device("cpu")
            self.index[layer] = torch.tensor(idx, dtype=torch.long, device=device)  # [n]
            start = (
                torch.randn(len(idx), d_model, device=device) * cfg.init_std
                if cfg.init_std
                else torch.zeros(len(idx), d_model, device=device)
            )
            self.values[layer] = nn.Parameter(start)  # [n, d_model], fp32 whatever the weight dtype
            self._handles.append(module.register_forward_hook(self._hook(layer)))

    def _hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0]  # [..., d_ff]
            v = self.values[layer]
            picked = x.index_select(-1, self.index[layer].to(x.device))  # [..., n]
            return output + (picked.float() @ v.to(x.device)).to(output.dtype)  # [..., d_model]

        return hook

    def parameters(self) -> list[nn.Parameter]:
        return list(self.values.values())

    def count(self) -> int:
        return sum(int(i.numel()) for i in self.index.values())

    def live_delta(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Layer -> (neuron indices ``[n]``, their value-vector updates ``[n, d_model]``), with gradients."""
        return {l: (self.index[l], self.values[l]) for l in self.values}

    @torch.no_grad()
    def clamp_norms(self) -> None:
        """Project the update back into its constraint set (after an optimiser step)."""
        for v in self.values.values():
            if self.cfg.max_abs is not None:
                v.clamp_(-self.cfg.max_abs, self.cfg.max_abs)
            if self.cfg.max_neuron_norm is not None:
                norms = v.norm(dim=1, keepdim=True)  # [n, 1]
                v.mul_(self.cfg.max_neuron_norm / norms.clamp(min=self.cfg.max_neuron_norm))

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @torch.no_grad()
    def to_delta(self) -> NeuronDelta:
        """The trained update; removes the hooks."""
        self._remove_hooks()
        return NeuronDelta({l: (self.index[l], self.values[l].detach().clone()) for l in self.values})

    def discard(self) -> None:
        """Remove the hooks; the model is as before."""
        self._remove_hooks()


def attach_values(
    model: nn.Module, arch: ArchSpec, mask: NeuronMask | None, cfg: ValueUpdateConfig
) -> ValueUpdate | None:
    """Hook trainable updates onto the neurons ``cfg`` selects; ``None`` when there is none."""
    neurons = {l: idx for l, idx in cfg.neurons(model, arch, mask).items() if idx}
    if not neurons:
        return None
    return ValueUpdate(model, arch, neurons, cfg)

"""Where the MLP neurons live, per model family.

A *neuron* is one unit of an MLP's intermediate layer, i.e. one input feature
of the MLP's output projection. Its *value vector* is the matching column of
that projection's weight (``W_out[:, i]`` for ``nn.Linear``; a row for GPT-2's
``Conv1D``, whose weight is stored transposed).

Module names are data: a template table keyed by ``config.model_type``. Any
entry can be overridden (or a new family added) from YAML through
``model.architecture: {layers: ..., mlp_out: ...}``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """Module-name templates for one model family."""

    layers: str
    """Dotted path of the ``ModuleList`` of decoder blocks, e.g. ``model.layers``."""
    mlp_out: str
    """Path of the MLP output projection inside one block, e.g. ``mlp.down_proj``."""

    def mlp_out_name(self, layer: int) -> str:
        return f"{self.layers}.{layer}.{self.mlp_out}"


_LLAMA_LIKE = ArchSpec(layers="model.layers", mlp_out="mlp.down_proj")

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "olmo": _LLAMA_LIKE,
    "gpt2": ArchSpec(layers="transformer.h", mlp_out="mlp.c_proj"),
    "bloom": ArchSpec(layers="transformer.h", mlp_out="mlp.dense_4h_to_h"),
    "gpt_neox": ArchSpec(layers="gpt_neox.layers", mlp_out="mlp.dense_4h_to_h"),
}


class UnknownArchitectureError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def resolve_arch(model_type: str, override: dict | None = None) -> ArchSpec:
    """The spec for ``model_type``, with ``override`` fields taking precedence."""
    override = dict(override or {})
    unknown = set(override) - {"layers", "mlp_out"}
    if unknown:
        raise ValueError(f"model.architecture has unknown keys {sorted(unknown)}; valid keys: layers, mlp_out")
    base = ARCHITECTURES.get(model_type)
    if base is None and not {"layers", "mlp_out"} <= set(override):
        raise UnknownArchitectureError(
            f"model_type {model_type!r} is not in the architecture table "
            f"(known: {', '.join(sorted(ARCHITECTURES))}). Name its modules in the config, e.g.\n"
            "  model:\n    init_args:\n      model:\n        architecture:\n"
            "          layers: model.layers        # the ModuleList of decoder blocks\n"
            "          mlp_out: mlp.down_proj      # the MLP output projection in one block"
        )
    layers = override.get("layers", base.layers if base else None)
    mlp_out = override.get("mlp_out", base.mlp_out if base else None)
    return ArchSpec(layers=layers, mlp_out=mlp_out)


def num_layers(model: nn.Module, arch: ArchSpec) -> int:
    return len(model.get_submodule(arch.layers))


def mlp_out_modules(model: nn.Module, arch: ArchSpec) -> list[nn.Module]:
    """The output projection of every layer, in layer order."""
    return [model.get_submodule(arch.mlp_out_name(i)) for i in range(num_layers(model, arch))]


def neuron_dim(module: nn.Module) -> int:
    """Index of the weight dimension that enumerates neurons (value vectors).

    ``nn.Linear`` stores ``[d_model, d_ff]`` (neurons are columns: dim 1);
    transformers' ``Conv1D`` stores ``[d_ff, d_model]`` (neurons are rows: dim 0).
    An adapter wrapper (PEFT) is looked through to its base layer.
    """
    module = getattr(module, "base_layer", module)
    if isinstance(module, nn.Linear):
        return 1
    if hasattr(module, "nf") and hasattr(module, "weight"):  # transformers.pytorch_utils.Conv1D
        return 0
    raise TypeError(f"cannot tell the neuron dimension of {type(module).__name__}; expected nn.Linear or Conv1D")


def weight_shape(module: nn.Module) -> torch.Size:
    """The full shape of a module's weight, also where it is partitioned across ranks (DeepSpeed stage 3)."""
    w = getattr(module, "base_layer", module).weight
    return getattr(w, "ds_shape", w.shape)


def num_neurons(module: nn.Module) -> int:
    return weight_shape(module)[neuron_dim(module)]


def value_vectors(module: nn.Module) -> torch.Tensor:
    """The weight viewed as ``[d_ff, d_model]``: row i is neuron i's value vector."""
    w = module.weight
    return w.T if neuron_dim(module) == 1 else w

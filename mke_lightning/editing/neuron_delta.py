"""An edit as the change of a few value vectors, merged or applied on top.

A trained masked update changes only the value vectors of located neurons:
for layer ``l`` with neuron indices ``idx`` (``[n]``) the change is
``values`` (``[n, d_model]``, row ``j`` = the update of neuron ``idx[j]``'s
value vector). That is the whole edit, whatever produced it.

It reaches the model in one of two ways:

- **merged** (:meth:`NeuronDelta.merge_into`): the value vectors are written
  into the output projection's weight in place; the returned
  :class:`Restore` puts the original values back bit for bit;
- **on top** (:meth:`NeuronDelta.apply_on_top`): a forward hook on the output
  projection adds ``x[..., idx] @ values`` to its output (``x`` = the
  projection's input, i.e. the neuron activations). Nothing in the weights
  changes, so it works where they cannot be written: int8 weights, or weights
  partitioned across ranks. Calling the returned handle removes the hooks.

Both give the same function of the input (up to rounding of the weight dtype).
:meth:`save` / :meth:`load` keep a delta as safetensors (tensors ``<layer>.index``
and ``<layer>.values``, JSON metadata under the key ``mke``); :func:`read_delta`
returns the metadata too, and a file that holds no delta raises
:class:`NotADeltaError` naming it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import nn

from mke_lightning.modeling.architectures import ArchSpec, neuron_dim, num_layers, weight_shape

ApplyMode = Literal["auto", "merge", "on_top"]
APPLY_MODES: tuple[str, ...] = get_args(ApplyMode)
"""How an edit goes into the model: merged into the weights, on top of them (a hook), or ``auto``."""


@dataclass
class Restore:
    """Original values of the touched value vectors, to undo a merged edit exactly."""

    saved: list[tuple[nn.Parameter, int, torch.Tensor, torch.Tensor]]  # (weight, dim, index, original slice)

    @torch.no_grad()
    def __call__(self) -> None:
        for weight, dim, index, original in self.saved:
            weight.index_copy_(dim, index, original)


@dataclass
class OnTop:
    """Forward hooks that add an edit on top of unchanged weights; call to remove them."""

    handles: list = field(default_factory=list)

    def __call__(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


class NotADeltaError(ValueError):
    """A file that does not hold a :class:`NeuronDelta`; the message names the file."""


def can_write_in_place(module: nn.Module) -> bool:
    """Whether the projection's weight is a full floating-point tensor here (not int8, not a shard)."""
    w = getattr(module, "weight", None)
    if w is None or not torch.is_floating_point(w) or hasattr(w, "ds_id"):
        return False
    return w.dim() == 2 and w.numel() > 0


@dataclass
class NeuronDelta:
    """Per layer: located neuron indices ``[n]`` and their value-vector updates ``[n, d_model]``."""

    layers: dict[int, tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def from_weight_deltas(
        cls, deltas: dict[int, torch.Tensor], neurons: dict[int, list[int]], dims: dict[int, int]
    ) -> "NeuronDelta":
        """Keep only the located neurons' slices of full weight-shaped deltas (``dims``: neuron dim per layer)."""
        out = {}
        for layer, d in deltas.items():
            idx = torch.tensor(sorted(neurons[layer]), dtype=torch.long, device=d.device)
            values = d.index_select(dims[layer], idx)  # [n, d_model] (Conv1D) or [d_model, n] (Linear)
            out[layer] = (idx, values if dims[layer] == 0 else values.T.contiguous())
        return cls(out)

    def count(self) -> int:
        return sum(int(idx.numel()) for idx, _ in self.layers.values())

    def check_fits(self, model: nn.Module, arch: ArchSpec) -> None:
        """Raise ``ValueError`` unless every layer, neuron index and value width of the delta exists in ``model``."""
        n_layers = num_layers(model, arch)
        for layer, (idx, values) in self.layers.items():
            if not 0 <= layer < n_layers:
                raise ValueError(
                    f"layer {layer} is not in the model (it has {n_layers} layers); "
                    "was the delta made on another model?"
                )
            module = model.get_submodule(arch.mlp_out_name(layer))
            dim = neuron_dim(module)
            shape = weight_shape(module)  # [d_model, d_ff] (Linear) or [d_ff, d_model] (Conv1D)
            if idx.numel() and not (0 <= int(idx.min()) and int(idx.max()) < shape[dim]):
                raise ValueError(f"layer {layer}: neuron indices {int(idx.min())}..{int(idx.max())} do not fit "
                                 f"the model's {shape[dim]} neurons; was the delta made on another model?")
            if values.shape[1] != shape[1 - dim]:
                raise ValueError(f"layer {layer}: value vectors have width {values.shape[1]}, the model's are "
                                 f"{shape[1 - dim]} wide; was the delta made on another model?")

    @torch.no_grad()
    def merge_into(self, model: nn.Module, arch: ArchSpec) -> Restore:
        """Write the updates into the weights; the result undoes it exactly."""
        saved = []
        for layer, (idx, values) in self.layers.items():
            module = model.get_submodule(arch.mlp_out_name(layer))
            if not can_write_in_place(module):
                raise ValueError(
                    f"layer {layer}: the weight of {arch.mlp_out_name(layer)} cannot be written in place "
                    "(int8 or partitioned); apply the edit on top instead (lora.apply: on_top)"
                )
            w = module.weight
            dim = neuron_dim(module)
            index = idx.to(w.device)
            original = w.index_select(dim, index).clone()
            upd = values.to(device=w.device, dtype=torch.float32)
            upd = upd if dim == 0 else upd.T  # laid out like the weight's slice
            saved.append((w, dim, index, original))
            w.index_copy_(dim, index, (original.float() + upd).to(w.dtype))
        return Restore(saved)

    def apply_on_top(self, model: nn.Module, arch: ArchSpec) -> OnTop:
        """Add the updates through forward hooks on the output projections."""
        hooks = OnTop()
        for layer, (idx, values) in self.layers.items():
            module = model.get_submodule(arch.mlp_out_name(layer))
            hooks.handles.append(module.register_forward_hook(_adder(idx, values)))
        return hooks

    def save(self, path: str | Path, metadata: dict | None = None) -> None:
        """Write the delta with ``metadata`` (a JSON object) under the key ``mke``; atomic: the file is
        written beside ``path`` and renamed over it, so a kill mid-write leaves no half delta behind."""
        from safetensors.torch import save_file

        tensors = {}
        for layer, (idx, values) in self.layers.items():
            tensors[f"{layer}.index"] = idx.cpu().contiguous()  # [n]
            tensors[f"{layer}.values"] = values.detach().float().cpu().contiguous()  # [n, d_model]
        path = Path(path)
        part = path.with_name(f".{path.name}.{os.getpid()}.part")  # not *.safetensors: a folder's listing skips it
        save_file(tensors, str(part), metadata={"mke": json.dumps(metadata or {})})
        os.replace(part, path)

    @classmethod
    def load(cls, path: str | Path) -> "NeuronDelta":
        """The delta saved in ``path``; :class:`NotADeltaError` if the file holds none."""
        return cls(_layers(_open(path)[0], path))


def apply_delta(model: nn.Module, arch: ArchSpec, delta: NeuronDelta, mode: str = "auto") -> Restore | OnTop:
    """Apply an edit merged or on top (``auto``: merged where every touched weight can be written in place)."""
    if mode == "auto":
        writable = all(can_write_in_place(model.get_submodule(arch.mlp_out_name(l))) for l in delta.layers)
        mode = "merge" if writable else "on_top"
    if mode == "merge":
        return delta.merge_into(model, arch)
    return delta.apply_on_top(model, arch)


def read_delta(path: str | Path) -> tuple[NeuronDelta, dict]:
    """The delta saved in ``path`` and the metadata it was saved with (a JSON object)."""
    tensors, meta = _open(path)
    delta = NeuronDelta(_layers(tensors, path))
    if "mke" not in meta:
        raise NotADeltaError(f"{path}: no 'mke' metadata (not written by NeuronDelta.save)")
    try:
        info = json.loads(meta["mke"])
    except json.JSONDecodeError as err:
        raise NotADeltaError(f"{path}: the 'mke' metadata is not JSON ({err})") from None
    if not isinstance(info, dict):
        raise NotADeltaError(f"{path}: the 'mke' metadata is a JSON {type(info).__name__}, expected an object")
    return delta, info


def _open(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the string metadata of a safetensors file."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such delta file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except SafetensorError as err:
        raise NotADeltaError(f"{path}: not a safetensors file ({err})") from None


def _layers(tensors: dict[str, torch.Tensor], path: str | Path) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (index [n], values [n, d_model])}`` from the tensors ``<layer>.index`` and ``<layer>.values``."""
    parts: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        layer, _, part = key.partition(".")
        if not layer.isdigit() or part not in ("index", "values"):
            raise NotADeltaError(
                f"{path}: tensor {key!r} is not part of a delta (expected '<layer>.index' and '<layer>.values')"
            )
        parts.setdefault(int(layer), {})[part] = t
    if not parts:
        raise NotADeltaError(f"{path}: holds no tensors")
    out = {}
    for layer in sorted(parts):
        missing = {"index", "values"} - set(parts[layer])
        if missing:
            raise NotADeltaError(f"{path}: layer {layer} has no '{layer}.{missing.pop()}' tensor")
        idx, values = parts[layer]["index"], parts[layer]["values"]
        if idx.dim() != 1 or idx.is_floating_point() or idx.is_complex():
            raise NotADeltaError(f"{path}: '{layer}.index' is {idx.dtype} {tuple(idx.shape)}, expected integers [n]")
        if values.dim() != 2 or values.shape[0] != idx.numel() or not values.is_floating_point():
            raise NotADeltaError(f"{path}: '{layer}.values' is {values.dtype} {tuple(values.shape)}, "
                                 f"expected floats [{idx.numel()}, d_model]")
        out[layer] = (idx.long(), values)
    return out


def _adder(idx: torch.Tensor, values: torch.Tensor):
    cache: dict = {}

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]  # [..., d_ff] neuron activations
        key = (x.device, output.dtype)
        if key not in cache:
            cache[key] = (idx.to(x.device), values.to(device=x.device, dtype=output.dtype))
        i, v = cache[key]
        return output + x.index_select(-1, i).to(output.dtype) @ v  # [..., n] @ [n, d_model]

    return hook

"""Neurons busy on any text, and their removal from edit masks.

Attribution scores a neuron by activation times gradient, so a neuron that
fires strongly on *every* token scores high for every fact. Changing such a
neuron's value vector moves the residual stream at every position of every
text: the edit lands, and the model's perplexity elsewhere explodes. On
Gemma 3 270M 2-23 neurons per layer have a mean |activation| on unrelated
prompts above 10 x the layer's median (the busiest up to 113 x), and they
recur in most MEMLA and LAFN masks (docs/localization.md#busy-neurons;
bench/busy_neurons.py).

``background`` in the localisation settings measures each neuron's mean
absolute activation (the input of the MLP output projection) over unrelated
prompts, every token but the first, and drops from every mask the neurons
above ``max_ratio`` x their layer's median. It runs after the mask cache, so
cached masks stay valid and the filter can be switched on or retuned freely.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from mke_lightning.localization.neurons import NeuronMask
from mke_lightning.modeling.architectures import ArchSpec, mlp_out_modules
from mke_lightning.modeling.forward import encode_prompt


@dataclass
class BackgroundConfig:
    """Which neurons count as busy on unrelated text."""

    max_ratio: float = 10.0
    """Drop a neuron whose mean |activation| exceeds this multiple of its layer's median."""
    prompts: str | None = None
    """JSON file ``{lang: [prompt, ...]}`` of unrelated prompts (default: the packaged anchor set)."""
    languages: list[str] | None = None
    """Languages of ``prompts`` used (default: all in the file)."""

    def __post_init__(self) -> None:
        if not self.max_ratio > 1.0:
            raise ValueError(
                f"localization.background.max_ratio must be > 1 (a multiple of the median), got {self.max_ratio}"
            )


def unrelated_prompts(path: str | None) -> dict[str, list[str]]:
    """``{lang: [prompt, ...]}`` from a JSON file, or the packaged anchor prompts where ``path`` is None
    (also the KL anchors of :class:`~mke_lightning.editing.editor.KnowledgeEditor`)."""
    if path:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    return json.loads(resources.files("mke_lightning.data").joinpath("anchor_prompts.json").read_text(encoding="utf-8"))


def background_prompts(cfg: BackgroundConfig) -> list[str]:
    data = unrelated_prompts(cfg.prompts)
    source = Path(cfg.prompts) if cfg.prompts else "the packaged anchor prompts"
    langs = cfg.languages or list(data)
    missing = [l for l in langs if l not in data]
    if missing:
        raise ValueError(f"localization.background: {source} has no prompts for {missing}; it has {sorted(data)}")
    prompts = [p for l in langs for p in data[l]]
    if not prompts:
        raise ValueError(f"localization.background: no prompts in {source} for {langs}")
    return prompts


@torch.no_grad()
def neuron_activity(model, tokenizer, arch: ArchSpec, prompts: list[str]) -> list[torch.Tensor]:
    """Per layer, each neuron's mean |activation| over the prompts' tokens after the first: ``[d_ff]`` each."""
    modules = mlp_out_modules(model, arch)
    totals: list[torch.Tensor | None] = [None] * len(modules)
    count = 0

    def hook(layer):
        def grab(module, args):
            a = args[0][0, 1:].abs().float().sum(0)  # [d_ff]: one prompt, first token left out
            totals[layer] = a if totals[layer] is None else totals[layer] + a
        return grab

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(modules)]
    device = next(model.parameters()).device
    try:
        for text in prompts:  # one at a time: no padding to mask out
            ids = encode_prompt(tokenizer, text)
            if len(ids) < 2:
                continue
            model(input_ids=torch.tensor([ids], device=device), use_cache=False)
            count += len(ids) - 1
    finally:
        for h in handles:
            h.remove()
    if count == 0:
        raise ValueError("localization.background: every prompt is a single token; nothing to measure")
    return [t.cpu() / count for t in totals]


def usual_activity(model, tokenizer, arch: ArchSpec, cfg: BackgroundConfig | None) -> torch.Tensor:
    """Each neuron's mean |activation| on ``cfg``'s prompts (None: the packaged ones), floored at its
    layer's median: ``[L, d_ff]``.

    The divisor of ``localization.relative_to_background``: the floor keeps a
    neuron that is nearly silent on unrelated text from scoring without bound."""
    activity = torch.stack(
        neuron_activity(model, tokenizer, arch, background_prompts(cfg or BackgroundConfig()))
    )  # [L, F]
    return activity.clamp(min=activity.median(dim=1, keepdim=True).values)


def busy_neurons(activity: list[torch.Tensor], max_ratio: float) -> dict[int, set[int]]:
    """Per layer, the neurons whose activity exceeds ``max_ratio`` x the layer's median."""
    busy = {}
    for layer, a in enumerate(activity):
        idx = torch.nonzero(a > max_ratio * a.median()).flatten().tolist()
        if idx:
            busy[layer] = set(idx)
    return busy


def without(mask: NeuronMask, busy: dict[int, set[int]]) -> NeuronMask:
    """``mask`` less the busy neurons (every category and language set); the count dropped in metadata."""

    def strip(per_layer):
        return {l: [i for i in idx if i not in busy.get(l, ())] for l, idx in per_layer.items()}

    kept = NeuronMask(
        mask.record_id,
        layers={c: strip(d) for c, d in mask.layers.items()},
        languages={g: strip(d) for g, d in mask.languages.items()},
        metadata=dict(mask.metadata),
    )
    kept.metadata["background_dropped"] = mask.count() - kept.count()
    return kept


def drop_busy(
    model, tokenizer, arch: ArchSpec, masks: dict[str, NeuronMask], cfg: BackgroundConfig
) -> tuple[dict[str, NeuronMask], dict[int, set[int]]]:
    """Every mask less the neurons busy on ``cfg``'s prompts; also returns the busy set."""
    busy = busy_neurons(neuron_activity(model, tokenizer, arch, background_prompts(cfg)), cfg.max_ratio)
    return {rid: without(m, busy) for rid, m in masks.items()}, busy

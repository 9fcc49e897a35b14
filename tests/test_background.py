"""Neurons busy on unrelated text: found, dropped from masks after the cache, and why it matters."""

from __future__ import annotations

import json

import pytest
import torch

import mke_lightning.localization.stage as stage
from conftest import toy_record
from mke_lightning.data.records import record_from_dict
from mke_lightning.localization.attribution import AttributionConfig
from mke_lightning.localization.background import (
    BackgroundConfig,
    background_prompts,
    busy_neurons,
    neuron_activity,
    usual_activity,
    without,
)
from mke_lightning.localization.cache import MaskCache, model_fingerprint, settings_key
from mke_lightning.localization.locate import LocalizationConfig, locate
from mke_lightning.localization.neurons import NeuronMask
from mke_lightning.localization.stage import localize_records
from mke_lightning.modeling.loading import ModelConfig, load_causal_lm

BUSY_LAYER, BUSY_NEURON = 1, 5


def test_busy_neurons_are_those_above_the_ratio_of_their_layer_median():
    quiet = torch.ones(8)
    loud = torch.tensor([1.0, 1.0, 1.0, 30.0, 1.0, 9.0, 1.0, 11.0])
    assert busy_neurons([quiet, loud], 10.0) == {1: {3, 7}}
    assert busy_neurons([quiet, loud], 20.0) == {1: {3}}
    assert busy_neurons([quiet, loud], 40.0) == {}


def test_without_strips_every_category_and_language_set():
    mask = NeuronMask(
        "r", layers={"independent": {0: [1, 2], 1: [3]}, "specific": {1: [3, 4]}},
        languages={"en": {0: [2], 1: [3, 4]}, "fr": {1: [3]}}, metadata={"method": "x"},
    )
    kept = without(mask, {0: {2}, 1: {3}})
    assert kept.layers == {"independent": {0: [1]}, "specific": {1: [4]}}
    assert kept.languages == {"en": {1: [4]}, "fr": {}}
    assert kept.metadata == {"method": "x", "background_dropped": 3}
    assert mask.count() == 5  # the input is left as it was


def test_bad_background_settings_are_named(tmp_path):
    with pytest.raises(ValueError, match="max_ratio"):
        BackgroundConfig(max_ratio=1.0)
    prompts = tmp_path / "bg.json"
    prompts.write_text(json.dumps({"en": ["some words here"]}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"bg\.json has no prompts for \['de'\]"):
        background_prompts(BackgroundConfig(prompts=str(prompts), languages=["de"]))
    assert background_prompts(BackgroundConfig(prompts=str(prompts))) == ["some words here"]


def test_a_neuron_made_busy_is_found_and_dropped_after_the_cache(tmp_path, tiny_llama_dir, monkeypatch):
    model, tok, arch = load_causal_lm(ModelConfig(name_or_path=str(tiny_llama_dir)))
    with torch.no_grad():  # one neuron fires 50x harder on every token
        model.model.layers[BUSY_LAYER].mlp.up_proj.weight[BUSY_NEURON] *= 50
    records = [record_from_dict(toy_record(f"r{i}")) for i in range(2)]
    words = tmp_path / "unrelated.json"
    words.write_text(json.dumps({"en": ["the city of the tower is", "the river is in the city"]}), encoding="utf-8")
    plain = LocalizationConfig(attribution=AttributionConfig(steps=3), cross_languages=["en", "fr"], threshold=0.1)
    filtered = LocalizationConfig(
        **{**plain.__dict__, "background": BackgroundConfig(max_ratio=10.0, prompts=str(words))}
    )
    assert settings_key(plain, "en") == settings_key(filtered, "en")

    activity = neuron_activity(model, tok, arch, background_prompts(filtered.background))
    assert [a.shape for a in activity] == [torch.Size([64])] * 2
    assert busy_neurons(activity, 10.0) == {BUSY_LAYER: {BUSY_NEURON}}

    calls: list[str] = []

    def counted(*args, **kwargs):
        calls.append(args[3].id)
        return locate(*args, **kwargs)

    monkeypatch.setattr(stage, "locate", counted)
    cache = lambda cfg: MaskCache(tmp_path / "cache", model_fingerprint(model, tok, arch), cfg, "en")  # noqa: E731
    before = localize_records(model, tok, arch, records, "en", plain, cache=cache(plain)).masks
    assert calls == ["r0", "r1"]
    assert any(BUSY_NEURON in m.union().get(BUSY_LAYER, []) for m in before.values())  # attribution picks it

    after = localize_records(model, tok, arch, records, "en", filtered, cache=cache(filtered)).masks
    assert calls == ["r0", "r1"]  # read from the same cache entries, not localised again
    for rid, m in after.items():
        assert BUSY_NEURON not in m.union().get(BUSY_LAYER, [])
        assert m.layers == without(before[rid], {BUSY_LAYER: {BUSY_NEURON}}).layers
        assert m.metadata["background_dropped"] == before[rid].count() - m.count()


def test_relative_scores_rank_a_busy_neuron_down_and_have_their_own_cache_key(tmp_path, tiny_llama_dir):
    model, tok, arch = load_causal_lm(ModelConfig(name_or_path=str(tiny_llama_dir)))
    with torch.no_grad():
        model.model.layers[BUSY_LAYER].mlp.up_proj.weight[BUSY_NEURON] *= 50
    record = record_from_dict(toy_record("r0"))
    words = tmp_path / "unrelated.json"
    words.write_text(json.dumps({"en": ["the city of the tower is", "the river is in the city"]}), encoding="utf-8")
    raw = LocalizationConfig(attribution=AttributionConfig(method="activation"), threshold=None, top_k=5,
                             cross_languages=["en", "fr"], templates=["{prompt} ."])
    relative = LocalizationConfig(**{**raw.__dict__, "relative_to_background": True,
                                     "background": BackgroundConfig(prompts=str(words))})

    usual = usual_activity(model, tok, arch, relative.background)  # [L, F]
    activity = torch.stack(neuron_activity(model, tok, arch, background_prompts(relative.background)))
    assert usual.shape == (2, 64)
    assert torch.equal(usual, torch.maximum(activity, activity.median(dim=1, keepdim=True).values))

    assert BUSY_NEURON in locate(model, tok, arch, record, "en", raw).union().get(BUSY_LAYER, [])
    ranked = locate(model, tok, arch, record, "en", relative, usual)
    assert BUSY_NEURON not in ranked.union().get(BUSY_LAYER, [])
    assert ranked.same_neurons(locate(model, tok, arch, record, "en", relative))  # measured here when not given

    assert settings_key(raw, "en") != settings_key(relative, "en")  # the masks differ: so do the cache entries
    other = LocalizationConfig(**{**relative.__dict__, "background": BackgroundConfig(prompts=None)})
    assert settings_key(relative, "en") != settings_key(other, "en")  # the divisor's prompts are part of the key

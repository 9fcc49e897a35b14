"""Localisation on the embedded Gemma 3 270M: batched == loop, and the cache (CPU, about 30 s)."""

from __future__ import annotations

import pytest

from mke_lightning.data import demo_records
from mke_lightning.localization.attribution import AttributionConfig, attribute_rows, attribute_rows_loop
from mke_lightning.localization.cache import MaskCache, model_fingerprint
from mke_lightning.localization.locate import LocalizationConfig
from mke_lightning.localization.stage import localize_records
from mke_lightning.modeling.forward import encode_continuation, encode_prompt

pytestmark = pytest.mark.real_model


def test_real_model_batched_equals_loop_and_cache_round_trip(real_model, tmp_path):
    model, tok, arch = real_model
    rows = [
        encode_prompt(tok, "The Eiffel Tower is located in the city of"),
        encode_prompt(tok, "La tour Eiffel se trouve à"),
    ]
    targets = [encode_continuation(tok, " Paris")[0]] * 2
    cfg = AttributionConfig(steps=3)
    batched = attribute_rows(model, arch, rows, targets, cfg, pad_id=tok.pad_token_id)
    loop = attribute_rows_loop(model, arch, rows, targets, cfg)
    assert batched.shape == (2, 18, 2048)
    assert (batched - loop).abs().max() < 1e-4 * max(1.0, float(loop.abs().max()))

    record = demo_records()[0]
    loc = LocalizationConfig(attribution=AttributionConfig(steps=5), max_paraphrases=1)
    cache = MaskCache(tmp_path, model_fingerprint(model, tok, arch), loc, "en")
    first = localize_records(model, tok, arch, [record], "en", loc, cache=cache)
    again = localize_records(model, tok, arch, [record], "en", loc, cache=cache)
    assert first.computed == [record.id] and again.reused == [record.id]
    mask = again.masks[record.id]
    assert mask.same_neurons(first.masks[record.id]) and mask.count() > 0
    assert set(mask.languages) == {"en", "zh", "fr"}


def test_real_model_busy_neurons_are_few_and_editing_one_moves_unrelated_text(real_model):
    """The background filter's reason: on Gemma 3 270M under 1% of neurons are busy on unrelated
    prompts, and the same value-vector change moves unrelated text far more through a busy neuron."""
    import torch

    from mke_lightning.localization.background import (
        BackgroundConfig,
        background_prompts,
        busy_neurons,
        neuron_activity,
    )

    model, tok, arch = real_model
    activity = neuron_activity(model, tok, arch, background_prompts(BackgroundConfig()))
    busy = busy_neurons(activity, 10.0)
    total = sum(a.numel() for a in activity)
    assert 0 < sum(len(v) for v in busy.values()) < 0.01 * total

    layer = 16
    loud = int(activity[layer].argmax())
    quiet = int((activity[layer] - activity[layer].median()).abs().argmin())
    ids = torch.tensor([encode_prompt(tok, "Yesterday the children walked to the old library near the river.")])
    weight = model.get_submodule(arch.mlp_out_name(layer)).weight  # [d_model, d_ff]
    push = torch.randn(weight.shape[0], generator=torch.Generator().manual_seed(0))
    push = 0.5 * push / push.norm()
    with torch.no_grad():
        base = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
        moved = {}
        for neuron in (loud, quiet):
            weight[:, neuron] += push
            post = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
            weight[:, neuron] -= push
            moved[neuron] = float((base.exp() * (base - post)).sum(-1).mean())  # KL(before || after) per token
    assert loud in busy[layer] and quiet not in busy.get(layer, ())
    assert moved[loud] > 10 * moved[quiet], moved


def test_real_model_lafn_neurons_by_raw_activation_are_busy_and_relative_ones_are_not(real_model, mzsre_dir):
    """LAFN's reading on MzsRE record 0, 12 languages: the neurons active in every language by raw
    magnitude are mostly busy ones; scored against their usual activity, none is."""
    from mke_lightning.data import read_mzsre
    from mke_lightning.localization.background import (
        BackgroundConfig,
        background_prompts,
        busy_neurons,
        neuron_activity,
    )
    from mke_lightning.localization.locate import locate

    model, tok, arch = real_model
    langs = ["en", "cs", "de", "nl", "es", "fr", "pt", "ru", "th", "tr", "vi", "zh"]
    record = read_mzsre(mzsre_dir, langs)[0]
    busy = busy_neurons(neuron_activity(model, tok, arch, background_prompts(BackgroundConfig())), 10.0)
    raw = LocalizationConfig(attribution=AttributionConfig(method="activation"), threshold=None, top_k=200,
                             cross_languages=langs, templates=["Q: {prompt} A:"])
    relative = LocalizationConfig(**{**raw.__dict__, "top_k": 500, "relative_to_background": True})

    def split(cfg):
        neurons = [
            (l, i)
            for l, idx in locate(model, tok, arch, record, "en", cfg).category("independent").items()
            for i in idx
        ]
        return len(neurons), sum(i in busy.get(l, ()) for l, i in neurons)

    n_raw, busy_raw = split(raw)
    n_rel, busy_rel = split(relative)
    assert n_raw > 0 and busy_raw > n_raw / 2, (n_raw, busy_raw)
    assert n_rel > 0 and busy_rel == 0, (n_rel, busy_rel)

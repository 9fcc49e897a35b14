"""Attribution, selection, categories and the mask file, on tiny random models (CPU, seconds)."""

from __future__ import annotations

import pytest
import torch

from mke_lightning.localization.attribution import (
    AttributionConfig,
    attribute_rows,
    attribute_rows_loop,
    last_position_patch,
    rows_per_pass,
)
from mke_lightning.localization.locate import LocalizationConfig, locate, select_neurons
from mke_lightning.localization.neurons import NeuronMask
from mke_lightning.modeling.architectures import mlp_out_modules
from mke_lightning.modeling.loading import ModelConfig, load_causal_lm

LOC = LocalizationConfig(attribution=AttributionConfig(steps=5), cross_languages=["en", "fr"], threshold=0.3)


def _tiny(folder):
    return load_causal_lm(ModelConfig(name_or_path=str(folder)))


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- batched scores == a plain per-step loop -----------------------------------

def _reference_ig(model, arch, row, target, steps, per_layer: bool) -> torch.Tensor:
    """Written independently of the library: one forward/backward per (layer,) step, zero baseline."""
    modules = mlp_out_modules(model, arch)
    ids = torch.tensor([row])
    clean = {}
    with torch.no_grad(), last_position_patch(modules, lambda l, x: clean.__setitem__(l, x.detach().clone())):
        model(input_ids=ids)
    n_layers = len(modules)
    scores = torch.zeros(n_layers, clean[0].shape[-1])
    for layer_set in ([[l] for l in range(n_layers)] if per_layer else [list(range(n_layers))]):
        for k in range(1, steps + 1):
            leaves = {l: (clean[l] * k / steps).requires_grad_(True) for l in layer_set}
            with last_position_patch(modules, lambda l, x, leaves=leaves: leaves.get(l)):
                prob = torch.softmax(model(input_ids=ids).logits[0, -1], -1)[target]
            grads = torch.autograd.grad(prob, [leaves[l] for l in layer_set])
            for l, g in zip(layer_set, grads):
                scores[l] += (clean[l] * g / steps)[0]
    return scores


def _rows(tok):
    rows = [tok("the capital of france is")["input_ids"], tok("the tower is located in the city of")["input_ids"]]
    return rows, [tok.convert_tokens_to_ids("paris"), tok.convert_tokens_to_ids("rome")]


@pytest.mark.parametrize("prefix_cache", [True, False], ids=["cached", "full"])
@pytest.mark.parametrize("ig_path", ["all_layers", "per_layer"])
def test_batched_ig_equals_independent_per_step_loop(tiny_llama_dir, ig_path, prefix_cache):
    model, tok, arch = _tiny(tiny_llama_dir)
    rows, targets = _rows(tok)
    cfg = AttributionConfig(steps=7, ig_path=ig_path, batch_rows=5, prefix_cache=prefix_cache)  # passes cut across rows
    batched = attribute_rows(model, arch, rows, targets, cfg, pad_id=tok.pad_token_id)
    for i, (row, tgt) in enumerate(zip(rows, targets)):
        ref = _reference_ig(model, arch, row, tgt, 7, per_layer=ig_path == "per_layer")
        assert (batched[i] - ref).abs().max() < 1e-4


METHODS = {
    "ig_zero_all_layers": AttributionConfig(steps=6),
    "ig_zero_per_layer": AttributionConfig(steps=4, ig_path="per_layer"),
    "ig_eos_all_layers": AttributionConfig(steps=6, baseline="eos"),
    "ig_eos_per_layer": AttributionConfig(steps=3, ig_path="per_layer", baseline="eos"),
    "grad_x_act": AttributionConfig(method="grad_x_act"),
    "activation": AttributionConfig(method="activation"),
}


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gpt2_dir"])
@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_batched_equals_the_library_loop(request, fixture, name):
    model, tok, arch = _tiny(request.getfixturevalue(fixture))
    rows, targets = _rows(tok)
    cfg = METHODS[name]
    cfg = AttributionConfig(**{**cfg.__dict__, "memory_budget_mb": 0.05})  # a budget of a few rows per pass
    batched = attribute_rows(model, arch, rows, targets, cfg, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    loop = attribute_rows_loop(model, arch, rows, targets, cfg, eos_id=tok.eos_token_id)
    assert batched.shape == loop.shape == (2, 2, 64 if fixture == "tiny_llama_dir" else 128)
    assert (batched - loop).abs().max() < 1e-4
    assert loop.abs().max() > 1e-6  # not trivially zero


def test_memory_budget_sets_rows_per_pass(tiny_llama_dir):
    model, tok, arch = _tiny(tiny_llama_dir)
    small = rows_per_pass(model, arch, 8, AttributionConfig(memory_budget_mb=1e-4))
    big = rows_per_pass(model, arch, 8, AttributionConfig(memory_budget_mb=64))
    assert small == 1 and big > 100
    assert rows_per_pass(model, arch, 8, AttributionConfig(memory_budget_mb=1e-4, batch_rows=7)) == 7
    # Without the prefix cache every position is kept: a row costs more.
    assert rows_per_pass(model, arch, 8, AttributionConfig(memory_budget_mb=1, prefix_cache=False)) < rows_per_pass(
        model, arch, 8, AttributionConfig(memory_budget_mb=1)
    )
    rows, targets = _rows(tok)
    one = attribute_rows(model, arch, rows, targets, AttributionConfig(steps=4, memory_budget_mb=1e-4), pad_id=0)
    many = attribute_rows(model, arch, rows, targets, AttributionConfig(steps=4, memory_budget_mb=64), pad_id=0)
    assert (one - many).abs().max() < 1e-5


def test_grad_x_act_equals_one_step_ig(tiny_llama_dir):
    model, tok, arch = _tiny(tiny_llama_dir)
    rows = [tok("the capital of france is")["input_ids"]]
    tgt = [tok.convert_tokens_to_ids("paris")]
    gxa = attribute_rows(model, arch, rows, tgt, AttributionConfig(method="grad_x_act"), pad_id=0)
    ig1 = attribute_rows(model, arch, rows, tgt, AttributionConfig(steps=1), pad_id=0)
    assert (gxa - ig1).abs().max() < 1e-6


def test_eos_baseline_is_the_mean_of_single_token_ablations(tiny_llama_dir):
    from mke_lightning.localization.attribution import _capture, _eos_baseline
    from mke_lightning.modeling.forward import left_pad

    model, tok, arch = _tiny(tiny_llama_dir)
    modules = mlp_out_modules(model, arch)
    row = tok("the capital of france is")["input_ids"]
    b = _eos_baseline(model, modules, [row], tok.eos_token_id, 0, True, 64, "cpu")[0]  # [L, F]
    manual = []
    for j in range(1, len(row)):  # position 0 (BOS) is kept
        v = list(row)
        v[j] = tok.eos_token_id
        manual.append(_capture(model, modules, *left_pad([v], 0), 64)[0])
    assert (b - torch.stack(manual).mean(0)).abs().max() < 1e-6


# -- a planted neuron -------------------------------------------------------------

PLANT_LAYER = 1


def _plant(model, arch, tok, row, target) -> int:
    """Build one neuron to carry the answer; returns its index.

    The neuron of layer 1 whose (positive) activation at the last position
    drops most when a prompt token is replaced by EOS (so that the EOS
    baseline sees it too) gets a large activation (its up-projection row scaled) and a value
    vector pointing at the answer's unembedding, strong enough to dominate
    the residual stream."""
    from mke_lightning.localization.attribution import _capture, _eos_baseline
    from mke_lightning.modeling.forward import left_pad

    modules = mlp_out_modules(model, arch)
    a = _capture(model, modules, *left_pad([row], 0), 8)[0, PLANT_LAYER]  # [F]
    b = _eos_baseline(model, modules, [row], tok.eos_token_id, 0, True, 8, "cpu")[0, PLANT_LAYER]  # [F]
    neuron = int(torch.where(a > 0, a - b, -torch.inf).argmax())
    mlp = model.get_submodule(f"{arch.layers}.{PLANT_LAYER}.mlp")
    head = model.get_output_embeddings().weight  # [V, d_model]
    with torch.no_grad():
        mlp.up_proj.weight[neuron] *= 60.0  # the activation is linear in this row
        head[target] *= 10.0  # random init logits are tiny; give the answer a readable one
        direction = head[target] / head[target].norm()
        modules[PLANT_LAYER].weight[:, neuron] = 50.0 / (60.0 * a[neuron]) * direction
        assert torch.softmax(model(input_ids=torch.tensor([row])).logits[0, -1], -1)[target] > 0.5
    return neuron


@pytest.mark.parametrize("name", list(METHODS))
def test_planted_neuron_is_found_by_every_method(tiny_llama_dir, name):
    model, tok, arch = _tiny(tiny_llama_dir)
    row = tok("the capital of france is")["input_ids"]
    target = tok.convert_tokens_to_ids("berlin")
    neuron = _plant(model, arch, tok, row, target)
    scores = attribute_rows(
        model, arch, [row], [target], METHODS[name], pad_id=tok.pad_token_id, eos_id=tok.eos_token_id
    )
    assert divmod(int(scores[0].flatten().argmax()), scores.shape[2]) == (PLANT_LAYER, neuron)
    kept = select_neurons(scores, LocalizationConfig(threshold=None, top_k=1))
    assert kept.sum() == 1 and kept[0, PLANT_LAYER, neuron]


# -- selection and categories ------------------------------------------------------

def test_selection_criteria_combine():
    scores = torch.tensor([[[5.0, 1.0, 0.0, 2.0], [4.0, -3.0, 0.5, 1.6]]])  # [P=1, L=2, F=4]
    assert select_neurons(scores, LocalizationConfig(threshold=0.3)).tolist() == [
        [[True, False, False, True], [True, False, False, True]]
    ]
    assert select_neurons(scores, LocalizationConfig(threshold=None, top_k=2)).tolist() == [
        [[True, False, False, False], [True, False, False, False]]
    ]
    both = select_neurons(scores, LocalizationConfig(threshold=0.3, top_k=3))  # 5, 4, 2 by rank; all above 1.5
    assert both.sum() == 3 and both[0, 0, 3]
    only_last = select_neurons(scores, LocalizationConfig(threshold=0.5, layers=[-1]))  # max is then 4: keep > 2
    assert only_last.tolist() == [[[False] * 4, [True, False, False, False]]]
    with pytest.raises(ValueError, match="layers holds 5"):
        select_neurons(scores, LocalizationConfig(layers=[5]))
    assert not select_neurons(torch.zeros(1, 2, 4), LocalizationConfig()).any()  # nothing scores: nothing kept


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"threshold": None, "top_k": None}, "selection criterion"),
        ({"threshold": 1.5}, "threshold"),
        ({"top_k": 0}, "top_k"),
        ({"language_fraction": 0.0}, "language_fraction"),
        ({"layers": []}, "layers"),
        ({"cross_languages": []}, "cross_languages"),
    ],
)
def test_bad_localization_settings_say_which(bad, match):
    with pytest.raises(ValueError, match=match):
        LocalizationConfig(**bad)


@pytest.mark.parametrize(
    "bad, match",
    [({"method": "saliency"}, "method"), ({"memory_budget_mb": 0}, "memory_budget"), ({"batch_rows": 0}, "batch_rows")],
)
def test_bad_attribution_settings_say_which(bad, match):
    with pytest.raises(ValueError, match=match):
        AttributionConfig(**bad)


def _set(per_layer) -> set[tuple[int, int]]:
    return {(l, i) for l, idx in per_layer.items() for i in idx}


@pytest.mark.parametrize("fraction", [1.0, 0.6])
def test_categories_follow_the_definition(tiny_llama_dir, toy_records, fraction):
    model, tok, arch = _tiny(tiny_llama_dir)
    attr = AttributionConfig(steps=3)
    langs = ["en", "fr", "de"]
    cfg = LocalizationConfig(attribution=attr, cross_languages=langs, threshold=0.2, language_fraction=fraction)
    mask = locate(model, tok, arch, toy_records[0], "fr", cfg)
    # Each language's set equals the set a single-language run finds.
    for lang in langs:
        alone = locate(
            model,
            tok,
            arch,
            toy_records[0],
            lang,
            LocalizationConfig(attribution=attr, cross_languages=[lang], threshold=0.2),
        )
        assert _set(mask.languages[lang]) == _set(alone.category("independent"))
    sets = [_set(mask.languages[l]) for l in langs]
    need = 3 if fraction == 1.0 else 2  # ceil(0.6 x 3)
    votes = {n: sum(n in s for s in sets) for n in set().union(*sets)}
    indep = {n for n, v in votes.items() if v >= need}
    assert _set(mask.category("independent")) == indep
    assert _set(mask.category("specific")) == sets[1] - indep  # the edit language is fr


def test_max_per_layer_caps_each_category(tiny_llama_dir, toy_records):
    model, tok, arch = _tiny(tiny_llama_dir)
    cfg = LocalizationConfig(
        attribution=AttributionConfig(steps=3), cross_languages=["en"], threshold=0.05, max_per_layer=2
    )
    mask = locate(model, tok, arch, toy_records[0], "fr", cfg)
    assert all(len(idx) <= 2 for cat in ("independent", "specific") for idx in mask.category(cat).values())
    assert mask.count() > 0


def test_activation_method_needs_no_answer(tiny_llama_dir, toy_records):
    model, tok, arch = _tiny(tiny_llama_dir)
    cfg = LocalizationConfig(
        attribution=AttributionConfig(method="activation"),
        cross_languages=["en", "fr", "de"],
        threshold=None,
        top_k=20,
        prompt_fraction=1.0,
    )
    mask = locate(model, tok, arch, toy_records[0], "en", cfg)
    for lang in ["en", "fr", "de"]:
        assert 0 < len(_set(mask.languages[lang])) <= 20


def test_localisation_leaves_model_unchanged_and_is_deterministic(tiny_llama_dir, toy_records):
    model, tok, arch = _tiny(tiny_llama_dir)
    before = _snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    m1 = locate(model, tok, arch, toy_records[0], "en", LOC)
    m2 = locate(model, tok, arch, toy_records[0], "en", LOC)
    assert m1.same_neurons(m2)
    for name, w in model.state_dict().items():
        assert torch.equal(before[name], w)
    assert all(p.grad is None for p in model.parameters())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}


def test_missing_cross_language_is_a_record_error(tiny_llama_dir, toy_records):
    from mke_lightning.data.records import RecordError

    model, tok, arch = _tiny(tiny_llama_dir)
    with pytest.raises(RecordError, match="'zh'.*cross_languages") as err:
        locate(model, tok, arch, toy_records[0], "en", LocalizationConfig(cross_languages=["en", "zh"]))
    assert err.value.record_id == "toy-1"


# -- the mask file -------------------------------------------------------------------

def test_mask_file_round_trip(tmp_path):
    mask = NeuronMask(
        "r/1 ü",
        {"independent": {3: [9, 1], 0: [4]}, "specific": {}},
        languages={"en": {0: [4], 3: [1, 9]}, "zh": {}},
        metadata={"method": "integrated_gradients", "model_fingerprint": "abc"},
    )
    path = mask.save(tmp_path / "m.safetensors")
    back = NeuronMask.load(path)
    assert back.same_neurons(mask)
    assert back.category("independent") == {0: [4], 3: [1, 9]}
    assert back.metadata == mask.metadata
    assert NeuronMask.from_dict(mask.to_dict()).same_neurons(mask)
    assert not list(tmp_path.glob(".*tmp"))  # written through a temporary name


def test_unreadable_mask_file_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable neuron-mask file"):
        NeuronMask.load(tmp_path / "junk.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="without neuron-mask metadata"):
        NeuronMask.load(tmp_path / "other.safetensors")


def test_the_cache_key_of_existing_settings_does_not_move_when_settings_are_added():
    """MzsRE MEMLA's earlier settings (configs/mzsre/memla.yaml with 10 evenly spaced points) keep the digest
    their masks were cached under before ``background`` and ``relative_to_background`` existed; a setting at a
    new value does move it."""
    from dataclasses import replace

    from mke_lightning.localization.cache import _digest, settings_key

    memla = LocalizationConfig(
        attribution=AttributionConfig(method="integrated_gradients", ig_path="all_layers", steps=10, baseline="zero"),
        threshold=0.3, cross_languages=["en", "zh", "fr"], language_fraction=1.0,
    )
    assert _digest(settings_key(memla, "en")).startswith("443790154b733476")
    assert _digest(settings_key(replace(memla, relative_to_background=True), "en")) != _digest(
        settings_key(memla, "en")
    )

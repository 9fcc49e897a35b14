"""Preservation for the trained methods on a tiny model: the loss term is what it says, it keeps ordinary
text's outputs closer, earlier edits' keys are paid for, and the bound holds."""

from __future__ import annotations

import pytest
import torch

from conftest import out_projection_changes, two_fact_records
from mke_lightning.editing.editor import EditLossConfig, KnowledgeEditor
from mke_lightning.editing.key_statistics import KeyStatistics
from mke_lightning.editing.masked_lora import LoRAConfig
from mke_lightning.editing.preserve import PreservationConfig
from mke_lightning.editing.value_update import ValueUpdateConfig
from mke_lightning.localization.neurons import NeuronMask
from mke_lightning.modeling.forward import left_pad
from mke_lightning.modeling.loading import ModelConfig, load_causal_lm

MASK = NeuronMask("a", {"independent": {0: [1, 5, 8, 12], 1: [9, 20]}, "specific": {1: [3, 7, 30]}})
TEXT = ["the sky is blue", "honey is made by bees", "le ciel est bleu", "der himmel ist blau", "what colour is the sky"]


def _editor(model_dir, preserve=None, **kw) -> KnowledgeEditor:
    ed = KnowledgeEditor(loss=EditLossConfig(max_steps=100, stop_prob=0.9), preserve=preserve,
                         optimizer=lambda p: torch.optim.Adam(p, lr=0.2), lora=LoRAConfig(merge_scale=1.0), **kw)
    ed.causal_lm, ed.tokenizer, ed.arch = load_causal_lm(ModelConfig(name_or_path=str(model_dir)))
    return ed


def _keys(ed) -> dict[int, torch.Tensor]:
    """Every token's key (the output projection's input) over TEXT, per layer: ``[N, d_ff]``."""
    ids, mask, pos = left_pad([ed.tokenizer(t)["input_ids"] for t in TEXT], ed.tokenizer.pad_token_id)
    got: dict[int, torch.Tensor] = {}
    hooks = [ed.causal_lm.get_submodule(ed.arch.mlp_out_name(l)).register_forward_pre_hook(
        lambda m, a, l=l: got.__setitem__(l, a[0][mask.bool()].detach().float())) for l in range(2)]
    with torch.no_grad():
        ed.causal_lm(input_ids=ids, attention_mask=mask, position_ids=pos)
    for h in hooks:
        h.remove()
    return got


def _with_stats(ed) -> dict[int, torch.Tensor]:
    keys = _keys(ed)
    moments = {l: k.T @ k / k.shape[0] for l, k in keys.items()}  # [d_ff, d_ff]
    if ed.preservation is not None:
        ed.preservation._stats = KeyStatistics(moments, {l: k.shape[0] for l, k in keys.items()})
    return keys


def _ordinary_change(ed, before, keys) -> float:
    """Mean squared output change of the edited projections on TEXT's keys, relative to the outputs."""
    num = den = 0.0
    for layer, d in out_projection_changes(ed, before).items():  # d: [d_model, d_ff]
        w = before[ed.arch.mlp_out_name(layer) + ".weight"]
        num += float((keys[layer] @ d.T).pow(2).sum())
        den += float((keys[layer] @ w.T).pow(2).sum())
    return num / den


def test_the_penalty_is_the_relative_output_change_on_the_statistics(tiny_llama_dir):
    ed = _editor(tiny_llama_dir, PreservationConfig(penalty=2.0))
    keys = _with_stats(ed)
    from mke_lightning.editing.masked_lora import attach

    handle = attach(ed.causal_lm, ed.arch, MASK, ed.lora_config)
    for p in handle.parameters():
        torch.nn.init.normal_(p, std=0.1)
    try:
        got = float(ed.preservation.penalty(ed, handle))
        want = 0.0
        for layer, (idx, values) in handle.live_delta().items():
            k = keys[layer]
            w = ed.causal_lm.get_submodule(ed.arch.mlp_out_name(layer)).base_layer.weight
            want += 2.0 * float((k[:, idx] @ values).pow(2).mean(0).sum() / (k @ w.T).pow(2).mean(0).sum())
        assert got == pytest.approx(want, rel=1e-4)
        # the live delta is the delta that would be merged
        full = handle.delta()
        for layer, (idx, values) in handle.live_delta().items():
            assert torch.allclose(full[layer][:, idx].T, values.detach(), atol=1e-6)
    finally:
        handle.discard()


@pytest.mark.parametrize("method", ["memla", "lafn"])
def test_the_penalty_keeps_ordinary_text_closer(tiny_llama_dir, method):
    a = two_fact_records()[0]
    changes = {}
    for name, pres in (("off", None), ("on", PreservationConfig(penalty=50.0))):
        ed = _editor(tiny_llama_dir, pres, method=method, values=ValueUpdateConfig())
        keys = _with_stats(ed)
        before = {k: v.clone() for k, v in ed.causal_lm.state_dict().items()}
        assert ed.edit(a, MASK).failed is None
        changes[name] = _ordinary_change(ed, before, keys)
    assert changes["on"] < 0.5 * changes["off"], changes


def test_sequential_edits_pay_for_moving_an_earlier_edits_keys(tiny_llama_dir):
    a, b = two_fact_records()
    moved = {}
    for name, pres in (("off", None), ("on", PreservationConfig(earlier_weight=100.0))):
        ed = _editor(tiny_llama_dir, pres, protocol="sequential")
        ed.edit(a, MASK)
        if pres is not None:
            assert ed.preservation.earlier, "the first edit's keys are kept"
        ids, mask, pos = left_pad([ed._rows([a])[0][0]], ed.tokenizer.pad_token_id)
        caught = {}
        hooks = [ed.causal_lm.get_submodule(ed.arch.mlp_out_name(l)).register_forward_pre_hook(
            lambda m, x, l=l, caught=caught: caught.__setitem__(l, x[0][0, -1].detach().float())) for l in range(2)]
        with torch.no_grad():
            ed.causal_lm(input_ids=ids, attention_mask=mask, position_ids=pos)
        for h in hooks:
            h.remove()
        before = {k: v.clone() for k, v in ed.causal_lm.state_dict().items()}
        ed.edit(b, NeuronMask("b", MASK.layers))
        moved[name] = sum(float((d @ caught[l]).norm()) for l, d in out_projection_changes(ed, before).items())
    assert moved["on"] < 0.5 * moved["off"], moved


def test_the_bound_caps_each_neurons_change_relative_to_its_value_vector(tiny_llama_dir):
    a = two_fact_records()[0]
    ed = _editor(tiny_llama_dir, PreservationConfig(max_norm_ratio=0.05))
    before = {k: v.clone() for k, v in ed.causal_lm.state_dict().items()}
    ed.edit(a, MASK)
    changes = out_projection_changes(ed, before)
    assert changes
    for layer, d in changes.items():
        w = before[ed.arch.mlp_out_name(layer) + ".weight"]  # [d_model, d_ff]
        ratio = d.norm(dim=0) / w.norm(dim=0)
        assert float(ratio.max()) <= 0.05 + 1e-5


def test_the_kept_keys_survive_a_checkpoint(tiny_llama_dir):
    a = two_fact_records()[0]
    ed = _editor(tiny_llama_dir, PreservationConfig(earlier_weight=1.0), protocol="sequential")
    ed.edit(a, MASK)
    state = ed.preservation.state()
    other = _editor(tiny_llama_dir, PreservationConfig(earlier_weight=1.0), protocol="sequential")
    other.preservation.load_state(state)
    assert set(other.preservation.earlier) == set(ed.preservation.earlier)
    for layer, keys in ed.preservation.earlier.items():
        assert torch.allclose(torch.stack(keys), torch.stack(other.preservation.earlier[layer]), rtol=1e-3, atol=1e-4)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="penalty"):
        PreservationConfig(penalty=-1)
    with pytest.raises(ValueError, match="max_norm_ratio"):
        PreservationConfig(max_norm_ratio=0)
    assert KnowledgeEditor(preserve=PreservationConfig()).preservation is None  # nothing active: the authors' reading

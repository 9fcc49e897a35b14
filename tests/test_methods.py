"""Every method in the one editor, on a tiny model: what each may change, and that it edits."""

from __future__ import annotations

import pytest
import torch

from conftest import out_projection_changes, toy_record
from mke_lightning.data.records import record_from_dict
from mke_lightning.editing.editor import EditLossConfig, KnowledgeEditor
from mke_lightning.editing.masked_lora import LoRAConfig
from mke_lightning.editing.value_update import ValueUpdateConfig
from mke_lightning.evaluation.evaluator import EditEvaluator, build_items
from mke_lightning.localization.neurons import NeuronMask
from mke_lightning.modeling.loading import ModelConfig, load_causal_lm

MASK = NeuronMask("toy-1", {"independent": {0: [1, 5], 1: [9]}, "specific": {1: [3, 7]}})


def _editor(model_dir, **kw) -> KnowledgeEditor:
    lr = kw.pop("lr", 0.05)
    ed = KnowledgeEditor(loss=kw.pop("loss", EditLossConfig(max_steps=80)), optimizer=lambda p: torch.optim.Adam(p, lr=lr), **kw)
    ed.causal_lm, ed.tokenizer, ed.arch = load_causal_lm(ModelConfig(name_or_path=str(model_dir)))
    return ed


def _neurons(change: torch.Tensor) -> set[int]:
    return set(torch.nonzero(change.abs().sum(0)).flatten().tolist())


def _reliability(ed, record, lang: str) -> float:
    ev = EditEvaluator(ed.tokenizer)
    items = [i for i in build_items(record, [lang]) if i.measure == "reliability"]
    return ev.score(ed.causal_lm, items, ev.references(ed.causal_lm, items))[0]["token_acc"]


@pytest.fixture()
def record():
    return record_from_dict(toy_record("toy-1"))


@pytest.mark.parametrize("categories", [["independent"], ["specific"]])
def test_memla_ablation_changes_only_the_kept_category(tiny_llama_dir, record, categories):
    ed = _editor(tiny_llama_dir, lora=LoRAConfig(merge_scale=1.0, categories=categories))
    assert ed.method_name == "memla-no_" + ({"independent", "specific"} - set(categories)).pop()
    before = {k: v.clone() for k, v in ed.causal_lm.state_dict().items()}
    out = ed.edit(record, MASK)
    allowed = MASK.category(categories[0])
    changed = {l: _neurons(c) for l, c in out_projection_changes(ed, before).items()}
    assert changed and all(l in allowed and n <= set(allowed[l]) for l, n in changed.items())
    assert out.neurons == sum(len(v) for v in allowed.values())
    ed.restore()
    assert not out_projection_changes(ed, before)


def test_plain_lora_adapts_whole_layers_and_nothing_else(tiny_llama_dir, record):
    ed = _editor(tiny_llama_dir, method="lora", lora=LoRAConfig(merge_scale=1.0, rank=4, layers=[1]))
    assert not ed.needs_masks
    before = {k: v.clone() for k, v in ed.causal_lm.state_dict().items()}
    out = ed.edit(record, None)
    changes = out_projection_changes(ed, before)
    assert set(changes) == {1}
    assert len(_neurons(changes[1])) > 16  # not confined to a few neurons: every value vector may move
    assert torch.linalg.matrix_rank(changes[1]) <= 4  # ... within a rank-4 update
    assert out.neurons == 64 and _reliability(ed, record, "en") >= 0.9
    ed.restore()
    assert not out_projection_changes(ed, before)


def test_plain_lora_on_the_located_layers_by_default(tiny_llama_dir, record):
    ed = _editor(tiny_llama_dir, method="lora", lora=LoRAConfig(merge_scale=1.0, rank=2))
    assert ed.needs_masks
    before = {k: v.clone() for k, v in ed.causal_lm.state_dict().items()}
    ed.edit(record, NeuronMask("toy-1", {"independent": {1: [3]}, "specific": {}}))
    assert set(out_projection_changes(ed, before)) == {1}


def test_ft_l_changes_one_projection_within_its_norm_ball(tiny_llama_dir, record):
    ed = _editor(tiny_llama_dir, method="ft_l", values=ValueUpdateConfig(layers=[-1], max_abs=0.05), lr=0.01)
    assert not ed.needs_masks and ed.method_name == "ft_l"
    before = {k: v.clone() for k, v in ed.causal_lm.state_dict().items()}
    out = ed.edit(record, None)
    changes = out_projection_changes(ed, before)
    assert set(changes) == {1} and out.neurons == 64
    assert changes[1].abs().max() <= 0.05 + 1e-6  # the clamp holds at every entry
    assert changes[1].abs().max() > 0.04  # and the edit used the room it had
    ed.restore()
    assert not out_projection_changes(ed, before)


def test_lafn_updates_only_the_independent_neurons_and_trains_every_language(tiny_llama_dir, record):
    langs = ["en", "fr", "de"]
    mask = NeuronMask("toy-1", {"independent": {0: list(range(0, 64, 4)), 1: list(range(1, 64, 4))}, "specific": {1: [2, 6]}})
    ed = _editor(tiny_llama_dir, method="lafn", train_languages=langs)
    before = {k: v.clone() for k, v in ed.causal_lm.state_dict().items()}
    pre = {l: _reliability(ed, record, l) for l in langs}
    out = ed.edit(record, mask)
    changed = {l: _neurons(c) for l, c in out_projection_changes(ed, before).items()}
    allowed = mask.category("independent")
    assert changed and all(n <= set(allowed[l]) for l, n in changed.items())
    assert out.neurons == 32 and out.failed is None
    post = {l: _reliability(ed, record, l) for l in langs}
    assert min(pre.values()) < 0.5 and all(v >= 0.9 for v in post.values()), (pre, post)


def test_training_languages_each_add_a_unit_with_their_own_target(tiny_llama_dir, record):
    ed = _editor(tiny_llama_dir, train_languages=["en", "de", "es"])  # the record has no es: skipped
    prompts, targets, units = ed._rows([record])
    assert len(units) == 2 and [k for k, _, _ in units] == [0, 0]
    assert all(j is not None for _, _, j in units)  # each with its old-target row
    assert len(prompts) == 4


def test_rows_grouped_by_length_train_the_same_edit(tiny_llama_dir, record):
    langs = ["en", "fr", "de"]
    mask = NeuronMask("toy-1", {"independent": {0: list(range(0, 64, 4)), 1: list(range(1, 64, 4))}})
    deltas, steps = [], []
    for groups in (1, 3):
        loss = EditLossConfig(max_steps=12, kl_weight=0.5, anchor_languages=["en", "de", "zh"], length_groups=groups)
        ed = _editor(tiny_llama_dir, method="lafn", train_languages=langs, loss=loss)
        before = {k: v.clone() for k, v in ed.causal_lm.state_dict().items()}
        steps.append(ed.edit(record, mask).steps)
        deltas.append(out_projection_changes(ed, before))
    assert steps[0] == steps[1] and deltas[0].keys() == deltas[1].keys() and deltas[0]
    for layer, d in deltas[0].items():
        assert torch.allclose(d, deltas[1][layer], atol=1e-5), (layer, (d - deltas[1][layer]).abs().max())


def test_value_updates_work_on_top_of_unwritable_weights(tiny_llama_dir, record):
    ed = _editor(tiny_llama_dir, method="lafn", lora=LoRAConfig(apply="on_top"))
    before = {k: v.clone() for k, v in ed.causal_lm.state_dict().items()}
    ed.edit(record, MASK)
    assert not out_projection_changes(ed, before)  # hooks, not weights
    assert _reliability(ed, record, "en") >= 0.9
    ed.restore()
    assert _reliability(ed, record, "en") < 0.5


def test_method_settings_are_checked():
    with pytest.raises(ValueError, match="'nonesuch' is not a registered method; known: .*memla"):
        KnowledgeEditor(method="nonesuch")
    with pytest.raises(ValueError, match="values.layers"):
        KnowledgeEditor(method="ft_l")
    with pytest.raises(ValueError, match="leave values.layers null"):
        KnowledgeEditor(method="lafn", values=ValueUpdateConfig(layers=[3]))
    with pytest.raises(ValueError, match="train_languages is empty"):
        KnowledgeEditor(train_languages=[])
    with pytest.raises(ValueError, match="unknown names"):
        ValueUpdateConfig(categories=["shared"])


def test_run_info_names_method_protocol_and_settings():
    info = KnowledgeEditor(method="lafn", protocol="sequential", train_languages=["en", "de"]).run_info()
    assert info["method"] == "lafn" and info["protocol"] == "sequential"
    assert info["train_languages"] == ["en", "de"]
    assert info["settings"]["values"]["categories"] == ["independent"] and info["settings"]["lora"] is None

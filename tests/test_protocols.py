"""Editing protocols on a tiny model: sequential edits accumulate inside their masks, batch edits share one
united mask."""

from __future__ import annotations

import torch

from conftest import out_projection_changes, two_fact_records
from mke_lightning.editing.editor import EditLossConfig, KnowledgeEditor
from mke_lightning.editing.masked_lora import LoRAConfig
from mke_lightning.evaluation.evaluator import EditEvaluator, build_items
from mke_lightning.localization.neurons import NeuronMask, unite_masks
from mke_lightning.modeling.loading import ModelConfig, load_causal_lm

MASKS = {
    "a": NeuronMask("a", {"independent": {0: [1, 5]}, "specific": {1: [3, 7]}}),
    "b": NeuronMask("b", {"independent": {0: [5, 9]}, "specific": {1: [20]}}),
}


def _editor(model_dir, protocol: str) -> KnowledgeEditor:
    ed = KnowledgeEditor(protocol=protocol, lora=LoRAConfig(merge_scale=1.0), loss=EditLossConfig(max_steps=60),
                         optimizer=lambda p: torch.optim.Adam(p, lr=0.05))
    ed.causal_lm, ed.tokenizer, ed.arch = load_causal_lm(ModelConfig(name_or_path=str(model_dir)))
    return ed


def _changed_value_vectors(ed, before) -> dict[int, set[int]]:
    """Per layer, the neurons whose value vector differs from ``before``; fails if anything else changed."""
    return {l: set(torch.nonzero(d.any(0)).flatten().tolist())  # Linear: neurons are columns
            for l, d in out_projection_changes(ed, before).items()}


def _reliability(ed, record) -> float:
    ev = EditEvaluator(ed.tokenizer)
    items = [i for i in build_items(record, ["en"]) if i.measure == "reliability"]
    refs = ev.references(ed.causal_lm, items)
    return [r for r in ev.score(ed.causal_lm, items, refs) if r["measure"] == "reliability"][0]["token_acc"]


def test_sequential_edits_stay_inside_the_union_of_masks_and_the_first_is_retained(tiny_llama_dir):
    ed = _editor(tiny_llama_dir, "sequential")
    a, b = two_fact_records()
    before = {k: v.clone() for k, v in ed.causal_lm.state_dict().items()}
    assert ed.edit(a, MASKS["a"]).failed is None
    rel_a = _reliability(ed, a)
    assert ed.edit(b, MASKS["b"]).failed is None
    ed.restore()  # the sequential protocol keeps its edits: nothing to undo
    assert [ids for ids, _ in ed.applied] == [["a"], ["b"]]
    changed = _changed_value_vectors(ed, before)
    union = unite_masks([MASKS["a"], MASKS["b"]]).union()
    assert changed and all(changed[l] <= set(union[l]) for l in changed)
    assert rel_a >= 0.9 and _reliability(ed, a) >= 0.9  # edit a holds after edit b


def test_batch_edit_uses_the_united_mask_and_is_undone(tiny_llama_dir):
    ed = _editor(tiny_llama_dir, "batch")
    a, b = two_fact_records()
    before = {k: v.clone() for k, v in ed.causal_lm.state_dict().items()}
    outs = ed.edit_many([a, b], [MASKS["a"], MASKS["b"]])
    assert [o.record_id for o in outs] == ["a", "b"] and all(o.failed is None for o in outs)
    assert outs[0].steps == outs[1].steps  # optimised together
    changed = _changed_value_vectors(ed, before)
    union = unite_masks([MASKS["a"], MASKS["b"]]).union()
    assert set(changed) == set(union) and all(changed[l] <= set(union[l]) for l in changed)
    assert changed[0] - set(MASKS["a"].union()[0])  # b's neurons moved too: one update over the united mask
    ed.restore()
    assert not _changed_value_vectors(ed, before)


def test_sequential_checkpoint_holds_the_deltas_and_reloads_the_edited_model(tiny_llama_dir):
    ed = _editor(tiny_llama_dir, "sequential")
    a, b = two_fact_records()
    ed.edit(a, MASKS["a"])
    ed.edit(b, MASKS["b"])
    ids = torch.tensor([[1, 4, 5, 6, 7]])
    with torch.no_grad():
        edited = ed.causal_lm(input_ids=ids).logits
    ckpt: dict = {}
    ed.on_save_checkpoint(ckpt)
    assert "state_dict" not in ckpt and len(ckpt["mke_applied"]) == 2  # deltas, not the model

    fresh = _editor(tiny_llama_dir, "sequential")
    fresh.on_load_checkpoint(ckpt)
    with torch.no_grad():
        assert (fresh.causal_lm(input_ids=ids).logits - edited).abs().max() < 1e-5
    assert [ids for ids, _ in fresh.applied] == [["a"], ["b"]]

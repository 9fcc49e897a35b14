"""The embedded Gemma 3 270M: one MLaKE edit, then its multi-hop question evaluated."""

from __future__ import annotations

import pytest
import torch

from mke_lightning.data import read_mlake
from mke_lightning.editing.editor import KnowledgeEditor
from mke_lightning.editing.masked_lora import LoRAConfig
from mke_lightning.evaluation.evaluator import EditEvaluator, build_items
from mke_lightning.localization.attribution import AttributionConfig
from mke_lightning.localization.locate import LocalizationConfig, locate

pytestmark = pytest.mark.real_model


def test_one_mlake_edit_then_its_multi_hop_question(real_model, shared_data):
    model, tok, arch = real_model
    record = read_mlake(shared_data / "mlake", ["en", "zh", "fr"])[
        0
    ]  # (zh, fr: localisation's cross languages) Carl Sagan's employer: Cornell University -> BBC
    facts = record.facts("en")
    assert facts.multi_hop, "MLaKE record 0 has a linked multi-hop question"
    hop = facts.multi_hop[0]
    assert "UK" in hop.answers  # the aliases travel with the question

    # the demo's settings: the authors' merge scale of 0.5 undoes most edits of this model (docs/benchmarks.md)
    ed = KnowledgeEditor(lora=LoRAConfig(merge_scale=1.0), optimizer=lambda params: torch.optim.Adam(params, lr=5e-3))
    ed.causal_lm, ed.tokenizer, ed.arch = model, tok, arch
    mask = locate(model, tok, arch, record, "en", LocalizationConfig(attribution=AttributionConfig(steps=10)))
    ev = EditEvaluator(tok)
    items = build_items(record, ["en"], ("reliability", "locality", "multi_hop"))
    refs = ev.references(model, items)
    pre = ev.score(model, items, refs)
    ed.edit(record, mask)
    try:
        post = ev.score(model, items, refs)
    finally:
        ed.restore()

    def by(rows, m):
        return [r for r in rows if r["measure"] == m]

    assert len(by(post, "multi_hop")) == len(facts.multi_hop)
    for row in by(pre, "multi_hop") + by(post, "multi_hop"):
        assert row["gen_em"] in (0.0, 1.0) and row["prob"] is None and 0.0 <= row["f1"] <= 1.0
    assert by(pre, "reliability")[0]["token_acc"] < 0.5
    assert by(post, "reliability")[0]["token_acc"] >= 0.9
    assert by(post, "reliability")[0]["prob"] == 1.0  # P(BBC) now beats P(Cornell University)
    assert by(pre, "reliability")[0]["prob"] == 0.0
    # the unedited model again: multi-hop scores as before the edit (restored bit for bit)
    again = ev.score(model, items, refs)
    assert by(again, "multi_hop") == by(pre, "multi_hop")

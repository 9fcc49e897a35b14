"""The embedded Gemma 3 270M on MzsRE: neighbour prompts exist, and a model changed and
restored bit for bit agrees with its own pre-edit continuations."""

from __future__ import annotations

import pytest
import torch

from mke_lightning.data import read_mzsre
from mke_lightning.evaluation.evaluator import EditEvaluator, build_items
from mke_lightning.evaluation.neighbourhood import NeighbourhoodConfig, NeighbourPool

pytestmark = pytest.mark.real_model

LANGS = ["en", "de", "zh"]


def test_mzsre_neighbours_and_a_restored_model_scores_one(real_model, mzsre_dir):
    model, tok, arch = real_model
    records = read_mzsre(mzsre_dir, LANGS)[:60]  # the pool of a 60-record run
    pool = NeighbourPool(records, LANGS, "en", NeighbourhoodConfig(per_edit=3))
    edits = records[:2]
    prompts = [pool.prompts(r) for r in edits]
    for record, got in zip(edits, prompts):
        assert len(got["en"]) == 3 and len(got["zh"]) == 3  # subjects sit in every en and zh prompt
        subject = record.facts("en").subject
        assert all(subject not in text and text != record.facts("en").prompt for text, _, _ in got["en"])
        assert all(rid != record.id for g in got.values() for _, rid, _ in g)
    assert prompts == [pool.prompts(r) for r in edits]  # deterministic

    ev = EditEvaluator(tok)
    items = [it for r, p in zip(edits, prompts) for it in build_items(r, LANGS, ("locality", "neighborhood"), p)]
    refs = ev.references(model, items)
    # change the model (noise on one MLP output projection), then restore it exactly
    weight = model.get_submodule(arch.mlp_out_name(6)).weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight += 0.5 * saved.std() * torch.randn(saved.shape, generator=torch.Generator().manual_seed(0)).to(saved)
    try:
        changed = ev.score(model, items, refs)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert any(r["measure"] == "neighborhood" for r in changed)
    rows = ev.score(model, items, refs)
    nbr = [r for r in rows if r["measure"] == "neighborhood"]
    assert len(nbr) == sum(len(g) for p in prompts for g in p.values())
    for row in nbr:
        assert (row["token_acc"], row["em"], row["f1"], row["gen_em"]) == (1.0, 1.0, 1.0, 1.0)
        assert row["prob"] is None

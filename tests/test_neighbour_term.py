"""The neighbours' KL term: the edit prompt about other subjects, never a subject of the run."""

from __future__ import annotations

import torch

from conftest import toy_record
from mke_lightning.data.records import record_from_dict
from mke_lightning.editing.editor import KnowledgeEditor
from mke_lightning.editing.objective import EditLossConfig, NeighbourKL, kl_from
from mke_lightning.modeling.loading import ModelConfig, load_causal_lm


def _record(rid="n1", subject="tower"):
    r = toy_record(rid)
    for lang, block in r["languages"].items():
        block["subject"] = {"fr": "tour", "de": "turm"}.get(lang, subject)
    return record_from_dict(r)


def test_prompts_replace_the_subject_deterministically_and_skip_excluded_names(tmp_path):
    names = tmp_path / "names.json"
    names.write_text('{"en": ["paris", "rome", "berlin", "madrid", "honey"], "fr": ["paris"]}', encoding="utf-8")
    cfg = EditLossConfig(neighbour_weight=1.0, neighbour_subjects=str(names), neighbours=3)
    nb = NeighbourKL(cfg, ["en", "fr"])
    rec = _record()
    first = nb.prompts(rec)
    assert first == nb.prompts(rec)  # the same every time
    en = [p for p in first if p.startswith("the ")]
    assert len(en) == 3 and all("tower" not in p for p in en)
    assert all(p.replace(n, "tower") == rec.facts("en").prompt for p in en for n in ["paris", "rome", "berlin", "madrid", "honey"] if n in p)
    assert first[-1] == "la paris est de la ville"  # French: its one name
    nb.exclude(["Rome", "paris"])
    assert not any("rome" in p or "paris" in p for p in nb.prompts(rec))
    assert NeighbourKL(cfg, ["en"]).prompts(_record(subject="absent")) == []  # subject not in the prompt


def test_the_term_starts_at_zero_and_an_edit_with_it_runs(tiny_llama_dir):
    from mke_lightning.editing.value_update import ValueUpdateConfig

    ed = KnowledgeEditor(loss=EditLossConfig(max_steps=3, neighbour_weight=1.0, neighbours=2), method="ft_l",
                         values=ValueUpdateConfig(layers=[1]), optimizer=lambda p: torch.optim.Adam(p, lr=0.05))
    ed.causal_lm, ed.tokenizer, ed.arch = load_causal_lm(ModelConfig(name_or_path=str(tiny_llama_dir)))
    rec = _record(subject="tower")
    ed.neighbours.names = {"en": ["paris", "rome", "berlin"]}
    ids, logp = ed.neighbours.rows(ed.causal_lm, ed.tokenizer, [rec], ed.device)
    assert len(ids) == 2 and logp.shape[0] == 2
    from mke_lightning.modeling.forward import kept_logits, pack

    now = kept_logits(ed.causal_lm, pack(ids, [[0]] * 2, ed.tokenizer.pad_token_id))[:, -1]
    assert float(kl_from(logp, now)) < 1e-6
    out = ed.edit(rec, None)
    assert out.failed is None and out.steps >= 1

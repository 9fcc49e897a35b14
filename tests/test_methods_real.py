"""Each baseline and LAFN edits a real MzsRE fact on the embedded Gemma 3 270M, and is undone exactly."""

from __future__ import annotations

import pytest
import torch

from mke_lightning.data import read_mzsre
from mke_lightning.editing.editor import EditLossConfig, KnowledgeEditor
from mke_lightning.editing.masked_lora import LoRAConfig
from mke_lightning.editing.value_update import ValueUpdateConfig
from mke_lightning.evaluation.evaluator import EditEvaluator, build_items
from mke_lightning.localization.attribution import AttributionConfig
from mke_lightning.localization.locate import LocalizationConfig, locate

pytestmark = pytest.mark.real_model

LANGS = ["en", "de", "fr"]


def _reliability(model, tok, record, langs) -> dict[str, float]:
    ev = EditEvaluator(tok)
    items = [i for i in build_items(record, langs) if i.measure == "reliability"]
    return {r["eval_lang"]: r["token_acc"] for r in ev.score(model, items, ev.references(model, items))}


@pytest.mark.parametrize("method", ["lora", "ft_l", "lafn"])
def test_method_edits_a_real_fact_and_restores(real_model, mzsre_dir, method):
    model, tok, arch = real_model
    record = read_mzsre(mzsre_dir, LANGS)[0]
    settings = {
        "lora": dict(method="lora", lora=LoRAConfig(rank=8, layers=[12, 15, 17], merge_scale=1.0), lr=5e-3),
        "ft_l": dict(method="ft_l", values=ValueUpdateConfig(layers=[12], max_abs=5e-3), lr=1e-3),
        "lafn": dict(method="lafn", train_languages=LANGS, lr=1e-2, loss=EditLossConfig(true_weight=0.0, max_steps=30)),
    }[method]
    lr = settings.pop("lr")
    ed = KnowledgeEditor(optimizer=lambda p: torch.optim.Adam(p, lr=lr), **settings)
    ed.causal_lm, ed.tokenizer, ed.arch = model, tok, arch
    mask = None
    if method == "lafn":
        cfg = LocalizationConfig(attribution=AttributionConfig(method="activation"), threshold=None, top_k=200,
                                 cross_languages=LANGS, templates=["Q: {prompt} A:"])
        mask = locate(model, tok, arch, record, "en", cfg)
        assert mask.category("independent")
    langs = LANGS if method == "lafn" else ["en"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pre = _reliability(model, tok, record, langs)
    out = ed.edit(record, mask)
    post = _reliability(model, tok, record, langs)
    ed.restore()

    assert out.failed is None
    assert pre["en"] < 0.5
    assert all(v >= 0.9 for v in post.values()), (pre, post, out)
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), f"{k} not restored"

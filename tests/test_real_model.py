"""The embedded Gemma 3 270M, end to end (CPU; the first use converts the GGUF, about a minute)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO
from mke_lightning.data import read_mzsre
from mke_lightning.editing.editor import KnowledgeEditor
from mke_lightning.evaluation.evaluator import EditEvaluator, build_items
from mke_lightning.localization.locate import LocalizationConfig, locate
from mke_lightning.modeling.forward import encode_prompt, greedy_generate

pytestmark = pytest.mark.real_model


def test_default_model_loads_and_knows_paris(real_model):
    model, tok, arch = real_model
    assert model.config.model_type == "gemma3_text"
    assert arch.mlp_out_name(17) == "model.layers.17.mlp.down_proj"
    assert sum(p.numel() for p in model.parameters()) > 250_000_000
    gen = greedy_generate(model, tok, [encode_prompt(tok, "The Eiffel Tower is located in the city of")], 3)[0]
    assert tok.decode(gen).strip().startswith("Paris")


def test_one_mzsre_edit_moves_reliability(real_model, mzsre_dir):
    model, tok, arch = real_model
    record = read_mzsre(mzsre_dir, ["en", "zh", "fr"])[0]
    ed = KnowledgeEditor()
    ed.causal_lm, ed.tokenizer, ed.arch = model, tok, arch
    before = {k: v.clone() for k, v in model.state_dict().items()}

    mask = locate(model, tok, arch, record, "en", LocalizationConfig())
    assert mask.count() > 0
    ev = EditEvaluator(tok)
    items = build_items(record, ["en"])
    refs = ev.references(model, items)
    pre = {r["measure"]: r for r in ev.score(model, items, refs)}
    ed.edit(record, mask)
    post = {r["measure"]: r for r in ev.score(model, items, refs)}
    ed.restore()

    assert pre["reliability"]["token_acc"] < 0.5
    assert post["reliability"]["token_acc"] >= 0.9
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), f"{k} not restored"


def test_demo_fit_in_process_with_a_small_limit(tmp_path, capsys, real_model):
    from mke_lightning.cli import cli_main

    cli = cli_main([
        "fit", "--config", str(REPO / "configs" / "demo.yaml"),
        "--data.limit", "1",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
    ])
    out = capsys.readouterr().out
    assert "edited model, edit language en, 1 edits" in out
    results = json.loads(next((tmp_path / "runs").rglob("results.json")).read_text())
    langs = results["results"]["language"]
    assert set(langs) == {"en", "de", "fr", "es", "ru", "zh"}
    assert langs["en"]["reliability"]["token_acc"] >= 0.9
    assert cli.model.outcomes[0].neurons > 0

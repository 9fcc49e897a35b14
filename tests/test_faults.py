"""Faults: an edit whose loss turns NaN is rolled back, recorded with its reason, and the run goes on."""

from __future__ import annotations

import json

import lightning as L
import torch
from torch import nn

from mke_lightning.editor import KnowledgeEditor
from mke_lightning.model_loading import ModelConfig, load_causal_lm
from mke_lightning.neurons import NeuronMask
from mke_lightning.records import record_from_dict

from conftest import toy_record


def test_nan_loss_rolls_the_edit_back_and_leaves_the_weights(tiny_llama_dir):
    model, tok, arch = load_causal_lm(ModelConfig(name_or_path=str(tiny_llama_dir)))
    ed = KnowledgeEditor()
    ed.causal_lm, ed.tokenizer, ed.arch = model, tok, arch
    record = record_from_dict(toy_record(), source="toy.jsonl", index=0)
    mask = NeuronMask(record.id, {"independent": {0: [1, 5]}, "specific": {1: [3]}})
    before = {k: v.clone() for k, v in model.state_dict().items()}

    ed.loss_config.new_weight = float("nan")
    out = ed.edit(record, mask)
    assert out.failed is not None and "nan" in out.failed and out.steps == 1
    assert ed._restore is None  # nothing to undo
    assert all(type(model.get_submodule(arch.mlp_out_name(l))) is nn.Linear for l in (0, 1))  # adapters gone
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k

    ed.loss_config.new_weight = 2.5  # the next edit runs normally
    ok = ed.edit(record, mask)
    assert ok.failed is None and ok.steps >= 1
    ed.restore()


class PlantNaN(L.Callback):
    """Makes the loss of one chosen batch NaN."""

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pl_module.loss_config.new_weight = float("nan") if batch_idx == self.batch else 2.5


def test_a_planted_nan_edit_is_reported_and_the_run_goes_on(tmp_path, tiny_llama_dir):
    from mke_lightning.cli import MKECLI
    from mke_lightning.data import EditDataModule

    from test_cli import _toy_args

    cli = MKECLI(KnowledgeEditor, EditDataModule, args=_toy_args(tmp_path, tiny_llama_dir)[1:], run=False)
    cli.trainer.callbacks.insert(0, PlantNaN(batch=0))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)

    lines = [json.loads(l) for l in next((tmp_path / "runs").rglob("edit_log.jsonl")).read_text().splitlines()]
    assert [l["record_id"] for l in lines] == ["t1", "t2"]
    assert "nan" in lines[0]["failed"] and lines[1]["failed"] is None
    assert next((tmp_path / "runs").rglob("results.json")).exists()

"""Faults: an edit whose loss turns NaN is rolled back, recorded with its reason, and the run goes on."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch import nn

from conftest import REPO, toy_record, write_jsonl
from mke_lightning.data.records import record_from_dict
from mke_lightning.editing.editor import KnowledgeEditor
from mke_lightning.localization.neurons import NeuronMask
from mke_lightning.modeling.loading import ModelConfig, load_causal_lm


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


class KillAfter(L.Callback):
    """SIGKILLs its own process at the end of edit batch ``edits`` (1-based): no clean-up runs."""

    def __init__(self, edits: int) -> None:
        self.edits = edits

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx + 1 == self.edits:
            os.kill(os.getpid(), signal.SIGKILL)


def _run_mke(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, MKE_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    mke = Path(sys.executable).parent / "mke"
    return subprocess.run([str(mke), *args], capture_output=True, text=True, timeout=900, env=env)


@pytest.mark.parametrize("protocol", ["single", "sequential"])
def test_a_killed_run_resumes_and_applies_every_edit_exactly_once(protocol, tmp_path, tiny_llama_dir):
    from test_cli import _toy_args

    data = write_jsonl(tmp_path / "six.jsonl", [toy_record(f"r{i}") for i in range(6)])
    args = _toy_args(tmp_path, tiny_llama_dir) + ["--data.path", str(data), "--model.loss.max_steps", "3",
                                                 "--model.protocol", protocol]
    cfg = yaml.safe_load((tmp_path / "toy.yaml").read_text())
    cfg["trainer"]["enable_checkpointing"] = True
    cfg["trainer"]["callbacks"].append(
        {"class_path": "mke_lightning.callbacks.EditCheckpoint", "init_args": {"every_n_edits": 2}}
    )
    (tmp_path / "resumable.yaml").write_text(yaml.safe_dump(cfg))
    cfg["trainer"]["callbacks"].append({"class_path": "test_faults.KillAfter", "init_args": {"edits": 3}})
    (tmp_path / "killed.yaml").write_text(yaml.safe_dump(cfg))

    killed_args = ["fit"] + [a if a != str(tmp_path / "toy.yaml") else str(tmp_path / "killed.yaml") for a in args[1:]]
    killed = _run_mke(killed_args, tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    ckpt = tmp_path / "runs" / "demo" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    assert [d["record_id"] for d in saved["mke_edit_log"]] == ["r0", "r1"]  # edit 3 was done but not yet saved
    assert not list((tmp_path / "runs").rglob("edit_log*.jsonl"))  # the killed run never finished

    resumed_args = ["fit"] + [
        a if a != str(tmp_path / "toy.yaml") else str(tmp_path / "resumable.yaml") for a in args[1:]
    ]
    resumed = _run_mke(resumed_args + ["--ckpt_path", "last"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    trained = re.findall(r"edit (\d+) \((r\d)\)", resumed.stdout + resumed.stderr)
    assert trained == [
        ("3", "r2"),
        ("4", "r3"),
        ("5", "r4"),
        ("6", "r5"),
    ]  # it went on after the checkpoint, not from r0
    logs = list((tmp_path / "runs").rglob("edit_log.jsonl"))
    assert len(logs) == 1
    ids = [json.loads(l)["record_id"] for l in logs[0].read_text().splitlines()]
    assert sorted(ids) == [f"r{i}" for i in range(6)]  # every edit once: r0, r1 from before, r2..r5 after
    assert ids[:2] == ["r0", "r1"]
    final = torch.load(ckpt, weights_only=False)
    assert [d["record_id"] for d in final["mke_edit_log"]] == [f"r{i}" for i in range(6)]
    if protocol == "sequential":
        # the weights: the kept edits equal those of a run that was never killed
        shutil.rmtree(tmp_path / "runs")
        whole = _run_mke(resumed_args, tmp_path)
        assert whole.returncode == 0, whole.stderr[-3000:]
        reference = torch.load(ckpt, weights_only=False)["mke_applied"]
        assert [a["records"] for a in final["mke_applied"]] == [[f"r{i}"] for i in range(6)]
        for got, want in zip(final["mke_applied"], reference):
            for layer, (idx, values) in want["layers"].items():
                assert torch.equal(got["layers"][layer][0], idx)
                assert (got["layers"][layer][1] - values).abs().max() < 1e-5


class _SavingTrainer:
    """What EditCheckpoint's save needs of a Trainer; the save of edit ``dies_at`` stops half-written."""

    num_nodes, is_global_zero, global_step, loggers = 1, True, 0, []

    def __init__(self, dies_at: int) -> None:
        self.edits, self.dies_at = 0, dies_at
        self.strategy = type("OneProcess", (), {"barrier": lambda self, name=None: None})()

    def save_checkpoint(self, filepath, weights_only=False):
        self.edits += 1
        if self.edits == self.dies_at:
            Path(filepath).write_bytes(b"PK\x03\x04 half a checkpoint")
            raise KeyboardInterrupt("killed while saving")
        torch.save({"edits_done": self.edits}, filepath)


def test_a_kill_while_saving_leaves_the_previous_checkpoint_whole(tmp_path):
    from mke_lightning.callbacks import EditCheckpoint

    cb, trainer = EditCheckpoint(dirpath=str(tmp_path), every_n_edits=1), _SavingTrainer(dies_at=3)
    last = tmp_path / "last.ckpt"
    for _ in range(2):
        cb._save_checkpoint(trainer, str(last))
    assert torch.load(last, weights_only=False) == {"edits_done": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # nothing half-done left beside it
    with pytest.raises(KeyboardInterrupt):
        cb._save_checkpoint(trainer, str(last))
    assert torch.load(last, weights_only=False) == {"edits_done": 2}  # the resume point before the kill
    cb._save_checkpoint(trainer, str(last))  # the next save replaces both
    assert torch.load(last, weights_only=False) == {"edits_done": 4}
    assert not (tmp_path / "last.ckpt.part").exists()


def test_a_sharded_checkpoint_folder_replaces_the_previous_one(tmp_path):
    from mke_lightning.callbacks.checkpoint import _replace

    last, part = tmp_path / "last.ckpt", tmp_path / "last.ckpt.part"
    for edits in (1, 2):  # DeepSpeed writes a folder of shards
        part.mkdir()
        (part / "shard_0.pt").write_text(f"edits {edits}")
        _replace(str(part), str(last))
        assert (last / "shard_0.pt").read_text() == f"edits {edits}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # neither .part nor .old left

"""Localisation as a stage: cache, resume, ranks, the callback on a user's
module, ``mke localize``, and two gloo processes against one (tiny models)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

import mke_lightning.localization.stage as stage
from conftest import REPO, toy_record, write_jsonl
from mke_lightning.callbacks import NeuronLocalization
from mke_lightning.data.records import record_from_dict
from mke_lightning.localization.attribution import AttributionConfig
from mke_lightning.localization.cache import MaskCache, model_fingerprint
from mke_lightning.localization.locate import LocalizationConfig, locate
from mke_lightning.localization.neurons import NeuronMask
from mke_lightning.localization.stage import assign, localize_records
from mke_lightning.modeling.loading import ModelConfig, load_causal_lm

CFG = LocalizationConfig(attribution=AttributionConfig(steps=3), cross_languages=["en", "fr"], threshold=0.3)


def _records(n: int = 4):
    return [record_from_dict(toy_record(f"r{i}")) for i in range(n)]


class Killed(Exception):
    """Stands for the process dying half-way through a run."""


def _counting(monkeypatch, fail_after: int | None = None) -> list[str]:
    """Count the records the stage really localises; optionally die after some."""
    calls: list[str] = []

    def counted(model, tokenizer, arch, record, *args, **kwargs):
        if fail_after is not None and len(calls) >= fail_after:
            raise Killed(f"killed after {fail_after} records")
        calls.append(record.id)
        return locate(model, tokenizer, arch, record, *args, **kwargs)

    monkeypatch.setattr(stage, "locate", counted)
    return calls


def _run(model, tok, arch, records, cfg, root, lang="en"):
    cache = MaskCache(root, model_fingerprint(model, tok, arch), cfg, lang)
    return localize_records(model, tok, arch, records, lang, cfg, cache=cache)


def test_cache_is_reused_and_invalidated(tmp_path, tiny_llama_dir, monkeypatch):
    model, tok, arch = load_causal_lm(ModelConfig(name_or_path=str(tiny_llama_dir)))
    records = _records(2)
    calls = _counting(monkeypatch)
    first = _run(model, tok, arch, records, CFG, tmp_path)
    assert calls == ["r0", "r1"] and first.computed == ["r0", "r1"]
    files = sorted((tmp_path).rglob("*.safetensors"))
    assert len(files) == 2
    meta = NeuronMask.load(files[0]).metadata
    assert (
        meta["method"] == "integrated_gradients" and meta["settings"]["threshold"] == 0.3 and meta["model_fingerprint"]
    )

    calls.clear()
    again = _run(model, tok, arch, records, CFG, tmp_path)
    assert calls == [] and again.reused == ["r0", "r1"]
    assert all(again.masks[i].same_neurons(first.masks[i]) for i in ("r0", "r1"))

    # Speed-only settings share the cache; every other setting recomputes.
    faster = LocalizationConfig(
        attribution=AttributionConfig(steps=3, batch_rows=2, prefix_cache=False), cross_languages=["en", "fr"]
    )
    _run(model, tok, arch, records, faster, tmp_path)
    assert calls == []
    for changed in (
        LocalizationConfig(attribution=AttributionConfig(steps=4), cross_languages=["en", "fr"]),
        LocalizationConfig(attribution=AttributionConfig(steps=3, baseline="eos"), cross_languages=["en", "fr"]),
        LocalizationConfig(attribution=AttributionConfig(steps=3), cross_languages=["en", "fr"], threshold=0.4),
        LocalizationConfig(attribution=AttributionConfig(steps=3), cross_languages=["en", "fr"], top_k=50),
        LocalizationConfig(attribution=AttributionConfig(steps=3), cross_languages=["en", "fr", "de"]),
    ):
        calls.clear()
        _run(model, tok, arch, records[:1], changed, tmp_path)
        assert calls == ["r0"], changed
    calls.clear()
    _run(model, tok, arch, records[:1], CFG, tmp_path, lang="fr")  # another edit language
    assert calls == ["r0"]

    # A changed record (same id) and a changed model recompute.
    edited = toy_record("r1")
    edited["languages"]["en"]["paraphrases"] = ["the tower is in the city of"]
    calls.clear()
    _run(model, tok, arch, [records[0], record_from_dict(edited)], CFG, tmp_path)
    assert calls == ["r1"]
    with torch.no_grad():
        model.get_submodule(arch.mlp_out_name(1)).weight[:, 3] += 0.01  # one value vector
    calls.clear()
    _run(model, tok, arch, records, CFG, tmp_path)
    assert calls == ["r0", "r1"]


def test_a_run_with_other_evaluation_languages_finds_the_same_masks(tmp_path, tiny_llama_dir, monkeypatch):
    """Localisation reads a record in the edit and cross languages only: loading the records with more or
    fewer evaluation languages (a slice run beside a full one) neither recomputes nor overwrites."""
    model, tok, arch = load_causal_lm(ModelConfig(name_or_path=str(tiny_llama_dir)))
    full = toy_record("r0")  # en, fr, de; CFG crosses en and fr
    slim = toy_record("r0")
    del slim["languages"]["de"]
    calls = _counting(monkeypatch)
    _run(model, tok, arch, [record_from_dict(full)], CFG, tmp_path)
    _run(model, tok, arch, [record_from_dict(slim)], CFG, tmp_path)
    again = _run(model, tok, arch, [record_from_dict(full)], CFG, tmp_path)
    assert calls == ["r0"] and again.reused == ["r0"]
    slim["languages"]["fr"]["prompt"] = "la ville de la tour est"  # what localisation reads did change
    _run(model, tok, arch, [record_from_dict(slim)], CFG, tmp_path)
    assert calls == ["r0", "r0"]


def test_killed_run_resumes_without_recomputing_finished_records(tmp_path, tiny_llama_dir, monkeypatch):
    model, tok, arch = load_causal_lm(ModelConfig(name_or_path=str(tiny_llama_dir)))
    records = _records(4)
    calls = _counting(monkeypatch, fail_after=2)
    with pytest.raises(Killed):
        _run(model, tok, arch, records, CFG, tmp_path)
    assert calls == ["r0", "r1"]
    assert len(list(tmp_path.rglob("*.safetensors"))) == 2 and not list(tmp_path.rglob("*.tmp"))
    calls = _counting(monkeypatch)
    resumed = _run(model, tok, arch, records, CFG, tmp_path)
    assert calls == ["r2", "r3"] and resumed.reused == ["r0", "r1"]
    assert list(resumed.masks) == ["r0", "r1", "r2", "r3"]


def test_records_are_dealt_to_ranks_from_full_lists_or_shards():
    same = [["a", "b", "c", "d", "e"]] * 2
    assert assign(same) == {"a": 0, "b": 1, "c": 0, "d": 1, "e": 0}
    shards = [["a", "c", "e"], ["b", "d"]]
    assert assign(shards) == {"a": 0, "c": 0, "e": 0, "b": 1, "d": 1}
    assert assign([["a", "b"]]) == {"a": 0, "b": 0}


# -- the callback on a user's own LightningModule ---------------------------------------

class UserModule(L.LightningModule):
    """A user's module: it owns a HF causal LM and offers it through ``get_causal_lm()``."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.lm, self.tokenizer, _ = load_causal_lm(ModelConfig(name_or_path=folder))
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.seen: list[int] = []

    def get_causal_lm(self):
        return self.lm

    def training_step(self, batch, batch_idx):
        mask = self.neuron_masks[batch[0]]  # the callback filled it in before fit
        self.seen.append(mask.count())
        return self.scale * 0.0 + (self.scale - 1.0) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class UserData(L.LightningDataModule):
    def __init__(self, records) -> None:
        super().__init__()
        self.records = records
        self.edit_language = "en"

    def train_dataloader(self):
        ids = [r.id for r in self.records]
        return torch.utils.data.DataLoader(ids, batch_size=1, collate_fn=list)


def test_callback_localises_for_a_user_module_before_fit(tmp_path, tiny_llama_dir):
    module, records = UserModule(str(tiny_llama_dir)), _records(3)
    callback = NeuronLocalization(CFG, cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "out"))
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
    )
    trainer.fit(module, datamodule=UserData(records))
    assert set(module.neuron_masks) == {"r0", "r1", "r2"}
    assert len(module.seen) == 3 and all(n > 0 for n in module.seen)
    summary = json.loads((tmp_path / "out" / "localization_summary.json").read_text())
    assert summary["records"] == 3 and summary["languages"] == ["en", "fr"]
    assert len(summary["per_layer_total"]["independent"]) == 2
    assert summary["language_overlap_jaccard"][0][0] == 1.0
    assert {p.name for p in (tmp_path / "out").glob("*.png")} == {"neurons_per_layer.png", "language_overlap.png"}


def test_module_without_a_causal_lm_is_told_the_protocol(tmp_path):
    class Bare(L.LightningModule):
        tokenizer = object()

    with pytest.raises(AttributeError, match="get_causal_lm"):
        NeuronLocalization(CFG, cache=False).localize(Bare(), UserData(_records(1)))


# -- `mke localize`, one process and two --------------------------------------------

def _localize_args(tmp_path: Path, model_dir: Path, cache: Path, n: int = 4) -> list[str]:
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    loc = cfg["trainer"]["callbacks"][0]["init_args"]
    loc["settings"]["cross_languages"] = ["en", "fr"]
    loc["settings"]["attribution"]["steps"] = 3
    loc["cache_dir"] = str(cache)
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(cfg))
    data = write_jsonl(tmp_path / "edits.jsonl", [toy_record(f"r{i}") for i in range(n)])
    return [
        "localize", "--config", str(tmp_path / "toy.yaml"),
        "--model.lm.name_or_path", str(model_dir),
        "--data.format", "jsonl", "--data.path", str(data), "--data.eval_languages", "[en, fr, de]",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
    ]


def _masks_in(cache: Path) -> dict[str, NeuronMask]:
    masks = [NeuronMask.load(p) for p in sorted(cache.rglob("*.safetensors"))]
    return {m.record_id: m for m in masks}


def _stage_of(cli) -> NeuronLocalization:
    return next(c for c in cli.trainer.callbacks if isinstance(c, NeuronLocalization))


def test_mke_localize_only_localises_and_writes_masks(tmp_path, tiny_llama_dir):
    from mke_lightning.cli import cli_main

    cli = cli_main(_localize_args(tmp_path, tiny_llama_dir, tmp_path / "cache"))
    masks = _masks_in(tmp_path / "cache")
    assert set(masks) == {"r0", "r1", "r2", "r3"}
    assert cli.model.outcomes == []  # nothing was edited
    assert set(cli.model.neuron_masks) == set(masks)
    assert next((tmp_path / "runs").rglob("localization_summary.json")).exists()
    assert len(_stage_of(cli).last.computed) == 4
    again = _stage_of(cli_main(_localize_args(tmp_path, tiny_llama_dir, tmp_path / "cache"))).last
    assert again.computed == [] and len(again.reused) == 4


def test_two_gloo_processes_find_the_same_masks_as_one(tmp_path, tiny_llama_dir):
    from mke_lightning.cli import cli_main

    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    cli_main(_localize_args(one, tiny_llama_dir, one / "cache", n=5))
    args = _localize_args(two, tiny_llama_dir, two / "cache", n=5)
    args += ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "mke_lightning.cli", *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout + done.stderr
    # Each rank computed its own records and then held all of them.
    assert "[rank 0] holds the masks of 5 records (3 computed" in out
    assert "[rank 1] holds the masks of 5 records (2 computed" in out
    single, double = _masks_in(one / "cache"), _masks_in(two / "cache")
    assert set(single) == set(double) == {f"r{i}" for i in range(5)}
    for rid in single:
        assert double[rid].same_neurons(single[rid]), rid
    summary = json.loads(next((two / "runs").rglob("localization_summary.json")).read_text())
    assert summary["records"] == 5

"""Resuming a stopped run: the evaluation of the edits made before the restart (rows, summary,
perplexity, retention) is in the checkpoint, and the resumed run's files are those of a run never stopped.

The runs are stopped by an exception at the end of an edit, in place of a kill (tests/test_faults.py
kills a run with SIGKILL; what the checkpoint holds is the same). The editor seeds each
update's start by its records (``init_seed``), so an edit after the restart starts as it would have
in a run never stopped.
"""

from __future__ import annotations

import csv
import io
import json
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import write_jsonl
from mke_lightning.callbacks import EditCheckpoint, EditEvaluation
from mke_lightning.data import EditDataModule
from mke_lightning.editing.editor import EditLossConfig, KnowledgeEditor
from mke_lightning.editing.masked_lora import LoRAConfig
from mke_lightning.evaluation.perplexity import PerplexityConfig
from mke_lightning.localization.neurons import NeuronMask
from mke_lightning.modeling.loading import ModelConfig
from mke_lightning.modeling.strategies import EditingDDPStrategy
from test_retention import NEURONS, _records

TIMINGS = ("eval_seconds_per_edit_median_rank0", "seconds_rank0")  # the only figures a restart may change


class Stopped(Exception):
    """The stand-in for a kill."""


class StopAfter(L.Callback):
    """Raises at the end of edit batch ``edits`` (1-based). Lightning runs the checkpoint callbacks last,
    so that batch's checkpoint is never written: its edit is done and evaluated, then lost, as in a kill."""

    def __init__(self, edits: int) -> None:
        self.edits = edits

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx + 1 == self.edits:
            raise Stopped(f"stopped after edit {self.edits}")


def _fit(tmp_path, model_dir, protocol: str, name: str, every_n_edits: int = 1, stop: int | None = None,
         ckpt_path: str | None = None, retention: int | None = None, ranks: int = 1,
         eval_languages: tuple[str, ...] = ("en", "fr")) -> EditEvaluation:
    """A real fit of the four records of test_retention (every edit trains the same neurons: later edits move
    earlier ones), with EditCheckpoint into ``<tmp_path>/<name>/checkpoints`` and perplexity after every 2nd edit;
    ``ranks=2``: DDP on two spawned CPU processes (gloo)."""
    records = _records()
    data = EditDataModule(
        format="jsonl", path=str(write_jsonl(tmp_path / "four.jsonl", records)), eval_languages=list(eval_languages)
    )
    module = KnowledgeEditor(lm=ModelConfig(name_or_path=str(model_dir)), protocol=protocol,
                             lora=LoRAConfig(merge_scale=1.0), loss=EditLossConfig(max_steps=4),
                             optimizer=partial(torch.optim.Adam, lr=0.05))  # picklable: spawned ranks get a copy
    module.neuron_masks = {r["id"]: NeuronMask(r["id"], NEURONS) for r in records}
    cb = EditEvaluation(perplexity=PerplexityConfig(every_n_edits=2, texts_per_language=1, max_tokens=16),
                        plots=False, print_table=False, retention_every_n_edits=retention)
    from lightning.pytorch.loggers import CSVLogger

    callbacks = [cb, EditCheckpoint(dirpath=str(tmp_path / name / "checkpoints"), every_n_edits=every_n_edits)]
    callbacks += [StopAfter(stop)] if stop else []
    strategy = "auto" if ranks == 1 else EditingDDPStrategy(start_method="spawn", process_group_backend="gloo")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=ranks,
        strategy=strategy,
        max_epochs=1,
        logger=CSVLogger(tmp_path, name=name),
        callbacks=callbacks,
        enable_model_summary=False,
        enable_progress_bar=False,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    torch.manual_seed(0)
    # weights_only=False: the module's hyper-parameters are dataclasses here (the evaluation state alone is plain)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=False)
    return cb


def _files(folder: Path) -> dict:
    """What a run wrote into ``folder``, timings left out and the data file by its name (each run has its own
    folder)."""
    doc = json.loads((folder / "results.json").read_text())
    for key in TIMINGS:
        doc.pop(key, None)
    doc["data"]["path"], doc["data"]["files"] = (
        Path(doc["data"]["path"]).name,
        [Path(f).name for f in doc["data"]["files"]],
    )
    for c in doc.get("retention", {}).get("checkpoints", []):
        c.pop("seconds_rank0")
    csvs = [folder / f"{name}.csv" for name in ("edits", "perplexity", "retention")]  # not the logger's metrics.csv
    return {"results.json": doc, **{p.stem: p.read_text() for p in csvs if p.exists()}}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_llama_dir):
    """The files of a run never stopped, per (protocol, retention_every_n_edits): made once."""
    made: dict[tuple, dict] = {}

    def files(protocol: str, retention: int | None = None) -> dict:
        if (protocol, retention) not in made:
            folder = tmp_path_factory.mktemp(f"whole-{protocol}")
            cb = _fit(folder, tiny_llama_dir, protocol, "whole", retention=retention)
            made[protocol, retention] = _files(cb.written["results"].parent)
        return made[protocol, retention]

    return files


def _stopped_and_resumed(tmp_path, model_dir, protocol: str, every_n_edits: int, stop: int,
                         retention: int | None = None) -> tuple[dict, EditEvaluation]:
    """Stop a run after edit ``stop``, check what its checkpoint holds, resume it; the checkpoint's state and the
    callback."""
    with pytest.raises(Stopped):
        _fit(tmp_path, model_dir, protocol, "run", every_n_edits, stop=stop, retention=retention)
    assert not list(tmp_path.rglob("results.json"))  # the stopped run wrote no results
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    done = [d["record_id"] for d in saved["mke_edit_log"]]
    assert (
        done == ["r0", "r1", "r2", "r3"][: (stop - 1) // every_n_edits * every_n_edits]
    )  # the stop's own edit is lost
    state = saved["callbacks"]["EditEvaluation"]
    assert [part["records"] for part in state["ranks"]] == [done]  # the evaluation holds the same edits as the edit log
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=True)  # plain lists, dicts and tensors
    return state, _fit(tmp_path, model_dir, protocol, "run", every_n_edits, ckpt_path="last", retention=retention)


def test_a_resumed_run_reports_every_edit_as_a_run_never_stopped(tmp_path, tiny_llama_dir, uninterrupted):
    state, cb = _stopped_and_resumed(tmp_path, tiny_llama_dir, "single", every_n_edits=2, stop=3)
    whole = uninterrupted("single")
    # results.json (summary and run metadata), edits.csv, perplexity.csv: the same, figure for figure
    assert _files(cb.written["results"].parent) == whole
    assert whole["results.json"]["records"] == 4 and set(whole) == {"results.json", "edits", "perplexity"}
    assert [l.split(",")[0] for l in whole["perplexity"].splitlines()[1::2]] == [
        "r0",
        "r2",
    ]  # every 2nd edit, across the restart
    assert cb.ppl_pre == state["ranks"][0]["ppl_pre"]  # taken from the checkpoint, not measured again
    assert list(cb.seconds) == ["r0", "r1", "r2", "r3"]

    # the saved figures are for en and fr: a run evaluating other languages cannot continue them
    with pytest.raises(ValueError, match=r"eval_languages: \['en', 'fr'\] then, \['en', 'de'\] now"):
        _fit(tmp_path, tiny_llama_dir, "single", "run", every_n_edits=2, ckpt_path="last", eval_languages=("en", "de"))


@pytest.mark.parametrize("retention, every_n_edits, stop", [(None, 1, 2), (2, 2, 3)])
def test_a_resumed_sequential_run_retains_the_edits_made_before_the_restart(tmp_path, tiny_llama_dir, uninterrupted,
                                                                           retention, every_n_edits, stop):
    state, cb = _stopped_and_resumed(tmp_path, tiny_llama_dir, "sequential", every_n_edits, stop, retention)
    (part,) = state["ranks"]
    assert [d["record_id"] for d in part["done"]] == part["records"]  # each edit's items and references are kept
    assert [c["edits_done"] for c in state["retention"]] == ([2] if retention else [])
    whole = uninterrupted("sequential", retention)
    assert _files(cb.written["results"].parent) == whole  # with retention.csv and the retention block of results.json
    # the final pass re-scored every edit, those made before the restart too, in the order they were made
    final = list(csv.DictReader(io.StringIO(whole["retention"])))
    assert list(dict.fromkeys((r["record_id"], r["edit_number"]) for r in final)) == [
        ("r0", "1"),
        ("r1", "2"),
        ("r2", "3"),
        ("r3", "4"),
    ]
    assert [c["edits_done"] for c in whole["results.json"]["retention"]["checkpoints"]] == (
        [2, 4] if retention else [4]
    )
    # the restart did not change the pre-edit perplexity, though the model it starts from holds the kept edits
    assert cb.ppl_pre == part["ppl_pre"]


def test_under_two_ranks_each_rank_gets_back_its_own_edits(tmp_path, tiny_llama_dir, uninterrupted):
    """DDP on two CPU processes: the checkpoint holds each rank's part, and the resumed ranks report
    every edit as a run never stopped: the figures of one process, the rows rank by rank."""
    with pytest.raises(Exception, match="stopped after edit 2"):  # both ranks stop after their 2nd edit
        _fit(tmp_path, tiny_llama_dir, "single", "run", every_n_edits=1, stop=2, ranks=2)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"][
        "EditEvaluation"
    ]
    assert [part["records"] for part in state["ranks"]] == [["r0"], ["r1"]]  # each rank's first edit, of its own share
    _fit(tmp_path, tiny_llama_dir, "single", "run", every_n_edits=1, ckpt_path="last", ranks=2)
    assert [p.parent.name for p in tmp_path.glob("run/version_*/results.json")] == ["version_1"]  # the resumed run's
    resumed, whole = _files(tmp_path / "run" / "version_1"), uninterrupted("single")
    assert resumed["results.json"]["world_size"] == 2
    assert {**resumed["results.json"], "world_size": 1} == whole[
        "results.json"
    ]  # summed over the ranks: the same figures
    assert sorted(resumed["edits"].splitlines()) == sorted(whole["edits"].splitlines())
    # perplexity: computed in another process with another thread count, so equal up to float summation order
    def ppl(text):
        return sorted(([r["record_id"], r["lang"]], [float(r[k]) for k in ("ppl_pre", "ppl_post", "ratio")])
                                  for r in csv.DictReader(io.StringIO(text)))

    got, want = ppl(resumed["perplexity"]), ppl(whole["perplexity"])
    assert [k for k, _ in got] == [k for k, _ in want]
    for (_, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, rel=1e-5)
    # rank 0's rows (r0 from before the restart, r2), then rank 1's (r1, r3): as an uninterrupted two-rank run
    # writes them
    rows = list(csv.DictReader(io.StringIO(resumed["edits"])))
    assert list(dict.fromkeys(r["record_id"] for r in rows)) == ["r0", "r2", "r1", "r3"]

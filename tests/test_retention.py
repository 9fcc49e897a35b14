"""Retention under the sequential protocol (every edit re-scored on the model of later edits),
and what ``results.json`` says about a run (method, protocol, data, settings)."""

from __future__ import annotations

import csv
import json
import sys

import lightning as L
import pytest
import torch
import yaml

from conftest import toy_record, write_jsonl
from mke_lightning.callbacks import EditEvaluation
from mke_lightning.data import EditDataModule
from mke_lightning.editing.editor import EditLossConfig, KnowledgeEditor
from mke_lightning.editing.masked_lora import LoRAConfig
from mke_lightning.evaluation.evaluator import EditEvaluator, build_items
from mke_lightning.evaluation.perplexity import PerplexityConfig
from mke_lightning.localization.neurons import NeuronMask
from mke_lightning.modeling.loading import ModelConfig

# Every edit trains the same neurons, so a later edit of the same prompt can overwrite an earlier one.
NEURONS = {"independent": {0: list(range(0, 16, 2))}, "specific": {1: list(range(1, 16, 2))}}


def _records() -> list[dict]:
    """Four edits: r3 gives r0's prompt (the tower's city) another answer, so r0 is undone by it."""
    r0 = toy_record("r0")  # the tower is located in the city of -> rome
    r1 = toy_record("r1")
    r1["languages"]["en"].update(prompt="the capital of france is", paraphrases=["the capital city of france is"],
                                 target_new="berlin", target_true="paris")
    r2 = toy_record("r2")
    r2["languages"]["en"].update(prompt="the capital of spain is", paraphrases=["the capital city of spain is"],
                                 target_new="rome", target_true="madrid")
    r3 = toy_record("r3")
    for block in r3["languages"].values():
        block.update(target_new="berlin", target_true="rome")  # the tower's city again: rome (r0's answer) -> berlin
    return [r0, r1, r2, r3]


def _fit(tmp_path, model_dir, protocol: str, records: list[dict], every: int | None = None, name: str = "run"):
    """A real fit: KnowledgeEditor with the masks given on the module, EditEvaluation, a toy JSONL."""
    data = EditDataModule(format="jsonl", path=str(write_jsonl(tmp_path / f"{name}.jsonl", records)),
                          eval_languages=["en", "fr"])
    module = KnowledgeEditor(lm=ModelConfig(name_or_path=str(model_dir)), protocol=protocol,
                             lora=LoRAConfig(merge_scale=1.0), loss=EditLossConfig(max_steps=10),
                             optimizer=lambda p: torch.optim.Adam(p, lr=0.05))
    module.neuron_masks = {r["id"]: NeuronMask(r["id"], NEURONS) for r in records}
    cb = EditEvaluation(perplexity=PerplexityConfig(enabled=False), plots=False, retention_every_n_edits=every)
    from test_evaluation_callback import _trainer

    trainer = _trainer(tmp_path, name, cb, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    return module, cb


def _csv(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _value(rows: list[dict], rid: str, measure: str, proto: str, lang: str = "en") -> float:
    (row,) = [r for r in rows if r["record_id"] == rid and r["measure"] == measure and r["eval_lang"] == lang]
    return float(row[proto])


@pytest.mark.parametrize("every, checkpoints", [(2, [2, 4]), (3, [3, 4]), (None, [4])])
def test_sequential_retention_checkpoints_and_an_overwritten_edit(tmp_path, tiny_llama_dir, capsys, every, checkpoints):
    module, cb = _fit(tmp_path, tiny_llama_dir, "sequential", _records(), every)
    assert [o.record_id for o in module.outcomes] == ["r0", "r1", "r2", "r3"] and not any(
        o.failed for o in module.outcomes
    )
    doc = json.loads(cb.written["results"].read_text())

    # checkpoints every K edits and at the end (not twice when the end is a multiple of K)
    ret = doc["retention"]
    assert ret["every_n_edits"] == every
    assert [c["edits_done"] for c in ret["checkpoints"]] == checkpoints
    for c in ret["checkpoints"]:  # each pass re-scored every edit done by then: one edit prompt per edit and language
        assert c["summary"]["edits"] == c["edits_done"]
        assert (
            c["summary"]["counts"]["en"]["reliability"]
            == c["edits_done"]
            == c["summary"]["counts"]["fr"]["reliability"]
        )
        assert set(c["summary"]["language"]) == {"en", "fr"} and "non_edit_languages" in c["summary"]["average"]

    # the final pass scored every edit, item for item as right after it, in the order they were made
    immediate, final = _csv(cb.written["edits"]), _csv(cb.written["retention"])
    assert len(final) == len(immediate)
    assert [
        (r["record_id"], r["edit_number"]) for r in final if r["measure"] == "reliability" and r["eval_lang"] == "en"
    ] == [("r0", "1"), ("r1", "2"), ("r2", "3"), ("r3", "4")]
    # nothing changed after the last edit: its retention is its immediate evaluation
    def last(rows):
        return [
            {k: r[k] for k in ("eval_lang", "measure", "token_acc", "gen_em", "prob")}
            for r in rows
            if r["record_id"] == "r3"
        ]

    assert last(final) == last(immediate)

    # r0 held right after it was made; r3 gave its prompt another answer, so r0 is no longer retained
    for proto in ("token_acc", "gen_em"):
        assert _value(immediate, "r0", "reliability", proto) == 1.0
        assert _value(final, "r0", "reliability", proto) == 0.0
        assert _value(final, "r3", "reliability", proto) == 1.0
    assert (
        doc["results"]["language"]["en"]["reliability"]["token_acc"]
        > ret["checkpoints"][-1]["summary"]["language"]["en"]["reliability"]["token_acc"]
    )
    # ... which the final model itself confirms, scored afresh
    ev = EditEvaluator(module.tokenizer)
    items = [i for i in build_items(module.trainer.datamodule.records[0], ["en"]) if i.measure == "reliability"]
    assert ev.score(module.causal_lm, items, {})[0]["token_acc"] == _value(final, "r0", "reliability", "token_acc")

    # logged per checkpoint, and printed beside the immediate figures
    metrics = _csv(next((tmp_path / "run").rglob("metrics.csv")))
    logged = sorted(int(float(r["retention/edits_done"])) for r in metrics if r.get("retention/edits_done"))
    assert logged == checkpoints
    assert any(r.get("retention/edit_lang/reliability/token_acc") for r in metrics)
    assert any(r.get("retention/other_langs/locality/gen_em") for r in metrics)
    out = capsys.readouterr().out
    assert "retention (sequential protocol)" in out and f"tok @{checkpoints[-1]}" in out and "gen imm" in out

    # what the run was
    assert doc["method"] == "memla" and doc["protocol"] == "sequential" and doc["train_languages"] == ["en"]
    assert doc["settings"]["loss"]["max_steps"] == 10 and doc["settings"]["lora"]["merge_scale"] == 1.0
    assert doc["data"]["format"] == "jsonl" and doc["data"]["records_selected"] == 4 and doc["data"]["skipped"] == 0
    assert doc["data"]["selection"] == {"ids": None, "offset": 0, "limit": None, "seed": None}
    assert doc["data"]["eval_languages"] == ["en", "fr"]


def test_single_protocol_writes_no_retention_and_report_reads_old_and_new_files(
    tmp_path, tiny_llama_dir, capsys, monkeypatch
):
    records = _records()[:2]
    _, cb = _fit(tmp_path, tiny_llama_dir, "single", records, every=1)
    doc = json.loads(cb.written["results"].read_text())
    assert "retention" not in doc and "retention" not in cb.written and not cb.retention
    assert not list(tmp_path.rglob("retention.csv"))
    assert "retention" not in capsys.readouterr().out
    assert doc["protocol"] == "single" and doc["method"] == "memla" and doc["data"]["records_selected"] == 2
    assert "optimizer" in doc["settings"] and doc["settings"]["values"] is None  # memla: no value-update settings
    # the definitions of the protocols the figures use (records with an old target: prob among them)
    assert set(doc["metric_protocols"]) == {"token_acc", "em", "f1", "f1_legacy", "prob", "gen_em"}

    # `mke report` over this run and the same file as written before the run metadata existed
    old = {k: v for k, v in doc.items() if k not in ("protocol", "data", "train_languages", "settings")}
    old_dir = tmp_path / "old"
    old_dir.mkdir()
    (old_dir / "results.json").write_text(json.dumps({**old, "method": "memla-old"}))
    from mke_lightning.cli import main

    out = tmp_path / "report"
    monkeypatch.setattr(sys, "argv", ["mke", "report", str(cb.written["results"]), str(old_dir), "--output", str(out)])
    main()
    table = (out / "comparison.md").read_text()
    new_row = next(l for l in table.splitlines() if l.startswith("| memla (edited)"))
    old_row = next(l for l in table.splitlines() if l.startswith("| memla-old (edited)"))

    def cells(row):
        return [c.strip() for c in row.strip().strip("|").split("|")]

    assert cells(new_row)[2] == "single" and cells(new_row)[4] == "jsonl run.jsonl, 2 records"
    assert cells(old_row)[2] == cells(old_row)[4] == "-"  # protocol and data unknown in an older file
    assert "reliability (token_acc)" in table  # the figures follow


def test_a_user_module_without_run_info_leaves_the_fields_out(tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mke_lightning.data.records import record_from_dict
    from test_evaluation_callback import UserData, UserEditor

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    module = UserEditor(model, AutoTokenizer.from_pretrained(tiny_llama_dir))
    module.protocol = "sequential"  # a user's module may keep its edits too: retention runs on what it says
    cb = EditEvaluation(perplexity=PerplexityConfig(enabled=False), plots=False, print_table=False)
    from lightning.pytorch.loggers import CSVLogger

    L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=CSVLogger(tmp_path, name="user"),
        callbacks=[cb],
        enable_checkpointing=False,
        enable_model_summary=False,
    ).fit(module, datamodule=UserData([record_from_dict(toy_record("u0"))]))
    doc = json.loads(cb.written["results"].read_text())
    assert doc["method"] == "UserEditor"
    assert not {"protocol", "train_languages", "settings", "data"} & set(doc)
    assert [c["edits_done"] for c in doc["retention"]["checkpoints"]] == [1]
    with pytest.raises(ValueError, match="retention_every_n_edits"):
        EditEvaluation(retention_every_n_edits=0)


def test_retention_every_n_edits_is_set_in_yaml(tmp_path, tiny_llama_dir):
    from mke_lightning.cli import MKECLI
    from test_cli import _toy_args

    args = _toy_args(tmp_path, tiny_llama_dir)
    cfg = yaml.safe_load((tmp_path / "toy.yaml").read_text())
    evaluation = next(c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("EditEvaluation"))
    evaluation["init_args"]["retention_every_n_edits"] = 5
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(cfg))
    cli = MKECLI(KnowledgeEditor, EditDataModule, args=args[1:] + ["--model.protocol", "sequential"], run=False)
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, EditEvaluation)]
    assert cb.retention_every_n_edits == 5 and cli.model.protocol == "sequential"

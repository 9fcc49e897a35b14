"""The evaluation callback on a user's own LightningModule, its files and logs,
perplexity, and ``mke report`` over two runs."""

from __future__ import annotations

import csv
import json
import sys

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import toy_record
from mke_lightning.callbacks import EditEvaluation
from mke_lightning.data.datamodule import EditBatch
from mke_lightning.data.records import record_from_dict
from mke_lightning.evaluation.perplexity import PerplexityConfig, PerplexityProbe, load_sample

SCALE = 1.5  # the user's "edit": scale the LM head; argmax (and so locality) unchanged, perplexity not


class UserEditor(L.LightningModule):
    """Written as a user would: only ``get_causal_lm()`` and ``tokenizer`` for the callback."""

    def __init__(self, model, tokenizer) -> None:
        super().__init__()
        self.lm = model
        self.tokenizer = tokenizer
        self.automatic_optimization = False

    def get_causal_lm(self):
        return self.lm

    def training_step(self, batch, batch_idx):
        with torch.no_grad():
            self.lm.lm_head.weight.mul_(SCALE)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        with torch.no_grad():
            self.lm.lm_head.weight.div_(SCALE)

    def test_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return None


class UserData(L.LightningDataModule):
    def __init__(self, records) -> None:
        super().__init__()
        self.records, self.edit_language, self.eval_languages = records, "en", ["en", "fr", "de"]

    def train_dataloader(self):
        return DataLoader(self.records, batch_size=1, collate_fn=EditBatch)  # records pass through device moves

    test_dataloader = train_dataloader


@pytest.fixture()
def user_parts(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    records = [record_from_dict(toy_record(f"u{i}")) for i in range(3)]
    return UserEditor(model, AutoTokenizer.from_pretrained(tiny_llama_dir)), UserData(records)


def _trainer(tmp_path, name: str, callback: EditEvaluation, **more) -> L.Trainer:
    """A one-epoch CPU Trainer logging to ``tmp_path/name`` with ``callback`` (``more``: other Trainer arguments)."""
    from lightning.pytorch.loggers import CSVLogger

    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=CSVLogger(tmp_path, name=name),
        callbacks=[callback],
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        **more,
    )


def test_callback_on_a_user_module_writes_reports_logs_and_perplexity(tmp_path, user_parts, capsys, monkeypatch):
    module, data = user_parts
    cb = EditEvaluation(perplexity=PerplexityConfig(every_n_edits=2, texts_per_language=1))
    trainer = _trainer(tmp_path, "fit", cb)
    trainer.fit(module, datamodule=data)
    s = cb.summary
    assert s["edits"] == 3 and set(s["language"]) == {"en", "fr", "de"}
    # scaling the head keeps every argmax: the edited model agrees with the pre-edit one everywhere
    for lang in ("en", "fr", "de"):
        assert s["language"][lang]["locality"]["token_acc"] == 1.0
        assert s["language"][lang]["locality"]["gen_em"] == 1.0
    # ... but not its perplexity, measured after edits 0 and 2 (every_n_edits=2), not edit 1
    assert set(s["perplexity_ratio"]) == {"en", "fr", "de"} and all(r != 1.0 for r in s["perplexity_ratio"].values())
    ppl_rows = list(csv.DictReader(cb.written["perplexity"].open()))
    assert sorted({r["record_id"] for r in ppl_rows}) == ["u0", "u2"]
    for name in ("results", "edits", "heatmap_token_acc", "heatmap_gen_em"):
        assert cb.written[name].is_file()
    doc = json.loads(cb.written["results"].read_text())
    assert doc["model_state"] == "edited" and doc["method"] == "UserEditor" and doc["results"]["perplexity_pre"]
    # logged per edit, and a running reliability on the progress bar
    metrics = list(csv.DictReader(open(next((tmp_path / "fit").rglob("metrics.csv")))))
    assert any(r.get("eval/edit_lang/reliability/token_acc") for r in metrics)
    assert any(r.get("final/average/non_edit_languages/locality/token_acc") for r in metrics)
    assert "rel_tok" in trainer.progress_bar_metrics and "rel_gen" in trainer.progress_bar_metrics
    assert "edited model, edit language en, 3 edits" in capsys.readouterr().out

    # the same module unedited (test), then both runs compared by `mke report`
    cb_test = EditEvaluation(perplexity=PerplexityConfig(enabled=False))
    _trainer(tmp_path, "test", cb_test).test(module, datamodule=data)
    assert json.loads(cb_test.written["results"].read_text())["model_state"] == "unedited"
    out = tmp_path / "report"
    from mke_lightning.cli import main

    monkeypatch.setattr(
        sys,
        "argv",
        [
            "mke",
            "report",
            str(cb.written["results"].parent),
            str(cb_test.written["results"].parent),
            "--output",
            str(out),
        ],
    )
    main()
    assert {p.name for p in out.iterdir()} == {
        "methods.png",
        "heatmap_token_acc.png",
        "heatmap_gen_em.png",
        "comparison.md",
        "languages.md",
    }
    table = (out / "comparison.md").read_text()
    assert "UserEditor (edited)" in table and "UserEditor (unedited)" in table
    per_lang = (out / "languages.md").read_text()
    edited_rel = json.loads(cb.written["results"].read_text())["results"]["language"]["fr"]["reliability"]["token_acc"]
    assert "**reliability** (token_acc)" in per_lang and "| run | en | fr | de | mean non-edit |" in per_lang
    row = next(
        l
        for l in per_lang.split("**reliability** (token_acc)")[1].splitlines()
        if l.startswith("| UserEditor (edited)")
    )
    assert row.split(" | ")[2] == f"{edited_rel:.2f}"  # the fr column
    monkeypatch.setattr(sys, "argv", ["mke", "report", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit):
        main()
    assert "does not exist" in capsys.readouterr().err


def test_callback_refuses_a_module_without_the_protocol(tmp_path, user_parts):
    module, data = user_parts
    module.tokenizer = None
    with pytest.raises(AttributeError, match="tokenizer"):
        _trainer(tmp_path, "bad", EditEvaluation(perplexity=PerplexityConfig(enabled=False))).fit(
            module, datamodule=data
        )
    with pytest.raises(ValueError, match="unknown measures"):
        EditEvaluation(measures=["reliablity"])
    with pytest.raises(ValueError, match="log_protocols"):
        EditEvaluation(log_protocols=["f2"])


def test_perplexity_sample_and_probe(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sample = load_sample()
    mzsre = {"en", "cs", "de", "nl", "es", "fr", "pt", "ru", "th", "tr", "vi", "zh"}
    assert mzsre <= set(sample)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    texts = {
        "en": ["the capital of france is paris"],
        "de": ["die hauptstadt von italy ist rome", "der himmel ist blau"],
    }
    probe = PerplexityProbe(tok, texts, ["en", "de"], PerplexityConfig(memory_budget_mb=1))
    ppl = probe.measure(model)
    # by hand for en: exp(mean NLL of the 6 tokens after <bos>)
    ids = torch.tensor([tok("the capital of france is paris")["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    nll = -logp.gather(-1, ids[0, 1:, None]).mean()
    assert ppl["en"] == pytest.approx(float(nll.exp()), rel=1e-5)
    # batching (two passages padded together) changes nothing
    alone = PerplexityProbe(tok, {"de": texts["de"][:1]}, ["de"], PerplexityConfig()).measure(model)
    both = PerplexityProbe(tok, {"de": texts["de"][:1] * 2}, ["de"], PerplexityConfig()).measure(model)
    assert both["de"] == pytest.approx(alone["de"], rel=1e-5)
    with pytest.raises(ValueError, match="no text in"):
        PerplexityProbe(tok, texts, ["ja"], PerplexityConfig())
    bad = tmp_path / "bad.json"
    bad.write_text('{"en": "not a list"}')
    with pytest.raises(ValueError, match="expected a JSON object"):
        load_sample(bad)
    with pytest.raises(ValueError, match="every_n_edits"):
        PerplexityConfig(every_n_edits=0)

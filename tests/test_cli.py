"""The `mke` LightningCLI: every shipped YAML parses, and a fit runs in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, toy_record, write_jsonl
from mke_lightning.cli import MKECLI, cli_main
from mke_lightning.data import EditDataModule
from mke_lightning.editing.editor import KnowledgeEditor

# Run configs (configs/scale/ holds overlays for them; tests/test_scale.py parses those).
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.parent.name != "scale")


def test_there_are_configs():
    assert {p.relative_to(REPO / "configs").as_posix() for p in CONFIGS} >= {"demo.yaml", "memla/mzsre.yaml"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_every_config_parses_and_instantiates(config, tmp_path):
    args = ["--config", str(config), "--trainer.default_root_dir", str(tmp_path)]
    if "mzsre" in config.relative_to(REPO / "configs").as_posix():
        args += ["--data.path", str(tmp_path)]
    cli = MKECLI(KnowledgeEditor, EditDataModule, args=args, run=False)
    assert isinstance(cli.model, KnowledgeEditor)
    assert cli.model.edit_language == cli.datamodule.edit_language  # linked
    assert cli.model.causal_lm is None  # the model is built in configure_model, not at parse time


def _toy_args(tmp_path: Path, model_dir: Path, subcommand: str = "fit") -> list[str]:
    """The demo config pointed at a tiny model and a toy JSONL file."""
    import yaml

    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    loc = cfg["trainer"]["callbacks"][0]["init_args"]["settings"]
    loc["cross_languages"] = ["en", "fr"]
    loc["attribution"]["steps"] = 3
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(cfg))
    data = write_jsonl(tmp_path / "edits.jsonl", [toy_record("t1"), toy_record("t2")])
    return [
        subcommand, "--config", str(tmp_path / "toy.yaml"),
        "--model.lm.name_or_path", str(model_dir),
        "--data.format", "jsonl", "--data.path", str(data), "--data.eval_languages", "[en, fr, de]",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
    ]


def test_fit_runs_in_process_and_writes_reports(tmp_path, tiny_llama_dir, capsys, caplog):
    caplog.set_level("INFO")
    cli = cli_main(_toy_args(tmp_path, tiny_llama_dir))
    out = capsys.readouterr().out
    assert "edited model, edit language en, 2 edits" in out
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("edit ")]
    ids = [o.record_id for o in cli.model.outcomes]
    assert [m.split(":")[0] for m in progress] == [f"edit {i} ({rid})" for i, rid in enumerate(ids, start=1)]
    assert all(" steps, P(new) " in m and " neurons, " in m for m in progress)
    results = json.loads(next((tmp_path / "runs").rglob("results.json")).read_text())
    assert results["model_state"] == "edited"
    assert set(results["results"]["language"]) == {"en", "fr", "de"}
    loc = results["settings"]["localization"]  # the localising callback's settings, beside the module's
    assert loc["attribution"]["steps"] == 3 and loc["cross_languages"] == ["en", "fr"] and loc["background"] is None
    csv_rows = next((tmp_path / "runs").rglob("edits.csv")).read_text().strip().splitlines()
    assert len(csv_rows) == 1 + 2 * 3 * 5  # header + records x languages x measures
    assert len(cli.model.outcomes) == 2 and all(o.neurons > 0 for o in cli.model.outcomes)


def test_validate_scores_the_unedited_model(tmp_path, tiny_llama_dir, capsys):
    args = _toy_args(tmp_path, tiny_llama_dir, "validate")
    args += ["--trainer.limit_val_batches", "1.0"]
    cli_main(args)
    out = capsys.readouterr().out
    assert "unedited model" in out

"""A resumed run is the same run, on the embedded Gemma 3 270M and MzsRE: a sequential MEMLA run over 6
records (checkpoint every 2 edits, save_deltas) SIGKILLed after edit 3 and resumed, into the same version
folder and into the logger's next one, uses the masks, writes the deltas (bit for bit) and reports the
results of the run never stopped.

Kept cheap for 2 CPU cores: two languages, one-pass attribution (activation x gradient), at most 3 steps
per edit, two measures, one perplexity text per language, and one killed run, copied before each of the two
restarts (the copy also moves the run's folder, as a re-created checkout would). The masks are cached per
test (the killed run reads the ones the whole run located); a restart that located its records again would
miss that cache, its model holding the kept edits.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO
from mke_lightning.editing.export import load_edits, undo_edits
from mke_lightning.localization.cache import model_fingerprint
from mke_lightning.modeling.loading import ModelConfig, load_causal_lm
from test_resume import assert_same_deltas, deltas, results, run_configs

pytestmark = pytest.mark.real_model

NAME = "mzsre-resume"


def _config(tmp_path: Path, mzsre_dir: Path) -> dict:
    cfg = yaml.safe_load((REPO / "configs" / "memla" / "mzsre.yaml").read_text())
    cfg["trainer"]["accelerator"] = "cpu"
    cfg["trainer"]["logger"]["init_args"]["name"] = NAME
    loc, ev = cfg["trainer"]["callbacks"]
    loc["init_args"].update(cache=True, cache_dir=str(tmp_path / "masks"), plots=False)
    loc["init_args"]["settings"]["attribution"]["method"] = "grad_x_act"
    loc["init_args"]["settings"]["cross_languages"] = ["en", "de"]
    ev["init_args"] = {"measures": ["reliability", "locality"], "max_new_tokens": 4, "plots": False,
                       "perplexity": {"texts_per_language": 1, "max_tokens": 16, "every_n_edits": 2}}
    cfg["model"]["lora"]["merge_scale"] = 1.0
    cfg["model"]["loss"]["max_steps"] = 3
    cfg["model"]["optimizer"]["init_args"]["lr"] = 0.02
    cfg["model"].update(protocol="sequential", save_deltas=True)
    cfg["data"].update(path=str(mzsre_dir), limit=6, eval_languages=["en", "de"])
    return cfg


def _fit(config: Path, save_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    mke = Path(sys.executable).parent / "mke"
    return subprocess.run(
        [str(mke), "fit", "--config", str(config), "--trainer.logger.init_args.save_dir", str(save_dir), *extra],
        capture_output=True,
        text=True,
        timeout=1800,
        env=env,
    )


def test_a_killed_sequential_memla_run_on_mzsre_resumes_as_the_run_never_stopped(tmp_path, mzsre_dir):
    resumable, killed = run_configs(tmp_path, _config(tmp_path, mzsre_dir))
    whole = _fit(resumable, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    reference = tmp_path / "whole" / NAME
    want_ckpt = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True)
    want_deltas = deltas(reference / "version_0" / "deltas")
    assert len(want_deltas) == 6
    model, tok, arch = load_causal_lm(ModelConfig())
    base = model_fingerprint(model, tok, arch)

    first = _fit(killed, tmp_path / "killed", "--trainer.logger.init_args.version", "0")
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    done = torch.load(tmp_path / "killed" / NAME / "checkpoints" / "last.ckpt", weights_only=True)["mke_edit_log"]
    assert [d["record_id"] for d in done] == [d["record_id"] for d in want_ckpt["mke_edit_log"]][:2]
    assert len(list((tmp_path / "killed" / NAME / "version_0" / "deltas").glob("*.safetensors"))) == 3  # edit 3's too

    for same_version in (True, False):
        save_dir = tmp_path / ("same" if same_version else "next")
        shutil.copytree(tmp_path / "killed", save_dir)
        version = ["--trainer.logger.init_args.version", "0"] if same_version else []
        root = save_dir / NAME
        again = _fit(resumable, save_dir, *version, "--ckpt_path", "last")
        assert again.returncode == 0, again.stderr[-3000:]
        log = again.stdout + again.stderr
        assert "the masks of 6 records taken from the checkpoint" in log

        final = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
        loc = final["callbacks"]["NeuronLocalization"]
        assert loc["masks"] == want_ckpt["callbacks"]["NeuronLocalization"]["masks"], same_version
        assert loc["fingerprint"] == base  # located on the model the run began with
        folder = root / "version_0" / "deltas"  # where the run began, whatever version the restart got
        assert_same_deltas(deltas(folder), want_deltas)
        resumed_dir = root / ("version_0" if same_version else "version_1")
        assert same_version or not (resumed_dir / "deltas").exists()
        assert results(resumed_dir) == results(reference / "version_0"), same_version

    # the restarts wrote into their own copies, found through the logger, not into the folder they were copied from
    assert len(list((tmp_path / "killed" / NAME / "version_0" / "deltas").glob("*.safetensors"))) == 3
    undo_edits(load_edits(model, arch, [reference / "version_0" / "deltas"], tokenizer=tok))  # made on this model

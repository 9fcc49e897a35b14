"""The callbacks folder installs as ``mke_lightning.callbacks`` (editable and wheel)."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import mke_lightning.callbacks as callbacks
from conftest import REPO


def test_editable_install_maps_callbacks():
    assert callbacks.NeuronLocalization.__module__ == "mke_lightning.callbacks.localization"
    assert callbacks.EditEvaluation.__module__ == "mke_lightning.callbacks.evaluation"


def test_wheel_contains_callbacks_and_demo_data(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        cwd=tmp_path,
    )
    wheel = next(tmp_path.glob("mke_lightning-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "mke_lightning/callbacks/__init__.py" in names
    assert "mke_lightning/callbacks/localization.py" in names
    assert "mke_lightning/data/demo_edits.jsonl" in names
    assert "mke_lightning/data/anchor_prompts.json" in names
    assert not any(n.startswith("callbacks/") for n in names)  # no bare top-level `callbacks` package
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "mke = mke_lightning.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()

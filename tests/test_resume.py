"""A resumed run is the same run: a sequential run killed (SIGKILL) after edit 3 and resumed from its
checkpoint of edit 2 uses the masks, writes the deltas (bit for bit, into the folder the run began) and
reports the results of a run never stopped, whether it resumes into the same version folder or into the
logger's next one.

The kill comes from ``test_faults.KillAfter`` inside a ``mke fit`` subprocess; the localisation cache is
off, so a resumed run that located its records again would do so on the model holding the kept edits.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest
import torch
import yaml

from conftest import toy_record, write_jsonl
from mke_lightning.editing.export import load_edits, read_deltas, undo_edits
from mke_lightning.editing.neuron_delta import read_delta
from mke_lightning.localization.cache import model_fingerprint
from mke_lightning.modeling.loading import ModelConfig, load_causal_lm
from test_faults import _run_mke

TIMINGS = ("eval_seconds_per_edit_median_rank0", "seconds_rank0")  # the only figures a restart may change


def run_configs(tmp_path: Path, cfg: dict, every_n_edits: int = 2, kill_after: int = 3) -> tuple[Path, Path]:
    """``cfg`` with checkpoints every ``every_n_edits`` edits, as (resumable.yaml, killed.yaml); the second
    also SIGKILLs its process at the end of edit ``kill_after``."""
    cfg = json.loads(json.dumps(cfg))
    cfg["trainer"]["enable_checkpointing"] = True
    cfg["trainer"]["callbacks"].append({"class_path": "mke_lightning.callbacks.EditCheckpoint",
                                        "init_args": {"every_n_edits": every_n_edits}})
    resumable = tmp_path / "resumable.yaml"
    resumable.write_text(yaml.safe_dump(cfg))
    cfg["trainer"]["callbacks"].append({"class_path": "test_faults.KillAfter", "init_args": {"edits": kill_after}})
    killed = tmp_path / "killed.yaml"
    killed.write_text(yaml.safe_dump(cfg))
    return resumable, killed


def fit(config: Path, args: list[str], save_dir: Path, tmp_path: Path, *extra: str):
    return _run_mke(
        ["fit", "--config", str(config), *args, "--trainer.logger.init_args.save_dir", str(save_dir), *extra], tmp_path
    )


def results(folder: Path) -> dict:
    """The result files of a run's version folder, timings left out."""
    doc = json.loads((folder / "results.json").read_text())
    for key in TIMINGS:
        doc.pop(key, None)
    for c in doc.get("retention", {}).get("checkpoints", []):
        c.pop("seconds_rank0", None)
    csvs = [folder / f"{name}.csv" for name in ("edits", "perplexity", "retention")]  # not the logger's metrics.csv
    return {"results.json": doc, **{p.stem: p.read_text() for p in csvs if p.exists()}}


def deltas(folder: Path) -> dict[str, tuple[dict, dict]]:
    """File name -> (metadata, tensors) of every delta in ``folder``."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        delta, meta = read_delta(path)
        out[path.name] = (meta, {l: (idx, values) for l, (idx, values) in delta.layers.items()})
    return out


def assert_same_deltas(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name, (meta, layers) in want.items():
        assert got[name][0] == meta, name
        assert list(got[name][1]) == list(layers), name
        for layer, (idx, values) in layers.items():
            assert torch.equal(got[name][1][layer][0], idx), f"{name} layer {layer}: other neurons"
            assert torch.equal(got[name][1][layer][1], values), f"{name} layer {layer}: other values"


def kill_and_resume(tmp_path: Path, resumable: Path, killed: Path, args: list[str], same_version: bool,
                    run_name: str) -> tuple[Path, Path, str]:
    """Kill a run after edit 3, resume it; (the folder of the run, the resumed run's version folder, its log)."""
    save_dir = tmp_path / "run"
    version = ["--trainer.logger.init_args.version", "0"] if same_version else []
    first = fit(killed, args, save_dir, tmp_path, *version)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    root = save_dir / run_name
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)  # plain data, the masks included
    assert [d["record_id"] for d in ckpt["mke_edit_log"]] == ["r0", "r1"]  # edit 3 was done but not saved
    assert sorted(p.name for p in (root / "version_0" / "deltas").iterdir())[:3] == [
        "000000_r0.safetensors", "000001_r1.safetensors", "000002_r2.safetensors"]  # edit 3's delta is there too
    again = fit(resumable, args, save_dir, tmp_path, *version, "--ckpt_path", "last")
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    resumed_dir = root / ("version_0" if same_version else "version_1")
    assert (resumed_dir / "results.json").is_file()
    return root, resumed_dir, log


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, tiny_llama_dir):
    """A sequential toy run (6 records, save_deltas, the localisation cache off) and the run never stopped."""
    from test_cli import _toy_args

    tmp_path = tmp_path_factory.mktemp("toy")
    data = write_jsonl(tmp_path / "six.jsonl", [toy_record(f"r{i}") for i in range(6)])
    args = _toy_args(tmp_path, tiny_llama_dir)
    cfg = yaml.safe_load((tmp_path / "toy.yaml").read_text())
    cfg["trainer"]["callbacks"][0]["init_args"]["cache"] = False
    # edits that move the model: a run that located its later records on it would find other neurons
    cfg["model"]["optimizer"]["init_args"]["lr"] = 0.05
    cfg["model"]["loss"]["max_steps"] = 8
    resumable, killed = run_configs(tmp_path, cfg)
    assert args[-2] == "--trainer.logger.init_args.save_dir"
    rest = args[3:-2] + ["--data.path", str(data), "--model.protocol", "sequential", "--model.save_deltas", "true"]
    whole = fit(resumable, rest, tmp_path / "whole", tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    return tmp_path, resumable, killed, rest, tmp_path / "whole" / "demo"


@pytest.mark.parametrize("same_version", [True, False], ids=["same-version", "next-version"])
def test_a_killed_sequential_run_resumes_as_the_run_never_stopped(toy_run, same_version, tmp_path, tiny_llama_dir):
    base, resumable, killed, args, whole = toy_run
    root, resumed_dir, log = kill_and_resume(tmp_path, resumable, killed, args, same_version, "demo")
    assert "the masks of 6 records taken from the checkpoint" in log
    assert not re.search(r"localisation: \d+ computed", log)  # nothing located again
    assert re.findall(r"edit (\d+) \((r\d)\)", log) == [("3", "r2"), ("4", "r3"), ("5", "r4"), ("6", "r5")]

    # masks: those of the run never stopped, located on the unedited model
    final = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    reference = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=True)
    loc, want = final["callbacks"]["NeuronLocalization"], reference["callbacks"]["NeuronLocalization"]
    assert loc["masks"] == want["masks"] and len(loc["masks"]) == 6
    model, tok, arch = load_causal_lm(ModelConfig(name_or_path=str(tiny_llama_dir)))
    assert loc["fingerprint"] == want["fingerprint"] == model_fingerprint(model, tok, arch)

    # deltas: every edit once, in the folder the run began, bit for bit those of the run never stopped
    folder = root / "version_0" / "deltas"
    assert_same_deltas(deltas(folder), deltas(whole / "version_0" / "deltas"))
    assert len(list(folder.glob("*.safetensors"))) == 6
    assert not (resumed_dir / "deltas").exists() or same_version
    if not same_version:
        assert f"goes on writing into {folder}" in log
    assert final["mke_delta_dir"]["in_run"] == "version_0/deltas"
    assert all(m["model_fingerprint"] == loc["fingerprint"] for m, _ in deltas(folder).values())
    undo_edits(load_edits(model, arch, [folder], tokenizer=tok))  # the folder passes the export's checks

    # the kept edits in the checkpoint, and the results: those of the run never stopped
    for got, exp in zip(final["mke_applied"], reference["mke_applied"], strict=True):
        assert got["records"] == exp["records"]
        for layer, (idx, values) in exp["layers"].items():
            assert torch.equal(got["layers"][layer][0], idx) and torch.equal(got["layers"][layer][1], values)
    assert results(resumed_dir) == results(whole / "version_0")


def test_the_folders_of_a_run_resumed_before_the_fix_cannot_be_exported_together(toy_run, tmp_path, tiny_llama_dir):
    """The overlap the old behaviour left (the killed run's edit 3 in version_0, the restart's edits 3-6 in
    version_1) is refused, naming both files; the run's own folder passes."""
    _, _, _, _, whole = toy_run
    folder = whole / "version_0" / "deltas"
    late = tmp_path / "version_1" / "deltas"
    late.mkdir(parents=True)
    for item in sorted(folder.glob("*.safetensors"))[2:]:
        (late / item.name).write_bytes(item.read_bytes())
    model, tok, arch = load_causal_lm(ModelConfig(name_or_path=str(tiny_llama_dir)))
    with pytest.raises(
        ValueError, match=r"000002_r2.safetensors: covers record 'r2', which .*000002_r2.safetensors covers too"
    ):
        load_edits(model, arch, [folder, late], tokenizer=tok)
    assert len(read_deltas([folder])) == 6
    undo_edits(load_edits(model, arch, [folder], tokenizer=tok))


def test_a_resume_on_another_model_is_refused(toy_run, tmp_path, tiny_gpt2_dir):
    """The checkpoint's masks were located on the tiny Llama: a restart that loads another model stops, naming it."""
    base, resumable, killed, args, _ = toy_run
    first = fit(killed, args, tmp_path / "run", tmp_path)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    other = list(args)
    other[other.index("--model.lm.name_or_path") + 1] = str(tiny_gpt2_dir)
    again = fit(resumable, other, tmp_path / "run", tmp_path, "--ckpt_path", "last")
    assert again.returncode != 0
    assert "NeuronLocalization: the checkpoint was made for another run: the model: located on model" in again.stderr

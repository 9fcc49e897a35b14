"""Edits as value-vector deltas (merged or on top), 8-bit bases, and the scale overlays."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, toy_record, write_jsonl
from mke_lightning.data import read_mzsre
from mke_lightning.editing.editor import KnowledgeEditor
from mke_lightning.editing.masked_lora import LoRAConfig, attach
from mke_lightning.editing.neuron_delta import NeuronDelta, OnTop, Restore
from mke_lightning.localization.neurons import NeuronMask
from mke_lightning.modeling.loading import ModelConfig, load_causal_lm

OVERLAYS = sorted((REPO / "configs" / "scale").glob("*.yaml"))


def _mask(model, arch) -> NeuronMask:
    """A fixed mask over both layers and both categories."""
    return NeuronMask("toy-1", {"independent": {0: [1, 5, 9]}, "specific": {0: [9, 20], 1: [3, 40]}})


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _trained_handle(model, arch, cfg: LoRAConfig | None = None):
    """Masked adapters after a few optimiser steps towards arbitrary tokens."""
    torch.manual_seed(0)
    handle = attach(model, arch, _mask(model, arch), cfg or LoRAConfig(merge_scale=1.0))
    opt = torch.optim.Adam(handle.parameters(), lr=0.05)
    ids = torch.tensor([[1, 4, 5, 6, 7]])
    for _ in range(5):
        loss = -torch.log_softmax(model(input_ids=ids).logits[0, -1], -1)[8]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return handle


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gpt2_dir"])
def test_on_top_equals_merged_and_both_undo_exactly(fixture, request):
    model, tok, arch = load_causal_lm(ModelConfig(name_or_path=str(request.getfixturevalue(fixture))))
    ids = torch.tensor([[1, 4, 5, 6, 7, 8, 9]])
    before_logits = _logits(model, ids)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}

    delta = _trained_handle(model, arch).to_delta()
    assert delta.count() == 4 + 2  # the union of the mask per layer: {1, 5, 9, 20} and {3, 40}
    assert all(
        v.shape == (idx.numel(), model.config.hidden_size if fixture == "tiny_llama_dir" else model.config.n_embd)
        for idx, v in delta.layers.values()
    )

    restore = delta.merge_into(model, arch)
    merged = _logits(model, ids)
    assert not torch.allclose(merged, before_logits)  # the edit does something
    restore()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_state[k]), k

    hooks = delta.apply_on_top(model, arch)
    on_top = _logits(model, ids)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_state[k]), f"{k} changed by an on-top edit"
    assert (on_top - merged).abs().max() < 1e-5
    hooks()
    assert torch.equal(_logits(model, ids), before_logits)


def test_delta_save_and_load_reproduce_the_edited_logits(tiny_llama_dir, tmp_path):
    model, tok, arch = load_causal_lm(ModelConfig(name_or_path=str(tiny_llama_dir)))
    ids = torch.tensor([[1, 4, 5, 6, 7]])
    delta = _trained_handle(model, arch).to_delta()
    restore = delta.merge_into(model, arch)
    edited = _logits(model, ids)
    restore()

    delta.save(tmp_path / "edit.safetensors", {"record_id": "toy-1"})
    loaded = NeuronDelta.load(tmp_path / "edit.safetensors")
    assert sorted(loaded.layers) == sorted(delta.layers)
    restore = loaded.merge_into(model, arch)
    assert (_logits(model, ids) - edited).abs().max() < 1e-5
    restore()
    hooks = loaded.apply_on_top(model, arch)
    assert (_logits(model, ids) - edited).abs().max() < 1e-5
    hooks()


def test_apply_modes_are_validated_and_merge_refuses_int8(tiny_llama_dir):
    with pytest.raises(ValueError, match="lora.apply"):
        LoRAConfig(apply="fold")
    model, tok, arch = load_causal_lm(ModelConfig(name_or_path=str(tiny_llama_dir), load_in_8bit=True))
    delta = NeuronDelta({0: (torch.tensor([1, 2]), torch.ones(2, model.config.hidden_size))})
    with pytest.raises(ValueError, match="cannot be written in place"):
        delta.merge_into(model, arch)


def test_int8_base_takes_the_edit_on_top_and_keeps_its_weights(tiny_llama_dir):
    model, tok, arch = load_causal_lm(ModelConfig(name_or_path=str(tiny_llama_dir), load_in_8bit=True))
    proj = model.get_submodule(arch.mlp_out_name(0))
    assert proj.weight.dtype == torch.int8
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[1, 4, 5, 6, 7]])
    base = _logits(model, ids)

    undo = _trained_handle(model, arch).finish()  # lora.apply auto
    assert isinstance(undo, OnTop)
    assert not torch.allclose(_logits(model, ids), base)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed in an int8 model"
    undo()
    assert torch.equal(_logits(model, ids), base)


def test_float_base_merges_under_auto(tiny_llama_dir):
    model, tok, arch = load_causal_lm(ModelConfig(name_or_path=str(tiny_llama_dir)))
    assert isinstance(_trained_handle(model, arch).finish(), Restore)
    model, tok, arch = load_causal_lm(ModelConfig(name_or_path=str(tiny_llama_dir)))
    assert isinstance(_trained_handle(model, arch, LoRAConfig(apply="on_top")).finish(), OnTop)


def test_random_init_builds_the_architecture_without_weights(tiny_llama_dir, tmp_path):
    import shutil

    folder = tmp_path / "config-only"
    folder.mkdir()
    for f in tiny_llama_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, folder)
    model, tok, arch = load_causal_lm(ModelConfig(name_or_path=str(folder), random_init=True, dtype="bfloat16"))
    assert model.config.num_hidden_layers == 2
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="exclude each other"):
        ModelConfig(load_in_8bit=True, random_init=True)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.stem)
def test_scale_overlays_parse_onto_the_demo_and_build_their_strategy(overlay, tmp_path):
    from mke_lightning.cli import MKECLI
    from mke_lightning.data import EditDataModule
    from mke_lightning.modeling.strategies import EditingDeepSpeedStrategy

    args = ["--config", str(REPO / "configs" / "demo.yaml"), "--config", str(overlay),
            "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path)]
    cli = MKECLI(KnowledgeEditor, EditDataModule, args=args, run=False)
    lm = cli.model.lm_config
    strategy = cli.trainer.strategy
    if overlay.stem.startswith("zero"):
        assert isinstance(strategy, EditingDeepSpeedStrategy)
        assert strategy.config["zero_optimization"]["stage"] == int(overlay.stem[-1])
        assert strategy.zero_stage_3 == (overlay.stem == "zero3")
    if overlay.stem == "int8":
        assert lm.load_in_8bit
    else:
        assert cli.trainer.precision == "bf16-true" and lm.dtype == "bfloat16"
    # the overlay changes only what it names: the demo's data and localisation stay
    assert cli.datamodule.eval_languages == ["en", "de", "fr", "es", "ru", "zh"]
    assert cli.model.lm_config.name_or_path == "gemma-3-270m"


@pytest.mark.real_model
def test_real_model_int8_edit_moves_reliability(real_model, mzsre_dir):
    from mke_lightning.evaluation.evaluator import EditEvaluator, build_items
    from mke_lightning.localization.attribution import AttributionConfig
    from mke_lightning.localization.locate import LocalizationConfig, locate

    model, tok, arch = load_causal_lm(ModelConfig(load_in_8bit=True))
    record = read_mzsre(mzsre_dir, ["en", "zh", "fr"])[0]
    ed = KnowledgeEditor(lora=LoRAConfig(merge_scale=1.0), optimizer=lambda p: torch.optim.Adam(p, lr=5e-3))
    ed.causal_lm, ed.tokenizer, ed.arch = model, tok, arch
    mask = locate(
        model, tok, arch, record, "en", LocalizationConfig(attribution=AttributionConfig(method="grad_x_act"))
    )
    assert mask.count() > 0
    ev = EditEvaluator(tok)
    items = build_items(record, ["en"])
    refs = ev.references(model, items)
    pre = {r["measure"]: r for r in ev.score(model, items, refs)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ed.edit(record, mask)
    assert isinstance(ed._restore, OnTop)
    post = {r["measure"]: r for r in ev.score(model, items, refs)}
    ed.restore()
    again = {r["measure"]: r for r in ev.score(model, items, refs)}

    assert pre["reliability"]["token_acc"] < 0.5
    assert post["reliability"]["token_acc"] >= 0.9
    assert again["reliability"]["token_acc"] == pre["reliability"]["token_acc"]
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), f"{k} changed in an int8 model"


needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (DeepSpeed, bitsandbytes CUDA, bf16)"
)


@needs_cuda
@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.stem)
def test_demo_shape_run_on_gpu_under_each_overlay(overlay, tmp_path, tiny_llama_dir):
    """A toy fit through each overlay, in its own process (DeepSpeed starts torch.distributed)."""
    from test_cli import _toy_args

    args = _toy_args(tmp_path, tiny_llama_dir) + ["--config", str(overlay), "--trainer.accelerator", "gpu"]
    code = "import sys; from mke_lightning.cli import cli_main; cli_main(sys.argv[1:])"
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=dict(os.environ, MKE_CACHE_DIR=str(tmp_path / "cache")), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next((tmp_path / "runs").rglob("results.json")).read_text())
    assert results["model_state"] == "edited"
    assert set(results["results"]["language"]) == {"en", "fr", "de"}


def test_ddp_editing_on_two_cpu_processes_edits_every_record_once(tmp_path, tiny_llama_dir):
    """5 records on 2 ranks (3 + 2: one rank gets a padding batch); every record is edited exactly once."""
    from test_cli import _toy_args

    data = write_jsonl(tmp_path / "five.jsonl", [toy_record(f"r{i}") for i in range(5)])
    args = _toy_args(tmp_path, tiny_llama_dir) + [
        "--data.path",
        str(data),
        "--trainer.strategy",
        "ddp_editing",
        "--trainer.devices",
        "2",
        "--loss.max_steps",
        "3",
    ]
    args = [a if a != "--loss.max_steps" else "--model.loss.max_steps" for a in args]
    mke = Path(sys.executable).parent / "mke"  # Lightning re-launches rank 1 with this process's argv
    proc = subprocess.run([str(mke), *args], capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, MKE_CACHE_DIR=str(tmp_path / "cache")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = next((tmp_path / "runs").rglob("results.json")).parent
    logs = sorted(run.glob("edit_log.rank*.jsonl"))
    assert [p.name for p in logs] == ["edit_log.rank0.jsonl", "edit_log.rank1.jsonl"]
    edited = [json.loads(l)["record_id"] for p in logs for l in p.read_text().splitlines()]
    assert sorted(edited) == [f"r{i}" for i in range(5)]
    assert json.loads((run / "results.json").read_text())["records"] == 5

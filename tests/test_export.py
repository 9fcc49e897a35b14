"""Saved edits read back: onto a fresh base model (merged, on top), in order from a folder, and exported merged."""

from __future__ import annotations

import json
import logging
import shutil
import sys

import pytest
import torch
from safetensors.torch import save_file

from conftest import two_fact_records
from mke_lightning.cli import main
from mke_lightning.editing.editor import EditLossConfig, KnowledgeEditor
from mke_lightning.editing.export import EDITS_FILE, export_main, export_merged, load_edits, read_deltas, undo_edits
from mke_lightning.editing.masked_lora import LoRAConfig
from mke_lightning.editing.neuron_delta import NeuronDelta, NotADeltaError, OnTop, Restore
from mke_lightning.localization.cache import model_fingerprint
from mke_lightning.localization.neurons import NeuronMask
from mke_lightning.modeling.loading import ModelConfig, load_causal_lm

MASKS = {
    "a": NeuronMask("a", {"independent": {0: [1, 5]}, "specific": {1: [3, 7]}}),
    "b": NeuronMask("b", {"independent": {0: [5, 9]}, "specific": {1: [20]}}),
}
IDS = torch.tensor([[1, 4, 5, 6, 7]])  # [1, T]


def _editor(model_dir, protocol: str, delta_dir) -> KnowledgeEditor:
    """An editor without a Trainer that saves its deltas into ``delta_dir``."""
    ed = KnowledgeEditor(lm=ModelConfig(name_or_path=str(model_dir)), protocol=protocol, save_deltas=True,
                         lora=LoRAConfig(merge_scale=1.0), loss=EditLossConfig(max_steps=20),
                         optimizer=lambda p: torch.optim.Adam(p, lr=0.05))
    ed.configure_model()
    ed._delta_dir = delta_dir  # under a Trainer, on_fit_start sets it to <log dir>/deltas
    ed._base_fingerprint = model_fingerprint(ed.causal_lm, ed.tokenizer, ed.arch)  # ... and this, before any edit
    return ed


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()  # [1, T, V]


def _base(model_dir):
    return load_causal_lm(ModelConfig(name_or_path=str(model_dir)))


@pytest.fixture(scope="module")
def sequential_run(tiny_llama_dir, tmp_path_factory):
    """Two sequential edits saved as deltas: (delta folder, edited logits, the editor's kept edits' ids)."""
    folder = tmp_path_factory.mktemp("seq") / "deltas"
    ed = _editor(tiny_llama_dir, "sequential", folder)
    a, b = two_fact_records()
    assert ed.edit(a, MASKS["a"]).failed is None
    assert ed.edit(b, MASKS["b"]).failed is None
    return folder, _logits(ed.causal_lm), [ids for ids, _ in ed.applied]


def test_a_saved_edit_loaded_onto_a_fresh_base_reproduces_the_edited_logits(tiny_llama_dir, tmp_path):
    ed = _editor(tiny_llama_dir, "single", tmp_path / "deltas")
    base = _logits(ed.causal_lm)
    assert ed.edit(two_fact_records()[0], MASKS["a"]).failed is None
    edited = _logits(ed.causal_lm)
    assert (edited - base).abs().max() > 1e-3  # the edit changed something
    ed.restore()
    path = tmp_path / "deltas" / "a.safetensors"
    assert sorted(p.name for p in (tmp_path / "deltas").iterdir()) == [path.name]
    [(read_path, _, meta)] = read_deltas([path])
    assert read_path == path
    model, tok, arch = _base(tiny_llama_dir)
    assert meta == {"records": ["a"], "method": "memla", "protocol": "single", "model": str(tiny_llama_dir),
                    "edit_language": "en", "dtype": "float32", "load_in_8bit": False,
                    "model_fingerprint": model_fingerprint(model, tok, arch)}

    before = {k: v.clone() for k, v in model.state_dict().items()}
    for mode, kind in (("merge", Restore), ("on_top", OnTop), ("auto", Restore)):
        handles = load_edits(model, arch, [path], mode, tokenizer=tok)
        assert [type(h) for h in handles] == [kind]
        assert (_logits(model) - edited).abs().max() < 1e-5, mode
        undo_edits(handles)
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), f"{mode}: {k} not restored"


def test_sequential_deltas_from_a_folder_apply_in_order(sequential_run, tiny_llama_dir):
    folder, edited, applied = sequential_run
    items = read_deltas([folder])
    assert [p.name for p, _, _ in items] == ["000000_a.safetensors", "000001_b.safetensors"]
    assert [m["records"] for _, _, m in items] == applied == [["a"], ["b"]]
    assert all(m["protocol"] == "sequential" for _, _, m in items)
    for mode in ("merge", "on_top"):
        model, tok, arch = _base(tiny_llama_dir)
        load_edits(model, arch, [folder], mode, tokenizer=tok)
        assert (_logits(model) - edited).abs().max() < 1e-5, mode


def test_merged_export_loads_with_plain_transformers(sequential_run, tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, edited, _ = sequential_run
    out = export_merged(ModelConfig(name_or_path=str(tiny_llama_dir)), [folder], tmp_path / "merged")
    assert (out / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float32
    assert (_logits(model) - edited).abs().max() < 1e-5
    tok = AutoTokenizer.from_pretrained(out)
    assert (
        tok("the tower is located in")["input_ids"]
        == AutoTokenizer.from_pretrained(tiny_llama_dir)("the tower is located in")["input_ids"]
    )
    doc = json.loads((out / EDITS_FILE).read_text())
    assert [e["file"] for e in doc["edits"]] == [str(p.resolve()) for p in sorted(folder.iterdir())]
    assert [e["metadata"]["records"] for e in doc["edits"]] == [["a"], ["b"]]
    assert doc["base_model"] == str(tiny_llama_dir) and doc["dtype"] == "float32"
    export_merged(ModelConfig(name_or_path=str(tiny_llama_dir)), [folder], out)  # an earlier export is overwritten


def test_mke_export_command_writes_the_folder(sequential_run, tiny_llama_dir, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    folder, edited, _ = sequential_run
    out = tmp_path / "exported"
    monkeypatch.setattr(sys, "argv", ["mke", "export", "--model", str(tiny_llama_dir), "--deltas", str(folder),
                                      "--output", str(out), "--dtype", "bfloat16"])
    main()
    assert "merged 2 edit(s)" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    assert (_logits(model) - edited).abs().max() < 0.1  # bf16 weights: rounding only
    assert json.loads((out / EDITS_FILE).read_text())["dtype"] == "bfloat16"


def test_export_warns_about_another_model_and_stacked_single_edits(tiny_llama_dir, tmp_path, caplog):
    folder = tmp_path / "deltas"
    folder.mkdir()
    delta = NeuronDelta({0: (torch.tensor([1, 2]), torch.full((2, 32), 0.01))})  # [n], [n, d_model]
    delta.save(folder / "x.safetensors", {"records": ["x"], "protocol": "single", "model": "some/other-model"})
    delta.save(folder / "y.safetensors", {"records": ["y"], "protocol": "single", "model": str(tiny_llama_dir)})
    with caplog.at_level(logging.WARNING, logger="mke_lightning.editing.export"):
        export_merged(ModelConfig(name_or_path=str(tiny_llama_dir)), [folder / "x.safetensors"], tmp_path / "out")
    assert "x.safetensors: made on model 'some/other-model'" in caplog.text and "stacked" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mke_lightning.editing.export"):
        export_merged(ModelConfig(name_or_path=str(tiny_llama_dir)), [folder], tmp_path / "out")
    assert "applying 2 edits together" in caplog.text and "x.safetensors, y.safetensors" in caplog.text


def _bad_files(tmp_path):
    """(path, what the error says besides the file name) for files that are not deltas."""
    idx, values = torch.tensor([1, 2]), torch.zeros(2, 32)
    cases = {
        "weights.safetensors": ({"weight": torch.zeros(2, 2)}, {}, "not part of a delta"),
        "half.safetensors": ({"0.index": idx}, {"mke": "{}"}, "no '0.values' tensor"),
        "shape.safetensors": ({"0.index": idx, "0.values": torch.zeros(3, 32)}, {"mke": "{}"}, "expected floats"),
        "bare.safetensors": ({"0.index": idx, "0.values": values}, None, "no 'mke' metadata"),
        "json.safetensors": ({"0.index": idx, "0.values": values}, {"mke": "{oops"}, "not JSON"),
        "list.safetensors": ({"0.index": idx, "0.values": values}, {"mke": "[1]"}, "expected an object"),
    }
    out = []
    for name, (tensors, meta, says) in cases.items():
        save_file(tensors, str(tmp_path / name), metadata=meta)
        out.append((tmp_path / name, says))
    (tmp_path / "notes.safetensors").write_text("not a safetensors file at all")
    out.append((tmp_path / "notes.safetensors", "not a safetensors file"))
    return out


def test_files_that_are_not_deltas_are_named_in_the_error(tmp_path, tiny_llama_dir, capsys):
    for path, says in _bad_files(tmp_path):
        with pytest.raises(NotADeltaError, match=says) as err:
            read_deltas([path])
        assert str(path) in str(err.value)
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        read_deltas([tmp_path / "nowhere.safetensors"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: the folder holds no"):
        read_deltas([tmp_path / "empty"])

    model, _, arch = _base(tiny_llama_dir)
    NeuronDelta({5: (torch.tensor([1]), torch.zeros(1, 32))}).save(tmp_path / "far.safetensors", {})
    with pytest.raises(ValueError, match=r"far.safetensors: layer 5 is not in the model"):
        load_edits(model, arch, [tmp_path / "far.safetensors"])
    NeuronDelta({0: (torch.tensor([1]), torch.zeros(1, 48))}).save(tmp_path / "wide.safetensors", {})
    with pytest.raises(ValueError, match=r"wide.safetensors: layer 0: value vectors have width 48"):
        load_edits(model, arch, [tmp_path / "wide.safetensors"])

    with pytest.raises(SystemExit):
        export_main(["--model", str(tiny_llama_dir), "--deltas", str(tmp_path / "weights.safetensors"),
                     "--output", str(tmp_path / "never")])
    assert "weights.safetensors" in capsys.readouterr().err and not (tmp_path / "never").exists()
    with pytest.raises(ValueError, match="never loads int8"):
        export_merged(
            ModelConfig(name_or_path=str(tiny_llama_dir), load_in_8bit=True),
            [tmp_path / "far.safetensors"],
            tmp_path / "x",
        )


def test_deltas_covering_a_record_twice_are_refused_naming_both_files(sequential_run, tiny_llama_dir, tmp_path, capsys):
    folder, _, _ = sequential_run
    # the folder a killed run's restart wrote before restarts went on writing into the first one: edit 2 again
    other = tmp_path / "version_1" / "deltas"
    other.mkdir(parents=True)
    shutil.copy(folder / "000001_b.safetensors", other / "000001_b.safetensors")
    model, tok, arch = _base(tiny_llama_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="covers record 'b'") as err:
        load_edits(model, arch, [folder, other], tokenizer=tok)
    says = str(err.value)
    assert str(other / "000001_b.safetensors") in says and str(folder / "000001_b.safetensors") in says
    assert "edit twice" in says
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing applied
    with pytest.raises(SystemExit):
        export_main(
            ["--model", str(tiny_llama_dir), "--deltas", str(folder), str(other), "--output", str(tmp_path / "never")]
        )
    assert "covers record 'b'" in capsys.readouterr().err and not (tmp_path / "never").exists()


def _other_model(tiny_llama_dir, tmp_path):
    """The tiny model with one weight moved, saved as its own folder: another model of the same shapes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 0.5
    folder = tmp_path / "other-model"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(folder)
    return folder


def test_deltas_made_on_another_model_are_refused_unless_allowed(sequential_run, tiny_llama_dir, tmp_path, capsys):
    folder, edited, _ = sequential_run
    other_dir = _other_model(tiny_llama_dir, tmp_path)
    model, tok, arch = load_causal_lm(ModelConfig(name_or_path=str(other_dir)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="000000_a.safetensors: made on another model") as err:
        load_edits(model, arch, [folder], tokenizer=tok)
    assert "allow_other_model=True" in str(err.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="pass tokenizer="):
        load_edits(model, arch, [folder])  # nothing to compute the model's fingerprint with
    handles = load_edits(model, arch, [folder], allow_other_model=True)  # told otherwise: applied
    assert len(handles) == 2
    undo_edits(handles)

    with pytest.raises(ValueError, match="000000_a.safetensors: made on another model"):
        export_merged(ModelConfig(name_or_path=str(other_dir)), [folder], tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    with pytest.raises(SystemExit):
        export_main(["--model", str(other_dir), "--deltas", str(folder), "--output", str(tmp_path / "never")])
    err = capsys.readouterr().err
    assert "000000_a.safetensors: made on another model" in err and "--allow-other-model" in err
    out = export_main(["--model", str(other_dir), "--deltas", str(folder), "--output", str(tmp_path / "allowed"),
                       "--allow-other-model"])
    assert len(json.loads((out / EDITS_FILE).read_text())["edits"]) == 2
    # the right model passes, whatever name it is given by
    export_merged(ModelConfig(name_or_path=str(tiny_llama_dir)), [folder], tmp_path / "right")


def test_a_delta_is_checked_against_the_model_loaded_as_its_run_loaded_it(tiny_llama_dir, tmp_path):
    model, tok, arch = load_causal_lm(ModelConfig(name_or_path=str(tiny_llama_dir), dtype="bfloat16"))
    delta = NeuronDelta({0: (torch.tensor([1, 2]), torch.full((2, 32), 0.01))})  # [n], [n, d_model]
    path = tmp_path / "bf16.safetensors"
    delta.save(path, {"records": ["x"], "protocol": "single", "model": str(tiny_llama_dir), "dtype": "bfloat16",
                      "load_in_8bit": False, "model_fingerprint": model_fingerprint(model, tok, arch)})
    undo_edits(load_edits(model, arch, [path], tokenizer=tok))  # the same model, loaded as the run did
    fp32, tok32, arch32 = _base(tiny_llama_dir)
    with pytest.raises(ValueError, match="loaded as bfloat16.*loaded as float32"):
        load_edits(fp32, arch32, [path], tokenizer=tok32)
    # the export merges in float32 and loads the base once more as the run did, for the check
    out = export_merged(ModelConfig(name_or_path=str(tiny_llama_dir)), [path], tmp_path / "merged")
    assert (out / "model.safetensors").is_file()


def test_the_model_fingerprint_is_exact_and_does_not_depend_on_threads(tiny_llama_dir):
    model, tok, arch = _base(tiny_llama_dir)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = model_fingerprint(model, tok, arch)
        torch.set_num_threads(max(2, threads))
        assert model_fingerprint(model, tok, arch) == one
    finally:
        torch.set_num_threads(threads)
    w = model.model.layers[1].mlp.down_proj.weight  # [d_model, d_ff]
    with torch.no_grad():
        w[5, 7] = torch.nextafter(w[5, 7], torch.tensor(1.0))  # one value, by one unit in the last place
    assert model_fingerprint(model, tok, arch) != one

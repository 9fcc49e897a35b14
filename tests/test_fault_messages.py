"""Each fault a user can make ends in one message that names its cause (the file, record, field or
setting) and what to do, never in a bare traceback from deep inside a library."""

from __future__ import annotations

import json
import re
import sys
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml

from conftest import REPO, toy_record, write_jsonl
from mke_lightning.data import read_jsonl, read_mquake, read_mzsre
from mke_lightning.data.records import RecordError
from mke_lightning.editing.editor import KnowledgeEditor
from mke_lightning.localization.neurons import NeuronMask
from mke_lightning.modeling.loading import ModelConfig, load_causal_lm


def mzsre_item(i: int) -> dict:
    """One record of an MzsRE pair file (English and German blocks)."""
    block = {"subject": f"subject {i}", "src": f"where is subject {i}?", "rephrase": f"subject {i} is where?",
             "alt": "Rome", "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare"}
    return {"en": dict(block), "de": dict(block, src=f"wo ist Subjekt {i}?")}


# ------------------------------------------------------------- bad bytes in a JSON list


@pytest.mark.parametrize("chunk", [None, 64])  # one read, and a file read in many small pieces
def test_invalid_utf8_in_a_json_list_names_its_byte_offset_and_record(tmp_path, monkeypatch, chunk):
    if chunk:
        monkeypatch.setattr("mke_lightning.data.spans.CHUNK", chunk)
    text = json.dumps([mzsre_item(i) for i in range(6)], ensure_ascii=False, indent=2).encode("utf-8")
    offset = text.index(b"subject 4")  # inside record #4, far past the first chunk
    damaged = text[:offset] + b"\xff" + text[offset + 1:]
    path = tmp_path / "mzsre_test_duplicate_ende.json"
    path.write_bytes(damaged)
    with pytest.raises(RecordError) as err:
        read_mzsre(path)
    message = str(err.value)
    assert str(path) in message
    assert f"byte offset {offset} " in message and "near byte 0" not in message
    assert err.value.index == 4 and "record #4" in message
    assert err.value.line == text[:offset].count(b"\n") + 1
    assert "UTF-8" in message and "byte ff" in message


def test_invalid_utf8_in_a_jsonl_line_names_the_offset_in_the_file(tmp_path):
    lines = [json.dumps(toy_record(f"r{i}")).encode() for i in range(3)]
    start = len(lines[0]) + 1 + len(lines[1]) + 1
    lines[2] = lines[2][:10] + b"\xc3(" + lines[2][12:]
    path = tmp_path / "edits.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(RecordError) as err:
        read_jsonl(path)
    assert err.value.index == 2 and err.value.line == 3
    assert f"byte offset {start + 10} " in str(err.value) and str(path) in str(err.value)


# ------------------------------------------------------------- ids of the wrong type


@pytest.mark.parametrize("value, named", [(1.5, "the number 1.5"), (True, "true"), (None, "null"),
                                          ({"a": 1}, "an object"), ([1], "a list")])
def test_an_id_of_the_wrong_type_is_named_as_such(tmp_path, value, named):
    record = toy_record()
    record["id"] = value
    path = write_jsonl(tmp_path / "edits.jsonl", [toy_record("ok"), record])
    with pytest.raises(RecordError) as err:
        read_jsonl(path)
    message = str(err.value)
    assert err.value.field == "id" and err.value.index == 1 and str(path) in message
    assert f"must be a string or an integer, got {named}" in message
    assert "missing" not in message


@pytest.mark.parametrize("value, said", [("absent", "is missing"), ("", "is empty"), ("  ", "is empty")])
def test_a_missing_or_empty_id_is_still_called_so(tmp_path, value, said):
    record = toy_record()
    if value == "absent":
        del record["id"]
    else:
        record["id"] = value
    with pytest.raises(RecordError, match=said):
        read_jsonl(write_jsonl(tmp_path / "edits.jsonl", [record]))


def test_a_benchmark_id_field_of_the_wrong_type_is_named(tmp_path):
    case = {"case_id": 2.5, "requested_rewrite": [], "questions": [], "new_answer": "x"}
    path = tmp_path / "MQuAKE-hard.json"
    path.write_text(json.dumps([case]))
    with pytest.raises(RecordError) as err:
        read_mquake(path)
    assert err.value.field == "case_id" and "got the number 2.5" in str(err.value)


# ------------------------------------------------------------- the command line


def _mke(monkeypatch, capsys, args: list[str]) -> tuple[int, str]:
    """Run ``mke ARGS`` in-process through its console entry point: (exit status, stderr)."""
    from mke_lightning.cli import main

    monkeypatch.setattr(sys, "argv", ["mke", *args])
    with pytest.raises(SystemExit) as stop:
        main()
    return stop.value.code, capsys.readouterr().err


def _checkpointed_args(tmp_path, model_dir, monkeypatch) -> list[str]:
    """The toy run with the EditCheckpoint callback, its mask cache under ``tmp_path``."""
    from test_cli import _toy_args

    monkeypatch.setenv("MKE_CACHE_DIR", str(tmp_path / "cache"))
    args = _toy_args(tmp_path, model_dir)
    cfg = yaml.safe_load((tmp_path / "toy.yaml").read_text())
    cfg["trainer"]["enable_checkpointing"] = True
    cfg["trainer"]["callbacks"].append(
        {"class_path": "mke_lightning.callbacks.EditCheckpoint", "init_args": {"every_n_edits": 1}}
    )
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(cfg))
    return args


def test_ckpt_path_last_without_a_checkpoint_says_so_and_fails(tmp_path, tiny_llama_dir, monkeypatch, capsys):
    args = _checkpointed_args(tmp_path, tiny_llama_dir, monkeypatch)
    code, err = _mke(monkeypatch, capsys, [*args, "--ckpt_path", "last"])
    assert code == 1
    assert "--ckpt_path last: there is no checkpoint to resume from" in err
    assert str(tmp_path / "runs" / "demo" / "checkpoints") in err  # where it looked
    assert "Leave out --ckpt_path to start afresh" in err
    assert not (tmp_path / "cache").exists()  # refused before any localisation


@pytest.mark.parametrize("damage", ["truncated", "flipped byte"])
def test_a_damaged_last_ckpt_is_named_before_anything_runs(tmp_path, tiny_llama_dir, monkeypatch, capsys, damage):
    args = _checkpointed_args(tmp_path, tiny_llama_dir, monkeypatch)
    ckpt = tmp_path / "runs" / "demo" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"mke_edit_log": [{"record_id": "t1"}], "state": torch.arange(4096)}, ckpt)
    data = bytearray(ckpt.read_bytes())
    if damage == "truncated":
        data = data[: len(data) - 100]  # a copy or a disk that stopped short: torch says "OSError: [Errno 22]"
    else:
        data[len(data) // 3] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    code, err = _mke(monkeypatch, capsys, [*args, "--ckpt_path", "last"])
    assert code == 1
    assert f"checkpoint {ckpt} is damaged" in err
    assert ("cut short" if damage == "truncated" else "fails its checksum") in err
    assert "Errno 22" not in err and "Traceback" not in err
    assert not (tmp_path / "cache").exists()


def test_a_whole_checkpoint_passes_the_check(tmp_path):
    from mke_lightning.callbacks.checkpoint import checkpoint_problem

    torch.save({"a": torch.zeros(10)}, tmp_path / "ok.ckpt")
    assert checkpoint_problem(tmp_path / "ok.ckpt") is None
    (tmp_path / "empty.ckpt").write_bytes(b"")
    assert "empty" in checkpoint_problem(tmp_path / "empty.ckpt")


def test_a_negative_learning_rate_is_refused_before_localisation(tmp_path, tiny_llama_dir, monkeypatch, capsys):
    from test_cli import _toy_args

    monkeypatch.setenv("MKE_CACHE_DIR", str(tmp_path / "cache"))
    code, err = _mke(
        monkeypatch, capsys, [*_toy_args(tmp_path, tiny_llama_dir), "--model.optimizer.init_args.lr", "-0.001"]
    )
    assert code == 1
    assert "model.optimizer" in err and "-0.001" in err and "init_args.lr" in err
    assert not (tmp_path / "cache").exists()  # no neuron was located
    assert not list((tmp_path / "runs").rglob("edit_log.jsonl"))


def test_errors_print_one_clear_line_unless_the_traceback_is_asked_for(tmp_path, monkeypatch, capsys):
    from mke_lightning.data.records import RecordError

    bad = write_jsonl(tmp_path / "edits.jsonl", [dict(toy_record(), id=1.5)])
    args = ["validate", "--config", str(REPO / "configs" / "demo.yaml"), "--data.format", "jsonl",
            "--data.path", str(bad), "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]
    monkeypatch.delenv("MKE_TRACEBACK", raising=False)
    code, err = _mke(monkeypatch, capsys, args)
    assert code == 1
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.startswith("mke: error:")]
    assert len(lines) == 1 and "field 'id': must be a string or an integer, got the number 1.5" in lines[0]
    assert "MKE_TRACEBACK=1" in err

    monkeypatch.setenv("MKE_TRACEBACK", "1")
    from mke_lightning.cli import main

    monkeypatch.setattr(sys, "argv", ["mke", *args])
    with pytest.raises(RecordError, match="got the number 1.5"):
        main()


def test_an_unexpected_error_is_named_by_its_type(monkeypatch, capsys):
    import mke_lightning.cli as cli

    def boom():
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(cli, "_main", boom)
    monkeypatch.delenv("MKE_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as stop:
        cli.main()
    assert stop.value.code == 1
    assert "mke: error: RuntimeError: CUDA out of memory" in capsys.readouterr().err


# ------------------------------------------------------------- prompts longer than the context


def _long_record(rid: str = "long") -> dict:
    record = toy_record(rid)
    record["languages"]["de"]["paraphrases"] = ["der turm ist " * 30]  # 90 words: past the tiny models' 64 positions
    return record


@pytest.mark.parametrize("model_fixture", ["tiny_gpt2_dir", "tiny_llama_dir"])
def test_a_prompt_longer_than_the_context_names_record_language_and_field(tmp_path, request, model_fixture):
    from mke_lightning.data import EditDataModule

    model, tok, arch = load_causal_lm(ModelConfig(name_or_path=str(request.getfixturevalue(model_fixture))))
    path = write_jsonl(tmp_path / "edits.jsonl", [toy_record("short"), _long_record()])
    dm = EditDataModule(path=str(path), format="jsonl", eval_languages=["en", "fr", "de"])
    dm.connect(SimpleNamespace(causal_lm=model, tokenizer=tok))
    dm.setup("fit")
    with pytest.raises(RecordError) as err:
        _ = dm.records
    e = err.value
    assert (e.source, e.index, e.record_id, e.field) == (str(path), 1, "long", "languages.de.paraphrases[0]")
    # (GPT-2's config answers max_position_embeddings with its n_positions)
    assert "more than the model's context of 64 (config.max_position_embeddings" in str(e)

    # a record that fits passes; a language the run does not read is not checked
    dm = EditDataModule(path=str(path), format="jsonl", eval_languages=["en", "fr"])
    dm.connect(SimpleNamespace(causal_lm=model, tokenizer=tok))
    assert [r.id for r in dm.records] == ["short", "long"]


def test_a_too_long_prompt_stops_the_run_before_localisation(tmp_path, tiny_gpt2_dir, monkeypatch, capsys):
    from test_cli import _toy_args

    monkeypatch.setenv("MKE_CACHE_DIR", str(tmp_path / "cache"))
    args = _toy_args(tmp_path, tiny_gpt2_dir)
    args[args.index("--data.path") + 1] = str(write_jsonl(tmp_path / "long.jsonl", [toy_record("t1"), _long_record()]))
    code, err = _mke(monkeypatch, capsys, args)
    assert code == 1
    assert "record #1, id 'long', field 'languages.de.paraphrases[0]'" in err and "IndexError" not in err
    assert not (tmp_path / "cache").exists()


# ------------------------------------------------------------- neuron masks the model does not have


@pytest.mark.parametrize("where", [{"independent": {7: [1]}}, {"specific": {1: [64]}}])
def test_a_mask_file_with_an_out_of_range_neuron_is_refused_when_loaded(tmp_path, tiny_llama_dir, where):
    from mke_lightning.localization.neurons import MaskError, model_bounds

    model, _, arch = load_causal_lm(ModelConfig(name_or_path=str(tiny_llama_dir)))  # 2 layers of 64 neurons
    path = NeuronMask("r1", {"independent": {0: [1, 2]}, **where}).save(tmp_path / "r1.safetensors")
    assert NeuronMask.load(path).source == str(path)  # without bounds: read as it is
    with pytest.raises(MaskError) as err:
        NeuronMask.load(path, bounds=model_bounds(model, arch))
    layer, idx = next(iter(next(iter(where.values())).items()))
    assert str(path) in str(err.value) and f"layer {layer}, neuron {idx[0]}" in str(err.value)
    assert "2 layers of 64 MLP neurons" in str(err.value) and "delete the file" in str(err.value)


def test_a_negative_index_in_a_mask_file_is_refused_naming_the_file(tmp_path):
    from safetensors.torch import save_file

    from mke_lightning.localization.neurons import MaskError

    path = NeuronMask("r1", {"independent": {0: [1]}}).save(tmp_path / "r1.safetensors")
    header = json.dumps({"format_version": 1, "record_id": "r1"})
    save_file({"independent": torch.tensor([[0, -3]], dtype=torch.int32)}, str(path), metadata={"mke": header})
    with pytest.raises(MaskError, match=rf"{re.escape(str(path))}: group 'independent' holds a negative index"):
        NeuronMask.load(path)


class AttachMask(L.Callback):
    """Puts a mask read from a file on the editor before localisation, as a user's own masks would be."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_start(self, trainer, pl_module):
        mask = NeuronMask.load(self.path)
        pl_module.neuron_masks[mask.record_id] = mask


def test_an_out_of_range_mask_stops_the_run_before_its_first_edit(tmp_path, tiny_llama_dir, monkeypatch):
    from mke_lightning.cli import MKECLI
    from mke_lightning.data import EditDataModule
    from mke_lightning.localization.neurons import MaskError
    from test_cli import _toy_args

    monkeypatch.setenv("MKE_CACHE_DIR", str(tmp_path / "cache"))
    path = NeuronMask("t2", {"independent": {0: [1]}, "specific": {1: [3, 900]}}).save(tmp_path / "t2.safetensors")
    cli = MKECLI(KnowledgeEditor, EditDataModule, args=_toy_args(tmp_path, tiny_llama_dir)[1:], run=False)
    cli.trainer.callbacks.insert(0, AttachMask(str(path)))
    with pytest.raises(MaskError) as err:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert str(path) in str(err.value) and "layer 1, neuron 900" in str(err.value)
    assert cli.model.outcomes == []  # no edit was made (t1's mask was fine, and it comes first)

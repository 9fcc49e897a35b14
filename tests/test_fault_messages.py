"""Each fault a user can make ends in one message that names its cause (the file, record, field or
setting) and what to do, never in a bare traceback from deep inside a library."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mke_lightning.data import read_jsonl, read_mquake, read_mzsre
from mke_lightning.records import RecordError

from conftest import toy_record, write_jsonl


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

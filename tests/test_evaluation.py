"""Metric protocols and aggregation, with expectations computed by hand."""

from __future__ import annotations

import json

import torch

from mke_lightning.evaluation import build_items, normalize, starts_with_answer, target_group
from mke_lightning.records import record_from_dict
from mke_lightning.report import ResultAggregator, format_table, write_reports
from mke_lightning.scoring import pack, target_logprobs, token_accuracy

from conftest import toy_record


def test_normalize_and_prefix_match():
    assert normalize("  Rome, Italy! ") == "rome italy"
    assert normalize("ＲＯＭＥ") == "rome"  # NFKC folds full-width letters
    assert starts_with_answer("Rome, the capital", ("Rome",), "en")
    assert not starts_with_answer("Romeo and Juliet", ("Rome",), "en")  # word boundary
    assert starts_with_answer("the Eternal City", ("Rome", "the eternal city"), "en")  # alias
    assert starts_with_answer("罗马是意大利的首都", ("罗马",), "zh")  # no word spaces in zh
    assert not starts_with_answer("", ("Rome",), "en")


def test_pack_aligns_targets_to_the_last_positions():
    b = pack([[1, 5, 6], [1, 7]], [[8, 9], [10]], pad_id=0)
    # rows: prompt + target[:-1], left padded
    assert b.input_ids.tolist() == [[1, 5, 6, 8], [0, 0, 1, 7]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]
    assert b.targets.tolist() == [[8, 9], [0, 10]]
    assert b.target_mask.tolist() == [[True, True], [False, True]]


def test_token_accuracy_and_logprobs_by_hand():
    b = pack([[1, 2], [1, 3]], [[4, 5], [6]], pad_id=0)
    logits = torch.full((2, 2, 8), -5.0)
    logits[0, 0, 4] = 5.0  # row 0: first target token right
    logits[0, 1, 7] = 5.0  # row 0: second wrong (argmax 7, target 5)
    logits[1, 1, 6] = 5.0  # row 1: its single token right
    logits[1, 0, 2] = 9.0  # padding position: must not count
    assert token_accuracy(logits, b).tolist() == [0.5, 1.0]
    lp = target_logprobs(logits, b)
    assert lp[1, 0] == 0.0  # no target there
    expected = torch.log_softmax(logits[0, 1], -1)[5]
    assert torch.isclose(lp[0, 1], expected)


def test_items_cover_every_measure_and_groups():
    rec = record_from_dict(toy_record())
    items = build_items(rec, ["en", "fr"])
    measures = [(i.lang, i.measure) for i in items]
    for lang in ("en", "fr"):
        for m in ("reliability", "generality", "locality", "locality_gold", "portability"):
            assert (lang, m) in measures
    assert target_group(rec, "en", "en") == "edit"
    assert target_group(rec, "en", "fr") == "identical"  # "rome" in both
    data = toy_record()
    data["languages"]["fr"]["target_new"] = "rom"
    assert target_group(record_from_dict(data), "en", "fr") == "translated"


def test_aggregator_means_tables_and_files(tmp_path):
    rows = [
        {"record_id": "a", "edit_lang": "en", "eval_lang": "en", "group": "edit", "measure": "reliability", "token_acc": 1.0, "gen_em": 1.0},
        {"record_id": "b", "edit_lang": "en", "eval_lang": "en", "group": "edit", "measure": "reliability", "token_acc": 0.5, "gen_em": 0.0},
        {"record_id": "a", "edit_lang": "en", "eval_lang": "fr", "group": "translated", "measure": "reliability", "token_acc": 0.25, "gen_em": 0.0},
        {"record_id": "b", "edit_lang": "en", "eval_lang": "fr", "group": "identical", "measure": "reliability", "token_acc": 1.0, "gen_em": 1.0},
    ]
    agg = ResultAggregator()
    agg.update(rows)
    s = agg.compute()
    assert s["language"]["en"]["reliability"] == {"token_acc": 0.75, "gen_em": 0.5}
    assert s["language"]["fr"]["reliability"]["token_acc"] == 0.625
    assert s["average"]["non_edit_languages"]["reliability"]["token_acc"] == 0.625
    assert s["average"]["all_languages"]["reliability"]["token_acc"] == 0.6875
    assert s["group"]["translated"]["reliability"]["token_acc"] == 0.25
    assert s["counts"]["fr"]["reliability"] == 2
    table = format_table(s, ["en", "fr"])
    assert "0.750" in table and "[translated]" in table and "avg(all)" in table
    results, per_edit = write_reports(tmp_path, s, rows, {"model": "x"})
    assert json.loads(results.read_text())["results"]["language"]["en"]["reliability"]["gen_em"] == 0.5
    assert len(per_edit.read_text().strip().splitlines()) == 1 + len(rows)

"""Metric protocols, items and aggregation, with expectations computed by hand."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from conftest import toy_record
from mke_lightning.data.records import record_from_dict
from mke_lightning.evaluation.aggregate import EvalAggregate
from mke_lightning.evaluation.evaluator import EditEvaluator, build_items, target_group
from mke_lightning.evaluation.metrics import (
    PROTOCOLS,
    exact_match,
    f1_scores,
    normalize,
    precision_recall,
    prefers_new,
    starts_with_answer,
    words,
)
from mke_lightning.modeling.forward import (
    grouped_target_logits,
    kept_logits,
    length_groups,
    pack,
    pack_groups,
    picked_logprobs,
    row_logprobs,
    target_logits,
    target_logprobs,
    teacher_forced,
    token_accuracy,
)
from mke_lightning.reporting.tables import format_table, write_reports


# -- protocols on text -----------------------------------------------------------
def test_normalize_and_prefix_match():
    assert normalize("  Rome, Italy! ") == "rome italy"
    assert normalize("ＲＯＭＥ") == "rome"  # NFKC folds full-width letters
    assert starts_with_answer("Rome, the capital", ("Rome",), "en")
    assert not starts_with_answer("Romeo and Juliet", ("Rome",), "en")  # word boundary
    assert starts_with_answer("罗马是意大利的首都", ("罗马",), "zh")  # no word spaces in zh
    assert not starts_with_answer("", ("Rome",), "en")


def test_aliases_count_for_gen_em():
    answers = ("United Kingdom", "UK", "U.K.", "Great Britain")
    assert starts_with_answer("the UK, of course", ("the UK",), "en")
    assert starts_with_answer("UK and its", answers, "en")  # second alias
    assert starts_with_answer("U.K.", answers, "en")  # punctuation normalised away: "u k"
    assert starts_with_answer("great britain.", answers, "en")
    assert not starts_with_answer("Ukraine", answers, "en")  # an alias is a prefix only at a word boundary
    assert not starts_with_answer("France", answers, "en")
    assert starts_with_answer("英国。", ("イギリス", "英国"), "ja")


def test_exact_match_by_hand():
    assert exact_match(" Paris.", "paris") == 1.0
    assert exact_match("Paris France", "Paris") == 0.0
    assert exact_match("", "Paris") == 0.0


def test_f1_with_repeated_tokens_and_the_legacy_form():
    # predicted "the the cat", gold "the cat sat": common = min(2,1) "the" + 1 "cat" = 2
    # P = 2/3, R = 2/3, F1 = 2/3, P x R = 4/9
    f1, legacy = f1_scores("the the cat", "the cat sat", "en")
    assert f1 == pytest.approx(2 / 3) and legacy == pytest.approx(4 / 9)
    # predicted "a a a a" vs gold "a b": common = 1; P = 1/4, R = 1/2; F1 = 2*(1/8)/(3/4) = 1/3; P x R = 1/8
    f1, legacy = f1_scores("a a a a", "a b", "en")
    assert f1 == pytest.approx(1 / 3) and legacy == pytest.approx(1 / 8)
    assert precision_recall(["a", "a", "a", "a"], ["a", "b"]) == (0.25, 0.5)
    assert f1_scores("New York City", "new york", "en") == pytest.approx((0.8, 2 / 3))  # P 2/3, R 1
    assert f1_scores("Berlin", "Rome", "en") == (0.0, 0.0)
    assert f1_scores("", "Rome", "en") == (0.0, 0.0)
    assert f1_scores(" ", "", "en") == (1.0, 1.0)  # nothing said on both sides
    # characters where words are not spaced: "北京市" vs "北京": P 2/3, R 1
    assert words("北京 市", "zh") == ["北", "京", "市"]
    assert f1_scores("北京市", "北京", "zh") == pytest.approx((0.8, 2 / 3))


def test_prob_protocol():
    assert prefers_new(-1.0, -2.0) == 1.0
    assert prefers_new(-2.0, -1.0) == 0.0
    assert prefers_new(-1.0, -1.0) == 0.0  # a tie is not a success


# -- teacher forcing -------------------------------------------------------------
def test_pack_aligns_targets_to_the_last_positions():
    b = pack([[1, 5, 6], [1, 7]], [[8, 9], [10]], pad_id=0)
    assert b.input_ids.tolist() == [[1, 5, 6, 8], [0, 0, 1, 7]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]
    assert b.targets.tolist() == [[8, 9], [0, 10]]
    assert b.target_mask.tolist() == [[True, True], [False, True]]


def test_token_accuracy_argmax_and_mean_logprob_by_hand():
    b = pack([[1, 2], [1, 3]], [[4, 5], [6]], pad_id=0)
    logits = torch.full((2, 2, 8), -5.0)
    logits[0, 0, 4] = 5.0  # row 0: first target token right
    logits[0, 1, 7] = 5.0  # row 0: second wrong (argmax 7, target 5)
    logits[1, 1, 6] = 5.0  # row 1: its single token right
    logits[1, 0, 2] = 9.0  # padding position: must not count
    assert token_accuracy(logits, b).tolist() == [0.5, 1.0]
    lp = target_logprobs(logits, b)
    assert lp[1, 0] == 0.0
    out = teacher_forced(logits, b)
    assert out.accuracy.tolist() == [0.5, 1.0]
    assert out.predicted == [[4, 7], [6]]  # the padding position of row 1 is dropped
    row0 = torch.log_softmax(logits[0], -1)
    assert out.mean_logprob[0].item() == pytest.approx(((row0[0, 4] + row0[1, 5]) / 2).item())
    assert out.mean_logprob[1].item() == pytest.approx(torch.log_softmax(logits[1, 1], -1)[6].item())


# -- items ---------------------------------------------------------------------------
def _with_multi_hop(rid: str = "toy-1") -> dict:
    data = toy_record(rid)
    data["languages"]["en"]["multi_hop"] = [
        {"prompt": "the country of the tower is", "answer": "italy", "aliases": ["rome"]}
    ]
    data["languages"]["en"]["target_new_aliases"] = ["roma"]
    return data


def test_items_cover_every_measure_aliases_old_targets_and_groups():
    rec = record_from_dict(_with_multi_hop())
    items = build_items(rec, ["en", "fr"])
    measures = [(i.lang, i.measure) for i in items]
    for lang in ("en", "fr"):
        for m in ("reliability", "generality", "locality", "locality_gold", "portability"):
            assert (lang, m) in measures
    assert ("en", "multi_hop") in measures and ("fr", "multi_hop") not in measures
    rel = next(i for i in items if i.measure == "reliability" and i.lang == "en")
    assert rel.answers == ("rome", "roma") and rel.old == "paris"
    assert next(i for i in items if i.measure == "multi_hop").answers == ("italy", "rome")
    assert all(i.old is None for i in items if i.measure not in ("reliability", "generality"))
    assert [i.measure for i in build_items(rec, ["en"], ("reliability",))] == ["reliability"]
    with pytest.raises(ValueError, match="unknown measures"):
        build_items(rec, ["en"], ("reliablity",))
    assert target_group(rec, "en", "en") == "edit"
    assert target_group(rec, "en", "fr") == "identical"  # "rome" in both
    data = toy_record()
    data["languages"]["fr"]["target_new"] = "rom"
    assert target_group(record_from_dict(data), "en", "fr") == "translated"


# -- the evaluator on a tiny model ---------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_every_row_carries_every_protocol(tiny):
    model, tok = tiny
    rec = record_from_dict(_with_multi_hop())
    ev = EditEvaluator(tok)
    items = build_items(rec, ["en", "fr", "de"])
    rows = ev.score(model, items, ev.references(model, items))
    assert len(rows) == len(items)
    for row, item in zip(rows, items):
        assert set(PROTOCOLS) <= set(row)
        assert (row["prob"] is None) == (item.old is None)
        for proto in PROTOCOLS:
            assert row[proto] is None or 0.0 <= row[proto] <= 1.0
    # prob = mean log-prob of the new target beats the old one's, recomputed here with one full forward pass per row
    rel = next(i for i, it in enumerate(items) if it.measure == "reliability")

    def mean_logprob(answer: str) -> float:
        prompt, target = ev._target(items[rel], answer)
        b = pack([prompt], [target], tok.pad_token_id)
        return float(target_logprobs(kept_logits(model, b), b).sum() / len(target))

    assert rows[rel]["prob"] == float(mean_logprob("rome") > mean_logprob("paris"))


def test_locality_agreement_with_the_pre_edit_model(tiny):
    model, tok = tiny
    rec = record_from_dict(toy_record())
    ev = EditEvaluator(tok)
    items = build_items(rec, ["en", "fr"], ("locality",))
    refs = ev.references(model, items)
    # the model left as it was agrees with itself under every protocol
    for row in ev.score(model, items, refs):
        assert (row["token_acc"], row["em"], row["f1"], row["gen_em"]) == (1.0, 1.0, 1.0, 1.0)
    # a reference whose last token differs: token_acc (n-1)/n, no exact agreement
    i = 0
    ref = refs[i]
    other = next(t for t in range(4, tok.vocab_size) if t != ref[-1])
    changed = {**refs, i: ref[:-1] + [other]}
    row = ev.score(model, items, changed)[i]
    n = len(ref)
    assert row["token_acc"] == pytest.approx((n - 1) / n)
    assert row["em"] == 0.0 and row["gen_em"] == 0.0
    with pytest.raises(ValueError, match="pre-edit reference"):
        ev.score(model, items, {})


def test_gen_em_counts_an_alias(tiny):
    """The same item scored with and without the alias the model actually generates."""
    from mke_lightning.evaluation.evaluator import Item
    from mke_lightning.modeling.forward import encode_prompt, greedy_generate

    model, tok = tiny
    candidates = [
        "the tower is located in the city of",
        "honey is made by",
        "the capital of france is",
        "le ciel est",
        "der himmel ist",
    ]
    firsts = [
        tok.decode(g, skip_special_tokens=True).strip()
        for g in greedy_generate(model, tok, [encode_prompt(tok, p) for p in candidates], 1)
    ]
    prompt, first = next(
        (p, f) for p, f in zip(candidates, firsts) if f and f != "<unk>"
    )  # the tiny model's own greedy word
    ev = EditEvaluator(tok)
    wrong = next(w for w in ("rome", "paris") if w != first)
    without = ev.score(model, [Item("en", "multi_hop", prompt, (wrong,))], {})[0]
    with_alias = ev.score(model, [Item("en", "multi_hop", prompt, (wrong, first))], {})[0]
    assert without["gen_em"] == 0.0 and with_alias["gen_em"] == 1.0


# -- aggregation and files ------------------------------------------------------------
ROWS = [
    {"record_id": "a", "edit_lang": "en", "eval_lang": "en", "group": "edit", "measure": "reliability",
     "token_acc": 1.0, "em": 1.0, "f1": 1.0, "f1_legacy": 1.0, "prob": 1.0, "gen_em": 1.0},
    {"record_id": "b", "edit_lang": "en", "eval_lang": "en", "group": "edit", "measure": "reliability",
     "token_acc": 0.5, "em": 0.0, "f1": 0.5, "f1_legacy": 0.25, "prob": None, "gen_em": 0.0},
    {"record_id": "a", "edit_lang": "en", "eval_lang": "fr", "group": "translated", "measure": "reliability",
     "token_acc": 0.25, "em": 0.0, "f1": 0.0, "f1_legacy": 0.0, "prob": 0.0, "gen_em": 0.0},
    {"record_id": "b", "edit_lang": "en", "eval_lang": "fr", "group": "identical", "measure": "reliability",
     "token_acc": 1.0, "em": 1.0, "f1": 1.0, "f1_legacy": 1.0, "prob": None, "gen_em": 1.0},
    {"record_id": "a", "edit_lang": "en", "eval_lang": "fr", "group": "translated", "measure": "multi_hop",
     "token_acc": 0.0, "em": 0.0, "f1": 0.0, "f1_legacy": 0.0, "prob": None, "gen_em": 1.0},
]


def test_aggregate_means_by_hand():
    agg = EvalAggregate(["en", "fr", "de"], "en")
    agg.update(ROWS[:2], edits=1)
    agg.update(ROWS[2:], edits=1)
    agg.update_perplexity({"en": 1.0, "fr": 1.5})
    agg.update_perplexity({"en": 1.2})
    s = agg.compute()
    assert s["language"]["en"]["reliability"] == {
        "token_acc": 0.75,
        "em": 0.5,
        "f1": 0.75,
        "f1_legacy": 0.625,
        "prob": 1.0,
        "gen_em": 0.5,
    }
    assert s["language"]["fr"]["reliability"]["token_acc"] == 0.625
    assert s["language"]["fr"]["reliability"]["prob"] == 0.0  # the row without an old target is not counted
    assert "prob" not in s["language"]["fr"]["multi_hop"]
    assert s["average"]["non_edit_languages"]["reliability"]["token_acc"] == 0.625
    assert s["average"]["all_languages"]["reliability"]["token_acc"] == 0.6875
    assert s["group"]["translated"]["reliability"]["token_acc"] == 0.25
    assert s["counts"] == {"en": {"reliability": 2}, "fr": {"reliability": 2, "multi_hop": 1}}
    assert "de" not in s["language"]  # a language without rows is left out, but its state exists
    assert s["perplexity_ratio"] == {"en": 1.1, "fr": 1.5}
    assert s["edits"] == 2
    with pytest.raises(ValueError, match="not among the run's evaluation languages"):
        agg.update([{**ROWS[0], "eval_lang": "ja"}])
    with pytest.raises(ValueError, match="without repeats"):
        EvalAggregate(["en", "en"], "en")


def test_table_and_files(tmp_path):
    agg = EvalAggregate(["en", "fr"], "en")
    agg.update(ROWS, edits=2)
    agg.update_perplexity({"en": 1.25, "fr": 1.0})
    s = agg.compute()
    table = format_table(s, ["en", "fr"])
    assert "rel/tok" in table and "mhop/gen" in table and "0.750" in table and "[translated]" in table
    assert "ppl_ratio" in table and "1.250" in table
    assert "f1PxR" in format_table(s, ["en", "fr"], ("f1", "f1_legacy"))
    with pytest.raises(ValueError, match="unknown protocols"):
        format_table(s, ["en"], ("f2",))
    ppl = [{"record_id": "a", "lang": "en", "ppl_pre": 10.0, "ppl_post": 12.5, "ratio": 1.25}]
    paths = write_reports(tmp_path, s, ROWS, {"model": "x", "edit_language": "en"}, ppl)
    doc = json.loads(paths["results"].read_text())
    assert doc["results"]["language"]["en"]["reliability"]["gen_em"] == 0.5
    assert set(doc["metric_protocols"]) == set(PROTOCOLS)
    with paths["edits"].open() as f:
        read = list(csv.DictReader(f))
    assert len(read) == len(ROWS) and read[1]["prob"] == "" and read[0]["f1_legacy"] == "1.0"
    assert paths["perplexity"].read_text().splitlines()[1] == "a,en,10.0,12.5,1.25"


def test_target_logits_send_only_target_positions_through_the_head(tiny, monkeypatch):
    model, tok = tiny
    rows = [[5, 6, 7, 8, 9], [5, 6], [10, 11, 12]]
    targets = [[13, 14, 15], [16], [17, 18]]  # lengths differ: K = 3, 6 target positions of 9
    b = pack(rows, targets, tok.pad_token_id)
    head = model.get_output_embeddings()
    seen = []
    handle = head.register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
    leaf = torch.zeros(model.config.hidden_size, requires_grad=True)  # a gradient path through every position
    embed = model.get_input_embeddings().register_forward_hook(lambda m, a, out: out + leaf)
    try:
        picked = target_logits(model, b)  # [M, V]
        dense = kept_logits(model, b)  # [B, K, V]
    finally:
        handle.remove()
        embed.remove()
    assert seen == [(1, 6, model.config.vocab_size), (3, 3, model.config.vocab_size)]
    assert torch.allclose(picked, dense[b.target_mask], atol=1e-5)
    lp, ref = picked_logprobs(picked, b), target_logprobs(dense, b)  # [B, K]
    assert torch.allclose(lp, ref, atol=1e-5) and bool((lp[~b.target_mask] == 0).all())
    (g1,) = torch.autograd.grad(lp.sum(), leaf)
    (g2,) = torch.autograd.grad(ref.sum(), leaf)
    assert torch.allclose(g1, g2, atol=1e-5) and g1.abs().sum() > 0

    monkeypatch.setattr(model, "get_output_embeddings", lambda: None)  # no head to hook: the full logits are sliced
    assert torch.allclose(target_logits(model, b), dense[b.target_mask].detach(), atol=1e-5)


def _padded(lengths, groups) -> int:
    return sum(len(g) * max(lengths[i] for i in g) for g in groups)


def _best_split(lengths, most: int, cost: int) -> int:
    """The cheapest split into at most ``most`` contiguous runs of the rows sorted longest first, by trying all."""
    import itertools

    ordered = sorted(lengths, reverse=True)
    best = None
    for k in range(1, min(most, len(ordered)) + 1):
        for cuts in itertools.combinations(range(1, len(ordered)), k - 1):
            bounds = (0, *cuts, len(ordered))
            total = sum((b - a) * ordered[a] + cost for a, b in zip(bounds, bounds[1:]))
            best = total if best is None else min(best, total)
    return best


def test_length_groups_keep_every_row_once_and_find_the_cheapest_split():
    lengths = [25, 24, 8, 7, 6, 5, 24, 9, 13, 12]
    groups = length_groups(lengths, 3, pass_cost=10)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(g == sorted(g) for g in groups) and len(groups) <= 3
    assert _padded(lengths, groups) < len(lengths) * max(lengths)  # fewer pad positions than one batch
    assert _padded(lengths, groups) + 10 * len(groups) == _best_split(lengths, 3, 10)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        ls = torch.randint(1, 30, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen).tolist()
        for most, cost in ((1, 0), (2, 5), (4, 20)):
            got = length_groups(ls, most, pass_cost=cost)
            assert _padded(ls, got) + cost * len(got) == _best_split(ls, most, cost), (ls, most, cost)
    assert length_groups(lengths, 1) == [list(range(len(lengths)))]
    assert length_groups([7] * 6, 4, pass_cost=1) == [list(range(6))]  # nothing to save: one pass
    assert len(length_groups(lengths, 3, pass_cost=10_000)) == 1  # a pass costs more than any saving
    assert length_groups([], 3) == []


def test_grouped_rows_score_as_one_padded_batch(tiny):
    model, tok = tiny
    long = [5 + i % 20 for i in range(70)]  # 70 and 69 tokens against 1 to 3: worth a pass of its own
    rows = [long, [5, 6], [10, 11, 12], long[1:], [20]]
    targets = [[13, 14, 15], [16], [17, 18], [21, 22], [23]]
    one = pack(rows, targets, tok.pad_token_id)
    grouped = pack_groups(rows, targets, tok.pad_token_id, max_groups=3)
    assert len(grouped.batches) > 1
    leaf = torch.zeros(model.config.hidden_size, requires_grad=True)
    embed = model.get_input_embeddings().register_forward_hook(lambda m, a, out: out + leaf)
    try:
        ref = picked_logprobs(target_logits(model, one), one)  # [B, K]
        per_row = grouped_target_logits(model, grouped)
        lp = row_logprobs(per_row, targets)
    finally:
        embed.remove()
    assert [tuple(x.shape) for x in per_row] == [(len(t), model.config.vocab_size) for t in targets]
    for i, t in enumerate(targets):
        assert torch.allclose(lp[i], ref[i, -len(t):], atol=1e-5)
    (g1,) = torch.autograd.grad(sum(x.sum() for x in lp), leaf)
    (g2,) = torch.autograd.grad(ref.sum(), leaf)
    assert torch.allclose(g1, g2, atol=1e-5) and g1.abs().sum() > 0


def test_runs_of_one_method_are_told_apart_by_their_shortest_distinct_folder():
    from mke_lightning.reporting.compare import distinct_labels

    def run(method, path):
        return {"method": method, "model_state": "edited", "_path": path}

    assert distinct_labels([
        run("memla", "runs/mzsre-memla/version_0/results.json"),
        run("memla", "runs/mzsre-memla-busy_filter/version_0/results.json"),
        run("lora", "runs/mzsre-lora/version_0/results.json"),
    ]) == ["memla (edited) mzsre-memla", "memla (edited) mzsre-memla-busy_filter", "lora (edited)"]
    assert distinct_labels(
        [run("memla", "runs/a/version_0/results.json"), run("memla", "runs/a/version_1/results.json")]
    ) == ["memla (edited) a/version_0", "memla (edited) a/version_1"]
    assert distinct_labels([run("memla", "x/b/results.json"), run("memla", "y/b/results.json")]) == [
        "memla (edited) x/b", "memla (edited) y/b"]


def test_settings_table_lists_only_settings_whose_recorded_values_differ():
    from mke_lightning.reporting.compare import settings_table

    runs = [
        ("a", {"settings": {"loss": {"max_steps": 60, "kl": 0.0}, "lora": {"rank": 8}}}),
        ("b", {"settings": {"loss": {"max_steps": 60, "kl": 1.0}, "lora": None}}),
        ("c", {"settings": {"loss": {"max_steps": 60}}}),  # an older run that did not record loss.kl
    ]
    table = settings_table(runs)
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| setting")]
    # loss.max_steps is the same everywhere and lora.rank is recorded by one run only; lora is set in a, None in b
    assert rows == ["| lora | set | None | - |", "| loss.kl | 0.0 | 1.0 | - |"]
    assert settings_table(runs[:1]) == "The runs' recorded settings are the same.\n"

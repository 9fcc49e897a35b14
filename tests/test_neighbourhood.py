"""The neighbourhood measure: the edit's question about other subjects of the run,
scored against the pre-edit model's own continuation."""

from __future__ import annotations

import copy

import pytest
import torch

from mke_lightning.data.records import record_from_dict
from mke_lightning.evaluation.aggregate import MEASURES_BEFORE_NEIGHBORHOOD, EvalAggregate
from mke_lightning.evaluation.evaluator import MEASURES, EditEvaluator, Item, build_items
from mke_lightning.evaluation.metrics import normalize
from mke_lightning.evaluation.neighbourhood import NeighbourhoodConfig, NeighbourPool, template_of
from mke_lightning.modeling.forward import encode_continuation, encode_prompt

LANGS = ["en", "fr"]


def _rec(rid, en_subject, en_prompt, fr_subject, fr_prompt, new="rome", paraphrase=None):
    def block(subject, prompt):
        return {"subject": subject, "prompt": prompt, "target_new": new,
                                         "paraphrases": [paraphrase or prompt + " the"],
                                         "locality": [{"prompt": "honey is made by", "answer": "bees"}]}

    return record_from_dict(
        {"id": rid, "languages": {"en": block(en_subject, en_prompt), "fr": block(fr_subject, fr_prompt)}}
    )


def _records():
    """In the tiny vocabulary: ``a``, ``b``, ``c`` ask one question (en template "the capital of {} is");
    ``d`` and ``e`` ask others; ``f`` has ``a``'s subject. In fr, ``a``'s subject is not in its prompt."""
    return [
        _rec("a", "france", "the capital of france is", "la france", "la capitale de france est"),
        _rec("b", "italy", "the capital of italy is", "italy", "la capitale de italy est", new="berlin"),
        _rec("c", "spain", "the capital of spain is", "spain", "la ville de spain est"),
        _rec("d", "tower", "the tower is located in the city of", "tour", "la tour est de la ville"),
        _rec("e", "germany", "what colour is the sky in germany", "germany", "le ciel de germany est"),
        _rec("f", "france", "france is located in the country", "france", "france est de la ville"),
    ]


# -- which prompts ---------------------------------------------------------------------
def test_template_and_subject_replacement():
    assert template_of("france", "the capital of france is") == template_of("italy", "the capital of italy is")
    assert template_of("la france", "la capitale de france est") is None  # the subject is not in the prompt
    assert template_of(None, "the capital of x is") is None
    records = _records()
    a = records[0]
    pool = NeighbourPool(records, LANGS, "en", NeighbourhoodConfig(per_edit=2))
    assert sorted(pool.shares_template(a)) == ["b", "c"]
    # two neighbours: those that ask the same question come first
    assert sorted(pool.neighbours(a)) == ["b", "c"]
    got = pool.prompts(a)
    assert sorted(got["en"]) == [
        ("the capital of italy is", "b", "template"),
        ("the capital of spain is", "c", "template"),
    ]
    # fr: a's subject cannot be placed in its prompt, so the neighbours that ask a's question in the
    # edit language give their own fr prompt
    assert sorted(got["fr"]) == [
        ("la capitale de italy est", "b", "edit_template"),
        ("la ville de spain est", "c", "edit_template"),
    ]

    # more neighbours than records asking the same question: a's prompt about the others' subjects
    pool = NeighbourPool(records, LANGS, "en", NeighbourhoodConfig(per_edit=5))
    chosen = pool.neighbours(a)
    assert chosen[:2] in (["b", "c"], ["c", "b"]) and sorted(chosen[2:]) == ["d", "e"]  # never a, nor f (a's subject)
    en = {rid: (text, source) for text, rid, source in pool.prompts(a)["en"]}
    assert en["d"] == ("the capital of tower is", "subject") and en["e"] == ("the capital of germany is", "subject")
    assert set(rid for _, rid, _ in pool.prompts(a)["fr"]) == {"b", "c"}  # d, e cannot be placed in fr

    # b in fr: its subject is in its prompt; c's fr prompt has another template, so c's subject goes into b's
    fr = {rid: (text, source) for text, rid, source in pool.prompts(records[1])["fr"]}
    assert fr["c"] == ("la capitale de spain est", "subject")
    assert "a" not in fr or fr["a"] == ("la capitale de la france est", "subject")


def test_never_the_record_itself_nor_its_own_prompts_and_deterministic():
    records = _records()
    for k in (1, 3, 5, 10):
        pool = NeighbourPool(records, LANGS, "en", NeighbourhoodConfig(per_edit=k, seed=7))
        for r in records:
            chosen = pool.neighbours(r)
            assert r.id not in chosen and len(chosen) == len(set(chosen)) <= k
            subject = normalize(r.facts("en").subject)
            assert all(normalize(pool._subject(rid, "en")) != subject for rid in chosen)
            for lang, got in pool.prompts(r).items():
                own = {normalize(p) for p in (r.facts(lang).prompt, *r.facts(lang).paraphrases)}
                assert all(normalize(text) not in own for text, _, _ in got)
                assert len({t for t, _, _ in got}) == len(got)
    # the same neighbours every time, and whatever order the pool is given in
    pool = NeighbourPool(records, LANGS, "en", NeighbourhoodConfig(per_edit=3, seed=7))
    shuffled = NeighbourPool(records[::-1], LANGS, "en", NeighbourhoodConfig(per_edit=3, seed=7))
    for r in records:
        assert pool.prompts(r) == pool.prompts(r) == shuffled.prompts(r)

    # a large pool: exactly per_edit neighbours, drawn by the seed
    many = [_rec(f"r{i:03d}", f"s{i}", f"what colour is s{i}", f"s{i}", f"le ciel de s{i} est") for i in range(200)]
    pool = NeighbourPool(many, LANGS, "en", NeighbourhoodConfig(per_edit=5, seed=0))
    first = pool.neighbours(many[0])
    assert len(first) == 5 and "r000" not in first and first == pool.neighbours(many[0])
    assert {
        tuple(NeighbourPool(many, LANGS, "en", NeighbourhoodConfig(5, s)).neighbours(many[0])) for s in range(4)
    } != {tuple(first)}


def test_a_record_without_placeable_neighbours_reports_none_not_zero():
    records = _records()
    alone = NeighbourPool(records[:1], LANGS, "en")
    assert alone.prompts(records[0]) == {}
    items = build_items(records[0], LANGS, MEASURES, alone.prompts(records[0]))
    assert not [it for it in items if it.measure == "neighborhood"]
    agg = EvalAggregate(LANGS, "en")
    agg.update([{"eval_lang": "en", "group": "edit", "measure": "locality", "token_acc": 1.0}], edits=1)
    s = agg.compute()
    assert "neighborhood" not in s["language"]["en"] and "neighborhood" not in s["counts"]["en"]
    with pytest.raises(ValueError, match="per_edit"):
        NeighbourhoodConfig(per_edit=0)


def test_items_carry_the_edit_target_as_the_reference_length():
    records = _records()
    pool = NeighbourPool(records, LANGS, "en", NeighbourhoodConfig(per_edit=2))
    items = build_items(records[1], LANGS, ("reliability", "neighborhood"), pool.prompts(records[1]))
    nbr = [it for it in items if it.measure == "neighborhood"]
    assert nbr and all(it.answers == ("berlin",) and it.old is None for it in nbr)
    assert [it.measure for it in build_items(records[1], LANGS, ("reliability", "neighborhood"))] == ["reliability"] * 2


# -- scores ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), AutoTokenizer.from_pretrained(tiny_llama_dir)


def _edited(model):
    """A copy of ``model`` with noise on its MLP output projections: some answers move."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in other.model.layers:
            w = layer.mlp.down_proj.weight
            w += 3.0 * w.std() * torch.randn(w.shape, generator=g)
    return other


@torch.no_grad()
def _greedy(model, ids: list[int], n: int, end: int) -> list[int]:
    """``n`` greedy tokens after ``ids``, one full forward pass per token; stops after the end token."""
    out: list[int] = []
    for _ in range(n):
        nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
        out.append(nxt)
        if nxt == end:
            break
    return out


@torch.no_grad()
def test_scores_equal_the_agreement_with_the_pre_edit_model_computed_directly(tiny):
    model, tok = tiny
    records = _records()
    pool = NeighbourPool(records, LANGS, "en", NeighbourhoodConfig(per_edit=4))
    ev = EditEvaluator(tok)
    items = [it for r in records for it in build_items(r, LANGS, ("neighborhood",), pool.prompts(r))]
    assert len(items) >= 10
    refs = ev.references(model, items)
    edited = _edited(model)
    rows = ev.score(edited, items, refs)

    def decode(ids):
        return tok.decode(ids, skip_special_tokens=True)

    end = tok.eos_token_id
    moved = 0
    for i, (it, row) in enumerate(zip(items, rows)):
        prompt = encode_prompt(tok, it.prompt)
        width = len(encode_continuation(tok, " " + it.answers[0]))
        ref = _greedy(model, prompt, width, end)  # the pre-edit model's own continuation
        assert refs[i] == ref
        logits = edited(torch.tensor([prompt + ref])).logits[0]
        pred = logits[len(prompt) - 1: len(prompt) - 1 + len(ref)].argmax(-1).tolist()
        assert row["measure"] == "neighborhood" and row["eval_lang"] == it.lang
        assert row["token_acc"] == pytest.approx(sum(p == r for p, r in zip(pred, ref)) / len(ref))
        assert row["em"] == float(normalize(decode(pred)) == normalize(decode(ref)))
        body = ref[:-1] if ref[-1] == end else ref
        gen = _greedy(edited, prompt, min(len(ref) + 2, ev.max_new_tokens), end)
        gen = gen[:-1] if gen and gen[-1] == end else gen  # the generation stops at the end token, without it
        hit = gen[: len(body)] == body and (ref[-1] != end or len(gen) == len(body))
        assert row["gen_em"] == float(hit)
        assert row["prob"] is None
        moved += row["token_acc"] < 1.0
    assert moved  # the edit moved some neighbours: the figures are not trivially 1
    # the model the references came from agrees with itself under every protocol
    for row in ev.score(model, items, refs):
        assert (row["token_acc"], row["em"], row["f1"], row["gen_em"]) == (1.0, 1.0, 1.0, 1.0)
    # scored exactly as the same prompts would be as locality probes
    as_locality = [Item(it.lang, "locality", it.prompt, it.answers) for it in items]
    loc_rows = ev.score(edited, as_locality, ev.references(model, as_locality))
    for a, b in zip(rows, loc_rows):
        assert {k: v for k, v in a.items() if k != "measure"} == {k: v for k, v in b.items() if k != "measure"}


def test_neighbourhood_items_leave_the_other_measures_batches_alone(tiny):
    model, tok = tiny
    records = _records()
    pool = NeighbourPool(records, LANGS, "en", NeighbourhoodConfig(per_edit=4))
    ev = EditEvaluator(tok, batch_rows=3)
    edited = _edited(model)
    without = build_items(records[0], LANGS)
    with_nbr = build_items(records[0], LANGS, MEASURES, pool.prompts(records[0]))
    assert len(with_nbr) > len(without)
    rows_without = ev.score(edited, without, ev.references(model, without))
    rows_with = ev.score(edited, with_nbr, ev.references(model, with_nbr))
    assert [r for r in rows_with if r["measure"] != "neighborhood"] == rows_without  # bit for bit


def test_states_saved_before_the_measure_are_placed_by_name():
    agg = EvalAggregate(LANGS, "en")
    agg.update([{"eval_lang": "fr", "group": "translated", "measure": "multi_hop", "token_acc": 0.5}], edits=1)
    old = agg.saved_states()
    keep = [MEASURES.index(m) for m in MEASURES_BEFORE_NEIGHBORHOOD]
    old = {**old, "sums": old["sums"][:, keep], "counts": old["counts"][:, keep]}  # as an older version saved them
    fresh = EvalAggregate(LANGS, "en")
    fresh.add_states(old)
    assert fresh.compute()["language"]["fr"] == {"multi_hop": {"token_acc": 0.5}}


# -- the callback, its files and `mke report` -------------------------------------------
def _noisy_module(model, tokenizer):
    """A LightningModule whose "edit" adds fixed noise to the MLP output projections (:func:`_edited`);
    it takes the noise away again after the callback has scored the edit."""
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lm, self.tokenizer, self.automatic_optimization = model, tokenizer, False
            self._saved = None

        def get_causal_lm(self):
            return self.lm

        def training_step(self, batch, batch_idx):
            self._saved = {k: v.clone() for k, v in self.lm.state_dict().items()}
            self.lm.load_state_dict(_edited(self.lm).state_dict())

        def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
            self.lm.load_state_dict(self._saved)

        def test_step(self, batch, batch_idx):
            return None

        def configure_optimizers(self):
            return None

    return Module()


def test_the_callback_reports_the_measure_in_every_file_and_table(tmp_path, tiny, capsys):
    import csv
    import json

    from conftest import write_jsonl
    from mke_lightning.callbacks import EditEvaluation
    from mke_lightning.data import EditDataModule
    from mke_lightning.evaluation.perplexity import PerplexityConfig
    from mke_lightning.reporting.compare import compare_runs
    from test_evaluation_callback import _trainer

    model, tok = tiny
    records = _records()
    path = write_jsonl(tmp_path / "nbr.jsonl", [r.to_dict() for r in records])
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(False)
    runs = {}
    for name, fit in (("edited", True), ("unedited", False)):
        cb = EditEvaluation(
            perplexity=PerplexityConfig(enabled=False),
            neighbourhood=NeighbourhoodConfig(per_edit=3, seed=1),
            plots=False,
        )
        trainer = _trainer(tmp_path, name, cb)
        dm = EditDataModule(path=str(path), format="jsonl", eval_languages=LANGS)
        (trainer.fit if fit else trainer.test)(_noisy_module(model, tok), datamodule=dm)
        runs[name] = cb
    cb = runs["edited"]
    doc = json.loads(cb.written["results"].read_text())
    assert doc["neighbourhood"] == {"per_edit": 3, "seed": 1, "pool_records": 6}
    en = doc["results"]["language"]["en"]["neighborhood"]
    assert set(en) == {"token_acc", "em", "f1", "f1_legacy", "gen_em"}  # prob has no meaning against a reference
    assert doc["results"]["counts"]["en"]["neighborhood"] == 6 * 3
    assert "neighborhood" in doc["results"]["average"]["non_edit_languages"]
    rows = [r for r in csv.DictReader(cb.written["edits"].open()) if r["measure"] == "neighborhood"]
    assert len(rows) == doc["results"]["counts"]["en"]["neighborhood"] + doc["results"]["counts"]["fr"]["neighborhood"]
    assert en["token_acc"] == round(sum(float(r["token_acc"]) for r in rows if r["eval_lang"] == "en") / 18, 4)
    # the rows of one edit equal the evaluator's, computed here on the same edit
    pool = NeighbourPool(records, LANGS, "en", NeighbourhoodConfig(per_edit=3, seed=1))
    ev = EditEvaluator(tok)
    items = build_items(records[0], LANGS, ("neighborhood",), pool.prompts(records[0]))
    direct = ev.score(_edited(model), items, ev.references(model, items))
    assert [float(r["token_acc"]) for r in rows if r["record_id"] == "a"] == [r["token_acc"] for r in direct]
    assert en["token_acc"] < 1.0
    # the unedited model agrees with itself
    unedited = json.loads(runs["unedited"].written["results"].read_text())["results"]["language"]
    assert all(unedited[l]["neighborhood"]["token_acc"] == 1.0 for l in LANGS)
    out = capsys.readouterr().out
    assert "nbr/tok" in out and "nbr = neighborhood" in out
    written = compare_runs([str(cb.written["results"]), str(runs["unedited"].written["results"])], tmp_path / "report")
    assert "neighborhood (token_acc)" in written["table"].read_text()
    assert "**neighborhood** (gen_em)" in written["languages"].read_text()


def test_a_checkpoint_from_before_the_measure_resumes_without_it():
    from mke_lightning.callbacks import EditEvaluation

    cb = EditEvaluation()
    cb.edit_lang, cb.eval_langs, cb._ppl_langs, cb._sequential = "en", LANGS, [], False
    saved = {"edit_language": "en", "eval_languages": LANGS, "measures": list(MEASURES_BEFORE_NEIGHBORHOOD),
             "perplexity_languages": [], "sequential": False}
    with pytest.warns(UserWarning, match="no neighborhood measure"):
        cb._check_resumable({"settings": saved})
    assert "neighborhood" not in cb.measures and cb._settings() == saved
    cb = EditEvaluation(neighbourhood=NeighbourhoodConfig(per_edit=2))
    cb.edit_lang, cb.eval_langs, cb._ppl_langs, cb._sequential = "en", LANGS, [], False
    with pytest.raises(ValueError, match="neighbourhood"):  # another number of neighbours than the checkpoint's
        cb._check_resumable(
            {"settings": {**saved, "measures": list(MEASURES), "neighbourhood": {"per_edit": 5, "seed": 0}}}
        )

"""Data layer: native JSONL, the MzsRE adapter, the demo set and EditDataModule."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mke_lightning.data import EditDataModule, demo_records, read_jsonl, read_mzsre
from mke_lightning.data.datamodule import EditBatch
from mke_lightning.data.records import EditRecord, LanguageFacts, Probe, RecordError

MZSRE_LANGUAGES = {"en", "cs", "de", "nl", "es", "fr", "pt", "ru", "th", "tr", "vi", "zh"}
DEMO_LANGUAGES = {"en", "de", "fr", "es", "ru", "zh"}


# ---------------------------------------------------------------- helpers


# mzsre_dir: tests/conftest.py (skips when the benchmark files are absent)


@pytest.fixture(scope="module")
def mzsre_records(mzsre_dir: Path) -> list[EditRecord]:
    return read_mzsre(mzsre_dir)


def raw_mzsre(mzsre_dir: Path, name: str) -> list[dict]:
    with open(mzsre_dir / name, encoding="utf-8") as fh:
        return json.load(fh)


def native(rid: str, langs: tuple[str, ...] = ("en", "de"), **overrides) -> dict:
    """A valid native record dict; ``overrides`` replace fields in every block."""
    blocks = {}
    for lang in langs:
        block = {
            "subject": f"Subject {rid} {lang}",
            "prompt": f"The capital of {rid} ({lang}) is",
            "target_new": f"New{rid}",
            "target_true": f"Old{rid}",
            "paraphrases": [f"{rid} has its capital in"],
            "locality": [{"prompt": "The sky is", "answer": "blue"}],
            "portability": [{"prompt": f"The mayor of the capital of {rid} is", "answer": "Ann", "aliases": ["A."]}],
        }
        block.update(overrides)
        blocks[lang] = block
    return {"id": rid, "languages": blocks}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_records(path: Path, records: list[dict]) -> Path:
    return write_lines(path, [json.dumps(r, ensure_ascii=False) for r in records])


# ------------------------------------------------------------------ MzsRE


def test_mzsre_reads_all_twelve_languages(mzsre_records: list[EditRecord]) -> None:
    assert len(mzsre_records) == 743
    assert [r.id for r in mzsre_records] == [f"mzsre-{i}" for i in range(743)]
    for record in mzsre_records:
        assert set(record.languages) == MZSRE_LANGUAGES
    counts = {lang: sum(lang in r.languages for r in mzsre_records) for lang in MZSRE_LANGUAGES}
    assert counts == {lang: 743 for lang in MZSRE_LANGUAGES}
    # ISO codes only: MzsRE's own codes never leak out of the adapter.
    assert "cs" in mzsre_records[0].languages and "nl" in mzsre_records[0].languages
    assert "cz" not in mzsre_records[0].languages and "du" not in mzsre_records[0].languages


def test_mzsre_strips_nq_prefix(mzsre_dir: Path, mzsre_records: list[EditRecord]) -> None:
    # The raw English file does carry the prefix, so the check below means something.
    raw = raw_mzsre(mzsre_dir, "mzsre_test_duplicate_enzh.json")
    assert all(r["en"]["loc"].startswith("nq question: ") for r in raw)
    for record in mzsre_records:
        for lang, facts in record.languages.items():
            for probe in facts.locality:
                assert not probe.prompt.lower().startswith("nq question:"), (record.id, lang)
    assert mzsre_records[0].facts("en").locality[0].prompt == raw[0]["en"]["loc"][len("nq question: "):]


def check_block(facts: LanguageFacts, raw: dict, *, strip_prefix: bool = False) -> None:
    loc = raw["loc"][len("nq question: "):] if strip_prefix else raw["loc"]
    assert facts.subject == raw["subject"].strip()
    assert facts.prompt == raw["src"].strip()
    assert facts.target_new == raw["alt"].strip()
    assert facts.target_true is None
    assert facts.paraphrases == (raw["rephrase"].strip(),)
    assert facts.locality == (Probe(loc.strip(), raw["loc_ans"].strip()),)
    assert facts.portability == (
        Probe(raw["portability"]["New Question"].strip(), raw["portability"]["New Answer"].strip()),
    )
    assert facts.multi_hop == ()


def test_mzsre_one_record_fully_checked(mzsre_dir: Path, mzsre_records: list[EditRecord]) -> None:
    raw = raw_mzsre(mzsre_dir, "mzsre_test_duplicate_encz.json")[1]
    record = mzsre_records[1]
    assert record.id == "mzsre-1"
    check_block(record.facts("en"), raw["en"], strip_prefix=True)
    check_block(record.facts("cs"), raw["cz"])
    assert record.facts("cs").subject == "Ramalinaceae"
    assert record.facts("cs").target_new == "Lamiinae"
    # Dutch comes from a file whose key is "du"; Chinese from a file it shares with German.
    check_block(record.facts("nl"), raw_mzsre(mzsre_dir, "mzsre_test_duplicate_endu.json")[1]["du"])
    dezh = raw_mzsre(mzsre_dir, "mzsre_test_duplicate_dezh.json")[1]
    check_block(record.facts("zh"), dezh["zh"])
    check_block(record.facts("de"), dezh["de"])


def test_mzsre_strips_leading_space_of_targets(mzsre_dir: Path, mzsre_records: list[EditRecord]) -> None:
    # zsRE-style targets such as " MAT-49": the joining rule adds the separator, not the data.
    raw = raw_mzsre(mzsre_dir, "mzsre_test_duplicate_encz.json")
    index = next(i for i, r in enumerate(raw) if r["en"]["alt"].startswith(" "))
    assert mzsre_records[index].facts("en").target_new == raw[index]["en"]["alt"].strip()


def test_mzsre_language_subset_keeps_order(mzsre_dir: Path, mzsre_records: list[EditRecord]) -> None:
    subset = read_mzsre(mzsre_dir, ["zh", "cs", "zh"])
    assert len(subset) == 743
    assert list(subset[5].languages) == ["zh", "cs"]
    assert subset[5].facts("cs") == mzsre_records[5].facts("cs")
    assert subset[5].facts("zh") == mzsre_records[5].facts("zh")


@pytest.mark.parametrize("code", ["xx", "cz", "du"])
def test_mzsre_unknown_language(mzsre_dir: Path, code: str) -> None:
    with pytest.raises(RecordError) as info:
        read_mzsre(mzsre_dir, ["en", code])
    message = str(info.value)
    assert str(mzsre_dir) in message and repr(code) in message
    assert "available" in message and "'cs'" in message and "'nl'" in message


def test_mzsre_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(RecordError, match="does not exist"):
        read_mzsre(tmp_path / "nope")
    with pytest.raises(RecordError, match="no files named"):
        read_mzsre(tmp_path)


def mzsre_block(word: str) -> dict:
    return {
        "subject": word,
        "src": f"What is {word}?",
        "rephrase": f"{word} is what?",
        "alt": "X",
        "loc": "nq question: who sang it",
        "loc_ans": "Y",
        "portability": {"New Question": "Q?", "New Answer": "A"},
    }


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [("alt", None, "is missing"), ("src", "   ", "is empty"), ("loc_ans", 3, "must be a string")],
)
def test_mzsre_bad_field(tmp_path: Path, field: str, value, reason: str) -> None:
    records = [{"en": mzsre_block("a"), "cz": mzsre_block("b")} for _ in range(3)]
    if value is None:
        del records[2]["cz"][field]
    else:
        records[2]["cz"][field] = value
    path = tmp_path / "mzsre_test_duplicate_encz.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    with pytest.raises(RecordError) as info:
        read_mzsre(tmp_path, ["cs"])
    message = str(info.value)
    assert str(path) in message and "record #2" in message and f"cz.{field}" in message and reason in message


def test_mzsre_small_folder_and_portability_optional(tmp_path: Path) -> None:
    first, second = mzsre_block("a"), mzsre_block("b")
    del second["portability"]
    (tmp_path / "mzsre_test_duplicate_enzh.json").write_text(
        json.dumps([{"en": first, "zh": first}, {"en": second, "zh": second}]), encoding="utf-8"
    )
    (tmp_path / "unrelated.json").write_text("not json", encoding="utf-8")
    records = read_mzsre(tmp_path)
    assert [r.id for r in records] == ["mzsre-0", "mzsre-1"]
    assert list(records[0].languages) == ["en", "zh"]
    assert records[0].facts("zh").locality[0].prompt == "who sang it"
    assert records[1].facts("en").portability == ()


# ------------------------------------------------------------------- demo


def test_demo_records_are_complete() -> None:
    records = demo_records()
    assert len(records) >= 24
    assert len({r.id for r in records}) == len(records)
    for record in records:
        assert DEMO_LANGUAGES <= set(record.languages), record.id
        for lang in DEMO_LANGUAGES:
            facts = record.facts(lang)
            where = f"{record.id}/{lang}"
            assert facts.subject and facts.prompt and facts.target_new, where
            assert facts.target_true, where
            assert facts.target_true != facts.target_new, where
            assert facts.paraphrases and all(facts.paraphrases), where
            for probes in (facts.locality, facts.portability):
                assert probes, where
                assert all(p.prompt and p.answer for p in probes), where


# ------------------------------------------------------------------ JSONL


def test_jsonl_round_trip(tmp_path: Path, mzsre_records: list[EditRecord]) -> None:
    handmade = EditRecord(
        id="hand-1",
        languages={
            "en": LanguageFacts(
                subject="Paris",
                prompt="Paris is the capital of",
                target_new="Italy",
                target_true="France",
                paraphrases=("The capital city Paris belongs to", "Paris is located in"),
                locality=(Probe("Berlin is the capital of", "Germany"),),
                portability=(Probe("The Eiffel Tower is in the country of", "Italy", ("Italia",)),),
                multi_hop=(Probe("The currency of the country whose capital is Paris is", "euro", ("EUR", "€")),),
            ),
            "zh": LanguageFacts(subject="巴黎", prompt="巴黎是哪个国家的首都？", target_new="意大利"),
        },
    )
    records = [*mzsre_records[:5], handmade]
    lines = [json.dumps(r.to_dict(), ensure_ascii=False) for r in records]
    lines.insert(2, "")  # blank lines are allowed
    lines.insert(4, "   ")
    path = write_lines(tmp_path / "edits.jsonl", lines)
    assert read_jsonl(path) == records
    assert read_jsonl(str(path)) == records


_text = st.text(min_size=1, max_size=12).map(str.strip).filter(bool)
_probe = st.builds(Probe, prompt=_text, answer=_text, aliases=st.lists(_text, max_size=2).map(tuple))
_facts = st.builds(
    LanguageFacts,
    subject=_text,
    prompt=_text,
    target_new=_text,
    target_true=st.none() | _text,
    paraphrases=st.lists(_text, max_size=2).map(tuple),
    locality=st.lists(_probe, max_size=2).map(tuple),
    portability=st.lists(_probe, max_size=2).map(tuple),
    multi_hop=st.lists(_probe, max_size=2).map(tuple),
)
_record = st.builds(
    EditRecord,
    id=_text,
    languages=st.dictionaries(st.sampled_from(["en", "zh", "th", "de"]), _facts, min_size=1, max_size=3),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(_record, min_size=1, max_size=3, unique_by=lambda r: r.id))
def test_jsonl_round_trip_any_text(tmp_path: Path, records: list[EditRecord]) -> None:
    # Any unicode (line separators, quotes, CJK) must survive the one-line-per-record form.
    path = write_lines(tmp_path / "any.jsonl", [json.dumps(r.to_dict(), ensure_ascii=False) for r in records])
    assert read_jsonl(path) == records


def _missing_target(rec: dict) -> dict:
    del rec["languages"]["de"]["target_new"]
    return rec


def _empty_prompt(rec: dict) -> dict:
    rec["languages"]["de"]["prompt"] = "   "
    return rec


def _bad_language(rec: dict) -> dict:
    rec["languages"]["eng"] = rec["languages"].pop("en")
    return rec


def _duplicate_id(rec: dict) -> dict:
    rec["id"] = "r0"
    return rec


@pytest.mark.parametrize(
    ("break_record", "field", "reason"),
    [
        (_missing_target, "languages.de.target_new", "is missing"),
        (_empty_prompt, "languages.de.prompt", "is empty"),
        (_bad_language, "languages.eng", "ISO 639-1"),
        (_duplicate_id, "'id'", "duplicate id"),
    ],
    ids=["missing-field", "empty-field", "bad-language", "duplicate-id"],
)
def test_jsonl_bad_record(tmp_path: Path, break_record, field: str, reason: str) -> None:
    bad = break_record(native("r1"))
    path = write_lines(
        tmp_path / "bad.jsonl", [json.dumps(native("r0")), "", json.dumps(bad), json.dumps(native("r2"))]
    )
    with pytest.raises(RecordError) as info:
        read_jsonl(path)
    message = str(info.value)
    assert str(path) in message
    assert "record #1" in message  # record index counts records, not blank lines ...
    assert "line 3" in message  # ... and the line number is given as well
    assert field in message and reason in message


def test_jsonl_malformed_json(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "broken.jsonl", [json.dumps(native("r0")), '{"id": "r1", "languages": {'])
    with pytest.raises(RecordError) as info:
        read_jsonl(path)
    message = str(info.value)
    assert str(path) in message and "record #1" in message and "line 2" in message
    assert "invalid JSON" in message and "column" in message
    assert info.value.source == str(path) and info.value.index == 1


def test_jsonl_blank_file_is_empty(tmp_path: Path) -> None:
    assert read_jsonl(write_lines(tmp_path / "empty.jsonl", ["", "  "])) == []


# ------------------------------------------------------------- DataModule


@pytest.fixture
def six_records(tmp_path: Path) -> Path:
    records = [native(f"r{i}", ("en", "de", "zh", "ru")) for i in range(6)]
    del records[4]["languages"]["ru"]  # r4 lacks Russian
    return write_records(tmp_path / "six.jsonl", records)


def test_datamodule_validates_arguments(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"\['demo', 'auto', 'jsonl', 'mzsre', 'bizsre', 'mkeb', 'mlake', 'mquake', 'zsre'\]"
    ):
        EditDataModule(format="csv")
    with pytest.raises(ValueError, match="needs a path"):
        EditDataModule(format="jsonl")
    with pytest.raises(ValueError, match="needs a path"):
        EditDataModule(format="mzsre")
    with pytest.raises(ValueError, match="limit"):
        EditDataModule(limit=0)
    with pytest.raises(ValueError, match="offset"):
        EditDataModule(offset=-1)
    with pytest.raises(ValueError, match="batch_size"):
        EditDataModule(batch_size=0)


def test_datamodule_limit_offset(six_records: Path) -> None:
    dm = EditDataModule(path=str(six_records), format="jsonl", limit=2, offset=1)
    dm.setup("fit")
    first = dm.records
    assert [r.id for r in first] == ["r1", "r2"]
    dm.setup("test")  # idempotent: nothing is read again
    assert dm.records is first
    assert [r.id for r in EditDataModule(path=str(six_records), format="jsonl", offset=5).records] == ["r5"]
    with pytest.raises(RecordError, match="no records selected"):
        EditDataModule(path=str(six_records), format="jsonl", offset=6).setup()


def test_datamodule_eval_languages(six_records: Path) -> None:
    path = str(six_records)
    # Default: languages shared by all selected records, edit language first.
    assert EditDataModule(path=path, format="jsonl", edit_language="zh").eval_languages == ["zh", "en", "de"]
    assert EditDataModule(path=path, format="jsonl", limit=4).eval_languages == ["en", "de", "zh", "ru"]
    # Given: edit language moved (or added) to the front, order otherwise kept.
    dm = EditDataModule(path=path, format="jsonl", edit_language="de", eval_languages=["zh", "de", "en"])
    assert dm.edit_language == "de"
    assert dm.eval_languages == ["de", "zh", "en"]
    dm = EditDataModule(path=path, format="jsonl", edit_language="ru", eval_languages=["zh"], limit=3)
    assert dm.eval_languages == ["ru", "zh"]


def test_datamodule_missing_language(six_records: Path) -> None:
    dm = EditDataModule(path=str(six_records), format="jsonl", eval_languages=["de", "ru"], offset=2)
    with pytest.raises(RecordError) as info:
        dm.setup()
    message = str(info.value)
    assert str(six_records) in message and "record #4" in message and "'r4'" in message
    assert "languages.ru" in message and "'ru' is missing" in message
    with pytest.raises(RecordError, match="'fr' is missing"):
        EditDataModule(path=str(six_records), format="jsonl", edit_language="fr").setup()


def test_datamodule_dataloaders_yield_record_lists(six_records: Path) -> None:
    dm = EditDataModule(path=str(six_records), format="jsonl", batch_size=2, limit=5)
    dm.setup()
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        batches = list(loader)
        assert [len(b) for b in batches] == [2, 2, 1]
        assert all(isinstance(b, EditBatch) and all(isinstance(r, EditRecord) for r in b) for b in batches)
        assert [r.id for b in batches for r in b] == ["r0", "r1", "r2", "r3", "r4"]


def test_datamodule_hparams_and_pickle(six_records: Path) -> None:
    dm = EditDataModule(path=str(six_records), format="jsonl", eval_languages=["de"], limit=3, batch_size=2)
    assert dm.hparams["format"] == "jsonl" and dm.hparams["eval_languages"] == ["de"]
    assert dm.hparams["limit"] == 3 and dm.hparams["batch_size"] == 2
    dm.setup()
    clone = pickle.loads(pickle.dumps(dm))
    assert clone.records == dm.records and clone.eval_languages == ["en", "de"]
    pickle.dumps(dm.train_dataloader())


def test_datamodule_mzsre(mzsre_dir: Path) -> None:
    dm = EditDataModule(
        path=str(mzsre_dir), format="mzsre", edit_language="en", eval_languages=["de", "zh"], limit=3, offset=10
    )
    dm.setup()
    assert dm.eval_languages == ["en", "de", "zh"]
    assert [r.id for r in dm.records] == ["mzsre-10", "mzsre-11", "mzsre-12"]
    assert all(list(r.languages) == ["en", "de", "zh"] for r in dm.records)


def test_datamodule_demo_ignores_path() -> None:
    dm = EditDataModule(path="/does/not/exist")
    assert dm.format == "demo"
    assert set(dm.eval_languages) >= DEMO_LANGUAGES and dm.eval_languages[0] == "en"
    assert len(dm.records) >= 24


def test_datamodule_from_yaml(mzsre_dir: Path) -> None:
    # The same parser LightningCLI uses for `data: {class_path, init_args}`.
    import lightning as L
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningDataModule, "data")
    config = parser.parse_string(
        "data:\n"
        "  class_path: mke_lightning.data.EditDataModule\n"
        f"  init_args: {{format: mzsre, path: {mzsre_dir}, edit_language: en, "
        "eval_languages: [en, de, zh], limit: 2}\n"
    )
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in 4.49
    dm = instantiate(config).data
    assert isinstance(dm, EditDataModule)
    assert dm.eval_languages == ["en", "de", "zh"] and len(dm.records) == 2

"""Every benchmark adapter on the real files in ../shared/data, format
detection, and the bad-input errors (file, record index and id, field)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mke_lightning.data import (
    EditDataModule,
    detect_format,
    open_source,
    read_bizsre,
    read_jsonl,
    read_mkeb,
    read_mlake,
    read_mquake,
    read_mzsre,
    read_zsre,
)
from mke_lightning.data.mzsre import MzsreParser
from mke_lightning.data.records import EditRecord, LanguageFacts, Probe, RecordError

MZSRE_LANGUAGES = ["cs", "de", "en", "es", "fr", "nl", "pt", "ru", "th", "tr", "vi", "zh"]
MLAKE_LANGUAGES = ["de", "en", "fr", "ja", "zh"]
MLAKE_NEW_QUESTIONS = {"de": 731, "en": 1024, "fr": 701, "ja": 909, "zh": 789}


def write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def mkeb_item(example_id=1, langs=("en", "de")) -> dict:
    """One MKEB record in the MEMLA schema (the data itself is unpublished)."""
    words = {
        "en": (
            "{} is a citizen of",
            "Danielle Darrieux",
            "England",
            "France",
            "Danielle Darrieux holds citizenship of",
            "Jean Gabin is a citizen of",
            "France",
            "The capital of the country of Danielle Darrieux is",
            "London",
        ),
        "de": (
            "{} ist Staatsbürger von",
            "Danielle Darrieux",
            "England",
            "Frankreich",
            "Danielle Darrieux besitzt die Staatsbürgerschaft von",
            "Jean Gabin ist Staatsbürger von",
            "Frankreich",
            "Die Hauptstadt des Landes von Danielle Darrieux ist",
            "London",
        ),
        "fr": (
            "{} est citoyenne de",
            "Danielle Darrieux",
            "Angleterre",
            "France",
            "Danielle Darrieux a la nationalité de",
            "Jean Gabin est citoyen de",
            "France",
            "La capitale du pays de Danielle Darrieux est",
            "Londres",
        ),
    }
    pick = {lang: words[lang] for lang in langs}
    return {
        "example_id": example_id,
        "relation_description": "country of citizenship",
        "edit": {
            l: {"prompt": w[0], "subject": w[1], "target_new": w[2], "target_true": w[3]} for l, w in pick.items()
        },
        "paraphrase_prompts": {l: [w[4]] for l, w in pick.items()},
        "neighborhood_prompts": {l: [w[5]] for l, w in pick.items()},
        "neighborhood_answers": {l: [w[6]] for l, w in pick.items()},
        "multi_hop_questions": {l: [w[7]] for l, w in pick.items()},
        "multi_hop_new_answer": {l: w[8] for l, w in pick.items()},
    }


# ------------------------------------------------------------------ MzsRE


def test_mzsre_any_edit_language_and_eval_languages_across_files(shared_data: Path) -> None:
    folder = shared_data / "mzsre"
    # de and zh come together from the X-Y pair file, en and th from the en<X> files.
    parser = MzsreParser(folder, ["de", "zh", "en", "th"])
    assert sorted(Path(f.path).name for f in parser.files) == [
        "mzsre_test_duplicate_dezh.json", "mzsre_test_duplicate_enth.json"
    ]
    dm = EditDataModule(path=str(folder), format="mzsre", edit_language="de", eval_languages=["zh", "en", "th"])
    dm.setup()
    assert dm.eval_languages == ["de", "zh", "en", "th"]
    assert len(dm.records) == 743
    # A language block is the same whichever file it comes from.
    from_pairs = read_mzsre(folder / "mzsre_test_duplicate_dezh.json")
    from_en_files = read_mzsre(folder, ["de", "zh"])
    assert [r.languages["de"] for r in from_pairs] == [r.languages["de"] for r in from_en_files]
    assert [r.facts("zh") for r in dm.records] == [r.facts("zh") for r in from_pairs]


def test_mzsre_counts_per_language(shared_data: Path) -> None:
    source = open_source(shared_data / "mzsre")
    assert len(source) == 743
    assert source.signatures == [tuple(MZSRE_LANGUAGES)]  # every record has all 12


# --------------------------------------------------------------- Bi-ZsRE


def test_bizsre_real_file(shared_data: Path) -> None:
    records = read_bizsre(shared_data / "bi-zsre" / "bizsre_test.first15.json")
    assert len(records) == 15
    assert [r.id for r in records] == [f"bizsre-{i}" for i in range(15)]
    assert records[0] == EditRecord(
        id="bizsre-0",
        languages={
            "en": LanguageFacts(
                subject="IAAF Combined Events Challenge",
                prompt="When was the inception of IAAF Combined Events Challenge?",
                target_new="2006",
                paraphrases=("When was the IAAF Combined Events Challenge launched?",),
                locality=(Probe("what is the name of the last episode of spongebob", "The String"),),
                portability=(Probe(
                    "What type of sports event is the IAAF Combined Events Challenge, which was established in 2006?",
                    "Athletics",
                ),),
            ),
            "zh": LanguageFacts(
                subject="IAAF综合项目挑战赛",
                prompt="IAAF综合项目挑战赛的创立时间是什么时候？",
                target_new="2006年",
                paraphrases=("IAAF综合项目挑战赛是在什么时候推出的？",),
                locality=(Probe("海绵宝宝的最后一集叫什么名字", "The String"),),
                portability=(Probe("IAAF综合项目挑战赛是什么类型的体育赛事？它是在2006年成立的。", "田径"),),
            ),
        },
    )


# ------------------------------------------------------------------ MLaKE


def test_mlake_real_files(shared_data: Path) -> None:
    source = open_source(shared_data / "mlake")
    assert len(source) == 1072
    assert source.signatures == [tuple(MLAKE_LANGUAGES)]  # 1,072 single-hop records in each language
    notes = source.notes()
    # Every new_* question is linked to its edit or counted as unlinked.
    for lang, total in MLAKE_NEW_QUESTIONS.items():
        assert notes["multi_hop_linked"][lang] + notes["multi_hop_unlinked"][lang] == total
    assert notes["multi_hop_unlinked"] == {lang: 0 for lang in MLAKE_LANGUAGES}
    linked = {lang: sum(len(r.facts(lang).multi_hop) for r in source) for lang in MLAKE_LANGUAGES}
    assert linked == notes["multi_hop_linked"]

    record = source[0]
    assert record.id == "mlake-0"
    en = record.facts("en")
    assert (en.subject, en.prompt, en.target_new, en.target_true) == (
        None, "Where did Carl Sagan work during his career?", "BBC", "Cornell University"
    )
    assert en.target_new_aliases == () and en.paraphrases == () and en.locality == ()
    assert [p.prompt for p in en.multi_hop] == [
        "In which country is the institution where Carl Sagan was employed located?",
        "Where is the primary headquarters of the institution where Carl Sagan was employed located?",
        "By whom was the institution where Carl Sagan worked established?",
    ]
    assert en.multi_hop[0].answer == "United Kingdom" and "UK" in en.multi_hop[0].aliases
    ja = record.facts("ja")
    assert (ja.target_new, ja.target_new_aliases, ja.target_true) == (
        "英国放送協会",
        ("BBC", "イギリス放送協会"),
        "コーネル大学",
    )
    assert ja.multi_hop[0] == Probe(
        "カール・セーガンが勤務していた機関はどの国に位置していますか？",
        "イギリス",
        ("英国", "グレートブリテン及び北アイルランド連合王国", "連合王国", "エゲレス", "英吉利", "大不列顛"),
    )


def test_mlake_unlinked_questions_are_counted_and_reported(shared_data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "dataset"
    (folder / "single_hop").mkdir(parents=True)
    (folder / "multi_hop").mkdir()
    for lang in ("en", "de"):
        items = json.loads((shared_data / "mlake" / "dataset" / "single_hop" / f"{lang}_qa.json").read_text("utf-8"))[
            :3
        ]
        write_json(folder / "single_hop" / f"{lang}_qa.json", items)
        questions = json.loads(
            (shared_data / "mlake" / "dataset" / "multi_hop" / f"new_{lang}_qa.json").read_text("utf-8")
        )
        keep = [q for q in questions if q["e_prompt"] in {i["e_prompt"] for i in json.loads(
            (folder / "single_hop" / "en_qa.json").read_text("utf-8"))}]
        keep.append({**keep[0], "e_prompt": "An edit that is not in the single-hop files."})
        write_json(folder / "multi_hop" / f"new_{lang}_qa.json", keep)
    records = read_mlake(tmp_path, ["de"])
    assert len(records) == 3 and all(list(r.languages) == ["de"] for r in records)
    dm = EditDataModule(path=str(tmp_path), format="auto", edit_language="en", eval_languages=["de"])
    with pytest.warns(UserWarning, match=r"2 multi-hop questions link to no edit"):
        dm.setup()
    assert dm.notes["multi_hop_unlinked"] == {"en": 1, "de": 1}


# ----------------------------------------------------------------- MQuAKE


def test_mquake_hard_real_file(shared_data: Path) -> None:
    source = open_source(shared_data / "mquake" / "datasets" / "MQuAKE-hard.json")
    records = list(source)
    assert len(records) == 429 * 4
    cases: dict[str, list[EditRecord]] = {}
    for record in records:
        cases.setdefault(record.case, []).append(record)
    assert len(cases) == 429 and all(len(edits) == 4 for edits in cases.values())
    # The multi-hop questions sit on the last edit of a case only.
    assert all(
        [bool(r.facts("en").multi_hop) for r in edits] == [False, False, False, True] for edits in cases.values()
    )

    first = cases["mquake-7417"]
    assert [r.id for r in first] == [f"mquake-7417-{k}" for k in range(4)]
    assert first[0].facts("en") == LanguageFacts(
        subject="Hey Jude",
        prompt="Hey Jude was performed by",
        target_new="Madonna",
        target_true="The Beatles",
        paraphrases=("Who performed Hey Jude?",),
        target_new_aliases=("Madonna Ciccone", "Madonna Louise Ciccone", "Madonna Louise Veronica Ciccone"),
    )
    last = first[3].facts("en")
    assert (last.prompt, last.target_new, last.target_true) == (
        "The official language of Australia is",
        "Arabic",
        "English",
    )
    assert len(last.multi_hop) == 3
    assert last.multi_hop[0] == Probe(
        "What is the official language of the country of citizenship of the director/manager of "
        '"Hey Jude"\'s performer?',
        "Arabic",
        ("ar", "Arabian language", "Arabic language"),
    )


# ------------------------------------------------------------------- zsRE


def test_zsre_real_file(shared_data: Path) -> None:
    records = read_zsre(shared_data / "zsre" / "zsre_mend_eval.first11.json")
    assert len(records) == 11
    assert records[0] == EditRecord(
        id="zsre-0",
        languages={"en": LanguageFacts(
            subject="Watts Humphrey",
            prompt="What university did Watts Humphrey attend?",
            target_new="University of Michigan",
            target_true="Illinois Institute of Technology",
            paraphrases=("What university did Watts Humphrey take part in?",),
            locality=(Probe("who played desmond doss father in hacksaw ridge", "Hugo Weaving"),),
        )},
    )


# ------------------------------------------------------------------- MKEB


def test_mkeb_records_written_in_its_schema(tmp_path: Path) -> None:
    path = write_json(tmp_path / "mkeb.json", [mkeb_item(1, ("en", "de", "fr")), mkeb_item("b2", ("en", "de"))])
    records = read_mkeb(path)
    assert [r.id for r in records] == ["mkeb-1", "mkeb-b2"]
    assert list(records[0].languages) == ["en", "de", "fr"]
    assert records[0].facts("fr") == LanguageFacts(
        subject="Danielle Darrieux",
        prompt="Danielle Darrieux est citoyenne de",
        target_new="Angleterre",
        target_true="France",
        paraphrases=("Danielle Darrieux a la nationalité de",),
        locality=(Probe("Jean Gabin est citoyen de", "France"),),
        multi_hop=(Probe("La capitale du pays de Danielle Darrieux est", "Londres"),),
    )
    # The multi-hop fields are optional as a pair.
    plain = mkeb_item(3)
    del plain["multi_hop_questions"], plain["multi_hop_new_answer"]
    assert read_mkeb(write_json(tmp_path / "plain.json", [plain]))[0].facts("en").multi_hop == ()


# ------------------------------------------------------------------ JSONL


def test_jsonl_keeps_case_subjectless_blocks_and_aliases(tmp_path: Path) -> None:
    record = EditRecord(
        id="j1",
        case="c1",
        languages={
            "en": LanguageFacts(
                subject=None, prompt="Where did Ann work?", target_new="BBC", target_new_aliases=("B.B.C.",)
            )
        },
    )
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(record.to_dict()) + "\n", encoding="utf-8")
    assert read_jsonl(path) == [record]
    assert "subject" not in record.to_dict()["languages"]["en"]


# -------------------------------------------------------------- detection


def test_detect_format_of_every_real_layout(shared_data: Path, tmp_path: Path) -> None:
    cases = {
        shared_data / "mzsre": "mzsre",
        shared_data / "mzsre" / "mzsre_test_duplicate_dezh.json": "mzsre",
        shared_data / "bi-zsre" / "bizsre_test.first15.json": "bizsre",
        shared_data / "mlake": "mlake",
        shared_data / "mlake" / "dataset": "mlake",
        shared_data / "mquake" / "datasets" / "MQuAKE-hard.json": "mquake",
        shared_data / "zsre" / "zsre_mend_eval.first11.json": "zsre",
        write_json(tmp_path / "mkeb.json", [mkeb_item()]): "mkeb",
    }
    native = tmp_path / "edits.jsonl"
    native.write_text(json.dumps(read_zsre(shared_data / "zsre" / "zsre_mend_eval.first11.json")[0].to_dict()) + "\n")
    cases[native] = "jsonl"
    for path, expected in cases.items():
        assert detect_format(path) == expected, path


def test_detect_format_refuses_ambiguous_and_unknown_data(shared_data: Path, tmp_path: Path) -> None:
    # Bi-ZsRE and MzsRE share one schema: under another name the file is ambiguous.
    renamed = shutil.copy(shared_data / "bi-zsre" / "bizsre_test.first15.json", tmp_path / "my_edits.json")
    with pytest.raises(RecordError, match=r"ambiguous: the data fits mzsre and bizsre; set it \(data.format: mzsre\)"):
        detect_format(renamed)
    with pytest.raises(RecordError, match="cannot detect the format from the first record"):
        detect_format(write_json(tmp_path / "odd.json", [{"question": "?", "answer": "!"}]))
    with pytest.raises(RecordError, match="MLaKE is read from its dataset folder"):
        detect_format(shared_data / "mlake" / "dataset" / "single_hop" / "en_qa.json")
    (tmp_path / "x.jsonl").write_text('{"src": "a"}\n', encoding="utf-8")
    with pytest.raises(RecordError, match="not a native record"):
        detect_format(tmp_path / "x.jsonl")
    with pytest.raises(RecordError, match="holds no records"):
        detect_format(write_json(tmp_path / "empty.json", []))
    with pytest.raises(RecordError, match="expected MzsRE pair files"):
        detect_format(tmp_path)
    # The DataModule gives the same error for format: auto.
    with pytest.raises(RecordError, match="ambiguous"):
        EditDataModule(path=str(renamed), format="auto").setup()


# -------------------------------------------------------------- bad input


def error_of(read, path) -> RecordError:
    with pytest.raises(RecordError) as info:
        read(path)
    return info.value


def check_names(err: RecordError, path: Path, index: int, record_id: str | None, field: str | None) -> None:
    message = str(err)
    assert err.source == str(path) and f"file {path}" in message
    assert err.index == index and f"record #{index}" in message
    if record_id is not None:
        assert err.record_id == record_id and repr(record_id) in message
    if field is not None:
        assert err.field == field and repr(field) in message


def test_malformed_json_array_names_file_record_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text(f'[\n  {json.dumps(mkeb_item())},\n  {{"example_id": 2,, "edit": {{}}}}\n]\n', encoding="utf-8")
    err = error_of(read_mkeb, path)
    check_names(err, path, 1, None, None)
    assert "invalid JSON at line 3, column 20" in str(err)
    # A broken array cannot be skipped past: the rest of the file cannot be located.
    with pytest.raises(RecordError, match="invalid JSON"):
        open_source(path, "mkeb", on_error="skip")
    path.write_text(f"[{json.dumps(mkeb_item())}", encoding="utf-8")
    assert "the list is not closed" in str(error_of(read_mkeb, path))


def test_missing_and_empty_fields(shared_data: Path, tmp_path: Path) -> None:
    items = json.loads((shared_data / "zsre" / "zsre_mend_eval.first11.json").read_text("utf-8"))[:3]
    del items[1]["alt"]
    path = write_json(tmp_path / "zsre.json", items)
    check_names(error_of(read_zsre, path), path, 1, "zsre-1", "alt")
    items[1]["alt"] = "  "
    err = error_of(read_zsre, write_json(path, items))
    check_names(err, path, 1, "zsre-1", "alt")
    assert "is empty" in str(err) and "(line " in str(err)

    pairs = json.loads((shared_data / "mzsre" / "mzsre_test_duplicate_encz.json").read_text("utf-8"))[:4]
    del pairs[2]["cz"]["rephrase"]
    path = write_json(tmp_path / "mzsre_test_duplicate_encz.json", pairs)
    check_names(error_of(read_mzsre, path), path, 2, "mzsre-2", "cz.rephrase")


def test_unknown_language_codes(tmp_path: Path) -> None:
    item = mkeb_item()
    item["edit"]["eng"] = item["edit"].pop("en")
    path = write_json(tmp_path / "mkeb.json", [mkeb_item(0), item])
    err = error_of(read_mkeb, path)
    check_names(err, path, 1, "mkeb-1", "edit.eng")
    assert "ISO 639-1" in str(err)
    # Requested languages are checked too; a dataset's own code gets a hint.
    with pytest.raises(
        ValueError, match=r"'cz' is not an ISO 639-1 language code \(mzsre writes 'cs' as 'cz': use 'cs'\)"
    ):
        EditDataModule(path="x", format="mzsre", eval_languages=["en", "cz"])
    with pytest.raises(ValueError, match="edit_language: 'EN' is not an ISO 639-1"):
        EditDataModule(edit_language="EN")


def test_language_missing_from_a_record(tmp_path: Path) -> None:
    item = mkeb_item(7, ("en", "fr"))
    del item["paraphrase_prompts"]["fr"]
    path = write_json(tmp_path / "mkeb.json", [item])
    err = error_of(read_mkeb, path)
    check_names(err, path, 0, "mkeb-7", "paraphrase_prompts.fr")
    assert "is missing (the record edits in 'fr')" in str(err)
    # A language the run needs but a record lacks: named by the DataModule.
    path = write_json(tmp_path / "two.json", [mkeb_item(1, ("en", "de", "fr")), mkeb_item(2, ("en", "de"))])
    with pytest.raises(RecordError) as info:
        EditDataModule(path=str(path), format="mkeb", eval_languages=["de", "fr"]).setup()
    check_names(info.value, path, 1, "mkeb-2", "languages.fr")


def test_prompt_without_subject_slot(shared_data: Path, tmp_path: Path) -> None:
    cases = json.loads((shared_data / "mquake" / "datasets" / "MQuAKE-hard.json").read_text("utf-8"))[:2]
    cases[1]["requested_rewrite"][2]["prompt"] = "The director of Madonna is"
    path = write_json(tmp_path / "mquake.json", cases)
    err = error_of(read_mquake, path)
    check_names(err, path, 1, f"mquake-{cases[1]['case_id']}", "requested_rewrite[2].prompt")
    assert "no '{}' slot for the subject" in str(err)
    item = mkeb_item()
    item["edit"]["de"]["prompt"] = "Danielle Darrieux ist Staatsbürgerin von"
    path = write_json(tmp_path / "mkeb.json", [item])
    check_names(error_of(read_mkeb, path), path, 0, "mkeb-1", "edit.de.prompt")


def test_duplicate_ids(tmp_path: Path) -> None:
    path = write_json(tmp_path / "mkeb.json", [mkeb_item(1), mkeb_item(2), mkeb_item(1)])
    err = error_of(read_mkeb, path)
    check_names(err, path, 2, "mkeb-1", "id")
    assert "duplicate id (first seen at record #0)" in str(err)


def test_files_read_side_by_side_must_align(shared_data: Path, tmp_path: Path) -> None:
    for name, keep in (("mzsre_test_duplicate_ende.json", 5), ("mzsre_test_duplicate_enfr.json", 4)):
        items = json.loads((shared_data / "mzsre" / name).read_text("utf-8"))[:keep]
        write_json(tmp_path / name, items)
    with pytest.raises(RecordError, match="has fewer records than"):
        read_mzsre(tmp_path, ["de", "fr"])

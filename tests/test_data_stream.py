"""Streaming, sharding over ranks, subsets, ``on_error: skip``, and a
property test: every adapter, fed mutated records, either parses them into
valid records or raises RecordError naming the file, record and field."""

from __future__ import annotations

import copy
import functools
import json
import tempfile
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import SHARED_DATA
from mke_lightning.data import EditDataModule, open_source, spans
from mke_lightning.data.records import EditRecord, RecordError, is_language_code
from mke_lightning.data.spans import ItemFile
from test_data_formats import mkeb_item

FAST = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


def native(rid: str, langs=("en", "de")) -> dict:
    block = {
        "subject": f"S{rid}",
        "prompt": f"The capital of {rid} is",
        "target_new": f"N{rid}",
        "target_true": f"O{rid}",
    }
    return {"id": rid, "languages": {lang: dict(block) for lang in langs}}


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    path.write_text(
        "".join((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n" for line in lines),
        "utf-8",
    )
    return path


def ranks(world_size: int):
    return [SimpleNamespace(global_rank=r, world_size=world_size) for r in range(world_size)]


# ---------------------------------------------------------------- sharding


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", [None, 7])
def test_shards_cover_every_record_exactly_once(tmp_path: Path, world_size: int, seed: int | None) -> None:
    path = write_jsonl(tmp_path / "ten.jsonl", [native(f"r{i}") for i in range(10)])  # 10: no multiple of 3 or 4
    shards = []
    for trainer in ranks(world_size):
        dm = EditDataModule(path=str(path), format="jsonl", seed=seed, batch_size=2)
        dm.trainer = trainer
        dm.setup("fit")
        served = [r.id for batch in dm.train_dataloader() for r in batch]
        assert served == dm.records.ids
        assert dm.num_selected == 10
        shards.append(served)
    flat = [rid for shard in shards for rid in shard]
    assert sorted(flat) == sorted(f"r{i}" for i in range(10))  # union = all ...
    assert len(set(flat)) == len(flat)  # ... and no record twice
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    if seed is None:  # dealt in file order: rank 0 gets r0, r<R>, r<2R> ...
        assert shards[0][:2] == ["r0", f"r{world_size}"]
    # Deterministic: the same seed gives the same shards; the run's order is the shards interleaved.
    again = EditDataModule(path=str(path), format="jsonl", seed=seed)
    again.trainer = ranks(world_size)[-1]
    assert again.records.ids == shards[-1]
    order = again.all_records.ids
    assert [order[i] for i in range(world_size - 1, 10, world_size)] == shards[-1]


def test_seed_changes_the_order_not_the_records(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "ten.jsonl", [native(f"r{i}") for i in range(10)])
    orders = {seed: EditDataModule(path=str(path), format="jsonl", seed=seed).records.ids for seed in (None, 1, 2)}
    assert orders[None] == [f"r{i}" for i in range(10)]
    assert orders[1] != orders[None] and orders[1] != orders[2]
    assert sorted(orders[1]) == sorted(orders[2]) == sorted(orders[None])


def test_mquake_cases_stay_on_one_rank(shared_data: Path, tmp_path: Path) -> None:
    cases = json.loads((shared_data / "mquake" / "datasets" / "MQuAKE-hard.json").read_text("utf-8"))[:7]
    path = tmp_path / "mquake.json"
    path.write_text(json.dumps(cases), "utf-8")
    owner: dict[str, int] = {}
    total = 0
    for rank, trainer in enumerate(ranks(3)):
        dm = EditDataModule(path=str(path), format="mquake", seed=3)
        dm.trainer = trainer
        for record in dm.records:
            assert owner.setdefault(record.case, rank) == rank
            total += 1
    assert total == 7 * 4 and len(owner) == 7


def test_reshards_when_the_rank_becomes_known(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "six.jsonl", [native(f"r{i}") for i in range(6)])
    dm = EditDataModule(path=str(path), format="jsonl")
    assert len(dm.records) == 6  # no trainer yet: one rank
    dm.trainer = SimpleNamespace(global_rank=1, world_size=2)
    dm.setup("fit")
    assert dm.records.ids == ["r1", "r3", "r5"]


def test_too_few_records_for_the_ranks(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "two.jsonl", [native("a"), native("b")])
    dm = EditDataModule(path=str(path), format="jsonl")
    dm.trainer = SimpleNamespace(global_rank=0, world_size=3)
    with pytest.raises(RecordError, match="cannot give each of 3 ranks at least one"):
        dm.setup()


def test_ids_offset_limit_select_reproducibly(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "ten.jsonl", [native(f"r{i}") for i in range(10)])
    dm = EditDataModule(path=str(path), format="jsonl", ids=["r7", "r2", "r5", "r3"], offset=1, limit=2)
    assert dm.records.ids == ["r3", "r5"]  # ids keep file order; then offset, then limit
    with pytest.raises(RecordError, match=r"2 of the requested ids are not in the data: \['nope', 'r99'\]"):
        EditDataModule(path=str(path), format="jsonl", ids=["r1", "nope", "r99"]).setup()


# ------------------------------------------------------------------ skipping


def test_skip_mode_counts_and_reports_bad_records(tmp_path: Path) -> None:
    missing = native("r2")
    del missing["languages"]["de"]["target_new"]
    bad_code = native("r5")
    bad_code["languages"]["xx"] = bad_code["languages"].pop("de")
    lacks_de = native("r7", ("en",))
    lines = [native("r0"), '{"id": "r1", "lang', missing, native("r3"), native("r0"), bad_code, native("r6"), lacks_de]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)

    with pytest.raises(RecordError, match="record #1: invalid JSON at line 2"):
        EditDataModule(path=str(path), format="jsonl").setup()

    dm = EditDataModule(path=str(path), format="jsonl", eval_languages=["de"], on_error="skip")
    with pytest.warns(UserWarning, match="5 bad records skipped") as caught:
        dm.setup("fit")
    assert dm.records.ids == ["r0", "r3", "r6"]
    assert dm.skipped == 5 and len(dm.skip_reasons) == 5
    report = str(caught[0].message)
    for expected in ("record #1: invalid JSON", "field 'languages.de.target_new': is missing",
                     "duplicate id (first seen at record #0)", "field 'languages.xx'", "id 'r7', field 'languages.de'"):
        assert expected in report
    with pytest.warns(UserWarning, match="end of fit: 5 bad records skipped"):
        dm.teardown("fit")


# ----------------------------------------------------------------- streaming


def test_array_scanner_matches_json_load_on_a_real_file(shared_data: Path, monkeypatch) -> None:
    path = shared_data / "mquake" / "datasets" / "MQuAKE-hard.json"
    monkeypatch.setattr(spans, "CHUNK", 4096)  # many chunk boundaries inside records
    items = ItemFile(path, "array")
    scanned = [value for _, value in items.scan()]
    assert scanned == json.loads(path.read_text("utf-8"))
    assert items.load(428) == scanned[428] and items.load(0) == scanned[0]
    assert set(items.lines) == {1}  # the file is one line
    pretty = ItemFile(shared_data / "bi-zsre" / "bizsre_test.first15.json", "array")
    for _ in pretty.scan():
        pass
    text = (shared_data / "bi-zsre" / "bizsre_test.first15.json").read_text("utf-8").splitlines()
    assert all(text[line - 1].strip() == "{" for line in pretty.lines) and pretty.lines[0] == 2


_json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text()
)
_json_value = st.recursive(
    _json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)


@FAST
@given(
    items=st.lists(st.dictionaries(st.text(max_size=5), _json_value, max_size=4), max_size=6),
    indent=st.sampled_from([None, 1, 4]),
    chunk=st.sampled_from([1, 2, 3, 7, 64]),
)
def test_array_scanner_any_json_any_chunk(monkeypatch, items: list[dict], indent, chunk: int) -> None:
    monkeypatch.setattr(spans, "CHUNK", chunk)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "items.json"
        path.write_text(json.dumps(items, ensure_ascii=False, indent=indent), "utf-8")
        scan = ItemFile(path, "array")
        assert [value for _, value in scan.scan()] == items
        assert [scan.load(i) for i in range(len(items))] == items
        scan.close()


def test_reading_keeps_no_records_in_memory(tmp_path: Path) -> None:
    padding = "x" * 2000  # about 2 kB a record
    path = write_jsonl(tmp_path / "big.jsonl", [{**native(f"r{i}"), "note": padding} for i in range(3000)])
    size = path.stat().st_size
    tracemalloc.start()
    source = open_source(path)
    count = sum(1 for _ in source)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == 3000
    assert peak < size / 10, f"peak {peak} bytes while reading {size} bytes"


def test_datamodule_pickles_and_serves_after_pickling(tmp_path: Path) -> None:
    import pickle

    path = write_jsonl(tmp_path / "five.jsonl", [native(f"r{i}") for i in range(5)])
    dm = EditDataModule(path=str(path), format="jsonl", seed=1)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=2)
    dm.setup()
    clone = pickle.loads(pickle.dumps(dm))
    assert clone.records == dm.records and clone.records.ids == dm.records.ids
    err = pickle.loads(pickle.dumps(RecordError("bad", source="f", index=3, record_id="x", field="y", line=4)))
    assert (err.source, err.index, err.record_id, err.field, err.line) == ("f", 3, "x", "y", 4)


# -------------------------------------------- property test: mutated records


@dataclass(repr=False)
class Case:
    """How to write one format with item #1 of one file mutated, and read it back."""

    format: str
    base: list[Any]  # the items of the file that is mutated
    target: str  # that file, relative to the folder written
    read_path: str  # what is given to the reader, relative to the folder
    extra: dict[str, list[Any]]  # other files of the data set, unchanged
    per_item: Callable[[Any], int] = lambda item: 1  # records an intact item gives
    fixed: int = 0  # records that come from the other files
    jsonl: bool = False

    def __repr__(self) -> str:
        return f"Case({self.format}, {self.target})"


def _load(path: Path, n: int) -> list[Any]:
    return json.loads(path.read_text("utf-8"))[:n]


def _cases(data: Path) -> dict[str, Case]:
    mq = [
        {k: v for k, v in c.items() if k not in ("orig", "single_hops")}
        for c in _load(data / "mquake" / "datasets" / "MQuAKE-hard.json", 3)
    ]
    hop = {lang: _load(data / "mlake" / "dataset" / "single_hop" / f"{lang}_qa.json", 3) for lang in ("en", "de")}
    keys = {item["e_prompt"] for item in hop["en"]}
    multi = {
        lang: [
            q
            for q in json.loads((data / "mlake" / "dataset" / "multi_hop" / f"new_{lang}_qa.json").read_text("utf-8"))
            if q["e_prompt"] in keys
        ]
        for lang in ("en", "de")
    }
    mlake_files = {
        "dataset/single_hop/en_qa.json": hop["en"], "dataset/single_hop/de_qa.json": hop["de"],
        "dataset/multi_hop/new_en_qa.json": multi["en"], "dataset/multi_hop/new_de_qa.json": multi["de"],
    }

    def others(files: dict[str, list], target: str) -> dict[str, list]:
        return {name: items for name, items in files.items() if name != target}

    return {
        "jsonl": Case(
            "jsonl", [native("a"), native("b", ("en", "zh")), native("c")], "e.jsonl", "e.jsonl", {}, jsonl=True
        ),
        "mzsre": Case(
            "mzsre",
            _load(data / "mzsre" / "mzsre_test_duplicate_encz.json", 3),
            "mzsre_test_duplicate_encz.json",
            ".",
            {},
        ),
        "bizsre": Case("bizsre", _load(data / "bi-zsre" / "bizsre_test.first15.json", 3), "b.json", "b.json", {}),
        "zsre": Case("zsre", _load(data / "zsre" / "zsre_mend_eval.first11.json", 3), "z.json", "z.json", {}),
        "mkeb": Case("mkeb", [mkeb_item(f"a-{i}", ("en", "fr")) for i in range(3)], "m.json", "m.json", {}),
        "mquake": Case("mquake", mq, "q.json", "q.json", {}, per_item=lambda c: len(c["requested_rewrite"])),
        "mlake-single": Case(
            "mlake",
            hop["de"],
            "dataset/single_hop/de_qa.json",
            ".",
            others(mlake_files, "dataset/single_hop/de_qa.json"),
        ),
        "mlake-multi": Case(
            "mlake",
            multi["en"],
            "dataset/multi_hop/new_en_qa.json",
            ".",
            others(mlake_files, "dataset/multi_hop/new_en_qa.json"),
            per_item=lambda q: 0,
            fixed=3,
        ),
    }


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _paths(value, prefix + (i,))
    return out


_replacement = st.one_of(
    st.none(), st.booleans(), st.integers(), st.just(""), st.just("   "), st.text(max_size=6),
    st.lists(st.text(max_size=3), max_size=2), st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
)


def _mutate(item: Any, data: st.DataObject) -> Any:
    """One random change somewhere inside ``item``: delete, replace, rename a key, drop a '{}' slot."""
    item = copy.deepcopy(item)
    path = data.draw(st.sampled_from(_paths(item)[1:]), label="path")
    parent = item
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    action = data.draw(st.sampled_from(["delete", "replace", "rename", "unslot"]), label="action")
    if action == "delete":
        del parent[last]
    elif action == "rename" and isinstance(parent, dict):
        new = data.draw(st.sampled_from(["eng", "EN", "xx", "", "cz"]) | st.text(max_size=3), label="key")
        parent[new] = parent.pop(last)
    elif action == "unslot" and isinstance(parent[last], str) and "{}" in parent[last]:
        parent[last] = parent[last].replace("{}", "it")
    else:
        parent[last] = data.draw(_replacement, label="value")
    return item


def _write(folder: Path, case: Case, items: list[Any], cut: bool) -> Path:
    for name, content in {**case.extra, case.target: items}.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if case.jsonl and name == case.target:
            lines = [json.dumps(i, ensure_ascii=False) for i in content]
            if cut:
                lines[1] = lines[1][: len(lines[1]) // 2]
            path.write_text("\n".join(lines) + "\n", "utf-8")
        else:
            path.write_text(json.dumps(content, ensure_ascii=False, indent=2), "utf-8")
    return folder / case.read_path


def _assert_valid(record: EditRecord) -> None:
    assert isinstance(record.id, str) and record.id and record.id == record.id.strip()
    assert record.languages and all(is_language_code(code) for code in record.languages)
    for facts in record.languages.values():
        texts = [facts.prompt, facts.target_new, *facts.paraphrases, *facts.target_new_aliases]
        texts += [
            t for p in (*facts.locality, *facts.portability, *facts.multi_hop) for t in (p.prompt, p.answer, *p.aliases)
        ]
        texts += [t for t in (facts.subject, facts.target_true) if t is not None]
        assert all(isinstance(t, str) and t and t == t.strip() for t in texts)


@functools.lru_cache(maxsize=1)
def all_cases() -> dict[str, Case]:
    return _cases(SHARED_DATA)


@pytest.mark.parametrize("name", ["jsonl", "mzsre", "bizsre", "zsre", "mkeb", "mquake", "mlake-single", "mlake-multi"])
@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(data=st.data())
def test_mutated_records_parse_or_name_file_record_and_field(shared_data: Path, name: str, data: st.DataObject) -> None:
    case = all_cases()[name]
    cut = case.jsonl and data.draw(st.booleans(), label="cut line")
    items = list(case.base)
    items[1] = items[1] if cut else _mutate(items[1], data)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = _write(folder, case, items, cut)
        target = str(folder / case.target)
        try:
            records = list(open_source(path, case.format))
        except RecordError as err:
            # Named: the file, the record (index, and id once known) and the field.
            assert err.source == target and f"file {target}" in str(err)
            duplicate = "duplicate id" in str(err)
            if duplicate:  # the later of the two records is named
                assert err.index in (1, 2) and err.field == "id"
            else:
                assert err.index == 1 and "record #1" in str(err)
                assert err.field is not None or "invalid JSON" in str(err)
            # Skipping leaves out exactly that record and counts it.
            skipping = open_source(path, case.format, on_error="skip")
            assert skipping.skip_reasons[0] == str(err)
            if not duplicate:  # (a duplicate MQuAKE case repeats all of its edits' ids)
                assert skipping.skipped == 1
                assert len(skipping) == case.fixed + sum(case.per_item(items[i]) for i in (0, 2))
            return
        # Parsed: every record valid, none dropped.
        for record in records:
            _assert_valid(record)
        assert len(records) == case.fixed + sum(case.per_item(item) for item in items)

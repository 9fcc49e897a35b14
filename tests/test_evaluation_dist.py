"""The aggregate is the same on 1 process and on 2 (gloo, CPU), even when the
ranks saw different languages and groups."""

from __future__ import annotations

import datetime
import json
import random
import socket

import torch.distributed as dist
import torch.multiprocessing as mp

from mke_lightning.evaluation.aggregate import EvalAggregate
from mke_lightning.evaluation.metrics import PROTOCOLS

LANGS = ["en", "de", "fr", "zh"]
MEASURES = ["reliability", "generality", "locality", "multi_hop"]


def _rows(n_records: int = 9) -> list[list[dict]]:
    """Rows per record, with values like 1/3 whose float sums depend on the order."""
    rng = random.Random(0)
    out = []
    for r in range(n_records):
        langs = LANGS if r % 3 else ["en"]  # some records only in the edit language
        rows = []
        for lang in langs:
            for measure in MEASURES:
                row = {"record_id": f"r{r}", "edit_lang": "en", "eval_lang": lang, "measure": measure,
                       "group": "edit" if lang == "en" else rng.choice(["identical", "translated"])}
                for proto in PROTOCOLS:
                    row[proto] = (
                        None
                        if proto == "prob" and measure not in ("reliability", "generality")
                        else rng.randrange(7) / 3 % 1
                    )
                rows.append(row)
        out.append(rows)
    return out


def _aggregate(records: list[list[dict]]) -> EvalAggregate:
    agg = EvalAggregate(LANGS, "en")
    for rows in records:
        k = int(rows[0]["record_id"][1:])
        agg.update(rows, edits=1)
        agg.update_perplexity({lang: 1.0 + (k % 4) / 7 for lang in {r["eval_lang"] for r in rows}})
    return agg


def _worker(rank: int, world: int, port: int, out_path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        records = _rows()
        if rank == 1:
            records = [rows for rows in records if rows[0]["record_id"] in ("r0", "r3")]  # only English rows here
        else:
            records = [rows for rows in records if rows[0]["record_id"] not in ("r0", "r3")]
        summary = _aggregate(records).compute()  # syncs: sums over both ranks
        from mke_lightning.modeling.collectives import gather_rows

        gathered = gather_rows([r for rows in records for r in rows])
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump({"summary": summary, "rows": len(gathered)}, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_aggregate_is_the_same_on_one_and_two_processes(tmp_path):
    records = _rows()
    single = json.loads(json.dumps(_aggregate(records).compute()))  # the same JSON round trip as the workers
    out = tmp_path / "two.json"
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    two = json.loads(out.read_text())
    assert two["summary"] == single
    assert two["rows"] == sum(len(r) for r in records)
    assert single["edits"] == 9 and set(single["language"]) == set(LANGS)

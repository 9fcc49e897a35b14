"""How a run's edits went, block by block of edits (for sequential runs: how they degrade).

    python bench/edit_blocks.py ~/mke-runs/mzsre-lafn-sequential/version_0 --block 25

From the run's ``edit_log.jsonl`` (in edit order), ``edits.csv`` (scores at
edit time), ``retention.csv`` (scores after the last edit, sequential runs)
and ``perplexity.csv``: per block, the edits that used every step, the edits
that failed (P(new) below ``--fail-below`` in some language, or no neuron to
change), and the mean over all evaluation languages of reliability
(token_acc / gen_em), generality and locality (token_acc) at edit time and of
reliability after the last edit. Then the failures split by neuron count and
the median perplexity ratio over languages after each measured edit.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import yaml
from shared_records import read_rows


def _mean(rows: list[dict], ids: set[str], measure: str, proto: str) -> str:
    values = [float(r[proto]) for r in rows if r["record_id"] in ids and r["measure"] == measure and r[proto] != ""]
    return f"{statistics.mean(values):.2f}" if values else "-"


def _failed(entry: dict, below: float) -> bool:
    p_new = entry.get("p_new")
    return p_new is None or math.isnan(p_new) or p_new < below


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="run log dir holding edit_log.jsonl and edits.csv")
    ap.add_argument("--block", type=int, default=25, help="edits per block")
    ap.add_argument("--fail-below", type=float, default=0.5, help="an edit fails when P(new) ends below this")
    ap.add_argument("--few-neurons", type=int, default=15, help="split failures at this neuron count")
    args = ap.parse_args()

    with (args.run / "edit_log.jsonl").open(encoding="utf-8") as f:
        log = [json.loads(line) for line in f if line.strip()]
    if not log:
        raise SystemExit(f"{args.run / 'edit_log.jsonl'}: no edits")
    edits = read_rows(args.run / "edits.csv")
    retention = read_rows(args.run / "retention.csv", missing_ok=True)
    config = yaml.safe_load((args.run / "config.yaml").read_text(encoding="utf-8"))
    max_steps = config["model"]["loss"]["max_steps"]  # the run's step cap, as it was launched

    print(f"{len(log)} edits, at most {max_steps} steps, fail: P(new) < {args.fail_below} in some language")
    print(
        "| edits | all steps | failed | reliability token_acc / gen_em | generality token_acc "
        "| locality token_acc | reliability token_acc after the last edit |"
    )
    print("|---|---|---|---|---|---|---|")
    for start in range(0, len(log), args.block):
        block = log[start : start + args.block]
        ids = {e["record_id"] for e in block}
        full = sum(e["steps"] == max_steps for e in block)
        failed = sum(_failed(e, args.fail_below) for e in block)
        cells = [
            f"{start + 1}-{start + len(block)}",
            str(full),
            str(failed),
            f"{_mean(edits, ids, 'reliability', 'token_acc')} / {_mean(edits, ids, 'reliability', 'gen_em')}",
            _mean(edits, ids, "generality", "token_acc"),
            _mean(edits, ids, "locality", "token_acc"),
            _mean(retention, ids, "reliability", "token_acc"),
        ]
        print("| " + " | ".join(cells) + " |")

    none = [e["record_id"] for e in log if e["neurons"] == 0]
    few = [e for e in log if 0 < e["neurons"] <= args.few_neurons]
    many = [(i + 1, e) for i, e in enumerate(log) if e["neurons"] > args.few_neurons]
    many_failed = [i for i, e in many if _failed(e, args.fail_below)]
    print(f"no neuron: {len(none)} {none}")
    print(f"1-{args.few_neurons} neurons: {sum(_failed(e, args.fail_below) for e in few)} of {len(few)} failed")
    print(f"more neurons: {len(many_failed)} of {len(many)} failed, at edits {many_failed}")
    seconds = [e["seconds"] for e in log]
    print(
        f"optimisation: median {statistics.median(e['steps'] for e in log)} steps and "
        f"{statistics.median(seconds):.1f} s per edit, {sum(seconds) / 3600:.2f} h in all"
    )
    results = args.run / "results.json"
    if results.exists():
        doc = json.loads(results.read_text(encoding="utf-8"))
        print(f"evaluation: median {doc.get('eval_seconds_per_edit_median_rank0')} s per edit (rank 0)")
        for check in (doc.get("retention") or {}).get("checkpoints", []):
            print(f"retention pass after {check['edits_done']} edits: {check['seconds_rank0']:.0f} s (rank 0)")

    by_record: dict[str, list[float]] = {}
    for r in read_rows(args.run / "perplexity.csv", missing_ok=True):
        by_record.setdefault(r["record_id"], []).append(float(r["ratio"]))
    order = {e["record_id"]: i for i, e in enumerate(log)}
    for rid in sorted(by_record, key=lambda x: order.get(x, len(order))):
        number = order[rid] + 1 if rid in order else "?"
        print(
            f"perplexity ratio after {rid} (edit {number}), median over languages: "
            f"{statistics.median(by_record[rid]):.3g}"
        )


if __name__ == "__main__":
    main()

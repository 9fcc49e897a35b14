"""Compare runs on the records they all edited (e.g. a 10-record run against the first 10 of a longer one).

    python bench/shared_records.py runs/mzsre-memla/version_0 runs/memla-busy_filter-10/version_0

From each run's ``edits.csv`` and ``perplexity.csv``, restricted to the record
ids every run has: per measure and protocol, the mean in the edit language
and over the other languages; then per record with a perplexity measurement
in every run, the median over languages of the perplexity ratio.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

MEASURES = ("reliability", "generality", "locality", "portability")
PROTOCOLS = ("token_acc", "gen_em")


def read_rows(path: Path, missing_ok: bool = False) -> list[dict]:
    """The rows of a run's CSV file (``edits.csv``, ``perplexity.csv``, ...); none if ``missing_ok`` and it is
    absent."""
    if missing_ok and not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run log dirs holding edits.csv")
    args = ap.parse_args()
    edits = {run: read_rows(run / "edits.csv") for run in args.runs}
    shared = set.intersection(*({r["record_id"] for r in rows} for rows in edits.values()))
    if not shared:
        raise SystemExit("the runs share no record")
    print(f"{len(shared)} shared records")
    print("measure / protocol: " + " | ".join(f"{run}: edit lang / other langs" for run in args.runs))
    for measure in MEASURES:
        for proto in PROTOCOLS:
            cells = []
            for rows in edits.values():
                picked = [r for r in rows if r["record_id"] in shared and r["measure"] == measure and r[proto] != ""]
                own = [float(r[proto]) for r in picked if r["eval_lang"] == r["edit_lang"]]
                other = [float(r[proto]) for r in picked if r["eval_lang"] != r["edit_lang"]]
                cells.append(f"{statistics.mean(own):.2f} / {statistics.mean(other):.2f}" if own and other else "-")
            print(f"{measure} / {proto}: " + " | ".join(cells))
    ppl = {}
    for run in args.runs:
        by_record: dict[str, list[float]] = {}
        for r in read_rows(run / "perplexity.csv", missing_ok=True):
            if r["record_id"] in shared:
                by_record.setdefault(r["record_id"], []).append(float(r["ratio"]))
        ppl[run] = {rid: statistics.median(v) for rid, v in by_record.items()}
    for rid in sorted(set.intersection(*(set(p) for p in ppl.values())), key=lambda x: (len(x), x)):
        print(
            f"perplexity ratio after {rid} (median over languages): "
            + " | ".join(f"{ppl[run][rid]:.3g}" for run in args.runs)
        )


if __name__ == "__main__":
    main()

"""Evaluation seconds per edit: batched vs one prompt at a time, in one run.

    python bench/eval_speed.py --edits 3

MzsRE records (the 12 languages), four measures (reliability, generality,
locality with its pre-edit reference, portability), on the embedded Gemma 3
270M. "batched" is what EditEvaluation does: every teacher-forced row of an
edit in padded batches grouped by target length, every prompt in one
``generate`` call. "one at a time" scores the same items with one forward
pass and one ``generate`` call per prompt. Both are timed on every edit,
alternating which goes first, and the figures are medians over the edits.
The rows of both must agree (checked).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mke_lightning.data import read_mzsre
from mke_lightning.evaluation import EditEvaluator, build_items
from mke_lightning.model_loading import ModelConfig, load_causal_lm

MEASURES = ("reliability", "generality", "locality", "portability")
MZSRE_LANGUAGES = ["en", "cs", "de", "es", "fr", "nl", "pt", "ru", "th", "tr", "vi", "zh"]


def batched(evaluator: EditEvaluator, model, items) -> list[dict]:
    refs = evaluator.references(model, items)
    return evaluator.score(model, items, refs)


def one_at_a_time(evaluator: EditEvaluator, model, items) -> list[dict]:
    rows = []
    for item in items:
        refs = evaluator.references(model, [item])
        rows += evaluator.score(model, [item], refs)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edits", type=int, default=3)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mzsre"))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, _ = load_causal_lm(ModelConfig())
    model.eval()
    evaluator = EditEvaluator(tok)
    records = read_mzsre(args.data, MZSRE_LANGUAGES)[: args.edits]
    times: dict[str, list[float]] = {"batched": [], "one_at_a_time": []}
    n_items = []
    for k, record in enumerate(records):
        items = build_items(record, MZSRE_LANGUAGES, MEASURES)
        n_items.append(len(items))
        order = [("batched", batched), ("one_at_a_time", one_at_a_time)]
        results = {}
        for name, fn in order if k % 2 == 0 else order[::-1]:
            t = time.perf_counter()
            results[name] = fn(evaluator, model, items)
            times[name].append(time.perf_counter() - t)
        agree = sum(a["gen_em"] == b["gen_em"] and abs(a["token_acc"] - b["token_acc"]) < 1e-6
                    for a, b in zip(results["batched"], results["one_at_a_time"]))
        print(f"edit {record.id}: {len(items)} items, batched {times['batched'][-1]:.2f} s, "
              f"one at a time {times['one_at_a_time'][-1]:.2f} s, rows agreeing {agree}/{len(items)}", flush=True)
    med = {name: statistics.median(v) for name, v in times.items()}
    print(json.dumps({
        "edits": len(records), "languages": len(MZSRE_LANGUAGES), "measures": list(MEASURES),
        "items_per_edit": statistics.median(n_items), "threads": torch.get_num_threads(),
        "seconds_per_edit_batched": round(med["batched"], 3),
        "seconds_per_edit_one_at_a_time": round(med["one_at_a_time"], 3),
        "speedup": round(med["one_at_a_time"] / med["batched"], 2),
    }, indent=2))


if __name__ == "__main__":
    main()

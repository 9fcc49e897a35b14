"""Evaluation seconds per edit: batched vs one prompt at a time, in one run.

    python bench/eval_speed.py --edits 5

MzsRE records (the 12 languages), four measures (reliability, generality,
locality with its pre-edit reference, portability), on the embedded Gemma 3
270M. "batched" is what EditEvaluation does: every distinct prompt of the edit
goes through the model once, in padded batches, and its targets are scored
and its greedy continuation decoded from that pass's KV cache
(mke_lightning/modeling/prefix_scoring.py). "one at a time" is the usual loop: for each
item, one full forward pass per teacher-forced target and one
``model.generate`` call. Both are timed on every edit, alternating which goes
first, and the figures are medians over the edits. Every row of the two must
agree (checked and printed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mke_lightning.data import read_mzsre
from mke_lightning.evaluation.evaluator import EditEvaluator, build_items
from mke_lightning.modeling.forward import greedy_generate, kept_logits, pack, teacher_forced
from mke_lightning.modeling.loading import ModelConfig, load_causal_lm
from mke_lightning.modeling.prefix_scoring import TargetScore

MEASURES = ("reliability", "generality", "locality", "portability")
MZSRE_LANGUAGES = ["en", "cs", "de", "es", "fr", "nl", "pt", "ru", "th", "tr", "vi", "zh"]


def batched(evaluator: EditEvaluator, model, items) -> list[dict]:
    refs = evaluator.references(model, items)
    return evaluator.score(model, items, refs)


def one_at_a_time(evaluator: EditEvaluator, model, items) -> list[dict]:
    tok = evaluator.tokenizer
    rows = []
    for item in items:
        refs = {}
        if item.measure == "locality":
            prompt, target = evaluator._target(item, item.answers[0])
            refs[0] = greedy_generate(model, tok, [prompt], len(target), keep_end=True)[0][: len(target)]
        plan = evaluator.plan([item], refs)
        scores = {}
        for prompt, target in plan.rows:  # one full forward pass per target
            batch = pack([prompt], [target], tok.pad_token_id)
            with torch.no_grad():
                out = teacher_forced(kept_logits(model, batch), batch)
            scores[(prompt, target)] = TargetScore(float(out.accuracy[0]), out.predicted[0], float(out.mean_logprob[0]))
        gens = {p: greedy_generate(model, tok, [list(p)], w)[0] for p, w in plan.prompt_widths.items()}
        rows += evaluator.rows(model, [item], refs, plan, scores, gens)
    return rows


PROTOCOLS = ("token_acc", "em", "f1", "f1_legacy", "prob", "gen_em")


def same(a: dict, b: dict) -> bool:
    return all(a[k] == b[k] if a[k] is None or b[k] is None else abs(a[k] - b[k]) < 1e-6 for k in PROTOCOLS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edits", type=int, default=5)
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
    n_items, agreeing = [], []
    for k, record in enumerate(records):
        items = build_items(record, MZSRE_LANGUAGES, MEASURES)
        n_items.append(len(items))
        order = [("batched", batched), ("one_at_a_time", one_at_a_time)]
        results = {}
        for name, fn in order if k % 2 == 0 else order[::-1]:
            t = time.perf_counter()
            results[name] = fn(evaluator, model, items)
            times[name].append(time.perf_counter() - t)
        agree = sum(same(a, b) for a, b in zip(results["batched"], results["one_at_a_time"]))
        agreeing.append(agree)
        print(f"edit {record.id}: {len(items)} items, batched {times['batched'][-1]:.2f} s, "
              f"one at a time {times['one_at_a_time'][-1]:.2f} s, rows agreeing {agree}/{len(items)}", flush=True)
    med = {name: statistics.median(v) for name, v in times.items()}
    print(json.dumps({
        "edits": len(records), "languages": len(MZSRE_LANGUAGES), "measures": list(MEASURES),
        "items_per_edit": statistics.median(n_items), "threads": torch.get_num_threads(),
        "seconds_per_edit_batched": round(med["batched"], 3),
        "seconds_per_edit_one_at_a_time": round(med["one_at_a_time"], 3),
        "rows_agreeing": f"{sum(agreeing)}/{sum(n_items)}",
        "speedup": round(med["one_at_a_time"] / med["batched"], 2),
    }, indent=2))


if __name__ == "__main__":
    main()

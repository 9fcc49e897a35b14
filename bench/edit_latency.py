"""Seconds per edit on the embedded model, split into localisation,
optimisation and evaluation (medians over the edits of one run).

    python bench/edit_latency.py --edits 8

Also reports the load time of the embedded model once its converted copy is
cached (a second load in the same run), and localisation with the
prefix cache off (every IG row run in full) for comparison.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mke_lightning.data import demo_records
from mke_lightning.editing.editor import KnowledgeEditor
from mke_lightning.evaluation.evaluator import EditEvaluator, build_items
from mke_lightning.localization.attribution import AttributionConfig
from mke_lightning.localization.locate import LocalizationConfig, locate
from mke_lightning.modeling.loading import ModelConfig, load_causal_lm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edits", type=int, default=8)
    ap.add_argument("--languages", default="en,de,fr,es,ru,zh")
    args = ap.parse_args()
    langs = args.languages.split(",")

    load_causal_lm(ModelConfig())  # converts on first use
    t = time.perf_counter()
    model, tok, arch = load_causal_lm(ModelConfig())
    load_s = time.perf_counter() - t

    editor = KnowledgeEditor()
    editor.causal_lm, editor.tokenizer, editor.arch = model, tok, arch
    evaluator = EditEvaluator(tok)
    loc_cfg = LocalizationConfig()
    loc_full = LocalizationConfig(attribution=AttributionConfig(prefix_cache=False))
    times: dict[str, list[float]] = {
        "localisation": [],
        "localisation_no_prefix_cache": [],
        "optimisation": [],
        "evaluation": [],
    }
    steps = []
    for record in demo_records()[: args.edits]:
        t = time.perf_counter()
        mask = locate(model, tok, arch, record, "en", loc_cfg)
        times["localisation"].append(time.perf_counter() - t)
        t = time.perf_counter()
        locate(model, tok, arch, record, "en", loc_full)
        times["localisation_no_prefix_cache"].append(time.perf_counter() - t)
        items = build_items(record, langs)
        t = time.perf_counter()
        refs = evaluator.references(model, items)
        pre_s = time.perf_counter() - t
        t = time.perf_counter()
        outcome = editor.edit(record, mask)
        times["optimisation"].append(time.perf_counter() - t)
        t = time.perf_counter()
        evaluator.score(model, items, refs)
        times["evaluation"].append(pre_s + time.perf_counter() - t)
        editor.restore()
        steps.append(outcome.steps)
    report = {
        "edits": args.edits,
        "languages": langs,
        "torch_threads": torch.get_num_threads(),
        "second_load_s": round(load_s, 2),
        "median_s": {k: round(statistics.median(v), 2) for k, v in times.items()},
        "median_steps": statistics.median(steps),
    }
    report["median_s"]["total"] = round(
        sum(report["median_s"][k] for k in ("localisation", "optimisation", "evaluation")), 2
    )
    report["prefix_cache_speedup"] = round(
        report["median_s"]["localisation_no_prefix_cache"] / report["median_s"]["localisation"], 2
    )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

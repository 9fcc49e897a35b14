"""Seconds per edit for neuron localisation on the embedded model: the
batched path against a plain per-step loop, measured in the same run.

    python bench/localization_speed.py --edits 3

Per edit the prompts are the edit prompt and its first paraphrase in three
languages (en, zh, fr by default), the answer the old target (all its
tokens, as the authors score multi-token answers). Both paths share the
prompt, answer and row building; then

* batched: every (prompt, answer token, step) row in as few forward/backward
  passes as the memory budget allows, with the prefix cache;
* loop: one full forward/backward pass per row and step, batch size 1
  (``attribute_rows_loop``).

Prints medians over the edits, the speed-up, and the largest difference
between the two paths' scores (they compute the same quantity).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mke_lightning.data import demo_records
from mke_lightning.localization.attribution import AttributionConfig, attribute_rows, attribute_rows_loop
from mke_lightning.localization.locate import (
    LocalizationConfig,
    answer_rows,
    localisation_prompts,
    old_answers,
    select_neurons,
    sum_per_prompt,
)
from mke_lightning.modeling.loading import ModelConfig, load_causal_lm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edits", type=int, default=3)
    ap.add_argument("--languages", default="en,zh,fr")
    ap.add_argument("--steps", type=int, default=20, help="IG steps (the authors use 20)")
    ap.add_argument("--ig-path", default="all_layers", choices=["all_layers", "per_layer"])
    ap.add_argument("--baseline", default="zero", choices=["zero", "eos"])
    ap.add_argument("--memory-budget-mb", type=float, default=1024.0)
    args = ap.parse_args()
    langs = args.languages.split(",")

    model, tok, arch = load_causal_lm(ModelConfig())
    attr = AttributionConfig(
        steps=args.steps, ig_path=args.ig_path, baseline=args.baseline, memory_budget_mb=args.memory_budget_mb
    )
    cfg = LocalizationConfig(attribution=attr, cross_languages=langs, max_paraphrases=1)
    kw = dict(eos_id=tok.eos_token_id, skip_first=tok.bos_token_id is not None)
    times: dict[str, list[float]] = {"prepare": [], "batched": [], "loop": []}
    rows_per_edit, max_diff, peak = [], 0.0, 0.0
    records = [r for r in demo_records() if all(l in r.languages for l in langs)][: args.edits]
    # Warm-up (allocator, first-call costs), not timed: one row each way.
    warm = [tok("The capital of France is")["input_ids"]]
    attribute_rows(model, arch, warm, [tok.eos_token_id], attr, pad_id=tok.pad_token_id, **kw)
    attribute_rows_loop(model, arch, warm, [tok.eos_token_id], AttributionConfig(steps=1), **kw)
    for record in records:
        t = time.perf_counter()
        entries, _ = localisation_prompts(tok, record, langs, cfg)
        prompts = list(zip([e[0] for e in entries], old_answers(model, tok, entries)))
        rows, targets, owner = answer_rows(model, tok, prompts)
        times["prepare"].append(time.perf_counter() - t)
        rows_per_edit.append(len(rows))

        t = time.perf_counter()
        batched = attribute_rows(model, arch, rows, targets, attr, pad_id=tok.pad_token_id, **kw)
        select_neurons(sum_per_prompt(batched, owner, len(prompts)), cfg)
        times["batched"].append(time.perf_counter() - t)

        t = time.perf_counter()
        loop = attribute_rows_loop(model, arch, rows, targets, attr, **kw)
        select_neurons(sum_per_prompt(loop, owner, len(prompts)), cfg)
        times["loop"].append(time.perf_counter() - t)

        max_diff = max(max_diff, float((batched - loop).abs().max()))
        peak = max(peak, float(loop.abs().max()))
        print(
            f"{record.id}: {len(prompts)} prompts, {len(rows)} rows; "
            f"batched {times['batched'][-1]:.2f}s, loop {times['loop'][-1]:.2f}s",
            flush=True,
        )

    med = {k: statistics.median(v) for k, v in times.items()}
    report = {
        "edits": len(records),
        "languages": langs,
        "prompts_per_edit": 2 * len(langs),
        "rows_per_edit_median": statistics.median(rows_per_edit),
        "attribution": {"method": attr.method, "ig_path": attr.ig_path, "steps": attr.steps, "baseline": attr.baseline,
                        "memory_budget_mb": attr.memory_budget_mb},
        "torch_threads": torch.get_num_threads(),
        "median_s_per_edit": {
            "prepare (prompts, answers, rows; shared)": round(med["prepare"], 2),
            "batched": round(med["batched"], 2),
            "loop": round(med["loop"], 2),
            "batched incl. prepare": round(med["prepare"] + med["batched"], 2),
            "loop incl. prepare": round(med["prepare"] + med["loop"], 2),
        },
        "speedup": round(med["loop"] / med["batched"], 2),
        "speedup_incl_prepare": round((med["prepare"] + med["loop"]) / (med["prepare"] + med["batched"]), 2),
        "max_abs_diff": max_diff,
        "max_abs_score": peak,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

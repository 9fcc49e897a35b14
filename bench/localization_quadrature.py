"""Integrated-gradient quadrature rules against the 20-step reference: the
neuron masks they select, their model passes and their wall time, on MzsRE.

    python bench/localization_quadrature.py --data /work/shared/data/mzsre --records 20

Settings are those of ``configs/mzsre/memla.yaml`` (integrated gradients over
all layers at once, zero baseline, ``memory_budget_mb: 1024``, threshold 0.3,
cross languages en, zh, fr, language fraction 1.0, edit language en, every
paraphrase), except the rule and its number of points. The reference is the
authors' path: ``right_riemann`` with 20 points. Every record is localised
once per setting with :func:`~mke_lightning.localization.locate.locate` (the whole
localisation: prompts, old answers, answer rows, attribution, selection), the
settings in a different order for each record so that the load of a shared
machine falls on all of them alike.

For each candidate it prints, over the records:

* the mean (and lowest) Jaccard index of its independent and specific
  neuron sets against the reference's (two empty sets agree: 1.0), and the
  mean of the two;
* model passes per record (every forward call of the model: prefix, clean
  activations, integrated-gradient passes, greedy answer tokens) and the
  integrated-gradient rows (one row = one prompt-answer token at one point);
* median seconds per record and the speed-up over the reference (ratio of
  the medians), for the whole localisation.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from dataclasses import replace

import torch

from mke_lightning.data.mzsre import MzsreParser
from mke_lightning.data.source import RecordSource
from mke_lightning.localization.attribution import QUADRATURES, AttributionConfig
from mke_lightning.localization.locate import LocalizationConfig, locate
from mke_lightning.localization.neurons import NeuronMask
from mke_lightning.modeling.loading import ModelConfig, load_causal_lm

REFERENCE = "right_riemann:20"
CATEGORIES = ("independent", "specific")


def parse_setting(text: str) -> tuple[str, int]:
    rule, _, points = text.partition(":")
    if rule not in QUADRATURES or not points.isdigit():
        raise argparse.ArgumentTypeError(f"expected RULE:POINTS with RULE one of {QUADRATURES}, got {text!r}")
    return rule, int(points)


def neuron_set(mask: NeuronMask, category: str) -> set[tuple[int, int]]:
    return {(layer, i) for layer, idx in mask.category(category).items() for i in idx}


def jaccard(a: set, b: set) -> float:
    return 1.0 if not a and not b else len(a & b) / len(a | b)


class PassCounter:
    """Counts forward calls of the model and the rows they carry."""

    def __init__(self, model) -> None:
        self.calls = self.rows = 0
        model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.calls += 1
        self.rows += int(ids.shape[0]) if ids is not None else 0

    def take(self) -> tuple[int, int]:
        got = (self.calls, self.rows)
        self.calls = self.rows = 0
        return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="the MzsRE folder")
    ap.add_argument("--records", type=int, default=20)
    ap.add_argument("--start", type=int, default=0, help="first record index")
    ap.add_argument(
        "--candidates",
        default="gauss_legendre:4,gauss_legendre:5,gauss_legendre:6,right_riemann:10,midpoint:6,trapezoid:6",
        help="comma-separated RULE:POINTS settings compared with the reference, right_riemann:20",
    )
    ap.add_argument("--memory-budget-mb", type=float, default=1024.0)
    args = ap.parse_args()
    candidates = [parse_setting(t) for t in args.candidates.split(",") if t]
    settings = [parse_setting(REFERENCE), *candidates]
    names = [f"{r}:{p}" for r, p in settings]

    base = LocalizationConfig(
        attribution=AttributionConfig(method="integrated_gradients", ig_path="all_layers", baseline="zero",
                                      memory_budget_mb=args.memory_budget_mb),
        threshold=0.3, cross_languages=["en", "zh", "fr"], language_fraction=1.0,
    )
    configs = {
        n: replace(base, attribution=replace(base.attribution, quadrature=r, steps=p))
        for n, (r, p) in zip(names, settings)
    }
    langs = list(dict.fromkeys([*base.cross_languages, "en"]))
    source = RecordSource(MzsreParser(args.data, langs))
    records = list(itertools.islice(source, args.start, args.start + args.records))

    model, tok, arch = load_causal_lm(ModelConfig())
    counter = PassCounter(model)
    locate(
        model, tok, arch, records[0], "en", replace(base, attribution=replace(base.attribution, steps=2))
    )  # warm-up, not counted
    counter.take()

    seconds = {n: [] for n in names}
    passes = {n: [] for n in names}
    ig_rows = {n: [] for n in names}
    masks: dict[str, list[NeuronMask]] = {n: [] for n in names}
    for i, record in enumerate(records):
        order = names[i % len(names):] + names[: i % len(names)]  # rotate: no setting always runs first
        done = {}
        for n in order:
            t = time.perf_counter()
            done[n] = locate(model, tok, arch, record, "en", configs[n])
            took = time.perf_counter() - t
            calls, _ = counter.take()
            seconds[n].append(took)
            passes[n].append(calls)
        for n in names:
            masks[n].append(done[n])
        ref = done[names[0]]
        line = ", ".join(
            f"{n} {seconds[n][-1]:.2f}s J="
            + "/".join(f"{jaccard(neuron_set(ref, c), neuron_set(done[n], c)):.3f}" for c in CATEGORIES)
            for n in names[1:]
        )
        print(
            f"{record.id}: reference {seconds[names[0]][-1]:.2f}s, "
            f"{ref.count('independent')}+{ref.count('specific')} neurons; {line}",
            flush=True,
        )

    # IG rows per record: (prompt, answer token) rows x points, counted from each record's prompts and old answers.
    from mke_lightning.localization.locate import localisation_prompts, old_answers

    for record in records:
        entries, _ = localisation_prompts(tok, record, langs, base)
        n_rows = sum(len(a) for a in old_answers(model, tok, entries))
        for n, (_, p) in zip(names, settings):
            ig_rows[n].append(n_rows * p)

    ref = names[0]
    ref_med = statistics.median(seconds[ref])
    report = {
        "records": f"mzsre-{args.start}..mzsre-{args.start + len(records) - 1} ({len(records)})",
        "settings": "integrated_gradients, ig_path all_layers, baseline zero, threshold 0.3, cross languages en zh fr, "
                    f"language_fraction 1.0, edit language en, memory_budget_mb {args.memory_budget_mb:g}",
        "torch_threads": torch.get_num_threads(),
        "reference": {
            "setting": ref,
            "median_s_per_record": round(ref_med, 2),
            "median_model_passes": statistics.median(passes[ref]),
            "median_ig_rows": statistics.median(ig_rows[ref]),
            "mean_neurons": {c: round(statistics.mean(m.count(c) for m in masks[ref]), 1) for c in CATEGORIES},
        },
        "candidates": {},
    }
    for n in names[1:]:
        per_cat = {
            c: [jaccard(neuron_set(a, c), neuron_set(b, c)) for a, b in zip(masks[ref], masks[n])] for c in CATEGORIES
        }
        med = statistics.median(seconds[n])
        report["candidates"][n] = {
            "mean_jaccard": round(statistics.mean(per_cat["independent"] + per_cat["specific"]), 4),
            **{f"mean_jaccard_{c}": round(statistics.mean(v), 4) for c, v in per_cat.items()},
            **{f"min_jaccard_{c}": round(min(v), 4) for c, v in per_cat.items()},
            "identical_masks": sum(a.layers == b.layers for a, b in zip(masks[ref], masks[n])),
            "median_model_passes": statistics.median(passes[n]),
            "median_ig_rows": statistics.median(ig_rows[n]),
            "ig_rows_speedup": round(statistics.median(ig_rows[ref]) / statistics.median(ig_rows[n]), 2),
            "model_passes_speedup": round(statistics.median(passes[ref]) / statistics.median(passes[n]), 2),
            "median_s_per_record": round(med, 2),
            "wall_speedup": round(ref_med / med, 2),
            "median_per_record_wall_speedup": round(
                statistics.median(r / c for r, c in zip(seconds[ref], seconds[n])), 2
            ),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

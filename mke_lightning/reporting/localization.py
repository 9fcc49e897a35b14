"""What a localisation run found: a JSON summary and two PNG plots.

* ``localization_summary.json``: records, neurons per layer and category
  (total over records and mean per record), the size of each language's set,
  and the language x language overlap (mean Jaccard index over records of the
  languages' own sets, before categories are formed).
* ``neurons_per_layer.png``: mean neurons per record in each layer, one bar
  per category.
* ``language_overlap.png``: the overlap matrix as a heatmap.
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean
from typing import Any

from mke_lightning.localization.neurons import CATEGORIES, NeuronMask


def _neurons(per_layer: dict[int, list[int]]) -> set[tuple[int, int]]:
    return {(l, i) for l, idx in per_layer.items() for i in idx}


def summarize(masks: dict[str, NeuronMask], n_layers: int, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Counts and overlaps over the masks of a run (plain JSON-ready dict)."""
    if not masks:
        raise ValueError("no masks to summarise")
    n = len(masks)
    per_layer = {cat: [0] * n_layers for cat in CATEGORIES}
    for mask in masks.values():
        for cat in CATEGORIES:
            for layer, idx in mask.category(cat).items():
                per_layer[cat][layer] += len(idx)
    languages = list(dict.fromkeys(lang for m in masks.values() for lang in m.languages))
    sizes = {lang: mean(len(_neurons(m.languages.get(lang, {}))) for m in masks.values()) for lang in languages}
    overlap = []
    for a in languages:
        row = []
        for b in languages:
            values = []
            for m in masks.values():
                sa, sb = _neurons(m.languages.get(a, {})), _neurons(m.languages.get(b, {}))
                union = sa | sb
                values.append(len(sa & sb) / len(union) if union else 1.0)
            row.append(round(mean(values), 4))
        overlap.append(row)
    return {
        "records": n,
        "layers": n_layers,
        "neurons_per_record": {cat: round(sum(per_layer[cat]) / n, 3) for cat in CATEGORIES},
        "records_without_neurons": sum(1 for m in masks.values() if m.count() == 0),
        "per_layer_total": per_layer,
        "per_layer_mean": {cat: [round(v / n, 3) for v in per_layer[cat]] for cat in CATEGORIES},
        "languages": languages,
        "language_set_size_mean": {lang: round(v, 3) for lang, v in sizes.items()},
        "language_overlap_jaccard": overlap,
        "settings": settings or {},
    }


def write_summary(summary: dict[str, Any], folder: str | Path, plots: bool = True) -> list[Path]:
    """Write the JSON summary (and the plots) into ``folder``; returns the files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "localization_summary.json"
    path.write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    written = [path]
    if plots:
        written += plot_summary(summary, folder)
    return written


def plot_summary(summary: dict[str, Any], folder: str | Path) -> list[Path]:
    """The per-layer histogram and the language overlap heatmap, as PNGs."""
    try:
        import matplotlib
    except ImportError as err:  # a dependency of the package, but say what to do
        raise ImportError("the localisation plots need matplotlib: pip install matplotlib") from err
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    folder = Path(folder)
    layers = list(range(summary["layers"]))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.4 * len(layers) + 2), 3.6))
    width = 0.8 / len(CATEGORIES)
    for k, cat in enumerate(CATEGORIES):
        ax.bar(
            [l + (k - (len(CATEGORIES) - 1) / 2) * width for l in layers],
            summary["per_layer_mean"][cat],
            width,
            label=f"language-{cat}",
        )
    ax.set_xlabel("layer")
    ax.set_ylabel("neurons per record (mean)")
    ax.set_xticks(layers)
    ax.set_title(f"Located neurons per layer ({summary['records']} records)")
    ax.legend()
    fig.tight_layout()
    hist = folder / "neurons_per_layer.png"
    fig.savefig(hist, dpi=110)
    plt.close(fig)

    langs = summary["languages"]
    matrix = summary["language_overlap_jaccard"]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 + 0.8 * len(langs)), max(3.4, 1.0 + 0.8 * len(langs))))
    im = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(langs)), langs)
    ax.set_yticks(range(len(langs)), langs)
    for i in range(len(langs)):
        for j in range(len(langs)):
            ax.text(
                j,
                i,
                f"{matrix[i][j]:.2f}",
                ha="center",
                va="center",
                color="white" if matrix[i][j] < 0.6 else "black",
                fontsize=9,
            )
    ax.set_title(f"Language neuron-set overlap\n(Jaccard, mean of {summary['records']} records)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    heat = folder / "language_overlap.png"
    fig.savefig(heat, dpi=110)
    plt.close(fig)
    return [hist, heat]

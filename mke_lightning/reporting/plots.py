"""Pictures of evaluation results (matplotlib, Agg backend: no display needed).

* :func:`plot_heatmap`: edit language x evaluation language, one panel per
  measure, for one protocol. A run has one edit language, so its own heatmap
  has one row; ``mke report`` stacks the rows of several runs (e.g. runs
  editing in en, de and zh) into the full matrix.
* :func:`plot_methods`: grouped bars comparing runs (methods) per measure, in
  the edit language and averaged over the non-edit languages.
"""

from __future__ import annotations

from pathlib import Path

from mke_lightning.evaluation.evaluator import MEASURES

_PANEL_INCH = 3.2


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:  # a dependency of the package, but say what to do
        raise ImportError("the evaluation plots need matplotlib: pip install matplotlib") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _measures_of(docs: list[dict], protocol: str, where: str = "language") -> list[str]:
    found = set()
    for doc in docs:
        for block in doc["results"].get(where, {}).values():
            found |= {m for m, cell in block.items() if protocol in cell}
    return [m for m in MEASURES if m in found]


def plot_heatmap(rows: list[tuple[str, dict]], path: str | Path, protocol: str = "token_acc") -> Path:
    """One PNG: for each measure a panel of (row label x evaluation language) values under ``protocol``.

    Args:
        rows: ``(label, results document)``; the label names the row (the edit language, or run and edit language).
        path: the PNG to write.
        protocol: which metric protocol the cells show.
    """
    import numpy as np

    plt = _pyplot()
    docs = [d for _, d in rows]
    measures = _measures_of(docs, protocol)
    if not measures:
        raise ValueError(f"no results under protocol {protocol!r} to plot")
    langs = list(dict.fromkeys(l for d in docs for l in d.get("eval_languages") or d["results"]["language"]))
    ncols = min(3, len(measures))
    nrows = -(-len(measures) // ncols)
    panel_w, panel_h = 0.5 * len(langs) + 1.3, 0.42 * len(rows) + 1.3
    label_w = 0.07 * max(len(label) for label, _ in rows) + 0.4  # row labels sit left of the first column only
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(panel_w * ncols + label_w + 1.0, panel_h * nrows + 0.5), squeeze=False
    )
    for ax in axes.flat[len(measures):]:
        ax.set_visible(False)
    image = None
    for k, (ax, measure) in enumerate(zip(axes.flat, measures)):
        first_column = k % ncols == 0
        grid = np.full((len(rows), len(langs)), np.nan)
        for r, doc in enumerate(docs):
            for c, lang in enumerate(langs):
                value = doc["results"]["language"].get(lang, {}).get(measure, {}).get(protocol)
                if value is not None:
                    grid[r, c] = value
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis")
        for r in range(len(rows)):
            for c in range(len(langs)):
                if not np.isnan(grid[r, c]):
                    ax.text(c, r, f"{grid[r, c]:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if grid[r, c] > 0.6 else "white")
        ax.set_xticks(range(len(langs)), langs, fontsize=8)
        ax.set_yticks(range(len(rows)), [label for label, _ in rows] if first_column else [], fontsize=8)
        ax.set_xlabel("evaluation language", fontsize=8)
        if first_column:
            ax.set_ylabel("edit language", fontsize=8)
        ax.set_title(measure, fontsize=9)
    fig.colorbar(image, ax=list(axes.flat[:len(measures)]), shrink=0.8, label=protocol)
    fig.suptitle(f"protocol: {protocol}", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_methods(
    runs: list[tuple[str, dict]], path: str | Path, protocols: tuple[str, ...] = ("token_acc", "gen_em")
) -> Path:
    """Grouped bars, one bar per run in each measure; rows: edit language, mean over non-edit languages;
    columns: protocols."""
    import numpy as np

    plt = _pyplot()
    docs = [d for _, d in runs]
    measures = [m for m in MEASURES if any(m in _measures_of(docs, p) for p in protocols)]
    if not measures:
        raise ValueError("no results to compare")
    views = [("edit language", lambda d: d["results"]["language"].get(d.get("edit_language", ""), {})),
             ("mean over non-edit languages", lambda d: d["results"].get("average", {}).get("non_edit_languages", {}))]
    fig, axes = plt.subplots(
        len(views),
        len(protocols),
        figsize=(1.1 * len(measures) * len(protocols) + 2, 2.6 * len(views) + 0.8),
        squeeze=False,
        sharey=True,
    )
    width = 0.8 / len(runs)
    x = np.arange(len(measures))
    for r, (title, block_of) in enumerate(views):
        for c, proto in enumerate(protocols):
            ax = axes[r][c]
            for k, (label, doc) in enumerate(runs):
                block = block_of(doc)
                values = [block.get(m, {}).get(proto, np.nan) for m in measures]
                bars = ax.bar(x + (k - (len(runs) - 1) / 2) * width, values, width, label=label)
                ax.bar_label(
                    bars, labels=[f"{v:.2f}" if not np.isnan(v) else "" for v in values], fontsize=6, padding=1
                )
            ax.set_xticks(x, measures, rotation=30, ha="right", fontsize=7)
            ax.set_ylim(0, 1.12)
            ax.set_title(f"{title} - {proto}", fontsize=8)
    axes[0][0].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

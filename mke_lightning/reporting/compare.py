"""``mke report RUN_DIR...``: compare the evaluation results of several runs.

Reads each run's ``results.json`` and writes into ``--output``:

* ``methods.png``: grouped bars, one per run, for each measure, in the edit
  language and averaged over the non-edit languages (one column per protocol);
* ``heatmap_<protocol>.png``: one row per run (its edit language x every
  evaluation language), one panel per measure;
* ``comparison.md``: what each run was (method, protocol, model, data,
  languages, metric protocols), then the settings on which the runs differ
  (one row per setting, one column per run), then the same figures as a
  Markdown table, with the mean perplexity ratio where the run measured it.
  Fields an older ``results.json`` lacks show as ``-``;
* ``languages.md``: per measure and protocol, one row per run (and, for a
  sequential run, its retention at the end) and one column per language.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mke_lightning.evaluation.evaluator import MEASURES
from mke_lightning.evaluation.metrics import PROTOCOLS
from mke_lightning.reporting.plots import plot_heatmap, plot_methods
from mke_lightning.reporting.tables import read_results


def run_label(doc: dict) -> str:
    """``<method> (<edited|unedited>)``: the default name of a run in the charts."""
    return f"{doc.get('method', 'run')} ({doc.get('model_state', '?')})"


def _folder_names(doc: dict) -> list[str]:
    """Ever longer names of the folder a run's results.json is in: the logger's name first where
    the folder is ``version_<n>`` (``mzsre-memla``, ``mzsre-memla/version_0``, ``runs/mzsre-memla/version_0``)."""
    parts = Path(doc["_path"]).parent.parts
    first = 2 if parts and parts[-1].startswith("version_") and len(parts) > 1 else 1
    names = [parts[-first]] if parts else []
    return names + ["/".join(parts[-k:]) for k in range(first, len(parts) + 1)]


def distinct_labels(docs: list[dict]) -> list[str]:
    """:func:`run_label` of each run; runs that share one get the shortest folder name that tells them apart."""
    names = [run_label(d) for d in docs]
    out = list(names)
    for name in set(names):
        idx = [i for i, n in enumerate(names) if n == name]
        if len(idx) < 2:
            continue
        options = [_folder_names(docs[i]) for i in idx]
        for k in range(max(len(o) for o in options)):
            where = [o[min(k, len(o) - 1)] if o else str(n) for n, o in enumerate(options)]
            if len(set(where)) == len(idx):
                break
        else:
            where = [str(n + 1) for n in range(len(idx))]  # the same folder given twice
        for i, w in zip(idx, where):
            out[i] = f"{name} {w}"
    return out


def _data_text(data: dict | None) -> str:
    """``<format> <file or folder name> [offset/limit/ids/seed], <n> records`` of a run's ``data`` block."""
    if not data:
        return "-"
    if not isinstance(data, dict):  # a user's DataModule may describe itself otherwise
        return str(data)
    sel = data.get("selection") or {}
    picked = [
        f"{k} {v}"
        for k, v in (
            ("offset", sel.get("offset") or None),
            ("limit", sel.get("limit")),  # offset 0: left out
            ("seed", sel.get("seed")),
        )
        if v is not None
    ]
    if sel.get("ids"):
        picked.append(f"{len(sel['ids'])} ids")
    text = f"{data.get('format', '?')} {Path(str(data.get('path', '?'))).name}"
    text += f" ({', '.join(picked)})" if picked else ""
    return text + f", {data.get('records_selected', '?')} records"


def _flat(settings: dict | None, prefix: str = "") -> dict[str, object]:
    """``{"loss": "set", "loss.max_steps": 60, ...}`` of a nested settings block: a block is ``set``, so that
    a run whose block is ``None`` (e.g. ``localization.background``) differs from one that sets it."""
    out: dict[str, object] = {}
    for key, value in (settings or {}).items():
        if isinstance(value, dict):
            out[f"{prefix}{key}"] = "set"
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differing_settings(flat: list[dict[str, object]]) -> list[str]:
    """Keys whose recorded values differ between runs. A run that lacks a key did not record it
    (an older results.json, or a block its method has no use for): that is not a difference."""
    keys = sorted({k for f in flat for k in f})
    return [k for k in keys if len({repr(f[k]) for f in flat if k in f}) > 1]


def runs_table(runs: list[tuple[str, dict]]) -> str:
    """Markdown: one row per run saying what it was (the settings are in :func:`settings_table`)."""
    head = ["run", "method", "protocol", "model", "data", "edit lang", "eval langs", "train langs", "metric protocols"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, doc in runs:
        def langs(key, doc=doc):
            return ", ".join(doc[key]) if doc.get(key) else "-"

        cells = [label, str(doc.get("method", "-")), str(doc.get("protocol", "-")), str(doc.get("model", "-")),
                 _data_text(doc.get("data")), str(doc.get("edit_language", "-")), langs("eval_languages"),
                 langs("train_languages"), ", ".join(doc.get("metric_protocols") or []) or "-"]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def settings_table(runs: list[tuple[str, dict]]) -> str:
    """Markdown: one row per setting on which the runs differ, one column per run (``-``: not recorded)."""
    flat = [_flat(d.get("settings")) for _, d in runs]
    differ = differing_settings(flat)
    if not differ:
        return "The runs' recorded settings are the same.\n"
    head = ["setting", *(label for label, _ in runs)]
    lines = ["| " + " | ".join(c.replace("|", "/") for c in head) + " |", "|" + "---|" * len(head)]
    for k in differ:
        cells = [k, *(str(f[k]) if k in f else "-" for f in flat)]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _ratio_text(x: float) -> str:
    """``1.071``; ``2.79e+08`` once three decimals stop saying anything."""
    return f"{x:.3f}" if abs(x) < 1000 else f"{x:.3g}"


def comparison_table(runs: list[tuple[str, dict]], protocols: tuple[str, ...]) -> str:
    """Markdown: one row per run and view (edit language, non-edit mean); one column per measure/protocol."""
    measures = [
        m for m in MEASURES if any(m in d["results"].get("average", {}).get("all_languages", {}) for _, d in runs)
    ]
    head = ["run", "edit lang", "view"] + [f"{m} ({p})" for m in measures for p in protocols] + ["ppl ratio (mean)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, doc in runs:
        res = doc["results"]
        ppl = res.get("perplexity_ratio", {})
        ppl_mean = _ratio_text(sum(ppl.values()) / len(ppl)) if ppl else "-"
        edit = doc.get("edit_language", "")
        for view, block in ((edit, res["language"].get(edit, {})),
                            ("non-edit mean", res.get("average", {}).get("non_edit_languages", {}))):
            cells = [f"{block[m][p]:.3f}" if p in block.get(m, {}) else "-" for m in measures for p in protocols]
            lines.append("| " + " | ".join([label, edit, view, *cells, ppl_mean]) + " |")
    return "\n".join(lines) + "\n"


def language_tables(runs: list[tuple[str, dict]], protocols: tuple[str, ...]) -> str:
    """Markdown: per measure and protocol, one row per run (and per sequential run its retention at the
    end), one column per evaluation language."""
    langs: list[str] = []
    for _, doc in runs:
        langs += [l for l in doc.get("eval_languages") or doc["results"]["language"] if l not in langs]
    measures = [m for m in MEASURES if any(m in block for _, d in runs for block in d["results"]["language"].values())]
    views = []
    for label, doc in runs:
        views.append((label, doc["results"]))
        checkpoints = (doc.get("retention") or {}).get("checkpoints") or []
        if checkpoints:
            views.append(
                (f"{label}, retention after {checkpoints[-1]['edits_done']} edits", checkpoints[-1]["summary"])
            )
    out = []
    for m in measures:
        for p in protocols:
            head = ["run", *langs, "mean non-edit"]
            lines = [f"**{m}** ({p})", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for label, res in views:
                cells = [
                    f"{res['language'].get(l, {}).get(m, {}).get(p, float('nan')):.2f}"
                    if p in res["language"].get(l, {}).get(m, {})
                    else "-"
                    for l in langs
                ]
                avg = res.get("average", {}).get("non_edit_languages", {}).get(m, {})
                cells.append(f"{avg[p]:.3f}" if p in avg else "-")
                lines.append("| " + " | ".join([label, *cells]) + " |")
            out.append("\n".join(lines) + "\n")
    return "\n".join(out)


def compare_runs(run_dirs: list[str], output: str | Path, labels: list[str] | None = None,
                 protocols: tuple[str, ...] = ("token_acc", "gen_em")) -> dict[str, Path]:
    """Write the comparison files for ``run_dirs``; returns their paths by name."""
    if not run_dirs:
        raise ValueError("mke report needs at least one run dir")
    if set(protocols) - set(PROTOCOLS):
        raise ValueError(f"unknown protocols {sorted(set(protocols) - set(PROTOCOLS))}; choose from {list(PROTOCOLS)}")
    docs = [read_results(d) for d in run_dirs]
    if labels and len(labels) != len(docs):
        raise ValueError(f"--labels gives {len(labels)} names for {len(docs)} runs")
    names = list(labels) if labels else distinct_labels(docs)
    runs = list(zip(names, docs))
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    written = {"methods": plot_methods(runs, out / "methods.png", protocols)}
    rows = [
        (f"{d.get('edit_language', '?')}: {name}" if len(runs) > 1 else d.get("edit_language", "?"), d)
        for name, d in runs
    ]
    for proto in protocols:
        written[f"heatmap_{proto}"] = plot_heatmap(rows, out / f"heatmap_{proto}.png", proto)
    written["table"] = out / "comparison.md"
    written["table"].write_text("\n".join([runs_table(runs), settings_table(runs), comparison_table(runs, protocols)]),
                                encoding="utf-8")
    written["languages"] = out / "languages.md"
    written["languages"].write_text(language_tables(runs, protocols), encoding="utf-8")
    return written


def report_main(args: list[str] | None = None) -> dict[str, Path]:
    """``mke report RUN_DIR... [--output DIR] [--labels NAME...] [--protocols P...]``."""
    parser = argparse.ArgumentParser(prog="mke report", description="Compare the evaluation results of several runs.")
    parser.add_argument("runs", nargs="+", help="run log dirs (each holding one results.json) or results.json files")
    parser.add_argument(
        "--output", "-o", default="report", help="folder for methods.png, heatmaps and comparison.md (default: report)"
    )
    parser.add_argument(
        "--labels", nargs="+", default=None, help="a name per run for the charts (default: method and model state)"
    )
    parser.add_argument("--protocols", nargs="+", default=["token_acc", "gen_em"], choices=list(PROTOCOLS),
                        help="metric protocols to chart (default: token_acc gen_em)")
    ns = parser.parse_args(args)
    try:
        written = compare_runs(ns.runs, ns.output, ns.labels, tuple(ns.protocols))
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    print(Path(written["table"]).read_text(encoding="utf-8"))
    print("\n".join(f"{name}: {path}" for name, path in written.items()))
    return written

"""Tables and files from an evaluation summary (see :class:`~mke_lightning.aggregate.EvalAggregate`).

Written into the run's log dir by the evaluation callback:

* ``results.json``: run metadata, the protocol of every metric name, and the
  summary (per language, per target group, averaged over all and over the
  non-edit languages; item counts; downstream perplexity);
* ``edits.csv``: one row per edit, evaluation language, measure and item,
  with one column per protocol (empty where a protocol does not apply);
* ``perplexity.csv``: per measured edit and language, pre- and post-edit
  perplexity and their ratio;
* heatmaps and the method chart: :mod:`mke_lightning.report_plots`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from mke_lightning.evaluation import MEASURES
from mke_lightning.metrics import PROTOCOLS

CSV_FIELDS = ("record_id", "edit_lang", "eval_lang", "group", "measure", *PROTOCOLS)
PPL_FIELDS = ("record_id", "lang", "ppl_pre", "ppl_post", "ratio")
SHORT = {"token_acc": "tok", "em": "em", "f1": "f1", "f1_legacy": "f1PxR", "prob": "prob", "gen_em": "gen"}
MEASURE_SHORT = {"reliability": "rel", "generality": "gen", "locality": "loc", "locality_gold": "locgold",
                 "portability": "port", "multi_hop": "mhop"}


def format_table(summary: dict, languages: list[str], protocols: tuple[str, ...] = ("token_acc", "gen_em")) -> str:
    """Rows = languages, averages and target groups; columns = measure/protocol (and the perplexity ratio)."""
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown:
        raise ValueError(f"unknown protocols {sorted(unknown)}; choose from {list(PROTOCOLS)}")
    lang_blocks = summary.get("language", {})
    measures = [m for m in MEASURES if any(m in lang_blocks.get(l, {}) for l in languages)]
    cols = [(m, p) for m in measures for p in protocols if any(p in lang_blocks.get(l, {}).get(m, {}) for l in languages)]
    ppl = summary.get("perplexity_ratio", {})
    head = ["lang"] + [f"{MEASURE_SHORT[m]}/{SHORT[p]}" for m, p in cols] + (["ppl_ratio"] if ppl else [])

    def row(name: str, block: dict, ratio: float | None = None) -> list[str]:
        cells = [f"{block[m][p]:.3f}" if p in block.get(m, {}) else "-" for m, p in cols]
        return [name] + cells + ([f"{ratio:.3f}" if ratio is not None else "-"] if ppl else [])

    lines = [row(l, lang_blocks[l], ppl.get(l)) for l in languages if l in lang_blocks]
    for key, name in (("non_edit_languages", "avg(non-edit)"), ("all_languages", "avg(all)")):
        if key in summary.get("average", {}):
            lines.append(row(name, summary["average"][key]))
    for key in ("identical", "translated"):
        if key in summary.get("group", {}):
            lines.append(row(f"[{key}]", summary["group"][key]))
    widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def legend(protocols: tuple[str, ...] = ("token_acc", "gen_em")) -> str:
    """One line naming the columns' abbreviations."""
    parts = [f"{SHORT[p]} = {p}" for p in protocols]
    measures = [f"{s} = {m}" for m, s in MEASURE_SHORT.items()]
    return "; ".join(parts) + " (see results.json for every protocol); " + ", ".join(measures)


def write_reports(
    log_dir: str | Path, summary: dict, rows: list[dict], meta: dict, perplexity_rows: list[dict] | None = None
) -> dict[str, Path]:
    """``results.json``, ``edits.csv`` and (with perplexity rows) ``perplexity.csv``; returns the paths by name."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    paths = {"results": log_dir / "results.json", "edits": log_dir / "edits.csv"}
    doc = {**meta, "metric_protocols": PROTOCOLS, "results": summary}
    paths["results"].write_text(json.dumps(doc, indent=2, ensure_ascii=False), encoding="utf-8")
    with paths["edits"].open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    if perplexity_rows:
        paths["perplexity"] = log_dir / "perplexity.csv"
        with paths["perplexity"].open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=PPL_FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(perplexity_rows)
    return paths


def read_results(run_dir: str | Path) -> dict:
    """The ``results.json`` of a run: ``run_dir`` is the file itself or a folder holding one (searched below it)."""
    p = Path(run_dir)
    if p.is_file():
        path = p
    elif p.is_dir():
        found = sorted(p.rglob("results.json"))
        if not found:
            raise FileNotFoundError(f"no results.json in {p} (is it a run's log dir?)")
        if len(found) > 1:
            raise ValueError(f"{p} holds {len(found)} results.json files ({', '.join(str(f) for f in found[:4])} ...); name one run dir")
        path = found[0]
    else:
        raise FileNotFoundError(f"{p} does not exist")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(doc, dict) or "results" not in doc:
        raise ValueError(f"{path} is not an evaluation results file (no 'results' key)")
    doc["_path"] = str(path)
    return doc

"""Tables and files from an evaluation summary (see :class:`~mke_lightning.evaluation.aggregate.EvalAggregate`).

Written into the run's log dir by the evaluation callback:

* ``results.json``: run metadata (what the run was: method, protocol, model,
  data, languages, settings), the definition of every metric protocol the
  figures use, and the summary (per language, per target group, averaged
  over all and over the non-edit languages; item counts; downstream
  perplexity); under the sequential protocol also ``retention``, the same
  summary of every edit done so far at each retention checkpoint;
* ``edits.csv``: one row per edit, evaluation language, measure and item,
  with one column per protocol (empty where a protocol does not apply);
* ``perplexity.csv``: per measured edit and language, pre- and post-edit
  perplexity and their ratio;
* ``retention.csv``: the rows of ``edits.csv`` scored again at the end of a
  sequential run, with the order each edit was made in (``edit_number``);
* heatmaps and the method chart: :mod:`mke_lightning.reporting.plots`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from mke_lightning.evaluation.evaluator import MEASURES
from mke_lightning.evaluation.metrics import PROTOCOLS

CSV_FIELDS = ("record_id", "edit_lang", "eval_lang", "group", "measure", *PROTOCOLS)
PPL_FIELDS = ("record_id", "lang", "ppl_pre", "ppl_post", "ratio")
RETENTION_FIELDS = ("record_id", "edit_number", *CSV_FIELDS[1:])
SHORT = {"token_acc": "tok", "em": "em", "f1": "f1", "f1_legacy": "f1PxR", "prob": "prob", "gen_em": "gen"}
MEASURE_SHORT = {"reliability": "rel", "generality": "gen", "locality": "loc", "locality_gold": "locgold",
                 "neighborhood": "nbr", "portability": "port", "multi_hop": "mhop"}


def format_table(summary: dict, languages: list[str], protocols: tuple[str, ...] = ("token_acc", "gen_em")) -> str:
    """Rows = languages, averages and target groups; columns = measure/protocol (and the perplexity ratio)."""
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown:
        raise ValueError(f"unknown protocols {sorted(unknown)}; choose from {list(PROTOCOLS)}")
    lang_blocks = summary.get("language", {})
    measures = [m for m in MEASURES if any(m in lang_blocks.get(l, {}) for l in languages)]
    cols = [
        (m, p) for m in measures for p in protocols if any(p in lang_blocks.get(l, {}).get(m, {}) for l in languages)
    ]
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

    def fmt(r):
        return "  ".join(c.rjust(w) for c, w in zip(r, widths))

    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def format_retention_table(summary: dict, checkpoints: list[dict], edit_language: str,
                           protocols: tuple[str, ...] = ("token_acc", "gen_em"), last: int = 3) -> str:
    """Rows = measure x view (the edit language, the mean over the other languages); per protocol,
    columns ``imm`` (right after each edit: ``summary``) and ``@N`` (after N edits) for the ``last`` checkpoints."""
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown:
        raise ValueError(f"unknown protocols {sorted(unknown)}; choose from {list(PROTOCOLS)}")
    shown = checkpoints[-last:]
    docs = [summary, *(c["summary"] for c in shown)]
    labels = ["imm", *(f"@{c['edits_done']}" for c in shown)]
    head = ["measure", "view", *(f"{SHORT[p]} {label}" for p in protocols for label in labels)]
    views = ((edit_language, lambda d: d.get("language", {}).get(edit_language, {})),
             ("other langs", lambda d: d.get("average", {}).get("non_edit_languages", {})))
    lines = []
    for measure in MEASURES:
        for view, block_of in views:
            cells = [block_of(d).get(measure, {}).get(p) for p in protocols for d in docs]
            if any(c is not None for c in cells):
                lines.append([MEASURE_SHORT[measure], view, *(f"{c:.3f}" if c is not None else "-" for c in cells)])
    widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head))]

    def fmt(r):
        return "  ".join(c.rjust(w) for c, w in zip(r, widths))

    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def protocols_reported(summary: dict) -> dict[str, str]:
    """The definition of each protocol with at least one figure in ``summary`` (results.json's
    ``metric_protocols``: ``prob``, for one, is absent where no record has an old target)."""
    seen = {proto for kind in ("language", "group", "average") for block in summary.get(kind, {}).values()
            for cell in block.values() for proto in cell}
    return {name: text for name, text in PROTOCOLS.items() if name in seen}


def legend(protocols: tuple[str, ...] = ("token_acc", "gen_em")) -> str:
    """One line naming the columns' abbreviations."""
    parts = [f"{SHORT[p]} = {p}" for p in protocols]
    measures = [f"{s} = {m}" for m, s in MEASURE_SHORT.items()]
    return "; ".join(parts) + " (see results.json for every protocol); " + ", ".join(measures)


def write_reports(
    log_dir: str | Path, summary: dict, rows: list[dict], meta: dict, perplexity_rows: list[dict] | None = None,
    retention: dict | None = None, retention_rows: list[dict] | None = None,
) -> dict[str, Path]:
    """``results.json``, ``edits.csv``, and with their rows ``perplexity.csv`` and ``retention.csv``;
    returns the paths by name. ``retention`` (``{"checkpoints": [{"edits_done", "summary"}, ...], ...}``)
    is written into ``results.json`` as it is."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    paths = {"results": log_dir / "results.json", "edits": log_dir / "edits.csv"}
    doc = {**meta, "metric_protocols": protocols_reported(summary), "results": summary}
    if retention is not None:
        doc["retention"] = retention
    # default=str: a setting that is not plain JSON (a dtype, a path) is written as its text, not refused
    paths["results"].write_text(json.dumps(doc, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
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
    if retention_rows:
        paths["retention"] = log_dir / "retention.csv"
        with paths["retention"].open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=RETENTION_FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in retention_rows)
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
            raise ValueError(
                f"{p} holds {len(found)} results.json files ({', '.join(str(f) for f in found[:4])} ...); "
                "name one run dir"
            )
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

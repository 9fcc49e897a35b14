"""Aggregating per-edit evaluation rows into tables and files.

Rows are dicts with ``record_id, edit_lang, eval_lang, group, measure,
token_acc, gen_em``. Aggregates are torchmetrics ``MeanMetric`` states, so a
distributed run can sync them across processes.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from torchmetrics import MeanMetric

from mke_lightning.evaluation import MEASURES, PROTOCOLS

CSV_FIELDS = ("record_id", "edit_lang", "eval_lang", "group", "measure", "token_acc", "gen_em")


class ResultAggregator:
    """Means per (key, measure, protocol), where key is a language or a target group."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)  # where the metric states live (a process group syncs them there)
        self.metrics: dict[tuple[str, str, str, str], MeanMetric] = {}
        self.rows: list[dict] = []

    def _metric(self, kind: str, key: str, measure: str, protocol: str) -> MeanMetric:
        k = (kind, key, measure, protocol)
        if k not in self.metrics:
            self.metrics[k] = MeanMetric().to(self.device)
        return self.metrics[k]

    def update(self, rows: list[dict]) -> None:
        for row in rows:
            self.rows.append(row)
            for proto in PROTOCOLS:
                value = torch.tensor(float(row[proto]), device=self.device)
                self._metric("language", row["eval_lang"], row["measure"], proto).update(value)
                self._metric("group", row["group"], row["measure"], proto).update(value)
                self._metric("average", "all_languages", row["measure"], proto).update(value)
                if row["eval_lang"] != row["edit_lang"]:
                    self._metric("average", "non_edit_languages", row["measure"], proto).update(value)

    def compute(self) -> dict:
        out: dict = {}
        for (kind, key, measure, proto), metric in self.metrics.items():
            out.setdefault(kind, {}).setdefault(key, {}).setdefault(measure, {})[proto] = round(float(metric.compute()), 4)
        counts: dict = {}
        for row in self.rows:
            c = counts.setdefault(row["eval_lang"], {})
            c[row["measure"]] = c.get(row["measure"], 0) + 1
        out["counts"] = counts
        return out


def format_table(summary: dict, languages: list[str]) -> str:
    """A per-language table: rows = languages (+ averages, groups), columns = measure/protocol."""
    measures = [m for m in MEASURES if any(m in summary.get("language", {}).get(l, {}) for l in languages)]
    head = ["lang"] + [f"{m[:11]}/{'tok' if p == 'token_acc' else 'gen'}" for m in measures for p in PROTOCOLS]
    lines = []

    def row(name: str, block: dict) -> list[str]:
        return [name] + [
            f"{block[m][p]:.3f}" if m in block and p in block[m] else "-" for m in measures for p in PROTOCOLS
        ]

    for lang in languages:
        if lang in summary.get("language", {}):
            lines.append(row(lang, summary["language"][lang]))
    for key, name in (("non_edit_languages", "avg(non-edit)"), ("all_languages", "avg(all)")):
        if key in summary.get("average", {}):
            lines.append(row(name, summary["average"][key]))
    for key in ("identical", "translated"):
        if key in summary.get("group", {}):
            lines.append(row(f"[{key}]", summary["group"][key]))
    widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def write_reports(log_dir: str | Path, summary: dict, rows: list[dict], meta: dict) -> tuple[Path, Path]:
    """``results.json`` (summary + run metadata) and ``edits.csv`` (one row per item)."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    results = log_dir / "results.json"
    results.write_text(json.dumps({**meta, "metric_protocols": {
        "token_acc": "teacher-forced argmax accuracy over target tokens",
        "gen_em": "greedy generation, normalised; starts with the answer or an alias",
    }, "results": summary}, indent=2, ensure_ascii=False), encoding="utf-8")
    per_edit = log_dir / "edits.csv"
    with per_edit.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return results, per_edit

"""A run's results at the end of a stage: what the run was, the files, the printed table, the loggers' figures.

:func:`results_meta` composes the run metadata of ``results.json`` from the
run's settings (:mod:`mke_lightning.reporting.run_settings`: the module's,
the data's and the localisation's sections) and the evaluation's own;
:func:`write_results` writes ``results.json``, the CSV files and the heatmaps;
:func:`print_results` prints the tables. The evaluation callback calls them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from mke_lightning.reporting.plots import plot_heatmap
from mke_lightning.reporting.run_settings import RunSettings
from mke_lightning.reporting.tables import format_retention_table, format_table, legend, write_reports


@dataclass
class EvalFacts:
    """What the evaluation itself says about the run, beside the run's settings."""

    model_state: str
    """``edited`` (fit) or ``unedited`` (validate, test)."""
    edit_lang: str
    eval_langs: list[str]
    world_size: int
    median_seconds: float | None
    """Median evaluation time per edit on rank 0."""
    perplexity: dict
    neighbourhood: dict | None = None
    """The neighbourhood settings and the pool's size (``None``: no neighborhood measure)."""


def eval_facts(model_state: str, session, world_size: int, perplexity, neighbourhood) -> EvalFacts:
    """What the evaluation says about the run: ``session`` (:class:`~mke_lightning.evaluation.session.EvalSession`),
    the ``perplexity`` and ``neighbourhood`` settings."""
    plan = session.plan
    return EvalFacts(
        model_state, plan.edit_lang, plan.eval_langs, world_size, session.median_seconds(),
        perplexity={"every_n_edits": perplexity.every_n_edits, "texts_per_language": perplexity.texts_per_language,
                    "max_tokens": perplexity.max_tokens, "sample": perplexity.path or "packaged"},
        neighbourhood={**asdict(neighbourhood), "pool_records": len(plan.pool)} if plan.pool is not None else None,
    )


def results_meta(facts: EvalFacts, summary: dict, settings: RunSettings, module_class: str, model_class: str) -> dict:
    """The run metadata of ``results.json``; a key no section gives is left out (a user's own module, say).

    ``module_class`` and ``model_class`` name the method and the model where the module says nothing.
    """
    info = settings.get("module") or {}
    data = settings.get("data")
    localization = settings.get("localization")
    if localization is not None:  # runs differing only there are told apart
        info = {**info, "settings": {**info.get("settings", {}), "localization": localization}}
    return {
        "model_state": facts.model_state,
        "method": info.get("method") or module_class,
        **_picked(info, "protocol"),
        "model": info.get("model") or model_class,
        **({"data": data} if data is not None else {}),
        "edit_language": facts.edit_lang,
        "eval_languages": facts.eval_langs,
        **_picked(info, "train_languages"),
        "records": summary["edits"],
        "world_size": facts.world_size,
        "eval_seconds_per_edit_median_rank0": facts.median_seconds,
        "perplexity": facts.perplexity,
        **({"neighbourhood": facts.neighbourhood} if facts.neighbourhood is not None else {}),
        **_picked(info, "settings"),
    }


def _picked(info: dict, key: str) -> dict:
    """``{key: info[key]}``, or nothing where ``info`` lacks it (results.json leaves the key out)."""
    return {key: info[key]} if key in info else {}


def write_results(out_dir: Path, summary: dict, meta: dict, rows: list[dict], perplexity_rows: list[dict],
                  retention: dict | None, retention_rows: list[dict], plot_protocols: tuple[str, ...] | None,
                  edit_lang: str) -> dict[str, Path]:
    """``results.json``, ``edits.csv``, ``perplexity.csv``, ``retention.csv`` and (with ``plot_protocols``)
    one ``heatmap_<protocol>.png`` each, in ``out_dir``; the paths by name."""
    written = write_reports(out_dir, summary, rows, meta, perplexity_rows, retention,
                            retention_rows if retention else None)
    doc = {**meta, "results": summary}
    for proto in plot_protocols or ():
        written[f"heatmap_{proto}"] = plot_heatmap([(edit_lang, doc)], out_dir / f"heatmap_{proto}.png", proto)
    return written


def print_results(summary: dict, meta: dict, retention: dict | None, written: dict[str, Path],
                  protocols: tuple[str, ...]) -> None:
    """The per-language table (and the retention table), then the files written."""
    edit_lang = meta["edit_language"]
    print(f"\n{meta['model_state']} model, edit language {edit_lang}, {meta['records']} edits ({legend(protocols)})")
    print(format_table(summary, meta["eval_languages"], protocols))
    if retention:
        print(f"\nretention (sequential protocol): imm = right after each edit, @N = after N edits; "
              f"edit language {edit_lang} and the mean over the other languages")
        print(format_retention_table(summary, retention["checkpoints"], edit_lang, protocols))
    print("\n".join(f"{name}: {path}" for name, path in written.items()))


def view_metrics(summary: dict, edit_lang: str, protocols: tuple[str, ...], prefix: str) -> dict[str, float]:
    """``<prefix>/edit_lang/<measure>/<protocol>`` and ``<prefix>/other_langs/...`` of a summary, for the loggers."""
    out: dict[str, float] = {}
    for scope, block in (("edit_lang", summary.get("language", {}).get(edit_lang, {})),
                         ("other_langs", summary.get("average", {}).get("non_edit_languages", {}))):
        for measure, cell in block.items():
            for proto in protocols:
                if proto in cell:
                    out[f"{prefix}/{scope}/{measure}/{proto}"] = float(cell[proto])
    return out


def flat_metrics(summary: dict) -> dict[str, float]:
    """``final/<kind>/<key>/<measure>/<protocol>`` numbers for the loggers."""
    out: dict[str, float] = {}
    for kind in ("language", "group", "average"):
        for key, block in summary.get(kind, {}).items():
            for measure, cell in block.items():
                for proto, value in cell.items():
                    out[f"final/{kind}/{key}/{measure}/{proto}"] = float(value)
    for lang, value in summary.get("perplexity_ratio", {}).items():
        out[f"final/perplexity_ratio/{lang}"] = float(value)
    return out

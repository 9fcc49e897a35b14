"""Edit MzsRE records one at a time with settings of the locate-then-edit family, and read each edit's
own probes: P(target_new) after the solve, reliability and locality (``token_acc``, edit language).

    python bench/solve_probe.py --data ../shared/data/mzsre --records 0-5 \\
        --variant alphaedit configs/mzsre/alphaedit.yaml \\
        --variant memit-n256 configs/mzsre/memit.yaml neurons=256

Each ``--variant NAME CONFIG [KEY=VALUE ...]`` takes ``model.method`` and ``model.solve`` from a config
file and overrides solve settings (values read as YAML: ``keys=mean``, ``keep_other_positions=0``,
``neurons=256``). Every edit is undone before the next (the ``single`` protocol), on the embedded model
with the key statistics of the config (computed once and cached). A quick look at a handful of
records, one line per variant: the comparison of docs/results.md is ``bench/mzsre_comparison.sh``.
"""

from __future__ import annotations

import argparse
import time

import torch
import yaml

from mke_lightning.data import read_mzsre
from mke_lightning.editing.editor import KnowledgeEditor
from mke_lightning.editing.methods.locate_edit import SolveConfig
from mke_lightning.evaluation.evaluator import EditEvaluator, build_items
from mke_lightning.modeling.loading import ModelConfig, load_causal_lm


def records_of(spec: str) -> list[int]:
    out = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/data/mzsre")
    p.add_argument("--records", default="0-5", help="record indices, e.g. 0-5 or 0,3,7")
    p.add_argument("--language", default="en", help="edit (and evaluation) language")
    p.add_argument("--variant", nargs="+", action="append", required=True, metavar="NAME CONFIG [KEY=VALUE]")
    ns = p.parse_args(argv)
    model, tok, arch = load_causal_lm(ModelConfig())
    records = read_mzsre(ns.data, [ns.language])
    ev = EditEvaluator(tok)
    for name, config, *overrides in ns.variant:
        section = yaml.safe_load(open(config))["model"]
        solve = dict(section["solve"])
        solve.update({k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in overrides)})
        ed = KnowledgeEditor(method=section["method"], solve=SolveConfig(**solve), edit_language=ns.language)
        ed.causal_lm, ed.tokenizer, ed.arch = model, tok, arch
        cells = []
        for i in records_of(ns.records):
            record = records[i]
            items = [it for it in build_items(record, [ns.language]) if it.measure in ("reliability", "locality")]
            refs = ev.references(model, items)
            t0 = time.perf_counter()
            out = ed.edit(record, None)
            seconds = time.perf_counter() - t0
            rows = ev.score(model, items, refs)
            ed.restore()
            got = {m: min(r["token_acc"] for r in rows if r["measure"] == m) for m in ("reliability", "locality")}
            cells.append(f"{i}: p {out.p_new:.2f} rel {got['reliability']:.2f} loc {got['locality']:.2f} "
                         f"{seconds:.0f}s")
        print(name, " | ".join(cells), flush=True)


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()

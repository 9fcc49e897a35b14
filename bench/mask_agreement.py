"""How far two localisation settings agree, from the masks they left in the mask cache.

    python bench/mask_agreement.py REFERENCE_FOLDER CANDIDATE_FOLDER [--records 20]

Each folder is one ``<fingerprint>-<settings>`` folder of the mask cache
(``~/.cache/mke-lightning/neuron-masks``; its ``settings.json`` says which
settings made it). Every record whose mask is in both folders (files are named
by a digest of the record id) is compared, up to ``--records`` of them in the
reference's record order (``mzsre-0``, ``mzsre-1``, ...): the Jaccard index of
each neuron category's set of ``(layer, neuron)`` pairs (two empty sets agree:
1.0), then the mean and lowest over the records, and how many records agree
exactly. No model is run: this reads what ``mke localize`` or a run's
localisation already wrote, so it costs nothing beyond those.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from mke_lightning.localization.neurons import CATEGORIES, NeuronMask


def pairs(mask: NeuronMask, category: str) -> set[tuple[int, int]]:
    return {(layer, int(i)) for layer, idx in mask.category(category).items() for i in idx}


def jaccard(a: set, b: set) -> float:
    return 1.0 if not a and not b else len(a & b) / len(a | b)


def _order(record_id: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", record_id))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reference", type=Path)
    p.add_argument("candidate", type=Path)
    p.add_argument("--records", type=int, default=None, help="compare at most this many records (default: all shared)")
    ns = p.parse_args(argv)
    ref = {f.name: NeuronMask.load(f) for f in (ns.reference / "masks").glob("*.safetensors")}
    cand = {f.name: NeuronMask.load(f) for f in (ns.candidate / "masks").glob("*.safetensors")}
    shared = sorted(set(ref) & set(cand), key=lambda n: _order(ref[n].record_id))[: ns.records]
    if not shared:
        raise SystemExit(f"no record has a mask in both {ns.reference} and {ns.candidate}")
    rows = []
    for name in shared:
        a, b = ref[name], cand[name]
        j = {c: jaccard(pairs(a, c), pairs(b, c)) for c in CATEGORIES}
        rows.append((a.record_id, j, {c: (len(pairs(a, c)), len(pairs(b, c))) for c in CATEGORIES}))
        print(a.record_id, " ".join(f"{c} {j[c]:.3f} ({n[0]} vs {n[1]})" for c, n in rows[-1][2].items()))
    out = {"records": len(rows)}
    for c in CATEGORIES:
        vals = [j[c] for _, j, _ in rows]
        out[c] = {"mean": round(statistics.fmean(vals), 4), "min": round(min(vals), 4),
                  "identical": sum(v == 1.0 for v in vals)}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()

"""Which neurons LAFN's localisation finds: by raw activation, or relative to usual activity.

    python bench/lafn_neurons.py --data ../shared/data/mzsre --records 10

For MzsRE records 0..N-1 on the embedded Gemma 3 270M, the language-agnostic
neurons of configs/mzsre/lafn.yaml (activation magnitude at the last prompt
position; per prompt the ``top_k`` highest; kept in half the prompts of every
one of 12 languages) under each scoring: raw magnitude (``top_k`` 200, the
shipped reading) and magnitude divided by the neuron's usual activity
(``relative_to_background``, ``top_k`` 500). Per record: the count, how many
are busy (mean |activation| on unrelated prompts > 10 x the layer median) and
the layers they sit in.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace

from mke_lightning.data import read_mzsre
from mke_lightning.localization.attribution import AttributionConfig
from mke_lightning.localization.background import (
    BackgroundConfig,
    background_prompts,
    busy_neurons,
    neuron_activity,
    usual_activity,
)
from mke_lightning.localization.locate import LocalizationConfig, locate
from mke_lightning.modeling.loading import ModelConfig, load_causal_lm

LANGS = ["en", "cs", "de", "nl", "es", "fr", "pt", "ru", "th", "tr", "vi", "zh"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/mzsre")
    ap.add_argument("--records", type=int, default=10)
    ap.add_argument("--ratio", type=float, default=10.0, help="busy: mean |activation| above this x the layer median")
    args = ap.parse_args()
    model, tok, arch = load_causal_lm(ModelConfig())
    model.eval()
    busy = busy_neurons(neuron_activity(model, tok, arch, background_prompts(BackgroundConfig())), args.ratio)
    usual = usual_activity(model, tok, arch, BackgroundConfig())  # [L, F]
    raw = LocalizationConfig(attribution=AttributionConfig(method="activation"), threshold=None, top_k=200,
                             prompt_fraction=0.5, cross_languages=LANGS, language_fraction=1.0,
                             templates=["Q: {prompt} A:"])
    schemes = {"raw (top_k 200)": raw, "relative (top_k 500)": replace(raw, top_k=500, relative_to_background=True)}
    records = read_mzsre(args.data, LANGS)[: args.records]
    counts: dict[str, list[tuple[int, int]]] = {name: [] for name in schemes}
    print(f"{'record':10s}  " + "  ".join(f"{name:>34s}" for name in schemes))
    for record in records:
        cells = []
        for name, cfg in schemes.items():
            layers = locate(model, tok, arch, record, "en", cfg, usual).category("independent")
            n = sum(len(v) for v in layers.values())
            n_busy = sum(i in busy.get(l, ()) for l, idx in layers.items() for i in idx)
            counts[name].append((n, n_busy))
            span = f"layers {min(layers)}-{max(layers)}" if layers else "no layer"
            cells.append(f"{n:4d} neurons, {n_busy:3d} busy, {span:>13s}")
        print(f"{record.id:10s}  " + "  ".join(f"{c:>34s}" for c in cells), flush=True)
    for name, rows in counts.items():
        total, total_busy = sum(n for n, _ in rows), sum(b for _, b in rows)
        print(f"{name}: median {statistics.median(n for n, _ in rows):g} neurons per edit; "
              f"{total_busy} of {total} busy ({100 * total_busy / max(total, 1):.0f}%)")


if __name__ == "__main__":
    main()

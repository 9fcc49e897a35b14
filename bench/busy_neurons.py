"""How many neurons are busy on unrelated text, and how often edits touch them.

    python bench/busy_neurons.py --ratio 10 --deltas runs/mzsre-memla/version_0/deltas runs/mzsre-lafn/version_0/deltas

On the embedded Gemma 3 270M: each neuron's mean |activation| over the
packaged unrelated prompts (mke_lightning.localization.background), per layer the count
above ``--ratio`` x the layer median and the largest ratio. Then, for each
folder of saved edits (a run's ``deltas/``), how many edits change at least
one busy neuron, and what share of all changed neurons are busy.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mke_lightning.editing.neuron_delta import read_delta
from mke_lightning.localization.background import BackgroundConfig, background_prompts, busy_neurons, neuron_activity
from mke_lightning.modeling.loading import ModelConfig, load_causal_lm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=10.0)
    ap.add_argument("--deltas", nargs="*", default=[], help="folders of saved edits (*.safetensors)")
    args = ap.parse_args()
    model, tok, arch = load_causal_lm(ModelConfig())
    model.eval()
    activity = neuron_activity(model, tok, arch, background_prompts(BackgroundConfig(max_ratio=args.ratio)))
    busy = busy_neurons(activity, args.ratio)
    print(f"layer  neurons  busy(>{args.ratio:g}x median)  max ratio  busiest")
    for layer, a in enumerate(activity):
        ratio = a / a.median()
        top = ratio.topk(3).indices.tolist()
        print(f"{layer:5d}  {a.numel():7d}  {len(busy.get(layer, ())):20d}  {float(ratio.max()):9.1f}  {top}")
    total = sum(a.numel() for a in activity)
    n_busy = sum(len(v) for v in busy.values())
    print(f"busy: {n_busy} of {total} neurons ({100 * n_busy / total:.2f}%)")
    for folder in args.deltas:
        files = sorted(Path(folder).glob("*.safetensors"))
        touching, changed, changed_busy = 0, 0, 0
        for f in files:
            delta, _ = read_delta(f)
            hits = 0
            for layer, (idx, _) in delta.layers.items():
                changed += idx.numel()
                hits += sum(1 for i in idx.tolist() if i in busy.get(layer, ()))
            changed_busy += hits
            touching += hits > 0
        print(f"{folder}: {touching} of {len(files)} edits change a busy neuron; "
              f"{changed_busy} of {changed} changed neurons are busy")


if __name__ == "__main__":
    main()

"""How specific a run's saved edits are: per edit and layer, the change of the layer's output on ordinary
text against its change on the edit's own prompt, both relative to the layer's output there.

    python bench/delta_energy.py RUN_VERSION_DIR --stats KEY_STATS_FOLDER [--data ../shared/data/mzsre] [--first 12]

``RUN_VERSION_DIR`` is a run's ``version_N`` folder holding ``deltas/`` (``model.save_deltas: true``);
``KEY_STATS_FOLDER`` one folder of the key-statistics cache (``mke key-stats`` prints it). For an edit
``ΔW`` on neurons ``idx`` of layer ``l``:

* ``text``: ``tr(ΔW_idx C_idx ΔW_idxᵀ) / tr(W C Wᵀ)``, the mean squared change of the layer's output over
  the statistics' sample relative to its mean squared output (docs/preservation.md);
* ``prompt``: ``||ΔW_idx k_idx||² / ||W k||²`` at the last token of the record's edit prompt.

An edit that changes ordinary text about as much as its own prompt (``text`` near ``prompt``) moves
everything its neurons touch; a specific one has ``text`` orders of magnitude below ``prompt``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from mke_lightning.data import read_mzsre
from mke_lightning.modeling.forward import encode_prompt
from mke_lightning.modeling.loading import ModelConfig, load_causal_lm


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--stats", type=Path, required=True)
    p.add_argument("--data", default="../shared/data/mzsre")
    p.add_argument("--language", default="en")
    p.add_argument("--first", type=int, default=12, help="edits read, in record order")
    ns = p.parse_args(argv)
    model, tok, arch = load_causal_lm(ModelConfig())
    records = {r.id: r for r in read_mzsre(ns.data, [ns.language])}
    files = sorted((ns.run / "deltas").glob("*.safetensors"), key=lambda f: int(f.stem.rsplit("-", 1)[-1]))
    moments: dict[int, torch.Tensor] = {}
    for f in files[: ns.first]:
        delta = load_file(str(f))
        layers = sorted(int(k.split(".")[0]) for k in delta if k.endswith(".index"))
        keys: dict[int, torch.Tensor] = {}
        hooks = [model.get_submodule(arch.mlp_out_name(l)).register_forward_pre_hook(
            lambda m, a, l=l, keys=keys: keys.__setitem__(l, a[0][0, -1].detach().double())) for l in layers]
        ids = torch.tensor([encode_prompt(tok, records[f.stem].facts(ns.language).prompt)])
        with torch.no_grad():
            model(input_ids=ids)
        for h in hooks:
            h.remove()
        cells = []
        for l in layers:
            idx = delta[f"{l}.index"].long()
            v = delta[f"{l}.values"].double()  # [n, d_model]
            if l not in moments:
                moments[l] = load_file(str(ns.stats / "layers" / f"{l}.safetensors"))["second_moment"].double()
            c = moments[l]  # [d_ff, d_ff]
            module = model.get_submodule(arch.mlp_out_name(l))
            w = module.weight.detach().double()  # [d_model, d_ff] (Linear)
            text = float(((c[idx][:, idx] @ v) * v).sum() / ((w @ c) * w).sum())
            k = keys[l]
            prompt = float((k[idx] @ v).pow(2).sum() / (w @ k).pow(2).sum())
            cells.append(f"L{l} text {text:.2g} prompt {prompt:.2g}")
        print(f.stem, " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()

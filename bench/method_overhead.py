"""Per-edit optimisation time of each method against the floor of any
gradient-based edit: the same number of bare forward+backward passes over
the same batches.

    python bench/method_overhead.py --edits 5

For every method and edit: the editor's whole optimisation (attach the
update, its loop, projection after each step, turn it into a delta, apply
it; localisation not included) is timed, then the same number of passes is
repeated with nothing of ours: the model's forward on the same packed batches,
the same target log-probabilities, and a backward into a zero vector added
at the edited layers' outputs (so the backward reaches exactly as deep).
Forwards and backwards are counted as the editor does them: a forward per
step, and a backward after each one but the last when the edit met its
stopping rule there (it stops before that backward).
The ratio of the two is the optimisation's overhead (target <= 1.25).
Records: MzsRE, English edit prompts (``--data``); methods share one set of
located neurons per record.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mke_lightning.data.mzsre import read_mzsre
from mke_lightning.editing.editor import EditLossConfig, KnowledgeEditor
from mke_lightning.editing.masked_lora import LoRAConfig
from mke_lightning.editing.value_update import ValueUpdateConfig
from mke_lightning.localization.attribution import AttributionConfig
from mke_lightning.localization.background import usual_activity
from mke_lightning.localization.locate import LocalizationConfig, locate
from mke_lightning.modeling.forward import grouped_target_logits, pack_groups, row_logprobs
from mke_lightning.modeling.loading import ModelConfig, load_causal_lm

ROOT = Path(__file__).resolve().parents[1]

METHODS = {
    "memla": dict(lora=LoRAConfig(merge_scale=1.0), lr=5e-3),
    "memla-no_independent": dict(lora=LoRAConfig(merge_scale=1.0, categories=["specific"]), lr=5e-3),
    "lora": dict(method="lora", lora=LoRAConfig(merge_scale=1.0, rank=8), lr=5e-3),
    "ft_l": dict(method="ft_l", values=ValueUpdateConfig(layers=[12], max_abs=5e-3), lr=1e-3),
    # as configs/mzsre/lafn.yaml: no P(old) term, KL on 4 anchor prompts in each of 6 languages
    "lafn": dict(
        method="lafn",
        loss=EditLossConfig(true_weight=0.0, kl_weight=1.0, anchor_languages=["en", "de", "fr", "es", "ru", "zh"]),
        lr=1e-2,
    ),
}


def bare_passes(ed: KnowledgeEditor, record, layers: list[int], steps: int, backwards: int) -> float:
    """Seconds for ``steps`` forwards and ``backwards`` backwards on the edit's batch, with nothing of the editor's
    in the loop."""
    model, cfg = ed.causal_lm, ed.loss_config
    prompts, targets, units = ed._rows([record])
    anchors = ed.anchors.ids if cfg.kl_weight > 0 else []  # the KL rows, as the editor's step has them
    batch = pack_groups(prompts + anchors, targets + [[0]] * len(anchors), ed.tokenizer.pad_token_id, cfg.length_groups)
    d_model = model.config.hidden_size
    z = torch.zeros(d_model, requires_grad=True)  # [d_model]: where the backward must reach
    hooks = [
        model.get_submodule(ed.arch.mlp_out_name(l)).register_forward_hook(lambda m, a, out: out + z) for l in layers
    ]
    try:
        start = time.perf_counter()
        for step in range(steps):
            logits = grouped_target_logits(model, batch)  # per row: the head on target positions only, as the editor
            lp = row_logprobs(logits[: len(targets)], targets)
            loss = sum(
                cfg.new_weight * (-lp[i].sum() / len(targets[i]))
                + (cfg.true_weight * lp[j].sum().exp() if j is not None else 0)
                for _, i, j in units
            ) / len(units)
            if anchors:
                loss = loss + cfg.kl_weight * ed.anchor_kl(torch.cat(logits[len(targets):]))  # [A, V] in
            if step < backwards:
                z.grad = None
                loss.backward()
        return time.perf_counter() - start
    finally:
        for h in hooks:
            h.remove()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edits", type=int, default=5)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "mzsre"))
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--lafn-languages", default="en,cs,de,nl,es,fr,pt,ru,th,tr,vi,zh")
    args = ap.parse_args()
    langs = args.lafn_languages.split(",")

    torch.manual_seed(0)
    model, tok, arch = load_causal_lm(ModelConfig())
    records = read_mzsre(args.data, langs)[: args.edits]
    memla_loc = LocalizationConfig(attribution=AttributionConfig(steps=10))
    lafn_loc = LocalizationConfig(
        attribution=AttributionConfig(method="activation"),
        threshold=None,
        top_k=500,  # configs/mzsre/lafn.yaml
        cross_languages=langs,
        prompt_fraction=0.5,
        templates=["Q: {prompt} A:"],
        relative_to_background=True,
    )
    masks = (
        {r.id: locate(model, tok, arch, r, "en", memla_loc) for r in records} if set(args.methods) - {"lafn"} else {}
    )
    usual = usual_activity(model, tok, arch, None) if "lafn" in args.methods else None
    lafn_masks = (
        {r.id: locate(model, tok, arch, r, "en", lafn_loc, usual) for r in records} if "lafn" in args.methods else {}
    )

    report = {}
    for name in args.methods:
        kw = dict(METHODS[name])
        lr = kw.pop("lr")
        if name == "lafn":
            kw["train_languages"] = langs
        kw.setdefault("loss", EditLossConfig())
        ed = KnowledgeEditor(optimizer=lambda p, lr=lr: torch.optim.Adam(p, lr=lr), **kw)
        ed.causal_lm, ed.tokenizer, ed.arch = model, tok, arch
        edit_s, bare_s, ratios, steps = [], [], [], []
        for record in records:
            mask = (lafn_masks if name == "lafn" else masks)[record.id]
            start = time.perf_counter()
            out = ed.edit(record, mask)
            took = time.perf_counter() - start
            ed.restore()
            layers = sorted(ed.values_config.neurons(model, arch, mask)) if name in ("lafn", "ft_l") else \
                sorted(ed.lora_config.layers or mask.union()) if name == "lora" else \
                sorted({l for c in ed.lora_config.categories for l in mask.category(c)})
            if out.steps == 0 or not layers:
                continue
            cfg = ed.loss_config  # the editor breaks before its last step's backward once the stopping rule holds
            stopped = out.loss < cfg.stop_loss or out.p_new > cfg.stop_prob
            bare = bare_passes(ed, record, layers, out.steps, out.steps - 1 if stopped else out.steps)
            edit_s.append(took)
            bare_s.append(bare)
            ratios.append(took / bare)
            steps.append(out.steps)
        report[name] = {
            "edits": len(ratios),
            "median_s_per_edit": round(statistics.median(edit_s), 3),
            "median_bare_s": round(statistics.median(bare_s), 3),
            "median_ratio": round(statistics.median(ratios), 3),
            "total_ratio": round(sum(edit_s) / sum(bare_s), 3),
            "median_steps": statistics.median(steps),
        }
        print(name, json.dumps(report[name]), flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

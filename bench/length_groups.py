"""One forward+backward pass over an edit step's rows: one padded batch against the rows grouped by length.

    python bench/length_groups.py --records 5 --passes 3

The rows are those of a LAFN step as configs/mzsre/lafn.yaml trains it: the
edit prompt in 12 languages with their new targets, and the KL anchors of 6
languages (24 rows of 4 to 13 tokens). In one padded batch every row pads to
the longest (25 tokens for MzsRE record 0); grouped (``loss.length_groups``,
default 3), each group pads to its own longest row. For each record, the two
are timed in turn, ``--passes`` times each, with a backward into a zero
vector added at layer 0's MLP output (as deep as a LAFN update reaches).
Prints per-record medians, padded positions and the ratio grouped / one batch.
Also the fixed cost of a pass against its cost per position (the basis of
``scoring.PASS_COST_POSITIONS``): a least-squares fit over a few batch shapes.
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
from mke_lightning.modeling.forward import encode_prompt, grouped_target_logits, pack_groups, row_logprobs
from mke_lightning.modeling.loading import ModelConfig, load_causal_lm

ROOT = Path(__file__).resolve().parents[1]
LANGS = ["en", "cs", "de", "nl", "es", "fr", "pt", "ru", "th", "tr", "vi", "zh"]
ANCHORS = ["en", "de", "fr", "es", "ru", "zh"]


def timed_pass(model, grouped, targets, z) -> float:
    start = time.perf_counter()
    lp = row_logprobs(grouped_target_logits(model, grouped), targets)
    z.grad = None
    torch.stack([x.sum() for x in lp]).sum().backward()
    return time.perf_counter() - start


def fixed_cost(model, z, passes: int) -> dict:
    """Seconds per pass fitted as ``a + b * positions + c * rows`` over random batches of a few shapes."""
    shapes = [(1, 4), (1, 16), (4, 16), (12, 25), (24, 13), (36, 25)]
    xs, ys = [], []
    for b, t in shapes:
        rows = [[7] * t for _ in range(b)]
        grouped = pack_groups(rows, [[9]] * b, 0, 1)
        for _ in range(passes):
            ys.append(timed_pass(model, grouped, [[9]] * b, z))
            xs.append([1.0, b * t, b])
    a, per_pos, per_row = (
        torch.linalg.lstsq(torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64).unsqueeze(-1))
        .solution.flatten()
        .tolist()
    )
    return {
        "pass_s": round(a, 4),
        "position_s": round(per_pos, 5),
        "row_s": round(per_row, 5),
        "pass_in_positions": round(a / per_pos, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=5)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--groups", type=int, default=EditLossConfig.length_groups)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "mzsre"))
    args = ap.parse_args()

    torch.manual_seed(0)
    model, tok, arch = load_causal_lm(ModelConfig())
    model.eval()
    ed = KnowledgeEditor(
        method="lafn",
        train_languages=LANGS,
        loss=EditLossConfig(true_weight=0.0, kl_weight=1.0, anchor_languages=ANCHORS),
    )
    ed.causal_lm, ed.tokenizer, ed.arch = model, tok, arch
    anchors = [encode_prompt(tok, p) for p in ed._anchors()]
    z = torch.zeros(model.config.hidden_size, requires_grad=True)  # [d_model]: the backward reaches layer 0
    hook = model.get_submodule(arch.mlp_out_name(0)).register_forward_hook(lambda m, a, out: out + z)
    pad = tok.pad_token_id
    rows_out, one_s, grouped_s, ratios = [], [], [], []
    try:
        for record in read_mzsre(args.data, LANGS)[: args.records]:
            prompts, targets, _ = ed._rows([record])
            rows, tgts = prompts + anchors, targets + [[0]] * len(anchors)
            one = pack_groups(rows, tgts, pad, 1)
            grouped = pack_groups(rows, tgts, pad, args.groups)
            t_one, t_grouped = [], []
            for _ in range(args.passes):
                t_one.append(timed_pass(model, one, tgts, z))
                t_grouped.append(timed_pass(model, grouped, tgts, z))
            a, b = statistics.median(t_one), statistics.median(t_grouped)
            one_s.append(a)
            grouped_s.append(b)
            ratios.append(b / a)
            rows_out.append(
                {
                    "record": record.id,
                    "rows": len(rows),
                    "positions": sum(len(r) + len(t) - 1 for r, t in zip(rows, tgts)),
                    "padded_one": sum(x.input_ids.numel() for x in one.batches),
                    "padded_grouped": sum(x.input_ids.numel() for x in grouped.batches),
                    "passes_grouped": len(grouped.batches),
                    "one_batch_s": round(a, 3),
                    "grouped_s": round(b, 3),
                    "ratio": round(b / a, 3),
                }
            )
            print(json.dumps(rows_out[-1]), flush=True)
        fit = fixed_cost(model, z, args.passes)
    finally:
        hook.remove()
    print(
        json.dumps(
            {
                "threads": torch.get_num_threads(),
                "records": len(ratios),
                "median_one_batch_s": round(statistics.median(one_s), 3),
                "median_grouped_s": round(statistics.median(grouped_s), 3),
                "median_ratio": round(statistics.median(ratios), 3),
                "fit": fit,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()

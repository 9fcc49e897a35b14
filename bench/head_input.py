"""One forward pass with ``logits_to_keep``: strided vs contiguous LM-head input, in one run.

    python bench/head_input.py --rows 48 --tokens 20 --keep 5 --repeats 3

The embedded Gemma 3 270M as loaded by the package (``contiguous_head_input``
installed), timed with that hook and again with it taken off, alternating,
on the same random batch; the logits must agree. Prints the median seconds
of each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mke_lightning.modeling.loading import ModelConfig, load_causal_lm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--keep", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model, _, _ = load_causal_lm(ModelConfig())
    head = model.get_output_embeddings()
    hooks = dict(head._forward_pre_hooks)  # the contiguous-input hook installed at loading
    ids = torch.randint(1000, 20000, (args.rows, args.tokens), generator=torch.Generator().manual_seed(0))

    def run(contiguous: bool) -> tuple[float, torch.Tensor]:
        head._forward_pre_hooks.clear()
        if contiguous:
            head._forward_pre_hooks.update(hooks)
        start = time.perf_counter()
        with torch.no_grad():
            logits = model(input_ids=ids, logits_to_keep=args.keep, use_cache=False).logits
        return time.perf_counter() - start, logits

    run(True)  # warm-up
    times: dict[str, list[float]] = {"strided": [], "contiguous": []}
    for _ in range(args.repeats):
        t_s, strided = run(False)
        t_c, contiguous = run(True)
        times["strided"].append(t_s)
        times["contiguous"].append(t_c)
        torch.testing.assert_close(contiguous, strided, rtol=1e-4, atol=1e-4)
    head._forward_pre_hooks.update(hooks)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({
        "rows": args.rows, "tokens": args.tokens, "keep": args.keep, "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "seconds_strided": round(med["strided"], 3), "seconds_contiguous": round(med["contiguous"], 3),
        "ratio": round(med["strided"] / med["contiguous"], 2),
    }, indent=2))


if __name__ == "__main__":
    main()

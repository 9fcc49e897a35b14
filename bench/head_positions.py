"""Edit step time with the LM head on every kept position vs on the target positions only.

    python bench/head_positions.py --repeats 5

One LAFN training batch on the embedded Gemma 3 270M: MzsRE record 0's edit
prompt in 12 languages, each with its own target, plus 6 KL anchor rows with
one target token each. A step is a forward pass, the loss over the target
log-probabilities and a backward pass to a zero vector added at every MLP
output (so the backward reaches the first layer, as LAFN's does). The two
ways alternate; the medians and their ratio come from the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mke_lightning.data import read_mzsre
from mke_lightning.data.records import join_prompt
from mke_lightning.localization.background import unrelated_prompts
from mke_lightning.modeling.architectures import num_layers
from mke_lightning.modeling.forward import (
    encode_continuation,
    encode_prompt,
    kept_logits,
    pack,
    picked_logprobs,
    target_logits,
    target_logprobs,
)
from mke_lightning.modeling.loading import ModelConfig, load_causal_lm

LANGS = ["en", "cs", "de", "nl", "es", "fr", "pt", "ru", "th", "tr", "vi", "zh"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/mzsre")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    model, tok, arch = load_causal_lm(ModelConfig())
    model.eval()
    record = read_mzsre(args.data, LANGS)[0]
    prompts, targets = [], []
    for lang in LANGS:
        facts = record.facts(lang)
        prompt, new = join_prompt(facts.prompt, facts.target_new, lang)
        prompts.append(encode_prompt(tok, prompt))
        targets.append(encode_continuation(tok, new))
    anchors = unrelated_prompts(None)
    prompts += [encode_prompt(tok, anchors[lang][0]) for lang in ["en", "de", "fr", "es", "ru", "zh"]]
    targets += [[0]] * 6
    batch = pack(prompts, targets, tok.pad_token_id)
    zero = torch.zeros(model.config.hidden_size, requires_grad=True)  # [d_model]
    for layer in range(num_layers(model, arch)):
        model.get_submodule(arch.mlp_out_name(layer)).register_forward_hook(lambda m, a, out: out + zero)

    def every_kept():
        return target_logprobs(kept_logits(model, batch), batch)  # [B, K]

    def targets_only():
        return picked_logprobs(target_logits(model, batch), batch)  # [B, K]

    times: dict[str, list[float]] = {"every kept position": [], "target positions only": []}
    for _ in range(args.repeats + 1):  # the first round warms up and is dropped
        for name, fn in zip(times, (every_kept, targets_only)):
            start = time.perf_counter()
            fn().sum().backward()
            times[name].append(time.perf_counter() - start)
    rows, width = batch.input_ids.shape
    print(f"batch {rows} rows x {width} tokens; head positions: every kept {rows * batch.keep}, "
          f"targets only {int(batch.target_mask.sum())}; {torch.get_num_threads()} thread(s)")
    medians = {name: statistics.median(t[1:]) for name, t in times.items()}
    for name, m in medians.items():
        print(f"{name:24s} median {m:.2f} s per step over {args.repeats}")
    print(f"ratio targets only / every kept: {medians['target positions only'] / medians['every kept position']:.2f}")


if __name__ == "__main__":
    main()

"""Which layers to edit: a causal trace of the MLP outputs at the subject's last token, and optionally a
sweep of single-layer ROME edits.

    .venv/bin/python bench/layer_sweep.py --records 12                      # causal trace only
    .venv/bin/python bench/layer_sweep.py --records 5 --rome 4 6 8          # and ROME edits at layers 4, 6, 8
    .venv/bin/python bench/layer_sweep.py --records 6 --no-trace --time configs/mzsre/rome.yaml   # seconds per edit

**Causal trace** (per English MzsRE record): the answer is the model's own most likely next token after
the edit prompt among tokens holding text (a question's most likely next token is often a line break).
The subject's token embeddings are corrupted with Gaussian noise (``--noise`` x the standard
deviation of the embeddings over the prompts' tokens, ``--samples`` draws); then, one layer at a time,
the output of the MLP output projection at the subject's last token (and ``--window - 1`` layers above)
is put back to its clean value. The indirect effect of layer ``l`` is
``(P_restored(answer) - P_corrupted) / (P_clean - P_corrupted)``, averaged over records whose corruption
takes at least ``--min-drop`` of the clean probability away. The layers whose MLP output at the subject
carries the answer are the ones a key-value edit there can rewrite.

**ROME sweep** (``--rome L ...``, needs the key statistics of those layers): one edit per record and
layer, scored on English reliability, generality and locality (token_acc, the evaluation's own measure).

Prints a JSON object (per-layer effects, the sweep table); ``--out FILE`` also writes it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mke_lightning.data import read_mzsre
from mke_lightning.editing.methods.locate_edit import subject_end
from mke_lightning.modeling.forward import encode_prompt
from mke_lightning.modeling.loading import ModelConfig, load_causal_lm

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "mzsre"


@torch.no_grad()
def trace(model, tok, arch, records, noise: float, samples: int, window: int, seed: int) -> dict:
    n_layers = len(model.get_submodule(arch.layers))
    emb = model.get_input_embeddings()
    prompts = [encode_prompt(tok, r.facts("en").prompt) for r in records]
    # the embeddings' spread over the prompts' tokens (as the model scales them)
    flat = torch.tensor(sorted({t for p in prompts for t in p}))
    std = float(emb(flat[None])[0].float().std())
    g = torch.Generator().manual_seed(seed)
    # a question's most likely next token is often a line break or a special token: trace the most likely word
    words = tok.batch_decode([[i] for i in range(len(tok))], skip_special_tokens=True)  # special tokens: ""
    content = torch.tensor([bool(t.strip()) for t in words])
    content = torch.nn.functional.pad(content, (0, model.config.vocab_size - len(content)))  # [V]
    effects, kept = [], []
    for rec, ids in zip(records, prompts):
        facts = rec.facts("en")
        if not facts.subject or facts.subject not in facts.prompt:
            continue
        last = subject_end(tok, facts.prompt, 0, facts.subject)
        at = facts.prompt.find(facts.subject)
        offsets = tok(facts.prompt, add_special_tokens=True, return_offsets_mapping=True)["offset_mapping"]
        first = min(
            (i for i, (a, b) in enumerate(offsets) if b > a and b > at and a < at + len(facts.subject)), default=last
        )
        first = max(1, min(first, last))  # never the BOS token
        x = torch.tensor([ids])
        clean_mlp: dict[int, torch.Tensor] = {}
        hooks = [model.get_submodule(arch.mlp_out_name(l)).register_forward_hook(
            lambda m, a, out, l=l, kept=clean_mlp, at=last: kept.__setitem__(l, out[0, at].clone()))
            for l in range(n_layers)]
        try:
            logits = model(input_ids=x, logits_to_keep=1).logits[0, -1].float()
        finally:
            for h in hooks:
                h.remove()
        answer = int(logits.masked_fill(~content, float("-inf")).argmax())  # the top token that is not whitespace
        p_clean = float(logits.softmax(-1)[answer])
        # rows: `samples` corrupted runs, then per layer `samples` restored runs
        rows = samples * (1 + n_layers)
        noise_t = torch.randn(samples, last - first + 1, emb.weight.shape[1], generator=g) * noise * std
        noise_rows = noise_t.repeat(1 + n_layers, 1, 1)  # [rows, S, d]: the same draws for every layer
        restore_at = torch.full((rows,), -1)
        for l in range(n_layers):
            restore_at[samples * (1 + l): samples * (2 + l)] = l

        def corrupt(m, a, out, first=first, last=last, noise_rows=noise_rows):
            out = out.clone()
            out[:, first:last + 1] += noise_rows.to(out.dtype)
            return out


        def restorer(l, restore_at=restore_at, last=last, clean_mlp=clean_mlp):
            def hook(m, a, out):
                take = (restore_at <= l) & (restore_at > l - window) & (restore_at >= 0)  # rows restoring layer l
                if not take.any():
                    return None
                out = out.clone()
                out[take, last] = clean_mlp[l].to(out.dtype)
                return out
            return hook


        hooks = [emb.register_forward_hook(corrupt)]
        hooks += [model.get_submodule(arch.mlp_out_name(l)).register_forward_hook(restorer(l)) for l in range(n_layers)]
        try:
            probs = model(input_ids=x.repeat(rows, 1), logits_to_keep=1).logits[:, -1].float().softmax(-1)[:, answer]
        finally:
            for h in hooks:
                h.remove()
        p_corrupt = float(probs[:samples].mean())
        per_layer = probs[samples:].view(n_layers, samples).mean(-1)  # [L]
        drop = p_clean - p_corrupt
        if drop < 0.2 * p_clean or drop <= 0:
            continue
        effects.append(((per_layer - p_corrupt) / drop).tolist())
        kept.append(
            {
                "id": rec.id,
                "answer": tok.decode([answer]),
                "p_clean": round(p_clean, 4),
                "p_corrupt": round(p_corrupt, 4),
            }
        )
    mean = torch.tensor(effects).mean(0).tolist() if effects else []
    return {"records_kept": kept, "noise_std": round(std * noise, 4), "window": window, "samples": samples,
            "indirect_effect": [round(v, 4) for v in mean],
            "per_record": [[round(v, 3) for v in e] for e in effects]}


def rome_sweep(model, tok, arch, records, layers: list[int], solve_overrides: dict) -> list[dict]:
    from mke_lightning.editing.editor import KnowledgeEditor
    from mke_lightning.editing.methods.locate_edit import SolveConfig
    from mke_lightning.evaluation.evaluator import EditEvaluator, build_items

    ev = EditEvaluator(tok)
    items = {r.id: build_items(r, ["en"], ("reliability", "generality", "locality")) for r in records}
    refs = {r.id: ev.references(model, items[r.id]) for r in records}
    table = []
    for layer in layers:
        ed = KnowledgeEditor(method="rome", solve=SolveConfig(layers=[layer], **solve_overrides))
        ed.causal_lm, ed.tokenizer, ed.arch = model, tok, arch
        scores = {"reliability": [], "generality": [], "locality": []}
        seconds = []
        for r in records:
            t0 = time.perf_counter()
            ed.edit(r, None)
            seconds.append(time.perf_counter() - t0)
            for row in ev.score(model, items[r.id], refs[r.id]):
                scores[row["measure"]].append(row["token_acc"])
            ed.restore()
        table.append({"layer": layer, **{k: round(sum(v) / max(len(v), 1), 3) for k, v in scores.items()},
                      "median_s": round(sorted(seconds)[len(seconds) // 2], 2)})
        print(json.dumps(table[-1]), flush=True)
    return table


def time_methods(model, tok, arch, records, configs: list[str], stub_stats: bool) -> dict:
    """Seconds per edit (wall and process CPU) of each config's method, the statistics already in memory."""
    import yaml

    from mke_lightning.editing.editor import KnowledgeEditor
    from mke_lightning.editing.key_statistics import KeyStatistics, KeyStatsConfig
    from mke_lightning.editing.methods.locate_edit import SolveConfig

    out = {}
    for path in configs:
        model_cfg = yaml.safe_load(Path(path).read_text())["model"]
        solve = dict(model_cfg["solve"])
        stats = KeyStatsConfig(**solve.pop("stats", {}))
        ed = KnowledgeEditor(method=model_cfg["method"], solve=SolveConfig(**solve, stats=stats))
        ed.causal_lm, ed.tokenizer, ed.arch = model, tok, arch
        if stub_stats:  # the cost of a solve does not depend on C's values
            d_ff = ed.method_impl.weight(solve["layers"][0]).shape[1]
            ed.method_impl._stats = KeyStatistics(
                {l: torch.eye(d_ff) for l in solve["layers"]}, {l: 1 for l in solve["layers"]}
            )
        t0 = time.perf_counter()
        ed.method_impl.statistics()
        ed.method_impl.contexts()
        setup = time.perf_counter() - t0
        wall, cpu, steps, p_new = [], [], [], []
        for r in records:
            t0, c0 = time.perf_counter(), time.process_time()
            o = ed.edit(r, None)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            steps.append(o.steps)
            p_new.append(o.p_new)
            ed.restore()

        def med(v):
            return round(sorted(v)[len(v) // 2], 2)

        out[model_cfg["method"]] = {"first_edit_s": round(wall[0], 2), "median_s": med(wall[1:] or wall),
                                    "median_cpu_s": med(cpu[1:] or cpu), "median_steps": med(steps),
                                    "median_p_new": med(p_new), "setup_s": round(setup, 2), "stub_stats": stub_stats}
        print(json.dumps({model_cfg["method"]: out[model_cfg["method"]]}), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(SHARED))
    p.add_argument("--records", type=int, default=12, help="the first N English MzsRE records")
    p.add_argument("--noise", type=float, default=3.0, help="noise std in units of the embeddings' std")
    p.add_argument("--samples", type=int, default=4, help="noise draws per record")
    p.add_argument("--window", type=int, default=1, help="layers restored together: l and the window - 1 above it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--rome", type=int, nargs="*", default=[], help="layers of a single-layer ROME sweep (needs key statistics)"
    )
    p.add_argument("--sweep-records", type=int, default=None, help="records of the ROME sweep (default: --records)")
    p.add_argument("--time", nargs="*", default=[], help="configs (YAML) whose method to time per edit on the records")
    p.add_argument("--stub-stats", action="store_true", help="time with C = I instead of the cached statistics")
    p.add_argument("--no-trace", action="store_true")
    p.add_argument("--out", default=None)
    ns = p.parse_args()
    torch.set_grad_enabled(True)
    model, tok, arch = load_causal_lm(ModelConfig())
    records = read_mzsre(ns.data, ["en"])[: ns.records]
    out = {"model": ModelConfig().name_or_path, "records": len(records), "torch_threads": torch.get_num_threads()}
    if not ns.no_trace:
        t0 = time.perf_counter()
        out["trace"] = trace(model, tok, arch, records, ns.noise, ns.samples, ns.window, ns.seed)
        out["trace_seconds"] = round(time.perf_counter() - t0, 1)
        effect = out["trace"]["indirect_effect"]
        if effect:
            out["peak_layer"] = int(torch.tensor(effect).argmax())
        print(json.dumps({k: v for k, v in out.items() if k != "trace"} | {"indirect_effect": effect}), flush=True)
    if ns.time:
        out["seconds_per_edit"] = time_methods(model, tok, arch, records, ns.time, ns.stub_stats)
    if ns.rome:
        out["rome_sweep"] = rome_sweep(model, tok, arch, records[: ns.sweep_records or ns.records], ns.rome, {})
    text = json.dumps(out, indent=1)
    if ns.out:
        Path(ns.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()

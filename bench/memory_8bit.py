"""Peak memory of one edit with the base model in fp32 and in int8 (CPU, embedded model).

Each variant runs in its own process: load the model, locate the neurons of
one MzsRE edit (activation x gradient), train and apply the masked edit
(``--steps`` optimiser steps), evaluate it in English, and undo it. Reported:
the model's own bytes (tied tensors counted once), the process's peak
resident memory while loading, and its peak while editing (the kernel's
high-water mark ``VmHWM``, reset after the load through ``/proc/self/clear_refs``).

    python bench/memory_8bit.py --mzsre ../shared/data/mzsre --steps 10

Variants: ``fp32`` (all weights float32), ``bf16`` (all bfloat16), ``int8`` (linear layers int8 with
bitsandbytes, other modules float32) and ``int8_bf16`` (linear layers int8,
other modules bfloat16: what configs/scale/int8.yaml loads).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "fp32": {"dtype": "float32", "load_in_8bit": False},
    "bf16": {"dtype": "bfloat16", "load_in_8bit": False},
    "int8": {"dtype": "float32", "load_in_8bit": True},
    "int8_bf16": {"dtype": "bfloat16", "load_in_8bit": True},
}


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_mib() -> float:
    """Peak resident memory since the start or the last :func:`reset_peak`."""
    return _status_mib("VmHWM")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def run_child(variant: str, mzsre: str, steps: int) -> dict:
    import torch

    from mke_lightning.data import read_mzsre
    from mke_lightning.editing.editor import EditLossConfig, KnowledgeEditor
    from mke_lightning.editing.masked_lora import LoRAConfig
    from mke_lightning.evaluation.evaluator import EditEvaluator, build_items
    from mke_lightning.localization.attribution import AttributionConfig
    from mke_lightning.localization.locate import LocalizationConfig, locate
    from mke_lightning.modeling.loading import ModelConfig, load_causal_lm

    imports = peak_mib()
    t0 = time.perf_counter()
    model, tok, arch = load_causal_lm(ModelConfig(**VARIANTS[variant]))
    tensors = {t.data_ptr(): t for t in model.state_dict().values() if torch.is_tensor(t)}  # tied weights once
    model_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    load_peak = peak_mib()
    reset_peak()
    after_load = _status_mib("VmRSS")
    record = read_mzsre(mzsre, ["en", "zh", "fr"])[0]
    mask = locate(
        model, tok, arch, record, "en", LocalizationConfig(attribution=AttributionConfig(method="grad_x_act"))
    )
    ed = KnowledgeEditor(
        lora=LoRAConfig(merge_scale=1.0),
        loss=EditLossConfig(max_steps=steps, stop_loss=0.0, stop_prob=1.1),
        optimizer=lambda p: torch.optim.Adam(p, lr=5e-3),
    )
    ed.causal_lm, ed.tokenizer, ed.arch = model, tok, arch
    ev = EditEvaluator(tok)
    items = build_items(record, ["en"])
    refs = ev.references(model, items)
    outcome = ed.edit(record, mask)
    scores = {r["measure"]: r["token_acc"] for r in ev.score(model, items, refs)}
    ed.restore()
    return {
        "variant": variant, "imports_mib": imports, "load_peak_mib": load_peak, "after_load_mib": after_load,
        "edit_peak_mib": peak_mib(),
        "model_mib": model_bytes / 2**20, "steps": outcome.steps, "neurons": outcome.neurons,
        "reliability": scores["reliability"], "seconds": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mzsre", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mzsre"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--variants", nargs="+", default=["fp32", "int8"], choices=list(VARIANTS))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_child(args.child, args.mzsre, args.steps)), flush=True)
        return
    results = []
    for variant in args.variants:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            variant,
            "--mzsre",
            args.mzsre,
            "--steps",
            str(args.steps),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(line[-1][7:]))
    base = next((r for r in results if r["variant"] == "fp32"), None)
    print(
        "| variant | model MiB | peak RSS loading MiB | peak RSS editing MiB | editing vs fp32 "
        "| reliability | steps | seconds |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        vs = "-" if base is None or r is base else f"{r['edit_peak_mib'] / base['edit_peak_mib'] - 1:+.0%}"
        print(f"| {r['variant']} | {r['model_mib']:.0f} | {r['load_peak_mib']:.0f} | {r['edit_peak_mib']:.0f} | {vs} | "
              f"{r['reliability']:.2f} | {r['steps']} | {r['seconds']:.0f} |")

if __name__ == "__main__":
    main()

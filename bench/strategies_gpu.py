"""Seconds per edit and peak GPU memory of the demo run under each scale overlay.

A CUDA GPU is required. The model is a randomly initialised large architecture
(built from its config; no weights are read) with a given tokenizer, so the
figures are about speed and memory, not edit quality. Each variant runs
``mke fit --config configs/demo.yaml --config configs/scale/<variant>.yaml`` in
its own process (a DeepSpeed run initialises torch.distributed).

    python bench/strategies_gpu.py --tokenizer TOKENIZER_DIR --edits 8 \
        --variants gpu_bf16 zero2 zero3 int8 --out strategies.json

Printed per variant: model build + setup seconds, localisation seconds per
edit, edit + evaluation seconds per edit (median), optimisation seconds per
edit (median), and peak allocated / reserved GPU memory (GiB).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

REPO = Path(__file__).resolve().parents[1]

# Llama-3-8B's shape (hidden 4096, 32 layers, GQA 32/8 heads, MLP 14336); the
# vocabulary is the tokenizer's.
ARCHITECTURES = {
    "llama3-8b": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "max_position_embeddings": 8192, "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False,
    },
    "llama3-1b": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 2048,
        "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "max_position_embeddings": 8192, "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": True,
    },
}


class Clock(L.Callback):
    """Wall-clock marks: model built, localisation done, each edit batch (put it first among the callbacks)."""

    def __init__(self) -> None:
        self.marks: dict[str, float] = {"created": time.perf_counter()}
        self.batches: list[float] = []
        self._t = 0.0

    def on_fit_start(self, trainer, pl_module):
        self.marks["setup"] = time.perf_counter()  # model built and strategy set up; localisation next

    def on_train_start(self, trainer, pl_module):
        self.marks["train_start"] = time.perf_counter()  # after on_fit_start: localisation is done

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches.append(time.perf_counter() - self._t)


def make_model_folder(folder: Path, arch: str, tokenizer: Path) -> Path:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    tok.save_pretrained(folder)
    cfg = dict(ARCHITECTURES[arch], vocab_size=len(tok), bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    return folder


def save_random_weights(folder: Path, out: Path) -> Path:
    """The random model of ``folder`` saved with weights (bf16), for a variant that must load weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").exists():
        return out
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.bfloat16)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder).save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out


def run_child(args: argparse.Namespace) -> dict:
    import torch

    from mke_lightning.cli import MKECLI
    from mke_lightning.data import EditDataModule
    from mke_lightning.editing.editor import KnowledgeEditor

    clock = Clock()
    t0 = time.perf_counter()
    cli = MKECLI(KnowledgeEditor, EditDataModule, run=False, args=[
        "--config", str(REPO / "configs" / "demo.yaml"),
        "--config", str(REPO / "configs" / "scale" / f"{args.child}.yaml"),
        "--model.lm.name_or_path", args.model,
        "--model.lm.random_init", "false" if args.child == "int8" else "true",
        "--data.limit", str(args.edits),
        "--trainer.logger.init_args.save_dir", args.log_dir,
    ] + (["--trainer.accelerator", "gpu"] if args.child == "int8" else []))
    cli.trainer.callbacks.insert(0, clock)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    wall = time.perf_counter() - t0
    n = len(cli.model.outcomes)
    return {
        "variant": args.child,
        "edits": n,
        "wall_s": wall,
        "build_and_setup_s": clock.marks["setup"] - clock.marks["created"],
        "localisation_s_per_edit": (clock.marks["train_start"] - clock.marks["setup"]) / max(n, 1),
        "edit_and_eval_s_median": statistics.median(clock.batches),
        "optimisation_s_median": statistics.median(o.seconds for o in cli.model.outcomes),
        "steps_median": statistics.median(o.steps for o in cli.model.outcomes),
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "gpu": torch.cuda.get_device_name(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="folder of a Hugging Face tokenizer")
    ap.add_argument("--arch", default="llama3-8b", choices=sorted(ARCHITECTURES))
    ap.add_argument(
        "--int8-model", help="folder with weights for the int8 variant (default: the random model, saved once)"
    )
    ap.add_argument("--edits", type=int, default=8)
    ap.add_argument("--variants", nargs="+", default=["gpu_bf16", "zero2", "zero3", "int8"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--log-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_child(args)), flush=True)
        return

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_model_folder(Path(tmp) / "model", args.arch, Path(args.tokenizer))
        for variant in args.variants:
            model = str(folder)
            if variant == "int8":  # int8 is quantised from weights on load: give the random model some
                model = args.int8_model or str(save_random_weights(folder, Path(tmp) / "weights"))
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--model", model,
                   "--log-dir", str(Path(tmp) / "runs"), "--edits", str(args.edits), "--tokenizer", args.tokenizer]
            # A fresh cache per variant: no variant reuses another's located neurons.
            env = dict(os.environ, MKE_CACHE_DIR=str(Path(tmp) / f"cache-{variant}"))
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode or not lines:
                print(f"{variant}: FAILED (exit {proc.returncode})\n{proc.stderr[-4000:]}")
                results.append({"variant": variant, "error": proc.stderr[-4000:]})
                continue
            r = json.loads(lines[-1][len("RESULT "):])
            results.append(r)
            if args.out:
                Path(args.out).write_text(json.dumps(results, indent=1))
            print(
                f"{variant:9s} edits {r['edits']}  build+setup {r['build_and_setup_s']:.1f} s  "
                f"localise {r['localisation_s_per_edit']:.2f} s/edit  "
                f"edit+eval {r['edit_and_eval_s_median']:.2f} s/edit  "
                f"optimise {r['optimisation_s_median']:.2f} s/edit ({r['steps_median']:.0f} steps)  "
                f"peak {r['peak_allocated_gib']:.2f} GiB alloc / {r['peak_reserved_gib']:.2f} GiB reserved",
                flush=True,
            )
        shutil.rmtree(Path(tmp) / "runs", ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

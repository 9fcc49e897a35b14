"""Time the preservation statistics on the embedded model: every layer, default settings, cold cache.

    .venv/bin/python bench/key_statistics.py [--exclude ../shared/data] [--cache-dir DIR]

Prints the seconds spent writing the sample and collecting the keys, the keys
per layer, the passages dropped by the disjointness rule, and the size of the
cache folder; then loads the statistics again to time a cached call.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from mke_lightning.editing.key_statistics import KeyStatsConfig, cache_folder, key_statistics
from mke_lightning.modeling.loading import ModelConfig, load_causal_lm

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--exclude", nargs="*", default=[str(SHARED)] if SHARED.is_dir() else [],
                   help="benchmark files/folders the sample must not overlap (default: ../shared/data when present)")
    p.add_argument("--cache-dir", default=None, help="cache root (default: a fresh temporary folder, so the cache is cold)")
    p.add_argument("--tokens-per-language", type=int, default=KeyStatsConfig.tokens_per_language)
    ns = p.parse_args()

    model, tokenizer, arch = load_causal_lm(ModelConfig())
    with tempfile.TemporaryDirectory() as tmp:
        cfg = KeyStatsConfig(cache_dir=ns.cache_dir or tmp, exclude=ns.exclude, tokens_per_language=ns.tokens_per_language)
        t0 = time.perf_counter()
        stats = key_statistics(model, tokenizer, arch, cfg)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = key_statistics(model, tokenizer, arch, cfg)
        c = again.second_moment(again.layers[-1])  # read one layer from disk
        warm = time.perf_counter() - t0
        folder = cache_folder(cfg, stats.metadata["model_fingerprint"])
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        per_layer = layer_mb(folder)
        eig = torch.linalg.eigvalsh(c.double())
        out = {
            "torch_threads": torch.get_num_threads(),
            "layers": len(stats.layers),
            "d_ff": int(c.shape[0]),
            "languages": len(cfg.resolved_languages),
            "passages": stats.metadata["passages"],
            "dropped_by_disjointness": stats.metadata["dropped"],
            "excluded_paths": cfg.exclude,
            "keys_per_layer": stats.tokens(stats.layers[0]),
            "seconds_sample": stats.metadata["seconds_sample"],
            "seconds_keys": stats.metadata["seconds_keys"],
            "seconds_total_cold": round(cold, 1),
            "seconds_cached_call": round(warm, 2),
            "mb_on_disk": round(size / 2**20, 1),
            "mb_per_layer": per_layer,
            "last_layer_eigenvalues": {"min": float(eig[0]), "median": float(eig.median()), "max": float(eig[-1])},
        }
    print(json.dumps(out, indent=2))


def layer_mb(folder: Path) -> float:
    files = list((folder / "layers").glob("*.safetensors"))
    return round(sum(f.stat().st_size for f in files) / len(files) / 2**20, 1)


if __name__ == "__main__":
    main()

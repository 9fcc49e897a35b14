"""Saved edits: read back, loaded onto the base model, or merged and exported.

A run with ``model.save_deltas: true`` writes each edit as a
:class:`~mke_lightning.neuron_delta.NeuronDelta` under ``<log dir>/deltas/``:
``<record id>.safetensors`` under the ``single`` and ``batch`` protocols (each
edit made on the unedited model), ``<6-digit step>_<first id>.safetensors``
under ``sequential`` (each made on the model the earlier ones edited, so they
apply in file-name order). This module reads them back:

- :func:`read_deltas`: files and folders -> ``[(path, delta, metadata)]``;
- :func:`load_edits`: apply them in order onto a loaded model, merged into the
  weights or on top of them (int8, partitioned), and return the undo handles;
- :func:`export_merged` (the command ``mke export``): merge them into a
  full-precision copy of the base model and save a plain Hugging Face folder
  that ``transformers.AutoModelForCausalLM.from_pretrained`` loads.

See docs/deltas.md.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from torch import nn

from mke_lightning.architectures import ArchSpec
from mke_lightning.masked_lora import APPLY_MODES, apply_delta
from mke_lightning.model_loading import EMBEDDED_DEFAULT, ModelConfig, load_causal_lm, resolve_model_path
from mke_lightning.neuron_delta import NeuronDelta, OnTop, Restore, can_write_in_place, read_delta

log = logging.getLogger(__name__)

EDITS_FILE = "mke_edits.json"
"""What an exported folder holds besides the model: the merged delta files and their metadata, in order."""

Delta = tuple[Path, NeuronDelta, dict]  # (file, delta, its "mke" metadata)


def delta_files(paths: Iterable[str | Path]) -> list[Path]:
    """The delta files in the order given; a folder gives its ``*.safetensors``, sorted by name."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.safetensors"), key=lambda f: f.name)
            if not found:
                raise FileNotFoundError(f"{p}: the folder holds no *.safetensors delta files")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such delta file or folder")
    if not out:
        raise ValueError("no delta files given")
    seen: set[Path] = set()
    for f in out:
        if f.resolve() in seen:  # the same edit twice would be applied twice
            raise ValueError(f"{f}: given twice (once alone and once in its folder?)")
        seen.add(f.resolve())
    return out


def read_deltas(paths: Iterable[str | Path]) -> list[Delta]:
    """``[(path, delta, metadata)]`` for the given files and folders, in application order.

    A file that holds no delta raises :class:`~mke_lightning.neuron_delta.NotADeltaError`
    (a ``ValueError``) naming it; a missing path raises ``FileNotFoundError``.
    """
    return [(f, *read_delta(f)) for f in delta_files(paths)]


def load_edits(model: nn.Module, arch: ArchSpec, paths: Iterable[str | Path], mode: str = "auto") -> list[Restore | OnTop]:
    """Apply the deltas in ``paths`` to ``model`` in order; returns one undo handle per delta.

    ``mode`` as ``lora.apply``: ``merge`` (into the weights), ``on_top`` (forward
    hooks) or ``auto`` (merged where the weights can be written in place, on top
    where they are int8 or partitioned). Every delta is checked against the
    model before any is applied. Undo with :func:`undo_edits` (last first).
    """
    if mode not in APPLY_MODES:
        raise ValueError(f"mode must be one of {APPLY_MODES}, got {mode!r}")
    items = read_deltas(paths)
    _check_fit(items, model, arch)
    if mode == "merge":
        for path, delta, _ in items:
            for layer in delta.layers:
                if not can_write_in_place(model.get_submodule(arch.mlp_out_name(layer))):
                    raise ValueError(f"{path}: layer {layer}: the weight of {arch.mlp_out_name(layer)} cannot be "
                                     "written in place (int8 or partitioned); use mode 'on_top' or 'auto'")
    _warn_stacking(items)
    return [apply_delta(model, arch, delta, mode) for _, delta, _ in items]


def undo_edits(handles: list[Restore | OnTop]) -> None:
    """Undo what :func:`load_edits` applied, last first (so merged edits restore bit for bit)."""
    for undo in reversed(handles):
        undo()


def export_merged(model_config: ModelConfig, paths: Iterable[str | Path], out_dir: str | Path, dtype: str | None = None) -> Path:
    """Merge the deltas into a full-precision copy of the base model and save it with its tokenizer.

    The base is loaded in float32 (never int8: an int8 run's deltas merge into
    the full-precision model unchanged), every delta is merged in order, and the
    model is cast to ``dtype`` (default: ``model_config.dtype``) and saved as
    safetensors into ``out_dir`` with the tokenizer and :data:`EDITS_FILE`.
    ``out_dir`` must be new, empty, or an earlier export (it is overwritten).
    Returns ``out_dir``.
    """
    if model_config.load_in_8bit:
        raise ValueError("export merges the edits into full-precision weights and never loads int8: set "
                         "load_in_8bit false (deltas from an int8 run merge into the float model unchanged)")
    if model_config.random_init:
        raise ValueError("export needs the trained base weights; random_init builds random ones")
    target = replace(model_config, dtype=dtype or model_config.dtype)  # validates dtype
    out = Path(out_dir)
    _check_output(out, model_config)
    items = read_deltas(paths)  # bad files fail before the model is loaded
    for path, _, meta in items:
        if meta.get("model") and not _same_model(meta["model"], model_config.name_or_path):
            log.warning("%s: made on model %r, merged into %r", path, meta["model"], model_config.name_or_path)
    model, tokenizer, arch = load_causal_lm(replace(model_config, dtype="float32"))
    _check_fit(items, model, arch)
    _warn_stacking(items)
    for _, delta, _ in items:
        delta.merge_into(model, arch)
    model.to(target.torch_dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    edits = [{"file": str(path.resolve()), "layers": sorted(delta.layers), "neurons": delta.count(), "metadata": meta}
             for path, delta, meta in items]
    doc = {"base_model": model_config.name_or_path, "dtype": target.dtype, "merged_in": "float32", "edits": edits}
    (out / EDITS_FILE).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


def _check_fit(items: list[Delta], model: nn.Module, arch: ArchSpec) -> None:
    for path, delta, _ in items:
        try:
            delta.check_fits(model, arch)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None


def _warn_stacking(items: list[Delta]) -> None:
    """Single and batch edits were each made and evaluated on the unedited model; stacked, they may interact."""
    alone = [path.name for path, _, meta in items if meta.get("protocol") in ("single", "batch")]
    if len(items) > 1 and alone:
        log.warning("applying %d edits together, of which %s were each made on the unedited model "
                    "(protocol single/batch); stacked they may interact", len(items), ", ".join(alone))


def _same_model(a: str, b: str) -> bool:
    """The same name, or two paths of one folder."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def _check_output(out: Path, model_config: ModelConfig) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    if model_config.name_or_path != EMBEDDED_DEFAULT and _same_model(str(out), resolve_model_path(model_config)):
        raise ValueError(f"{out}: is the base model's own folder; export into a new one")
    if out.is_dir() and any(out.iterdir()) and not (out / EDITS_FILE).exists():
        raise ValueError(f"{out}: exists and is not empty; choose a new folder (an earlier export, "
                         f"holding {EDITS_FILE}, is overwritten)")


def export_main(args: list[str] | None = None) -> Path:
    """``mke export --model NAME_OR_PATH --deltas PATH... --output DIR [--dtype D]``."""
    parser = argparse.ArgumentParser(
        prog="mke export",
        description="Merge saved edits (delta files or folders, applied in order) into a full-precision copy "
                    "of the base model and save it as a Hugging Face folder.")
    parser.add_argument("--model", default=EMBEDDED_DEFAULT,
                        help=f"the base model: a local Hugging Face folder, a hub id or {EMBEDDED_DEFAULT} (default)")
    parser.add_argument("--deltas", nargs="+", required=True,
                        help="delta files and/or folders (a folder: its *.safetensors sorted by name), applied in order")
    parser.add_argument("--output", "-o", required=True, help="the folder to write (new, empty, or an earlier export)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="dtype of the saved weights (default: float32; the merge itself is done in float32)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model folder/hub")
    ns = parser.parse_args(args)
    cfg = ModelConfig(name_or_path=ns.model, dtype=ns.dtype, trust_remote_code=ns.trust_remote_code)
    try:
        out = export_merged(cfg, ns.deltas, ns.output)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    doc = json.loads((out / EDITS_FILE).read_text(encoding="utf-8"))
    print(f"merged {len(doc['edits'])} edit(s) into {ns.model} ({ns.dtype}): {out}")
    return out

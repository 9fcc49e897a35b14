"""Saved edits: read back, loaded onto the base model, or merged and exported.

A run with ``model.save_deltas: true`` writes each edit as a
:class:`~mke_lightning.editing.neuron_delta.NeuronDelta` under ``<log dir>/deltas/``:
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

Both refuse, before anything is applied, deltas that cover one record twice
(:func:`check_distinct`: e.g. the folders of a killed run and of its restart)
and deltas made on another model than the one they are applied to
(:func:`check_model`: each file records the fingerprint of the model its run
began with); ``allow_other_model`` (``--allow-other-model``) lets the second pass.

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

from mke_lightning.editing.neuron_delta import (
    APPLY_MODES,
    NeuronDelta,
    OnTop,
    Restore,
    apply_delta,
    can_write_in_place,
    read_delta,
)
from mke_lightning.localization.cache import model_fingerprint
from mke_lightning.modeling.architectures import ArchSpec
from mke_lightning.modeling.loading import EMBEDDED_DEFAULT, ModelConfig, load_causal_lm, resolve_model_path

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

    A file that holds no delta raises :class:`~mke_lightning.editing.neuron_delta.NotADeltaError`
    (a ``ValueError``) naming it; a missing path raises ``FileNotFoundError``.
    """
    return [(f, *read_delta(f)) for f in delta_files(paths)]


def load_edits(
    model: nn.Module,
    arch: ArchSpec,
    paths: Iterable[str | Path],
    mode: str = "auto",
    *,
    tokenizer=None,
    fingerprint: str | None = None,
    allow_other_model: bool = False,
) -> list[Restore | OnTop]:
    """Apply the deltas in ``paths`` to ``model`` in order; returns one undo handle per delta.

    ``mode`` as ``lora.apply``: ``merge`` (into the weights), ``on_top`` (forward
    hooks) or ``auto`` (merged where the weights can be written in place, on top
    where they are int8 or partitioned). Every delta is checked before any is
    applied: it fits the model, no record is covered twice (:func:`check_distinct`),
    and it was made on this model (:func:`check_model`: pass ``tokenizer``, as
    :func:`~mke_lightning.modeling.loading.load_causal_lm` returns it, so the model's
    fingerprint can be computed, or the ``fingerprint`` itself for a model whose
    weights are partitioned away; ``allow_other_model=True`` skips this check).
    Undo with :func:`undo_edits` (last first).
    """
    if mode not in APPLY_MODES:
        raise ValueError(f"mode must be one of {APPLY_MODES}, got {mode!r}")
    items = read_deltas(paths)
    check_distinct(items)
    _check_fit(items, model, arch)
    if not allow_other_model and any(meta.get("model_fingerprint") for _, _, meta in items):
        if fingerprint is None:
            if tokenizer is None:
                first = next(path for path, _, meta in items if meta.get("model_fingerprint"))
                raise ValueError(
                    f"{first}: records the model it was made on; pass tokenizer= (as load_causal_lm returns "
                    "it) so this model's fingerprint can be compared, fingerprint= for a model whose weights "
                    "are partitioned away, or allow_other_model=True to apply it without the check"
                )
            fingerprint = model_fingerprint(model, tokenizer, arch)
        check_model(
            items, {_loaded_as(model): fingerprint}, str(getattr(model.config, "_name_or_path", "") or "this model")
        )
    _warn_unchecked(items, allow_other_model)
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


def export_merged(model_config: ModelConfig, paths: Iterable[str | Path], out_dir: str | Path, dtype: str | None = None,
                  allow_other_model: bool = False) -> Path:
    """Merge the deltas into a full-precision copy of the base model and save it with its tokenizer.

    The base is loaded in float32 (never int8: an int8 run's deltas merge into
    the full-precision model unchanged), every delta is merged in order, and the
    model is cast to ``dtype`` (default: ``model_config.dtype``) and saved as
    safetensors into ``out_dir`` with the tokenizer and :data:`EDITS_FILE`.
    ``out_dir`` must be new, empty, or an earlier export (it is overwritten).
    Deltas that cover a record twice are refused, and so are deltas made on
    another model (their recorded fingerprint against the base's, loaded as
    their run loaded it: dtype, int8) unless ``allow_other_model``.
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
    check_distinct(items)
    checked = not allow_other_model and any(meta.get("model_fingerprint") for _, _, meta in items)
    for path, _, meta in items:
        if (not checked or not meta.get("model_fingerprint")) and meta.get("model") \
                and not _same_model(meta["model"], model_config.name_or_path):
            log.warning("%s: made on model %r, merged into %r", path, meta["model"], model_config.name_or_path)
    model, tokenizer, arch = load_causal_lm(replace(model_config, dtype="float32"))
    _check_fit(items, model, arch)
    if checked:
        check_model(items, _base_fingerprints(model_config, items, model, tokenizer, arch), model_config.name_or_path)
    _warn_unchecked(items, allow_other_model)
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


def check_distinct(items: list[Delta]) -> None:
    """Raise ``ValueError`` naming both files if two deltas cover the same record (it would be edited twice)."""
    first: dict[str, Path] = {}
    for path, _, meta in items:
        for rid in meta.get("records") or []:
            if rid in first:
                raise ValueError(
                    f"{path}: covers record {rid!r}, which {first[rid]} covers too; applying both would make that "
                    "edit twice. Deltas of two runs over the same records, or the folders of a killed run and of its "
                    "restart (before restarts went on writing into the run's first folder), overlap like this: pass "
                    "the deltas of one run, each edit once")
            first[rid] = path


def _loaded_as(model: nn.Module) -> str:
    """How ``model``'s weights are held, in the words of :func:`_made_as` (``float32``, ``int8+bfloat16``, ...)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    name = str(dtype).removeprefix("torch.") if dtype is not None else "unknown"
    return f"int8+{name}" if getattr(model, "is_loaded_in_8bit", False) else name


def _made_as(meta: dict) -> str:
    """How the model a delta was made on held its weights: its dtype, ``int8+<dtype>`` for an int8 base
    (older files recorded neither: float32)."""
    dtype = str(meta.get("dtype") or "float32")
    return f"int8+{dtype}" if meta.get("load_in_8bit") else dtype


def check_model(items: list[Delta], fingerprints: dict[str, str], described: str) -> None:
    """Raise ``ValueError`` naming the first delta whose recorded model fingerprint is not the model's.

    ``fingerprints``: the model's fingerprint as loaded each way (``float32``, ``bfloat16``, ``int8``, ...): a
    model's fingerprint depends on how its weights are held, so a delta is compared with the one loaded as
    its run loaded it. A delta without a fingerprint (written before they were recorded) is not checked.
    """
    for path, _, meta in items:
        want = meta.get("model_fingerprint")
        if not want:
            continue
        made = _made_as(meta)
        have = fingerprints.get(made)
        if have is None:
            raise ValueError(
                f"{path}: made on {meta.get('model')!r} loaded as {made}, and the model here is loaded as "
                f"{', '.join(sorted(fingerprints))}: its fingerprint can only be compared with the model "
                f"loaded as {made}; load it that way, or pass allow_other_model=True (--allow-other-model)"
            )
        if have != want:
            raise ValueError(f"{path}: made on another model: its run began with model {want[:16]} "
                             f"({meta.get('model')!r}, {made}), this is {have[:16]} ({described}, {made}); applying "
                             "it would write its neurons' updates into weights it was not trained on. Use the base "
                             "model the run began with, or pass allow_other_model=True (--allow-other-model)")


def _base_fingerprints(
    model_config: ModelConfig, items: list[Delta], model: nn.Module, tokenizer, arch
) -> dict[str, str]:
    """The base model's fingerprint as each delta's run loaded it: the float32 copy at hand, and others loaded for
    the check."""
    out = {"float32": model_fingerprint(model, tokenizer, arch)}
    for made in sorted({_made_as(meta) for _, _, meta in items if meta.get("model_fingerprint")} - set(out)):
        way = replace(model_config, load_in_8bit=made.startswith("int8+"), dtype=made.split("+")[-1])
        try:
            other, tok, other_arch = load_causal_lm(way)
        except (ImportError, RuntimeError, ValueError, OSError) as err:
            raise ValueError(
                f"deltas made on the model loaded as {made}: loading it that way to check its fingerprint "
                f"failed ({err}); pass allow_other_model=True (--allow-other-model) to merge without the check"
            ) from None
        out[made] = model_fingerprint(other, tok, other_arch)
        del other
    return out


def _warn_unchecked(items: list[Delta], allowed: bool) -> None:
    if allowed:
        log.warning("the deltas' models are not checked (allow_other_model)")
        return
    old = [path.name for path, _, meta in items if not meta.get("model_fingerprint")]
    if old:
        log.warning("%s: no model fingerprint recorded (written before they were); not checked against the model",
                    ", ".join(old))


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
    parser.add_argument(
        "--deltas",
        nargs="+",
        required=True,
        help="delta files and/or folders (a folder: its *.safetensors sorted by name), applied in order",
    )
    parser.add_argument("--output", "-o", required=True, help="the folder to write (new, empty, or an earlier export)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="dtype of the saved weights (default: float32; the merge itself is done in float32)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model folder/hub")
    parser.add_argument("--allow-other-model", action="store_true",
                        help="merge deltas whose recorded model fingerprint is not the base model's (default: refused)")
    ns = parser.parse_args(args)
    cfg = ModelConfig(name_or_path=ns.model, dtype=ns.dtype, trust_remote_code=ns.trust_remote_code)
    try:
        out = export_merged(cfg, ns.deltas, ns.output, allow_other_model=ns.allow_other_model)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    doc = json.loads((out / EDITS_FILE).read_text(encoding="utf-8"))
    print(f"merged {len(doc['edits'])} edit(s) into {ns.model} ({ns.dtype}): {out}")
    return out

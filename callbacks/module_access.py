"""What the callbacks need from a LightningModule and a DataModule.

What localisation reads, from any LightningModule (ours or a user's):

* the causal LM: an attribute ``causal_lm``, or a method ``get_causal_lm()``
  returning it (a Hugging Face ``PreTrainedModel`` with a causal LM head);
* ``tokenizer``: its tokenizer (attribute);
* optional ``arch`` (:class:`~mke_lightning.modeling.architectures.ArchSpec`): where
  the MLP output projections are; by default looked up from
  ``config.model_type`` in the architecture table;
* optional ``neuron_masks``: a dict the masks are written into (record id ->
  :class:`~mke_lightning.localization.neurons.NeuronMask`); created when absent.

The records come from the DataModule's ``records`` list; the edit language
from its ``edit_language`` (else the module's, else ``en``), the evaluation
languages from its ``eval_languages`` (else the edit language alone).

The evaluation callback needs only the first two (the causal LM and the
tokenizer): see :func:`model_and_tokenizer`.
"""

from __future__ import annotations

from mke_lightning.modeling.architectures import ArchSpec, resolve_arch


def model_and_tokenizer(pl_module, who: str) -> tuple[object, object]:
    """``(model, tokenizer)`` of a module offering ``causal_lm`` (or ``get_causal_lm()``) and ``tokenizer``.

    All the evaluation callback needs; it never looks at ``arch`` or the masks.
    """
    getter = getattr(pl_module, "get_causal_lm", None)
    model = getter() if callable(getter) else getattr(pl_module, "causal_lm", None)
    tokenizer = getattr(pl_module, "tokenizer", None)
    problems = []
    if model is None:
        problems.append("a causal LM (attribute `causal_lm` or method `get_causal_lm()`)")
    elif not hasattr(model, "config") or not hasattr(model, "get_output_embeddings"):
        problems.append(f"a Hugging Face causal LM, not a {type(model).__name__}")
    if tokenizer is None:
        problems.append("its tokenizer (attribute `tokenizer`)")
    if problems:
        raise AttributeError(
            f"{who} needs {type(pl_module).__name__} to offer {' and '.join(problems)}; "
            "see what the callbacks need in mke_lightning.callbacks.module_access (docs/localization.md)"
        )
    if tokenizer.pad_token_id is None:
        raise ValueError(f"{who}: the tokenizer has no pad token; set tokenizer.pad_token (e.g. to the EOS token)")
    return model, tokenizer


def causal_lm_of(pl_module, who: str) -> tuple[object, object, ArchSpec]:
    """``(model, tokenizer, arch)`` of a module offering what localisation reads (the module docstring)."""
    model, tokenizer = model_and_tokenizer(pl_module, who)
    arch = getattr(pl_module, "arch", None) or resolve_arch(model.config.model_type)
    return model, tokenizer, arch


def masks_of(pl_module) -> dict:
    """The module's ``neuron_masks`` dict, created when it has none."""
    masks = getattr(pl_module, "neuron_masks", None)
    if masks is None:
        masks = {}
        pl_module.neuron_masks = masks
    return masks


def languages_of(datamodule, pl_module) -> tuple[str, list[str]]:
    """(edit language, evaluation languages) of the run, from the DataModule (else the module, else ``en``)."""
    edit = getattr(datamodule, "edit_language", None) or getattr(pl_module, "edit_language", "en")
    evals = list(getattr(datamodule, "eval_languages", None) or [edit])
    return edit, evals


def records_of(datamodule) -> list:
    """The DataModule's records (this rank's share)."""
    if datamodule is None or not hasattr(datamodule, "records"):
        raise AttributeError(
            "the callbacks need a DataModule with a `records` list (mke_lightning.data.EditDataModule)"
        )
    return list(datamodule.records)


def edit_protocol_of(pl_module) -> str | None:
    """The module's editing protocol (``single``, ``batch``, ``sequential``), where it says (``protocol``):
    under ``sequential`` every edit stays, and the evaluation callback measures retention."""
    return getattr(pl_module, "protocol", None)


def resumed_ids_of(pl_module) -> set[str]:
    """The records of the edits a resumed module made before the restart (its ``resumed`` edit log, if any)."""
    return {o.record_id for o in getattr(pl_module, "resumed", None) or []}


def all_records_of(datamodule):
    """Every rank's records (the DataModule's ``all_records``, else its ``records``; ``None`` without either)."""
    records = getattr(datamodule, "all_records", None)
    return records if records is not None else getattr(datamodule, "records", None)


def own_record_ids(datamodule, rank: int) -> set[str] | None:
    """The ids of this rank's records; ``None`` (every record) on rank 0 of a DataModule without a ``records``
    list, and none on the other ranks."""
    records = getattr(datamodule, "records", None)
    if records is not None:
        return {r.id for r in records}
    return None if rank == 0 else set()

"""What an editing run is (method, protocol, languages, settings, a delta file's header) and what its
optimiser factory builds.

:func:`describe_editor` is the ``module`` section of the run's settings
(``results.json``); :func:`optimizer_settings` reads the optimiser's class and
arguments off a throw-away optimiser, and :func:`check_optimizer` refuses a
bad optimiser setting before the run does any work.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict

import torch


def describe_editor(editor) -> dict:
    """Method, protocol and settings of a :class:`~mke_lightning.editing.editor.KnowledgeEditor`."""
    opt = editor.hparams.get("optimizer")  # LightningCLI: the class path and init args as given
    if not isinstance(opt, (dict, str)):
        opt = optimizer_settings(editor.optimizer_factory)
    return {
        "method": editor.method_name,
        "protocol": editor.protocol,
        "train_languages": editor.train_languages or [editor.edit_language],
        "settings": {
            "lora": None,
            "values": None,
            **editor.method_impl.settings(),
            "loss": asdict(editor.loss_config),
            "optimizer": opt,
            "dtype": editor.lm_config.dtype,
            "load_in_8bit": editor.lm_config.load_in_8bit,
        },
    }


def delta_metadata(editor, record_ids: list[str]) -> dict:
    """A delta file's header: its records, the method and the model (``mke export`` and load_edits check it)."""
    lm = editor.lm_config
    meta = {"records": record_ids, "method": editor.method_name, "protocol": editor.protocol,
            "model": lm.name_or_path, "edit_language": editor.edit_language, "dtype": lm.dtype,
            "load_in_8bit": lm.load_in_8bit}
    if editor._base_fingerprint:  # set at the start of fit, before any edit: the model the run began with
        meta["model_fingerprint"] = editor._base_fingerprint
    return meta


def _dummy_parameters() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(1))]


def optimizer_settings(factory) -> dict | str:
    """What an optimiser factory builds: the class path and its arguments, read off a throw-away optimiser."""
    try:
        opt = factory(_dummy_parameters())
    except Exception:  # a factory that wants more than parameters: say what it is
        inner = factory.func if isinstance(factory, functools.partial) else factory
        return f"{getattr(inner, '__module__', '?')}.{getattr(inner, '__qualname__', type(inner).__qualname__)}"
    cls = type(opt)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}",
            "init_args": {k: _plain(v) for k, v in opt.defaults.items()}}


def _plain(v):
    """``v`` as JSON can hold it (a one-element tensor as its number, anything else unknown as its repr)."""
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v if v is None or isinstance(v, (bool, int, float, str)) else repr(v)


def check_optimizer(factory, given) -> None:
    """Refuse an optimiser setting the optimiser itself refuses (a negative learning rate), naming it.

    The factory builds a throw-away optimiser over one dummy parameter; a factory that needs more
    than parameters is left to the first edit. ``given``: the setting as the config gave it.
    """
    try:
        factory(_dummy_parameters())
    except (ValueError, TypeError) as err:
        if isinstance(err, TypeError) and "argument" in str(err):
            return  # wants arguments a plain parameter list does not give
        shown = json.dumps(given, default=str) if isinstance(given, dict) else repr(factory)
        raise ValueError(
            f"model.optimizer is refused by the optimiser itself: {err} (model.optimizer: {shown}); "
            "fix it in the config (e.g. model.optimizer.init_args.lr > 0)"
        ) from err

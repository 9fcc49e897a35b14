"""The method registry: ``model.method`` names one registered :class:`EditMethod`.

A method says how an edit's records become an update of the model (a
:class:`~mke_lightning.editing.neuron_delta.NeuronDelta`): either a trainable update
hooked into the model and optimised by the shared loop on the shared objective
(:meth:`EditMethod.attach`), or its own solve (:meth:`EditMethod.make_update`,
e.g. a closed form). The editor holds one instance per run and never asks for
a method by name.

Adding a method: a module with a subclass decorated ``@register`` (and, for a
method shipped with the package, its import in ``mke_lightning/editing/methods/__init__.py``).
A method defined outside the package registers the same way before the run
starts (``mke`` imports the modules named in ``$MKE_PLUGINS``, comma-separated).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:  # imported for annotations only: the editor imports this module
    from mke_lightning.editing.edit_loop import EditStep, UpdateResult
    from mke_lightning.localization.neurons import NeuronMask

_REGISTRY: dict[str, type["EditMethod"]] = {}


class EditMethod:
    """How one method parameterises, trains or solves an edit.

    ``editor`` is the :class:`~mke_lightning.editing.editor.KnowledgeEditor` running it: its
    ``causal_lm``, ``arch``, ``tokenizer`` and the settings sections (``lora_config``,
    ``values_config``, ``solve_config``, ``loss_config``) are what a method reads.
    """

    name: ClassVar[str] = ""
    """The key of ``model.method``."""

    def __init__(self, editor) -> None:
        self.editor = editor

    def check(self) -> None:
        """Refuse settings this method cannot run with (called when the editor is built)."""

    @property
    def label(self) -> str:
        """The method's name in results and reports (ablations add to it)."""
        return self.name

    @property
    def needs_masks(self) -> bool:
        """Whether each record needs located neurons (the NeuronLocalization callback)."""
        return True

    def settings(self) -> dict:
        """This method's own settings sections for the run's ``results.json`` (name -> dict or None)."""
        return {}

    def attach(self, mask: "NeuronMask | None"):
        """A trainable update hooked into the model (``None``: nothing to train).

        The handle offers ``parameters()``, ``count()``, ``clamp_norms()``, ``to_delta()`` and
        ``discard()``; the shared loop (:func:`~mke_lightning.editing.edit_loop.train_update`) optimises it.
        """
        raise NotImplementedError(f"method {self.name!r} defines neither attach() nor make_update()")

    def neuron_count(self, mask: "NeuronMask | None", handle) -> int:
        """Neurons one record's edit changes (``mask``: that record's own mask)."""
        return handle.count() if handle is not None else 0

    def state_dict(self) -> dict:
        """What the method carries from one edit to the next (e.g. earlier edits' keys), for checkpoints."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Take back :meth:`state_dict`'s result when a run resumes from a checkpoint."""

    def make_update(self, batch: "EditStep") -> "UpdateResult":
        """The edit of ``batch`` as a delta, not yet applied. Default: attach, then the shared loop."""
        from mke_lightning.editing.edit_loop import train_update

        return train_update(self, batch)


def register(cls: type[EditMethod]) -> type[EditMethod]:
    """Class decorator: make ``cls`` selectable as ``model.method: <cls.name>``."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    known = _REGISTRY.get(cls.name)
    if known is not None and known is not cls and known.__qualname__ != cls.__qualname__:
        raise ValueError(f"method name {cls.name!r} is taken by {known.__module__}.{known.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    """Every registered method's name."""
    return sorted(_REGISTRY)


def method_class(name: str) -> type[EditMethod]:
    """The registered method ``name``; an error listing the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"model.method {name!r} is not a registered method; known: {', '.join(method_names())}") from None

"""What a run is, for ``results.json``: one place that every part of the run writes to.

Each part adds its own section when the run is set up: the editor its
method, protocol and settings (``module``), the DataModule which data and
records (``data``), the localisation callback its settings
(``localization``). A section is a function, called when the results are
written, so that it tells what the run ended with (records skipped while
reading, say). The evaluation callback reads the sections here and nowhere
else: no callback looks into another.

A part of a user's own (a LightningModule, a DataModule) adds its section the
same way; a run without a section leaves the keys it would fill out of
``results.json``::

    run_settings(trainer).add("module", lambda: {"method": "mine", "protocol": "single"})
"""

from __future__ import annotations

import weakref
from typing import Callable

SECTIONS = ("module", "data", "localization")
"""The sections ``results.json`` reads: ``module`` (``method``, ``protocol``, ``train_languages``,
``settings``, ``model``), ``data`` (the DataModule's description) and ``localization`` (settings)."""

_BY_TRAINER: dict[int, "RunSettings"] = {}  # id(trainer) -> its run settings, dropped with the trainer


class RunSettings:
    """The sections of one run, by name; each is a function returning a plain dict."""

    def __init__(self) -> None:
        self._sections: dict[str, Callable[[], dict]] = {}

    def add(self, name: str, section: Callable[[], dict]) -> None:
        """Set section ``name`` (one of :data:`SECTIONS`); a later call replaces it."""
        if name not in SECTIONS:
            raise ValueError(f"run settings: unknown section {name!r}; choose from {list(SECTIONS)}")
        self._sections[name] = section

    def get(self, name: str) -> dict | None:
        """Section ``name`` as it is now, or ``None`` where no part of the run added it."""
        section = self._sections.get(name)
        return None if section is None else section()


def run_settings(trainer) -> RunSettings:
    """The run settings of ``trainer``'s run (created on first use; an empty one without a trainer, or for an
    object standing in for one that cannot be followed to its end)."""
    if trainer is None:
        return RunSettings()
    key = id(trainer)
    found = _BY_TRAINER.get(key)
    if found is None:
        found = RunSettings()
        try:
            weakref.finalize(trainer, _BY_TRAINER.pop, key, None)
        except TypeError:  # no weak reference to it (a SimpleNamespace in a test): nothing to keep
            return found
        _BY_TRAINER[key] = found
    return found

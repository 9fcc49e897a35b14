"""Edit methods by name (``model.method``); see :mod:`mke_lightning.editing.methods.registry`."""

from mke_lightning.editing.methods.registry import EditMethod, method_class, method_names, register

# The methods shipped with the package register themselves on import.
from mke_lightning.editing.methods import ft_l, lafn, lora, memla  # noqa: E402,F401
from mke_lightning.editing.methods import alphaedit, memit, rome  # noqa: E402,F401

__all__ = ["EditMethod", "method_class", "method_names", "register"]

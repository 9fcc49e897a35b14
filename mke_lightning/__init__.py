"""mke-lightning: multilingual knowledge editing of causal LMs with PyTorch Lightning.

The main classes import lazily from the top level::

    from mke_lightning import KnowledgeEditor, EditDataModule, NeuronLocalization, EditEvaluation
"""

from importlib import import_module

from mke_lightning.modeling import strategies  # registers ``--trainer.strategy ddp_editing``

__version__ = "0.1.0"

# name -> module that defines it; imported on first use (``import mke_lightning`` stays light)
_LAZY = {
    "KnowledgeEditor": "mke_lightning.editing.editor",
    "EditLossConfig": "mke_lightning.editing.objective",
    "EditDataModule": "mke_lightning.data",
    "NeuronLocalization": "mke_lightning.callbacks",
    "EditEvaluation": "mke_lightning.callbacks",
    "EditCheckpoint": "mke_lightning.callbacks",
    "ModelConfig": "mke_lightning.modeling.loading",
    "load_causal_lm": "mke_lightning.modeling.loading",
    "LoRAConfig": "mke_lightning.editing.masked_lora",
    "ValueUpdateConfig": "mke_lightning.editing.value_update",
    "LocalizationConfig": "mke_lightning.localization.locate",
    "NeuronMask": "mke_lightning.localization.neurons",
    "NeuronDelta": "mke_lightning.editing.neuron_delta",
    "EditMethod": "mke_lightning.editing.methods",
    "register_method": "mke_lightning.editing.methods",
    "load_edits": "mke_lightning.editing.export",
}
_RENAMED = {"register_method": "register"}

__all__ = ["strategies", "__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'mke_lightning' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name]), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

"""mke-lightning: multilingual knowledge editing of causal LMs with PyTorch Lightning.

The main classes import lazily from the top level::

    from mke_lightning import KnowledgeEditor, EditDataModule, NeuronLocalization, EditEvaluation
"""

from importlib import import_module

from mke_lightning import strategies  # registers ``--trainer.strategy ddp_editing``

__version__ = "0.1.0"

# name -> module that defines it; imported on first use (``import mke_lightning`` stays light)
_LAZY = {
    "KnowledgeEditor": "mke_lightning.editor",
    "EditLossConfig": "mke_lightning.objective",
    "EditDataModule": "mke_lightning.data",
    "NeuronLocalization": "mke_lightning.callbacks",
    "EditEvaluation": "mke_lightning.callbacks",
    "EditCheckpoint": "mke_lightning.callbacks",
    "ModelConfig": "mke_lightning.model_loading",
    "load_causal_lm": "mke_lightning.model_loading",
    "LoRAConfig": "mke_lightning.masked_lora",
    "ValueUpdateConfig": "mke_lightning.value_update",
    "LocalizationConfig": "mke_lightning.localization",
    "NeuronMask": "mke_lightning.neurons",
    "NeuronDelta": "mke_lightning.neuron_delta",
    "EditMethod": "mke_lightning.methods",
    "register_method": "mke_lightning.methods",
    "load_edits": "mke_lightning.export",
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

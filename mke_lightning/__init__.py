"""mke-lightning: multilingual knowledge editing of causal LMs with PyTorch Lightning."""

from mke_lightning import strategies  # registers ``--trainer.strategy ddp_editing``

__version__ = "0.1.0"
__all__ = ["strategies", "__version__"]

"""mke-lightning: multilingual knowledge editing of causal LMs with PyTorch Lightning."""

__version__ = "0.1.0"

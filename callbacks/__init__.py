"""Lightning callbacks of mke-lightning (installed as ``mke_lightning.callbacks``).

Both work on any LightningModule that offers ``causal_lm``, ``tokenizer``,
``arch`` and ``neuron_masks`` (see :mod:`mke_lightning.editor`).
"""

from mke_lightning.callbacks.evaluation import EditEvaluation
from mke_lightning.callbacks.localization import NeuronLocalization

__all__ = ["EditEvaluation", "NeuronLocalization"]

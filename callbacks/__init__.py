"""Lightning callbacks of mke-lightning (installed as ``mke_lightning.callbacks``).

The localisation and evaluation callbacks work on any LightningModule that
offers a causal LM and its tokenizer (see ``module_access.py``); the checkpoint
callback saves a run's progress every K edits.
"""

from mke_lightning.callbacks.checkpoint import EditCheckpoint
from mke_lightning.callbacks.evaluation import EditEvaluation
from mke_lightning.callbacks.localization import NeuronLocalization

__all__ = ["EditCheckpoint", "EditEvaluation", "NeuronLocalization"]

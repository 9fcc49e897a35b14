"""A Lightning Trainer with one more entry point: ``localize``.

``mke localize`` runs it: build the model, localise the neurons of every
record of the DataModule (split across the strategy's processes, cached on
disk), write the summary, and stop. No edit is made and no optimiser built,
so the model is never wrapped for training (DDP refuses to wrap a model with
no trainable parameter, as a frozen base model is).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info

from mke_lightning.localization.stage import StageResult


class MKETrainer(L.Trainer):
    def localize(self, model: L.LightningModule, datamodule: L.LightningDataModule | None = None) -> list[StageResult]:
        """Only localise: compute and cache the neuron masks of the run's records.

        Args:
            model: the LightningModule offering the causal LM (see mke_lightning.callbacks.module_access).
            datamodule: the DataModule whose ``records`` are localised.
        """
        launcher = self.strategy.launcher
        if launcher is not None:  # e.g. DDP on several devices: start the other processes first
            return launcher.launch(self._localize, model, datamodule, trainer=self)
        return self._localize(model, datamodule)

    def _localize(self, model: L.LightningModule, datamodule: L.LightningDataModule | None) -> list[StageResult]:
        from mke_lightning.callbacks.localization import NeuronLocalization

        if datamodule is None:
            raise ValueError("localize needs a DataModule with the records to localise (--data ...)")
        self.strategy.setup_environment()  # process group and device of this rank
        try:
            datamodule.prepare_data()
            datamodule.setup("fit")
            configure = getattr(model, "configure_model", None)
            if callable(configure):
                configure()
            model.to(self.strategy.root_device)
            stages = [c for c in self.callbacks if isinstance(c, NeuronLocalization)]
            if not stages:
                rank_zero_info("no NeuronLocalization callback configured; localising with its defaults")
                stages = [NeuronLocalization()]
            log_dir = self.log_dir if self.loggers else None
            out = Path(log_dir) / "localization" if log_dir else None
            results = [stage.localize(model, datamodule, out) for stage in stages]
            self.strategy.barrier("localize-done")
            return results
        finally:
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()

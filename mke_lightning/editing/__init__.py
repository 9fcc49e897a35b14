"""Making an edit: the LightningModule (:mod:`.editor`), the registered methods
(:mod:`.methods`), the shared training loop and objective, the updates they train
(masked LoRA, value vectors), the one form every edit takes (:mod:`.neuron_delta`),
preservation with its key statistics, and merging saved edits into a model (:mod:`.export`)."""

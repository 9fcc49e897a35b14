"""Which neurons hold a fact: attribution of the answer to the MLP neurons, thresholds and
language categories (:mod:`.locate`), busy-neuron filtering, the mask type and its files,
the disk cache, and the stage that localises a run's records across ranks."""

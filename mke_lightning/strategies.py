"""DeepSpeed for editing a frozen model.

A knowledge edit never trains the base model: every weight of it is frozen,
and each edit trains its own small adapters with the module's own optimiser
(they are created per edit, after the strategy has set up). What DeepSpeed
brings to editing is therefore ZeRO stage 3's partitioning of the *frozen*
weights across GPUs (a 70B model on GPUs that cannot hold it whole), and its
bf16 engine. Lightning's :class:`~lightning.pytorch.strategies.DeepSpeedStrategy`
insists on an optimiser over trainable parameters when fitting, which a frozen
model has none of; :class:`EditingDeepSpeedStrategy` sets the engine up as
Lightning does for inference in that case (stage 3 partitioning kept; stages
1-2, which partition optimiser states and gradients of trained parameters,
have nothing to partition), and back-propagates the edit loss with plain
autograd, which fills the adapters' gradients while DeepSpeed's hooks gather
the partitioned weights they flow through.

A module that does train parameters of its own (and returns an optimiser from
``configure_optimizers``) gets Lightning's behaviour unchanged.
"""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy


class EditingDeepSpeedStrategy(DeepSpeedStrategy):
    """``DeepSpeedStrategy`` that also fits a module with no trainable parameters (a frozen model being edited)."""

    _frozen_base = False

    def _initialize_deepspeed_train(self, model: torch.nn.Module) -> None:
        trainable = any(p.requires_grad for p in model.parameters())
        if trainable or "optimizer" in self.config:
            return super()._initialize_deepspeed_train(model)
        self._frozen_base = True
        self._initialize_deepspeed_inference(model)

    def backward(self, closure_loss: torch.Tensor, optimizer, *args, **kwargs) -> torch.Tensor:
        if not self._frozen_base:
            return super().backward(closure_loss, optimizer, *args, **kwargs)
        # The engine has no optimiser to hand the loss to; the adapters sit outside it.
        module = self.lightning_module
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        closure_loss.backward(*args, **kwargs)
        closure_loss = self.precision_plugin.post_backward(closure_loss, module)
        return closure_loss

"""Distributed strategies for editing a frozen model (DDP and DeepSpeed).

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

:class:`EditingDDPStrategy` is Lightning's DDP for the same situation:
PyTorch's ``DistributedDataParallel`` refuses a module with no trainable
parameter, and there is nothing for it to reduce, so the module is left
unwrapped. Every rank edits its own share of the records (the DataModule
deals them out), localisation and evaluation gather across ranks, and all
collective calls go through the strategy as usual. Its registered name is
``ddp_editing`` (``--trainer.strategy ddp_editing``).

A module that does train parameters of its own (and returns an optimiser from
``configure_optimizers``) gets Lightning's behaviour unchanged from both.
"""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, StrategyRegistry


def _trains_parameters(module: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


class EditingDDPStrategy(DDPStrategy):
    """``DDPStrategy`` that leaves a module with no trainable parameters unwrapped."""

    def _setup_model(self, model: torch.nn.Module):
        if _trains_parameters(model):
            return super()._setup_model(model)
        return model  # nothing to reduce: DistributedDataParallel would refuse it

    def _register_ddp_hooks(self) -> None:
        if isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            super()._register_ddp_hooks()


StrategyRegistry.register(
    "ddp_editing", EditingDDPStrategy, description="DDP that edits a frozen model without a DDP wrapper", override=True
)


class EditingDeepSpeedStrategy(DeepSpeedStrategy):
    """``DeepSpeedStrategy`` that also fits a module with no trainable parameters (a frozen model being edited)."""

    _frozen_base = False

    def _initialize_deepspeed_train(self, model: torch.nn.Module) -> None:
        if _trains_parameters(model) or "optimizer" in self.config:
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

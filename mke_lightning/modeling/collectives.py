"""Collectives through the Lightning strategy, with one single-process path.

:class:`SharedEdit` is the group of ranks that train one edit together. With
no strategy (a library call, or one rank) every call returns its input; with
several ranks objects are gathered with ``all_gather_object`` and numbers and
gradients summed through the strategy's ``reduce``.
"""

from __future__ import annotations

import torch


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size of the default process group (0, 1 outside one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_object(obj, world_size: int) -> list:
    """Every rank's ``obj`` in rank order (``[obj]`` on one process)."""
    if world_size == 1:
        return [obj]
    import torch.distributed as dist

    parts: list = [None] * world_size
    dist.all_gather_object(parts, obj)
    return parts


def gather_all(obj) -> list:
    """Every rank's ``obj`` in rank order, over the default process group (``[obj]`` outside one)."""
    return gather_object(obj, rank_and_world()[1])


def gather_rows(rows: list) -> list:
    """Every rank's rows, one list in rank order, on every rank (one collective call; ``rows`` on one process)."""
    return [r for part in gather_all(rows) for r in (part or [])]


class SharedEdit:
    """The ranks that train one edit together, each on its share of the batch's records."""

    def __init__(self, strategy=None) -> None:
        self.strategy = strategy
        self.size = 1 if strategy is None else strategy.world_size
        self.rank = 0 if strategy is None else strategy.global_rank

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order."""
        return gather_object(obj, self.size)

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks (one collective for all of them)."""
        if self.size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.strategy.root_device)
        return self.strategy.reduce(t, reduce_op="sum").tolist()

    def sum_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Replace each parameter's gradient by its sum over the ranks (one flat fp32 buffer, one collective)."""
        if self.size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.strategy.reduce(
            torch.cat([g.reshape(-1).float() for g in grads]), reduce_op="sum"
        )  # [sum of numel]
        for p, g, part in zip(params, grads, flat.split([g.numel() for g in grads])):
            p.grad = part.view_as(g).to(g.dtype)

"""MEMIT: least squares over several layers, weighted by the key second moment.

At each edit layer (ascending), with the edit keys ``K [d_ff, U]`` and the
residuals ``R [d_model, U]`` still to write there, the change minimises

    ||ΔW K - R||² + λ tr(ΔW C ΔWᵀ)      ->      ΔW (λ C + K Kᵀ) = R Kᵀ

(``λ`` = ``solve.mom2_weight``, ``C`` regularised by ``solve.ridge``): the
directions ordinary text uses are expensive to move. ``(λ C)⁻¹`` is computed once
per layer and run; each edit then needs only a ``U x U`` solve:
``ΔW = R (I + Kᵀ A⁻¹ K)⁻¹ (A⁻¹ K)ᵀ`` with ``A = λ C`` (push-through identity).
"""

from __future__ import annotations

import torch

from mke_lightning.editing.methods.locate_edit import LocateThenEdit
from mke_lightning.editing.methods.registry import register


def weighted_solve(a_inv: torch.Tensor, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
    """``ΔW = R Kᵀ (A + K Kᵀ)⁻¹`` from ``A⁻¹ [d, d]``, ``keys [d, U]``, ``resid [m, U]``: ``[m, d]``."""
    ak = a_inv @ keys  # [d, U]
    inner = torch.eye(keys.shape[1], dtype=keys.dtype, device=keys.device) + keys.T @ ak  # [U, U], symmetric
    return torch.linalg.solve(inner, resid.T).T @ ak.T


@register
class MEMIT(LocateThenEdit):
    name = "memit"

    def __init__(self, editor) -> None:
        super().__init__(editor)
        self._inverse: dict[int, torch.Tensor] = {}  # layer -> (λ C)⁻¹ [d_ff, d_ff], once per run

    def inverse(self, layer: int) -> torch.Tensor:
        if layer not in self._inverse:
            a = self.cfg.mom2_weight * self.regularised(layer)
            self._inverse[layer] = torch.cholesky_inverse(torch.linalg.cholesky(a))
        return self._inverse[layer]

    def solve_layer(self, layer, keys, resid):
        return weighted_solve(self.inverse(layer), keys, resid)

    def solve_masked(self, layer, keys, resid, idx):
        a = self.cfg.mom2_weight * self.regularised(layer)[idx][:, idx]  # λ C restricted to the neurons [n, n]
        return weighted_solve(torch.cholesky_inverse(torch.linalg.cholesky(a)), keys, resid)

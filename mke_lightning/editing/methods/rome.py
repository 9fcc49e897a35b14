"""ROME: a rank-one change of one layer's output projection (``solve.layers``: one index).

With the key second moment ``C`` (regularised by ``solve.ridge``) the change
that makes ``ΔW k* = r`` exactly and moves the output on ordinary text the least
(smallest ``tr(ΔW C ΔWᵀ)``) is

    ΔW = r (C⁻¹ k*)ᵀ / (k*ᵀ C⁻¹ k*)                 [d_model, d_ff], rank one.

Several keys at once (a batch, or several training languages): the same rule
with ``K [d_ff, U]`` and ``R [d_model, U]``, ``ΔW = R (Kᵀ C⁻¹ K)⁻¹ (C⁻¹ K)ᵀ``,
which meets every key exactly (rank U).
"""

from __future__ import annotations

import torch

from mke_lightning.editing.methods.locate_edit import LocateThenEdit
from mke_lightning.editing.methods.registry import register


def equality_solve(c_inv: torch.Tensor, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
    """``ΔW = R (Kᵀ C⁻¹ K)⁻¹ (C⁻¹ K)ᵀ``: ``c_inv [d, d]``, ``keys [d, U]``, ``resid [m, U]`` -> ``[m, d]``."""
    ck = c_inv @ keys  # [d, U]
    gram = keys.T @ ck  # [U, U]
    return torch.linalg.solve(gram, resid.T).T @ ck.T  # ([U, U]⁻¹ Rᵀ)ᵀ = R gram⁻ᵀ; gram is symmetric


@register
class ROME(LocateThenEdit):
    name = "rome"
    single_layer = True

    def __init__(self, editor) -> None:
        super().__init__(editor)
        self._inverse: dict[int, torch.Tensor] = {}  # layer -> C⁻¹ [d_ff, d_ff], once per run

    def inverse(self, layer: int) -> torch.Tensor:
        if layer not in self._inverse:
            self._inverse[layer] = torch.cholesky_inverse(torch.linalg.cholesky(self.regularised(layer)))
        return self._inverse[layer]

    def solve_layer(self, layer, keys, resid):
        return equality_solve(self.inverse(layer), keys, resid)

    def solve_masked(self, layer, keys, resid, idx):
        c = self.regularised(layer)[idx][:, idx]  # [n, n]
        return equality_solve(torch.cholesky_inverse(torch.linalg.cholesky(c)), keys, resid)

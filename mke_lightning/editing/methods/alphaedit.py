"""AlphaEdit: the update confined to the null space of the preserved keys (and of earlier edits).

``P [d_ff, d_ff]`` projects onto the eigen-directions of the key second moment
``C`` that ordinary text leaves (nearly) unused (``solve.null_threshold``,
``solve.null_mode``; :func:`~mke_lightning.editing.key_statistics.null_space_projector`).
An update of the form ``ΔW = X P`` changes no output on a key ``k`` with
``P k = 0``. With the edit keys ``K [d_ff, U]``, residuals ``R [d_model, U]``
and, under ``sequential``, the running sum ``Cp = Σ Kp Kpᵀ`` of the earlier
edits' keys at this layer (weight ``solve.earlier_weight``), the change is

    ΔWᵀ = (P (Cp + K Kᵀ) + L2 I)⁻¹ P K Rᵀ           [d_ff, d_model]

(``L2`` = ``solve.l2`` x the mean eigenvalue of ``C``): least squares on the edit
keys plus ``||ΔW Kp||²`` (earlier edits should map as before) plus ``L2 ||ΔW||²``.
Its columns lie in the range of ``P``; with an orthonormal basis ``U [d_ff, r]``
of that range it is ``ΔWᵀ = U (Uᵀ (Cp + K Kᵀ) U + L2 I)⁻¹ Uᵀ K Rᵀ``, an
``r x r`` solve per edit, and ``Uᵀ Cp U`` is kept as a running sum beside ``Cp``.

``Cp`` (float64, per edit layer) is what the method carries between edits:
:meth:`AlphaEdit.state_dict` / :meth:`AlphaEdit.load_state_dict` keep it in checkpoints.
"""

from __future__ import annotations

import torch

from mke_lightning.editing.key_statistics import masked_null_space_projector, null_space_projector
from mke_lightning.editing.methods.locate_edit import LocateThenEdit
from mke_lightning.editing.methods.registry import register


def null_basis(projector: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """An orthonormal basis ``[d, r]`` of the range of a projector ``[d, d]`` (``r`` = its trace)."""
    r = int(round(float(torch.trace(projector))))
    if r == 0:
        return projector.new_zeros(projector.shape[0], 0)
    g = torch.Generator(device="cpu").manual_seed(seed)
    probe = torch.randn(projector.shape[0], r, generator=g, dtype=projector.dtype).to(projector.device)  # [d, r]
    q, _ = torch.linalg.qr(projector @ probe)  # [d, r]: P times a random matrix spans P's range
    return q


def projected_solve(basis: torch.Tensor, gram_earlier: torch.Tensor, keys: torch.Tensor, resid: torch.Tensor,
                    l2: float) -> torch.Tensor:
    """``ΔW = (U (Uᵀ Cp U + Uᵀ K Kᵀ U + l2 I)⁻¹ Uᵀ K Rᵀ)ᵀ``: ``basis U [d, r]``, ``gram_earlier = Uᵀ Cp U [r, r]``,
    ``keys [d, U]``, ``resid [m, U]`` -> ``[m, d]``."""
    uk = basis.T @ keys  # [r, U]
    lhs = gram_earlier + uk @ uk.T + l2 * torch.eye(basis.shape[1], dtype=keys.dtype, device=keys.device)  # [r, r]
    y = torch.linalg.solve(lhs, uk @ resid.T)  # [r, m]
    return (basis @ y).T  # [m, d]


@register
class AlphaEdit(LocateThenEdit):
    name = "alphaedit"

    def __init__(self, editor) -> None:
        super().__init__(editor)
        self._basis: dict[int, torch.Tensor] = {}  # layer -> U [d_ff, r], once per run
        self._l2: dict[int, float] = {}  # layer -> L2 in the units of C
        self.earlier: dict[int, torch.Tensor] = {}  # layer -> Cp = Σ Kp Kpᵀ [d_ff, d_ff] float64 (sequential)
        self._earlier_reduced: dict[int, torch.Tensor] = {}  # layer -> Uᵀ Cp U [r, r]

    def basis(self, layer: int) -> torch.Tensor:
        if layer not in self._basis:
            c = self.second_moment(layer)  # [d_ff, d_ff] float64
            p = null_space_projector(c, self.cfg.null_threshold, self.cfg.null_mode)  # [d_ff, d_ff]
            self._basis[layer] = null_basis(p)
            self._l2[layer] = self.cfg.l2 * max(float(torch.diagonal(c).mean()), 1e-30)
        return self._basis[layer]

    def null_rank(self, layer: int) -> int:
        """Dimension of the space ``layer``'s updates may use."""
        return self.basis(layer).shape[1]

    def _reduced(self, layer: int) -> torch.Tensor:
        u = self.basis(layer)
        if layer not in self._earlier_reduced:
            cp = self.earlier.get(layer)
            self._earlier_reduced[layer] = (u.T @ cp.to(u.device) @ u if cp is not None
                                            else u.new_zeros(u.shape[1], u.shape[1]))
        return self._earlier_reduced[layer]

    def solve_layer(self, layer, keys, resid):
        u = self.basis(layer)
        return projected_solve(u, self.cfg.earlier_weight * self._reduced(layer), keys, resid, self._l2[layer])

    def solve_masked(self, layer, keys, resid, idx):
        c = self.second_moment(layer)  # [d_ff, d_ff]
        u = null_basis(masked_null_space_projector(c, idx, self.cfg.null_threshold, self.cfg.null_mode))  # [n, r]
        cp = self.earlier.get(layer)
        earlier = u.T @ cp.to(u.device)[idx][:, idx] @ u if cp is not None else u.new_zeros(u.shape[1], u.shape[1])
        l2 = self.cfg.l2 * max(float(torch.diagonal(c).mean()), 1e-30)
        return projected_solve(u, self.cfg.earlier_weight * earlier, keys, resid, l2)

    def remember(self, layer: int, keys: torch.Tensor) -> None:
        if self.editor.protocol != "sequential":  # single and batch undo every edit: nothing to keep
            return
        reduced = self._reduced(layer)  # Uᵀ Cp U before this edit
        uk = self.basis(layer).T @ keys  # [r, U]
        self._earlier_reduced[layer] = reduced + uk @ uk.T
        kk = keys @ keys.T  # [d_ff, d_ff]
        self.earlier[layer] = kk if layer not in self.earlier else self.earlier[layer] + kk

    def state_dict(self) -> dict:
        return {"earlier": {str(l): c.detach().cpu() for l, c in self.earlier.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.earlier = {int(l): c.to(torch.float64) for l, c in (state or {}).get("earlier", {}).items()}
        self._earlier_reduced = {}  # rebuilt from Cp and the basis on first use

"""Randoms: expected random coincidences of each prompt event's (LOR, TOF bin) [counts].

From delayed coincidences (``DLYD``): the delayed window records randoms with the same
expected distribution as the prompts hold. Their raw LOR histogram is far too sparse, so the
rate of each element pair is a smooth product of singles-like rates estimated from the delayed
counts of each element (:class:`FanSumRandoms`), scaled so that the rates add up to the number
of delayeds. Randoms are uniform in arrival-time difference, so each of the n TOF bins of the
coincidence window holds r_ij / n.

Without delayeds (documented estimate, ``TOFM``): randoms are taken as uniform over element
pairs and TOF bins, with the level set by the prompts whose TOF bin lies wholly outside the
image box (by ``n_sigma`` timing sigmas): no true or scattered annihilation from inside the box
can land there, so those prompts are randoms.
"""

from __future__ import annotations

import numpy as np
import torch

from recon.io.petsird_listmode import Coincidences, ListModeAcquisition


def _coincidence_modules(acq: ListModeAcquisition) -> np.ndarray:
    """(n_modules, n_modules) bool: module pairs whose element pairs are in coincidence."""
    eff = acq.pair_efficiency
    n_modules = acq.n_elements // eff.elements_per_module
    if eff.sgid.size:
        return eff.sgid >= 0
    return np.ones((n_modules, n_modules), dtype=bool)


class FanSumRandoms:
    """Expected randoms of element pairs from ``acq``'s delayed coincidences.

    Randoms of a pair are proportional to the product of the two elements' singles rates,
    r_ij = c S_i S_j. The delayed counts D_i of element i then satisfy D_i = c S_i sum_j S_j over
    the elements j in coincidence with i; where singles vary around the ring, that sum varies too,
    so D_i D_j alone (plain fan sums) is biased. S is solved from the D_i by fixed-point iteration
    (S_i <- D_i / sum_j S_j), and c so that the r_ij add up to the number of delayeds.
    """

    def __init__(self, acq: ListModeAcquisition, iterations: int = 30) -> None:
        delayeds = acq.delayeds
        if delayeds is None:
            raise ValueError("no delayed coincidences")
        d = np.bincount(np.concatenate([delayeds.first, delayeds.second]), minlength=acq.n_elements).astype(np.float64)
        per_module = acq.pair_efficiency.elements_per_module
        valid = _coincidence_modules(acq).astype(np.float64)
        same_module = np.diag(valid)  # 1 where elements of one module are in coincidence with each other
        off_diagonal = valid * (1.0 - np.eye(valid.shape[0]))
        module_of = np.arange(acq.n_elements) // per_module

        def partner_sums(singles: np.ndarray) -> np.ndarray:
            module_sums = singles.reshape(-1, per_module).sum(axis=1)
            return (off_diagonal @ module_sums)[module_of] + same_module[module_of] * (module_sums[module_of] - singles)

        singles = d.copy()
        for _ in range(iterations):
            partners = partner_sums(singles)
            singles = np.where(partners > 0, d / np.where(partners > 0, partners, 1.0), 0.0)
            singles /= singles.max() if singles.max() > 0 else 1.0
        z = 0.5 * float(singles @ partner_sums(singles))  # sum of S_i S_j over pairs in coincidence
        self._singles, self._scale = singles, len(delayeds) / z
        self.n_tof = acq.tof_edges_mm.size - 1

    @property
    def singles(self) -> tuple[np.ndarray, float]:
        """(S, c): per-element singles-like rates and the scale, r_ij = c S_i S_j [counts]."""
        return self._singles, self._scale

    def per_pair(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """Expected randoms [counts, whole coincidence window] of each pair (first[k], second[k])."""
        return self._scale * self._singles[first] * self._singles[second]

    def per_tof_bin(self, events: Coincidences) -> np.ndarray:
        """Expected randoms [counts] in each event's (LOR, TOF bin) cell."""
        return self.per_pair(events.first, events.second) / self.n_tof


def outside_tof_bins(edges_mm: torch.Tensor, sigma_mm: float, l_in: torch.Tensor, l_out: torch.Tensor,
                     n_sigma: float = 3.5) -> torch.Tensor:
    """(n, n_bins) bool: TOF bins of each LOR lying wholly outside [l_in, l_out] by n_sigma sigmas."""
    margin = n_sigma * sigma_mm
    lo, hi = edges_mm[:-1][None, :], edges_mm[1:][None, :]
    return (hi < l_in[:, None] - margin) | (lo > l_out[:, None] + margin)


def randoms_from_tof_margins(n_outside_prompts: int, outside_cells: float) -> float:
    """Uniform randoms level [counts per element pair per TOF bin]: prompts in the cells outside
    the image box divided by the number of such cells (summed over all element pairs)."""
    if outside_cells <= 0:
        return 0.0
    return n_outside_prompts / outside_cells

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

from collections.abc import Callable

import numpy as np
import scipy.sparse
import torch

from recon.io.petsird_listmode import Coincidences, ListModeAcquisition, PairEfficiency


def partner_sums(efficiency: PairEfficiency) -> Callable[[np.ndarray], np.ndarray]:
    """The map rates -> for each element i, the sum of the rates over the elements j in coincidence
    with it (PETSIRD module-pair factor F_ij > 0, element by element: a pair of modules may hold
    pairs in and out of coincidence, as blocks at the edge of the coincidence fan do). Module pairs
    are gathered by their factor table once; each call is one small product per table, so the cost
    grows with module pairs, not element pairs."""
    per_module = efficiency.elements_per_module
    n_modules = efficiency.element_efficiency.size // per_module
    m1, m2, table, sgid = efficiency.module_pairs()  # m1 >= m2: the table holds F[element of m1, element of m2]
    strict = np.tril(np.ones((per_module, per_module)), -1)  # one module: each pair once
    key = 2 * sgid[m1, m2] + (m1 == m2)
    terms = []
    for k in np.unique(key):
        chosen = key == k
        pairs = scipy.sparse.csr_matrix((np.ones(int(chosen.sum())), (m1[chosen], m2[chosen])), shape=(n_modules, n_modules))
        terms.append((pairs, (table[k // 2] > 0) * (strict if k % 2 else 1.0)))

    def sums(rates: np.ndarray) -> np.ndarray:
        values = np.asarray(rates, dtype=np.float64).reshape(n_modules, per_module)
        total = np.zeros_like(values)
        for pairs, indicator in terms:  # element i of module a: sum over b of F_ab[i, j] x rate of (b, j), and b's from a
            total += (pairs @ values) @ indicator.T + (pairs.T @ values) @ indicator
        return total.reshape(-1)

    return sums


class FanSumRandoms:
    """Expected randoms of element pairs from ``acq``'s delayed coincidences.

    Randoms of a pair are proportional to the product of the two elements' singles rates,
    r_ij = c S_i S_j. The delayed counts D_i of element i then satisfy D_i = c S_i sum_j S_j over
    the elements j in coincidence with i; where singles vary around the ring, that sum varies too,
    so D_i D_j alone (plain fan sums) is biased. S is solved from the D_i by fixed-point iteration
    (S_i <- D_i / sum_j S_j, j over the elements in coincidence with i: :func:`partner_sums`), and
    c so that the r_ij add up to the number of delayeds over the element pairs in coincidence.
    """

    def __init__(self, acq: ListModeAcquisition, iterations: int = 30) -> None:
        delayeds = acq.delayeds
        if delayeds is None:
            raise ValueError("no delayed coincidences")
        d = np.bincount(np.concatenate([delayeds.first, delayeds.second]), minlength=acq.n_elements).astype(np.float64)
        partners_of = partner_sums(acq.pair_efficiency)
        singles = d.copy()
        for _ in range(iterations):
            partners = partners_of(singles)
            singles = np.where(partners > 0, d / np.where(partners > 0, partners, 1.0), 0.0)
            singles /= singles.max() if singles.max() > 0 else 1.0
        z = 0.5 * float(singles @ partners_of(singles))  # sum of S_i S_j over pairs in coincidence
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

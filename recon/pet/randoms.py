"""Randoms: expected random coincidences of each prompt event's (LOR, TOF bin) [counts].

From delayed coincidences (``DLYD``): the delayed window records randoms with the same
expected distribution as the prompts hold. Their raw LOR histogram is far too sparse, so the
rate of each element pair is the smooth fan-sum estimate r_ij = N_d D_i D_j / Z, with D_i the
delayed counts involving element i, N_d the number of delayeds and Z the sum of D_i D_j over all
pairs in coincidence (so the r_ij add up to N_d). Randoms are uniform in arrival-time difference,
so each of the n TOF bins of the coincidence window holds r_ij / n.

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


def randoms_from_delayeds(acq: ListModeAcquisition, events: Coincidences) -> np.ndarray:
    """Expected randoms [counts] in each of ``events``' (LOR, TOF bin) cells from ``acq.delayeds``."""
    delayeds = acq.delayeds
    if delayeds is None:
        raise ValueError("no delayed coincidences")
    d = np.bincount(np.concatenate([delayeds.first, delayeds.second]), minlength=acq.n_elements).astype(np.float64)
    per_module = acq.pair_efficiency.elements_per_module
    module_sums = d.reshape(-1, per_module).sum(axis=1)
    valid = _coincidence_modules(acq)
    off_diagonal = valid & ~np.eye(valid.shape[0], dtype=bool)
    z = 0.5 * module_sums @ off_diagonal.astype(np.float64) @ module_sums
    within = (module_sums ** 2 - (d.reshape(-1, per_module) ** 2).sum(axis=1)) / 2
    z += float(within[np.diag(valid)].sum())
    n_tof = acq.tof_edges_mm.size - 1
    return len(delayeds) * d[events.first] * d[events.second] / (z * n_tof)


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

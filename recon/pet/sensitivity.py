"""Every LOR of the scanner, grouped by physical proximity, for the sensitivity image and for sums
over LOR space. Works for any PETSIRD geometry: no assumption on how modules or elements are laid out.

A scanner of N detecting elements has N(N-1)/2 LORs (10.7 million in coincidence for the
sample's 6016 elements), too many to back-project on a CPU for each reconstruction. The
elements are therefore grouped by the positions of their centres alone (:func:`element_groups`:
recursive median bisection until every group's centres span at most ``group_mm``), and each
pair of groups becomes one representative LOR between the groups' mean positions, carrying the
sum over its member element pairs of the PETSIRD efficiencies [mm^2], the number of pairs in
coincidence and (per study) the expected randoms. Those sums are exact (module-pair blocks,
:func:`_group_pair_sums`); only the line on which they are back-projected is approximated, so
sums over LOR space keep their totals. The default groups neighbours within 4.5 mm in one
transaxial plane (pairs of 4-mm crystals; grouping along the axis puts the representative LORs
between the slices: +-15 % between odd and even slices). ``group_mm = (0, 0)`` keeps every
element pair: the exact image, affordable on small scanners. Against it, on a 160-mm toy ring,
the default is within 0.5 % RMS at the scale of a one-voxel Gaussian, 6.5 % voxel by voxel
(fewer lines cannot reproduce the exact image's line-sampling moire; 1.35 % on a 320-mm ring):
``tests/test_pet_sensitivity.py``.

The grouped LORs depend only on the scanner description and its efficiencies: they are cached
(content hash) under ``$THERAFLOW_CACHE`` (default ``~/.cache/theraflow``) in
``pet-lor-groups/``, so they are computed once per scanner, not per study. The attenuation
factors and randoms, which change per study, are applied to the cached groups.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from recon.io.petsird_listmode import ListModeAcquisition, PairEfficiency
from recon.pet.projector import ListModeProjector

CACHE_VERSION = 2
# (transaxial, axial) extent [mm] of an element group: neighbours in one plane (pairs of 4-mm crystals)
DEFAULT_GROUP_MM = (4.5, 0.0)


@dataclass(frozen=True)
class LORGroups:
    """Representative LORs: end points (n, 3) [mm], summed PETSIRD efficiency (n,) [mm^2],
    number of member element pairs in coincidence (n,) and summed expected randoms (n,) [counts,
    all TOF bins; zero when no randoms model was given]."""

    p1: torch.Tensor
    p2: torch.Tensor
    efficiency: torch.Tensor
    pairs: torch.Tensor
    randoms: torch.Tensor

    def __len__(self) -> int:
        return int(self.efficiency.shape[0])


def element_groups(positions_mm: np.ndarray, group_mm: tuple[float, float]) -> np.ndarray:
    """Group index (0..n_groups-1) of each element: the set of element centres (n, 3) [mm, LPS]
    is split at the median of x, y or z until each group's centres span at most ``group_mm`` =
    (transaxial: diagonal of their x-y bounding box, axial: along z); it is split along z while
    too long axially, else along the longer of x and y. Limits below the elements' spacing leave
    every element its own group (the exact LOR set)."""
    transaxial, axial = (float(v) + 1e-3 for v in group_mm)
    group = np.empty(len(positions_mm), dtype=np.int64)
    pending = [np.arange(len(positions_mm))]
    n_groups = 0
    while pending:
        members = pending.pop()
        extent = np.ptp(positions_mm[members], axis=0)
        if len(members) > 1 and extent[2] > axial:
            axis = 2
        elif len(members) > 1 and math.hypot(extent[0], extent[1]) > transaxial:
            axis = int(extent[1] > extent[0])
        else:
            group[members] = n_groups
            n_groups += 1
            continue
        order = members[np.argsort(positions_mm[members, axis], kind="stable")]
        half = len(order) // 2
        pending += [order[:half], order[half:]]
    return group


def _group_pair_sums(efficiency: PairEfficiency, group: np.ndarray, n_groups: int, weight: np.ndarray,
                     indicator: bool) -> np.ndarray:
    """(n_groups, n_groups) symmetric sums over element pairs (i, j), i != j, in coincidence, of
    weight_i x weight_j x F_ij, i in the row group and j in the column group (pairs inside one
    group on the diagonal). F_ij: the module-pair factor of PETSIRD (``indicator``: 1 where it is
    positive; PETSIRD's calibration factor is not included). Exact, computed per module pair as M_a^T F M_b with M the (element x group)
    weight matrix of a module, so the cost grows with the number of module pairs, not of LORs."""
    per_module = efficiency.elements_per_module
    n_modules = len(group) // per_module
    if efficiency.module_pair.size:
        table, sgid = efficiency.module_pair, efficiency.sgid
    else:  # no module-pair table: every pair is in coincidence with factor 1
        table, sgid = np.ones((1, per_module, per_module)), np.zeros((n_modules, n_modules), dtype=np.int64)
    table = torch.as_tensor((table > 0) if indicator else table, dtype=torch.float64)
    # per module: its distinct groups (padded with the dummy group n_groups) and the weight matrix
    module_groups = group.reshape(n_modules, per_module)
    segments = [np.unique(row) for row in module_groups]
    width = max(len(s) for s in segments)
    seg_group = np.full((n_modules, width), n_groups, dtype=np.int64)
    matrix = np.zeros((n_modules, per_module, width))
    for m, s in enumerate(segments):
        seg_group[m, : len(s)] = s
        matrix[m, np.arange(per_module), np.searchsorted(s, module_groups[m])] = weight.reshape(n_modules, per_module)[m]
    seg_group_t, matrix_t, sgid_t = torch.as_tensor(seg_group), torch.as_tensor(matrix), torch.as_tensor(sgid)
    total = torch.zeros((n_groups + 1) * (n_groups + 1), dtype=torch.float64)
    m1, m2 = np.tril_indices(n_modules)  # m1 >= m2: the table holds F[element of m1, element of m2]
    keep = sgid[m1, m2] >= 0
    m1, m2 = torch.as_tensor(m1[keep]), torch.as_tensor(m2[keep])
    strict = torch.tril(torch.ones(per_module, per_module, dtype=torch.float64), -1)
    chunk = max(1, 2**24 // (per_module * max(per_module, width)))
    for start in range(0, len(m1), chunk):
        a, b = m1[start:start + chunk], m2[start:start + chunk]
        factor = table[sgid_t[a, b]]
        factor = torch.where((a == b)[:, None, None], factor * strict, factor)  # one module: each pair once
        sums = matrix_t[a].transpose(1, 2) @ factor @ matrix_t[b]  # (k, width, width)
        keys = seg_group_t[a][:, :, None] * (n_groups + 1) + seg_group_t[b][:, None, :]
        total.index_add_(0, keys.reshape(-1), sums.reshape(-1))
    total = total.reshape(n_groups + 1, n_groups + 1)[:n_groups, :n_groups].numpy()
    return total + total.T


def _cache_dir() -> Path:
    return Path(os.environ.get("THERAFLOW_CACHE") or Path.home() / ".cache" / "theraflow") / "pet-lor-groups"


def _scanner_key(acq: ListModeAcquisition, group_mm: tuple[float, float]) -> str:
    """Content hash of the scanner description and efficiencies that the grouped LORs depend on."""
    eff = acq.pair_efficiency
    digest = hashlib.sha256(f"v{CACHE_VERSION} {tuple(map(float, group_mm))!r} {eff.calibration!r} {eff.elements_per_module}".encode())
    for array in (acq.element_positions_mm, eff.element_efficiency, eff.sgid, eff.module_pair):
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:32]


def _scanner_groups(acq: ListModeAcquisition, group_mm: tuple[float, float]) -> dict[str, np.ndarray]:
    """Element groups and, for every pair of distinct groups with a non-zero efficiency, its
    (first, second) group, summed efficiency and number of pairs; read from the cache when there."""
    path = _cache_dir() / f"{_scanner_key(acq, group_mm)}.npz"
    try:
        with np.load(path) as stored:
            return dict(stored)
    except (OSError, ValueError, KeyError):
        pass
    eff = acq.pair_efficiency
    group = element_groups(acq.element_positions_mm, group_mm)
    n_groups = int(group.max()) + 1
    weights = eff.calibration * _group_pair_sums(eff, group, n_groups, eff.element_efficiency, indicator=False)
    pairs = _group_pair_sums(eff, group, n_groups, (eff.element_efficiency > 0).astype(float), indicator=True)
    first, second = np.nonzero(np.tril(weights, -1) > 0)
    positions = np.zeros((n_groups, 3))
    np.add.at(positions, group, acq.element_positions_mm)
    positions /= np.bincount(group, minlength=n_groups)[:, None]
    result = {"group": group, "first": first, "second": second, "positions": positions,
              "efficiency": weights[first, second], "pairs": pairs[first, second]}
    try:  # a cache that cannot be written is only slower
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as handle:
            np.savez(handle, **result)
        os.replace(handle.name, path)
    except OSError:
        pass
    return result


def lor_groups(acq: ListModeAcquisition, projector: ListModeProjector, group_mm: tuple[float, float] = DEFAULT_GROUP_MM,
               singles: tuple[np.ndarray, float] | None = None) -> LORGroups:
    """All LORs of ``acq``'s scanner, elements grouped within ``group_mm`` (see module docstring),
    keeping the representative LORs that cross the projector's image box.
    ``singles``: (S, c) of a randoms model r_ij = c S_i S_j [counts, all TOF bins] over the pairs
    in coincidence (:class:`recon.pet.randoms.FanSumRandoms`), summed exactly per group pair."""
    groups = _scanner_groups(acq, group_mm)
    first, second = groups["first"], groups["second"]
    random_sums = np.zeros(len(first))
    if singles is not None:
        rates, scale = singles
        n_groups = len(groups["positions"])
        eff = acq.pair_efficiency
        table = _group_pair_sums(eff, groups["group"], n_groups, rates * (eff.element_efficiency > 0), indicator=True)
        random_sums = scale * table[first, second]

    def tensor(values: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.float32, device=projector.device)

    p1, p2 = tensor(groups["positions"][first]), tensor(groups["positions"][second])
    _, _, l_in, l_out = projector.clip(p1, p2)
    crossing = l_out > l_in
    return LORGroups(p1[crossing], p2[crossing], tensor(groups["efficiency"])[crossing],
                     tensor(groups["pairs"])[crossing], tensor(random_sums)[crossing])


def sensitivity_image(groups: LORGroups, attenuation: torch.Tensor, projector: ListModeProjector,
                      scale: float) -> torch.Tensor:
    """H^T 1 = scale x sum over LORs of efficiency x attenuation factor x non-TOF back-projection.

    ``attenuation``: (n,) factors exp(-integral mu) of the groups' LORs; ``scale``: q of
    :mod:`recon.pet.system` (annihilations per mm^3 per Bq/mL). Non-TOF projector required."""
    if projector.tof is not None:
        raise ValueError("the sensitivity image needs a non-TOF projector")
    return projector.back(scale * groups.efficiency * attenuation, groups.p1, groups.p2)

"""Every LOR of the scanner, grouped by physical proximity, for the sensitivity image and for sums
over LOR space. Works for any PETSIRD geometry: no assumption on how modules or elements are laid out.

A scanner of N detecting elements has N(N-1)/2 LORs (10.7 million in coincidence for the
sample's 6016 elements, ~250 million for a 30,000-crystal ring), too many to back-project on a
CPU for each reconstruction. Two approximations reduce them, both from positions alone:

1. elements are grouped (:func:`element_groups`: recursive median bisection until every group's
   centres span at most ``group_mm[:2]`` = (transaxial, axial)); the default groups neighbours
   within 4.5 mm in one transaxial plane (pairs of 4-mm crystals; grouping along the axis puts
   the representative LORs between the slices: +-15 % between odd and even slices);
2. optionally (``group_mm[2]`` > 0, e.g. ``MERGED_GROUP_MM``: 16 mm), pairs of groups whose lines
   are rotations of each other about the scanner axis by less than an angle (same distance from
   the axis, same axial ends, directions in one bin of :func:`merge_angle`) are merged: a member
   line lies within about ``group_mm[2]`` of its representative inside the image box. Not the
   default: tried as the pipeline's, it moved the sample's background from +3.3 % to +2.3 % of
   truth and a held-out scanner's sphere 1.73 mm from its centre (bound 1.5 mm), and it saves
   only 1.25-1.4x at 7,680-15,360 crystals (``bench/bench_pet_sensitivity.py``). Merging also
   in the axial difference of the ends was tried and left out: it moves sensitivity out of the
   end slices (-13 % there at 8 mm).

Each representative LOR joins the efficiency-weighted mean end points of its group pairs and
carries the sum over its member element pairs of the PETSIRD efficiencies [mm^2], the number of
pairs in coincidence and (per study) the expected randoms. Those sums are exact (module-pair
blocks, :func:`_lor_sums`); only the line on which they are back-projected is approximated, so
sums over LOR space keep their totals. ``group_mm = (0, 0)`` keeps every element pair: the exact
image, affordable on small scanners. Against it (``tests/test_pet_sensitivity.py``, and
measured once on a 160 x 16-crystal ring of 102 mm radius) the default is within 0.3 % RMS
(0.13 %) at the scale of a one-voxel Gaussian, 4.1 % (0.65 %) voxel by voxel (fewer lines cannot
reproduce the exact image's line-sampling moire), with 3.7 (2.8) times fewer LORs than the exact
set; with the merging, 0.47 % (0.74 %) and 5.4 % (4.6 %) with 5.3 (5.1) times fewer.

The representative LORs depend only on the scanner description, its efficiencies and the
merging angle: they are cached (content hash) under ``$THERAFLOW_CACHE`` (default
``~/.cache/theraflow``) in ``pet-lor-groups/``, so they are computed once per scanner, not per
study. The attenuation factors and randoms, which change per study, are applied to the cached
groups.
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

CACHE_VERSION = 3
# (transaxial, axial) extent [mm] of an element group: neighbours in one plane (pairs of 4-mm crystals)
DEFAULT_GROUP_MM = (4.5, 0.0)
# the merging of rotated group pairs that bench/bench_pet_sensitivity.py measures (an option: see the module docstring)
MERGED_GROUP_MM = (4.5, 0.0, 16.0)


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


def _reduce(key: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted distinct keys and the sums of the rows of ``values`` (k, c) sharing each."""
    distinct, index = torch.unique(key, return_inverse=True)
    return distinct, torch.zeros((len(distinct), values.shape[1]), dtype=values.dtype).index_add_(0, index, values)


def _lor_sums(efficiency: PairEfficiency, group: np.ndarray, positions: np.ndarray, channels: list[tuple[np.ndarray, bool]],
              angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Sums over element pairs (i, j), i != j, in coincidence, of weight_i x weight_j x F_ij per
    representative LOR (:func:`_lor_keys` of the pair of element groups (g_i, g_j), ``positions``
    the groups' centres [mm]) for each channel (weight, indicator): F_ij the module-pair factor
    of PETSIRD (``indicator``: 1 where it is positive; PETSIRD's calibration factor is not
    included); pairs inside one group are left out. Returns the sorted keys and (k, C + 6) sums:
    the C channels, then the first channel's sums of the two groups' centres [mm x weight]
    (oriented as the keys say). Exact, computed per module pair as M_a^T F M_b with M the
    (element x group) weight matrix of a module, so the cost grows with the number of module
    pairs, not of LORs. Module pairs go in the order of their centres' lines with the direction
    last, so that the rotations of a LOR meet in one chunk and are merged there: memory grows
    with the number of representative LORs."""
    per_module = efficiency.elements_per_module
    n_modules, n_groups = len(group) // per_module, len(positions)
    m1, m2, table, sgid = efficiency.module_pairs()  # m1 >= m2: the table holds F[element of m1, element of m2]
    tables = torch.stack([torch.as_tensor((table > 0) if indicator else table, dtype=torch.float64) for _, indicator in channels], 1)
    # per module: its distinct groups (padded with the dummy group n_groups) and the weight matrices
    module_groups = group.reshape(n_modules, per_module)
    segments = [np.unique(row) for row in module_groups]
    width = max(len(s) for s in segments)
    seg_group = np.full((n_modules, width), n_groups, dtype=np.int64)
    matrix = np.zeros((n_modules, len(channels), per_module, width))
    for m, s in enumerate(segments):
        seg_group[m, : len(s)] = s
        column = np.searchsorted(s, module_groups[m])
        for c, (weight, _) in enumerate(channels):
            matrix[m, c, np.arange(per_module), column] = weight.reshape(n_modules, per_module)[m]
    centres = positions[seg_group.clip(max=n_groups - 1)].mean(axis=1)
    if angle > 0 and len(m1):
        fields = _line_fields(m1, m2, centres, angle)[2]
        order = np.lexsort([values for values, _ in fields])  # direction last: rotations adjacent
        m1, m2 = m1[order], m2[order]
    seg_group_t, matrix_t, sgid_t = torch.as_tensor(seg_group), torch.as_tensor(matrix), torch.as_tensor(sgid)
    m1, m2 = torch.as_tensor(m1), torch.as_tensor(m2)
    strict = torch.tril(torch.ones(per_module, per_module, dtype=torch.float64), -1)
    chunk = max(1, 2**22 // (len(channels) * per_module * max(per_module, width)))
    found: list[tuple[torch.Tensor, torch.Tensor]] = []
    for start in range(0, len(m1), chunk):
        a, b = m1[start:start + chunk], m2[start:start + chunk]
        factor = tables[sgid_t[a, b]]  # (k, channels, e, e)
        factor = torch.where((a == b)[:, None, None, None], factor * strict, factor)  # one module: each pair once
        sums = matrix_t[a].transpose(2, 3) @ factor @ matrix_t[b]  # (k, channels, width, width)
        rows = seg_group_t[a][:, :, None].expand(-1, -1, width).reshape(-1)
        cols = seg_group_t[b][:, None, :].expand(-1, width, -1).reshape(-1)
        sums = sums.permute(0, 2, 3, 1).reshape(-1, len(channels))
        kept = (sums != 0).any(dim=1) & (rows != cols) & (rows < n_groups) & (cols < n_groups)
        first, second, key = _lor_keys(rows[kept].numpy(), cols[kept].numpy(), positions, angle)
        sums = sums[kept]
        ends = torch.as_tensor(np.concatenate([positions[first], positions[second]], 1)) * sums[:, :1]
        found.append(_reduce(torch.as_tensor(key), torch.cat([sums, ends], 1)))
    if not found:
        return np.zeros(0, dtype=np.int64), np.zeros((0, len(channels) + 6))
    key, sums = _reduce(*(torch.cat(parts) for parts in zip(*found)))
    return key.numpy(), sums.numpy()


def _cache_dir() -> Path:
    return Path(os.environ.get("THERAFLOW_CACHE") or Path.home() / ".cache" / "theraflow") / "pet-lor-groups"


def _scanner_key(acq: ListModeAcquisition, group_mm: tuple[float, ...], angle: float) -> str:
    """Content hash of the scanner description and efficiencies that the grouped LORs depend on."""
    eff = acq.pair_efficiency
    digest = hashlib.sha256(f"v{CACHE_VERSION} {tuple(map(float, group_mm[:2]))!r} {angle!r} {eff.calibration!r} {eff.elements_per_module}".encode())
    for array in (acq.element_positions_mm, eff.element_efficiency, eff.sgid, eff.module_pair):
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:32]


def merge_angle(acq: ListModeAcquisition, projector: ListModeProjector, merge_mm: float) -> float:
    """Width [rad] of the bins of transaxial direction within which group pairs at the same
    distance from the axis and the same axial end points share one representative LOR (the
    rotations of one LOR about the scanner axis): merge_mm / r, r the largest distance of the
    image box's corners from the axis (the elements' centroid), so that a member line lies within
    about ``merge_mm`` of its representative in the image box. 0 when ``merge_mm`` is 0."""
    if merge_mm <= 0:
        return 0.0
    axis = acq.element_positions_mm[:, :2].mean(axis=0)
    lower, upper = projector.grid.box_mm()
    corners = np.array([[x, y] for x in (lower[0], upper[0]) for y in (lower[1], upper[1])])
    return merge_mm / float(np.max(np.linalg.norm(corners - axis, axis=1)))


def _oriented(first: np.ndarray, second: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each pair of points (indices into ``positions``) ordered so that its transaxial direction
    lies in [0, pi): y increases, or x where y does not change."""
    d = positions[second] - positions[first]
    flip = (d[:, 1] < 0) | ((d[:, 1] == 0) & (d[:, 0] < 0))
    return np.where(flip, second, first), np.where(flip, first, second)


def _line_fields(first: np.ndarray, second: np.ndarray, positions: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray, list]:
    """Orient each pair of points (:func:`_oriented`; ``positions`` [mm]); its line's (phi in bins
    of ``angle`` [rad], distance from the axis in 1-mm bins, z of both ends in 0.5-mm bins) as
    (values, number of values) per field, each shifted to start at 0 by bounds of the scanner (not of these pairs), so that keys agree
    across calls. Returns (first, second, fields)."""
    first, second = _oriented(first, second, positions)
    d = positions[second] - positions[first]
    phi = np.arctan2(d[:, 1], d[:, 0]) % math.pi  # pi itself (a rounding of -0) is 0
    centred = positions - np.append(positions[:, :2].mean(axis=0), positions[:, 2].min())
    p, q = centred[first], centred[second]
    radius, height = float(np.max(np.hypot(centred[:, 0], centred[:, 1]))), float(centred[:, 2].max())
    fields = [(np.floor(phi / angle), math.pi / angle + 1),
              (np.floor(p[:, 0] * np.sin(phi) - p[:, 1] * np.cos(phi) + radius + 1), 2 * radius + 3),
              (np.round(p[:, 2] * 2.0), 2 * height + 1), (np.round(q[:, 2] * 2.0), 2 * height + 1)]
    return first, second, [(values.astype(np.int64), int(size) + 1) for values, size in fields]


def _lor_keys(first: np.ndarray, second: np.ndarray, positions: np.ndarray, angle: float
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Orient each group pair (:func:`_line_fields`) and give it the key of its representative
    LOR: equal for the pairs whose lines share the distance from the axis and the axial ends and
    whose directions fall in one bin of ``angle`` [rad] (:func:`merge_angle`); the pair itself
    when ``angle`` is 0. Returns (first, second, key) oriented."""
    if angle <= 0:
        first, second = _oriented(first, second, positions)
        return first, second, first.astype(np.int64) * len(positions) + second
    first, second, fields = _line_fields(first, second, positions, angle)
    key = np.zeros(len(first), dtype=np.int64)
    for values, size in fields:
        key = key * size + values
    return first, second, key


def _group_positions(element_positions_mm: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Mean position (n_groups, 3) [mm] of each group's elements."""
    n_groups = int(group.max()) + 1
    positions = np.zeros((n_groups, 3))
    np.add.at(positions, group, element_positions_mm)
    return positions / np.bincount(group, minlength=n_groups)[:, None]


def _scanner_groups(acq: ListModeAcquisition, group_mm: tuple[float, ...], angle: float) -> dict[str, np.ndarray]:
    """Element groups and the representative LORs: end points, summed efficiency and number of
    pairs, and the sorted keys of :func:`_lor_keys`; read from the cache when there."""
    path = _cache_dir() / f"{_scanner_key(acq, group_mm, angle)}.npz"
    try:
        with np.load(path) as stored:
            return dict(stored)
    except (OSError, ValueError, KeyError):
        pass
    eff = acq.pair_efficiency
    group = element_groups(acq.element_positions_mm, group_mm[:2])
    positions = _group_positions(acq.element_positions_mm, group)
    channels = [(eff.element_efficiency, False), ((eff.element_efficiency > 0).astype(float), True)]
    key, sums = _lor_sums(eff, group, positions, channels, angle)
    valid = sums[:, 0] > 0
    key, sums = key[valid], sums[valid]
    ends = sums[:, 2:] / sums[:, :1]
    result = {"group": group, "key": key, "p1": ends[:, :3], "p2": ends[:, 3:],
              "efficiency": eff.calibration * sums[:, 0], "pairs": sums[:, 1]}
    try:  # a cache that cannot be written is only slower
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as handle:
            np.savez(handle, **result)
        os.replace(handle.name, path)
    except OSError:
        pass
    return result


def lor_groups(acq: ListModeAcquisition, projector: ListModeProjector, group_mm: tuple[float, ...] = DEFAULT_GROUP_MM,
               singles: tuple[np.ndarray, float] | None = None) -> LORGroups:
    """All LORs of ``acq``'s scanner, elements grouped and group pairs merged as ``group_mm`` =
    (transaxial, axial[, merge]) [mm] says (see module docstring; merge 0 when left out), keeping
    the representative LORs that cross the projector's image box.
    ``singles``: (S, c) of a randoms model r_ij = c S_i S_j [counts, all TOF bins] over the pairs
    in coincidence (:class:`recon.pet.randoms.FanSumRandoms`), summed exactly per representative LOR."""
    angle = merge_angle(acq, projector, group_mm[2] if len(group_mm) > 2 else 0.0)
    groups = _scanner_groups(acq, group_mm, angle)
    random_sums = np.zeros(len(groups["key"]))
    if singles is not None:
        rates, scale = singles
        eff = acq.pair_efficiency
        positions = _group_positions(acq.element_positions_mm, groups["group"])
        key, sums = _lor_sums(eff, groups["group"], positions, [(rates * (eff.element_efficiency > 0), True)], angle)
        lor = np.minimum(np.searchsorted(groups["key"], key), len(groups["key"]) - 1)
        found = groups["key"][lor] == key  # LORs of zero efficiency are not kept
        random_sums = scale * np.bincount(lor[found], sums[found, 0], len(groups["key"]))

    def tensor(values: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.float32, device=projector.device)

    p1, p2 = tensor(groups["p1"]), tensor(groups["p2"])
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

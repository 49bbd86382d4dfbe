"""Every LOR of the scanner, grouped by physical proximity, streamed in chunks for the sensitivity
image and for sums over LOR space. Works for any PETSIRD geometry: no assumption on how modules or
elements are laid out.

A scanner of N detecting elements has N(N-1)/2 LORs (10.7 million in coincidence for the
sample's 6016 elements, ~250 million for a 30,000-crystal ring), too many to back-project on a
CPU for each reconstruction. Elements are grouped (:func:`element_groups`: recursive median
bisection until every group's centres span at most ``group_mm`` = (transaxial, axial)); the
default groups neighbours within 4.5 mm in one transaxial plane (pairs of 4-mm crystals; grouping
along the axis puts the representative LORs between the slices: +-15 % between odd and even
slices). Each pair of groups is one representative LOR, joining the groups' centres and carrying
the sum over its member element pairs of the PETSIRD efficiencies [mm^2], the number of pairs in
coincidence and (per study) the expected randoms. Those sums are exact (:func:`_lor_sums`); only
the line on which they are back-projected is approximated, so sums over LOR space keep their
totals. They factorise where every member pair of two groups lies in module pairs whose PETSIRD
factor tables hold one and the same constant (inside the coincidence fan, away from its edges, on a
scanner whose module-pair factors are constant, as the benchmark's clinical ring): efficiency
sums = c x E_G x E_H, pair counts = |G| |H|, randoms = c S_G S_H with per-group totals, so most
group pairs cost one product. Group pairs that straddle a fan edge, and module-pair tables that vary
within themselves (PETSIRD's geometric factors of the sample and of the simulated scanners: solid
angle and obliquity per crystal pair, not a product of per-crystal terms), are summed member by
member per module pair; the sums are the same either way (to float64 rounding).
``group_mm = (0, 0)`` keeps every element pair: the exact image, affordable on small scanners.
Against it (``tests/test_pet_sensitivity.py``, and measured once on a 160 x 16-crystal ring of
102 mm radius) the default is within 0.3 % RMS (0.13 %) at the scale of
a one-voxel Gaussian, 4.1 % (0.65 %) voxel by voxel (fewer lines cannot reproduce the exact
image's line-sampling moire), with 3.7 (2.8) times fewer LORs than the exact set. (Merging also
the group pairs that are rotations of each other about the axis by less than 16 mm was tried: it
saved only 1.25-1.4x at 7,680-15,360 crystals and moved a held-out sphere 1.73 mm; removed.)

Memory is bounded: the representative LORs are produced module pair by module pair
(:func:`_lor_sums`, in the order of the modules' indices) and handed on as soon as every module
pair that holds one of their element pairs has been summed, in chunks of a few hundred thousand;
the caller projects each chunk and keeps only images and sums (:func:`lor_space`). Nothing of the
size of the LOR set is held.

Per study, what depends on the study's mu-map (attenuated and near-tail images, scatter and
randoms sums) needs every chunk projected again. Where the default groups make more than
``PER_STUDY_LORS`` (16 million; the sample's ring: 7.9 million, unchanged) representative LORs, as
on a clinical ring (30,528 crystals: 58.5 million), the per-study pass projects coarser groups
(``COARSE_GROUP_MM`` = 8.5 mm: up to 3 x 3 crystals of 4 mm) and :func:`refine` multiplies the
fine groups' geometric image (computed once per scanner and image grid, cached) by the ratio of
the coarse attenuated (or near-tail) to the coarse geometric image, both smoothed [1, 2, 1] per
axis: the crystal pattern comes from the fine lines, only the smooth per-voxel mean attenuation
from the coarse ones. Against the exact attenuated image (``tests/test_pet_sensitivity.py``: a
192 x 12-crystal ring, mu with axial and transaxial structure) 0.50 % RMS at one-voxel smoothing
with 24 times fewer LORs than the fine groups (fine groups themselves: 0.17 %; without the
smoothing 1.49 %, coarse image unrefined 24 %); measured once on a 318 x 12 ring of 202 mm radius:
0.43 % at 13 times fewer LORs. Sums over LOR space (pairs, randoms, SSS tables) stay exact sums,
on coarser lines.

Without a randoms model the chunks depend only on the scanner description and its efficiencies:
they are cached (content hash) under ``$THERAFLOW_CACHE`` (default ``~/.cache/theraflow``) in
``pet-lor-groups/<hash>/`` (16 bytes per LOR), so they are computed once per scanner, not per
study. With a randoms model (delayeds) the chunks are summed afresh with the randoms, as before.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from recon.io.petsird_listmode import ListModeAcquisition, PairEfficiency
from recon.pet.projector import ListModeProjector

CACHE_VERSION = 4
# (transaxial, axial) extent [mm] of an element group: neighbours in one plane (pairs of 4-mm crystals)
DEFAULT_GROUP_MM = (4.5, 0.0)
# most representative LORs (bound: pairs of element groups) projected per study; above it the
# per-study pass projects the coarser groups COARSE_GROUP_MM (up to 3 x 3 crystals of 4 mm: 13-24
# times fewer LORs) and refines its images with the cached fine geometric image (:func:`refine`)
PER_STUDY_LORS = 16_000_000
COARSE_GROUP_MM = (8.5, 8.5)
# values per module-pair block computed at once (bounds the memory of the exact sums)
BLOCK_VALUES = 2**22


@dataclass(frozen=True)
class LORChunk:
    """Representative LORs (a chunk of them): element groups ``first``, ``second`` (n,) joined by
    the line from ``p1`` to ``p2`` (n, 3) [mm, the groups' centres], summed PETSIRD efficiency (n,)
    [mm^2], number of member element pairs in coincidence (n,) and summed expected randoms (n,)
    [counts, all TOF bins; zero when no randoms model was given]."""

    first: torch.Tensor
    second: torch.Tensor
    p1: torch.Tensor
    p2: torch.Tensor
    efficiency: torch.Tensor
    pairs: torch.Tensor
    randoms: torch.Tensor

    def __len__(self) -> int:
        return int(self.efficiency.shape[0])


@dataclass(frozen=True)
class LORSpace:
    """All representative LORs of a scanner that cross an image box: the element groups'
    centres (n_groups, 3) [mm] and :class:`LORChunk` s, produced on each iteration (from the
    cache or summed afresh), never all held at once."""

    positions: np.ndarray
    _chunks: Callable[[], Iterator[LORChunk]]
    geometric: torch.Tensor | None = None  # fine geometric image when the chunks are coarser groups (see :func:`refine`)

    def __iter__(self) -> Iterator[LORChunk]:
        return self._chunks()


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


def _reduce(key: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct keys and the sums of the rows of ``values`` (k, c) sharing each."""
    distinct, index = np.unique(key, return_inverse=True)
    return distinct, np.stack([np.bincount(index.ravel(), column, len(distinct)) for column in values.T], 1)


def _yx_rank(positions: np.ndarray) -> np.ndarray:
    """Rank of each point (n, 3) [mm] in increasing (y, x) order; points of equal y and x share one."""
    return np.unique(positions[:, [1, 0]], axis=0, return_inverse=True)[1].ravel()


def _oriented(first: np.ndarray, second: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each pair of points (indices into ``rank``, :func:`_yx_rank`) ordered so that its transaxial
    direction lies in [0, pi): y increases, or x where y does not change."""
    flip = rank[second] < rank[first]
    return np.where(flip, second, first), np.where(flip, first, second)


def _group_modules(group: np.ndarray, per_module: int, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Modules holding each group's elements, (n_groups + 1, spread) in increasing order, padded by
    repeating the last (row n_groups: a dummy group in module 0), and the number of them (n_groups,)."""
    n_modules = len(group) // per_module
    pairs = np.unique(group * n_modules + np.arange(len(group)) // per_module)
    owner, module = np.divmod(pairs, n_modules)
    count = np.bincount(owner, minlength=n_groups)
    first = np.cumsum(count) - count
    index = np.minimum(first[:, None] + np.arange(count.max()), (first + count - 1)[:, None])
    return np.vstack([module[index], np.zeros((1, index.shape[1]), dtype=np.int64)]), count


def _lor_sums(efficiency: PairEfficiency, group: np.ndarray, positions: np.ndarray, channels: list[tuple[np.ndarray, bool]]
              ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Sums over element pairs (i, j), i != j, in coincidence, of weight_i x weight_j x F_ij per
    pair of element groups (g_i, g_j) (``positions`` the groups' centres [mm]) for each channel
    (weight, indicator): F_ij the module-pair factor of PETSIRD (``indicator``: 1 where it is
    positive; PETSIRD's calibration factor is not included); pairs inside one group are left out.
    Yields chunks (first, second, sums (k, C)): group pairs oriented (:func:`_oriented`), each
    once over all chunks, with its complete sums. Exact.

    Where every member pair of groups G, H lies in module pairs whose factor tables are one and
    the same constant c (all in coincidence: inside the coincidence fan, away from its edges), the
    sums factorise: c x W_G x W_H with W the groups' summed weights (c > 0 for an indicator), so
    such a group pair costs one product, taken in the module pair of the groups' first modules.
    The others (near a fan edge, or tables that vary, as PETSIRD's geometric module-pair factors
    do) are summed per module pair as M_a^T F M_b with M the (element x group) weight matrix of a
    module. Module pairs (a, b), a >= b, go in increasing a; a group pair summed that way is
    complete once the rows a up to the highest module holding an element of either group are done
    (at once when both groups lie in one module each and a != b): only the group pairs of groups
    that straddle modules wait, so memory stays bounded by a few rows of module pairs."""
    per_module = efficiency.elements_per_module
    n_modules, n_groups = len(group) // per_module, len(positions)
    m1, m2, table, sgid = efficiency.module_pairs()  # m1 >= m2 in increasing m1: table holds F[element of m1, element of m2]
    tables = np.stack([((table > 0) if indicator else table).astype(np.float64) for _, indicator in channels], 1)
    # per module pair, the class of its factor table's constant value (-1: not one value, or not in coincidence)
    flat = table.reshape(len(table), -1)
    constant = (flat == flat[:, :1]).all(1)
    values, value_class = np.unique(flat[:, 0], return_inverse=True)
    value_class = np.where(constant, value_class.ravel(), -1)
    module_class = np.where(sgid >= 0, value_class[np.maximum(sgid, 0)], -1).astype(np.int32)
    class_factor = [((values > 0) if indicator else values).astype(np.float64) for _, indicator in channels]  # per channel and class
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
    modules, spread = _group_modules(group, per_module, n_groups)
    rank = _yx_rank(positions)
    last_module = modules[:n_groups, -1]  # highest module holding an element of each group
    single = np.append(spread == 1, False)[seg_group]  # (module, slot): the slot's group lies in that module alone
    weights = [np.bincount(group, weight, n_groups) for weight, _ in channels]  # per channel: summed weight of each group
    strict = np.tril(np.ones((per_module, per_module)), -1)
    chunk = max(1, BLOCK_VALUES // (len(channels) * per_module * max(per_module, width)))
    pending_key, pending = np.zeros(0, dtype=np.int64), np.zeros((0, len(channels)))
    for start in range(0, len(m1), chunk):
        a, b = m1[start:start + chunk], m2[start:start + chunk]
        rows, cols = seg_group[a][:, :, None], seg_group[b][:, None, :]  # group pairs (k, width, width) of each module pair
        same = (a == b)[:, None, None]
        valid = (rows != cols) & (rows < n_groups) & (cols < n_groups)
        both_single = single[a][:, :, None] & single[b][:, None, :]
        # uniform: every member pair in module pairs of one constant factor; owned: summed here, as a product
        uniform = valid & both_single & (module_class[a, b] >= 0)[:, None, None]
        owned = uniform & (~same | (rows < cols))
        k, i, j = np.nonzero(valid & ~both_single)  # pairs with a group that straddles modules
        g, h = seg_group[a[k], i], seg_group[b[k], j]
        klass = module_class[modules[g, 0], modules[h, 0]]
        ok = klass >= 0
        for p in range(modules.shape[1]):
            for q in range(modules.shape[1]):
                if p or q:
                    ok &= module_class[modules[g, p], modules[h, q]] == klass
        uniform[k, i, j] = ok
        owned[k, i, j] = ok & (modules[g, 0] == a[k]) & (modules[h, 0] == b[k]) & ((a[k] != b[k]) | (g < h))
        k, i, j = np.nonzero(owned)
        g, h = seg_group[a[k], i], seg_group[b[k], j]
        klass = module_class[a, b][k]  # owned: a, b are the groups' first modules
        parts = [(g, h, np.stack([value[klass] * weight[g] * weight[h] for value, weight in zip(class_factor, weights)], 1))]
        # the others: per module pair M_a^T F M_b, complete at once where both groups lie in one module each
        summed = valid & ~uniform
        needed = summed.any(axis=(1, 2))
        a, b, summed, both_single, same = a[needed], b[needed], summed[needed], both_single[needed], same[needed]
        factor = tables[sgid[a, b]]  # (k, channels, e, e)
        factor[same[:, 0, 0]] *= strict  # one module: each pair once
        sums = (matrix[a].transpose(0, 1, 3, 2) @ factor @ matrix[b]).transpose(0, 2, 3, 1)  # (k, width, width, channels)
        direct = summed & both_single & ~same
        k, i, j = np.nonzero(direct)
        parts.append((seg_group[a[k], i], seg_group[b[k], j], sums[k, i, j]))
        k, i, j = np.nonzero(summed & ~direct)
        first, second = _oriented(seg_group[a[k], i], seg_group[b[k], j], rank)
        key, total = _reduce(np.concatenate([pending_key, first * n_groups + second]), np.concatenate([pending, sums[k, i, j]]))
        first, second = np.divmod(key, n_groups)
        done = int(m1[start + chunk]) - 1 if start + chunk < len(m1) else n_modules  # rows summed in full
        complete = np.maximum(last_module[first], last_module[second]) <= done
        pending_key, pending = key[~complete], total[~complete]
        parts.append((first[complete], second[complete], total[complete]))
        first, second, sums = (np.concatenate(column) for column in zip(*parts))
        kept = (sums != 0).any(axis=1)
        if kept.any():
            first, second = _oriented(first[kept], second[kept], rank)
            yield first, second, sums[kept]


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


def _group_positions(element_positions_mm: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Mean position (n_groups, 3) [mm] of each group's elements."""
    n_groups = int(group.max()) + 1
    positions = np.zeros((n_groups, 3))
    np.add.at(positions, group, element_positions_mm)
    return positions / np.bincount(group, minlength=n_groups)[:, None]


def _summed(acq: ListModeAcquisition, group: np.ndarray, positions: np.ndarray,
            singles: tuple[np.ndarray, float] | None) -> Iterator[dict[str, np.ndarray]]:
    """Chunks of representative LORs (group pairs of positive efficiency): first, second,
    efficiency (calibration included), pairs and, with ``singles``, randoms."""
    eff = acq.pair_efficiency
    in_use = (eff.element_efficiency > 0).astype(float)
    channels = [(eff.element_efficiency, False), (in_use, True)]
    if singles is not None:
        channels.append((singles[0] * in_use, True))
    for first, second, sums in _lor_sums(eff, group, positions, channels):
        valid = sums[:, 0] > 0
        chunk = {"first": first[valid].astype(np.int32), "second": second[valid].astype(np.int32),
                 "efficiency": (eff.calibration * sums[valid, 0]).astype(np.float32), "pairs": sums[valid, 1].astype(np.float32)}
        if singles is not None:
            chunk["randoms"] = singles[1] * sums[valid, 2]
        yield chunk


def _cached(acq: ListModeAcquisition, group_mm: tuple[float, float], group: np.ndarray,
            positions: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
    """The chunks of :func:`_summed` without randoms, read from the cache, or summed and written to
    it (a folder of numbered .npz files, renamed into place once complete)."""
    path = _cache_dir() / _scanner_key(acq, group_mm)
    if (path / "complete").is_file():
        for part in sorted(path.glob("*.npz")):
            with np.load(part) as stored:
                yield dict(stored)
        return
    try:  # a cache that cannot be written is only slower
        path.parent.mkdir(parents=True, exist_ok=True)
        building: Path | None = Path(tempfile.mkdtemp(dir=path.parent, prefix=".building-"))
    except OSError:
        building = None
    try:
        for index, chunk in enumerate(_summed(acq, group, positions, None)):
            if building is not None:
                try:
                    np.savez(building / f"{index:06d}.npz", **chunk)
                except OSError:
                    shutil.rmtree(building, ignore_errors=True)
                    building = None
            yield chunk
        if building is not None:
            (building / "complete").touch()
            try:
                os.replace(building, path)
                building = None
            except OSError:
                pass  # another process put the same entry in place first
    finally:
        if building is not None:
            shutil.rmtree(building, ignore_errors=True)


def _geometric_image(acq: ListModeAcquisition, projector: ListModeProjector, group_mm: tuple[float, float],
                     group: np.ndarray, positions: np.ndarray) -> torch.Tensor:
    """A^T(efficiency) [mm^3, x, y, z] of the representative LORs of ``group``, cached per scanner
    description + efficiencies + grouping + image grid and sampling step (a .npy file under
    ``pet-geometric/``); the chunks are streamed and not kept."""
    grid = projector.grid
    key = hashlib.sha256(f"{_scanner_key(acq, group_mm)} {grid!r} {projector.step_mm!r}".encode()).hexdigest()[:32]
    path = _cache_dir().parent / "pet-geometric" / f"{key}.npy"
    if path.is_file():
        return torch.as_tensor(np.load(path), device=projector.device)
    centres = torch.as_tensor(positions, dtype=torch.float32, device=projector.device)
    image = torch.zeros(grid.shape, device=projector.device)
    for part in _summed(acq, group, positions, None):
        first, second = (torch.as_tensor(part[name], device=projector.device).long() for name in ("first", "second"))
        image += projector.back(torch.as_tensor(part["efficiency"], device=projector.device), centres[first], centres[second])
    try:  # a cache that cannot be written is only slower
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npy", delete=False) as temporary:
            np.save(temporary, image.cpu().numpy())
        os.replace(temporary.name, path)
    except OSError:
        pass
    return image


def lor_space(acq: ListModeAcquisition, projector: ListModeProjector, group_mm: tuple[float, float] = DEFAULT_GROUP_MM,
              singles: tuple[np.ndarray, float] | None = None, per_study_lors: int | None = None) -> LORSpace:
    """All LORs of ``acq``'s scanner, elements grouped as ``group_mm`` = (transaxial, axial) [mm]
    says (see module docstring), as chunks of the representative LORs that cross the projector's
    image box, on the projector's device.
    ``singles``: (S, c) of a randoms model r_ij = c S_i S_j [counts, all TOF bins] over the pairs
    in coincidence (:class:`recon.pet.randoms.FanSumRandoms`), summed exactly per representative LOR.
    Where the pairs of groups exceed ``per_study_lors`` (default ``PER_STUDY_LORS``), the chunks are those of the coarser groups
    ``COARSE_GROUP_MM`` and ``geometric`` holds the fine groups' geometric image (computed once,
    cached) for :func:`refine`."""
    group = element_groups(acq.element_positions_mm, group_mm)
    positions = _group_positions(acq.element_positions_mm, group)
    geometric = None
    if len(positions) * (len(positions) - 1) / 2 > (PER_STUDY_LORS if per_study_lors is None else per_study_lors):
        geometric = _geometric_image(acq, projector, group_mm, group, positions)
        group_mm = COARSE_GROUP_MM
        group = element_groups(acq.element_positions_mm, group_mm)
        positions = _group_positions(acq.element_positions_mm, group)
    centres = torch.as_tensor(positions, dtype=torch.float32, device=projector.device)

    def chunks() -> Iterator[LORChunk]:
        source = _cached(acq, group_mm, group, positions) if singles is None else _summed(acq, group, positions, singles)
        for part in source:
            first, second = (torch.as_tensor(part[name], device=projector.device).long() for name in ("first", "second"))
            values = [torch.as_tensor(part.get(name, np.zeros(len(first))), device=projector.device).float()
                      for name in ("efficiency", "pairs", "randoms")]
            p1, p2 = centres[first], centres[second]
            _, _, l_in, l_out = projector.clip(p1, p2)
            crossing = l_out > l_in
            if bool(crossing.any()):
                yield LORChunk(first[crossing], second[crossing], p1[crossing], p2[crossing], *(v[crossing] for v in values))

    return LORSpace(positions, chunks, geometric)


def refine(space: LORSpace, images: torch.Tensor) -> torch.Tensor:
    """Images [x, y, z, C] back-projected from the chunks of ``space`` with per-LOR factors
    (column 0: factor 1, the geometric image): unchanged when the chunks are the fine groups; when
    they are coarser groups, each column times fine / coarse geometric image, i.e. the fine
    geometric image times the efficiency-weighted mean factor of the coarse LORs through each voxel
    (factors such as attenuation vary smoothly with the line, the crystal pattern does not)."""
    if space.geometric is None:
        return images
    smooth = images
    for axis in range(3):  # [1, 2, 1] / 4 along each axis (zero beyond the edges)
        lo = torch.cat([torch.zeros_like(smooth.narrow(axis, 0, 1)), smooth.narrow(axis, 0, smooth.shape[axis] - 1)], axis)
        hi = torch.cat([smooth.narrow(axis, 1, smooth.shape[axis] - 1), torch.zeros_like(smooth.narrow(axis, 0, 1))], axis)
        smooth = 0.5 * smooth + 0.25 * (lo + hi)
    coarse = smooth[..., :1]
    ratio = torch.where(coarse > 0, smooth / torch.where(coarse > 0, coarse, 1.0), 0.0)
    return space.geometric[..., None] * ratio


def sensitivity_image(groups: LORChunk, attenuation: torch.Tensor, projector: ListModeProjector,
                      scale: float) -> torch.Tensor:
    """H^T 1 of a chunk of LORs = scale x sum over them of efficiency x attenuation factor x
    non-TOF back-projection (the sensitivity image is the sum over all chunks).

    ``attenuation``: (n,) factors exp(-integral mu) of the chunk's LORs, or (n, C) columns of
    factors for C images [x, y, z, C] back-projected together; ``scale``: q of
    :mod:`recon.pet.system` (annihilations per mm^3 per Bq/mL). Non-TOF projector required."""
    if projector.tof is not None:
        raise ValueError("the sensitivity image needs a non-TOF projector")
    weights = groups.efficiency if attenuation.dim() == 1 else groups.efficiency[:, None]
    return projector.back(scale * weights * attenuation, groups.p1, groups.p2)

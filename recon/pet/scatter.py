"""Scatter: a tail-fitted estimate of the scattered coincidences of each prompt event [counts].

Shape, two methods (``PetParameters.scatter_method``):

* ``tail`` (default): scatter is a broad distribution over LOR space centred on the activity,
  modelled as the (TOF) line integrals of the first-pass activity estimate, extended beyond the
  axial field of view (activity there scatters into it too) and blurred by a wide Gaussian
  (``sigma_mm``, default 40 mm), times the pair's detection efficiency.
* ``sss``: Watson's single-scatter simulation (:class:`SingleScatterModel`) from the mu-map and
  the first-pass activity, both reaching 100 mm beyond the axial field of view: scatter points in
  the mu-map, Klein-Nishina angular distribution and energy loss, attenuation of the scattered
  photon at its energy, energy-window acceptance with the scanner's energy resolution, TOF.

Level: LORs that miss the attenuating object (integral of mu below ``tail_mu``) carry no trues,
only scatter and randoms ("tails"). Only the near tails are used, LORs passing within
``margin_mm`` of the object: further out the counts are randoms and scatter from activity
outside the field of view, and the blurred shape has no weight there (fitting them makes the
scale depend on the shape's far tail). The scale is
alpha = (prompts in the near tails - randoms there) / (shape summed over all near-tail LORs),
a ratio of sums of counts over many LORs (no per-LOR least squares on sparse list-mode counts),
the sum over LOR space coming from the grouped LORs of :mod:`recon.pet.sensitivity`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
from scipy.ndimage import gaussian_filter

from recon.pet.projector import ImageGrid


@dataclass(frozen=True)
class TailFit:
    """Result of the fit: scale, tail counts, and the scatter fraction of all prompts."""

    scale: float
    tail_prompts: int
    tail_randoms: float
    scatter_fraction: float


def extend_axially(activity: torch.Tensor, grid: ImageGrid, extension_mm: float) -> np.ndarray:
    """The [x, y, z] image extended by ``round(extension_mm / axial spacing)`` slices at both ends
    with copies of its end slices: activity beyond the axial field of view scatters into it and is
    taken to continue the activity at the field's edge, none where the object ends inside the field.
    (Judging slices by their activity and replacing the weak ones by the nearest strong one filled a
    long field's empty end slices, and 100 mm beyond, with the phantom's end slices: the tail-fitted
    scatter came out 28 % low on the long-axial-field scanner, tests/test_pet_scanners.py.)"""
    array = activity.detach().cpu().numpy().astype(np.float32)
    pad = int(round(extension_mm / grid.spacing_mm[2]))
    return np.pad(array, ((0, 0), (0, 0), (pad, pad)), mode="edge")


def scatter_shape_image(activity: torch.Tensor, grid: ImageGrid, sigma_mm: float = 40.0,
                        axial_extension_mm: float = 100.0) -> torch.Tensor:
    """The activity image [x, y, z], extended axially (:func:`extend_axially`), blurred by an
    isotropic Gaussian of ``sigma_mm`` and cut back to ``grid``."""
    pad = int(round(axial_extension_mm / grid.spacing_mm[2]))
    sigma_voxels = [sigma_mm / s for s in grid.spacing_mm]
    extended = extend_axially(activity, grid, axial_extension_mm)
    blurred = gaussian_filter(extended, sigma_voxels, mode="constant", truncate=3.0)[:, :, pad:pad + grid.shape[2]]
    return torch.tensor(np.clip(blurred, 0, None), dtype=torch.float32, device=activity.device)


def near_object(mu: torch.Tensor, grid: ImageGrid, margin_mm: float, mu_object: float = 0.002) -> torch.Tensor:
    """[x, y, z] 0/1 image: voxels within ``margin_mm`` of the object (mu > ``mu_object`` 1/mm)."""
    body = grid.to_image((mu.cpu().numpy() > mu_object).astype(np.uint8))
    distance = sitk.SignedMaurerDistanceMap(body, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    near = np.transpose(sitk.GetArrayFromImage(distance), (2, 1, 0)) <= margin_mm
    return torch.tensor(near.astype(np.float32), device=mu.device)


def in_near_tails(mu_integral: torch.Tensor, near_integral: torch.Tensor, tail_mu: float) -> torch.Tensor:
    """LORs missing the object (integral of mu < ``tail_mu``) but crossing its neighbourhood."""
    return (mu_integral < tail_mu) & (near_integral > 0)


def fit_tails(tail_shape: float, total_shape: float, tail_prompts: int, tail_randoms: float, n_prompts: int) -> TailFit:
    """Scale of a scatter shape so that it explains the tail prompts left after randoms.

    ``tail_shape``, ``total_shape``: the shape's expected counts (all TOF bins) summed over the
    near-tail LORs and over all LORs; ``tail_prompts`` and ``tail_randoms``: prompts and expected
    randoms on the near-tail LORs."""
    excess = max(0.0, tail_prompts - tail_randoms)
    scale = excess / tail_shape if tail_shape > 0 else 0.0
    total = scale * total_shape
    return TailFit(scale, tail_prompts, tail_randoms, total / max(n_prompts, 1))


# -- single-scatter simulation (SSS) ----------------------------------------------------------
ELECTRON_REST_KEV = 511.0


def klein_nishina_total(energy_keV: torch.Tensor) -> torch.Tensor:
    """Klein-Nishina total cross-section per electron, in units of 2 pi r_e^2."""
    k = energy_keV / ELECTRON_REST_KEV
    log = torch.log1p(2 * k)
    return ((1 + k) / k**2 * (2 * (1 + k) / (1 + 2 * k) - log / k) + log / (2 * k) - (1 + 3 * k) / (1 + 2 * k) ** 2)


def klein_nishina_angular(cos_theta: torch.Tensor) -> torch.Tensor:
    """Probability density [1/sr] of the scattering angle of a 511-keV photon (integrates to 1
    over the sphere): (r_e^2 / 2) P^2 (P + 1/P - sin^2) / sigma_total, P = E'/E = 1 / (2 - cos)."""
    p = 1.0 / (2.0 - cos_theta)
    density = 0.5 * p**2 * (p + 1.0 / p - (1.0 - cos_theta**2))
    sigma = 2 * math.pi * float(klein_nishina_total(torch.tensor(ELECTRON_REST_KEV, dtype=torch.float64)))
    return density / sigma


def window_acceptance(energy_keV: torch.Tensor, window_keV: tuple[float, float], resolution_at_511: float) -> torch.Tensor:
    """Probability that a photon depositing ``energy_keV`` is measured in ``window_keV``: Gaussian
    energy resolution of FWHM ``resolution_at_511`` x 511 keV at 511 keV, scaling as sqrt(E)."""
    sigma = resolution_at_511 * ELECTRON_REST_KEV / (2 * math.sqrt(2 * math.log(2))) * torch.sqrt(energy_keV / ELECTRON_REST_KEV)
    sigma = sigma.clamp(min=1e-3)
    lo, hi = window_keV
    return 0.5 * (torch.erf((hi - energy_keV) / (sigma * math.sqrt(2))) - torch.erf((lo - energy_keV) / (sigma * math.sqrt(2))))


@dataclass(frozen=True)
class ScatterPoints:
    """Scatter points in the mu-map: positions (m, 3) [mm LPS], mu (m,) [1/mm] at 511 keV, and the
    volume each stands for [mm^3]."""

    position_mm: torch.Tensor
    mu_per_mm: torch.Tensor
    volume_mm3: float


def scatter_points(mu: torch.Tensor, grid: ImageGrid, pitch_mm: float = 30.0, mu_min: float = 0.002,
                   seed: int = 0) -> ScatterPoints:
    """One point per cube of side ``pitch_mm`` (a regular lattice with one random offset, so the
    sum over points is an unbiased estimate of the volume integral), kept where mu > ``mu_min``."""
    rng = np.random.default_rng(seed)
    lower, upper = grid.box_mm()
    axes = [np.arange(lo + rng.uniform(0, pitch_mm), hi, pitch_mm) for lo, hi in zip(lower, upper)]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    index = np.clip(np.round((points - np.asarray(grid.origin_mm)) / np.asarray(grid.spacing_mm)), 0, np.asarray(grid.shape) - 1).astype(int)
    values = mu.cpu().numpy()[index[:, 0], index[:, 1], index[:, 2]]
    keep = values > mu_min
    as_tensor = lambda a: torch.tensor(a[keep], dtype=torch.float32, device=mu.device)  # noqa: E731
    return ScatterPoints(as_tensor(points), as_tensor(values), pitch_mm**3)


def segment_integrals(volumes: torch.Tensor, grid: ImageGrid, start: torch.Tensor, end: torch.Tensor,
                      step_mm: float = 4.0, batch: int = 8192) -> torch.Tensor:
    """Integrals [image units x mm] of each channel of ``volumes`` (C, x, y, z) along the segments
    ``start`` (n, 3) -> ``end`` (n, 3) [mm], trilinear at midpoints no further apart than
    ``step_mm``; zero outside the grid. Returns (n, C)."""
    volume = volumes.permute(0, 3, 2, 1)[None]
    origin = torch.tensor(grid.origin_mm, dtype=torch.float32, device=volumes.device)
    extent = torch.tensor([max((n - 1) * s, 1e-6) for n, s in zip(grid.shape, grid.spacing_mm)], dtype=torch.float32,
                          device=volumes.device)
    out = torch.empty((start.shape[0], volumes.shape[0]), dtype=torch.float32, device=volumes.device)
    length = torch.linalg.norm(end - start, dim=1)
    n = max(2, math.ceil(float(length.max()) / step_mm)) if length.numel() else 2
    fraction = (torch.arange(n, dtype=torch.float32, device=volumes.device) + 0.5) / n
    for i in range(0, start.shape[0], batch):
        a, b = start[i:i + batch], end[i:i + batch]
        points = a[:, None, :] + fraction[None, :, None] * (b - a)[:, None, :]
        normalised = 2.0 * (points - origin) / extent - 1.0
        values = torch.nn.functional.grid_sample(volume, normalised[None, :, :, None, :], mode="bilinear",
                                                 padding_mode="zeros", align_corners=True)[0, :, :, :, 0]
        out[i:i + batch] = (values.sum(dim=2) * (length[i:i + batch] / n)).T
    return out


def scanner_axis(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre [mm] and unit axis of a ring scanner from its element positions: the principal axis
    whose variance differs most from the other two (the two transaxial variances are equal)."""
    centre = positions.mean(axis=0)
    values, vectors = np.linalg.eigh(np.cov((positions - centre).T))
    gaps = [abs(values[(i + 1) % 3] - values[(i + 2) % 3]) for i in range(3)]
    return centre, vectors[:, int(np.argmin(gaps))]


def coarse_detectors(positions: np.ndarray, cell_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Detectors merged by physical proximity (not by index): the elements in each cube of side
    ``cell_mm`` become one coarse detector at their mean position. Returns the coarse positions
    (k, 3) [mm] and each element's coarse detector (n,)."""
    cells = np.floor(positions / cell_mm).astype(np.int64)
    _, index = np.unique(cells, axis=0, return_inverse=True)
    index = index.reshape(-1)
    counts = np.bincount(index)
    coarse = np.stack([np.bincount(index, weights=positions[:, k]) / counts for k in range(3)], 1)
    return coarse, index


def nearest(detectors: torch.Tensor, points: torch.Tensor, batch: int = 65536) -> torch.Tensor:
    """Index of the nearest of ``detectors`` (k, 3) to each of ``points`` (n, 3)."""
    return torch.cat([torch.cdist(points[i:i + batch], detectors).argmin(dim=1) for i in range(0, points.shape[0], batch)])


@dataclass(frozen=True)
class SingleScatter:
    """Watson's single-scatter simulation between coarse detectors, as tables over ordered pairs.

    For the LOR of detectors A, B (expected scattered coincidences, up to a global scale):

        S_AB = eff_AB sum_s V mu_s cos_A cos_B / (4 pi R_A^2 R_B^2) f_KN(theta)
               [w(511) w(E') exp(-tau_A - r(E') tau_B) Lambda_A + w(E') w(511) exp(-r(E') tau_A - tau_B) Lambda_B]

    s: scatter points (volume V, mu_s); R, cos: distance from s to the detector and cosine of the
    incidence on its face (normal: radial to the scanner axis); theta: scattering angle, E' =
    511 / (2 - cos theta) keV; f_KN: Klein-Nishina angular density; w: energy-window acceptance
    (resolution ~ sqrt(E)); tau: integral of mu at 511 keV from s to the detector, scaled by the
    Klein-Nishina total cross-section ratio r(E') for the scattered photon (Compton-dominated
    media); Lambda: integral of the annihilation density from s to the detector (activity along the
    unscattered photon's path); eff_AB: pair efficiency without the geometric factor (given per
    LOR). The energy dependence of crystal stopping is not modelled (the tail fit absorbs its mean).

    ``total[A, B]`` is the sum without eff_AB; LORs take the value of their nearest coarse
    detectors (:func:`coarse_detectors`). TOF: a term through s has TOF coordinate
    l = (R_A - R_B) / 2 (from the LOR midpoint towards B: the annihilation placed at s for its
    timing); ``mean_l`` and ``var_l`` [mm, mm^2] are the term-weighted mean and variance of l over
    the scatter points, and a LOR's TOF profile is a Gaussian of that mean and variance convolved
    with the timing resolution. The spread along each photon's path is neglected.
    """

    detectors: torch.Tensor  # (k, 3) coarse detector positions [mm]
    total: torch.Tensor  # (k, k)
    mean_l: torch.Tensor  # (k, k)
    var_l: torch.Tensor  # (k, k)

    def lors(self, a: torch.Tensor, b: torch.Tensor, efficiency: torch.Tensor,
             tof: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> torch.Tensor:
        """S of LORs between coarse detectors ``a``, ``b`` times ``efficiency``; with ``tof`` =
        (bin edges [mm], bins of the LORs, timing sigma [mm]) the share in each LOR's TOF bin."""
        value = self.total[a, b] * efficiency
        if tof is None:
            return value
        edges, bins, sigma = tof
        mean = self.mean_l[a, b]
        scale = 1.0 / (torch.sqrt(sigma**2 + self.var_l[a, b]) * math.sqrt(2.0))
        return value * 0.5 * (torch.erf((edges[bins + 1] - mean) * scale) - torch.erf((edges[bins] - mean) * scale))


def single_scatter(mu: torch.Tensor, annihilations: torch.Tensor, grid: ImageGrid, detectors: torch.Tensor,
                   element_positions: np.ndarray, window_keV: tuple[float, float], resolution_at_511: float,
                   pitch_mm: float = 30.0, seed: int = 0, batch: int = 16) -> SingleScatter:
    """:class:`SingleScatter` tables between ``detectors`` (k, 3) [mm] from ``mu`` [1/mm, 511 keV]
    and ``annihilations`` [per mm^3] on ``grid`` (a grid reaching beyond the axial field of view
    lets activity and matter outside it scatter into it); ``element_positions`` give the scanner
    axis (detector face normals)."""
    points = scatter_points(mu, grid, pitch_mm, seed=seed)
    s = points.position_mm
    m, k = s.shape[0], detectors.shape[0]
    start = s[:, None, :].expand(m, k, 3).reshape(-1, 3)
    end = detectors[None, :, :].expand(m, k, 3).reshape(-1, 3)
    tables = segment_integrals(torch.stack([mu, annihilations]), grid, start, end).reshape(m, k, 2).permute(1, 0, 2)
    tau, lam = tables[..., 0], tables[..., 1]  # (k, m): detector, point
    centre, axis = (torch.tensor(v, dtype=torch.float32, device=mu.device) for v in scanner_axis(element_positions))
    to_detector = detectors[:, None, :] - s[None, :, :]  # (k, m, 3) point -> detector
    r = torch.linalg.norm(to_detector, dim=2)
    unit = to_detector / r[..., None]
    radial = detectors - centre
    radial = radial - (radial @ axis)[:, None] * axis
    normal = radial / torch.linalg.norm(radial, dim=1, keepdim=True).clamp(min=1e-6)
    incidence = (unit * normal[:, None, :]).sum(2).abs()  # (k, m)
    prefactor = points.volume_mm3 * points.mu_per_mm / (4 * math.pi)
    w511 = window_acceptance(torch.tensor(ELECTRON_REST_KEV), window_keV, resolution_at_511)
    sigma511 = klein_nishina_total(torch.tensor(ELECTRON_REST_KEV))
    geometry = incidence / r**2
    total, mean_l, var_l = (torch.zeros((k, k), dtype=torch.float32, device=mu.device) for _ in range(3))
    for i in range(0, k, batch):
        a = slice(i, i + batch)  # detectors A (rows), all detectors B (columns): (a, k, m)
        cos_theta = -(unit[a, None, :, :] * unit[None, :, :, :]).sum(3).clamp(-1.0, 1.0)
        energy = ELECTRON_REST_KEV / (2.0 - cos_theta)
        ratio = klein_nishina_total(energy) / sigma511
        paths = (torch.exp(-tau[a, None, :] - ratio * tau[None, :, :]) * lam[a, None, :]
                 + torch.exp(-ratio * tau[a, None, :] - tau[None, :, :]) * lam[None, :, :])
        term = (prefactor * geometry[a, None, :] * geometry[None, :, :] * klein_nishina_angular(cos_theta) * w511
                * window_acceptance(energy, window_keV, resolution_at_511) * paths)
        ell = (r[a, None, :] - r[None, :, :]) / 2
        weight = term.sum(2)
        safe = weight.clamp(min=1e-30)
        total[a] = weight
        mean_l[a] = (term * ell).sum(2) / safe
        var_l[a] = ((term * ell**2).sum(2) / safe - mean_l[a] ** 2).clamp(min=0.0)
    return SingleScatter(detectors, total, mean_l, var_l)

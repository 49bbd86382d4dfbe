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
the sum over LOR space coming from the grouped LORs of :mod:`recon.pet.sensitivity` (for SSS a
random sample of them, weighted to the total).
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
    with copies of its outermost well-measured slice (slice total at least half the median; the
    sparsely seen end slices are replaced too): activity beyond the axial field of view scatters
    into it."""
    array = activity.detach().cpu().numpy().astype(np.float32)
    totals = array.sum(axis=(0, 1))
    good = np.flatnonzero(totals >= 0.5 * np.median(totals[totals > 0])) if (totals > 0).any() else np.arange(array.shape[2])
    first, last = int(good[0]), int(good[-1])
    pad = int(round(extension_mm / grid.spacing_mm[2]))
    core = array[:, :, first:last + 1]
    return np.concatenate([np.repeat(core[:, :, :1], pad + first, axis=2), core,
                           np.repeat(core[:, :, -1:], pad + array.shape[2] - 1 - last, axis=2)], axis=2)


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


def fit_tails(shape_per_group: torch.Tensor, group_tail: torch.Tensor, tail_prompts: int, tail_randoms: float,
              n_prompts: int) -> TailFit:
    """Scale of a scatter shape so that it explains the tail prompts left after randoms.

    ``shape_per_group``: the shape summed over each grouped LOR's member pairs (all TOF bins);
    ``group_tail``: which grouped LORs are near-tail LORs; ``tail_prompts`` and ``tail_randoms``:
    prompts and expected randoms on the near-tail LORs."""
    tail_shape = float(shape_per_group[group_tail].sum())
    excess = max(0.0, tail_prompts - tail_randoms)
    scale = excess / tail_shape if tail_shape > 0 else 0.0
    total = scale * float(shape_per_group.sum())
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


@dataclass(frozen=True)
class SingleScatterModel:
    """Watson's single-scatter simulation on a fixed set of scatter points and detector positions.

    For the LOR of detectors A, B (expected scattered coincidences, up to a global scale):

        S_AB = eff_AB sum_s V mu_s cos_A cos_B / (4 pi R_A^2 R_B^2) f_KN(theta)
               [w(511) w(E') exp(-tau_A - r(E') tau_B) Lambda_A + w(E') w(511) exp(-r(E') tau_A - tau_B) Lambda_B]

    s: scatter points (volume V, mu_s); R, cos: distance from s to the detector and cosine of the
    incidence on its face (normal: radial to the scanner axis); theta: scattering angle, E' =
    511 / (2 - cos theta) keV; f_KN: Klein-Nishina angular density; w: energy-window acceptance
    (resolution ~ sqrt(E)); tau: integral of mu at 511 keV from s to the detector, scaled by the
    Klein-Nishina total cross-section ratio r(E') for the scattered photon (Compton-dominated
    media); Lambda: integral of the annihilation density from s to the detector (activity along the
    unscattered photon's path); eff_AB: pair efficiency without the geometric factor.
    The energy dependence of crystal stopping is not modelled (the tail fit absorbs its mean).

    TOF: the annihilation of a term through s is placed at s for its timing, TOF coordinate
    l = (R_A - R_B) / 2 (from the LOR midpoint towards B), spread by the timing resolution; the
    spread along the photon's path is neglected.
    """

    points: ScatterPoints
    detectors: torch.Tensor  # (k, 3) detector positions [mm]
    tau: torch.Tensor  # (m, k) integral of mu [1] at 511 keV from each point to each detector
    axis_centre: torch.Tensor
    axis: torch.Tensor
    window_keV: tuple[float, float]
    resolution_at_511: float

    def emission(self, activity: torch.Tensor, grid: ImageGrid) -> torch.Tensor:
        """Lambda (m, k): integral of ``activity`` [annihilations/mm^3] from each point to each detector."""
        m, k = self.tau.shape
        start = self.points.position_mm[:, None, :].expand(m, k, 3).reshape(-1, 3)
        end = self.detectors[None, :, :].expand(m, k, 3).reshape(-1, 3)
        return segment_integrals(activity[None], grid, start, end)[:, 0].reshape(m, k)

    def lors(self, a: torch.Tensor, b: torch.Tensor, emission: torch.Tensor, efficiency: torch.Tensor,
             tof: tuple[torch.Tensor, torch.Tensor, float] | None = None, batch: int = 4096) -> torch.Tensor:
        """S_AB of LORs between detectors ``a``, ``b`` (indices into ``detectors``), times
        ``efficiency``; with ``tof`` = (bin edges [mm], bins of the LORs, sigma [mm]) the share in
        each LOR's TOF bin."""
        s = self.points.position_mm
        prefactor = self.points.volume_mm3 * self.points.mu_per_mm / (4 * math.pi)
        w511 = window_acceptance(torch.tensor(ELECTRON_REST_KEV), self.window_keV, self.resolution_at_511)
        sigma511 = klein_nishina_total(torch.tensor(ELECTRON_REST_KEV))
        out = torch.empty(a.shape[0], dtype=torch.float32, device=s.device)
        for i in range(0, a.shape[0], batch):
            ia, ib = a[i:i + batch], b[i:i + batch]
            pa, pb = self.detectors[ia], self.detectors[ib]  # (n, 3)
            va = s[None, :, :] - pa[:, None, :]  # (n, m, 3) detector A -> point
            vb = pb[:, None, :] - s[None, :, :]  # point -> detector B
            ra, rb = torch.linalg.norm(va, dim=2), torch.linalg.norm(vb, dim=2)
            cos_theta = ((va * vb).sum(2) / (ra * rb)).clamp(-1.0, 1.0)
            cos_a = self._incidence(pa, va, ra)
            cos_b = self._incidence(pb, -vb, rb)
            energy = ELECTRON_REST_KEV / (2.0 - cos_theta)
            ratio = klein_nishina_total(energy) / sigma511
            w_scattered = window_acceptance(energy, self.window_keV, self.resolution_at_511)
            tau_a, tau_b = self.tau.T[ia], self.tau.T[ib]  # (n, m)
            lam_a, lam_b = emission.T[ia], emission.T[ib]
            paths = torch.exp(-tau_a - ratio * tau_b) * lam_a + torch.exp(-ratio * tau_a - tau_b) * lam_b
            term = prefactor * cos_a * cos_b / (ra * rb) ** 2 * klein_nishina_angular(cos_theta) * w511 * w_scattered * paths
            if tof is not None:
                edges, bins, sigma = tof
                ell = (ra - rb) / 2
                scale = 1.0 / (sigma * math.sqrt(2.0))
                bin_i = bins[i:i + batch]
                term = term * 0.5 * (torch.erf((edges[bin_i + 1][:, None] - ell) * scale) - torch.erf((edges[bin_i][:, None] - ell) * scale))
            out[i:i + batch] = term.sum(dim=1) * efficiency[i:i + batch]
        return out

    def _incidence(self, detector: torch.Tensor, towards_point: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
        """|cos| of the angle between the detector's radial normal and the direction to the point."""
        radial = detector - self.axis_centre
        radial = radial - (radial @ self.axis)[:, None] * self.axis
        normal = radial / torch.linalg.norm(radial, dim=1, keepdim=True).clamp(min=1e-6)
        return ((towards_point * normal[:, None, :]).sum(2) / distance).abs()


def single_scatter_model(mu: torch.Tensor, grid: ImageGrid, detectors: torch.Tensor, element_positions: np.ndarray,
                         window_keV: tuple[float, float], resolution_at_511: float, pitch_mm: float = 30.0,
                         seed: int = 0) -> SingleScatterModel:
    """Scatter points and attenuation tables of :class:`SingleScatterModel` for ``detectors``
    (k, 3) [mm] on ``mu`` [1/mm, 511 keV] (a grid reaching beyond the axial field of view lets
    activity and matter outside it scatter into it)."""
    points = scatter_points(mu, grid, pitch_mm, seed=seed)
    m, k = points.position_mm.shape[0], detectors.shape[0]
    start = points.position_mm[:, None, :].expand(m, k, 3).reshape(-1, 3)
    end = detectors[None, :, :].expand(m, k, 3).reshape(-1, 3)
    tau = segment_integrals(mu[None], grid, start, end)[:, 0].reshape(m, k)
    centre, axis = scanner_axis(element_positions)
    as_tensor = lambda a: torch.tensor(a, dtype=torch.float32, device=mu.device)  # noqa: E731
    return SingleScatterModel(points, detectors, tau, as_tensor(centre), as_tensor(axis), window_keV, resolution_at_511)

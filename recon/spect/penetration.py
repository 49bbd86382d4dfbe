"""Septal penetration: the broad tail of a parallel-hole collimator's response at high energy.

The depth-dependent Gaussian of :mod:`recon.spect.psf` is the response of photons that pass
through a hole (its ``L_eff = L − 2/μ`` widens it for the penetration at the holes' edges).
Photons of medium and high energy also cross the septa: at 440 keV about three quarters of the
photons a 58 mm MEGP collimator lets through have crossed lead, arriving up to tens of degrees
off the hole axis. This module computes that part of the response from the hole geometry in
``collimators.json`` and μ of the septa's material at the photon energy, and composes it with
the geometric response's system matrix as a new component (:class:`PenetrationTail`); the
reconstruction algorithms are unchanged.

Model (theraflow's own, derived here; not a published table). A photon crossing the collimator
along direction tangent ``τ = tan θ`` at azimuth ``φ`` travels ``L·√(1+τ²)`` (mm) and moves
``s = L·τ`` across the hole lattice. The hexagonal (or round) hole lattice is replaced by the
square lattice with the same hole width ``D`` across flats, septal thickness ``t`` and therefore
the same open fraction ``(D/(D+t))²``: two crossed families of parallel septa of period
``p = D + t``. Along one family's normal the photon moves ``s_i = s·|cos φ|`` (``|sin φ|``) and,
entering at a uniformly distributed position ``x₀``, has ``ℓ_i(x₀)`` of that distance inside
septa: ``ℓ = W(x₀ + s_i) − W(x₀)`` with ``W(x) = t·⌊x/p⌋ + clip(x mod p − D, 0, t)`` (the
septal length up to ``x``). Its path in lead is ``(ℓ_x/s_x + ℓ_y/s_y)·L·√(1+τ²)`` (a ray in a
septal junction counts twice: a slight underestimate of the transmission) and, the two
entry coordinates being independent, the transmission averaged over the entry point factorises:

    T(τ, φ) = ⟨exp(−μ·ℓ_x·L√(1+τ²)/s_x)⟩_x₀ · ⟨exp(−μ·ℓ_y·L√(1+τ²)/s_y)⟩_y₀

whose part without lead (entries with ``ℓ_x = ℓ_y = 0``), ``T_g = (1 − s_x/D)₊(1 − s_y/D)₊·(D/p)²``
up to the sampling of the entry point, is the square hole's geometric transfer (as in Metz,
Atkins & Beck 1980, Phys. Med. Biol. 25:1059, for parallel holes).
The per-septum path ``t/(sin θ·|cos φ|)`` is the quantity of Anger's septal-thickness rule (H. O.
Anger 1964, J. Nucl. Med. 5:515; the usual "μ·w ≥ 3 for < 5 % penetration"). T is averaged over
φ (the response is taken as round: the lattice's six-fold star is not modelled). For a source
at distance ``d`` from the collimator face the photons reach the detector ``(d + L)·τ`` off the
source's foot (the plane at the collimator's back, as the Gaussian's ``(d + L_eff)·D/L_eff``
width assumes), with density ``T(τ)·cos³θ`` per unit ``τ²``; the penetrated part
``(T − T_g)·cos³θ``, integrated up to ``τ = 1`` (45°; steeper photons are not modelled), is fitted
by a sum of round Gaussians in τ, each of which is at distance d a Gaussian of σ = s_k·(d + L).
The response is then

    (1 − f)·Gaussian(d) + f·Σ_k w_k·Gaussian_k(d),    f = ∫(T − T_g)cos³θ / ∫T cos³θ,

normalised to one as the Gaussian alone is (the calibration's sensitivity, measured on a point
source, holds the collimator's efficiency, penetration included). In the system matrix the tail
is applied to each view's projection (:class:`PenetrationTail`) with its width at the axis of
rotation for every depth: its depth dependence is not modelled. Detectors narrower than the
field of view (the StarGuide's strips) are projected onto a wider lateral grid first
(:func:`recon.spect.system.tail_lateral_grid`), so that the tail of the activity beside them
reaches them.

Where it applies: when more than ``TAIL_THRESHOLD`` (1 %) of the photons crossing the collimator
arrive beyond twice the holes' acceptance (``τ > 2D/L``), out of the Gaussian's reach. For GE's
MEGP: 0.00 % at Lu-177's 208 keV and Ac-225's 218 keV, 0.1 % at Pb-212's 239 keV (so the
Gaussian alone, as before), 25 % at I-131's 364 keV and 59 % at Bi-213's 440 keV. Where a cheap
upper bound on that share (:func:`tail_fraction_bound`: 0.05 % for MEGP at 208 keV) is already
under the threshold, the tail is ruled out without computing it; the decision is the same.
Septal scatter (Compton scattering in the septa) and lead X-rays are not modelled.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from scipy.optimize import nnls

from recon.ptomo import SystemMatrix, pytomography
from recon.spect.psf import collimator_geometry

TAIL_THRESHOLD = 0.01   # share of the photons beyond twice the holes' acceptance that calls for the kernel
TAU_MAX = 1.0           # direction tangents modelled (45°)
_TAU = np.linspace(0.0, TAU_MAX, 501)
_ENTRY = 256            # entry positions per lattice period
_AZIMUTHS = 16          # azimuths in [0, 45°]
_AZIMUTH_RAD = (np.arange(_AZIMUTHS) + 0.5) / _AZIMUTHS * (math.pi / 4)
_SPREADS = np.geomspace(0.01, 0.5, 12)   # candidate Gaussian widths (tan θ) of the fit
_DENSITY = (1.0 + _TAU**2) ** -1.5         # cos³θ: per unit τ², of photons emitted per steradian
_AREA = 2.0 * math.pi * _TAU                # ring of radius τ
_MAX_COMPONENTS = 3


def _septal_length(x: np.ndarray, hole_mm: float, septa_mm: float) -> np.ndarray:
    """W(x): length [mm] inside septa from the start of a hole (0) to ``x`` [mm], across one family of septa."""
    pitch = hole_mm + septa_mm
    return septa_mm * np.floor(x / pitch) + np.clip(np.mod(x, pitch) - hole_mm, 0.0, septa_mm)


def _transmitted(mu_per_mm: float, lead_mm: np.ndarray, path_mm: np.ndarray, shift_mm: np.ndarray) -> np.ndarray:
    """exp(−μ·ℓ·path/shift): the share of photons crossing ``lead_mm`` of one family's septa over a
    lateral ``shift_mm`` along a ``path_mm`` through the collimator (1 where no lead is crossed)."""
    with np.errstate(invalid="ignore"):
        return np.exp(-np.where(lead_mm > 0, mu_per_mm * lead_mm * (path_mm / shift_mm), 0.0))


def angular_transmission(hole_mm: float, septa_mm: float, length_mm: float, mu_per_mm: float,
                         tau: np.ndarray = _TAU) -> tuple[np.ndarray, np.ndarray]:
    """(T, T_g) at direction tangents ``tau``: the fraction of photons along that direction that
    cross the collimator (averaged over entry point and azimuth), and the part of it that crossed
    no lead. ``mu_per_mm``: the septa's linear attenuation [1/mm] (``inf``: opaque septa)."""
    entry = (np.arange(_ENTRY) + 0.5) / _ENTRY * (hole_mm + septa_mm)

    def family(shift_mm: np.ndarray, path_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shift = np.maximum(shift_mm, 1e-9)[:, None]
        lead = _septal_length(entry + shift, hole_mm, septa_mm) - _septal_length(entry, hole_mm, septa_mm)  # [tau, entry], mm
        return _transmitted(mu_per_mm, lead, path_mm[:, None], shift).mean(axis=1), (lead == 0).mean(axis=1)

    path = length_mm * np.sqrt(1.0 + tau**2)
    total, geometric = np.zeros_like(tau), np.zeros_like(tau)
    for phi in _AZIMUTH_RAD:
        tx, gx = family(length_mm * tau * math.cos(phi), path)
        ty, gy = family(length_mm * tau * math.sin(phi), path)
        total += tx * ty
        geometric += gx * gy
    return total / _AZIMUTHS, geometric / _AZIMUTHS


def _beyond(hole_mm: float, length_mm: float) -> np.ndarray:
    """Which of ``_TAU`` lie beyond twice the holes' acceptance (τ > 2D/L)."""
    return _TAU > 2.0 * hole_mm / length_mm


def tail_fraction_bound(hole_mm: float, septa_mm: float, length_mm: float, mu_per_mm: float) -> float:
    """An upper bound on :func:`penetration_from_geometry`'s ``tail_fraction`` (lengths in mm, μ of
    the septa in 1/mm) at a tenth of its cost, to rule the tail out without computing it.

    Beyond twice the acceptance (τ > 2D/L) each family's transmission is bounded by that of a photon
    entering at a hole's edge, which meets the least lead over its shift s: W(x₀ + s) − W(x₀) ≥ W(s)
    for every entry point x₀ (W is 1-Lipschitz and grows by t per period), so no average over entry
    points is needed there. Within it the transmission is computed as the model does, and the
    photons of the interval straddling 2D/L are left out of the total, which only lowers it:
    ``tail ≤ B/(I + B)`` with I the photons within and B the bound on those beyond."""
    beyond = _beyond(hole_mm, length_mm)
    weight = _DENSITY * _AREA
    within, _ = angular_transmission(hole_mm, septa_mm, length_mm, mu_per_mm, _TAU[~beyond])
    inside = np.trapezoid(within * weight[~beyond], _TAU[~beyond])
    tau = _TAU[beyond][:, None]
    path = length_mm * np.sqrt(1.0 + tau**2)

    def least_lead(shift_mm: np.ndarray) -> np.ndarray:   # [tau, azimuth]
        shift = np.maximum(shift_mm, 1e-9)
        return _transmitted(mu_per_mm, _septal_length(shift, hole_mm, septa_mm), path, shift)

    upper = (least_lead(length_mm * tau * np.cos(_AZIMUTH_RAD)) * least_lead(length_mm * tau * np.sin(_AZIMUTH_RAD))).mean(axis=1)
    outside = np.trapezoid(upper * weight[beyond], _TAU[beyond])
    return float(outside / (inside + outside))


@dataclass(frozen=True)
class PenetrationResponse:
    """The septal-penetration tail of a collimator at one photon energy (see the module docstring).

    ``fraction``: share of the photons crossing the collimator that crossed lead; ``tail_fraction``:
    share arriving beyond twice the holes' acceptance; ``spreads``: per Gaussian component, σ per
    mm of distance to the detection plane (tan θ); ``weights``: their shares of the tail (sum 1);
    ``length_mm``: hole length [mm] (collimator face to the detection plane)."""

    name: str
    energy_keV: float
    fraction: float
    tail_fraction: float
    spreads: tuple[float, ...]
    weights: tuple[float, ...]
    length_mm: float


def penetration_response(vendor: str, collimator: str, energy_keV: float, path=None,
                         threshold: float = TAIL_THRESHOLD) -> PenetrationResponse | None:
    """The penetration tail of ``collimator`` on a ``vendor`` camera at ``energy_keV``, or None
    where less than ``threshold`` of the photons arrive beyond twice the holes' acceptance (the
    Gaussian response alone then models the collimator). Raises InputError (naming ``path``) for
    an unknown collimator, as :func:`~recon.spect.psf.collimator_response`."""
    geometry = collimator_geometry(vendor, collimator, energy_keV, path)
    lattice = (geometry.hole_mm, geometry.septa_mm, geometry.length_mm, geometry.mu_septa_per_mm)
    if tail_fraction_bound(*lattice) <= threshold:   # ruled out without computing the tail
        return None
    response = penetration_from_geometry(geometry.name, energy_keV, *lattice)
    return response if response.tail_fraction > threshold else None


@cache
def penetration_from_geometry(name: str, energy_keV: float, hole_mm: float, septa_mm: float, length_mm: float,
                              mu_per_mm: float) -> PenetrationResponse:
    """:class:`PenetrationResponse` of a parallel-hole collimator (lengths in mm, μ of the septa in
    1/mm)."""
    total, geometric = angular_transmission(hole_mm, septa_mm, length_mm, mu_per_mm)
    all_photons = np.trapezoid(total * _DENSITY * _AREA, _TAU)
    tail = (total - geometric) * _DENSITY
    fraction = float(np.trapezoid(tail * _AREA, _TAU) / all_photons)
    beyond = _beyond(hole_mm, length_mm)
    tail_fraction = float(np.trapezoid((total * _DENSITY * _AREA)[beyond], _TAU[beyond]) / all_photons)
    spreads, weights = _fit_gaussians(tail)
    return PenetrationResponse(name, energy_keV, fraction, tail_fraction, spreads, weights, length_mm)


def _fit_gaussians(tail: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``_MAX_COMPONENTS`` round Gaussians in τ (widths from ``_SPREADS``, non-negative weights
    summing to 1) whose sum best fits the radial density ``tail`` (per unit τ²) in the
    least-squares sense weighted by the ring area (so each photon counts once)."""
    if not np.any(tail > 0):
        return (float(_SPREADS[0]),), (1.0,)
    weight = np.sqrt(2.0 * math.pi * _TAU)
    target = tail / np.trapezoid(tail * 2.0 * math.pi * _TAU, _TAU)

    def basis(spreads):
        return np.stack([np.exp(-(_TAU**2) / (2 * s**2)) / (2 * math.pi * s**2) for s in spreads], axis=1)

    def fit(spreads) -> tuple[np.ndarray, float]:
        return nnls(basis(spreads) * weight[:, None], target * weight)

    chosen = min(itertools.combinations(_SPREADS, _MAX_COMPONENTS), key=lambda spreads: fit(spreads)[1])
    coef, _ = fit(chosen)
    coef = coef / coef.sum()
    return tuple(float(s) for s in chosen), tuple(float(c) for c in coef)


def tail_reach_px(penetration: PenetrationResponse, radii_mm: np.ndarray, pixel_mm: float) -> int:
    """Half-width [pixels] of the widest view's tail kernel (3 σ of its widest Gaussian at the axis
    of rotation, ``radii_mm`` per view from the collimator face)."""
    widest = max(penetration.spreads) * (float(np.max(radii_mm)) + penetration.length_mm) / pixel_mm
    return math.ceil(3.0 * widest)


class PenetrationTail(SystemMatrix):
    """The septal-penetration tail composed with a system matrix ``H_g`` (the geometric response):
    ``H = S·M·H_g`` with ``M = (1 − f)·I + f·C_i``, ``C_i`` the 2-D (r, z) convolution of view i's
    projection with the tail ``Σ_k w_k·Gaussian(s_k·(R_i + L))``, R_i the view's distance from the
    collimator face to the axis of rotation: the tail's width is taken at the axis for every depth
    (its depth dependence is not modelled; exact for the plane through the axis, ±40 % in width at
    ±100 mm from it at a 200 mm radius).

    ``H_g`` may project onto a lateral grid wider than the detector (``proj_meta``: the detector's
    projections; ``first_columns``: per view, the column of ``H_g``'s projection where the detector's
    first column lies, on the same pixel lattice): ``S`` then cuts each view's detector strip out of
    the blurred wide projection, so the tail of activity beside a narrow detector (the StarGuide's
    16-pixel columns) reaches it as in the camera. Without them the detector is ``H_g``'s whole
    projection (``S = I``). Tails falling beyond ``H_g``'s grid are lost (zero padding); the
    Gaussians are symmetric, so ``M`` is self-adjoint and ``Hᵀ = H_gᵀ·M·Sᵀ`` (``Sᵀ``: the strip
    zero-padded to the wide grid)."""

    def __init__(self, system: SystemMatrix, penetration: PenetrationResponse, radii_mm: np.ndarray, pixel_mm: float,
                 proj_meta=None, first_columns: np.ndarray | None = None) -> None:
        super().__init__(system.object_meta, system.proj_meta if proj_meta is None else proj_meta, [], [])
        self.system, self.fraction = system, penetration.fraction
        n_views, n_wide = system.proj_meta.shape[:2]
        self.n_strip = int(self.proj_meta.shape[1])
        first = np.zeros(n_views, dtype=np.int64) if first_columns is None else np.asarray(first_columns, dtype=np.int64)
        if first.shape != (n_views,) or first.min() < 0 or first.max() + self.n_strip > n_wide:
            raise ValueError(f"detector strips of {self.n_strip} columns at {first} do not fit {n_wide} projected columns")
        self.columns = torch.as_tensor(first[:, None] + np.arange(self.n_strip), device=pytomography.device)  # [view, strip column]
        radii = np.asarray(radii_mm, dtype=np.float64)
        sigmas = np.array([[s * (r + penetration.length_mm) / pixel_mm for s in penetration.spreads] for r in radii])  # pixels
        self.half = tail_reach_px(penetration, radii, pixel_mm)
        taps = np.arange(-self.half, self.half + 1, dtype=np.float64)
        kernels = np.zeros((radii.size, taps.size, taps.size))
        for view, row in enumerate(sigmas):
            for weight, sigma in zip(penetration.weights, row):
                g = np.exp(-(taps**2) / (2 * sigma**2))
                kernels[view] += weight * np.outer(g, g) / g.sum() ** 2
        self.kernels = torch.as_tensor(kernels, dtype=pytomography.dtype, device=pytomography.device)

    def _views(self, subset_idx: int | None) -> torch.Tensor:
        return (torch.arange(self.kernels.shape[0], device=self.kernels.device) if subset_idx is None
                else self.system.subset_indices_array[subset_idx])

    def _tail(self, proj: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """``M`` applied to projections ``[views, r, z]`` on ``H_g``'s lateral grid."""
        kernels = self.kernels[views]
        n_r, n_z = proj.shape[-2:]
        size = (n_r + 2 * self.half, n_z + 2 * self.half)   # linear ("full") convolution, then the centre
        spectrum = torch.fft.rfft2(proj, s=size) * torch.fft.rfft2(kernels, s=size)
        tail = torch.fft.irfft2(spectrum, s=size)[..., self.half : self.half + n_r, self.half : self.half + n_z]
        return proj * (1.0 - self.fraction) + tail * self.fraction

    def _strip_index(self, views: torch.Tensor, n_z: int) -> torch.Tensor:
        """Index of the detector's columns in ``H_g``'s projections, ``[views, strip column, z]``."""
        return self.columns[views].unsqueeze(-1).expand(-1, -1, n_z)

    def forward(self, object: torch.Tensor, subset_idx: int | None = None) -> torch.Tensor:
        views = self._views(subset_idx)
        wide = self._tail(self.system.forward(object, subset_idx=subset_idx), views)
        return torch.gather(wide, 1, self._strip_index(views, wide.shape[-1]))

    def backward(self, proj: torch.Tensor, subset_idx: int | None = None) -> torch.Tensor:
        views = self._views(subset_idx)
        wide = proj.new_zeros((proj.shape[0], int(self.system.proj_meta.shape[1]), proj.shape[-1]))
        wide.scatter_(1, self._strip_index(views, proj.shape[-1]), proj)
        return self.system.backward(self._tail(wide, views), subset_idx=subset_idx)

    def compute_normalization_factor(self, subset_idx: int | None = None) -> torch.Tensor:
        views = self.proj_meta.num_projections if subset_idx is None else len(self.system.subset_indices_array[subset_idx])
        ones = torch.ones((views, *self.proj_meta.shape[1:]), dtype=pytomography.dtype, device=pytomography.device)
        return self.backward(ones, subset_idx)

    def set_n_subsets(self, n_subsets: int) -> None:
        self.system.set_n_subsets(n_subsets)
        self.subset_indices_array = self.system.subset_indices_array

    def get_projection_subset(self, projections: torch.Tensor, subset_idx: int) -> torch.Tensor:
        return self.system.get_projection_subset(projections, subset_idx)

    def get_weighting_subset(self, subset_idx: int | None) -> float:
        return self.system.get_weighting_subset(subset_idx)

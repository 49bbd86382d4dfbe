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
``s = L·τ`` across the hole lattice; if ``ℓ`` of that 2-D displacement lies inside septa, its path
in lead is ``(ℓ/s)·L·√(1+τ²)`` and it crosses with probability ``exp(−μ·(ℓ/s)·L·√(1+τ²))``. The
transmission ``T(τ, φ)`` is that probability averaged over where the photon enters the lattice,
and its part without lead (rays that stay in the hole they enter), ``T_g``, is the geometric
transfer of parallel holes (Metz, Atkins & Beck 1980, Phys. Med. Biol. 25:1059). The lattice is
the collimator's ``hole_shape`` in ``collimators.json``:

* ``hex`` (the default; round holes, packed hexagonally, are entered as hex): hexagonal holes
  ``D`` across flats on a triangular lattice of pitch ``p = D + t``, walls ``t`` thick, open
  fraction ``(D/p)²``. ``ℓ`` is computed exactly for each ray (:func:`hex_lead_fraction`: each
  hole is the intersection of three slabs, so its chord along a ray is clipped in closed form,
  and the open length over all the holes a ray meets is summed for every ``s`` at once) for
  ``_HEX_ENTRY`` entry points spread over a lattice cell (a low-discrepancy sequence), and
  ``T`` averaged over ``_HEX_AZIMUTHS`` azimuths in [0, 30°] (the honeycomb's twelve-fold
  symmetry of directions). The walls are short segments at 60°: a ray meets walls whatever its
  direction, and the least lead over ``s`` is that of one family of holes ``D/c`` and septa
  ``t/c``, ``c = max_k |n_k·e|`` (see :func:`_hex_least_transmission`).
* ``square`` (holes registered to square pixels): two crossed families of parallel septa of
  period ``p = D + t``, same open fraction ``(D/p)²``. Along one family's normal the photon moves
  ``s_i = s·|cos φ|`` (``|sin φ|``) and, entering at ``x₀``, has ``ℓ_i(x₀) = W(x₀ + s_i) − W(x₀)``
  of it in septa, ``W(x) = t·⌊x/p⌋ + clip(x mod p − D, 0, t)`` (the septal length up to ``x``);
  the path in lead is ``(ℓ_x/s_x + ℓ_y/s_y)·L·√(1+τ²)`` (a ray in a septal junction counts
  twice) and the entry average factorises over the two families. ``T`` is averaged over
  ``_AZIMUTHS`` azimuths in [0, 45°]. Its septa are infinite straight walls, so photons stream
  along them: at 440 keV through GE's MEGP geometry it holds 0.59 of the photons beyond twice
  the acceptance against the honeycomb's 0.69.

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
(hexagonal) MEGP: 0.00 % at Lu-177's 208 keV and Ac-225's 218 keV, 0.07 % at Pb-212's 239 keV
and 0.8 % at Ra-223's 270 keV (so the Gaussian alone, as before), 32 % at I-131's 364 keV and
69 % at Bi-213's 440 keV. Where a cheap upper bound on that share (:func:`tail_fraction_bound`:
0.12 % for MEGP at 208 keV, 0.34 % at 218 keV) is already under the threshold, the tail is ruled
out without computing it; the decision is the same.
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
_HEX_ENTRY = 2048       # entry points in the honeycomb's lattice cell
_HEX_AZIMUTHS = 12      # azimuths in [0, 30°]
HOLE_SHAPES = ("hex", "square")
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


def _square_transmission(hole_mm: float, septa_mm: float, length_mm: float, mu_per_mm: float,
                         tau: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(T, T_g) of the square lattice (two crossed families of septa), averaged over ``_AZIMUTHS``
    azimuths in [0, 45°] (the lattice's eight-fold symmetry)."""
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


_HEX_NORMALS = np.array([[math.cos(a), math.sin(a)] for a in np.radians([0.0, 60.0, 120.0])])   # of the holes' flats


def hex_lead_fraction(hole_mm: float, septa_mm: float, phi_rad: float, shift_mm: np.ndarray,
                      entries: int = _HEX_ENTRY) -> tuple[np.ndarray, np.ndarray]:
    """The honeycomb's lead along straight 2-D rays: hexagonal holes ``hole_mm`` across flats (flats
    normal to azimuths 0°, 60°, 120°), walls ``septa_mm`` thick, hole centres on the triangular
    lattice of pitch ``p = D + t``. Rays start at ``entries`` points spread evenly over one lattice
    cell (the R2 low-discrepancy sequence, deterministic) and run ``shift_mm`` (≥ 0) along azimuth
    ``phi_rad``.

    Returns (``q`` [shift, entry]: the share of each ray's length inside walls, at zero shift
    whether the ray starts in a wall; ``run`` [entry]: how far [mm] each ray stays in the hole it
    starts in, 0 for those starting in a wall). Exact for each ray (each hole is the intersection
    of three slabs |n_k·x| ≤ D/2, so its chord is clipped in closed form); the only approximation
    is the set of entry points."""
    hole, pitch = float(hole_mm), float(hole_mm + septa_mm)
    direction = np.array([math.cos(phi_rad), math.sin(phi_rad)])
    basis = pitch * np.array([[1.0, 0.0], [0.5, math.sqrt(3.0) / 2.0]])       # lattice vectors (rows)
    start = _cell_points(entries) @ basis                                   # [entry, 2], mm
    # every hole a ray of length max(shift) from the cell can meet: centres within reach of the ray's band
    reach = hole / math.sqrt(3.0) + pitch * math.sqrt(3.0) / 2.0 + 1e-6     # hole's circumradius + farthest entry
    longest = float(np.max(shift_mm, initial=0.0))
    n = math.ceil((longest + 2 * reach) / (pitch * math.sqrt(3.0) / 2.0)) + 1
    ij = np.stack(np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1), indexing="ij"), axis=-1).reshape(-1, 2)
    centre = ij @ basis
    along, across = centre @ direction, centre @ np.array([-direction[1], direction[0]])
    centre = centre[(np.abs(across) <= reach) & (along >= -reach) & (along <= longest + reach)]   # [hole, 2]
    # the chord of each hole along each ray: λ ∈ [enter, leave] (mm from the ray's start)
    offset = (start[:, None, :] - centre[None, :, :]) @ _HEX_NORMALS.T       # n_k·(x0 − c) [entry, hole, 3]
    slope = _HEX_NORMALS @ direction                                        # n_k·e [3]
    with np.errstate(divide="ignore", invalid="ignore"):
        one, other = (-hole / 2 - offset) / slope, (hole / 2 - offset) / slope
        parallel = np.abs(slope) < 1e-12                                    # a ray along a family's flats
        inside = np.abs(offset) <= hole / 2
        low = np.where(parallel, np.where(inside, -np.inf, np.inf), np.minimum(one, other))
        high = np.where(parallel, np.where(inside, np.inf, -np.inf), np.maximum(one, other))
    enter, leave = low.max(axis=2), high.min(axis=2)                        # [entry, hole]
    run = np.max(np.where((enter <= 0.0) & (leave > 0.0), leave, 0.0), axis=1)
    enter = np.maximum(enter, 0.0)
    hit = leave > enter
    enter, leave = np.where(hit, enter, 0.0), np.where(hit, leave, 0.0)      # holes the ray misses: empty chords
    # open length O(s) = Σ_holes relu(s − enter) − relu(s − leave), for every shift at once
    knots = np.concatenate([enter, leave], axis=1)                          # [entry, 2·hole]
    signs = np.concatenate([np.ones_like(enter), -np.ones_like(leave)], axis=1)
    shift = np.asarray(shift_mm, dtype=np.float64)
    opened = _sum_of_ramps(knots, signs, shift)                             # [shift, entry]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(1.0 - opened / shift[:, None], 0.0, 1.0)
    q = np.where(shift[:, None] > 0, q, (run == 0)[None, :].astype(np.float64))
    q = np.where((run[None, :] > 0) & (run[None, :] >= shift[:, None]), 0.0, q)   # still in its first hole: no lead
    return q, run


def _cell_points(n: int) -> np.ndarray:
    """``n`` points evenly spread over the unit square centred on 0, [n, 2]: the R2 sequence
    (M. Roberts 2018: additive recurrence on the plastic number g, steps 1/g and 1/g²), which
    has no rows to alias with the lattice's walls as a regular grid does."""
    g = 1.324717957244746                                                   # plastic number, g³ = g + 1
    i = np.arange(n)[:, None]
    return np.mod(0.5 + i * np.array([1.0 / g, 1.0 / g**2]), 1.0) - 0.5


def _sum_of_ramps(knots: np.ndarray, signs: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Σ_k signs[e, k]·max(0, at − knots[e, k]) for every row e of ``knots`` (values ≥ 0) and every
    ``at``: [len(at), rows]. One sort of all rows (each row shifted past the previous one's range)
    and prefix sums, instead of a [at, rows, knots] array."""
    rows, width = knots.shape
    span = max(float(knots.max(initial=0.0)), float(at.max(initial=0.0))) + 1.0
    base = np.arange(rows)[:, None] * span
    shifted = (knots + base).ravel()
    order = np.argsort(shifted, kind="stable")
    flat = shifted[order]
    count = np.concatenate([[0.0], np.cumsum(signs.ravel()[order])])
    moment = np.concatenate([[0.0], np.cumsum((signs * knots).ravel()[order])])
    first = np.arange(rows) * width                                         # each row's knots are contiguous once sorted
    last = np.searchsorted(flat, base + at[None, :], side="right")         # [rows, at], sorted queries
    return ((count[last] - count[first][:, None]) * at[None, :] - (moment[last] - moment[first][:, None])).T


def hex_azimuths(count: int = _HEX_AZIMUTHS) -> np.ndarray:
    """The honeycomb model's azimuths [rad]: ``count`` midpoints of [0, 30°]."""
    return (np.arange(count) + 0.5) / count * (math.pi / 6)


def _hex_transmission(hole_mm: float, septa_mm: float, length_mm: float, mu_per_mm: float, tau: np.ndarray,
                      entries: int = _HEX_ENTRY, azimuths: int = _HEX_AZIMUTHS) -> tuple[np.ndarray, np.ndarray]:
    """(T, T_g) of the honeycomb (:func:`hex_lead_fraction` with ``entries`` entry points),
    averaged over ``azimuths`` azimuths in [0, 30°] (the lattice's twelve-fold symmetry of
    directions)."""
    path = length_mm * np.sqrt(1.0 + tau**2)                                 # mm through the collimator
    shift = length_mm * tau
    total, geometric = np.zeros_like(tau), np.zeros_like(tau)
    for phi in hex_azimuths(azimuths):
        q, run = hex_lead_fraction(hole_mm, septa_mm, phi, shift, entries)
        total += np.exp(-np.where(q > 0, mu_per_mm * q * path[:, None], 0.0)).mean(axis=1)
        geometric += ((run[None, :] > 0) & (run[None, :] >= shift[:, None])).mean(axis=1)
    return total / azimuths, geometric / azimuths


def angular_transmission(hole_mm: float, septa_mm: float, length_mm: float, mu_per_mm: float,
                         tau: np.ndarray = _TAU, hole_shape: str = "hex") -> tuple[np.ndarray, np.ndarray]:
    """(T, T_g) at direction tangents ``tau``: the fraction of photons along that direction that
    cross the collimator (averaged over entry point and azimuth), and the part of it that crossed
    no lead. ``mu_per_mm``: the septa's linear attenuation [1/mm] (``inf``: opaque septa);
    ``hole_shape``: "hex" (honeycomb) or "square" (two crossed families of septa)."""
    if hole_shape not in HOLE_SHAPES:
        raise ValueError(f"hole shape {hole_shape!r} is not one of {HOLE_SHAPES}")
    model = _hex_transmission if hole_shape == "hex" else _square_transmission
    return model(hole_mm, septa_mm, length_mm, mu_per_mm, np.asarray(tau, dtype=np.float64))


def _beyond(hole_mm: float, length_mm: float) -> np.ndarray:
    """Which of ``_TAU`` lie beyond twice the holes' acceptance (τ > 2D/L)."""
    return _TAU > 2.0 * hole_mm / length_mm


def _square_least_transmission(hole_mm: float, septa_mm: float, length_mm: float, mu_per_mm: float,
                               tau: np.ndarray) -> np.ndarray:
    """Square lattice, per azimuth [tau, azimuth]: the transmission of a photon entering at a hole's
    edge, which meets the least lead over its shift s: W(x₀ + s) − W(x₀) ≥ W(s) for every entry
    point x₀ (W is 1-Lipschitz and grows by t per period)."""
    path = length_mm * np.sqrt(1.0 + tau[:, None] ** 2)

    def least_lead(shift_mm: np.ndarray) -> np.ndarray:
        shift = np.maximum(shift_mm, 1e-9)
        return _transmitted(mu_per_mm, _septal_length(shift, hole_mm, septa_mm), path, shift)

    shift = length_mm * tau[:, None]
    return least_lead(shift * np.cos(_AZIMUTH_RAD)) * least_lead(shift * np.sin(_AZIMUTH_RAD))


def _hex_least_transmission(hole_mm: float, septa_mm: float, length_mm: float, mu_per_mm: float,
                            tau: np.ndarray) -> np.ndarray:
    """Honeycomb, per azimuth [tau, azimuth]: an upper bound on every ray's transmission. Along
    direction e, with c = max_k |n_k·e| (n_k the flats' normals), a hole's chord is at most D/c
    (the chord through its centre) and any two holes are parted by a slab |n_k·x| of width ≥ t
    for some k (the lattice's hexagonal norm max_k |n_k·Δ| is ≥ p between distinct centres), a
    chord ≥ t/c. A ray of 2-D length s visiting m holes has open length ≤ m·D/c and lead
    ≥ (m − 1)·t/c, so lead ≥ min over m of max((m − 1)·t/c, s − m·D/c): the septal length W(s)
    of a single family of holes D/c and septa t/c (:func:`_septal_length`)."""
    phi = hex_azimuths()
    c = np.abs(_HEX_NORMALS @ np.stack([np.cos(phi), np.sin(phi)])).max(axis=0)   # [azimuth]
    shift = np.maximum(length_mm * tau[:, None], 1e-9)
    lead = _septal_length(shift, hole_mm / c, septa_mm / c)
    path = length_mm * np.sqrt(1.0 + tau[:, None] ** 2)
    return _transmitted(mu_per_mm, lead, path, shift)


def tail_fraction_bound(hole_mm: float, septa_mm: float, length_mm: float, mu_per_mm: float,
                        hole_shape: str = "hex") -> float:
    """An upper bound on :func:`penetration_from_geometry`'s ``tail_fraction`` (lengths in mm, μ of
    the septa in 1/mm) at a fraction of its cost, to rule the tail out without computing it.

    Beyond twice the acceptance (τ > 2D/L) each azimuth's transmission is bounded by that of the
    ray meeting the least lead any entry point can (:func:`_square_least_transmission`,
    :func:`_hex_least_transmission`), so no average over entry points is needed there. Within it
    the transmission is computed as the model does, and the photons of the interval straddling
    2D/L are left out of the total, which only lowers it: ``tail ≤ B/(I + B)`` with I the photons
    within and B the bound on those beyond."""
    beyond = _beyond(hole_mm, length_mm)
    weight = _DENSITY * _AREA
    within, _ = angular_transmission(hole_mm, septa_mm, length_mm, mu_per_mm, _TAU[~beyond], hole_shape)
    inside = np.trapezoid(within * weight[~beyond], _TAU[~beyond])
    least = _hex_least_transmission if hole_shape == "hex" else _square_least_transmission
    upper = least(hole_mm, septa_mm, length_mm, mu_per_mm, _TAU[beyond]).mean(axis=1)
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
    lattice = (geometry.hole_mm, geometry.septa_mm, geometry.length_mm, geometry.mu_septa_per_mm, geometry.hole_shape)
    if tail_fraction_bound(*lattice) <= threshold:   # ruled out without computing the tail
        return None
    response = penetration_from_geometry(geometry.name, energy_keV, *lattice)
    return response if response.tail_fraction > threshold else None


@cache
def penetration_from_geometry(name: str, energy_keV: float, hole_mm: float, septa_mm: float, length_mm: float,
                              mu_per_mm: float, hole_shape: str = "hex") -> PenetrationResponse:
    """:class:`PenetrationResponse` of a parallel-hole collimator (lengths in mm, μ of the septa in
    1/mm, ``hole_shape`` as :func:`angular_transmission`)."""
    total, geometric = angular_transmission(hole_mm, septa_mm, length_mm, mu_per_mm, hole_shape=hole_shape)
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

"""Absorbed-dose truth for the simulated dosimetry study, computed without the code under test's
dose models (quant.dosimetry: Loevinger point kernel, geometric reduction factor, mean-path
photon absorption, D = Ã·E/m).

Energy deposited in a target region by Monte Carlo of the decays of the truth activity:

- β⁻ electrons: per ICRP-107 branch (end-point Q − level, yield) an allowed spectrum shape
  N(T) ∝ F(Z, W)·p·W·(W₀ − W)² with the non-relativistic Fermi function F = 2πη/(1 − e^(−2πη)),
  η = αZW/p, Z = 72 (Hf); the sampled energies of each branch are scaled so that its mean is
  ICRP-107's (:func:`spectrum_scales`: 0.96–0.98 for the three branches that hold 99.9 % of
  the decays, 1.11 for the 0.05 % one). Each electron runs along a straight line from its decay
  point in an isotropic direction and loses its energy by the Katz–Penfold range–energy relation for water, R = 0.412·T^(1.265 − 0.0954 ln T) g/cm²
  (T in MeV; Katz & Penfold 1952, Rev Mod Phys 24:28): at path length s its energy is the one
  whose range is R(T₀) − s. Energy is scored where each of :data:`STEPS` equal path steps ends
  up (its mid-point). Straight tracks with the empirical (practical) range: no scattering
  detours, so the escape from a region is if anything overestimated.
- Conversion and Auger electrons (0.0147 MeV per decay, ranges ≤ 0.3 mm): absorbed where the
  decay is.
- Photons (lesions only): the 208 keV and 113 keV γ lines and the rest of the photon energy
  (x-rays and weak γ) at 60 keV, from the decay point to the sphere's surface along an isotropic
  direction, absorbed as E·(1 − exp(−μ_en·s)) (kerma approximation, μ_en/ρ of water from NIST
  (Hubbell & Seltzer): 60 keV 0.0319, 113 keV 0.0262, 208 keV 0.0297 cm²/g); photons from
  outside the sphere not included (≈ 1 % of the dose here: the background's TIA per mL is
  8–24 × lower than the spheres').

Transport in water (1.0 g/mL) everywhere: the simulator's spheres have no walls; its cold lung
insert (0.30 g/mL, which the 35 mm regions around the spheres touch) is crossed as water. What the truth shares with the code: ICRP-107's energies per decay and
branch yields, and the simulator's activity (the truth itself)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1] / "quant" / "dosimetry" / "data" / "Lu-177.json"
ELECTRON_REST_MeV = 0.51099895
FINE_STRUCTURE = 1.0 / 137.035999
Z_DAUGHTER = 72
STEPS = 32
PHOTONS_MeV_YIELD_MU_EN = ((0.208366, 0.110, 0.0297), (0.112950, 0.064, 0.0262))   # (MeV, per decay (ICRP-107), cm²/g water)
OTHER_PHOTON_MU_EN = 0.0319                                                           # the rest at 60 keV
MEV_TO_J = 1.602176634e-13


def decay_data() -> dict:
    return json.loads(DATA.read_text())


def katz_penfold_range_mm(energy_MeV: np.ndarray) -> np.ndarray:
    """Practical range (mm) in water of electrons of ``energy_MeV``."""
    e = np.maximum(np.asarray(energy_MeV, dtype=np.float64), 1e-6)
    return 10.0 * 0.412 * e ** (1.265 - 0.0954 * np.log(e))


_E_GRID = np.geomspace(1e-4, 0.6, 4000)
_R_GRID = katz_penfold_range_mm(_E_GRID)


def energy_at_residual_range(residual_mm: np.ndarray) -> np.ndarray:
    """Energy (MeV) of an electron with ``residual_mm`` of range left (0 at the end)."""
    return np.where(residual_mm > 0, np.interp(residual_mm, _R_GRID, _E_GRID, left=0.0), 0.0)


def _allowed_shape(end_point_MeV: float, n: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    t = np.linspace(0.0, end_point_MeV, n + 1)[1:]
    w = t / ELECTRON_REST_MeV + 1.0
    w0 = end_point_MeV / ELECTRON_REST_MeV + 1.0
    p = np.sqrt(w * w - 1.0)
    eta = FINE_STRUCTURE * Z_DAUGHTER * w / p
    fermi = 2.0 * math.pi * eta / (1.0 - np.exp(-2.0 * math.pi * eta))
    return t, fermi * p * w * (w0 - w) ** 2


def _branches() -> list[tuple[float, float, float]]:
    """(end point MeV, ICRP-107 mean MeV, yield) per β branch."""
    data = decay_data()
    return [(data["q_beta_MeV"] - level, mean, y) for (mean, y), level in zip(data["beta_branches_mean_MeV_yield"], data["hf177_levels_fed_MeV"])]


def spectrum_scales() -> list[float]:
    """Per branch: ICRP-107 mean energy / the allowed shape's mean."""
    out = []
    for end, mean, _ in _branches():
        t, n = _allowed_shape(end)
        out.append(mean / float(np.sum(t * n) / np.sum(n)))
    return out


def sample_beta_MeV(rng: np.random.Generator, count: int) -> tuple[np.ndarray, float]:
    """``count`` β energies (MeV) and the β yield per decay (Σ branch yields)."""
    branches = _branches()
    yields = np.array([y for *_, y in branches])
    which = rng.choice(len(branches), size=count, p=yields / yields.sum())
    energies = np.empty(count)
    for k, ((end, _, _), scale) in enumerate(zip(branches, spectrum_scales())):
        t, n = _allowed_shape(end)
        cdf = np.concatenate([[0.0], np.cumsum(n)])
        cdf /= cdf[-1]
        chosen = which == k
        energies[chosen] = scale * np.interp(rng.random(int(chosen.sum())), cdf, np.concatenate([[0.0], t]))
    return energies, float(yields.sum())


def isotropic(rng: np.random.Generator, count: int) -> np.ndarray:
    u = rng.uniform(-1.0, 1.0, count)
    phi = rng.uniform(0.0, 2.0 * math.pi, count)
    s = np.sqrt(1.0 - u * u)
    return np.stack([s * np.cos(phi), s * np.sin(phi), u], axis=1)


def electron_energy_in_region_MeV(points_mm: np.ndarray, inside: Callable[[np.ndarray], np.ndarray], rng: np.random.Generator,
                                  chunk: int = 20000) -> float:
    """Mean electron energy (MeV per decay) deposited in the region ``inside`` (points (n, 3) mm
    → bool) by decays at ``points_mm`` (n, 3)."""
    data = decay_data()
    local = data["conversion_electron_energy_per_decay_MeV"] + data["auger_energy_per_decay_MeV"]
    total = 0.0
    for start in range(0, len(points_mm), chunk):
        p = points_mm[start:start + chunk]
        n = len(p)
        energy, beta_yield = sample_beta_MeV(rng, n)
        direction = isotropic(rng, n)
        r0 = katz_penfold_range_mm(energy)
        edges = r0[:, None] * np.linspace(0.0, 1.0, STEPS + 1)[None, :]
        left = energy_at_residual_range(r0[:, None] - edges)
        left[:, 0] = energy
        lost = left[:, :-1] - left[:, 1:]
        mid = (edges[:, :-1] + edges[:, 1:]) / 2.0
        where = p[:, None, :] + mid[..., None] * direction[:, None, :]
        scored = inside(where.reshape(-1, 3)).reshape(n, STEPS)
        total += beta_yield * float((lost * scored).sum()) + local * float(inside(p).sum())
    return total / len(points_mm)


def sphere_photon_energy_MeV(radius_mm: float, rng: np.random.Generator, count: int = 200000) -> float:
    """Mean photon energy (MeV per decay) absorbed in a water sphere of ``radius_mm`` from its own
    uniformly distributed decays (kerma approximation)."""
    p = uniform_in_ball(rng, count, radius_mm)
    d = isotropic(rng, count)
    b = np.sum(p * d, axis=1)
    exit_mm = -b + np.sqrt(b * b - np.sum(p * p, axis=1) + radius_mm**2)
    photons = decay_data()["photon_energy_per_decay_MeV"]
    lines = [(e * y, mu) for e, y, mu in PHOTONS_MeV_YIELD_MU_EN]
    lines.append((photons - sum(e for e, _ in lines), OTHER_PHOTON_MU_EN))
    return float(sum(e * np.mean(1.0 - np.exp(-mu * 0.1 * exit_mm)) for e, mu in lines))


def uniform_in_ball(rng: np.random.Generator, count: int, radius_mm: float, inner_mm: float = 0.0) -> np.ndarray:
    """``count`` points uniform in the shell inner_mm ≤ r ≤ radius_mm around the origin (mm)."""
    r = np.cbrt(rng.uniform(inner_mm**3, radius_mm**3, count))
    return isotropic(rng, count) * r[:, None]


def sphere_dose_Gy(centre_mm: np.ndarray, radius_mm: float, tia_sphere_MBq_h: float, wall_mm: float, background_Bq_h_per_mL: float,
                   rng: np.random.Generator, count: int = 200000) -> dict[str, float]:
    """Mean absorbed dose (Gy) in a water sphere with ``tia_sphere_MBq_h`` uniformly inside, a
    cold wall of ``wall_mm`` and uniform background ``background_Bq_h_per_mL`` (TIA per mL)
    beyond it: electrons of the sphere and of a background shell as thick as the longest range,
    photons of the sphere."""
    inside = lambda q: np.sum((q - centre_mm) ** 2, axis=1) < radius_mm**2
    own = electron_energy_in_region_MeV(centre_mm + uniform_in_ball(rng, count, radius_mm), inside, rng)
    outer = radius_mm + wall_mm
    shell_mm = float(katz_penfold_range_mm(decay_data()["q_beta_MeV"])) + 0.1
    shell_mL = 4.0 / 3.0 * math.pi * ((outer + shell_mm) ** 3 - outer**3) / 1000.0
    from_shell = electron_energy_in_region_MeV(centre_mm + uniform_in_ball(rng, count, outer + shell_mm, outer), inside, rng)
    photons = sphere_photon_energy_MeV(radius_mm, rng, count)
    decays_sphere = tia_sphere_MBq_h * 3.6e9
    decays_shell = background_Bq_h_per_mL * shell_mL * 3600.0
    mass_kg = 4.0 / 3.0 * math.pi * radius_mm**3 * 1e-6
    parts = {"electrons_self": decays_sphere * own, "electrons_from_background": decays_shell * from_shell, "photons_self": decays_sphere * photons}
    return {k: v * MEV_TO_J / mass_kg for k, v in parts.items()} | {"total": sum(parts.values()) * MEV_TO_J / mass_kg}


def voxel_region(image_origin: np.ndarray, image_direction: np.ndarray, image_spacing: np.ndarray, mask_zyx: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """The region of the voxels of ``mask_zyx`` (a grid: origin, 3 × 3 direction, spacing, mm) as a
    predicate on points (n, 3) mm: True where the point's nearest voxel centre is in the mask."""
    to_index = np.linalg.inv(image_direction @ np.diag(image_spacing))
    shape = np.asarray(mask_zyx.shape[::-1])

    def inside(points: np.ndarray) -> np.ndarray:
        index = np.rint((points - image_origin) @ to_index.T).astype(np.int64)
        valid = np.all((index >= 0) & (index < shape), axis=1)
        out = np.zeros(len(points), dtype=bool)
        i = index[valid]
        out[valid] = mask_zyx[i[:, 2], i[:, 1], i[:, 0]]
        return out

    return inside


def electron_energy_from_map_J(tia_Bq_h: np.ndarray, fine_origin: np.ndarray, fine_direction: np.ndarray, fine_spacing: np.ndarray,
                               inside: Callable[[np.ndarray], np.ndarray], rng: np.random.Generator, count: int = 300000) -> float:
    """Electron energy (J) deposited in the region ``inside`` by the decays of the TIA map
    ``tia_Bq_h`` (z, y, x; Bq·h per voxel of a fine grid), decays placed uniformly within its voxels."""
    flat = tia_Bq_h.ravel()
    total = float(flat.sum())
    chosen = rng.choice(flat.size, size=count, p=flat / total)
    z, y, x = np.unravel_index(chosen, tia_Bq_h.shape)
    index = np.stack([x, y, z], axis=1) + rng.random((count, 3)) - 0.5
    points = fine_origin + (index * fine_spacing) @ fine_direction.T
    return total * 3600.0 * electron_energy_in_region_MeV(points, inside, rng) * MEV_TO_J

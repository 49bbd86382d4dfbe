"""Lu-177 voxel S-values from a dose-point kernel, voxel dose-rate maps, voxel-wise time
integration and dose-volume histograms.

Units: activity in MBq per voxel (or Bq/mL images converted by the voxel volume), S-values in
mGy/(MBq·s), dose rates in mGy/s → Gy/h where stated, absorbed doses in Gy, lengths in mm,
densities in g/mL.

Physics of the kernel (:func:`voxel_s_values`), all decay data ICRP-107 (``data/Lu-177.json``):

- β⁻ particles (0.13327 MeV per decay): the beta point-source dose function of R. Loevinger
  (Radiology 66:55, 1956), per branch (end-point E₀ = Q − level of Hf-177 fed; mean energies and
  yields from ICRP-107): J(x) ∝ (νx)⁻²·{c[1 − (νx/c)e^(1−νx/c)] + νx·e^(1−νx)} for νx < c, (νx)⁻²·νx·e^(1−νx)
  beyond, with x = ρr (g/cm²), ν = 18.6 (E₀ − 0.036)^−1.37 (2 − ḡ) cm²/g, ḡ = 1 (allowed
  shape) and c = 2 (0.17 < E₀ < 0.5 MeV). The energy deposited in a shell [x, x + dx] is
  4πx²J(x)dx, so each branch's radial energy distribution is known in closed form; its
  normalisation is the branch's mean energy (energy conservation).
- Conversion and Auger electrons (0.01465 MeV per decay, ranges ≤ 0.3 mm in water) are
  deposited in the source voxel (valid for voxels ≥ 2 mm).
- Photons (0.0351 MeV per decay) are **not** in the kernel: they mostly escape the body region
  of interest; the organ S-values (quant.dosimetry.organ) show their share of the kidney
  self-dose is about 1.5 %.

The voxel S-value S(Δ) for a source voxel at the origin and a target voxel at offset Δ is the
mean energy deposited in the target voxel per decay uniformly distributed in the source voxel,
divided by the target voxel's mass: computed by Monte Carlo sampling (uniform start point,
isotropic direction, distance drawn from the kernel's radial energy distribution; fixed seed,
2·10⁶ samples). The local-deposition limit (all electron energy in the voxel of decay) is
S₀₀₀ = E_e / m_voxel; for 1 MBq·s in a 4.8 mm water voxel (0.1106 g) it is 0.2143 mGy.
Published S₀₀₀ for 4.8 mm soft tissue: 0.178 mGy/(MBq·s) (Lanconelli et al. 2012, Phys Med Biol
57:517, MGHPhysicsResearch/MIRDCalculation ``177Lu4.8mmsoft.txt``); this kernel gives 0.192
(+7.6 %). The difference is the emission data, not the transport: every Lu-177 table of that
database (2.21–9.28 mm) deposits only 94 % of the ICRP-107 electron energy within the 3×3×3
neighbourhood that holds all Lu-177 electrons, while its Y-90 and Sr-89 soft-tissue tables
conserve their electron energy within 0.4 % at the same 1.04 g/mL. The share of that energy
that stays in the source voxel (what transport and voxel averaging decide) agrees within 2 %
at every size (0.930 vs 0.918 at 4.8 mm; the Loevinger kernel lets 10–15 % less energy escape
the source voxel), so the table's S₀₀₀ scaled to ICRP-107's electron energy, 0.189, is 1.3 %
below this kernel's. PyTheranostics' soft-tissue kernel (0.2066, its 0.1 wheel) is for 4.7952 mm
voxels of 1.00 g/mL: at that voxel and density this kernel gives 0.1992 (−3.6 %); the source
voxel's share of the 3×3×3 neighbourhood agrees within 1 % (0.927 vs 0.934), and that
neighbourhood holds 2.9 % more energy in PyTheranostics' table than ICRP-107's electrons carry
(its photons deposit ≤ 0.5 % there). An independent transport model (straight tracks with the
Katz–Penfold range–energy relation, tests/dosimetry_dose_truth.py) keeps 0.923 of the electron
energy in a 4.8 mm soft-tissue source voxel (this kernel 0.930).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy.signal import fftconvolve

DATA = Path(__file__).with_name("data")
MEV_TO_J = 1.602176634e-13
SOFT_TISSUE_DENSITY = 1.04  # g/mL, ICRP soft tissue as in Lanconelli et al. 2012
PUBLISHED_S000 = {  # mGy/(MBq·s), Lu-177, soft tissue, by voxel size (mm)
    "lanconelli2012": {4.8: 0.178, 4.42: 0.226, 3.9: 0.325},
}


@lru_cache(maxsize=1)
def decay_data() -> dict[str, Any]:
    """ICRP-107 Lu-177 emission summary (see ``data/Lu-177.json`` for the source)."""
    return json.loads((DATA / "Lu-177.json").read_text())


def electron_energy_per_decay_MeV() -> float:
    """β⁻ + conversion + Auger electron energy per decay [MeV] (ICRP-107: 0.14792)."""
    return float(decay_data()["electron_energy_per_decay_MeV"])


def local_deposition_s_value(voxel_mm: Sequence[float], density_g_per_mL: float = 1.0) -> float:
    """S₀₀₀ [mGy/(MBq·s)] when all electron energy stays in the voxel of decay."""
    mass_kg = float(np.prod(voxel_mm)) * 1e-3 * density_g_per_mL * 1e-3
    return electron_energy_per_decay_MeV() * MEV_TO_J * 1e6 / mass_kg * 1e3


# --------------------------------------------------------------------------- dose-point kernel


def _branches() -> list[tuple[float, float, float]]:
    """(end-point E₀ MeV, mean energy MeV, yield) of each β⁻ branch: ICRP-107 mean energies,
    end points Q − level, branches and levels matched in order of energy."""
    data = decay_data()
    branches = sorted(data["beta_branches_mean_MeV_yield"])
    levels = sorted(data["hf177_levels_fed_MeV"], reverse=True)
    return [(data["q_beta_MeV"] - level, mean, y) for (mean, y), level in zip(branches, levels)]


def loevinger_energy_density(x_g_cm2: np.ndarray, end_point_MeV: float, g_bar: float = 1.0) -> np.ndarray:
    """Unnormalised energy deposited per unit depth x (g/cm²) around a point source of a β
    branch: 4πx²·J(x) of the Loevinger point-source function (see the module docstring)."""
    nu = 18.6 * (end_point_MeV - 0.036) ** -1.37 * (2.0 - g_bar)
    c = 2.0 if end_point_MeV < 0.5 else 1.5 if end_point_MeV < 1.5 else 1.0
    nx = nu * np.asarray(x_g_cm2, dtype=np.float64)
    near = np.where(nx < c, c * (1.0 - (nx / c) * np.exp(1.0 - nx / c)), 0.0)
    return near + nx * np.exp(1.0 - nx)


def radial_energy_cdf(density_g_per_mL: float = 1.0, r_max_mm: float = 10.0, steps: int = 20000) -> tuple[np.ndarray, np.ndarray, float]:
    """Distance grid r (mm), cumulative fraction of the β energy deposited within r, and the β
    energy per decay (MeV), for a Lu-177 point source in a medium of ``density_g_per_mL``."""
    r = np.linspace(0.0, r_max_mm, steps + 1)
    x = r * 0.1 * density_g_per_mL
    total = np.zeros_like(r)
    energy = 0.0
    for end_point, mean, y in _branches():
        f = loevinger_energy_density(x, end_point)
        cdf = np.concatenate([[0.0], np.cumsum((f[1:] + f[:-1]) / 2 * np.diff(x))])
        total += mean * y * cdf / cdf[-1]
        energy += mean * y
    return r, total / energy, energy


# --------------------------------------------------------------------------- voxel S-values


@dataclass(frozen=True)
class VoxelKernel:
    """Voxel S-values [mGy/(MBq·s)], array order (z, y, x), centre = source voxel; voxel size
    (x, y, z) mm; the medium's density; how it was made."""

    values: np.ndarray
    voxel_mm: tuple[float, float, float]
    density_g_per_mL: float
    origin: str

    @property
    def s000(self) -> float:
        return float(self.values[tuple(n // 2 for n in self.values.shape)])

    @property
    def absorbed_fraction(self) -> float:
        """Fraction of the electron energy per decay the kernel deposits (Σ S·m_voxel / E_e)."""
        return float(self.values.sum()) / local_deposition_s_value(self.voxel_mm, self.density_g_per_mL)

    def as_dict(self) -> dict[str, Any]:
        return {"voxel_mm": list(self.voxel_mm), "density_g_per_mL": self.density_g_per_mL, "shape_zyx": list(self.values.shape),
                "s000_mGy_per_MBq_s": self.s000, "absorbed_fraction": self.absorbed_fraction, "origin": self.origin}


def voxel_s_values(voxel_mm: Sequence[float], density_g_per_mL: float = SOFT_TISSUE_DENSITY, samples: int = 2_000_000,
                   seed: int = 177) -> VoxelKernel:
    """The Lu-177 voxel S-value kernel for voxels of ``voxel_mm`` (x, y, z) in a uniform medium
    (see the module docstring). Half-width: enough voxels to hold the largest β range."""
    spacing = np.asarray(voxel_mm, dtype=np.float64)
    r, cdf, beta_MeV = radial_energy_cdf(density_g_per_mL)
    reach = float(r[np.searchsorted(cdf, 1.0 - 1e-6)])
    half = np.ceil(reach / spacing).astype(int)  # x, y, z
    rng = np.random.default_rng(seed)
    start = (rng.random((samples, 3)) - 0.5) * spacing
    direction = rng.normal(size=(samples, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    distance = np.interp(rng.random(samples), cdf, r)
    index = np.floor((start + direction * distance[:, None]) / spacing + 0.5).astype(int) + half
    shape_xyz = 2 * half + 1
    counts = np.zeros(shape_xyz[::-1], dtype=np.float64)
    np.add.at(counts, (index[:, 2], index[:, 1], index[:, 0]), 1.0)
    electron_MeV = electron_energy_per_decay_MeV()
    energy = counts / samples * beta_MeV
    energy[tuple(half[::-1])] += electron_MeV - beta_MeV  # conversion + Auger electrons: local
    values = energy / electron_MeV * local_deposition_s_value(spacing, density_g_per_mL)
    origin = ("computed: Loevinger (1956) beta point-source function per ICRP-107 β branch, conversion and Auger "
              f"electrons local, photons excluded; Monte Carlo voxel averaging ({samples} samples, seed {seed})")
    return VoxelKernel(values, tuple(float(s) for s in spacing), float(density_g_per_mL), origin)


# --------------------------------------------------------------------------- dose-rate maps


DENSITY_POINTS_HU = (-1000.0, 0.0, 1500.0)
DENSITY_POINTS_G_PER_ML = (0.0012, 1.0, 1.85)


def density_from_hu(ct: sitk.Image, hu: Sequence[float] = DENSITY_POINTS_HU, density: Sequence[float] = DENSITY_POINTS_G_PER_ML) -> sitk.Image:
    """Mass density [g/mL] from CT numbers by piecewise-linear interpolation through calibration
    points (default: air, water, and 1500 HU → 1.85 g/mL, cortical bone (1.85–1.92 g/mL in the
    ICRP/ICRU tables); an approximation: measure the curve with a density phantom per CT protocol)."""
    values = np.interp(sitk.GetArrayViewFromImage(ct).astype(np.float64), hu, density)
    out = sitk.GetImageFromArray(values.astype(np.float32))
    out.CopyInformation(ct)
    return out


def dose_rate_map(concentration: sitk.Image, kernel: VoxelKernel | None = None, density: sitk.Image | None = None,
                  method: str = "kernel") -> sitk.Image:
    """Absorbed-dose rate [mGy/s] from an activity concentration image [Bq/mL].

    ``method`` 'kernel': convolution (FFT) of the activity per voxel (MBq) with ``kernel``
    (computed for the image's voxel size when None), then scaled by kernel density / voxel
    density when ``density`` (g/mL, same grid) is given. 'local': local energy deposition, all
    electron energy in the voxel of decay (needs ``density``, or assumes the kernel medium)."""
    spacing = concentration.GetSpacing()
    activity = sitk.GetArrayFromImage(concentration).astype(np.float64) * float(np.prod(spacing)) * 1e-3 * 1e-6  # MBq
    rho = sitk.GetArrayFromImage(density).astype(np.float64) if density is not None else None
    if method == "local":
        rho_local = rho if rho is not None else np.full(activity.shape, SOFT_TISSUE_DENSITY)
        mass_g = np.maximum(rho_local, 1e-6) * float(np.prod(spacing)) * 1e-3
        rate = activity * electron_energy_per_decay_MeV() * MEV_TO_J * 1e6 / (mass_g * 1e-3) * 1e3
    elif method == "kernel":
        if kernel is None:
            kernel = voxel_s_values(spacing)
        if not np.allclose(kernel.voxel_mm, spacing, rtol=1e-3):
            raise ValueError(f"kernel voxel {kernel.voxel_mm} mm differs from the image's {tuple(spacing)} mm")
        rate = fftconvolve(activity, kernel.values, mode="same")
        if rho is not None:
            rate = rate * kernel.density_g_per_mL / np.maximum(rho, 1e-3)
    else:
        raise ValueError(f"dose-rate method {method!r}: 'kernel' or 'local'")
    rate = np.maximum(rate, 0.0)  # FFT round-off
    out = sitk.GetImageFromArray(rate.astype(np.float32))
    out.CopyInformation(concentration)
    return out


def integrate_dose_rates(times_h: Sequence[float], rates: Sequence[sitk.Image], nuclide_decay_per_h: float, tail: str = "mono") -> sitk.Image:
    """Absorbed dose [Gy] by voxel-wise time integration of registered dose-rate maps [mGy/s]
    acquired at ``times_h`` (h after administration, increasing): a linear rise from 0 at
    administration, trapezoids between time points, and after the last one either the
    physical decay ('physical': Ḋ_n/λ_phys) or each voxel's own mono-exponential decline
    between the last two points, never slower than physical decay ('mono')."""
    t = np.asarray(times_h, dtype=np.float64)
    if t.size != len(rates) or t.size == 0 or np.any(t <= 0) or np.any(np.diff(t) <= 0):
        raise ValueError("one dose-rate map per time point, times after administration and increasing")
    if tail not in ("mono", "physical"):
        raise ValueError(f"tail {tail!r}: 'mono' or 'physical'")
    stack = [sitk.GetArrayFromImage(r).astype(np.float64) * 3600.0 for r in rates]  # mGy/h
    dose = stack[0] * t[0] / 2.0
    for k in range(1, t.size):
        dose += (stack[k - 1] + stack[k]) / 2.0 * (t[k] - t[k - 1])
    lam = np.full(stack[-1].shape, nuclide_decay_per_h)
    if tail == "mono" and t.size >= 2:
        with np.errstate(divide="ignore", invalid="ignore"):
            slope = np.log(stack[-2] / stack[-1]) / (t[-1] - t[-2])
        lam = np.where(np.isfinite(slope), np.maximum(slope, nuclide_decay_per_h), nuclide_decay_per_h)
    dose += stack[-1] / lam
    out = sitk.GetImageFromArray((dose * 1e-3).astype(np.float32))
    out.CopyInformation(rates[-1])
    return out


# --------------------------------------------------------------------------- dose-volume histograms


@dataclass(frozen=True)
class Dvh:
    """Cumulative DVH of one VOI: ``dose_Gy`` bin edges and ``volume_fraction`` ≥ each; summary
    figures (Gy): mean, D98, D50, D2 (the minimum dose to the hottest 98/50/2 % of the volume)."""

    name: str
    dose_Gy: np.ndarray
    volume_fraction: np.ndarray
    mean_Gy: float
    d98_Gy: float
    d50_Gy: float
    d2_Gy: float
    volume_mL: float

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "mean_Gy": self.mean_Gy, "D98_Gy": self.d98_Gy, "D50_Gy": self.d50_Gy, "D2_Gy": self.d2_Gy,
                "volume_mL": self.volume_mL, "dose_Gy": self.dose_Gy.tolist(), "volume_fraction": self.volume_fraction.tolist()}


def dvh(dose: sitk.Image, mask: sitk.Image, name: str, bins: int = 200) -> Dvh:
    """Cumulative dose-volume histogram of ``dose`` (Gy) inside ``mask`` (same grid, non-zero inside)."""
    inside = sitk.GetArrayViewFromImage(mask) != 0
    if not inside.any():
        raise ValueError(f"mask {name!r} is empty")
    values = np.sort(sitk.GetArrayViewFromImage(dose)[inside].astype(np.float64))
    edges = np.linspace(0.0, max(float(values[-1]), 1e-12) * 1.0001, bins + 1)
    fraction = 1.0 - np.searchsorted(values, edges, side="left") / values.size

    def d_at(volume: float) -> float:  # minimum dose of the hottest ``volume`` fraction of the voxels
        return float(values[values.size - max(1, int(round(volume * values.size)))])

    voxel_mL = float(np.prod(dose.GetSpacing())) * 1e-3
    return Dvh(name, edges, fraction, float(values.mean()), d_at(0.98), d_at(0.50), d_at(0.02), values.size * voxel_mL)


def dvhs(dose: sitk.Image, masks: Mapping[str, sitk.Image], bins: int = 200) -> list[Dvh]:
    return [dvh(dose, mask, name, bins) for name, mask in masks.items()]

"""Organ-level absorbed dose (MIRD), the sphere model for lesions, and the biologically
effective dose (BED).

Units: TIA in MBq·h, S-values in mGy/(MBq·s), masses in g, absorbed doses in Gy, rate
constants in 1/h.

Organ S-values: Lu-177, ICRP-89 adult male phantom, as published by PyTheranostics (MIT; see
``data/README.md``), rows = targets, columns = sources. D(target) = Σ_sources Ã_s·S(target←s).
Patient-specific self-dose: the self S-value is split into its electron part
S_e = min(S, E_e/m_phantom) (E_e = 0.14792 MeV per decay, ICRP-107; absorbed fraction 1, or
less when the table says so, e.g. red marrow) and its photon remainder S_γ = S − S_e, and
scaled to the patient's organ mass m: S_e·(m_phantom/m) + S_γ·(m_phantom/m)^(2/3) (electrons by
mass, photons by mass^(2/3)). Cross-organ S-values (photons) are used unscaled, as in OLINDA.
The remainder of the body (total body minus the organs given as sources) uses the MIRD
remainder S-value S(t←R) = [S(t←TB)·m_TB − Σ S(t←s)·m_s] / (m_TB − Σ m_s) (Cloutier et al.
1973, J Nucl Med 14:53).

Sphere model (lesions): uniform activity in a sphere of unit-density soft tissue; electrons'
self-absorbed fraction φ_e(R) = ∫ p(r, R) dF(r) from the radial energy distribution F of the
Loevinger β point kernel (quant.dosimetry.kernel) with the geometric reduction factor
p(r, R) = 1 − 3r/(4R) + r³/(16R³) (r ≤ 2R; Berger 1971, MIRD Pamphlet 7); conversion and Auger
electrons are absorbed (φ = 1; ranges ≤ 0.3 mm); photons (0.0351 MeV per decay) with
φ_γ ≈ 1 − exp(−μ_en·4R/3) (mean chord 4R/3), μ_en/ρ = 0.029 cm²/g (water, 100–200 keV, NIST):
an approximation for a term that is at most 3 % of the sphere dose up to 100 mL.

BED for a dose rate that is a sum of exponentials Ḋ(t) = Σ cᵢe^(−λᵢt) (the fitted TAC scaled
to the absorbed dose): BED = D + (2/(α/β))·Σᵢⱼ cᵢcⱼ / ((λᵢ + λⱼ)(λᵢ + μ)), μ = ln 2 / T_repair;
for one exponential this is Dale's D·[1 + D·λ/((λ + μ)·α/β)] (Dale 1985, Br J Radiol 58:515).
Kidney defaults α/β = 2.6 Gy, T_repair = 2.8 h (Bodei et al. 2008, Eur J Nucl Med Mol Imaging
35:1847; the PyTheranostics defaults). No default is given for red marrow: its α/β and repair
half-time must be configured.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from quant.dosimetry.kernel import DATA, MEV_TO_J, decay_data, electron_energy_per_decay_MeV, radial_energy_cdf
from quant.dosimetry.tac import TacFit

S_TABLE = "Lu177-Male-Svalues.csv"
S_TABLE_CITATION = ("PyTheranostics (qurit/PyTheranostics, MIT) Lu177-Male-Svalues.csv, ICRP-89 adult male phantom, "
                    "mGy/(MBq·s); reported to agree with OLINDA within 0.1 %")

# canonical organ name: (target row, source column, ICRP-89 adult male mass in g (PyTheranostics human_phantom_masses.csv))
ORGANS: dict[str, tuple[str, str, float]] = {
    "adrenals": ("Adrenals", "Adrenals", 14.0),
    "brain": ("Brain", "Brain", 1450.0),
    "kidneys": ("Kidneys", "Kidneys", 310.0),
    "liver": ("Liver", "Liver", 1800.0),
    "lungs": ("Lungs", "Lungs", 1200.0),
    "pancreas": ("Pancreas", "Pancreas", 140.0),
    "prostate": ("Prostate", "Prostate", 17.0),
    "salivary_glands": ("Salivary Glands", "Salivary", 85.0),
    "red_marrow": ("Red Marrow", "Red Mar.", 1170.0),
    "spleen": ("Spleen", "Spleen", 150.0),
    "testes": ("Testes", "Testes", 35.0),
    "thymus": ("Thymus", "Thymus", 25.0),
    "thyroid": ("Thyroid", "Thyroid", 20.0),
    "total_body": ("Total Body", "Tot Body", 73000.0),
}
ALIASES = {"kidney": "kidneys", "salivary": "salivary_glands", "salivary_gland": "salivary_glands", "marrow": "red_marrow",
           "bone_marrow": "red_marrow", "whole_body": "total_body", "body": "total_body", "lung": "lungs"}
REMAINDER = "remainder"
KIDNEY_ALPHA_BETA_GY = 2.6
KIDNEY_REPAIR_HALF_LIFE_H = 2.8
MU_EN_WATER_CM2_PER_G = 0.029


def canonical_organ(name: str) -> str:
    """'Kidneys' → 'kidneys', 'Salivary glands' → 'salivary_glands', 'whole body' → 'total_body';
    other names come back lower-case with underscores (and have no S-values)."""
    key = name.strip().lower().replace(" ", "_").replace("-", "_")
    return ALIASES.get(key, key)


@lru_cache(maxsize=1)
def s_table() -> dict[str, dict[str, float]]:
    """S[target row][source column] in mGy/(MBq·s), as published."""
    with open(DATA / S_TABLE, newline="") as handle:
        rows = list(csv.reader(handle))
    sources = [name.strip() for name in rows[0][1:]]
    return {row[0].strip(): {s: float(v) for s, v in zip(sources, row[1:])} for row in rows[1:]}


def phantom_s(target: str, source: str) -> float:
    """Phantom S(target ← source) [mGy/(MBq·s)] for canonical organ names."""
    return s_table()[ORGANS[target][0]][ORGANS[source][1].strip()]


def electron_s_limit(mass_g: float) -> float:
    """E_e / m [mGy/(MBq·s)]: all electron energy absorbed in ``mass_g``."""
    return electron_energy_per_decay_MeV() * MEV_TO_J * 1e6 / (mass_g * 1e-3) * 1e3


def self_s_value(organ: str, mass_g: float | None = None) -> tuple[float, float]:
    """Self S-value [mGy/(MBq·s)] of ``organ`` scaled to ``mass_g`` (phantom mass when None),
    and its relative sensitivity to the mass, (m/S)·dS/dm (−1 for pure electrons, −2/3 for photons)."""
    phantom_mass = ORGANS[organ][2]
    s = phantom_s(organ, organ)
    s_e = min(s, electron_s_limit(phantom_mass))
    s_g = s - s_e
    ratio = phantom_mass / (mass_g or phantom_mass)
    electron, photon = s_e * ratio, s_g * ratio ** (2.0 / 3.0)
    total = electron + photon
    return total, -(electron + 2.0 / 3.0 * photon) / total


def remainder_s(target: str, sources: Sequence[str]) -> float:
    """MIRD remainder-of-body S(target ← remainder) for the organs ``sources`` taken out of the total body."""
    m_tb = ORGANS["total_body"][2]
    organs = [s for s in sources if s not in ("total_body", REMAINDER)]
    m_organs = sum(ORGANS[s][2] for s in organs)
    return (phantom_s(target, "total_body") * m_tb - sum(phantom_s(target, s) * ORGANS[s][2] for s in organs)) / (m_tb - m_organs)


@dataclass(frozen=True)
class OrganDose:
    """Absorbed dose of one target organ: total, self and cross parts (Gy), the dose from each
    source (Gy), the mass used (g; phantom when not measured), the self S-value used and the
    relative sensitivity of the dose to that mass ((m/D)·dD/dm)."""

    target: str
    dose_Gy: float
    self_Gy: float
    cross_Gy: float
    by_source_Gy: dict[str, float]
    mass_g: float
    mass_from: str
    s_self_mGy_per_MBq_s: float
    mass_sensitivity: float
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def organ_doses(tia_MBq_h: Mapping[str, float], masses_g: Mapping[str, float] | None = None,
                targets: Sequence[str] | None = None) -> dict[str, OrganDose]:
    """MIRD absorbed doses. ``tia_MBq_h``: TIA per source (canonical organ names; 'remainder'
    for the rest of the body, 'total_body' is not a source when the remainder is given);
    ``masses_g``: patient organ masses (from CT) — the self-dose is mass-scaled; ``targets``:
    default the organ sources. Unknown organs raise ValueError (lesions go to :func:`sphere_dose`)."""
    tia = {canonical_organ(k): float(v) for k, v in tia_MBq_h.items()}
    masses = {canonical_organ(k): float(v) for k, v in (masses_g or {}).items()}
    unknown = [k for k in (*tia, *masses) if k not in ORGANS and k != REMAINDER]
    if unknown:
        raise ValueError(f"no S-values for {sorted(set(unknown))} in {S_TABLE}; known organs: {', '.join(ORGANS)} and 'remainder'")
    if REMAINDER in tia and "total_body" in tia:
        raise ValueError("give either the total body or the remainder as a source, not both")
    organ_sources = [s for s in tia if s != REMAINDER]
    out = {}
    for target in [canonical_organ(t) for t in (targets or organ_sources)]:
        if target not in ORGANS:
            raise ValueError(f"no S-values for target {target!r}")
        by_source = {}
        s_self, sensitivity = self_s_value(target, masses.get(target))
        for source, value in tia.items():
            if source == target:
                s = s_self
            elif source == REMAINDER:
                s = remainder_s(target, organ_sources)
            else:
                s = phantom_s(target, source)
            by_source[source] = value * 3600.0 * s * 1e-3  # MBq·h → MBq·s; mGy → Gy
        self_gy = by_source.get(target, 0.0)
        total = sum(by_source.values())
        notes = ["cross-organ S-values from the phantom, not mass-scaled"]
        if target == "red_marrow":
            notes.append("red-marrow self S-value includes the phantom's trabecular geometry; mass scaling assumes the phantom's bone model")
        out[target] = OrganDose(target, total, self_gy, total - self_gy, by_source, masses.get(target, ORGANS[target][2]),
                                "patient" if target in masses else "phantom", s_self,
                                sensitivity * self_gy / total if total else 0.0, notes)
    return out


# --------------------------------------------------------------------------- sphere model


def sphere_absorbed_fractions(volume_mL: float, density_g_per_mL: float = 1.04) -> tuple[float, float]:
    """(electron, photon) self-absorbed fractions of a uniformly filled sphere (see the module docstring)."""
    radius_mm = (3.0 * volume_mL * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)
    r, cdf, beta_MeV = radial_energy_cdf(density_g_per_mL)
    x = np.minimum(r / (2.0 * radius_mm), 1.0)
    reduction = np.where(r <= 2.0 * radius_mm, 1.0 - 1.5 * x + 0.5 * x**3, 0.0)  # 1 − 3r/4R + r³/16R³ with x = r/2R
    beta_fraction = float(np.sum((reduction[1:] + reduction[:-1]) / 2 * np.diff(cdf)))
    electron_MeV = electron_energy_per_decay_MeV()
    phi_e = (beta_fraction * beta_MeV + (electron_MeV - beta_MeV)) / electron_MeV
    phi_g = 1.0 - math.exp(-MU_EN_WATER_CM2_PER_G * density_g_per_mL * (4.0 * radius_mm / 3.0) * 0.1)
    return phi_e, phi_g


@dataclass(frozen=True)
class SphereDose:
    """Lesion dose by the sphere model: dose (Gy), mass (g), absorbed fractions, S-value used."""

    name: str
    dose_Gy: float
    volume_mL: float
    mass_g: float
    phi_electrons: float
    phi_photons: float
    s_mGy_per_MBq_s: float
    mass_sensitivity: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def sphere_dose(name: str, tia_MBq_h: float, volume_mL: float, density_g_per_mL: float = 1.04) -> SphereDose:
    """Absorbed dose [Gy] of a lesion of ``volume_mL`` by the sphere model; ``mass_sensitivity``
    = (m/D)·dD/dm at fixed TIA (numerical, includes the change of the absorbed fractions)."""

    def s_value(volume: float) -> tuple[float, float, float]:
        phi_e, phi_g = sphere_absorbed_fractions(volume, density_g_per_mL)
        energy = phi_e * electron_energy_per_decay_MeV() + phi_g * decay_data()["photon_energy_per_decay_MeV"]
        return energy * MEV_TO_J * 1e6 / (volume * density_g_per_mL * 1e-3) * 1e3, phi_e, phi_g

    s, phi_e, phi_g = s_value(volume_mL)
    step = 1e-3
    sensitivity = (math.log(s_value(volume_mL * (1 + step))[0]) - math.log(s_value(volume_mL * (1 - step))[0])) / (2 * step)
    return SphereDose(name, tia_MBq_h * 3600.0 * s * 1e-3, volume_mL, volume_mL * density_g_per_mL, phi_e, phi_g, s, sensitivity)


# --------------------------------------------------------------------------- BED


def exponential_terms(fit: TacFit) -> list[tuple[float, float]]:
    """The fitted curve as Σ cᵢ·e^(−λᵢt) [(cᵢ MBq, λᵢ 1/h)]; ValueError for the trapezoid rule."""
    p = list(fit.parameters.values())
    if fit.model == "mono":
        return [(p[0], p[1])]
    if fit.model == "mono_uptake":
        return [(p[0], p[1]), (-p[0], p[2])]
    if fit.model == "bi":
        return [(p[0], p[1]), (p[2], p[3])]
    if fit.model == "tri":
        return [(p[0], p[1]), (p[2], p[3]), (-(p[0] + p[2]), p[4])]
    raise ValueError(f"BED needs a fitted exponential curve, not {fit.model!r}")


def bed(dose_Gy: float, terms: Sequence[tuple[float, float]], alpha_beta_Gy: float, repair_half_life_h: float) -> float:
    """Biologically effective dose [Gy] of an absorbed dose delivered with the time course of
    ``terms`` (Σ cᵢe^(−λᵢt), any scale: it is normalised to ``dose_Gy``)."""
    if alpha_beta_Gy <= 0 or repair_half_life_h <= 0:
        raise ValueError("α/β and the repair half-time must be positive")
    mu = math.log(2.0) / repair_half_life_h
    integral = sum(c / lam for c, lam in terms)
    c = [ci * dose_Gy / integral for ci, _ in terms]
    lam = [li for _, li in terms]
    quadratic = sum(c[i] * c[j] / ((lam[i] + lam[j]) * (lam[i] + mu)) for i in range(len(c)) for j in range(len(c)))
    return dose_Gy + 2.0 / alpha_beta_Gy * quadratic

"""Organ-level absorbed dose (MIRD), the sphere model for lesions, and the biologically
effective dose (BED).

Units: TIA in MBq·h, S-values in mGy/(MBq·s), masses in g, absorbed doses in Gy, rate
constants in 1/h.

Organ doses without an S-value table (the default): electron self-dose only. All the electron
energy per decay (E_e = 0.14792 MeV, ICRP-107, ``data/Lu-177.json``) is absorbed in the organ
(absorbed fraction 1) and divided by the organ mass (from the CT; the ICRP-89 reference mass
when there is no CT): D = Ã·E_e/m. Photons (0.0351 MeV per decay) and the dose from other
organs are not included, and every result says so (:data:`ELECTRON_ONLY`).

With an S-value table given by the user (:func:`read_s_table`: CSV, rows = targets, columns =
sources, mGy/(MBq·s), its citation as the user states it): D(target) = Σ_sources Ã_s·S(target←s).
Patient-specific self-dose: the self S-value is split into its electron part
S_e = min(S, E_e/m_phantom) (absorbed fraction 1, or less when the table says so, e.g. red
marrow) and its photon remainder S_γ = S − S_e, and scaled to the patient's organ mass m:
S_e·(m_phantom/m) + S_γ·(m_phantom/m)^(2/3) (electrons by mass, photons by mass^(2/3)).
Cross-organ S-values (photons) are used unscaled, as in OLINDA. The remainder of the body (total
body minus the organs given as sources) uses the MIRD remainder S-value
S(t←R) = [S(t←TB)·m_TB − Σ S(t←s)·m_s] / (m_TB − Σ m_s) (Cloutier et al. 1973, J Nucl Med 14:53).
The phantom masses m_phantom come from the table's ``phantom_mass_g`` row when it has one,
otherwise from :data:`PHANTOM_MASS_G` (ICRP Publication 89 adult male reference values, valid
only for a table computed for that phantom); an organ with neither is refused.

Sphere model (lesions): uniform activity in a sphere of unit-density soft tissue; electrons'
self-absorbed fraction φ_e(R) = ∫ p(r, R) dF(r) from the radial energy distribution F of the
Loevinger β point kernel (quant.dosimetry.kernel) with the geometric reduction factor
p(r, R) = 1 − 3r/(4R) + r³/(16R³) (r ≤ 2R; Berger 1971, MIRD Pamphlet 7); conversion and Auger
electrons are absorbed (φ = 1; ranges ≤ 0.3 mm); photons (0.0351 MeV per decay) with
φ_γ ≈ 1 − exp(−μ_en·3R/4) (3R/4: the mean distance from a decay uniformly placed in the sphere to
its surface along an isotropic direction), μ_en/ρ = 0.029 cm²/g (water, 100–200 keV, NIST):
an approximation for a term that is at most 1.5 % of the sphere dose up to 100 mL.

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
from pathlib import Path
from typing import Any

import numpy as np

from quant.dosimetry.kernel import MEV_TO_J, decay_data, electron_energy_per_decay_MeV, radial_energy_cdf
from quant.dosimetry.tac import TacFit

ELECTRON_ONLY = "electron self-dose only; photon and cross-organ contributions not included (no S-value table given)"
MARROW_ELECTRON_ONLY = ("red marrow: absorbed fraction 1 in the marrow mass ignores the trabecular bone, which absorbs part of "
                        "the electrons' energy (a phantom table's marrow self S-value is far below E_e/m): not valid for marrow, "
                        "give an S-value table")
MASS_ROW = "phantom_mass_g"
PHANTOM_MASS_SOURCE = "ICRP Publication 89 (2002), adult male reference masses"
# adult male reference organ masses in g, ICRP Publication 89 (2002), Basic anatomical and
# physiological data for use in radiological protection: reference values (Ann ICRP 32(3-4))
PHANTOM_MASS_G: dict[str, float] = {
    "adrenals": 14.0, "brain": 1450.0, "kidneys": 310.0, "liver": 1800.0, "lungs": 1200.0, "pancreas": 140.0,
    "prostate": 17.0, "salivary_glands": 85.0, "red_marrow": 1170.0, "spleen": 150.0, "testes": 35.0,
    "thymus": 25.0, "thyroid": 20.0, "total_body": 73000.0,
}
ALIASES = {"kidney": "kidneys", "salivary": "salivary_glands", "salivary_gland": "salivary_glands", "marrow": "red_marrow",
           "bone_marrow": "red_marrow", "red_mar.": "red_marrow", "whole_body": "total_body", "body": "total_body",
           "tot_body": "total_body", "lung": "lungs"}
REMAINDER = "remainder"
KIDNEY_ALPHA_BETA_GY = 2.6
KIDNEY_REPAIR_HALF_LIFE_H = 2.8
MU_EN_WATER_CM2_PER_G = 0.029


def canonical_organ(name: str) -> str:
    """'Kidneys' → 'kidneys', 'Salivary glands' → 'salivary_glands', 'whole body' → 'total_body';
    other names come back lower-case with underscores (and have no S-values)."""
    key = name.strip().lower().replace(" ", "_").replace("-", "_")
    return ALIASES.get(key, key)


@dataclass(frozen=True)
class SValueTable:
    """Organ S-values given by the user: ``s[target][source]`` in mGy/(MBq·s) (canonical organ
    names), ``citation`` as the user states it, phantom masses (g) and where they come from."""

    s: dict[str, dict[str, float]]
    citation: str
    phantom_mass_g: dict[str, float]
    mass_source: str

    def value(self, target: str, source: str) -> float:
        """S(target ← source) [mGy/(MBq·s)]."""
        try:
            return self.s[target][source]
        except KeyError:
            raise ValueError(f"the S-value table has no S({target} ← {source})") from None

    def has(self, organ: str) -> bool:
        """Whether ``organ`` is both a target row and a source column."""
        return organ in self.s and organ in self.s[organ]

    def mass(self, organ: str) -> float:
        """Phantom mass [g] of ``organ``."""
        if organ not in self.phantom_mass_g:
            raise ValueError(f"no phantom mass for {organ!r}: give the table a {MASS_ROW!r} row (g per source column)")
        return self.phantom_mass_g[organ]


def read_s_table(path: str | Path, citation: str) -> SValueTable:
    """S-value table from CSV: first row the source names, then one row per target (name, then
    S in mGy/(MBq·s)); an optional row named ``phantom_mass_g`` gives the phantom mass of each
    source in g (otherwise the ICRP-89 adult male masses of :data:`PHANTOM_MASS_G` are used).
    Organ names are made canonical (:func:`canonical_organ`). ValueError on a malformed table."""
    if not citation or not citation.strip():
        raise ValueError("the S-value table needs its citation (where its values come from)")
    with open(path, newline="") as handle:
        rows = [row for row in csv.reader(handle) if any(cell.strip() for cell in row)]
    if len(rows) < 2:
        raise ValueError("S-value table: a header row of sources and at least one target row expected")
    sources = [canonical_organ(name) for name in rows[0][1:]]
    table: dict[str, dict[str, float]] = {}
    masses = None
    for row in rows[1:]:
        if len(row) != len(sources) + 1:
            raise ValueError(f"S-value table: row {row[0]!r} has {len(row) - 1} values for {len(sources)} sources")
        try:
            values = [float(v) for v in row[1:]]
        except ValueError:
            raise ValueError(f"S-value table: row {row[0]!r} has a value that is not a number") from None
        if any(not math.isfinite(v) or v < 0 for v in values):
            raise ValueError(f"S-value table: row {row[0]!r} has a negative or non-finite value")
        if canonical_organ(row[0]) == MASS_ROW:
            masses = dict(zip(sources, values))
        else:
            table[canonical_organ(row[0])] = dict(zip(sources, values))
    if masses is not None and any(m <= 0 for m in masses.values()):
        raise ValueError(f"S-value table: the {MASS_ROW!r} row must be positive")
    if masses is None:
        return SValueTable(table, citation.strip(), dict(PHANTOM_MASS_G), f"{PHANTOM_MASS_SOURCE} (the table has no {MASS_ROW!r} row)")
    return SValueTable(table, citation.strip(), masses, f"the table's {MASS_ROW!r} row")


def electron_s_limit(mass_g: float) -> float:
    """E_e / m [mGy/(MBq·s)]: all electron energy absorbed in ``mass_g``."""
    return electron_energy_per_decay_MeV() * MEV_TO_J * 1e6 / (mass_g * 1e-3) * 1e3


def self_s_value(table: SValueTable, organ: str, mass_g: float | None = None) -> tuple[float, float]:
    """Self S-value [mGy/(MBq·s)] of ``organ`` from ``table`` scaled to ``mass_g`` (phantom mass when None),
    and its relative sensitivity to the mass, (m/S)·dS/dm (−1 for pure electrons, −2/3 for photons)."""
    phantom_mass = table.mass(organ)
    s = table.value(organ, organ)
    s_e = min(s, electron_s_limit(phantom_mass))
    s_g = s - s_e
    ratio = phantom_mass / (mass_g or phantom_mass)
    electron, photon = s_e * ratio, s_g * ratio ** (2.0 / 3.0)
    total = electron + photon
    return total, -(electron + 2.0 / 3.0 * photon) / total


def remainder_s(table: SValueTable, target: str, sources: Sequence[str]) -> float:
    """MIRD remainder-of-body S(target ← remainder) for the organs ``sources`` taken out of the total body."""
    m_tb = table.mass("total_body")
    organs = [s for s in sources if s not in ("total_body", REMAINDER)]
    m_organs = sum(table.mass(s) for s in organs)
    return (table.value(target, "total_body") * m_tb - sum(table.value(target, s) * table.mass(s) for s in organs)) / (m_tb - m_organs)


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
                targets: Sequence[str] | None = None, table: SValueTable | None = None) -> dict[str, OrganDose]:
    """Organ absorbed doses. ``tia_MBq_h``: TIA per source (canonical organ names; 'remainder'
    for the rest of the body, 'total_body' is not a source when the remainder is given);
    ``masses_g``: patient organ masses (from CT); ``targets``: default the organ sources.
    ``table``: MIRD with its S-values, the self-dose mass-scaled; None: electron self-dose only
    (each target from its own TIA over its mass: the patient's, else the ICRP-89 reference mass).
    Organs without S-values (or without a mass) raise ValueError (lesions go to :func:`sphere_dose`)."""
    tia = {canonical_organ(k): float(v) for k, v in tia_MBq_h.items()}
    masses = {canonical_organ(k): float(v) for k, v in (masses_g or {}).items()}
    if REMAINDER in tia and "total_body" in tia:
        raise ValueError("give either the total body or the remainder as a source, not both")
    organ_sources = [s for s in tia if s != REMAINDER]
    target_names = [canonical_organ(t) for t in (targets or organ_sources)]
    if table is None:
        return {target: _electron_self_dose(target, tia, masses) for target in target_names}
    unknown = [k for k in {*organ_sources, *target_names} if not table.has(k)]
    if unknown:
        raise ValueError(f"no S-values for {sorted(unknown)} in the S-value table; it has {', '.join(o for o in table.s if table.has(o))}")
    out = {}
    for target in target_names:
        by_source = {}
        s_self, sensitivity = self_s_value(table, target, masses.get(target))
        for source, value in tia.items():
            if source == target:
                s = s_self
            elif source == REMAINDER:
                s = remainder_s(table, target, organ_sources)
            else:
                s = table.value(target, source)
            by_source[source] = value * 3600.0 * s * 1e-3  # MBq·h → MBq·s; mGy → Gy
        self_gy = by_source.get(target, 0.0)
        total = sum(by_source.values())
        notes = ["cross-organ S-values from the table, not mass-scaled"]
        if target == "red_marrow":
            notes.append("red-marrow self S-value includes the phantom's trabecular geometry; mass scaling assumes the phantom's bone model")
        out[target] = OrganDose(target, total, self_gy, total - self_gy, by_source, masses.get(target, table.mass(target)),
                                "patient" if target in masses else "phantom", s_self,
                                sensitivity * self_gy / total if total else 0.0, notes)
    return out


def _electron_self_dose(target: str, tia: Mapping[str, float], masses: Mapping[str, float]) -> OrganDose:
    """D = Ã·E_e/m: all electron energy absorbed in the organ, nothing from photons or other organs."""
    if target not in tia:
        raise ValueError(f"no TIA for {target!r}: without an S-value table an organ's dose comes from its own activity only")
    if target in masses:
        mass, mass_from = masses[target], "patient"
    elif target in PHANTOM_MASS_G:
        mass, mass_from = PHANTOM_MASS_G[target], "ICRP-89 reference"
    else:
        raise ValueError(f"no mass for {target!r} (no CT, and not an organ with an ICRP-89 reference mass)")
    s = electron_s_limit(mass)
    dose = tia[target] * 3600.0 * s * 1e-3
    notes = [ELECTRON_ONLY, MARROW_ELECTRON_ONLY] if target == "red_marrow" else [ELECTRON_ONLY]
    return OrganDose(target, dose, dose, 0.0, {target: dose}, mass, mass_from, s, -1.0, notes)


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
    phi_g = 1.0 - math.exp(-MU_EN_WATER_CM2_PER_G * density_g_per_mL * (0.75 * radius_mm) * 0.1)
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

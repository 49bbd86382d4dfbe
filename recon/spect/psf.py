"""Collimator–detector response: depth-dependent Gaussian from the collimator the file names.

σ(d) = sqrt((a·d + b)² + c²), d the distance from the collimator face, with a = D/L_eff and
b = D (geometric resolution of a parallel-hole collimator, as FWHM) and c the intrinsic
resolution, all converted to σ. L_eff = L − 2/μ(E) accounts for septal penetration, μ that of
the collimator's material (lead unless the table says otherwise, e.g. tungsten); where the
penetration's broad tail is modelled (:mod:`recon.spect.penetration`), L itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from recon.errors import InputError
from recon.spect.materials import linear_attenuation_per_cm

FWHM_TO_SIGMA = 1.0 / 2.354820045


@dataclass(frozen=True)
class CollimatorResponse:
    """Gaussian response parameters, σ(d) = sqrt((slope·d + intercept_mm)² + intrinsic_mm²) in mm."""

    name: str
    slope: float
    intercept_mm: float
    intrinsic_mm: float

    def sigma_mm(self, distance_mm: float) -> float:
        return ((self.slope * distance_mm + self.intercept_mm) ** 2 + self.intrinsic_mm**2) ** 0.5


@cache
def _table() -> dict:
    return json.loads(resources.files("recon.spect").joinpath("data/collimators.json").read_text())


def known_collimators() -> dict[str, list[str]]:
    return {vendor: sorted(entry["collimators"]) for vendor, entry in _table().items() if not vendor.startswith("_")}


@dataclass(frozen=True)
class CollimatorGeometry:
    """A parallel-hole collimator from the table at one photon energy: hole width across flats,
    septal thickness and hole length [mm], μ of the septa's material [1/mm] at that energy, and
    the intrinsic resolution's σ [mm] at that energy, and the holes' shape ("hex": a honeycomb,
    the table's default; "square")."""

    name: str
    hole_mm: float
    septa_mm: float
    length_mm: float
    mu_septa_per_mm: float
    intrinsic_mm: float
    hole_shape: str = "hex"


def collimator_geometry(vendor: str, collimator: str, energy_keV: float, path: Path | None = None) -> CollimatorGeometry:
    """Geometry of ``collimator`` (as in CollimatorGridName) on a ``vendor`` camera at ``energy_keV``.

    Raises InputError (naming ``path``) for a collimator that is not in the table."""
    entry = _table().get(vendor)
    name = "".join(ch for ch in collimator.upper() if ch.isalnum())
    spec = None
    if entry is not None:
        name = entry["aliases"].get(name, name)
        spec = entry["collimators"].get(name)
    if spec is None:
        known = ", ".join(f"{v}: {'/'.join(c)}" for v, c in known_collimators().items())
        raise InputError(path, f"unknown collimator {collimator!r} for a {vendor} camera (known: {known})")
    return CollimatorGeometry(
        name=f"{vendor} {name}",
        hole_mm=spec["hole_mm"],
        septa_mm=spec["septa_mm"],
        length_mm=spec["length_mm"],
        mu_septa_per_mm=linear_attenuation_per_cm(spec.get("material", "lead"), energy_keV) / 10.0,
        intrinsic_mm=entry["intrinsic_fwhm_140keV_mm"] * (energy_keV / 140.0) ** -0.5 * FWHM_TO_SIGMA,
        hole_shape=spec.get("hole_shape", "hex"),
    )


def collimator_response(vendor: str, collimator: str, energy_keV: float, path: Path | None = None,
                        penetration_in_length: bool = True) -> CollimatorResponse:
    """Response of ``collimator`` (as in CollimatorGridName) on a ``vendor`` camera at ``energy_keV``.

    ``penetration_in_length``: the hole length is shortened to ``L_eff = L − 2/μ`` for the
    penetration at the holes' edges; False where the septal penetration is modelled by its own
    kernel (:mod:`recon.spect.penetration`), so the Gaussian is the geometric response of length L.
    Raises InputError (naming ``path``) for a collimator that is not in the table."""
    g = collimator_geometry(vendor, collimator, energy_keV, path)
    effective_length = g.length_mm - 2.0 / g.mu_septa_per_mm if penetration_in_length else g.length_mm
    return CollimatorResponse(
        name=g.name,
        slope=g.hole_mm / effective_length * FWHM_TO_SIGMA,
        intercept_mm=g.hole_mm * FWHM_TO_SIGMA,
        intrinsic_mm=g.intrinsic_mm,
    )

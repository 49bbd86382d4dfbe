"""Radionuclide data used by the reconstruction: half-lives and the photopeaks cameras image.

Half-lives in seconds, energies in keV (values from the NNDC/DDEP tables, see shared NOTES).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Nuclide:
    """A radionuclide: ``name`` as 'Lu-177', half-life [s], photopeaks [keV], main one first,
    and the positron emission probability per decay (0 for single-photon emitters)."""

    name: str
    half_life_s: float
    photopeaks_keV: tuple[float, ...]
    aliases: tuple[str, ...] = ()
    positron_fraction: float = 0.0

    @property
    def decay_constant_per_s(self) -> float:
        return math.log(2.0) / self.half_life_s

    def decay_factor(self, elapsed_s: float) -> float:
        """Fraction of activity left after ``elapsed_s`` seconds (negative: before)."""
        return math.exp(-self.decay_constant_per_s * elapsed_s)

    def mean_decay_factor(self, start_s: float, duration_s: float) -> float:
        """Mean of the activity fraction over [start, start+duration] relative to time 0.

        Counts collected during a frame are this factor times those of a non-decaying source.
        """
        lam = self.decay_constant_per_s
        if duration_s <= 0:
            return self.decay_factor(start_s)
        return math.exp(-lam * start_s) * (1.0 - math.exp(-lam * duration_s)) / (lam * duration_s)


NUCLIDES: tuple[Nuclide, ...] = (
    Nuclide("Lu-177", 6.647 * 86400, (208.4, 112.9), ("LU177", "177LU", "LUTETIUM-177", "^177^LUTETIUM")),
    Nuclide("Tc-99m", 6.0067 * 3600, (140.5,), ("TC99M", "99MTC", "TECHNETIUM-99M", "^99M^TECHNETIUM")),
    Nuclide("In-111", 2.8047 * 86400, (171.3, 245.4), ("IN111", "111IN", "INDIUM-111", "^111^INDIUM")),
    Nuclide("I-131", 8.0252 * 86400, (364.5,), ("I131", "131I", "IODINE-131", "^131^IODINE")),
    Nuclide("Ga-68", 67.71 * 60, (511.0,), ("GA68", "68GA", "GALLIUM-68", "^68^GALLIUM"), positron_fraction=0.8891),
    Nuclide("F-18", 109.77 * 60, (511.0,), ("F18", "18F", "FLUORINE-18", "^18^FLUORINE"), positron_fraction=0.9686),
)


def _key(text: str) -> str:
    return "".join(ch for ch in text.upper() if ch.isalnum() or ch == "^")


def find_nuclide(text: str) -> Nuclide | None:
    """The nuclide named in free text ('Lu-177', '^177^Lutetium', 'Lu177 PSMA'), or None."""
    key = _key(text)
    for nuclide in NUCLIDES:
        for name in (nuclide.name, *nuclide.aliases):
            alias = _key(name)
            if alias and (alias in key or key.replace("^", "") == alias.replace("^", "")):
                return nuclide
    return None


def get_nuclide(name: str) -> Nuclide:
    """The nuclide called ``name``; KeyError if unknown."""
    nuclide = find_nuclide(name)
    if nuclide is None:
        raise KeyError(f"unknown radionuclide {name!r}; known: {', '.join(n.name for n in NUCLIDES)}")
    return nuclide

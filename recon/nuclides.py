"""Radionuclide data used by the reconstruction, read from libraries, never typed by hand.

Half-lives and photon lines (gamma and X-rays, energies [keV], yields per decay) come from
ICRP Publication 107 (package ``icrp107-database``); decay chains and branching fractions from
``radioactivedecay`` (its ICRP-107 data set). A nuclide's photon lines include those of its
short-lived progeny, weighted by their activity per unit parent activity: secular or transient
equilibrium by default, or a given time since chemical separation (a pure parent at t = 0).
Progeny living longer than the parent (e.g. Xe-131m after I-131) are left out: no equilibrium
exists and they leave the body or the field of view on their own timescale.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from functools import cache, cached_property
from pathlib import Path

# Photons a gamma camera images: lines in this energy range [keV] grouped into photopeaks.
IMAGING_RANGE_KEV = (45.0, 700.0)
# Lines within this fraction of a photopeak's strongest line's energy belong to it (Kα1/Kα2 X-rays).
PEAK_MERGE_FRACTION = 0.045
# Smallest photopeak yield [photons per parent decay] worth a window.
MIN_PEAK_YIELD = 0.05

# The nuclides the pipeline names in free text (DICOM Radiopharmaceutical, window names).
KNOWN = ("Lu-177", "Ac-225", "Ra-223", "I-131", "In-111", "Tb-161", "Pb-212",
         "Tc-99m", "Ga-68", "F-18", "Cu-64")
# Element names as DICOM CodeMeanings spell them ('^177^Lutetium'); words, not data.
_ELEMENTS = {"Lu": "Lutetium", "Ac": "Actinium", "Ra": "Radium", "I": "Iodine", "In": "Indium",
             "Tb": "Terbium", "Pb": "Lead", "Tc": "Technetium", "Ga": "Gallium", "F": "Fluorine",
             "Cu": "Copper"}
_TIME_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0,
                 "y": 365.25 * 86400.0}


@dataclass(frozen=True)
class PhotonLine:
    """One gamma or X-ray line: energy [keV], photons per decay of the parent (chain member's
    own yield times its activity per unit parent activity), and the emitting nuclide."""

    energy_keV: float
    yield_per_decay: float
    emitter: str


@dataclass(frozen=True)
class ChainMember:
    """A nuclide of the decay chain: half-life [s], fraction of parent decays that reach it
    (product of branching fractions) and its activity per unit parent activity [Bq/Bq]."""

    name: str
    half_life_s: float
    branching: float
    activity_ratio: float


@dataclass(frozen=True)
class Photopeak:
    """Lines a camera cannot separate, merged: yield-weighted mean energy [keV], summed yield
    [photons per parent decay], and the lines."""

    energy_keV: float
    yield_per_decay: float
    lines: tuple[PhotonLine, ...]


def _icrp107_dir() -> Path:
    import icrp107_database

    return Path(icrp107_database.__file__).parent / "icrp107"


@cache
def _icrp107(name: str) -> dict:
    """The ICRP-107 record of ``name`` ('Lu-177'); KeyError if the library has none."""
    path = _icrp107_dir() / f"{name}.json"
    if not path.is_file():
        raise KeyError(name)
    data = json.loads(path.read_text())
    return json.loads(data) if isinstance(data, str) else data


def _half_life_s(name: str) -> float:
    record = _icrp107(name)
    return float(record["half_life"]) * _TIME_UNITS_S[record["time_unit"]]


def canonical_name(text: str) -> str | None:
    """'Lu-177' for 'Lu177', '177Lu', 'lu-177', 'Tc99m', '^99m^Tc'; None if not of that form."""
    m = re.fullmatch(r"\^?(\d+)(m?)\^?([A-Za-z]{1,2})|([A-Za-z]{1,2})-?(\d+)(m?)", text.strip().replace(" ", ""))
    if m is None:
        return None
    mass, meta, symbol = (m[1], m[2], m[3]) if m[1] else (m[5], m[6], m[4])
    return f"{symbol.capitalize()}-{int(mass)}{meta.lower()}"


@dataclass(frozen=True)
class Nuclide:
    """A radionuclide ('Lu-177') and, lazily, its decay chain and photon lines.

    ``half_life_s`` [s]; ``positron_fraction``: positrons per decay (0 for single-photon
    emitters); ``since_separation_s``: time [s] since the parent was separated from its
    progeny, None for equilibrium (the default)."""

    name: str
    half_life_s: float
    positron_fraction: float = 0.0
    aliases: tuple[str, ...] = ()
    since_separation_s: float | None = None

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

    def separated(self, since_s: float | None) -> Nuclide:
        """This nuclide ``since_s`` seconds after separation from its progeny (None: equilibrium)."""
        if since_s is not None and not (math.isfinite(since_s) and since_s >= 0):
            raise ValueError(f"time since separation {since_s!r} s is not a non-negative number")
        return replace(self, since_separation_s=since_s)

    @cached_property
    def chain(self) -> tuple[ChainMember, ...]:
        """The parent (first) and progeny shorter-lived than it, with activity ratios."""
        return _chain(self.name, self.since_separation_s)

    @cached_property
    def photon_lines(self) -> tuple[PhotonLine, ...]:
        """Gamma, X-ray and annihilation lines of the chain per parent decay, by energy."""
        lines = []
        for member in self.chain:
            emissions = _icrp107(member.name)["emissions"]
            for kind in ("gamma", "X", "annihilation"):
                for energy_MeV, yield_ in emissions.get(kind, []):
                    if yield_ * member.activity_ratio > 0:
                        lines.append(PhotonLine(1000.0 * energy_MeV, yield_ * member.activity_ratio, member.name))
        return tuple(sorted(lines, key=lambda line: line.energy_keV))

    @cached_property
    def photopeaks(self) -> tuple[Photopeak, ...]:
        """Photopeaks a camera images, most abundant first: lines within ``IMAGING_RANGE_KEV``
        within ``PEAK_MERGE_FRACTION`` of a stronger line's energy merged into its photopeak, kept if their summed yield
        reaches ``MIN_PEAK_YIELD`` photons per parent decay."""
        lo, hi = IMAGING_RANGE_KEV
        groups: list[list[PhotonLine]] = []   # each seeded by its strongest line
        for line in sorted((x for x in self.photon_lines if lo <= x.energy_keV <= hi), key=lambda x: -x.yield_per_decay):
            group = next((g for g in groups if abs(line.energy_keV - g[0].energy_keV) <= PEAK_MERGE_FRACTION * g[0].energy_keV), None)
            if group is None:
                groups.append([line])
            else:
                group.append(line)
        peaks = []
        for group in groups:
            total = sum(x.yield_per_decay for x in group)
            if total >= MIN_PEAK_YIELD:
                energy = sum(x.energy_keV * x.yield_per_decay for x in group) / total
                peaks.append(Photopeak(energy, total, tuple(sorted(group, key=lambda x: x.energy_keV))))
        return tuple(sorted(peaks, key=lambda p: -p.yield_per_decay))

    @property
    def photopeaks_keV(self) -> tuple[float, ...]:
        """Photopeak energies [keV], most abundant first."""
        return tuple(p.energy_keV for p in self.photopeaks)

    def provenance(self) -> dict:
        """What the data are and the assumption on the progeny, for recon.json."""
        state = ("progeny in equilibrium with the parent (assumed)" if self.since_separation_s is None
                 else f"progeny grown in for {self.since_separation_s:g} s after separation")
        return {
            "name": self.name,
            "half_life_s": self.half_life_s,
            "source": "ICRP-107 (icrp107-database: lines, half-lives; radioactivedecay: chain, branching)",
            "progeny": state,
            "chain": [{"name": m.name, "branching": m.branching, "activity_ratio": m.activity_ratio} for m in self.chain],
            "photopeaks_keV": [{"energy_keV": round(p.energy_keV, 2), "yield_per_decay": round(p.yield_per_decay, 5)}
                               for p in self.photopeaks],
        }


@cache
def _decay_table() -> dict[str, tuple[tuple[str, float], ...]]:
    """radioactivedecay's ICRP-107 decay table, {nuclide: ((daughter, branching), ...)}, read
    from the package's data file without importing it (the import pulls in matplotlib, pandas
    and sympy: seconds per process)."""
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("radioactivedecay")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("radioactivedecay is not installed")
    path = Path(spec.submodule_search_locations[0]) / "icrp107_ame2020_nubase2020" / "decay_data.npz"
    with np.load(path, allow_pickle=True) as data:
        return {str(n): tuple(zip(map(str, p), map(float, b))) for n, p, b in zip(data["nuclides"], data["progeny"], data["bfs"])}


def _progeny(name: str, parent_half_life_s: float) -> dict[str, dict[str, float]]:
    """Progeny of ``name`` shorter-lived than the parent, every mother before its daughters:
    {daughter: {mother: branching fraction}}."""
    mothers: dict[str, dict[str, float]] = {}
    queue, seen = [name], {name}
    while queue:
        mother = queue.pop(0)
        for daughter, branch in _decay_table().get(mother, ()):
            try:
                half_life = _half_life_s(daughter)
            except KeyError:   # stable, or a decay mode ('SF'): the chain ends
                continue
            if branch > 0 and half_life < parent_half_life_s:
                mothers.setdefault(daughter, {})[mother] = branch
                if daughter not in seen:
                    seen.add(daughter)
                    queue.append(daughter)
    ordered: dict[str, dict[str, float]] = {}
    while len(ordered) < len(mothers):   # topological order (decay chains have no cycles)
        for daughter, its in mothers.items():
            if daughter not in ordered and all(m == name or m in ordered for m in its):
                ordered[daughter] = its
    return ordered


@cache
def _chain(name: str, since_s: float | None) -> tuple[ChainMember, ...]:
    """Parent and progeny with their activity per unit parent activity [Bq/Bq].

    Equilibrium (``since_s`` None): every member decays with the parent's λp, so
    a_i = λ_i / (λ_i − λp) · Σ_j b_ji a_j (Bateman's limit). After ``since_s`` seconds from a
    pure parent: radioactivedecay's Bateman solution."""
    lam = lambda n: math.log(2.0) / _half_life_s(n)  # noqa: E731
    progeny = _progeny(name, _half_life_s(name))
    reached, ratio = {name: 1.0}, {name: 1.0}
    for daughter, mothers in progeny.items():
        reached[daughter] = sum(reached[m] * b for m, b in mothers.items())
        ratio[daughter] = lam(daughter) / (lam(daughter) - lam(name)) * sum(ratio[m] * b for m, b in mothers.items())
    if since_s is not None and progeny:
        import radioactivedecay as rd

        if since_s > 0:
            activities = {str(k): float(v) for k, v in rd.Inventory({name: 1.0}, "Bq").decay(since_s, "s").activities("Bq").items()}
            ratio = {n: activities.get(n, 0.0) / activities[name] for n in reached}
        else:
            ratio = {n: float(n == name) for n in reached}
    return tuple(ChainMember(n, _half_life_s(n), reached[n], ratio[n]) for n in reached)


def _aliases(name: str) -> tuple[str, ...]:
    symbol, mass = name.split("-")
    element = _ELEMENTS.get(symbol, symbol)
    return (f"{symbol}{mass}", f"{mass}{symbol}", f"{element}-{mass}", f"^{mass}^{element}")


@cache
def load_nuclide(name: str) -> Nuclide:
    """The nuclide ``name`` ('Lu-177', 'Lu177', '177Lu') from the ICRP-107 data, progeny in
    equilibrium; KeyError if the library does not know it."""
    canonical = canonical_name(name) or name
    try:
        record = _icrp107(canonical)
    except KeyError:
        raise KeyError(f"unknown radionuclide {name!r}: not in the ICRP-107 decay data") from None
    positrons = sum(y for _, y in record["emissions"].get("beta+", []))
    return Nuclide(canonical, _half_life_s(canonical), positrons, _aliases(canonical))


def _key(text: str) -> str:
    return "".join(ch for ch in text.upper() if ch.isalnum() or ch == "^")


def known_nuclides() -> tuple[Nuclide, ...]:
    """The nuclides recognised in free text (``KNOWN``), progeny in equilibrium."""
    return tuple(load_nuclide(n) for n in KNOWN)


def find_nuclide(text: str) -> Nuclide | None:
    """The known nuclide named in free text ('Lu-177', '^177^Lutetium', 'Lu177 PSMA'), or None."""
    key = _key(text)
    for nuclide in known_nuclides():
        for name in (nuclide.name, *nuclide.aliases):
            alias = _key(name)
            if alias and (alias in key or key.replace("^", "") == alias.replace("^", "")):
                return nuclide
    return None


def get_nuclide(name: str) -> Nuclide:
    """The nuclide called ``name``: a known one named in free text, else any nuclide of the
    ICRP-107 data ('Sm-153'); KeyError (its message says why) if unknown."""
    return find_nuclide(name) or load_nuclide(name)

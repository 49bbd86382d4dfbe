"""Energy windows: identified by their energy ranges, never by their position in the file."""

from __future__ import annotations

from dataclasses import dataclass, replace

from recon.nuclides import Nuclide, find_nuclide, known_nuclides


@dataclass(frozen=True)
class EnergyWindow:
    """One acquisition energy window; ``index`` is its 0-based position in the file's
    EnergyWindowInformationSequence (EnergyWindowVector holds index + 1)."""

    index: int
    lower_keV: float
    upper_keV: float
    name: str = ""

    @property
    def width_keV(self) -> float:
        return self.upper_keV - self.lower_keV

    @property
    def centre_keV(self) -> float:
        return 0.5 * (self.lower_keV + self.upper_keV)

    def contains(self, energy_keV: float) -> bool:
        return self.lower_keV <= energy_keV <= self.upper_keV


@dataclass(frozen=True)
class WindowSet:
    """One photopeak window and its adjacent scatter windows (if any).

    ``photopeak_keV``: the photopeak's energy [keV]; ``yield_per_decay``: its photons per parent
    decay; ``lower_in_tail``: the photopeak window is narrow (CZT) and the lower window lies in
    the photopeak's low-energy tail, so it holds primary photons as well as scatter."""

    photopeak: EnergyWindow
    lower: EnergyWindow | None
    upper: EnergyWindow | None
    photopeak_keV: float
    yield_per_decay: float = 1.0
    lower_in_tail: bool = False


# A scatter window must start (or end) within this fraction of the photopeak energy of the peak window edge.
_ADJACENT_FRACTION = 0.05
# A photopeak window's centre must lie within this fraction of the photopeak energy (CZT windows
# widened below the peak for its low-energy tail, e.g. -7 %/+4 %, included) ...
_CENTRE_FRACTION = 0.025
# ... and the peak within this part of its width, (energy - lower edge) / width (binds narrow windows).
_PEAK_POSITION = (0.3, 0.85)
# A photopeak window is at most this fraction of the photopeak energy wide.
_MAX_WIDTH_FRACTION = 0.5
# A photopeak window at most this fraction of its energy wide is narrow (CZT energy resolution).
_NARROW_FRACTION = 0.12
# CZT low-energy tail (incomplete charge collection): primaries down to this fraction below the peak.
_TAIL_FRACTION = 0.2


def _position(window: EnergyWindow, energy_keV: float) -> float:
    return (energy_keV - window.lower_keV) / window.width_keV if window.width_keV > 0 else -1.0


def _is_photopeak_window(window: EnergyWindow, energy_keV: float) -> bool:
    lo, hi = _PEAK_POSITION
    return (abs(window.centre_keV - energy_keV) <= _CENTRE_FRACTION * energy_keV
            and lo <= _position(window, energy_keV) <= hi and window.width_keV <= _MAX_WIDTH_FRACTION * energy_keV)


def photopeak_window(windows: list[EnergyWindow], energy_keV: float) -> EnergyWindow | None:
    """The window framing ``energy_keV`` as a photopeak window (centre within 2.5 % of the
    energy, the peak between 30 % and 85 % of its width from the lower edge, width at most half
    the energy), the most nearly centred one if several; None if none."""
    candidates = [w for w in windows if _is_photopeak_window(w, energy_keV)]
    return min(candidates, key=lambda w: (abs(_position(w, energy_keV) - 0.5), w.width_keV), default=None)


def photopeak_windows(windows: list[EnergyWindow], nuclide: Nuclide) -> list[WindowSet]:
    """Every photopeak of ``nuclide`` with a window, most abundant first, each with the scatter
    windows that adjoin it. A window serves one photopeak at most (the most abundant).

    A lower (upper) scatter window lies entirely below (above) the photopeak window, its upper
    (lower) edge within 5 % of the photopeak energy of the photopeak window's edge, is no
    photopeak window and contains no photopeak of the nuclide."""
    sets: list[WindowSet] = []
    for peak in nuclide.photopeaks:
        window = photopeak_window([w for w in windows if all(w is not s.photopeak for s in sets)], peak.energy_keV)
        if window is not None:
            sets.append(WindowSet(window, None, None, peak.energy_keV, peak.yield_per_decay))
    others = [w for w in windows if all(w is not s.photopeak for s in sets)
              and not any(w.contains(e) for e in nuclide.photopeaks_keV)]
    return [_with_scatter_windows(s, others) for s in sets]


def _with_scatter_windows(chosen: WindowSet, others: list[EnergyWindow]) -> WindowSet:
    peak, energy = chosen.photopeak, chosen.photopeak_keV
    gap = _ADJACENT_FRACTION * energy
    lower = [w for w in others if w.upper_keV <= peak.lower_keV + 0.5 and peak.lower_keV - w.upper_keV <= gap]
    upper = [w for w in others if w.lower_keV >= peak.upper_keV - 0.5 and w.lower_keV - peak.upper_keV <= gap]
    low = min(lower, key=lambda w: peak.lower_keV - w.upper_keV, default=None)
    narrow = peak.width_keV <= _NARROW_FRACTION * energy
    return replace(
        chosen,
        lower=low,
        upper=min(upper, key=lambda w: w.lower_keV - peak.upper_keV, default=None),
        lower_in_tail=narrow and low is not None and low.upper_keV > (1.0 - _TAIL_FRACTION) * energy,
    )


def select_windows(windows: list[EnergyWindow], nuclide: Nuclide) -> WindowSet | None:
    """The most abundant photopeak of ``nuclide`` that has a window, with its scatter windows
    (see ``photopeak_windows``); None when no window frames any of its photopeaks."""
    sets = photopeak_windows(windows, nuclide)
    return sets[0] if sets else None


def _covered_yield(windows: list[EnergyWindow], nuclide: Nuclide) -> float:
    """Fraction of the nuclide's photopeak yield that has photopeak windows (0 if its most
    abundant photopeak has none)."""
    sets = photopeak_windows(windows, nuclide)
    if not sets or sets[0].photopeak_keV != nuclide.photopeaks_keV[0]:
        return 0.0
    return sum(s.yield_per_decay for s in sets) / sum(p.yield_per_decay for p in nuclide.photopeaks)


def named_nuclide(windows: list[EnergyWindow]) -> Nuclide | None:
    """The one nuclide the window names name ('Lu177_EM', 'Lu177_SC'), else None."""
    named = {n for n in map(find_nuclide, (w.name for w in windows)) if n is not None}
    return named.pop() if len(named) == 1 else None


def guess_nuclide(windows: list[EnergyWindow]) -> Nuclide | None:
    """The nuclide named by the windows ('Lu177_EM'), else the single-photon emitter whose
    photopeaks the windows frame best: its most abundant photopeak has a window and the
    largest fraction of its photopeak yield is windowed (None if none, or a tie)."""
    named = named_nuclide(windows)
    if named is not None:
        return named
    scores = sorted(((_covered_yield(windows, n), n.name, n) for n in known_nuclides() if n.positron_fraction == 0),
                    key=lambda x: x[0], reverse=True)
    if not scores or scores[0][0] == 0 or (len(scores) > 1 and scores[1][0] == scores[0][0]):
        return None
    return scores[0][2]

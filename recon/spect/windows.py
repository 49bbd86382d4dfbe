"""Energy windows: identified by their energy ranges, never by their position in the file."""

from __future__ import annotations

from dataclasses import dataclass

from recon.nuclides import NUCLIDES, Nuclide, find_nuclide


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
    """The windows a reconstruction uses: photopeak and its adjacent scatter windows (if any)."""

    photopeak: EnergyWindow
    lower: EnergyWindow | None
    upper: EnergyWindow | None
    photopeak_keV: float


# A scatter window must start (or end) within this fraction of the photopeak energy of the peak window edge.
_ADJACENT_FRACTION = 0.05
# A photopeak window's centre must lie within this fraction of the photopeak energy.
_CENTRE_FRACTION = 0.025


def photopeak_window(windows: list[EnergyWindow], energy_keV: float) -> EnergyWindow | None:
    """The window containing ``energy_keV`` whose centre is closest to it (None if none is centred on it)."""
    candidates = [
        w for w in windows if w.contains(energy_keV) and abs(w.centre_keV - energy_keV) <= _CENTRE_FRACTION * energy_keV
    ]
    return min(candidates, key=lambda w: abs(w.centre_keV - energy_keV), default=None)


def guess_nuclide(windows: list[EnergyWindow]) -> Nuclide | None:
    """The nuclide named by the windows ('Lu177_EM'), else the one whose main photopeak has a
    window centred on it (None if none or several match)."""
    named = {n for n in map(find_nuclide, (w.name for w in windows)) if n is not None}
    if len(named) == 1:
        return named.pop()
    matches = [n for n in NUCLIDES if n.photopeaks_keV[0] < 500 and photopeak_window(windows, n.photopeaks_keV[0])]
    return matches[0] if len(matches) == 1 else None


def select_windows(windows: list[EnergyWindow], nuclide: Nuclide) -> WindowSet | None:
    """Photopeak window for the nuclide's main photopeak and the scatter windows that adjoin it.

    A lower (upper) scatter window lies entirely below (above) the photopeak window, its upper
    (lower) edge within 5 % of the photopeak energy of the photopeak window's edge, and contains
    no photopeak of the nuclide. Returns None when no window is centred on the photopeak.
    """
    energy = nuclide.photopeaks_keV[0]
    peak = photopeak_window(windows, energy)
    if peak is None:
        return None
    gap = _ADJACENT_FRACTION * energy
    others = [w for w in windows if w is not peak and not any(w.contains(e) for e in nuclide.photopeaks_keV)]
    lower = [w for w in others if w.upper_keV <= peak.lower_keV + 0.5 and peak.lower_keV - w.upper_keV <= gap]
    upper = [w for w in others if w.lower_keV >= peak.upper_keV - 0.5 and w.lower_keV - peak.upper_keV <= gap]
    return WindowSet(
        photopeak=peak,
        lower=min(lower, key=lambda w: peak.lower_keV - w.upper_keV, default=None),
        upper=min(upper, key=lambda w: w.lower_keV - peak.upper_keV, default=None),
        photopeak_keV=energy,
    )

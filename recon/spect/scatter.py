"""Scatter in the photopeak window estimated from adjacent energy windows (counts per pixel)."""

from __future__ import annotations

import numpy as np

from recon.spect.windows import WindowSet


def energy_window_scatter(
    lower: np.ndarray, upper: np.ndarray | None, windows: WindowSet
) -> np.ndarray:
    """Triple-energy-window estimate (Ogawa 1991): trapezoid under the scatter spectrum,
    S = (C_low/w_low + C_up/w_up) · w_peak / 2. Without an upper window (dual-energy-window
    variant) the upper count density is taken as zero. Inputs and output in counts per pixel."""
    density = lower / windows.lower.width_keV
    if upper is not None and windows.upper is not None:
        density = density + upper / windows.upper.width_keV
    return (density * windows.photopeak.width_keV / 2.0).astype(np.float32)

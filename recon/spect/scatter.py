"""Scatter in the photopeak window estimated from adjacent energy windows (counts per pixel)."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from recon.spect.windows import WindowSet


def energy_window_scatter(
    lower: np.ndarray, upper: np.ndarray | None, windows: WindowSet, smoothing_pixels: float = 0.0
) -> np.ndarray:
    """Triple-energy-window estimate (Ogawa 1991): trapezoid under the scatter spectrum,
    S = (C_low/w_low + C_up/w_up) · w_peak / 2. Without an upper window (dual-energy-window
    variant) the upper count density is taken as zero. Inputs and output in counts per pixel.

    ``smoothing_pixels``: σ of a Gaussian applied within each view of [view, row, column]
    projections. Scatter varies slowly, but the side windows hold few counts: used raw, their
    noise makes the estimate exceed the photopeak counts in many pixels, which biases a
    Poisson reconstruction (its model can never fall below the additive term)."""
    density = lower / windows.lower.width_keV
    if upper is not None and windows.upper is not None:
        density = density + upper / windows.upper.width_keV
    scatter = density * windows.photopeak.width_keV / 2.0
    if smoothing_pixels > 0:
        scatter = gaussian_filter(scatter, sigma=(0.0, smoothing_pixels, smoothing_pixels), mode="constant")
    return np.asarray(scatter, dtype=np.float32)

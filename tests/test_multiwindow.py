"""Joint two-window reconstruction (Ac-225: 218 and 440 keV) of a uniform water cylinder whose
projections are computed analytically (attenuated chord integrals with NIST water attenuation
at each energy, Poisson noise): no code or model shared with the projector."""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk

from recon.io.nm_projections import ProjectionGeometry
from recon.spect.attenuation import hu_to_mu
from recon.spect.multiwindow import reconstruct_windows
from recon.spect.reconstruct import Algorithm
from recon.spect.system import RowRange, reconstruction_grid, system_matrix, to_projections

PIXEL_MM, N_COLS, N_ROWS, N_VIEWS = 8.0, 32, 3, 16
RADIUS_MM = 100.0
CONCENTRATION = 1.0          # activity per mm³ (arbitrary units)
# NIST XCOM water μ/ρ [cm²/g]: 200 keV 0.1370, 300 keV 0.1186, 400 keV 0.1061, 500 keV 0.09687
NIST = {200.0: 0.1370, 300.0: 0.1186, 400.0: 0.1061, 500.0: 0.09687}
WINDOWS = {218.2: 0.02, 440.5: 0.03}   # photopeak keV: counts per (activity·mm³ of chord area), made up


def nist_water_mu_per_mm(energy_keV: float) -> float:
    lo = max(e for e in NIST if e <= energy_keV)
    hi = min(e for e in NIST if e > energy_keV)
    t = math.log(energy_keV / lo) / math.log(hi / lo)
    return math.exp((1 - t) * math.log(NIST[lo]) + t * math.log(NIST[hi])) / 10.0


def analytic_counts(mu_per_mm: float, per_unit: float, rng: np.random.Generator) -> np.ndarray:
    """[view, row, column] Poisson counts of the cylinder: per column, the mean over 16 lateral
    samples of ∫ c·e^{-μ·depth} along the chord = c·(1 - e^{-μL})/μ, times pixel area."""
    s = (np.arange(N_COLS)[:, None] - (N_COLS - 1) / 2 + (np.arange(16)[None, :] + 0.5) / 16 - 0.5) * PIXEL_MM
    chord = 2.0 * np.sqrt(np.clip(RADIUS_MM**2 - s**2, 0.0, None))
    profile = (CONCENTRATION * (1.0 - np.exp(-mu_per_mm * chord)) / mu_per_mm).mean(axis=1) * PIXEL_MM**2
    mean = np.broadcast_to(per_unit * profile, (N_VIEWS, N_ROWS, N_COLS))
    return rng.poisson(mean).astype(np.float32)


def _geometry() -> ProjectionGeometry:
    return ProjectionGeometry(angles_deg=np.arange(N_VIEWS) * 360.0 / N_VIEWS, radii_mm=np.full(N_VIEWS, 250.0),
                              pixel_mm=PIXEL_MM, n_rows=N_ROWS, n_cols=N_COLS, axis_xy_mm=(0.0, 0.0), z_first_row_mm=0.0)


def _mu_map(grid: sitk.Image, energy_keV: float) -> sitk.Image:
    """The reconstruction's own μ [1/cm] of water (0 HU) inside the cylinder, 0 outside."""
    n = grid.GetSize()[0]
    x = (np.arange(n) - (n - 1) / 2) * PIXEL_MM
    inside = (x[None, :] ** 2 + x[:, None] ** 2) <= RADIUS_MM**2
    hu = np.where(inside, 0.0, -1000.0)[None].repeat(N_ROWS, axis=0)
    image = sitk.GetImageFromArray(hu_to_mu(hu, energy_keV, 120.0))
    image.CopyInformation(grid)
    return image


def _reconstruct(energies_for_mu: list[float], counts: list[np.ndarray], sensitivities: list[float]) -> np.ndarray:
    geometry, rows = _geometry(), RowRange(0, N_ROWS)
    grid = reconstruction_grid(geometry, rows)
    systems = [system_matrix(geometry, rows, _mu_map(grid, e), None, "native") for e in energies_for_mu]
    obj = reconstruct_windows(systems, sensitivities, [to_projections(c, rows) for c in counts], [None] * len(counts),
                              Algorithm("osem", 12, 4))
    return obj.cpu().numpy()


def test_joint_two_window_reconstruction_recovers_the_activity():
    rng = np.random.default_rng(7)
    energies = list(WINDOWS)
    counts = [analytic_counts(nist_water_mu_per_mm(e), WINDOWS[e], rng) for e in energies]
    reference = WINDOWS[energies[0]]
    sensitivities = [WINDOWS[e] / reference for e in energies]   # the windows' calibration, relative
    truth = CONCENTRATION * math.pi * RADIUS_MM**2 * N_ROWS * PIXEL_MM   # activity in the field

    def total(obj: np.ndarray) -> float:   # voxel value: reference-window counts of its activity
        return float(obj.sum()) / reference

    joint = _reconstruct(energies, counts, sensitivities)
    singles = [_reconstruct([e], [c], [1.0]) * (reference / WINDOWS[e]) for e, c in zip(energies, counts)]
    print("total / truth: joint", total(joint) / truth, "single windows", [total(x) / truth for x in singles])
    assert abs(total(joint) / truth - 1) < 0.02, total(joint) / truth
    for single in singles:
        assert abs(total(single) / truth - 1) < 0.02, total(single) / truth
    # each window needs μ at its own energy: μ(218 keV) for the 440 keV window biases the joint total
    wrong = _reconstruct([energies[0], energies[0]], counts, sensitivities)
    print("μ(218 keV) for both windows:", total(wrong) / truth)
    assert total(wrong) / truth > 1.05, total(wrong) / truth

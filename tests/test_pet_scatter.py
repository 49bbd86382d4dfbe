"""PET single-scatter simulation: its physics against independent reference values, and its
structure (symmetry, TOF shares adding up to the non-TOF scatter, segment integrals); the
tail-fitted shape's continuation of the activity beyond the axial field."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recon.pet.projector import ImageGrid
from recon.pet.scatter import (coarse_detectors, klein_nishina_angular, klein_nishina_total, nearest, scatter_shape_image,
                               segment_integrals, single_scatter, window_acceptance)

R_E_CM = 2.8179403262e-13  # classical electron radius (CODATA)
WATER_ELECTRONS_PER_CM3 = 6.02214076e23 * 10 / 18.015


@pytest.mark.parametrize("energy_keV, xcom_cm2_per_g", [(200.0, 0.1370), (300.0, 0.1186), (500.0, 0.09687), (600.0, 0.08956)])
def test_klein_nishina_cross_section_gives_water_attenuation(energy_keV, xcom_cm2_per_g):
    """Compton dominates water at these energies: n_e x sigma_KN within 3 % of NIST XCOM's total
    attenuation of water (which adds a little coherent and photoelectric)."""
    sigma_cm2 = 2 * math.pi * R_E_CM**2 * float(klein_nishina_total(torch.tensor(energy_keV, dtype=torch.float64)))
    mu = WATER_ELECTRONS_PER_CM3 * sigma_cm2
    assert mu == pytest.approx(xcom_cm2_per_g, rel=0.03)
    assert mu < xcom_cm2_per_g  # Compton alone is a part of the total


def test_klein_nishina_angular_density_is_normalised_and_forward_peaked():
    cos = torch.linspace(-1.0, 1.0, 20001, dtype=torch.float64)
    density = klein_nishina_angular(cos)
    assert float(torch.trapezoid(density, cos)) * 2 * math.pi == pytest.approx(1.0, rel=1e-6)
    assert float(density[-1] / density[0]) == pytest.approx(1.0 / (0.5 / 9 * (1 / 3 + 3)), rel=1e-6)  # 0 vs 180 degrees


def test_window_acceptance_of_511_photons_matches_the_simulator():
    """The sample's simulator (its own Gaussian energy blur, 10 % FWHM, 435-585 keV) accepts a
    511-keV photon with probability 0.99944 (data-samples/ga68-iec-pet/README.md)."""
    w = float(window_acceptance(torch.tensor(511.0, dtype=torch.float64), (435.0, 585.0), 0.10))
    assert w == pytest.approx(0.99944, abs=2e-5)
    assert float(window_acceptance(torch.tensor(340.0), (435.0, 585.0), 0.10)) < 1e-4  # 60-degree scatter rejected


GRID = ImageGrid((41, 41, 21), (4.0, 4.0, 4.0), (-80.0, -80.0, -40.0))


def _ball(radius_mm: float, value: float) -> torch.Tensor:
    axes = [torch.arange(n) * s + o for n, s, o in zip(GRID.shape, GRID.spacing_mm, GRID.origin_mm)]
    x, y, z = torch.meshgrid(*axes, indexing="ij")
    return value * ((x**2 + y**2 + z**2) <= radius_mm**2).float()


def test_segment_integrals_are_chords_of_the_segment_only():
    ball = _ball(60.0, 1.0)
    start = torch.tensor([[0.0, 0.0, 0.0], [0.0, -200.0, 0.0], [0.0, 30.0, 0.0]])
    end = torch.tensor([[200.0, 0.0, 0.0], [0.0, 200.0, 0.0], [0.0, 30.0, 300.0]])
    got = segment_integrals(torch.stack([ball, 2 * ball]), GRID, start, end, step_mm=1.0)
    # half a chord, a full chord, a chord starting at the ball's centre plane off-axis (z only to +40 mm: the grid)
    expected = torch.tensor([60.0, 120.0, min(math.sqrt(60**2 - 30**2), 40.0)])
    torch.testing.assert_close(got[:, 0], expected, rtol=0.05, atol=2.0)
    torch.testing.assert_close(got[:, 1], 2 * got[:, 0])


def _model(window=(435.0, 585.0)):
    angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    ring = np.stack([150 * np.cos(angles), 150 * np.sin(angles), np.zeros_like(angles)], 1)
    positions = np.concatenate([ring + [0, 0, dz] for dz in (-10.0, 0.0, 10.0)])
    return single_scatter(_ball(60.0, 0.0096), _ball(30.0, 1.0), GRID, torch.tensor(ring, dtype=torch.float32), positions,
                          window, 0.10, pitch_mm=20.0)


def test_single_scatter_is_symmetric_and_tof_shares_add_up():
    model = _model()
    a = torch.tensor([0, 3, 5, 7, 1])
    b = torch.tensor([12, 15, 16, 17, 10])
    ones = torch.ones(5)
    ab, ba = model.lors(a, b, ones), model.lors(b, a, ones)
    assert float(ab.min()) > 0
    torch.testing.assert_close(ab, ba, rtol=1e-4, atol=0)
    torch.testing.assert_close(model.mean_l[a, b], -model.mean_l[b, a], rtol=1e-4, atol=1e-3)
    edges = torch.linspace(-300.0, 300.0, 31)
    shares = sum(model.lors(a, b, ones, (edges, torch.full((5,), k), 30.0)) for k in range(30))
    torch.testing.assert_close(shares, ab, rtol=1e-4, atol=0)


def test_scatter_falls_off_away_from_the_object_and_with_a_narrower_window():
    """Through the object (head-on LOR) more scatter than a LOR that grazes it; a window that
    starts at 500 keV loses most of it (single scatter lowers the energy)."""
    model = _model()
    through, grazing = model.lors(torch.tensor([0, 0]), torch.tensor([12, 4]), torch.ones(2))
    assert float(through) > 2 * float(grazing)
    narrow = _model(window=(500.0, 585.0))
    assert float(narrow.lors(torch.tensor([0]), torch.tensor([12]), torch.ones(1))) < 0.5 * float(through)


def test_coarse_detectors_merge_neighbours_by_position():
    angles = np.linspace(0, 2 * np.pi, 360, endpoint=False)
    positions = np.stack([250 * np.cos(angles), 250 * np.sin(angles), np.zeros_like(angles)], 1)[np.random.default_rng(0).permutation(360)]
    coarse, index = coarse_detectors(positions, 20.0)
    assert 60 < coarse.shape[0] < 130
    assert np.linalg.norm(positions - coarse[index], axis=1).max() < 20.0 * math.sqrt(3)
    assert int(nearest(torch.tensor(coarse, dtype=torch.float32), torch.tensor(coarse[[5, 9]], dtype=torch.float32))[1]) == 9


def _cylinder(n_z: int, z_slices: slice) -> tuple[torch.Tensor, ImageGrid]:
    """Uniform cylinder (radius 40 mm) in the given slices of a 4-mm grid of 30 x 30 x n_z voxels."""
    grid = ImageGrid((30, 30, n_z), (4.0, 4.0, 4.0), (-58.0, -58.0, 0.0))
    x = (np.arange(30) - 14.5) * 4.0
    disc = (x[:, None] ** 2 + x[None, :] ** 2 <= 40.0**2).astype(np.float32)
    activity = np.zeros(grid.shape, np.float32)
    activity[:, :, z_slices] = disc[:, :, None]
    return torch.tensor(activity), grid


def test_scatter_shape_continues_the_activity_at_the_field_edge_only():
    """The tail-fitted shape (blurred activity, continued 100 mm beyond the axial field): an object
    ending inside a long field (the long-axial-field scanner's case) puts no scatter shape in the
    empty slices 3 sigma beyond it; an object cut by the field keeps the shape at the end slices as
    at the centre (activity beyond the field scatters in). Weak end slices were once replaced by the
    nearest strong one, which filled the empty end of the long field with the phantom's activity
    (scatter fraction 0.181 against 0.251 simulated)."""
    inside, grid = _cylinder(64, slice(0, 30))  # object ends 34 slices (136 mm) before the field does
    shape = scatter_shape_image(inside, grid).numpy().sum(axis=(0, 1))
    assert shape[-1] < 1e-3 * shape.max(), shape[-1] / shape.max()
    through, grid = _cylinder(16, slice(None))
    shape = scatter_shape_image(through, grid).numpy().sum(axis=(0, 1))
    assert shape[0] == pytest.approx(shape[8], rel=0.02) and shape[-1] == pytest.approx(shape[8], rel=0.02)

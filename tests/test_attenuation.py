"""CT → μ-map at the photopeak energy, on the SPECT grid in patient coordinates."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from recon.io.ct import read_ct_series
from recon.spect.attenuation import hu_to_mu, mu_map_on_grid, tube_voltage_kvp


def test_bilinear_hu_to_mu():
    mu = hu_to_mu(np.array([-1000.0, -700.0, 0.0, 1000.0]), 208.4, 120.0)
    assert mu[0] == 0.0
    assert mu[2] == pytest.approx(0.136, abs=0.002)  # water at 208 keV (NIST XCOM)
    assert mu[1] == pytest.approx(0.3 * mu[2], rel=1e-6)
    assert mu[2] * 1.3 < mu[3] < mu[2] * 1.8  # bone-like: less than its CT contrast at 208 keV
    assert hu_to_mu(np.array([0.0]), 140.5, 120.0)[0] == pytest.approx(0.154, abs=0.002)


def test_mu_map_of_the_sample_on_a_spect_grid(sample, truth):
    ct, header, uids = read_ct_series(sample / "ct")
    assert len(uids) == ct.GetSize()[2] and tube_voltage_kvp(header) == 120.0
    grid = sitk.Image([64, 64, 40], sitk.sitkFloat32)
    grid.SetSpacing([8.0, 8.0, 8.0])
    grid.SetOrigin([-252.0, -252.0, -260.0])
    mu = mu_map_on_grid(ct, 120.0, grid, 208.4)
    assert mu.GetOrigin() == grid.GetOrigin() and mu.GetSpacing() == grid.GetSpacing()

    def at(point):
        return mu.GetPixel(mu.TransformPhysicalPointToIndex(point))

    axis = truth["phantom"]["axis_xy_mm"]
    assert at((axis[0] + 100.0, axis[1] + 40.0, -100.0)) == pytest.approx(0.136, abs=0.003)  # water
    assert at((axis[0], axis[1], -100.0)) == pytest.approx(0.3 * 0.136, abs=0.01)  # lung insert
    assert at((axis[0], axis[1] - 150.0, -100.0)) == 0.0  # air in front of the phantom
    assert at((0.0, 0.0, -250.0)) == 0.0  # beyond the CT: air

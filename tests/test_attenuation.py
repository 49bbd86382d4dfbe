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


def test_air_off_calibration_and_noisy_is_air():
    """Real CTs read air a few HU off −1000 (−994 HU on the real GE Optima CT540) with noise, and
    pad outside their reconstruction circle (−3024 HU on GE): all of it is μ = 0, the body keeps
    water's μ. The air–water line alone gave ~0.001 /cm in air, 1 % more activity on that patient."""
    n, d = 160, 1.953
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:n, 0:n] * d - (n - 1) / 2 * d
    r = np.hypot(x, y)
    hu = np.where(r < 100.0, 0.0, -994.0)[None] + rng.normal(0.0, 30.0, (24, n, n))
    hu[:, r > 150.0] = -3024.0
    ct = sitk.GetImageFromArray(hu.astype(np.float32))
    ct.SetSpacing([d, d, 2.5])
    ct.SetOrigin([-(n - 1) / 2 * d, -(n - 1) / 2 * d, 0.0])
    grid = sitk.Image([70, 70, 10], sitk.sitkFloat32)
    grid.SetSpacing([4.4196] * 3)
    grid.SetOrigin([-(70 - 1) / 2 * 4.4196, -(70 - 1) / 2 * 4.4196, 8.0])
    mu = sitk.GetArrayFromImage(mu_map_on_grid(ct, 120.0, grid, 208.0))
    gy, gx = np.mgrid[0:70, 0:70] * 4.4196 - (70 - 1) / 2 * 4.4196
    gr = np.hypot(gx, gy)
    assert np.all(mu[:, gr > 110.0] == 0.0)
    water = hu_to_mu(np.array([0.0]), 208.0, 120.0)[0]
    assert mu[:, gr < 90.0].mean() == pytest.approx(water, rel=0.005)
    # a diameter through the body: 200 mm of water, nothing from the air around it
    assert mu[:, 35, :].sum(axis=1) * 0.44196 == pytest.approx(np.full(10, 20.0 * water), rel=0.03)


def test_smoothing_is_simpleitks_discrete_gaussian():
    """The μ-map equals the one made with SimpleITK's ``DiscreteGaussian`` filter itself (clamped
    at −1000 HU, smoothed, resampled, converted) on a CT of random values up to its edges (so the
    edge handling shows), anisotropic voxels and permuted axes: to the last bit with SimpleITK 2.5
    (asserted to float rounding, 1e-6, so that another SimpleITK's order of sums still passes)."""
    rng = np.random.default_rng(3)
    ct = sitk.GetImageFromArray(rng.uniform(-1500.0, 1500.0, (20, 30, 40)).astype(np.float32))
    ct.SetSpacing([0.8, 1.1, 2.5])
    ct.SetOrigin([-16.0, -16.0, -25.0])
    ct.SetDirection([0, 1, 0, 1, 0, 0, 0, 0, 1])
    grid = sitk.Image([12, 12, 10], sitk.sitkFloat32)
    grid.SetSpacing([3.0, 3.0, 4.0])
    grid.SetOrigin([-16.0, -16.0, -20.0])
    hu = sitk.Clamp(ct, sitk.sitkFloat32, lowerBound=-1000.0, upperBound=1e30)
    variance = [max(0.0, g**2 - c**2) / 2.3548**2 for g, c in zip(grid.GetSpacing(), ct.GetSpacing())]
    smooth = sitk.DiscreteGaussian(hu, variance=variance, maximumKernelWidth=64, useImageSpacing=True)
    on_grid = sitk.Resample(smooth, grid, sitk.Transform(), sitk.sitkLinear, -1000.0, sitk.sitkFloat32)
    expected = hu_to_mu(sitk.GetArrayFromImage(on_grid), 208.4, 120.0)
    mu = sitk.GetArrayFromImage(mu_map_on_grid(ct, 120.0, grid, 208.4))
    assert np.count_nonzero(expected) > 0.5 * expected.size
    assert np.allclose(mu, expected, rtol=1e-6, atol=1e-9)


def _gdcm_series(folder):
    """The folder's CT as SimpleITK's GDCM series reader gives it (an independent reader: its own
    DICOM parser, slice ordering and geometry)."""
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return sitk.Cast(reader.Execute(), sitk.sitkFloat32)


@pytest.mark.parametrize("which", ["sample", "ge_d670_ct"])
def test_ct_reader_gives_gdcms_volume(which, request, monkeypatch):
    """The one-pass CT reader (pydicom; the sample is RLE-compressed, the real GE CT uncompressed,
    head first with GE's negative SpacingBetweenSlices) and its fallback to SimpleITK for pixel
    data that pydicom cannot decode (tried on the sample) give GDCM's voxels and geometry exactly."""
    import recon.io.ct as ct_module

    folder = request.getfixturevalue(which)
    folder = folder / "ct" if which == "sample" else folder
    reference = _gdcm_series(folder)
    ct, _, uids = read_ct_series(folder)
    images = [ct]
    if which == "sample":
        def no_decoder(ds):
            raise NotImplementedError("no pixel data handler")

        monkeypatch.setattr(ct_module, "_hu", no_decoder)
        images.append(read_ct_series(folder)[0])
    for image in images:
        assert image.GetSize() == reference.GetSize() and len(uids) == reference.GetSize()[2]
        assert image.GetOrigin() == pytest.approx(reference.GetOrigin(), abs=1e-6)
        assert image.GetSpacing() == pytest.approx(reference.GetSpacing(), abs=1e-9)
        assert image.GetDirection() == pytest.approx(reference.GetDirection(), abs=1e-9)
        assert np.array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(reference))

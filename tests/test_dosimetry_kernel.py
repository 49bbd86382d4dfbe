"""Lu-177 voxel S-value kernel against the local-deposition limit and a published table; voxel
dose-rate maps, voxel-wise time integration and DVHs against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from quant.dosimetry import kernel as K
from quant.dosimetry import tac

# Lanconelli et al. 2012 (Phys Med Biol 57:517), Lu-177, soft tissue (1.04 g/mL), mGy/(MBq·s), the
# 3×3×3 neighbourhood by symmetry class (number of voxels 1, 6, 12, 8):
# MGHPhysicsResearch/MIRDCalculation MIRD/VoxelSValues/177Lu4.8mmsoft.txt and 177Lu4mmsoft.txt
LANCONELLI = {4.8: {(0, 0, 0): 0.178, (1, 0, 0): 2.46e-3, (1, 1, 0): 8.65e-5, (1, 1, 1): 2.35e-5},
              4.0: {(0, 0, 0): 0.302, (1, 0, 0): 4.98e-3, (1, 1, 0): 1.78e-4, (1, 1, 1): 3.58e-5}}
CLASS_COUNT = {(0, 0, 0): 1, (1, 0, 0): 6, (1, 1, 0): 12, (1, 1, 1): 8}
# PyTheranostics 0.1 (PyPI wheel), doodle/kernels/DK_softtissueICRP_mGyperMBqs.img (51³ float32,
# mGy/(MBq·s)); voxel 4.7952 mm (its .dcm twin's PixelSpacing), soft tissue of 1.00 g/mL (its
# dvk.py): S000, the 3×3×3 neighbourhood's sum, the whole kernel's sum (photons included)
PYTHERANOSTICS = {"voxel_mm": 4.7952, "density_g_per_mL": 1.00, "s000": 0.2066, "sum_3x3x3": 0.2211, "sum": 0.2400}


def _neighbourhood_sum(s: dict) -> float:
    return sum(CLASS_COUNT[key] * value for key, value in s.items())


@pytest.fixture(scope="module")
def kernel48() -> K.VoxelKernel:
    return K.voxel_s_values((4.8, 4.8, 4.8))


def test_local_deposition_limit_value():
    """1 MBq·s in a 4.8 mm water voxel (0.1106 g): 0.14792 MeV × 10⁶ decays → 0.2143 mGy (NOTES, ICRP-107)."""
    assert K.electron_energy_per_decay_MeV() == pytest.approx(0.14792, abs=1e-5)
    assert K.local_deposition_s_value((4.8, 4.8, 4.8), 1.0) == pytest.approx(0.214, rel=0.003)


def test_kernel_conserves_energy_and_tends_to_local_deposition(kernel48):
    # the kernel deposits all electron energy (its extent holds the largest β range): sum within 2 % of 1
    assert kernel48.absorbed_fraction == pytest.approx(1.0, abs=0.02)
    # large voxels: the β range (< 2 mm) is negligible, S000 → local deposition within 1 %
    big = K.voxel_s_values((40.0, 40.0, 40.0), density_g_per_mL=1.0, samples=200_000)
    assert big.s000 == pytest.approx(K.local_deposition_s_value((40.0,) * 3, 1.0), rel=0.01)
    # small voxels lose more energy to neighbours (monotonic)
    small = K.voxel_s_values((2.0, 2.0, 2.0), samples=200_000)
    assert small.s000 / K.local_deposition_s_value((2.0,) * 3, K.SOFT_TISSUE_DENSITY) < kernel48.s000 / K.local_deposition_s_value((4.8,) * 3, K.SOFT_TISSUE_DENSITY) < 0.99


def test_kernel_against_published_s000(kernel48):
    """Lanconelli 2012, 4.8 and 4 mm soft tissue. Both tables deposit only 94 % of the ICRP-107
    electron energy per decay (0.1479 MeV) within the 3×3×3 neighbourhood of the source voxel,
    which holds every Lu-177 electron (range < 2 mm) — at every voxel size of the database
    (2.21–9.28 mm: 0.937–0.946), while the same database's Y-90 and Sr-89 soft-tissue tables hold
    100 % (0.996–1.003) with the same 1.04 g/mL: the gap is the Lu-177 emission data the table was
    made with (≈ 0.139 MeV of electrons per decay), not transport, voxel averaging or density.
    What the transport decides — the share of the neighbourhood's energy that stays in the source
    voxel — agrees within 2 % (0.930 here, 0.918 in the table; 0.916 vs 0.903 at 4 mm); scaled
    to ICRP-107's electron energy the table's S000 is 0.1891 (4.8 mm), within 5 % of ours. The
    absolute S000 is therefore 7.6 % above the table (bounded at 10 %)."""
    electron_J = K.electron_energy_per_decay_MeV() * K.MEV_TO_J
    for size, table in LANCONELLI.items():
        kernel = kernel48 if size == 4.8 else K.voxel_s_values((size,) * 3, samples=1_000_000)
        mass_kg = (size * 0.1) ** 3 * K.SOFT_TISSUE_DENSITY * 1e-3
        table_energy = _neighbourhood_sum(table) * 1e-3 * 1e-6 * mass_kg  # J per decay
        assert table_energy / electron_J == pytest.approx(0.94, abs=0.01)
        scaled_s000 = table[(0, 0, 0)] * electron_J / table_energy
        assert kernel.s000 == pytest.approx(scaled_s000, rel=0.05)
        assert kernel.s000 / kernel.values.sum() == pytest.approx(table[(0, 0, 0)] / _neighbourhood_sum(table), rel=0.02)
    assert kernel48.s000 == pytest.approx(K.PUBLISHED_S000["lanconelli2012"][4.8], rel=0.10)
    # the face neighbour holds the escaping energy, of the table's order (photons excluded here)
    assert kernel48.values[1, 1, 2] == pytest.approx(LANCONELLI[4.8][(1, 0, 0)], rel=0.15)
    for size in (4.42, 3.9):
        assert K.voxel_s_values((size,) * 3, samples=500_000).s000 == pytest.approx(K.PUBLISHED_S000["lanconelli2012"][size], rel=0.10)


def test_kernel_against_pytheranostics_at_its_voxel_and_density():
    """PyTheranostics' 0.2066 is for 4.7952 mm voxels of 1.00 g/mL (not 4.8 mm of 1.04 g/mL, where
    ours is 7.3 % below it): there ours is within 5 % (−3.6 %); the source voxel keeps the same
    share of the 3×3×3 neighbourhood's energy within 2 % (transport), and that neighbourhood holds
    2.9 % more energy in their table than the ICRP-107 electrons' local deposition (emission data;
    photons add ≤ 0.5 % there)."""
    voxel, density = (PYTHERANOSTICS["voxel_mm"],) * 3, PYTHERANOSTICS["density_g_per_mL"]
    ours = K.voxel_s_values(voxel, density, samples=1_000_000)
    centre = tuple(n // 2 for n in ours.values.shape)
    near = ours.values[tuple(slice(c - 1, c + 2) for c in centre)].sum()
    assert ours.s000 == pytest.approx(PYTHERANOSTICS["s000"], rel=0.05)
    assert ours.s000 / near == pytest.approx(PYTHERANOSTICS["s000"] / PYTHERANOSTICS["sum_3x3x3"], rel=0.02)
    assert PYTHERANOSTICS["sum_3x3x3"] / K.local_deposition_s_value(voxel, density) == pytest.approx(1.029, abs=0.005)


def test_source_voxel_share_against_straight_track_transport(kernel48):
    """The share of the electron energy kept by a 4.8 mm soft-tissue source voxel against an
    independent transport model (tests/dosimetry_dose_truth.py: ICRP-107 branches with allowed
    spectrum shapes, straight tracks, Katz–Penfold range–energy relation), within 3 %."""
    import dosimetry_dose_truth as mc

    rng = np.random.default_rng(3)
    side = 4.8 * K.SOFT_TISSUE_DENSITY   # water-equivalent mm
    start = (rng.random((200_000, 3)) - 0.5) * side
    kept = mc.electron_energy_in_region_MeV(start, lambda q: np.all(np.abs(q) < side / 2, axis=1), rng) / K.electron_energy_per_decay_MeV()
    assert kernel48.s000 / K.local_deposition_s_value((4.8,) * 3, K.SOFT_TISSUE_DENSITY) == pytest.approx(kept, rel=0.03)


def _image(array: np.ndarray, spacing: float) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing((spacing,) * 3)
    image.SetOrigin((-10.0, 5.0, 3.0))
    return image


def test_dose_rate_map_energy_and_density(kernel48):
    conc = np.zeros((20, 20, 20))
    conc[5:15, 5:15, 5:15] = 1e6  # Bq/mL
    image = _image(conc, 4.8)
    rate = K.dose_rate_map(image, kernel48)
    voxel_mL = 4.8**3 * 1e-3
    activity_MBq = conc.sum() * voxel_mL * 1e-6
    mass_kg = voxel_mL * K.SOFT_TISSUE_DENSITY * 1e-3
    # energy conservation: Σ dose rate × mass = activity × electron energy per decay
    deposited = sitk.GetArrayViewFromImage(rate).sum() * 1e-3 * mass_kg  # J/s
    assert deposited == pytest.approx(activity_MBq * 1e6 * K.electron_energy_per_decay_MeV() * K.MEV_TO_J, rel=1e-3)
    # deep inside a uniform region, kernel and local deposition agree
    local = K.dose_rate_map(image, method="local")
    centre = (10, 10, 10)
    assert sitk.GetArrayViewFromImage(rate)[centre] == pytest.approx(sitk.GetArrayViewFromImage(local)[centre], rel=1e-3)
    # twice the density: half the dose rate
    density = _image(np.full(conc.shape, 2 * K.SOFT_TISSUE_DENSITY), 4.8)
    dense = K.dose_rate_map(image, kernel48, density=density)
    assert sitk.GetArrayViewFromImage(dense)[centre] == pytest.approx(sitk.GetArrayViewFromImage(rate)[centre] / 2, rel=1e-5)
    assert rate.GetOrigin() == image.GetOrigin()
    with pytest.raises(ValueError, match="differs"):
        K.dose_rate_map(_image(conc, 4.0), kernel48)


def test_density_from_hu():
    ct = _image(np.array([[[-1000.0, 0.0, 750.0, 1500.0]]]), 1.0)
    assert sitk.GetArrayFromImage(K.density_from_hu(ct)).ravel() == pytest.approx([0.0012, 1.0, 1.425, 1.85], rel=1e-5)


def test_voxel_time_integration():
    lp = tac.physical_decay_per_h()
    times = np.array([4.0, 24.0, 96.0, 168.0])
    lam = lp + 0.01
    base = np.array([[[1.0, 2.0], [0.5, 3.0]]]) * 1e-3  # mGy/s at t = 0
    rates = [_image(base * math.exp(-lam * t), 4.8) for t in times]
    mono = sitk.GetArrayFromImage(K.integrate_dose_rates(times, rates, lp, tail="mono"))
    physical = sitk.GetArrayFromImage(K.integrate_dose_rates(times, rates, lp, tail="physical"))
    for index in np.ndindex(base.shape):
        activity = base[index] * 3600.0 * np.exp(-lam * times)  # mGy/h
        expected = tac.trapezoid(times, activity, start="zero").tia_MBq_h * 1e-3  # same rule, physical tail
        assert physical[index] == pytest.approx(expected, rel=1e-5)
        tail_difference = activity[-1] / lam - activity[-1] / lp
        assert mono[index] == pytest.approx(expected + tail_difference * 1e-3, rel=1e-5)
    with pytest.raises(ValueError, match="increasing"):
        K.integrate_dose_rates(times[::-1], rates, lp)


def test_dvh():
    values = np.arange(1, 101, dtype=float).reshape(1, 10, 10)  # 1..100 Gy
    dose = _image(values, 2.0)
    mask = _image(np.ones(values.shape), 2.0)
    h = K.dvh(dose, mask, "organ")
    assert h.mean_Gy == pytest.approx(50.5)
    assert (h.d98_Gy, h.d50_Gy, h.d2_Gy) == (3.0, 51.0, 99.0)
    assert h.volume_fraction[0] == 1.0 and h.volume_fraction[-1] == 0.0
    assert h.volume_mL == pytest.approx(100 * 8e-3)

"""CT-to-CT registration (quant/registration.py) on synthetic CT pairs related by known rigid
transforms: target registration error at several points, quality figures, transfer of an
emission image onto the fixed grid, the optional B-spline refinement."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import SimpleITK as sitk

from quant import registration as reg

SPACING = 4.0
SIZE = 64


def _ct_values(points: np.ndarray) -> np.ndarray:
    """HU of an asymmetric synthetic torso at physical points [..., 3] (mm, LPS)."""
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    hu = np.full(x.shape, -1000.0)
    body = (x / 105.0) ** 2 + (y / 80.0) ** 2 + (z / 115.0) ** 2 <= 1.0
    hu[body] = 20.0
    for cx in (-45.0, 50.0):  # lungs, the left one smaller
        lung = ((x - cx) / (38.0 if cx < 0 else 30.0)) ** 2 + ((y + 5.0) / 45.0) ** 2 + ((z - 25.0) / 65.0) ** 2 <= 1.0
        hu[lung & body] = -780.0
    liver = ((x + 40.0) / 45.0) ** 2 + ((y - 5.0) / 40.0) ** 2 + ((z + 60.0) / 35.0) ** 2 <= 1.0
    hu[liver & body] = 65.0
    spine = ((x - 3.0) / 14.0) ** 2 + ((y - 52.0) / 14.0) ** 2 <= 1.0
    hu[spine & (np.abs(z) < 105.0)] = 700.0
    sternum = (np.abs(x - 5.0) < 8.0) & (np.abs(y + 70.0) < 5.0) & (z > -10.0) & (z < 80.0)
    hu[sternum] = 500.0
    for k, zc in enumerate(np.arange(-60.0, 90.0, 30.0)):  # ribs as tilted rings, right side only
        ring = np.abs(np.sqrt(((x + 10.0) / 95.0) ** 2 + (y / 72.0) ** 2) - 1.0) < 0.06
        hu[ring & (np.abs(z - zc - 0.15 * y) < 5.0) & (x < 40.0 + 10.0 * k)] = 600.0
    return hu


def _grid(size: int, spacing: float, origin_shift: float = 0.0) -> sitk.Image:
    image = sitk.Image([size] * 3, sitk.sitkFloat32)
    image.SetSpacing([spacing] * 3)
    image.SetOrigin([-(size - 1) * spacing / 2.0 + origin_shift] * 3)
    return image


def _points(image: sitk.Image) -> np.ndarray:
    size = image.GetSize()
    index = np.stack(np.meshgrid(*(np.arange(n) for n in size), indexing="ij"), axis=-1).reshape(-1, 3).astype(float)
    pts = np.asarray(image.GetOrigin()) + index * np.asarray(image.GetSpacing())  # identity direction
    return pts.reshape(*size, 3).transpose(2, 1, 0, 3)


def _image_of(values: np.ndarray, grid: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(values.astype(np.float32))
    image.CopyInformation(grid)
    return image


def _true_transform(angles_deg=(4.0, -3.0, 6.0), translation=(7.0, -9.0, 5.0)) -> sitk.Euler3DTransform:
    """Fixed point → moving point (the convention of the module)."""
    t = sitk.Euler3DTransform()
    t.SetCenter((5.0, 0.0, -5.0))
    t.SetRotation(*(math.radians(a) for a in angles_deg))
    t.SetTranslation(translation)
    return t


def _inverse_points(truth: sitk.Euler3DTransform, points: np.ndarray) -> np.ndarray:
    """truth⁻¹ applied to points [..., 3]: x = Rᵀ(y − c − t) + c."""
    r = np.asarray(truth.GetMatrix()).reshape(3, 3)
    c, t = np.asarray(truth.GetCenter()), np.asarray(truth.GetTranslation())
    return (points - c - t) @ r + c


def _sampled(grid: sitk.Image, mapping=None, sub: int = 2) -> np.ndarray:
    """Voxel averages of the synthetic CT over ``sub``³ sub-samples (partial volume, as a
    scanner integrates over a voxel); ``mapping`` takes grid points to body points."""
    pts = _points(grid)
    offsets = (np.arange(sub) + 0.5) / sub - 0.5
    total = np.zeros(pts.shape[:3])
    for dz in offsets:
        for dy in offsets:
            for dx in offsets:
                p = pts + np.array([dx, dy, dz]) * np.asarray(grid.GetSpacing())
                total += _ct_values(p if mapping is None else mapping(p))
    return total / sub**3


def _pair(truth: sitk.Euler3DTransform, noise: float = 10.0, seed: int = 3) -> tuple[sitk.Image, sitk.Image]:
    """Fixed CT on a 64³ × 4 mm grid; moving CT (60³ × 4.3 mm, shifted origin) of the same body
    moved by ``truth``: moving(y) = body at truth⁻¹(y), evaluated analytically."""
    rng = np.random.default_rng(seed)
    fixed_grid = _grid(SIZE, SPACING)
    fixed = _image_of(_sampled(fixed_grid) + rng.normal(0, noise, (SIZE,) * 3), fixed_grid)
    moving_grid = _grid(60, 4.3, origin_shift=6.0)
    moving = _image_of(_sampled(moving_grid, lambda p: _inverse_points(truth, p)) + rng.normal(0, noise, (60,) * 3), moving_grid)
    return fixed, moving


TRE_POINTS = [(0, 0, 0), (-80, 0, 0), (80, 0, 0), (0, -60, 0), (0, 60, 0), (0, 0, -90), (0, 0, 90),
              (-60, -40, -60), (60, 40, 60), (50, -50, 70)]


@pytest.mark.parametrize(("kind", "initialiser"), [("versor", "geometry"), ("euler", "moments")])
def test_rigid_registration_recovers_a_known_transform(kind, initialiser):
    truth = _true_transform()
    fixed, moving = _pair(truth)
    start = time.perf_counter()
    result = reg.register_ct(fixed, moving, reg.RegistrationSettings(transform=kind, initialiser=initialiser))
    elapsed = time.perf_counter() - start
    tre = reg.target_registration_error(result.transform, truth, TRE_POINTS)
    assert tre.max() < 2.0, f"TRE {np.round(tre, 2)} mm"
    assert len(result.iterations) == 3  # one entry per pyramid level
    assert result.quality.acceptable, result.quality.reason
    assert result.quality.ncc_after > result.quality.ncc_before + 0.2
    best = reg.registration_quality(fixed, moving, truth, truth, 0.0).ncc_after  # the truth's own NCC (resampling, noise)
    assert result.quality.ncc_after > best - 0.01
    assert result.quality.nmi_after > result.quality.nmi_before
    assert result.quality.final_metric < -0.3  # Mattes MI is negative, lower is better
    assert elapsed < 30.0
    summary = result.as_dict()
    assert summary["quality"]["acceptable"] is True and len(summary["rotation_deg"]) == 3


def test_rigid_parameters_are_reported_in_degrees_and_mm():
    truth = _true_transform(angles_deg=(0.0, 0.0, 5.0), translation=(10.0, 0.0, 0.0))
    fixed, moving = _pair(truth, seed=5)
    result = reg.register_ct(fixed, moving)
    assert result.rotation_deg[2] == pytest.approx(5.0, abs=0.5)
    assert abs(result.rotation_deg[0]) < 0.5 and abs(result.rotation_deg[1]) < 0.5
    tre = reg.target_registration_error(result.rigid, truth, TRE_POINTS)
    assert tre.max() < 2.0


def test_registration_is_deterministic_with_a_fixed_seed():
    truth = _true_transform()
    fixed, moving = _pair(truth)
    settings = reg.RegistrationSettings(threads=1)
    a = reg.register_ct(fixed, moving, settings)
    b = reg.register_ct(fixed, moving, settings)
    assert a.transform.GetParameters() == pytest.approx(b.transform.GetParameters(), abs=1e-6)  # mm and radians: floating-point order in ITK filters varies at 1e-9


def test_emission_follows_the_moving_ct_onto_the_fixed_grid():
    """A hot sphere at moving point T(p) lands at fixed point p after resampling."""
    truth = _true_transform()
    fixed, moving = _pair(truth)
    result = reg.register_ct(fixed, moving)
    p = np.array([-30.0, 10.0, 20.0])
    q = np.array(truth.TransformPoint(tuple(p)))
    spect = _image_of(np.where(np.linalg.norm(_points(moving) - q, axis=-1) <= 15.0, 1e5, 0.0), moving)
    on_fixed = reg.resample_emission(spect, fixed, result.transform)
    values = sitk.GetArrayFromImage(on_fixed).astype(float)
    centroid = (_points(fixed) * values[..., None]).sum(axis=(0, 1, 2)) / values.sum()
    assert np.linalg.norm(centroid - p) < 2.0
    assert values.max() == pytest.approx(1e5, rel=0.05)  # concentrations are interpolated, not summed
    # without the transform it would be far off
    naive = sitk.GetArrayFromImage(reg.resample_emission(spect, fixed)).astype(float)
    naive_centroid = (_points(fixed) * naive[..., None]).sum(axis=(0, 1, 2)) / naive.sum()
    assert np.linalg.norm(naive_centroid - p) > 8.0
    mask = reg.resample_mask(sitk.Cast(spect > 0, sitk.sitkUInt8), fixed, result.transform)
    assert mask.GetPixelID() == sitk.sitkUInt8 and set(np.unique(sitk.GetArrayViewFromImage(mask))) == {0, 1}


def test_bspline_refinement_recovers_a_smooth_deformation():
    """Rigid motion plus a smooth local bulge of 8 mm: the B-spline stage brings the residual
    error at the bulge from > 5 mm (rigid alone) below 3.5 mm and raises the NCC."""
    truth = _true_transform(angles_deg=(2.0, 0.0, -3.0), translation=(4.0, 3.0, -2.0))
    bulge = np.array([-40.0, 0.0, -40.0])

    def deformed(y: np.ndarray) -> np.ndarray:  # moving(y) = body at truth⁻¹(y) − bump(y)
        bump = 8.0 * np.exp(-np.sum((y - bulge) ** 2, axis=-1) / (2 * 40.0**2))
        back = _inverse_points(truth, y)
        back[..., 0] -= bump
        return back

    def residual(transform: sitk.Transform, points) -> np.ndarray:  # |body point reached − fixed point|
        return np.array([np.linalg.norm(deformed(np.array(transform.TransformPoint(tuple(map(float, p))))) - p) for p in points])

    grid = _grid(48, 5.0)
    fixed = _image_of(_sampled(grid), grid)
    moving = _image_of(_sampled(grid, deformed), grid)
    near_bulge = [bulge, bulge + [20.0, 0.0, 0.0], bulge + [0.0, 20.0, 0.0]]
    rigid_only = reg.register_ct(fixed, moving)
    settings = reg.RegistrationSettings(bspline=True, bspline_grid_mm=80.0, bspline_iterations=30)
    refined = reg.register_ct(fixed, moving, settings)
    assert refined.bspline and isinstance(refined.transform, sitk.CompositeTransform)
    assert residual(rigid_only.transform, near_bulge).max() > 5.0
    assert residual(refined.transform, near_bulge).max() < 3.5
    assert residual(refined.transform, [(40.0, 0.0, 40.0), (0.0, 0.0, 0.0)]).max() < 2.0
    assert refined.quality.ncc_after > rigid_only.quality.ncc_after + 0.01
    assert refined.quality.acceptable
    assert len(refined.iterations) == 4  # three rigid levels, then the B-spline stage


def test_failed_registration_is_flagged():
    fixed, moving = _pair(_true_transform())
    far = sitk.TranslationTransform(3, (200.0, 0.0, 0.0))
    quality = reg.registration_quality(fixed, moving, far, far, 0.0)
    assert not quality.acceptable


def test_settings_come_from_configuration():
    settings = reg.RegistrationSettings.from_dict({"transform": "euler", "shrink_factors": [2, 1], "smoothing_sigmas_mm": [2, 0]})
    assert settings.shrink_factors == (2, 1) and settings.transform == "euler"
    with pytest.raises(ValueError):
        reg.RegistrationSettings.from_dict({"nonsense": 1})
    with pytest.raises(ValueError):
        reg.RegistrationSettings(shrink_factors=(4, 2, 1), smoothing_sigmas_mm=(1.0,))


def test_similarity_measures():
    rng = np.random.default_rng(0)
    a = rng.normal(size=5000)
    assert reg.normalised_cross_correlation(a, 3 * a + 2) == pytest.approx(1.0)
    assert reg.normalised_mutual_information(a, a) == pytest.approx(2.0)
    assert reg.normalised_mutual_information(a, rng.normal(size=5000)) < 1.1

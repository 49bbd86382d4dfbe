"""Lesion VOIs and uptake figures (quant/voi.py) on synthetic SUV images with known spheres:
analytic volumes, SUVmax/mean/peak, total lesion uptake, ratios, 41 % and PERCIST VOIs."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset

from quant import synthetic as syn
from quant import voi
from recon.errors import InputError

SPACING = 2.5
SIZE = (80, 80, 80)  # 200 mm cube, voxel centres at odd multiples of 1.25 mm


def _sphere_volume(d: float) -> float:
    return math.pi * d**3 / 6.0 / 1000.0


A = syn.SphereLesion((11.25, -43.75, 8.75), 30.0, 25.0, site="lymph_node")
B = syn.SphereLesion((-41.25, -51.25, 51.25), 20.0, 15.0)
C = syn.SphereLesion((41.25, -51.25, -68.75), 14.0, 8.0)
D = syn.SphereLesion((41.25, -43.75, 46.25), 24.0, 12.0, hot_voxel_suv=60.0)


@pytest.fixture(scope="module")
def scene() -> syn.Scene:
    return syn.psma_scene([A, B, C, D], size=SIZE, spacing=(SPACING,) * 3)


@pytest.fixture(scope="module")
def references(scene) -> dict[str, voi.RegionStats]:
    return voi.reference_stats(scene.suv, scene.masks)


def _exclude(scene) -> sitk.Image:
    return voi.union_mask(list(scene.masks.values()), scene.suv)


def test_reference_regions(scene, references):
    assert set(references) == {"liver", "parotid", "blood_pool", "spleen"}
    liver = references["liver"]
    assert liver.suv_mean == pytest.approx(5.0, abs=0.02)  # checkerboard 4/6
    assert liver.suv_sd == pytest.approx(1.0, abs=0.01)
    assert references["parotid"].suv_mean == pytest.approx(12.0)
    assert references["parotid"].suv_sd == pytest.approx(0.0, abs=1e-6)
    assert references["blood_pool"].suv_mean == pytest.approx(1.8)
    assert references["spleen"].volume_mL == pytest.approx(_sphere_volume(28.0), rel=0.05)
    assert voi.percist_threshold(liver) == pytest.approx(1.5 * liver.suv_mean + 2 * liver.suv_sd)


def test_aliases_are_canonical():
    assert voi.canonical_name("Parotids") == "parotid"
    assert voi.canonical_name("Blood pool") == "blood_pool"
    assert voi.canonical_name("aorta") == "blood_pool"
    assert voi.canonical_name("Kidneys") == "kidneys"


def test_percist_voi_finds_lesions_above_the_liver_threshold(scene, references):
    seg = voi.segment_lesions(scene.suv, voi.VoiSettings(method="percist"), references["liver"], exclude=_exclude(scene))
    assert seg.threshold == pytest.approx(9.5, abs=0.05)
    lesions = voi.measure_lesions(scene.suv, seg.labels, references)
    # C (SUV 8) is below 9.5; the parotids (12) are excluded; order by decreasing SUVmax: D (hot voxel 60), A, B
    assert [round(lesion.suv_max) for lesion in lesions] == [60, 25, 15]
    d, a, b = lesions
    assert a.volume_mL == pytest.approx(_sphere_volume(30.0), rel=0.04)
    assert b.volume_mL == pytest.approx(_sphere_volume(20.0), rel=0.06)
    assert a.suv_mean == pytest.approx(25.0) and a.suv_peak == pytest.approx(25.0, rel=1e-5)
    assert a.tlu == pytest.approx(a.suv_mean * a.volume_mL)
    assert a.lesion_to_liver == pytest.approx(25.0 / references["liver"].suv_mean)
    assert a.lesion_to_parotid == pytest.approx(25.0 / 12.0)
    assert np.allclose(a.centroid_mm, A.centre_mm, atol=0.5)
    assert a.long_axis_mm == pytest.approx(30.0, abs=SPACING)
    assert a.short_axis_mm == pytest.approx(30.0, abs=SPACING)
    # SUVpeak of D: uniform 12 plus one 60 voxel that weighs voxel volume / 1 mL in the 1 mL sphere
    w = SPACING**3 / 1000.0
    assert d.suv_peak == pytest.approx(12.0 + 48.0 * w, abs=0.01)
    assert d.suv_max == pytest.approx(60.0)
    burden = voi.tumour_burden(lesions)
    assert burden.lesions == 3
    assert burden.volume_mL == pytest.approx(sum(lesion.volume_mL for lesion in lesions))
    assert burden.total_lesion_uptake == pytest.approx(sum(lesion.suv_mean * lesion.volume_mL for lesion in lesions))
    assert burden.suv_max == pytest.approx(60.0)


def test_fixed_threshold_voi(scene, references):
    seg = voi.segment_lesions(scene.suv, voi.VoiSettings(method="fixed", fixed_threshold=3.0), exclude=_exclude(scene))
    lesions = voi.measure_lesions(scene.suv, seg.labels, references)
    assert len(lesions) == 4
    c = lesions[-1]
    assert c.suv_max == pytest.approx(8.0)
    # a 14 mm sphere centred on a voxel holds the lattice points within 2.8 voxels: 81 of them
    lattice = np.indices((7, 7, 7)).reshape(3, -1).T - 3
    assert c.voxels == int((np.linalg.norm(lattice, axis=1) * SPACING <= 7.0).sum()) == 81
    assert c.volume_mL == pytest.approx(81 * SPACING**3 / 1000.0)
    assert c.volume_mL == pytest.approx(_sphere_volume(14.0), rel=0.15)
    # without the exclusion, the parotids (12) and liver (4-6) and spleen (4) become "lesions" too
    everything = voi.segment_lesions(scene.suv, voi.VoiSettings(method="fixed", fixed_threshold=3.0))
    assert int(sitk.GetArrayViewFromImage(everything.labels).max()) == 4 + 2 + 1 + 1


def test_percist_needs_a_liver(scene):
    with pytest.raises(InputError, match="liver"):
        voi.segment_lesions(scene.suv, voi.VoiSettings(method="percist"))


def test_min_volume_drops_small_components(scene):
    seg = voi.segment_lesions(scene.suv, voi.VoiSettings(method="fixed", fixed_threshold=3.0, min_volume_mL=3.0), exclude=_exclude(scene))
    lesions = voi.measure_lesions(scene.suv, seg.labels)
    assert all(lesion.volume_mL >= 3.0 for lesion in lesions) and len(lesions) == 3  # C (1.4 mL) dropped


# --------------------------------------------------------------------------- blurred spheres: 41 % and SUVpeak


BLUR = 3.0
E = syn.SphereLesion((11.25, -43.75, 8.75), 30.0, 20.0, sigma_mm=BLUR)


@pytest.fixture(scope="module")
def blurred() -> syn.Scene:
    return syn.psma_scene([E], size=SIZE, spacing=(SPACING,) * 3, background=0.5)


def test_41_percent_voi_of_a_blurred_sphere(blurred):
    settings = voi.VoiSettings(method="percent_max", seed_threshold=3.0)
    seg = voi.segment_lesions(blurred.suv, settings, exclude=voi.union_mask(list(blurred.masks.values()), blurred.suv))
    lesions = voi.measure_lesions(blurred.suv, seg.labels, settings=settings)
    assert len(lesions) == 1
    lesion = lesions[0]
    centre_value = 0.5 + 20.0 * float(syn.blurred_sphere_profile(np.array([0.0]), 15.0, BLUR)[0])
    assert lesion.suv_max == pytest.approx(centre_value, rel=1e-5)  # the centre is a voxel centre
    r41 = syn.radius_at_fraction(15.0, BLUR, 0.41, background=0.5, contrast=20.0)
    assert lesion.volume_mL == pytest.approx(4.0 / 3.0 * math.pi * r41**3 / 1000.0, rel=0.04)
    assert seg.lesion_thresholds[1] == pytest.approx(0.41 * centre_value)
    expected_mean = 0.5 + 20.0 * syn.sphere_mean(15.0, BLUR, r41)
    assert lesion.suv_mean == pytest.approx(expected_mean, rel=0.02)
    peak_radius = (3000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)
    assert lesion.suv_peak == pytest.approx(0.5 + 20.0 * syn.sphere_mean(15.0, BLUR, peak_radius), rel=0.005)
    assert lesion.suv_peak < lesion.suv_max
    assert np.allclose(lesion.peak_centre_mm, E.centre_mm, atol=SPACING)


def test_41_percent_separates_neighbouring_lesions():
    """Two blurred spheres whose tails touch above the seed threshold: one component, two lesions."""
    hot = syn.SphereLesion((1.25, -1.25, 1.25), 16.0, 20.0, sigma_mm=BLUR)
    warm = syn.SphereLesion((1.25, 21.25, 1.25), 16.0, 10.0, sigma_mm=BLUR)
    scene = syn.psma_scene([hot, warm], size=SIZE, spacing=(SPACING,) * 3, background=0.5)
    exclude = voi.union_mask(list(scene.masks.values()), scene.suv)
    merged = voi.segment_lesions(scene.suv, voi.VoiSettings(method="fixed", fixed_threshold=2.0), exclude=exclude)
    assert int(sitk.GetArrayViewFromImage(merged.labels).max()) == 1
    settings = voi.VoiSettings(method="percent_max", seed_threshold=2.0)
    seg = voi.segment_lesions(scene.suv, settings, exclude=exclude)
    lesions = voi.measure_lesions(scene.suv, seg.labels, settings=settings)
    assert len(lesions) == 2
    assert np.allclose(lesions[0].centroid_mm, hot.centre_mm, atol=1.5)
    assert np.allclose(lesions[1].centroid_mm, warm.centre_mm, atol=1.5)
    for lesion, source in zip(lesions, (hot, warm)):
        r41 = syn.radius_at_fraction(8.0, BLUR, 0.41, background=0.5, contrast=source.suv)
        assert lesion.volume_mL == pytest.approx(4.0 / 3.0 * math.pi * r41**3 / 1000.0, rel=0.12)
    # without splitting, the cooler lesion is lost in the hotter one's candidate
    unsplit = voi.segment_lesions(scene.suv, voi.VoiSettings(method="percent_max", seed_threshold=2.0, split_level=None), exclude=exclude)
    assert int(sitk.GetArrayViewFromImage(unsplit.labels).max()) == 1


def test_peak_kernel_holds_one_millilitre():
    for spacing in [(2.0, 2.0, 2.0), (4.0, 4.0, 5.0), (2.7, 2.7, 3.3)]:
        kernel = voi.peak_kernel(spacing)
        assert kernel.sum() == pytest.approx(1.0)
        centre = tuple(k // 2 for k in kernel.shape)
        # a voxel fully inside weighs its volume over 1 mL (within the sub-sampling of the rim)
        assert kernel[centre] == pytest.approx(np.prod(spacing) / 1000.0, rel=0.03)


def test_short_and_long_axes_of_an_ellipsoid():
    ref = syn.grid((60, 60, 40), (1.5, 1.5, 1.5))
    pts = syn.points_mm(ref)
    values = (((pts[..., 0] / 20.0) ** 2 + (pts[..., 1] / 8.0) ** 2 + (pts[..., 2] / 10.0) ** 2) <= 1.0).astype(np.float32) * 10.0
    suv = syn.image_like(values, ref)
    seg = voi.segment_lesions(suv, voi.VoiSettings(method="fixed", fixed_threshold=5.0))
    (lesion,) = voi.measure_lesions(suv, seg.labels)
    assert lesion.long_axis_mm == pytest.approx(40.0, abs=1.5)
    assert lesion.short_axis_mm == pytest.approx(16.0, abs=1.5)
    assert lesion.volume_mL == pytest.approx(4.0 / 3.0 * math.pi * 20 * 8 * 10 / 1000.0, rel=0.04)


def test_sites_are_attached(scene, references):
    seg = voi.segment_lesions(scene.suv, voi.VoiSettings(method="percist"), references["liver"], exclude=_exclude(scene))
    lesions = voi.measure_lesions(scene.suv, seg.labels, references, sites={2: {"site": "lymph_node", "short_axis_mm": 31.0}})
    assert lesions[1].site == "lymph_node" and lesions[1].site_short_axis_mm == 31.0
    assert lesions[0].site == "unknown" and lesions[0].site_short_axis_mm is None
    row = lesions[1].as_dict()
    assert row["lesion_to_liver"] == pytest.approx(lesions[1].ratios["liver"])


def test_masks_from_nifti_files(tmp_path, scene):
    series = SimpleNamespace(image=scene.suv, first=Dataset(), files=(tmp_path / "x.dcm",))
    series.first.FrameOfReferenceUID = "1.2.3"
    paths = {}
    for name, mask in scene.masks.items():
        paths[name] = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(mask, str(paths[name]))
    masks = voi.load_masks(paths, series)
    for name in scene.masks:
        assert np.array_equal(sitk.GetArrayViewFromImage(masks[name]), sitk.GetArrayViewFromImage(scene.masks[name]))
    shifted = sitk.Image(scene.masks["liver"])
    shifted.SetOrigin(tuple(o + 5.0 for o in shifted.GetOrigin()))
    sitk.WriteImage(shifted, str(tmp_path / "shifted.nii.gz"))
    with pytest.raises(InputError, match="another grid"):
        voi.load_masks({"liver": tmp_path / "shifted.nii.gz"}, series)
    empty = sitk.Image(scene.masks["liver"]) * 0
    sitk.WriteImage(empty, str(tmp_path / "empty.nii.gz"))
    with pytest.raises(InputError, match="empty"):
        voi.load_masks({"liver": tmp_path / "empty.nii.gz"}, series)
    with pytest.raises(InputError, match="no such file"):
        voi.load_masks({"liver": tmp_path / "missing.nii.gz"}, series)


def test_settings_from_configuration():
    settings = voi.VoiSettings.from_dict({"method": "percent_max", "percent_of_max": 0.5})
    assert settings.percent_of_max == 0.5
    with pytest.raises(ValueError):
        voi.VoiSettings.from_dict({"method": "magic"})
    with pytest.raises(ValueError):
        voi.VoiSettings.from_dict({"unknown_key": 1})


def test_cli_method_choices_match_the_module():
    from quant import cli

    assert cli.METHODS == voi.METHODS


def _partial_volume_ellipsoid(ref: sitk.Image, centre_mm, diameters_mm, subsamples: int = 8) -> np.ndarray:
    """Fraction of each voxel inside an axis-aligned ellipsoid (diameters along x, y, z in mm)."""
    points = syn.points_mm(ref) - np.asarray(centre_mm)
    spacing = np.asarray(ref.GetSpacing())
    offsets = (np.arange(subsamples) + 0.5) / subsamples - 0.5
    inside = np.zeros(points.shape[:3])
    for shift in np.stack(np.meshgrid(offsets, offsets, offsets, indexing="ij"), axis=-1).reshape(-1, 3):
        inside += (((points + shift * spacing) / (np.asarray(diameters_mm) / 2.0)) ** 2).sum(axis=-1) <= 1.0
    return inside / subsamples**3


# sub-voxel offsets (mm) of the lesion centre from a voxel centre, 4 mm voxels
OFFSETS = [(0.0, 0.0, 0.0), (2.0, 2.0, 2.0), (1.0, -1.5, 0.5), (-1.9, 0.7, 1.3), (0.4, 1.8, -1.1), (1.5, 0.0, -2.0)]


@pytest.mark.parametrize("diameters, short, long, tolerance", [((12.0, 12.0, 12.0), 12.0, 12.0, 0.3),
                                                              ((24.0, 12.0, 16.0), 12.0, 24.0, 0.85)])
def test_lesion_axes_are_sub_voxel(diameters, short, long, tolerance):
    """A 12 mm node (sphere; or an ellipsoid 24 × 12 × 16 mm along x, y, z) sampled at 4 mm
    voxels (each voxel holds the fraction of it inside, × SUV 10), drawn at SUV 5 (half its
    uptake), at six sub-voxel offsets: axial short axis and long axis within 0.3 mm (sphere) and
    0.85 mm (ellipsoid) of the truth. The VOI outline (voxel extent + one voxel) gave a short
    axis of 9.7 to 15.3 mm for the sphere, 11.8 to 18.3 mm for the ellipsoid."""
    ref = syn.grid((15, 15, 15), (4.0, 4.0, 4.0))
    for offset in OFFSETS:
        suv = syn.image_like(10.0 * _partial_volume_ellipsoid(ref, offset, diameters), ref)
        seg = voi.segment_lesions(suv, voi.VoiSettings(method="fixed", fixed_threshold=5.0))
        (lesion,) = voi.measure_lesions(suv, seg.labels, levels=voi.voi_levels(seg, seg.labels, {1: "auto"}))
        assert lesion.short_axis_mm == pytest.approx(short, abs=tolerance), offset
        assert lesion.long_axis_mm == pytest.approx(long, abs=tolerance), offset
        assert lesion.size_method == "sub-voxel ellipsoid of the VOI at its threshold SUV 5.00"

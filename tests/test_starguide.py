"""GE StarGuide CZT ring: reading its per-detector files and reconstructing them.

No real StarGuide file is at hand, so :func:`write_starguide_study` writes synthetic ones with
the layout PyTomography's StarGuide reader expects (one multi-frame NM TOMO file per detector
column, per-frame detector x/y [cm] in (0099,1051/1052), angle [deg] in (0099,1053), durations
[ms] in (0009,1003), pixel scale in (0011,103B); see ``recon/io/starguide.py``). The physics is
its own: exact line integrals of a uniform hot sphere through each pixel (5×5 sub-pixel rays),
in LPS, for 12 detector columns that step with the gantry and swivel, each frame with its own
duration, with decay and Poisson noise. It shares nothing with theraflow's projector.

The private encoding of the geometry follows PyTomography's interpretation (angle θ = φ − 180°,
(x, y) = −(detector centre) / 10); the test against PyTomography's own reader and its
``StarGuideSystemMatrix`` checks that theraflow reads those files as PyTomography does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from conftest import run_cli
from recon.errors import InputError
from recon.io.nm_projections import ProjectionGeometry, read_acquisition, read_nm_projections
from recon.nuclides import get_nuclide
from recon.ptomo import pytomography
from recon.spect.psf import collimator_response
from recon.spect.system import RowRange, from_projections, system_matrix

NM_STORAGE = "1.2.840.10008.5.1.4.1.1.20"
N_HEADS = 12
N_COLS = N_ROWS = 16
PIXEL_MM = 4.92                      # 2 × the StarGuide's 2.46 mm, to keep the test small
GANTRY_STEPS_DEG = (0.0, 10.0, 20.0)
SWIVELS_DEG = (-20.0, 0.0, 20.0)
HEAD_RADII_MM = (150.0, 160.0, 170.0)  # pivot radius of head h: HEAD_RADII_MM[h % 3]
Z_FIRST_ROW_MM = 120.0
SPHERE_CENTRE_MM = (25.0, -15.0, 85.0)  # LPS
SPHERE_RADIUS_MM = 15.0
ACTIVITY_MBQ = 40.0                   # in the sphere at acquisition start
SENSITIVITY_CPS_PER_MBQ = 120.0       # per detector column, photopeak window
PIXEL_SCALE = 0.5                     # stored value × this = counts
WINDOWS = (("Tc99m_EM", 126.45, 154.55), ("Tc99m_SC", 112.4, 126.45))
ACQ_START = datetime(2026, 3, 2, 10, 0, 0)
TC99M = get_nuclide("Tc-99m")


@dataclass(frozen=True)
class View:
    """One frame position of one detector column, in LPS (mm): theraflow's angle φ, the detector
    centre C (x, y), and the frame's start time and duration (s)."""

    head: int
    angle_deg: float
    centre_xy: tuple[float, float]
    start_s: float
    duration_s: float

    @property
    def normal(self) -> np.ndarray:
        a = math.radians(self.angle_deg)
        return np.array([math.sin(a), math.cos(a)])

    @property
    def lateral(self) -> np.ndarray:
        a = math.radians(self.angle_deg)
        return np.array([-math.cos(a), math.sin(a)])

    @property
    def radius_mm(self) -> float:
        return float(np.dot(self.centre_xy, self.normal))

    @property
    def offset_mm(self) -> float:
        return float(np.dot(self.centre_xy, self.lateral))


def acquisition_views() -> list[View]:
    """12 heads on a ring; the gantry steps, each head swivels about its face centre. All heads
    move together: position p (gantry step, swivel) lasts 10 + 2p seconds."""
    views, start = [], 0.0
    positions = [(g, s) for g in GANTRY_STEPS_DEG for s in SWIVELS_DEG]
    for p, (gantry, swivel) in enumerate(positions):
        duration = 10.0 + 2.0 * p
        for head in range(N_HEADS):
            ring = math.radians(30.0 * head + gantry)
            pivot = HEAD_RADII_MM[head % 3] * np.array([math.sin(ring), math.cos(ring)])
            views.append(View(head, (30.0 * head + gantry + swivel) % 360.0, tuple(pivot), start, duration))
        start += duration
    return views


def sphere_projection(view: View, sub: int = 5) -> np.ndarray:
    """Mean chord length [mm] through the sphere over each pixel's area, [row, column]."""
    centre = np.asarray(SPHERE_CENTRE_MM)
    fractions = (np.arange(sub) + 0.5) / sub - 0.5
    s = ((np.arange(N_COLS) - (N_COLS - 1) / 2)[:, None] + fractions[None, :]).ravel() * PIXEL_MM
    z = Z_FIRST_ROW_MM - ((np.arange(N_ROWS))[:, None] + fractions[None, :]).ravel() * PIXEL_MM
    # a ray through the detector point C + s·u + z·e_z along n: squared distance to the centre
    p = np.asarray(view.centre_xy)[None, :] + s[:, None] * view.lateral[None, :]  # [s, xy]
    w = p - centre[None, :2]
    d_xy2 = (w**2).sum(1) - (w @ view.normal) ** 2
    d2 = d_xy2[None, :] + (z[:, None] - centre[2]) ** 2  # [z, s]
    chord = 2.0 * np.sqrt(np.clip(SPHERE_RADIUS_MM**2 - d2, 0.0, None))
    return chord.reshape(N_ROWS, sub, N_COLS, sub).mean(axis=(1, 3))


def expected_counts(view: View) -> np.ndarray:
    """Photopeak counts [row, column]: sensitivity × activity in each pixel's column × ∫decay."""
    concentration = ACTIVITY_MBQ / (4.0 / 3.0 * math.pi * SPHERE_RADIUS_MM**3)  # MBq/mm³
    decay_integral_s = view.duration_s * TC99M.mean_decay_factor(view.start_s, view.duration_s)
    return SENSITIVITY_CPS_PER_MBQ * concentration * sphere_projection(view) * PIXEL_MM**2 * decay_integral_s


def _private(ds: Dataset, group: int, creator: str, element: int, vr: str, value) -> None:
    ds.private_block(group, creator, create=True).add_new(element, vr, value)


def write_starguide_file(path: Path, head: int, views: list[View], counts: np.ndarray, study: dict[str, str]) -> None:
    """One detector column's file: frames energy window by energy window, views in time order.
    ``counts`` [window, view, row, column] (integer-valued)."""
    n_win, n_view = counts.shape[:2]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = NM_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = NM_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.Modality = "NM"
    ds.Manufacturer = "GE MEDICAL SYSTEMS"
    ds.ManufacturerModelName = "StarGuide"
    ds.PatientName, ds.PatientID = "Phantom^Sphere", "SG-SPHERE"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study["study"], study["series"]
    ds.FrameOfReferenceUID = study["frame"]
    ds.SeriesNumber, ds.InstanceNumber = 1, head + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "TOMO", "EMISSION"]
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ACQ_START.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ACQ_START.strftime("%H%M%S")
    ds.NumberOfFrames = n_win * n_view
    ds.EnergyWindowVector = [w + 1 for w in range(n_win) for _ in range(n_view)]
    ds.DetectorVector = [1] * (n_win * n_view)
    ds.NumberOfEnergyWindows, ds.NumberOfDetectors = n_win, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = N_ROWS, N_COLS
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    ds.PixelSpacing = [f"{PIXEL_MM:g}", f"{PIXEL_MM:g}"]
    windows = []
    for name, lo, hi in WINDOWS[:n_win]:
        rng = Dataset()
        rng.EnergyWindowLowerLimit, rng.EnergyWindowUpperLimit = f"{lo:g}", f"{hi:g}"
        item = Dataset()
        item.EnergyWindowRangeSequence = DicomSequence([rng])
        item.EnergyWindowName = name
        windows.append(item)
    ds.EnergyWindowInformationSequence = DicomSequence(windows)
    detector = Dataset()
    detector.CollimatorGridName, detector.CollimatorType = "LEHR", "PARA"
    detector.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
    corner = -(196 - 1) / 2 * 2.46
    detector.ImagePositionPatient = [f"{corner:.2f}", f"{corner:.2f}", f"{Z_FIRST_ROW_MM:g}"]
    ds.DetectorInformationSequence = DicomSequence([detector])
    rotation = Dataset()
    rotation.ActualFrameDuration = 15000  # nominal; the frames' own durations are private
    rotation.TableHeight = "100"
    ds.RotationInformationSequence = DicomSequence([rotation])
    pharm = Dataset()
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "C-163A8", "SRT", "^99m^Technetium"
    pharm.RadionuclideCodeSequence = DicomSequence([code])
    pharm.RadiopharmaceuticalStartDateTime = (ACQ_START - timedelta(hours=1)).strftime("%Y%m%d%H%M%S")
    pharm.RadionuclideTotalDose = "50"
    ds.RadiopharmaceuticalInformationSequence = DicomSequence([pharm])
    # per-frame geometry as PyTomography reads it: θ = φ − 180°, (x, y) = −C, in cm
    theta = [(v.angle_deg - 180.0) % 360.0 for v in views] * n_win
    x_cm = [-v.centre_xy[0] / 10.0 for v in views] * n_win
    y_cm = [-v.centre_xy[1] / 10.0 for v in views] * n_win
    _private(ds, 0x0009, "GEMS_GENIE_1", 0x03, "FD", [1000.0 * v.duration_s for v in views] * n_win)
    _private(ds, 0x0011, "GEMS_GENIE_1", 0x3B, "FL", PIXEL_SCALE)
    _private(ds, 0x0099, "GEHC_STARGUIDE", 0x51, "FD", x_cm)
    _private(ds, 0x0099, "GEHC_STARGUIDE", 0x52, "FD", y_cm)
    _private(ds, 0x0099, "GEHC_STARGUIDE", 0x53, "FD", theta)
    stored = np.rint(counts / PIXEL_SCALE).astype("<u2")
    ds.PixelData = np.ascontiguousarray(stored.reshape(-1, N_ROWS, N_COLS)).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write_starguide_study(folder: Path, seed: int = 7) -> list[Path]:
    """The 12 files of one StarGuide acquisition of the sphere (photopeak + empty lower window)."""
    rng = np.random.default_rng(seed)
    study = {"study": generate_uid(), "series": generate_uid(), "frame": generate_uid()}
    views = acquisition_views()
    paths = []
    for head in range(N_HEADS):
        own = [v for v in views if v.head == head]
        counts = np.zeros((2, len(own), N_ROWS, N_COLS))
        counts[0] = rng.poisson(np.stack([expected_counts(v) for v in own]))
        paths.append(folder / f"head{head + 1:02d}.dcm")
        write_starguide_file(paths[-1], head, own, counts, study)
    return paths


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> list[Path]:
    return write_starguide_study(tmp_path_factory.mktemp("starguide") / "nm")


def _truth_order(views: list[View]) -> list[View]:
    return sorted(views, key=lambda v: (round(v.angle_deg, 3), round(v.offset_mm, 2)))


# ----------------------------------------------------------------------------------- reader


def test_reader_gives_views_angles_radii_offsets(study):
    acq = read_acquisition(study)
    views = _truth_order(acquisition_views())
    g = acq.geometry
    assert acq.vendor == "GE StarGuide" and acq.collimator == "LEHR" and acq.nuclide.name == "Tc-99m"
    assert acq.counts.shape == (2, N_HEADS * 9, N_ROWS, N_COLS)
    assert np.allclose(g.angles_deg, [v.angle_deg for v in views], atol=1e-6)
    assert np.allclose(g.radii_mm, [v.radius_mm for v in views], atol=1e-6)
    assert np.allclose(g.offsets_mm, [v.offset_mm for v in views], atol=1e-6)
    assert np.ptp(g.offsets_mm) > 100.0  # swivelled heads really are offset sideways
    assert np.allclose(acq.view_durations_s, [v.duration_s for v in views])
    assert acq.frame_duration_s == pytest.approx(18.0)
    assert acq.acquisition_duration_s == pytest.approx(sum(10.0 + 2.0 * p for p in range(9)))
    assert (g.n_cols, g.pixel_mm, g.axis_xy_mm, g.z_first_row_mm) == (N_COLS, PIXEL_MM, (0.0, 0.0), Z_FIRST_ROW_MM)
    max_offset = max(abs(v.offset_mm) for v in views)
    assert g.grid_cols == 2 * math.ceil(max_offset / PIXEL_MM + N_COLS / 2)
    # (0011,103B) applied: counts are the stored values × 0.5, every frame once
    stored = sum(float(pydicom.dcmread(p).pixel_array.sum(dtype=np.int64)) for p in study)
    assert acq.counts.sum() == pytest.approx(stored * PIXEL_SCALE)
    # each view's counts are those simulated for it: compare with the noiseless expectation
    expected = np.stack([expected_counts(v) for v in views])
    photopeak = acq.counts[0]
    assert np.corrcoef(photopeak.ravel(), expected.ravel())[0, 1] > 0.99
    assert photopeak.sum() == pytest.approx(expected.sum(), rel=0.01)


def test_reader_agrees_with_pytomography_starguide_reader(study):
    from pytomography.io.SPECT import dicom as pt_dicom

    _, proj_meta = pt_dicom.get_starguide_metadata([str(p) for p in study], index_peak=0, nearest_theta=1e-6)
    pt_proj = pt_dicom.get_starguide_projections([str(p) for p in study], index_peak=0).cpu().numpy()
    acq = read_acquisition(study)
    g = acq.geometry
    # theraflow: φ = θ + 180°, radius = 10·r, offset along u = −10·l, times in s
    angles = (proj_meta.angles.cpu().numpy().astype(np.float64) + 180.0) % 360.0
    offsets = -10.0 * proj_meta.offsets.cpu().numpy().astype(np.float64)
    radii = 10.0 * np.asarray(proj_meta.radii, dtype=np.float64)
    order = np.lexsort((np.round(offsets, 2), np.round(angles, 3)))
    assert np.allclose(angles[order], g.angles_deg, atol=1e-3)
    assert np.allclose(offsets[order], g.offsets_mm, atol=1e-2)
    assert np.allclose(radii[order], g.radii_mm, atol=1e-2)
    assert np.allclose(proj_meta.times.cpu().numpy()[order] / 1000.0, acq.view_durations_s, rtol=1e-5)
    # PyTomography's projections are [view, column, row] with rows not flipped
    assert np.allclose(pt_proj[order].transpose(0, 2, 1), acq.counts[0])


def _blob(grid_cols: int, n_rows: int) -> torch.Tensor:
    """A smooth off-centre activity blob on the grid [x, y, z] (z from the bottom)."""
    c = (torch.arange(grid_cols, dtype=torch.float64) - (grid_cols - 1) / 2) * PIXEL_MM
    z = (torch.arange(n_rows, dtype=torch.float64) - (n_rows - 1) / 2) * PIXEL_MM
    x, y, zz = torch.meshgrid(c, c, z, indexing="ij")
    blob = torch.exp(-((x - 22.0) ** 2 + (y + 14.0) ** 2) / (2 * 9.0**2) - (zz - 8.0) ** 2 / (2 * 8.0**2))
    blob += 0.5 * torch.exp(-((x + 10.0) ** 2 + (y - 20.0) ** 2 + (zz + 10.0) ** 2) / (2 * 7.0**2))
    return blob.to(pytomography.dtype)


def test_native_projector_matches_pytomography_starguide_projector(study):
    """Same views, same object: theraflow's projector with the mapped geometry and PyTomography's
    StarGuideSystemMatrix on PyTomography's own metadata agree view by view."""
    from pytomography.io.SPECT import dicom as pt_dicom
    from pytomography.metadata.SPECT import SPECTObjectMeta
    from pytomography.projectors.SPECT import StarGuideSystemMatrix
    from pytomography.transforms.SPECT import SPECTAttenuationTransform

    acq = read_acquisition(study)
    g = acq.geometry
    n = g.grid_cols
    obj = _blob(n, N_ROWS)
    ours = system_matrix(g, RowRange(0, N_ROWS), None, None, view_weights=acq.view_weights())
    ours_proj = from_projections(ours.forward(obj)) * acq.frame_duration_s  # counts per view, [view, row, col]

    _, proj_meta = pt_dicom.get_starguide_metadata([str(p) for p in study], index_peak=0, nearest_theta=1e-6)
    d_cm = PIXEL_MM / 10.0
    object_meta = SPECTObjectMeta((d_cm, d_cm, d_cm), (n, n, N_ROWS))
    # PyTomography's StarGuide objects have z from the top (rows not flipped); no attenuation
    zero_mu = SPECTAttenuationTransform(torch.zeros(n, n, N_ROWS), assume_padded=False)
    theirs = StarGuideSystemMatrix(object_meta, proj_meta, obj2obj_transforms=[zero_mu])
    pt = theirs.forward(obj.flip(2).to(pytomography.device)).cpu().numpy().transpose(0, 2, 1)
    angles = (proj_meta.angles.cpu().numpy().astype(np.float64) + 180.0) % 360.0
    offsets = -10.0 * proj_meta.offsets.cpu().numpy().astype(np.float64)
    pt = pt[np.lexsort((np.round(offsets, 2), np.round(angles, 3)))]

    assert ours_proj.sum() > 0 and np.all(pt.sum(axis=(1, 2)) >= 0)
    difference = np.linalg.norm(ours_proj - pt) / np.linalg.norm(pt)
    assert difference < 0.05, difference
    # per view, the lateral centroids agree to a tenth of a pixel where a view sees much
    cols = np.arange(N_COLS)
    seen = pt.sum(axis=(1, 2)) > 0.2 * pt.sum(axis=(1, 2)).max()
    c_ours = (ours_proj.sum(1) * cols).sum(1)[seen] / ours_proj.sum(axis=(1, 2))[seen]
    c_pt = (pt.sum(1) * cols).sum(1)[seen] / pt.sum(axis=(1, 2))[seen]
    assert np.max(np.abs(c_ours - c_pt)) < 0.1


def test_native_projector_with_offsets_is_adjoint_and_weighted():
    views = 20
    angles = np.arange(views) * 360.0 / views
    offsets = 30.0 * np.sin(np.radians(3 * angles)) + 7.3
    geometry = ProjectionGeometry(angles, np.full(views, 120.0), 4.0, 8, 12, (0.0, 0.0), 20.0, offsets)
    weights = 0.5 + np.arange(views) / views
    response = collimator_response("GE StarGuide", "LEHR", 140.5)
    mu = sitk.Image([geometry.grid_cols] * 2 + [8], sitk.sitkFloat32) + 0.1
    system = system_matrix(geometry, RowRange(0, 8), mu, response, view_weights=weights)
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(geometry.grid_cols, geometry.grid_cols, 8, generator=gen).to(pytomography.dtype)
    y = torch.rand(views, 12, 8, generator=gen).to(pytomography.dtype)
    hx, hty = system.forward(x), system.backward(y)
    assert hx.shape == (views, 12, 8) and hty.shape == x.shape
    assert float((hx * y).sum()) == pytest.approx(float((x * hty).sum()), rel=1e-4)
    unweighted = system_matrix(geometry, RowRange(0, 8), mu, response)
    assert torch.allclose(hx, unweighted.forward(x) * torch.as_tensor(weights, dtype=hx.dtype)[:, None, None], rtol=1e-5)


def _voxelised_sphere(geometry: ProjectionGeometry) -> torch.Tensor:
    """The truth on the reconstruction grid (counts per view per reference frame, z from the bottom)."""
    sub = 3
    n = geometry.grid_cols
    f = ((np.arange(sub) + 0.5) / sub - 0.5)
    xy = ((np.arange(n) - (n - 1) / 2)[:, None] + f).ravel() * PIXEL_MM + 0.0
    z = (Z_FIRST_ROW_MM - ((N_ROWS - 1 - np.arange(N_ROWS))[:, None] + f).ravel() * PIXEL_MM)
    x, y, zz = np.meshgrid(xy, xy, z, indexing="ij")
    cx, cy, cz = SPHERE_CENTRE_MM
    inside = ((x - cx) ** 2 + (y - cy) ** 2 + (zz - cz) ** 2 < SPHERE_RADIUS_MM**2).astype(np.float64)
    fraction = inside.reshape(n, sub, n, sub, N_ROWS, sub).mean(axis=(1, 3, 5))
    voxel_mm3 = PIXEL_MM**3
    concentration = ACTIVITY_MBQ / (4.0 / 3.0 * math.pi * SPHERE_RADIUS_MM**3)
    return torch.as_tensor(fraction * voxel_mm3 * concentration * SENSITIVITY_CPS_PER_MBQ, dtype=pytomography.dtype)


def _misfit(acq, geometry: ProjectionGeometry) -> float:
    system = system_matrix(geometry, RowRange(0, N_ROWS), None, None, view_weights=acq.view_weights())
    model = from_projections(system.forward(_voxelised_sphere(geometry))) * acq.frame_duration_s
    measured = acq.counts[0]
    return float(np.linalg.norm(model - measured) / np.linalg.norm(measured))


def test_geometry_errors_would_be_caught(study):
    """The truth projected through the geometry read from the files matches the data; the same
    with the offsets' sign flipped, without offsets or with the angles turned by 180° does not."""
    from dataclasses import replace

    acq = read_acquisition(study)
    g = acq.geometry
    good = _misfit(acq, g)
    assert good < 0.08, good
    for wrong in (
        replace(g, lateral_offsets_mm=-g.offsets_mm),
        replace(g, lateral_offsets_mm=np.zeros_like(g.offsets_mm) + 1e-9),
        replace(g, angles_deg=(g.angles_deg + 180.0) % 360.0),
    ):
        assert _misfit(acq, wrong) > 3 * good


# ----------------------------------------------------------------------------------- end to end


def test_recon_spect_places_the_sphere_with_its_activity(study, tmp_path):
    out = tmp_path / "recon"
    proc = run_cli(
        "recon", "spect", "--nm", *map(str, study), "--out", str(out),
        "--sensitivity", str(SENSITIVITY_CPS_PER_MBQ), "--iterations", "8", "--subsets", "6",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "recon.json").read_text())
    assert report["camera"]["vendor_adapter"] == "GE StarGuide"
    assert report["total_activity_MBq"] == pytest.approx(ACTIVITY_MBQ, rel=0.03)
    image = sitk.ReadImage(str(out / "recon.nii.gz"))
    values = sitk.GetArrayFromImage(image).astype(np.float64)  # [z, y, x], Bq/mL
    assert image.GetSize()[0] == read_acquisition(study).geometry.grid_cols
    voxel_mL = float(np.prod(image.GetSpacing())) / 1000.0
    assert values.sum() * voxel_mL / 1e6 == pytest.approx(ACTIVITY_MBQ, rel=0.03)
    hot = values > 0.1 * values.max()  # the sphere, without the low tails
    idx = np.argwhere(hot)[:, ::-1].astype(np.float64)  # (x, y, z) indices
    centroid_index = (idx * values[hot][:, None]).sum(0) / values[hot].sum()
    centroid = np.array(image.TransformContinuousIndexToPhysicalPoint(centroid_index.tolist()))
    assert np.linalg.norm(centroid - np.asarray(SPHERE_CENTRE_MM)) < PIXEL_MM, centroid


# ----------------------------------------------------------------------------------- bad input


def test_missing_starguide_geometry_is_bad_input(study, tmp_path):
    ds = pydicom.dcmread(study[0])
    del ds[0x0099, 0x1053]
    bad = tmp_path / "no_angles.dcm"
    ds.save_as(bad)
    with pytest.raises(InputError, match=r"detector angle \(0099,1053\)"):
        read_nm_projections(bad)
    proc = run_cli("recon", "spect", "--nm", str(bad), *map(str, study[1:]), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "no_angles.dcm" in lines[0]
    assert not (tmp_path / "out").exists()


def test_private_values_per_frame_are_checked(study, tmp_path):
    ds = pydicom.dcmread(study[0])
    ds[0x0009, 0x1003].value = list(ds[0x0009, 0x1003].value)[:-1]
    bad = tmp_path / "short_times.dcm"
    ds.save_as(bad)
    with pytest.raises(InputError, match="frame durations"):
        read_nm_projections(bad)


def test_same_file_twice_is_refused(study):
    with pytest.raises(InputError, match="same projections"):
        read_acquisition([study[0], study[0], *study[1:]])

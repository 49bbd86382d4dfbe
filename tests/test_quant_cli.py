"""``theraflow quant select`` and ``theraflow quant phantom`` end to end on synthetic DICOM PET
(and CT) written here: result files, DICOM SEG and SR (dciodvfy, read back), the HTML report
(rendered in headless Chromium), phantom QC tables, and refusals of bad input (one ``error:``
line, exit 2, nothing written)."""

from __future__ import annotations

import csv
import json
import math
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from conftest import run_cli
from flows import cli as flows_cli
from quant import outputs, suv, voi
from quant import synthetic as syn
from recon.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
TRUTH = ROOT / "data-samples" / "lu177-iec" / "truth"
CHROMIUM = Path("/usr/bin/chromium")

NODE = (12.0, -40.0, 10.0)
BONE = (-42.0, -52.0, 50.0)
NEGATIVE = (40.0, -44.0, -60.0)


# --------------------------------------------------------------------------- a synthetic PSMA PET/CT study


def _write_masks(folder: Path, scene: syn.Scene) -> dict[str, Path]:
    paths = {}
    for name, mask in scene.masks.items():
        paths[name] = folder / f"{name}.nii.gz"
        sitk.WriteImage(mask, str(paths[name]))
    return paths


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    """PET (4 mm, 64×64×80), CT in the same frame of reference, organ masks, a CT-read
    PSMA-negative lymph node (30 mm, SUV 4) and a sites file."""
    folder = tmp_path_factory.mktemp("study")
    scene = syn.psma_scene([syn.SphereLesion(NODE, 20.0, 25.0), syn.SphereLesion(BONE, 16.0, 12.0),
                            syn.SphereLesion(NEGATIVE, 30.0, 4.0)], size=(64, 64, 80), spacing=(4.0, 4.0, 4.0))
    header = syn.PetHeader()
    syn.write_pet_series(scene.suv, folder / "pet", header)
    syn.write_ct_series(syn.body_ct(scene.suv, scene.masks), folder / "ct", header)
    masks = _write_masks(folder, scene)
    r = np.linalg.norm(syn.points_mm(scene.suv) - np.asarray(NEGATIVE), axis=-1)
    node = folder / "node.nii.gz"
    sitk.WriteImage(syn.image_like((r <= 15.0).astype(np.uint8), scene.suv, sitk.sitkUInt8), str(node))
    sites = folder / "sites.json"
    sites.write_text(json.dumps({"node": {"site": "lymph_node", "short_axis_mm": 30.0}, "1": {"site": "lymph_node", "short_axis_mm": 20.0},
                                 "2": {"site": "bone"}}))
    return {"folder": folder, "scene": scene, "header": header, "pet": folder / "pet", "ct": folder / "ct", "masks": masks,
            "node": node, "sites": sites}


def _mask_args(masks: dict[str, Path]) -> list[str]:
    return ["--masks", *(f"{name}={path}" for name, path in masks.items())]


@pytest.fixture(scope="module")
def selected(study, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("select") / "result"
    proc = run_cli("quant", "select", "--pet", str(study["pet"]), "--ct", str(study["ct"]), *_mask_args(study["masks"]),
                   "--lesion-masks", f"node={study['node']}", "--sites", str(study["sites"]), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "VISION: not eligible" in proc.stdout and "TheraP: not eligible" in proc.stdout
    return out


def test_select_writes_every_result(selected):
    assert sorted(p.name for p in selected.iterdir()) == ["lesions.csv", "lesions.json", "report.html", "seg.dcm", "selection.json", "sr.dcm"]
    assert not [p for p in selected.parent.iterdir() if p.name.endswith(".partial")]
    summary = json.loads((selected / "selection.json").read_text())
    lesions = summary["lesions"]
    assert [round(lesion["suv_max"], 1) for lesion in lesions] == [25.0, 12.0, 4.0]
    assert [lesion["name"] for lesion in lesions] == ["auto", "auto", "node"]
    assert [lesion["site"] for lesion in lesions] == ["lymph_node", "bone", "lymph_node"]
    assert lesions[0]["volume_mL"] == pytest.approx(math.pi * 20.0**3 / 6000.0, rel=0.2)  # 4 mm voxels
    assert summary["references"]["liver"]["suv_mean"] == pytest.approx(5.0, abs=0.02)
    assert summary["segmentation"]["threshold"] == pytest.approx(9.5, abs=0.05)
    # VISION: the 30 mm PSMA-negative node (SUV 4 ≤ liver 5) excludes; TheraP: it is a measurable site below 10
    assert summary["vision"]["eligible"] is False
    assert summary["vision"]["decided_by"][0]["values"]["label"] == 3
    # the report says which size decided: here the CT short axis given with the site
    assert "30.0 mm (short axis given with the site) ≥ 25 mm" in summary["vision"]["decided_by"][0]["detail"]
    assert "30.0 mm (short axis given with the site) ≥ 25 mm" in (selected / "report.html").read_text()
    assert summary["therap"]["eligible"] is False
    assert summary["therap"]["decided_by"][0]["rule"] == "therap.measurable_site_low"
    assert [s["score"] for s in summary["promise"]["lesions"]] == [3, 3, 1]
    assert summary["suv"]["suv_bw_scale"] == pytest.approx(1.0 / syn.suv_to_bqml(syn.PetHeader()), rel=1e-6)
    assert summary["tumour_burden"]["lesions"] == 3
    # the tracer as identified (quant/tracer.py); how each lesion was sized, sub-voxel: the
    # automatic 20 mm sphere at its PERCIST threshold, the given node mask from the mask alone
    assert summary["pet"]["tracer"] == {"agent": "PSMA-11", "family": "PSMA", "text": "PSMA-11", "how": "name"}
    assert lesions[0]["size_method"] == "sub-voxel ellipsoid of the VOI at its threshold SUV 9.50"
    assert lesions[2]["size_method"] == "sub-voxel ellipsoid of the VOI mask (no threshold)"
    assert lesions[2]["short_axis_mm"] == pytest.approx(30.0, abs=1.0)
    with (selected / "lesions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["suv_max"]) for r in rows] == pytest.approx([25.0, 12.0, 4.0], rel=1e-3)
    assert rows[0]["promise_score"] == "3" and rows[2]["site_short_axis_mm"] == "30"
    assert json.loads((selected / "lesions.json").read_text())["lesions"][0]["label"] == 1


def test_seg_and_sr_are_valid_dicom(selected, dciodvfy):
    for name in ("seg.dcm", "sr.dcm"):
        proc = subprocess.run([dciodvfy, str(selected / name)], capture_output=True, text=True)
        errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], f"{name}: {errors}"


def test_seg_and_sr_read_back(selected, study):
    series = suv.read_pet_series(study["pet"])
    seg = pydicom.dcmread(selected / "seg.dcm")
    assert seg.Modality == "SEG" and seg.FrameOfReferenceUID == series.first.FrameOfReferenceUID
    assert [str(item.SegmentLabel) for item in seg.SegmentSequence] == ["Lesion 1", "Lesion 2", "Lesion 3 (node)"]
    summary = json.loads((selected / "selection.json").read_text())
    for number, lesion in enumerate(summary["lesions"], start=1):
        mask = voi.read_seg_mask(selected / "seg.dcm", series, f"Lesion {number}" if number < 3 else "Lesion 3 (node)")
        assert int(sitk.GetArrayViewFromImage(mask).sum()) == lesion["voxels"]
    groups = outputs.sr_measurements(pydicom.dcmread(selected / "sr.dcm"))
    lesion_groups = [g for g in groups if g.get("tracking_id", "").startswith("Lesion")]
    assert [g["segment"] for g in lesion_groups] == [1, 2, 3]
    first = lesion_groups[0]["measurements"]
    assert first["SUVbw (Maximum)"] == pytest.approx(summary["lesions"][0]["suv_max"], rel=1e-6)
    assert first["SUVbw (Peak Value Within ROI)"] == pytest.approx(summary["lesions"][0]["suv_peak"], rel=1e-6)
    assert first["Volume"] == pytest.approx(summary["lesions"][0]["volume_mL"], rel=1e-6)
    assert first["PROMISE miPSMA expression score"] == 3.0
    references = {g["tracking_id"]: g["measurements"] for g in groups if g.get("tracking_id", "").startswith("Reference")}
    assert references["Reference liver"]["SUVbw (Mean)"] == pytest.approx(5.0, abs=0.02)


def test_seg_output_is_accepted_as_a_mask(selected, study, tmp_path):
    """A lesion of the SEG given back as a lesion mask is measured the same."""
    out = tmp_path / "again"
    code = flows_cli.main(["quant", "select", "--pet", str(study["pet"]), *_mask_args(study["masks"]),
                           "--lesion-masks", f"Lesion 1={selected / 'seg.dcm'}", "--out", str(out)])
    assert code == 0
    again = json.loads((out / "selection.json").read_text())["lesions"]
    first = json.loads((selected / "selection.json").read_text())["lesions"][0]
    given = next(lesion for lesion in again if lesion["name"] == "Lesion 1")
    assert given["voxels"] == first["voxels"] and given["suv_max"] == pytest.approx(first["suv_max"])


# --------------------------------------------------------------------------- the HTML report


def _decode_png(data: bytes) -> np.ndarray:
    """8-bit RGB/RGBA/grey PNG (non-interlaced) to an H×W×C array: enough for screenshots."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks, header = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            chunks.append(body)
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and interlace == 0
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    raw = np.frombuffer(zlib.decompress(b"".join(chunks)), dtype=np.uint8).reshape(height, 1 + width * channels)
    out = np.zeros((height, width * channels), dtype=np.int32)
    previous = np.zeros(width * channels, dtype=np.int32)
    for y in range(height):
        kind, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        if kind == 0:
            row = line
        elif kind == 2:
            row = (line + previous) % 256
        else:
            row = np.zeros_like(line)
            for x in range(line.size):
                left = row[x - channels] if x >= channels else 0
                up = previous[x]
                if kind == 1:
                    row[x] = (line[x] + left) % 256
                elif kind == 3:
                    row[x] = (line[x] + (left + up) // 2) % 256
                else:
                    upleft = previous[x - channels] if x >= channels else 0
                    p = left + up - upleft
                    pa, pb, pc = abs(p - left), abs(p - up), abs(p - upleft)
                    predictor = left if pa <= pb and pa <= pc else up if pb <= pc else upleft
                    row[x] = (line[x] + predictor) % 256
        out[y] = row
        previous = row
    return out.reshape(height, width, channels).astype(np.uint8)


def test_report_is_self_contained(selected):
    text = (selected / "report.html").read_text()
    assert text.count("data:image/png;base64,") >= 5  # 2 MIPs + 3 fused slices
    assert "http://" not in text and "https://" not in text and "<script" not in text
    assert "VISION" in text and "TheraP" in text and "miPSMA" in text and "not eligible" in text
    assert "SYNTHETIC" not in text  # no patient name in the report


def test_png_writer_round_trip():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    from quant.report import png_bytes

    assert np.array_equal(_decode_png(png_bytes(rgb)), rgb)


def test_report_renders_in_chromium(selected, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("chromium not installed")
    shot = tmp_path / "shot.png"
    proc = subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,1600",
                           (selected / "report.html").as_uri()], capture_output=True, text=True, timeout=90)
    assert shot.exists(), proc.stderr[-2000:]
    pixels = _decode_png(shot.read_bytes())[..., :3]
    assert pixels.shape[:2] == (1600, 1200)
    not_white = (pixels < 240).any(axis=-1).mean()
    colours = np.unique(pixels.reshape(-1, 3)[::7], axis=0).shape[0]
    assert not_white > 0.05, f"only {not_white:.1%} of the screenshot is not white"
    assert colours > 50, f"{colours} colours: images not rendered?"
    red = ((pixels[..., 0] > 150) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)).sum()
    assert red > 200  # the 'not eligible' badges


# --------------------------------------------------------------------------- bad input


def _refused(capsys, argv: list[str], *phrases: str) -> None:
    """Exit 2, one ``error:`` line holding ``phrases``, and no output folder (nor a partial one)."""
    out = Path(argv[argv.index("--out") + 1])
    capsys.readouterr()
    try:
        code = flows_cli.main(argv)
    except SystemExit as exc:  # argparse errors
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error:"), err
    for phrase in phrases:
        assert phrase in err[0], err[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")], "partial output left behind"


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("small")
    scene = syn.psma_scene([syn.SphereLesion(NODE, 20.0, 25.0)], size=(48, 48, 56), spacing=(5.0, 5.0, 5.0))
    syn.write_pet_series(scene.suv, folder / "pet")
    return {"folder": folder, "scene": scene, "pet": folder / "pet", "masks": _write_masks(folder, scene)}


def _select_argv(pet: Path, masks: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["quant", "select", "--pet", str(pet), *_mask_args(masks), "--out", str(out), *extra]


def test_small_study_runs(small, tmp_path):
    out = tmp_path / "out"
    assert flows_cli.main(_select_argv(small["pet"], small["masks"], out)) == 0
    assert (out / "selection.json").exists()
    # a previous result may be replaced, an unrelated folder may not
    assert flows_cli.main(_select_argv(small["pet"], small["masks"], out, "--method", "fixed")) == 0
    assert json.loads((out / "selection.json").read_text())["segmentation"]["method"] == "fixed"


def test_mask_on_another_grid_is_refused(small, tmp_path, capsys):
    other = sitk.Image(small["scene"].masks["liver"])
    other.SetSpacing((4.0, 4.0, 4.0))
    path = tmp_path / "liver_other.nii.gz"
    sitk.WriteImage(other, str(path))
    masks = {**small["masks"], "liver": path}
    _refused(capsys, _select_argv(small["pet"], masks, tmp_path / "out"), "liver_other.nii.gz", "another grid")


def _rtstruct(path: Path, frame_uid: str, rois: dict[str, float] | None = None) -> Path:
    """An RTSTRUCT with one square ROI per name (x range centre in mm) on the slice z = -42.5 mm."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality = "RTSTRUCT"
    structures, contours = [], []
    for number, (name, x) in enumerate((rois or {"liver": -60.0}).items(), start=1):
        roi = Dataset()
        roi.ROINumber, roi.ROIName, roi.ReferencedFrameOfReferenceUID = number, name, frame_uid
        structures.append(roi)
        contour = Dataset()
        contour.ContourGeometricType, contour.NumberOfContourPoints = "CLOSED_PLANAR", 4
        contour.ContourData = [x - 20, -20, -42.5, x + 20, -20, -42.5, x + 20, 20, -42.5, x - 20, 20, -42.5]
        roi_contour = Dataset()
        roi_contour.ReferencedROINumber, roi_contour.ContourSequence = number, Sequence([contour])
        contours.append(roi_contour)
    ds.StructureSetROISequence = Sequence(structures)
    ds.ROIContourSequence = Sequence(contours)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_rtstruct_with_several_rois_gives_each_by_name(small, tmp_path):
    series = suv.read_pet_series(small["pet"])
    path = _rtstruct(tmp_path / "rs.dcm", str(series.first.FrameOfReferenceUID), {"Liver": -60.0, "Spleen": 60.0})
    masks = voi.load_masks({"liver": path, "spleen": path}, series)
    centre_x = {name: np.mean([series.image.TransformIndexToPhysicalPoint((int(i), 0, 0))[0]
                               for i in np.argwhere(sitk.GetArrayViewFromImage(mask))[:, 2]]) for name, mask in masks.items()}
    assert centre_x["liver"] == pytest.approx(-60.0, abs=3.0) and centre_x["spleen"] == pytest.approx(60.0, abs=3.0)
    with pytest.raises(InputError, match="no ROI named 'kidney'"):
        voi.load_masks({"kidney": path}, series)


def test_rtstruct_mask_in_another_frame_of_reference_is_refused(small, tmp_path, capsys):
    series = suv.read_pet_series(small["pet"])
    good = _rtstruct(tmp_path / "rs_good.dcm", str(series.first.FrameOfReferenceUID))
    assert flows_cli.main(_select_argv(small["pet"], {**small["masks"], "liver": good}, tmp_path / "ok")) == 0
    bad = _rtstruct(tmp_path / "rs_bad.dcm", generate_uid())
    _refused(capsys, _select_argv(small["pet"], {**small["masks"], "liver": bad}, tmp_path / "out"), "rs_bad.dcm", "frame of reference")


def test_seg_mask_in_another_frame_of_reference_is_refused(selected, small, tmp_path, capsys):
    _refused(capsys, _select_argv(small["pet"], small["masks"], tmp_path / "out", "--lesion-masks", f"x={selected / 'seg.dcm'}"),
             "seg.dcm", "frame of reference")


def test_non_pet_series_is_refused(study, small, tmp_path, capsys):
    _refused(capsys, _select_argv(study["ct"], small["masks"], tmp_path / "out"), "not a PET series", "CT")


@pytest.mark.parametrize(("edit", "phrases"), [
    (lambda ds, k: ds.__delattr__("PatientWeight"), ("PatientWeight missing",)),
    (lambda ds, k: ds.RadiopharmaceuticalInformationSequence[0].__delattr__("RadionuclideTotalDose"), ("RadionuclideTotalDose missing",)),
    (lambda ds, k: [ds.RadiopharmaceuticalInformationSequence[0].__delattr__(kw)
                    for kw in ("RadiopharmaceuticalStartDateTime", "RadiopharmaceuticalStartTime")], ("no injection time",)),
    (lambda ds, k: setattr(ds, "CorrectedImage", ["NORM", "DECY"]), ("lacks ATTN",)),
])
def test_missing_weight_dose_or_times_are_refused(small, tmp_path, capsys, edit, phrases):
    pet = syn.write_pet_series(small["scene"].suv, tmp_path / "pet", edit=edit)
    _refused(capsys, _select_argv(pet, small["masks"], tmp_path / "out"), *phrases)


def test_ct_of_another_frame_of_reference_is_refused(study, small, tmp_path, capsys):
    _refused(capsys, _select_argv(small["pet"], small["masks"], tmp_path / "out", "--ct", str(study["ct"])), "CT frame of reference")


def test_percist_without_liver_is_refused(small, tmp_path, capsys):
    masks = {k: v for k, v in small["masks"].items() if k != "liver"}
    _refused(capsys, _select_argv(small["pet"], masks, tmp_path / "out"), "liver mask")


def test_malformed_arguments_are_refused(small, tmp_path, capsys):
    _refused(capsys, ["quant", "select", "--pet", str(small["pet"]), "--masks", "liver", "--out", str(tmp_path / "out")], "NAME=FILE")
    sites = tmp_path / "sites.json"
    sites.write_text(json.dumps({"1": {"site": "brain"}}))
    _refused(capsys, _select_argv(small["pet"], small["masks"], tmp_path / "out", "--sites", str(sites)), "site 'brain'")
    _refused(capsys, _select_argv(small["pet"], small["masks"], tmp_path / "out", "--method", "magic"), "invalid choice")


def test_unrelated_output_folder_is_kept(small, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    capsys.readouterr()
    assert flows_cli.main(_select_argv(small["pet"], small["masks"], out)) == 2
    assert "not a previous theraflow result" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"


# --------------------------------------------------------------------------- phantom QC


@pytest.fixture(scope="module")
def smoothed_truth(tmp_path_factory) -> Path:
    truth = sitk.ReadImage(str(TRUTH / "activity.nii.gz"), sitk.sitkFloat32)
    path = tmp_path_factory.mktemp("phantom") / "recon.nii.gz"
    sitk.WriteImage(sitk.SmoothingRecursiveGaussian(truth, 6.0 / math.sqrt(8 * math.log(2))), str(path))
    return path


def test_phantom_command_on_nifti(smoothed_truth, tmp_path):
    out = tmp_path / "qc"
    proc = run_cli("quant", "phantom", str(smoothed_truth), "--phantom", str(TRUTH / "phantom.json"), "--modality", "pet", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "EARL1: fail" in proc.stdout and "sphere 37 mm" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["phantom_qc.csv", "phantom_qc.json"]
    data = json.loads((out / "phantom_qc.json").read_text())
    assert data["modality"] == "pet" and data["background_rois"] == 60
    with (out / "phantom_qc.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["diameter_mm"]) for r in rows] == [10, 13, 17, 22, 28, 37]
    big = rows[-1]
    assert float(big["rc_max"]) == pytest.approx(1.0, abs=0.01)
    assert big["EARL1_rc_mean"] == "pass" and big["EARL2_rc_max"] == "fail"  # A50 RCmean 0.87; RCmax 1.0 < 1.05


def test_phantom_command_on_nm_recon_dicom(smoothed_truth, tmp_path):
    from recon.io.nm_recon_dicom import write_nm_recon_series

    source = pydicom.dcmread(ROOT / "data-samples" / "lu177-iec" / "nm" / "projections.dcm", stop_before_pixels=True)
    (tmp_path / "dicom").mkdir()
    (path,) = write_nm_recon_series(sitk.ReadImage(str(smoothed_truth)), tmp_path / "dicom", source, series_description="test")
    out = tmp_path / "qc"
    assert flows_cli.main(["quant", "phantom", str(path), "--phantom", str(TRUTH / "phantom.json"), "--out", str(out)]) == 0
    data = json.loads((out / "phantom_qc.json").read_text())
    assert data["modality"] == "spect" and data["acceptance"] == {}
    assert data["spheres"][-1]["rc_max"] == pytest.approx(1.0, abs=0.01)  # stored uint16 with a slope: small rounding
    assert "AcquisitionDate" in data["image_time_rule"]


def test_phantom_command_on_a_pet_series(smoothed_truth, tmp_path):
    image = sitk.ReadImage(str(smoothed_truth))
    header = syn.PetHeader()
    coarse = syn.grid((72, 56, 44), (4.0, 4.0, 4.0), origin=(-146.0, -62.0, -192.0))
    pet_values = sitk.Resample(image, coarse, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32) / syn.suv_to_bqml(header)
    pet = syn.write_pet_series(pet_values, tmp_path / "pet", header)
    out = tmp_path / "qc"
    assert flows_cli.main(["quant", "phantom", str(pet), "--phantom", str(TRUTH / "phantom.json"), "--out", str(out),
                           "--image-time", "2026-11-02T10:00:00"]) == 0
    data = json.loads((out / "phantom_qc.json").read_text())
    assert data["modality"] == "pet" and set(data["acceptance"]) == {"EARL1", "EARL2"}
    assert data["decay_factor"] == pytest.approx(1.0)


def test_phantom_command_refusals(smoothed_truth, tmp_path, capsys):
    phantom = str(TRUTH / "phantom.json")
    _refused(capsys, ["quant", "phantom", str(smoothed_truth), "--phantom", phantom, "--out", str(tmp_path / "a")], "--modality")
    _refused(capsys, ["quant", "phantom", str(tmp_path / "nothing.nii.gz"), "--phantom", phantom, "--modality", "pet",
                      "--out", str(tmp_path / "b")], "no such image")
    _refused(capsys, ["quant", "phantom", str(smoothed_truth), "--phantom", str(tmp_path / "none.json"), "--modality", "pet",
                      "--out", str(tmp_path / "c")], "no such phantom description")
    _refused(capsys, ["quant", "phantom", str(smoothed_truth), "--phantom", phantom, "--modality", "pet", "--image-time", "yesterday",
                      "--out", str(tmp_path / "d")], "ISO")


def test_no_lesion_still_gives_verdicts_sr_and_report(small, tmp_path):
    criteria = tmp_path / "criteria.json"
    criteria.write_text(json.dumps({"voi": {"method": "fixed", "fixed_threshold": 100.0}}))
    out = tmp_path / "out"
    assert flows_cli.main(_select_argv(small["pet"], small["masks"], out, "--criteria", str(criteria))) == 0
    assert sorted(p.name for p in out.iterdir()) == ["lesions.csv", "lesions.json", "report.html", "selection.json", "sr.dcm"]
    summary = json.loads((out / "selection.json").read_text())
    assert summary["lesions"] == [] and summary["vision"]["eligible"] is False and summary["therap"]["eligible"] is False
    assert any("no DICOM SEG" in note for note in summary["notes"])
    assert "no lesion found" in (out / "report.html").read_text()
    exe = shutil.which("dciodvfy")
    if exe is not None:
        proc = subprocess.run([exe, str(out / "sr.dcm")], capture_output=True, text=True)
        assert not [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]

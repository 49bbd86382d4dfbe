"""``theraflow quant select --masks-ct``: organ and lesion masks drawn on another CT (another frame
of reference, the patient positioned otherwise) are carried onto the PET grid by registering that
CT onto the PET/CT's CT (quant.registration) and resampling the masks through the same transform.

A synthetic PSMA PET/CT and a second CT of the same body moved by a known rigid transform: the
verdicts must equal those of the aligned case (masks drawn on the PET grid), the written transform
must agree with the truth (target registration error < 2 mm) and the carried masks must lie where
the organs are (centroid error < 2 mm, Dice ≥ 0.8). Bad input: one ``error:`` line, exit 2."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import run_cli
from quant import pipeline, report
from quant import registration as reg
from quant import synthetic as syn
from recon.io.ct import read_ct_series
from test_quant_cli import _refused

NODE = (12.0, -40.0, 10.0)
BONE = (-42.0, -52.0, 50.0)
NEGATIVE = (40.0, -44.0, -60.0)
TRE_POINTS = [(0, 0, 0), (-100, 0, 0), (100, 0, 0), (0, -80, 0), (0, 80, 0), (0, 0, -140), (0, 0, 140), (-60, -40, -60), (60, 40, 100)]


def _truth() -> sitk.Euler3DTransform:
    """Body point in the PET/CT frame → the same point in the masks CT frame (mm, LPS)."""
    t = sitk.Euler3DTransform()
    t.SetCenter((0.0, 0.0, 0.0))
    t.SetRotation(*(math.radians(a) for a in (3.0, -2.0, 5.0)))
    t.SetTranslation((9.0, -7.0, 12.0))
    return t


def _node_mask(reference: sitk.Image, body_to_frame: sitk.Transform | None = None) -> sitk.Image:
    """The 30 mm PSMA-negative node (read on CT) as a mask on ``reference``'s grid."""
    pts = syn.points_mm(reference)
    body = pts if body_to_frame is None else syn.map_points(body_to_frame, pts, inverse=True)
    inside = np.linalg.norm(body - np.asarray(NEGATIVE), axis=-1) <= 15.0
    return syn.image_like(inside.astype(np.uint8), reference, sitk.sitkUInt8)


def _write(folder: Path, masks: dict[str, sitk.Image]) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, mask in masks.items():
        paths[name] = folder / f"{name}.nii.gz"
        sitk.WriteImage(mask, str(paths[name]))
    return paths


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict:
    """PET (4 mm, 64×64×80) with its CT; organ and node masks on the PET grid (the aligned case);
    a second CT (108×108×136 × 2.5 mm, own frame of reference and origin) of the same body moved by
    the known transform, with the same masks drawn on it."""
    folder = tmp_path_factory.mktemp("pair")
    scene = syn.psma_scene([syn.SphereLesion(NODE, 20.0, 25.0), syn.SphereLesion(BONE, 16.0, 12.0),
                            syn.SphereLesion(NEGATIVE, 30.0, 4.0)], size=(64, 64, 80), spacing=(4.0, 4.0, 4.0))
    extent = syn.half_extent_mm(scene.suv)
    header = syn.PetHeader()
    syn.write_pet_series(scene.suv, folder / "pet", header)
    syn.write_ct_series(syn.scene_ct(scene.suv, extent), folder / "ct", header)
    truth = _truth()
    other = syn.PetHeader()  # new frame of reference and study
    assert other.frame_of_reference_uid != header.frame_of_reference_uid
    grid = syn.grid((108, 108, 136), (2.5, 2.5, 2.5), origin=(-140.0, -120.0, -160.0))
    syn.write_ct_series(syn.scene_ct(grid, extent, truth), folder / "other_ct", other)
    moved_masks = {**syn.scene_masks(grid, extent, truth), "node": _node_mask(grid, truth)}
    return {"folder": folder, "scene": scene, "pet": folder / "pet", "ct": folder / "ct", "other_ct": folder / "other_ct",
            "truth": truth, "aligned": _write(folder / "aligned", {**scene.masks, "node": _node_mask(scene.suv)}),
            "moved": _write(folder / "moved", moved_masks), "sites": _sites(folder)}


def _sites(folder: Path) -> Path:
    path = folder / "sites.json"
    path.write_text(json.dumps({"node": {"site": "lymph_node", "short_axis_mm": 30.0}, "1": {"site": "lymph_node", "short_axis_mm": 20.0},
                                "2": {"site": "bone"}}))
    return path


def _argv(pair: dict, masks: dict[str, Path], out: Path, *extra: str) -> list[str]:
    organs = [f"{name}={path}" for name, path in masks.items() if name != "node"]
    return ["quant", "select", "--pet", str(pair["pet"]), "--ct", str(pair["ct"]), "--masks", *organs,
            "--lesion-masks", f"node={masks['node']}", "--sites", str(pair["sites"]), "--out", str(out), *extra]


@pytest.fixture(scope="module")
def results(pair, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("results")
    aligned = run_cli(*_argv(pair, pair["aligned"], out / "aligned"))
    assert aligned.returncode == 0, aligned.stderr
    registered = run_cli(*_argv(pair, pair["moved"], out / "registered", "--masks-ct", str(pair["other_ct"])))
    assert registered.returncode == 0, registered.stderr
    assert "masks carried from" in registered.stdout
    return {"aligned": out / "aligned", "registered": out / "registered"}


def _summary(folder: Path) -> dict:
    return json.loads((folder / "selection.json").read_text())


def test_verdicts_equal_the_aligned_case(results):
    aligned, registered = _summary(results["aligned"]), _summary(results["registered"])
    assert aligned["registration"] is None
    for key in ("vision", "therap"):
        assert registered[key]["eligible"] == aligned[key]["eligible"]
        assert [d["rule"] for d in registered[key]["decided_by"]] == [d["rule"] for d in aligned[key]["decided_by"]]
    assert aligned["vision"]["eligible"] is False and aligned["therap"]["eligible"] is False
    assert [s["score"] for s in registered["promise"]["lesions"]] == [s["score"] for s in aligned["promise"]["lesions"]] == [3, 3, 1]
    assert [lesion["name"] for lesion in registered["lesions"]] == ["auto", "auto", "node"]
    assert [lesion["suv_max"] for lesion in registered["lesions"]] == pytest.approx([25.0, 12.0, 4.0], rel=1e-3)
    # the carried node VOI: 30 mm sphere, 14.1 mL; nearest-neighbour carrying keeps its volume within a few voxels (0.064 mL)
    node_aligned, node_registered = aligned["lesions"][2]["volume_mL"], registered["lesions"][2]["volume_mL"]
    assert node_registered == pytest.approx(node_aligned, rel=0.1)
    # reference means: the liver (semi-axes 30×25×25 mm) within 5 %; the small organs (radius 8-14 mm, a third of
    # their 4 mm voxels on the border, where nearest-neighbour carrying swaps organ and background) within 10 %
    assert registered["references"]["liver"]["suv_mean"] == pytest.approx(aligned["references"]["liver"]["suv_mean"], rel=0.05)
    for name in ("parotid", "blood_pool", "spleen"):
        assert registered["references"][name]["suv_mean"] == pytest.approx(aligned["references"][name]["suv_mean"], rel=0.1), name
    assert registered["segmentation"]["exclude_margin_mm"] == 4.0 and aligned["segmentation"]["exclude_margin_mm"] == 0.0


def test_transform_and_provenance_are_written(results, pair):
    folder = results["registered"]
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["lesions.csv", "lesions.json", "registration.png", "registration.tfm", "report.html", "seg.dcm", "selection.json", "sr.dcm"]
    summary = _summary(folder)
    provenance = summary["registration"]
    assert provenance["registered"] is True and provenance["transform_file"] == "registration.tfm"
    assert provenance["masks_ct"]["frame_of_reference_uid"] != summary["pet"]["frame_of_reference_uid"]
    assert provenance["fixed_ct"]["frame_of_reference_uid"] == summary["pet"]["frame_of_reference_uid"]
    assert provenance["quality"]["acceptable"] is True
    assert provenance["quality"]["ncc_after"] > provenance["quality"]["ncc_before"] + 0.5
    assert provenance["mask_interpolation"] == "nearest neighbour"
    # rigid parameters against the truth: 3°, -2°, 5° and (9, -7, 12) mm about the origin
    transform = sitk.ReadTransform(str(folder / "registration.tfm"))
    tre = reg.target_registration_error(transform, pair["truth"], TRE_POINTS)
    assert tre.max() < 2.0, f"TRE {np.round(tre, 2)} mm"
    assert provenance["rotation_deg"] == pytest.approx([3.0, -2.0, 5.0], abs=0.3)
    # the liver is 30×25×25 mm semi-axes: its volume survives the carrying within 10 %
    liver = provenance["mask_volumes_mL"]["liver"]
    assert liver["pet_mL"] == pytest.approx(4.0 / 3.0 * math.pi * 30 * 25 * 25 / 1000.0, rel=0.1)
    assert liver["masks_ct_mL"] == pytest.approx(liver["pet_mL"], rel=0.1)
    html = (folder / "report.html").read_text()
    assert "Registration of the masks CT" in html and "registration checkerboard" in html


def test_quality_figure_is_a_checkerboard_of_both_cts(results):
    figure = results["registered"] / "registration.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fixed, _, _ = read_ct_series(Path(_summary(results["registered"])["ct"]["folder"]))
    identity = sitk.Transform(3, sitk.sitkIdentity)
    shifted = sitk.TranslationTransform(3, (20.0, 0.0, 0.0))
    rgb = report.registration_figure(fixed, fixed, shifted, identity)
    half = (rgb.shape[1] - 4) // 2
    before, after = rgb[:, :half].astype(int), rgb[:, half + 4 : 2 * half + 4].astype(int)
    # CT against itself: after (identity) the checkerboard is the plain CT, before (20 mm shift) it is not
    plain = report.registration_figure(fixed, fixed, identity, identity)[:, :half].astype(int)
    assert np.array_equal(after, plain)
    assert np.abs(before - after).mean() > 5.0


def test_carried_masks_lie_on_the_organs(pair):
    """Function level: each carried organ mask against the truth drawn on the PET grid."""
    from quant import suv

    series = suv.read_pet_series(pair["pet"])
    pet_ct, pet_ct_header, _ = read_ct_series(pair["ct"])
    masks = {name: path for name, path in pair["moved"].items() if name != "node"}
    carried = pipeline.carry_masks_from_ct(masks, {"node": pair["moved"]["node"]}, series, pet_ct, pet_ct_header,
                                           pair["ct"], pair["other_ct"])
    spacing = np.asarray(series.image.GetSpacing())
    truth = {**pair["scene"].masks, "node": _node_mask(pair["scene"].suv)}
    for name, mask in {**carried.masks, **carried.lesion_masks}.items():
        got = sitk.GetArrayViewFromImage(mask) != 0
        want = sitk.GetArrayViewFromImage(truth[name]) != 0
        error_mm = np.linalg.norm((np.argwhere(got).mean(axis=0) - np.argwhere(want).mean(axis=0))[::-1] * spacing)
        dice = 2.0 * (got & want).sum() / (got.sum() + want.sum())
        assert error_mm < 2.0, f"{name}: centroid {error_mm:.2f} mm off"
        assert dice >= 0.8, f"{name}: Dice {dice:.3f}"
    assert carried.provenance["registered"] is True


def test_masks_ct_in_the_pets_frame_needs_no_registration(pair, tmp_path):
    """Masks drawn on the PET/CT's own CT grid: resampled onto the PET grid, no registration."""
    from quant import suv

    series = suv.read_pet_series(pair["pet"])
    pet_ct, header, _ = read_ct_series(pair["ct"])
    on_ct = _write(tmp_path / "on_ct", {"liver": syn.scene_masks(pet_ct, syn.half_extent_mm(pair["scene"].suv))["liver"]})
    carried = pipeline.carry_masks_from_ct(on_ct, {}, series, pet_ct, header, pair["ct"], pair["ct"])
    assert carried.transform is None and carried.figure is None and carried.provenance["registered"] is False
    assert np.array_equal(sitk.GetArrayViewFromImage(carried.masks["liver"]), sitk.GetArrayViewFromImage(pair["scene"].masks["liver"]))


# --------------------------------------------------------------------------- bad input


def test_masks_of_another_ct_without_registration_are_refused(pair, tmp_path, capsys):
    _refused(capsys, _argv(pair, pair["moved"], tmp_path / "out"), "liver.nii.gz", "differs from the PET grid", "--masks-ct")


def test_masks_ct_without_the_pet_ct_is_refused(pair, tmp_path, capsys):
    argv = [a for a in _argv(pair, pair["moved"], tmp_path / "out", "--masks-ct", str(pair["other_ct"]))]
    i = argv.index("--ct")
    del argv[i : i + 2]
    _refused(capsys, argv, "--masks-ct needs --ct")


def test_failed_registration_is_refused(pair, tmp_path, capsys):
    """A 'CT' of noise cannot be registered: the quality check refuses it, nothing is written."""
    grid = syn.grid((40, 40, 40), (6.0, 6.0, 6.0))
    noise = syn.image_like(np.random.default_rng(1).normal(0.0, 300.0, (40, 40, 40)).astype(np.float32), grid)
    folder = syn.write_ct_series(noise, tmp_path / "noise_ct", syn.PetHeader())
    masks = _write(tmp_path / "noise_masks", {"liver": syn.image_like(np.ones((40, 40, 40), np.uint8), grid, sitk.sitkUInt8),
                                              "node": syn.image_like(np.ones((40, 40, 40), np.uint8), grid, sitk.sitkUInt8)})
    _refused(capsys, _argv(pair, masks, tmp_path / "out", "--masks-ct", str(folder), "--method", "fixed"), "noise_ct", "quality check")


def test_bad_registration_settings_are_refused(pair, tmp_path, capsys):
    settings = tmp_path / "registration.json"
    settings.write_text(json.dumps({"transform": "affine"}))
    _refused(capsys, _argv(pair, pair["moved"], tmp_path / "out", "--masks-ct", str(pair["other_ct"]), "--registration", str(settings)),
             "registration.json", "transform")
    _refused(capsys, _argv(pair, pair["aligned"], tmp_path / "out", "--registration", str(settings)), "registration.json", "--masks-ct only")

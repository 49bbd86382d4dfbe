"""Joint multi-photopeak SPECT of Ac-225 (218 keV Fr-221 and 440 keV Bi-213 windows) on the Monte
Carlo sample data-samples/ac225-mc, made by ``simulate_lu177_mc.py --nuclide Ac-225``: photon
transport with Klein-Nishina scattering, hexagonal-hole collimator with septal penetration,
energy resolution; it takes only the photon lines (data) from theraflow. Clinical-like counts:
5.8 MBq in a 5.4 L water cylinder, spheres 10:1, 30 min.

Run ``python tests/test_alpha_ac225.py`` to print the joint vs single-window table (README)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from test_spect_mc_sample import figures

AC = Path(__file__).resolve().parents[1] / "data-samples" / "ac225-mc"
NM, CAL = AC / "nm" / "projections.dcm", AC / "calibration" / "point_source.dcm"


def load_truth() -> dict:
    return json.loads((AC / "truth" / "phantom.json").read_text())


@pytest.fixture(scope="module")
def ac_truth() -> dict:
    if not NM.exists():
        pytest.fail(f"sample missing: run python data-samples/simulate_lu177_mc.py --nuclide Ac-225 --out {AC}")
    return load_truth()


def recon_cli(out: Path, *extra: str) -> Path:
    from conftest import run_cli

    run_cli("recon", "spect", "--nm", str(NM), "--ct", str(AC / "ct"), "--out", str(out), "--registry",
            str(AC / "sensitivity.json"), "--strict", *extra, check=True)
    return out


@pytest.fixture(scope="module")
def joint(ac_truth, tmp_path_factory) -> Path:
    return recon_cli(tmp_path_factory.mktemp("ac225") / "joint", "--photopeaks", "all")


def test_calibrate_spect_gives_one_entry_per_photopeak_window_and_the_registry_is_it(ac_truth, tmp_path):
    """``calibrate spect --photopeaks all`` of the simulated point source in air: one
    sensitivity per photopeak window, each within 6 % of the simulation's true one (-0.5 % at
    440 keV; -5.3 % at 218 keV, where TEW in air subtracts the lower window's 188 keV line and
    the peak's tails); --write adds both to a registry;
    the sample's registry holds them, marked simulated by this simulator."""
    from conftest import run_cli

    registry = tmp_path / "r.json"
    measured = json.loads(run_cli("calibrate", "spect", "--nm", str(CAL), "--photopeaks", "all", "--write",
                                  "--registry", str(registry), "--by", "test", check=True).stdout)
    truth = {tuple(w["window_keV"]): w["true_cps_per_MBq_per_head"] for w in ac_truth["photopeak_windows"]}
    assert sorted(tuple(m["window_keV"]) for m in measured) == sorted(truth), measured
    for m in measured:
        assert m["nuclide"] == "Ac-225"
        assert m["cps_per_MBq"] == pytest.approx(truth[tuple(m["window_keV"])], rel=0.06), (m["window_keV"], truth)
    written = json.loads(registry.read_text())["entries"]
    sample = json.loads((AC / "sensitivity.json").read_text())["entries"]
    assert len(written) == len(sample) == 2
    for entry in sample:
        match = next(m for m in measured if tuple(m["window_keV"]) == tuple(entry["window_keV"]))
        assert entry["cps_per_MBq"] == pytest.approx(match["cps_per_MBq"], rel=1e-4)
        assert entry["origin"] == "simulated" and entry["simulator"] == pydicom.dcmread(NM, stop_before_pixels=True).SoftwareVersions
    # the default (main photopeak) report is unchanged: one measurement, the most abundant photopeak (440 keV)
    main = json.loads(run_cli("calibrate", "spect", "--nm", str(CAL), check=True).stdout)
    assert main["window_keV"][0] < 440.5 < main["window_keV"][1]


def test_joint_reconstruction_records_windows_yields_and_the_equilibrium_assumption(joint):
    provenance = json.loads((joint / "recon.json").read_text())
    record = provenance["joint_photopeaks"]
    assert [round(w["photopeak_keV"]) for w in record["windows"]] == [441, 218]
    assert [round(w["yield_per_decay"], 3) for w in record["windows"]] == [0.263, 0.120]
    assert "equilibrium" in record["progeny"]
    assert all(w["lower_scatter_keV"] and w["upper_scatter_keV"] and w["scatter"] == "tew" for w in record["windows"])
    # septal penetration through the MEGP collimator: a tail kernel at 440 keV (its Gaussian then of the full hole
    # length), none at 218 keV (its Gaussian's L_eff = L - 2/mu stands in for the penetration at the holes' edges)
    assert record["windows"][0]["septal_penetration"]["fraction"] > 0.5 and record["windows"][1]["septal_penetration"] is None
    assert record["windows"][0]["collimator_response"]["slope"] * 58.0 == pytest.approx(3.0 / 2.354820045)
    assert record["windows"][1]["collimator_response"]["slope"] * 58.0 > 3.0 / 2.354820045
    assert record["windows"][0]["relative_sensitivity"] == 1.0
    assert provenance["calibration"]["warnings"] == []


@pytest.fixture(scope="module")
def joint_figures(joint, ac_truth) -> dict:
    result = figures(joint, ac_truth)
    print("joint:", json.dumps(result))
    return result


def test_joint_reconstruction_total_within_10_percent(joint_figures, ac_truth):
    """+2.3 % (5.978 MBq) with the 440 keV window's honeycomb penetration tail (+0.8 % with the
    square-lattice one). It was +11.3 % while the simulator cut the collimator's transmission at
    direction tangent 0.3 (the model's tail, out to 45 degrees, then had no counterpart in the
    data or in the calibration)."""
    assert joint_figures["total_MBq"] == pytest.approx(ac_truth["total_activity_MBq"], rel=0.10)


@pytest.mark.xfail(strict=True, reason="RC 37 mm 0.665 (RC 28 mm 0.436; OSEM 4 x 10) with the honeycomb penetration model "
                   "(0.591 with the square-lattice one); cause of the rest not isolated. Known differences: the simulator transports "
                   "the collimator's far tail out to tangent 1.44 at 440 keV and the model stops at 45 degrees (0.032 of a point "
                   "source's counts beyond tangent 1.0 against the model's 0.011; 0.474 beyond 0.3 against 0.438), the tail's "
                   "width is taken at the axis for every depth; 0.892 while the simulator cut its transmission at tangent 0.3")
def test_joint_reconstruction_largest_sphere_within_20_percent(joint_figures):
    """RCmean of the 37 mm sphere with the 440 keV window's septal-penetration tail
    (recon/spect/penetration.py)."""
    assert 0.80 <= joint_figures["rc"][37.0] <= 1.20, joint_figures["rc"]


def test_joint_reconstruction_refuses_a_single_command_line_sensitivity(ac_truth, tmp_path):
    from conftest import run_cli

    out = tmp_path / "out"
    proc = run_cli("recon", "spect", "--nm", str(NM), "--out", str(out), "--photopeaks", "all", "--sensitivity", "5")
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "--sensitivity" in proc.stderr, proc.stderr
    assert not out.exists()


def test_joint_reconstruction_needs_every_window_calibrated(ac_truth, tmp_path):
    from conftest import run_cli

    registry = tmp_path / "one.json"
    entries = json.loads((AC / "sensitivity.json").read_text())["entries"]
    registry.write_text(json.dumps({"entries": [e for e in entries if e["window_keV"][0] > 300]}))
    proc = run_cli("recon", "spect", "--nm", str(NM), "--out", str(tmp_path / "out"), "--photopeaks", "all", "--registry", str(registry))
    assert proc.returncode == 2 and "no sensitivity" in proc.stderr and "196.4-240" in proc.stderr, proc.stderr


def windows_subset(src: Path, keep: list[int], dst: Path) -> Path:
    """A copy of the NM file ``src`` holding only the energy windows ``keep`` (0-based), for
    single-window reconstructions of one photopeak."""
    ds = pydicom.dcmread(src)
    frames = ds.pixel_array
    vector = np.asarray(ds.EnergyWindowVector)
    mask = np.isin(vector, [k + 1 for k in keep])
    renumber = {k + 1: i + 1 for i, k in enumerate(keep)}
    ds.EnergyWindowInformationSequence = pydicom.Sequence([ds.EnergyWindowInformationSequence[k] for k in keep])
    ds.NumberOfEnergyWindows = len(keep)
    for keyword in ("EnergyWindowVector", "DetectorVector", "RotationVector", "AngularViewVector"):
        setattr(ds, keyword, [int(v) for v in np.asarray(getattr(ds, keyword))[mask]])
    ds.EnergyWindowVector = [renumber[v] for v in ds.EnergyWindowVector]
    ds.NumberOfFrames = int(mask.sum())
    ds.PixelData = np.ascontiguousarray(frames[mask], dtype="<u2").tobytes()
    ds.save_as(dst, enforce_file_format=True)
    return dst


def bias_and_noise(recon: Path, truth: dict) -> dict:
    """Total vs truth, RCmean of the 37 and 28 mm spheres (bias), and the voxel coefficient of
    variation in the 37 mm sphere and in the background (noise of this one realisation)."""
    import SimpleITK as sitk
    from test_spect_mc_sample import background_mask

    from quant.phantom import sphere_mask

    image = sitk.ReadImage(str(recon / "recon.nii.gz"))
    array = sitk.GetArrayViewFromImage(image)
    sphere = array[sphere_mask(image, truth["spheres"][0]["centre_mm"], truth["spheres"][0]["diameter_mm"])]
    background = array[background_mask(image, truth)]
    f = figures(recon, truth)
    return {"total_vs_truth": f["total_MBq"] / truth["total_activity_MBq"] - 1, "rc37": f["rc"][37.0], "rc28": f["rc"][28.0],
            "sphere37_cv": float(sphere.std() / sphere.mean()), "background_cv": float(background.std() / background.mean())}


def smoothed_to(recon: Path, rc37: float, truth: dict, work: Path) -> dict:
    """Bias and noise of the image in ``recon`` post-smoothed with the Gaussian (FWHM found by
    bisection, mm) that brings its 37 mm sphere's RCmean down to ``rc37``: the comparison at
    equal bias."""
    import shutil

    import SimpleITK as sitk

    image = sitk.ReadImage(str(recon / "recon.nii.gz"))
    out = work / f"{recon.name}-smoothed"
    out.mkdir(exist_ok=True)
    shutil.copy(recon / "recon.json", out / "recon.json")
    low, high = 0.0, 80.0
    for _ in range(14):
        fwhm = (low + high) / 2
        sitk.WriteImage(sitk.SmoothingRecursiveGaussian(image, fwhm / 2.354820045), str(out / "recon.nii.gz"))
        result = bias_and_noise(out, truth)
        low, high = (fwhm, high) if result["rc37"] > rc37 else (low, fwhm)
    return {"smoothing_fwhm_mm": fwhm, **result}


def comparison(work: Path, iterations: int = 4) -> list[dict]:
    """Joint, 440 keV-only and 218 keV-only reconstructions (OSEM ``iterations`` x 10, CT, PSF with
    the septal-penetration tail where it applies (440 keV), TEW, the sample's registry) and their
    bias and noise. (Before the tail was modelled, the CT-coverage check refused the 440 keV window
    alone: its tails put 10 % of the peak row's counts 32 mm beyond the phantom's end.)"""
    from recon.spect import pipeline
    from recon.spect.outputs import write_spect_result
    from recon.spect.reconstruct import Algorithm

    truth, rows = load_truth(), []
    low = windows_subset(NM, [0, 1, 2], work / "w218.dcm")
    for label, nm, photopeaks in (("joint 440+218 keV", NM, "all"), ("440 keV only", NM, "main"), ("218 keV only", low, "main")):
        params = pipeline.SpectParameters(algorithm=Algorithm("osem", iterations, 10), registry=AC / "sensitivity.json",
                                          photopeaks=photopeaks)
        out = write_spect_result(pipeline.reconstruct_spect([nm], AC / "ct", params), work / label.split()[0])
        rows.append({"reconstruction": label, "iterations": iterations, "folder": out, **bias_and_noise(out, truth)})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "folder"}), flush=True)
    return rows


def equal_bias(rows: list[dict], work: Path) -> list[str]:
    """The joint reconstruction against each single window at equal bias: the sharper of the two
    smoothed to the other's 37 mm RC, then their sphere and background CVs."""
    truth, joint, lines = load_truth(), rows[0], []
    for single in rows[1:]:
        sharp, blunt = (joint, single) if joint["rc37"] > single["rc37"] else (single, joint)
        s = smoothed_to(sharp["folder"], blunt["rc37"], truth, work)
        lines.append(f"{sharp['reconstruction']} smoothed (FWHM {s['smoothing_fwhm_mm']:.0f} mm) to RC {s['rc37']:.3f}: "
                     f"sphere CV {s['sphere37_cv']:.3f}, background CV {s['background_cv']:.3f}, against "
                     f"{blunt['reconstruction']}'s {blunt['sphere37_cv']:.3f} and {blunt['background_cv']:.3f} at RC {blunt['rc37']:.3f}")
    return lines


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        table = comparison(Path(tmp))
        print("| reconstruction | OSEM | total vs truth | RC 37 mm | RC 28 mm | CV in 37 mm sphere | background CV |")
        print("|---|---|---|---|---|---|---|")
        for r in table:
            print(f"| {r['reconstruction']} | {r['iterations']} x 10 | {100 * r['total_vs_truth']:+.1f} % | {r['rc37']:.3f} | {r['rc28']:.3f} "
                  f"| {r['sphere37_cv']:.3f} | {r['background_cv']:.3f} |")
        print("\n".join(equal_bias(table, Path(tmp))))

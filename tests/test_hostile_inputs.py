"""A corpus of malformed and hostile inputs across every command (issue #14 item 7).

Each case must end with exactly one ``error:`` line on stderr, exit status 2, nothing on
stdout, no traceback, nothing written anywhere under the test's folder (which also holds a
previous result that must stay intact), all before any reconstruction. Most cases run
``flows.cli.main`` in this process; a few run ``theraflow`` as a fresh process to prove the
same without pytest's help.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

import quant.synthetic as syn
from conftest import ROOT, run_cli
from flows import cli, jobs
from flows.dicom_net import FolderSource

SAMPLE = ROOT / "data-samples" / "lu177-iec"
NM = SAMPLE / "nm" / "projections.dcm"
CT = SAMPLE / "ct"
PLANAR = SAMPLE / "calibration" / "planar_source.dcm"
LISTMODE = ROOT / "data-samples" / "ga68-iec-pet" / "listmode.petsird"
PHANTOM = SAMPLE / "truth" / "phantom.json"

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")   # pydicom's warnings about the values we break on purpose


@dataclass
class Ctx:
    """The test's folder: inputs are made under ``inputs``; ``prev`` is a previous result."""

    tmp: Path
    pet: Path
    masks: list[str]

    @property
    def inputs(self) -> Path:
        path = self.tmp / "inputs"
        path.mkdir(exist_ok=True)
        return path

    @property
    def prev(self) -> Path:
        return self.tmp / "prev"

    def nm(self, edit: Callable[[pydicom.Dataset], None], source: Path = NM) -> str:
        ds = pydicom.dcmread(source)
        edit(ds)
        path = self.inputs / "nm.dcm"
        ds.save_as(path)
        return str(path)

    def raw(self, data: bytes, name: str = "raw.dcm") -> str:
        path = self.inputs / name
        path.write_bytes(data)
        return str(path)

    def ct(self, edit: Callable[[list[pydicom.Dataset]], list[pydicom.Dataset]] | None = None) -> str:
        folder = self.inputs / "ct"
        folder.mkdir()
        slices = [pydicom.dcmread(p) for p in sorted(CT.glob("*.dcm"))]
        for n, ds in enumerate(edit(slices) if edit else slices):
            ds.save_as(folder / f"ct{n:04d}.dcm")
        return str(folder)

    def text(self, content: str | bytes, name: str) -> str:
        path = self.inputs / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return str(path)

    def manifest(self, rows: str = "study,label\nstudy,S1\n", raw: bytes | None = None) -> str:
        (self.inputs / "study").mkdir(exist_ok=True)
        return self.text(raw if raw is not None else rows, "manifest.csv")


def _set(**values) -> Callable[[pydicom.Dataset], None]:
    def edit(ds: pydicom.Dataset) -> None:
        for keyword, value in values.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
    return edit


def _raw_value(keyword: str, value: bytes) -> Callable[[pydicom.Dataset], None]:
    """Store bytes as they are (values pydicom would refuse to write, e.g. 'abc' in an IS)."""
    def edit(ds: pydicom.Dataset) -> None:
        element = ds[keyword]
        ds[element.tag] = pydicom.dataelem.RawDataElement(element.tag, element.VR, len(value), value, 0, True, True)
    return edit


def _windows(ds: pydicom.Dataset) -> None:
    rng = ds.EnergyWindowInformationSequence[0].EnergyWindowRangeSequence[0]
    rng.EnergyWindowLowerLimit, rng.EnergyWindowUpperLimit = rng.EnergyWindowUpperLimit, rng.EnergyWindowLowerLimit


def _other_frame(slices):
    frame = generate_uid()
    for ds in slices:
        ds.FrameOfReferenceUID = frame
    return slices


def _other_patient(slices):
    for ds in slices:
        ds.PatientID = "SOMEONE-ELSE"
    return slices


def _duplicate(slices):
    slices[10].ImagePositionPatient = list(slices[11].ImagePositionPatient)
    return slices


def _gap(slices):
    return slices[:20] + slices[21:]


def _far(slices):
    for ds in slices:
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 2000.0]
    return slices


def _each(**values):
    def change(slices):
        for ds in slices:
            _set(**values)(ds)
        return slices
    return change


def _truncated_ct(ctx: Ctx) -> str:
    folder = ctx.ct()
    victim = sorted(Path(folder).glob("*.dcm"))[25]
    victim.write_bytes(victim.read_bytes()[:-800])
    return folder


def _huge_claim(source: Path) -> bytes:
    """The first 2 kB of a real file, then an element claiming about 4 GiB."""
    data = source.read_bytes()[:2048]
    return data + b"\x09\x00\x10\x00OB\x00\x00" + (0xFFFFFFF0).to_bytes(4, "little") + b"\x00" * 32


def _recon(ctx: Ctx, nm: str | None = None, *extra: str, ct: str | None = str(CT), out: str | None = None) -> list[str]:
    """``recon spect`` of the sample, calibrated by the sample's own registry unless the case says otherwise."""
    argv = ["recon", "spect", "--nm", nm or str(NM), "--out", out or str(ctx.prev), *extra]
    if "--registry" not in extra and "--sensitivity" not in extra:
        argv += ["--registry", str(SAMPLE / "sensitivity.json")]
    return argv + (["--ct", ct] if ct else [])


def _pet(ctx: Ctx, *extra: str, listmode: str = str(LISTMODE), out: str | None = None) -> list[str]:
    return ["recon", "pet", "--listmode", listmode, "--out", out or str(ctx.prev), *extra]


def _calibrate(ctx: Ctx, *extra: str, nm: str = str(PLANAR)) -> list[str]:
    return ["calibrate", "spect", "--nm", nm, *extra]


def _select(ctx: Ctx, *extra: str, pet: str | None = None, out: str | None = None) -> list[str]:
    return ["quant", "select", "--pet", pet or str(ctx.pet), "--masks", *ctx.masks, "--out", out or str(ctx.prev), *extra]


def _study(ctx: Ctx, *extra: str, manifest: str | None = None, out: str | None = None, store: str | None = None) -> list[str]:
    return ["run", "study", manifest or ctx.manifest(), "--out", out or str(ctx.prev), "--store",
            store or str(ctx.inputs / "results.sqlite"), *extra]


def _junk_store(ctx: Ctx) -> str:
    return ctx.text(os.urandom(4096), "junk.sqlite")


def _long(ctx: Ctx) -> str:
    return str(ctx.tmp / ("n" * 300))


def _under_file(ctx: Ctx) -> str:
    return str(Path(ctx.text("a file", "plain.txt")) / "out")


def _a_file(ctx: Ctx) -> str:
    return ctx.text("a file", "existing.txt")


READ_ONLY = "/proc/theraflow-out"   # not writable, even by root


def _registry(ctx: Ctx, content: str) -> str:
    return ctx.text(content, "registry.json")


_ENTRY = '{{"entries": [{{"camera_model": "x", "collimator": "MEGP", "nuclide": "Lu-177", "window_keV": [187.2, 228.8], "cps_per_MBq": {}}}]}}'

# (id, argv builder, phrase expected in the error line or None)
CASES: list[tuple[str, Callable[[Ctx], list[str]], str | None]] = [
    # --- recon spect: the NM file
    ("nm-frames-fewer", lambda c: _recon(c, c.nm(_set(NumberOfFrames=179))), "NumberOfFrames"),
    ("nm-frames-more", lambda c: _recon(c, c.nm(_set(NumberOfFrames=181))), "truncated pixel data"),
    ("nm-frames-zero", lambda c: _recon(c, c.nm(_set(NumberOfFrames=0))), "NumberOfFrames"),
    ("nm-frames-text", lambda c: _recon(c, c.nm(_raw_value("NumberOfFrames", b"abc "))), "NumberOfFrames"),
    ("nm-rows-zero", lambda c: _recon(c, c.nm(_set(Rows=0))), "Rows"),
    ("nm-window-vector-short", lambda c: _recon(c, c.nm(lambda ds: setattr(ds, "EnergyWindowVector", list(ds.EnergyWindowVector)[:-1]))), "EnergyWindowVector"),
    ("nm-view-vector-zero", lambda c: _recon(c, c.nm(lambda ds: setattr(ds, "AngularViewVector", [0] * int(ds.NumberOfFrames)))), "AngularViewVector"),
    ("nm-pixel-spacing-zero", lambda c: _recon(c, c.nm(_set(PixelSpacing=[0, 0]))), "PixelSpacing"),
    ("nm-pixel-spacing-negative", lambda c: _recon(c, c.nm(_set(PixelSpacing=[-4.8, -4.8]))), "PixelSpacing"),
    ("nm-pixel-spacing-text", lambda c: _recon(c, c.nm(_raw_value("PixelSpacing", b"a\\b "))), "nm.dcm"),
    ("nm-rescale-slope-zero", lambda c: _recon(c, c.nm(_set(RescaleSlope=0))), "pixel scale"),
    ("nm-rescale-slope-negative", lambda c: _recon(c, c.nm(_set(RescaleSlope=-1))), "pixel scale"),
    ("nm-window-upper-below-lower", lambda c: _recon(c, c.nm(_windows)), "EnergyWindowInformationSequence"),
    ("nm-windows-missing", lambda c: _recon(c, c.nm(_set(EnergyWindowInformationSequence=None))), "EnergyWindowInformationSequence"),
    ("nm-frame-duration-zero", lambda c: _recon(c, c.nm(lambda ds: setattr(ds.RotationInformationSequence[0], "ActualFrameDuration", 0))), "acquisition time"),
    ("nm-truncated-header", lambda c: _recon(c, c.raw(NM.read_bytes()[:400])), "raw.dcm"),
    ("nm-empty", lambda c: _recon(c, c.raw(b"")), "not a readable DICOM file"),
    ("nm-foreign-png", lambda c: _recon(c, c.raw(b"\x89PNG\r\n\x1a\n" + os.urandom(2000), "image.png")), "not a readable DICOM file"),
    ("nm-huge-claimed-length", lambda c: _recon(c, c.raw(_huge_claim(NM))), "raw.dcm"),
    ("nm-is-a-ct", lambda c: _recon(c, str(sorted(CT.glob("*.dcm"))[0])), "not an NM image"),
    ("nm-missing", lambda c: _recon(c, str(c.tmp / "nothing.dcm")), "no such file"),
    # --- recon spect: numbers on the command line
    ("sensitivity-nan", lambda c: _recon(c, None, "--sensitivity", "nan"), "finite"),
    ("sensitivity-inf", lambda c: _recon(c, None, "--sensitivity", "inf"), "finite"),
    ("sensitivity-zero", lambda c: _recon(c, None, "--sensitivity", "0"), "positive"),
    ("sensitivity-negative", lambda c: _recon(c, None, "--sensitivity", "-3"), "positive"),
    ("sensitivity-text", lambda c: _recon(c, None, "--sensitivity", "lots"), "not a number"),
    ("beta-nan", lambda c: _recon(c, None, "--algorithm", "bsrem", "--beta", "nan"), "finite"),
    ("beta-negative", lambda c: _recon(c, None, "--algorithm", "bsrem", "--beta", "-0.1"), "negative"),
    ("beta-inf", lambda c: _recon(c, None, "--algorithm", "bsrem", "--beta", "inf"), "finite"),
    ("iterations-zero", lambda c: _recon(c, None, "--iterations", "0"), "at least 1"),
    ("subsets-text", lambda c: _recon(c, None, "--subsets", "ten"), "subsets"),
    ("nuclide-unknown", lambda c: _recon(c, None, "--nuclide", "Xx-999"), "Xx-999"),
    # --- recon spect: the output folder
    ("out-existing-file", lambda c: _recon(c, out=_a_file(c)), "not a folder"),
    ("out-parent-is-file", lambda c: _recon(c, out=_under_file(c)), "is a file"),
    ("out-name-too-long", lambda c: _recon(c, out=_long(c)), "longer than 255 bytes"),
    ("out-read-only", lambda c: _recon(c, out=READ_ONLY), "cannot write"),
    ("out-unrelated-folder", lambda c: _recon(c, out=str(Path(c.text("keep me", "precious.txt")).parent)), "not a previous theraflow result"),
    ("out-dangling-link", lambda c: (Path(c.inputs, "link").symlink_to(c.tmp / "gone"), _recon(c, out=str(c.inputs / "link" / "x")))[1], "dangling"),
    # --- recon spect: the sensitivity registry
    ("registry-junk", lambda c: _recon(c, None, "--registry", _registry(c, "{not json")), "not a sensitivity registry"),
    ("registry-nan", lambda c: _recon(c, None, "--registry", _registry(c, _ENTRY.format("NaN"))), "finite"),
    ("registry-negative", lambda c: _recon(c, None, "--registry", _registry(c, _ENTRY.format("-9"))), "not positive"),
    ("registry-text", lambda c: _recon(c, None, "--registry", _registry(c, _ENTRY.format('"9"'))), "a number"),
    ("registry-missing", lambda c: _recon(c, None, "--registry", str(c.tmp / "none.json")), "not a sensitivity registry"),
    ("registry-not-utf8", lambda c: _recon(c, None, "--registry", c.text(b'{"entries": ["\xff"]}', "registry.json")), "not a sensitivity registry"),
    # --- recon spect: the CT
    ("ct-other-frame", lambda c: _recon(c, ct=c.ct(_other_frame)), "--ct-registered"),
    ("ct-other-patient", lambda c: _recon(c, None, "--ct-registered", ct=c.ct(_other_patient)), "another patient"),
    ("ct-duplicate-position", lambda c: _recon(c, ct=c.ct(_duplicate)), "same position"),
    ("ct-gap", lambda c: _recon(c, ct=c.ct(_gap)), "not evenly spaced"),
    ("ct-truncated-slice", lambda c: _recon(c, ct=_truncated_ct(c)), None),
    ("ct-rescale-slope-zero", lambda c: _recon(c, ct=c.ct(_each(RescaleSlope=0))), "RescaleSlope"),
    ("ct-pixel-spacing-zero", lambda c: _recon(c, ct=c.ct(_each(PixelSpacing=[0, 0]))), "PixelSpacing"),
    ("ct-far-from-the-spect", lambda c: _recon(c, ct=c.ct(_far)), "CT covers z"),
    ("ct-missing-folder", lambda c: _recon(c, ct=str(c.tmp / "noct")), "does not exist"),
    ("ct-empty-folder", lambda c: _recon(c, ct=str(c.inputs)), "no CT series"),
    # --- recon pet
    ("pet-listmode-junk", lambda c: _pet(c, listmode=c.raw(os.urandom(5000), "junk.petsird")), "junk.petsird"),
    ("pet-listmode-truncated", lambda c: _pet(c, listmode=c.raw(LISTMODE.read_bytes()[:3000], "cut.petsird")), "cut.petsird"),
    ("pet-beta-nan", lambda c: _pet(c, "--algorithm", "bsrem", "--beta", "nan"), "finite"),
    ("pet-out-existing-file", lambda c: _pet(c, out=_a_file(c)), "not a folder"),
    ("pet-out-read-only", lambda c: _pet(c, out=READ_ONLY), "cannot write"),
    # --- calibrate spect
    ("calibrate-activity-nan", lambda c: _calibrate(c, "--activity", "nan", "--write", "--registry", str(c.tmp / "r.json")), "finite"),
    ("calibrate-activity-inf", lambda c: _calibrate(c, "--activity", "inf"), "finite"),
    ("calibrate-activity-zero", lambda c: _calibrate(c, "--activity", "0"), "positive"),
    ("calibrate-activity-negative", lambda c: _calibrate(c, "--activity", "-5"), "positive"),
    ("calibrate-activity-text", lambda c: _calibrate(c, "--activity", "much"), "not a number"),
    ("calibrate-at-yesterday", lambda c: _calibrate(c, "--at", "yesterday"), "ISO date-time"),
    ("calibrate-truncated", lambda c: _calibrate(c, nm=c.raw(PLANAR.read_bytes()[:-5000])), "truncated"),
    ("calibrate-not-nm", lambda c: _calibrate(c, nm=str(sorted(CT.glob("*.dcm"))[0])), "not an NM image"),
    ("calibrate-slope-zero", lambda c: _calibrate(c, nm=c.nm(_set(RescaleSlope=0), PLANAR)), "pixel scale"),
    ("calibrate-write-junk-registry", lambda c: _calibrate(c, "--write", "--registry", _registry(c, "[1, 2")), "not a sensitivity registry"),
    ("calibrate-write-unwritable-registry", lambda c: _calibrate(c, "--write", "--registry", READ_ONLY + "/r.json"), "cannot write"),
    # --- quant
    ("suv-weight-text", lambda c: ["quant", "suv", syn_pet(c, PatientWeight="abc")], "PatientWeight"),
    ("suv-weight-zero", lambda c: ["quant", "suv", syn_pet(c, PatientWeight="0")], "PatientWeight"),
    ("suv-dose-text", lambda c: ["quant", "suv", syn_pet(c, dose="lots")], "RadionuclideTotalDose"),
    ("suv-folder-missing", lambda c: ["quant", "suv", str(c.tmp / "nopet")], "nopet"),
    ("suv-folder-junk", lambda c: (c.raw(os.urandom(3000), "a.dcm"), ["quant", "suv", str(c.inputs)])[1], None),
    ("select-out-parent-is-file", lambda c: _select(c, out=_under_file(c)), "is a file"),
    ("select-out-read-only", lambda c: _select(c, out=READ_ONLY), "cannot write"),
    ("select-mask-junk", lambda c: ["quant", "select", "--pet", str(c.pet), "--masks", f"liver={c.raw(os.urandom(900), 'liver.nii.gz')}",
                                    "--out", str(c.prev)], "liver.nii.gz"),
    ("select-sites-not-utf8", lambda c: _select(c, "--sites", c.text(b"{\"1\": \"\xff\"}", "sites.json")), "sites.json"),
    ("phantom-image-time-yesterday", lambda c: ["quant", "phantom", str(NM), "--phantom", str(PHANTOM), "--image-time", "yesterday",
                                                "--out", str(c.prev)], "ISO date-time"),
    ("phantom-description-junk", lambda c: ["quant", "phantom", str(NM), "--phantom", c.text(b"\x00\x01", "p.json"), "--out", str(c.prev)], "p.json"),
    # --- run study
    ("study-manifest-not-utf8", lambda c: _study(c, manifest=c.manifest(raw="study,label\nstudy,M\xfcller\n".encode("latin-1"))), "not UTF-8"),
    ("study-manifest-nul", lambda c: _study(c, manifest=c.manifest(raw=b"study\x00,label\n")), "NUL"),
    ("study-label-traversal", lambda c: _study(c, "--deidentify", manifest=c.manifest("study,label\nstudy,../../somewhere\n")), "label"),
    ("study-label-absolute", lambda c: _study(c, "--deidentify", manifest=c.manifest("study,label\nstudy,/etc/cron.d/x\n")), "label"),
    ("study-label-too-long", lambda c: _study(c, manifest=c.manifest("study,label\nstudy," + "L" * 300 + "\n")), "label"),
    ("study-manifest-missing", lambda c: _study(c, manifest=str(c.tmp / "none.csv")), "no such manifest"),
    ("study-out-existing-file", lambda c: _study(c, out=_a_file(c)), "not a folder"),
    ("study-out-read-only", lambda c: _study(c, out=READ_ONLY), "cannot write"),
    ("study-store-junk", lambda c: _study(c, store=_junk_store(c)), "not a database"),
    ("study-store-folder", lambda c: _study(c, store=str(c.inputs)), "not a file"),
    ("study-grid-sensitivity-nan", lambda c: _study(c, "--grid", "sensitivity=9,nan"), "sensitivity"),
    ("study-set-beta-nan", lambda c: _study(c, "--set", "algorithm=bsrem", "--set", "beta=nan"), "beta"),
    ("study-set-iterations-zero", lambda c: _study(c, "--set", "iterations=0"), "at least 1"),
    # --- run after-scan and reprocess
    ("scan-store-junk", lambda c: ["run", "after-scan", "--once", "--source", str(c.inputs), "--out", str(c.prev), "--store", _junk_store(c)],
     "not a database"),
    ("scan-out-existing-file", lambda c: ["run", "after-scan", "--once", "--source", str(c.inputs), "--out", _a_file(c)], "not a folder"),
    ("scan-source-missing", lambda c: ["run", "after-scan", "--once", "--source", str(c.tmp / "noinbox"), "--out", str(c.prev),
                                       "--store", str(c.inputs / "s.sqlite")], "does not exist"),
    ("scan-interval-nan", lambda c: ["run", "after-scan", "--once", "--interval", "nan"], "finite"),
    ("scan-set-sensitivity-inf", lambda c: ["run", "after-scan", "--once", "--set", "sensitivity=inf"], "sensitivity"),
    ("reprocess-uid-traversal", lambda c: ["run", "reprocess", "../../x", "--store", str(c.inputs / "s.sqlite")], "not a Study Instance UID"),
    ("reprocess-store-junk", lambda c: ["run", "reprocess", "1.2.3", "--store", _junk_store(c)], "not a database"),
    ("reprocess-out-existing-file", lambda c: ["run", "reprocess", "1.2.3", "--out", _a_file(c), "--store", str(c.inputs / "s.sqlite")],
     "not a folder"),
]


def syn_pet(ctx: Ctx, dose: str | None = None, **values: str) -> str:
    """A copy of the small PET series with header values replaced (as text, however wrong)."""
    folder = ctx.inputs / "pet"
    folder.mkdir()
    for path in sorted(ctx.pet.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        for keyword, value in values.items():
            _raw_value(keyword, value.encode() + b" " * (len(value) % 2))(ds)
        if dose is not None:
            item = ds.RadiopharmaceuticalInformationSequence[0]
            raw = dose.encode() + b" " * (len(dose) % 2)
            item[0x00181074] = pydicom.dataelem.RawDataElement(pydicom.tag.Tag(0x00181074), "DS", len(raw), raw, 0, True, True)
        ds.save_as(folder / path.name)
    return str(folder)


@pytest.fixture(scope="module")
def small_pet(tmp_path_factory) -> tuple[Path, list[str]]:
    folder = tmp_path_factory.mktemp("hostile_pet")
    scene = syn.psma_scene([syn.SphereLesion((0.0, 40.0, 0.0), 15.0, 20.0)], size=(32, 32, 36), spacing=(6.0, 6.0, 6.0))
    syn.write_pet_series(scene.suv, folder / "pet")
    masks = []
    for name, mask in scene.masks.items():
        sitk.WriteImage(mask, str(folder / f"{name}.nii.gz"))
        masks.append(f"{name}={folder / f'{name}.nii.gz'}")
    return folder / "pet", masks


def _tree(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (links not followed): its mode, and for files their size and
    modification time (a folder's time changes when a writability probe comes and goes)."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            info = path.lstat()
            out[str(path.relative_to(root))] = (info.st_mode,) + (() if path.is_dir() and not path.is_symlink() else (info.st_size, info.st_mtime_ns))
    return out


@pytest.fixture()
def ctx(tmp_path, small_pet, monkeypatch) -> Ctx:
    monkeypatch.setenv("THERAFLOW_HOME", str(tmp_path / "home"))   # nothing may land in a default place
    monkeypatch.delenv("THERAFLOW_STORE", raising=False)
    monkeypatch.delenv("THERAFLOW_OUT", raising=False)
    monkeypatch.delenv("THERAFLOW_SOURCE", raising=False)
    monkeypatch.delenv("THERAFLOW_SENSITIVITY_REGISTRY", raising=False)
    prev = tmp_path / "prev"   # a previous result of every command: must stay as it is
    prev.mkdir()
    for marker in ("recon.json", "selection.json", "phantom_qc.json", "results.csv"):
        (prev / marker).write_text('{"previous": true}\n')
    return Ctx(tmp_path, *small_pet)


def test_the_corpus_is_large_and_its_ids_unique():
    ids = [case[0] for case in CASES]
    assert len(ids) >= 60 and len(set(ids)) == len(ids)


@pytest.mark.parametrize(("build", "phrase"), [pytest.param(b, p, id=i) for i, b, p in CASES])
def test_refused_with_one_error_line(ctx, capsys, build, phrase):
    argv = build(ctx)
    before = _tree(ctx.tmp)
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as exc:   # argparse's refusals
        code = exc.code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    if phrase is not None:
        assert phrase in lines[0], lines[0]
    assert _tree(ctx.tmp) == before, "something was written (or the previous result changed)"
    assert not Path(READ_ONLY).exists()


@pytest.mark.parametrize("case", ["sensitivity-nan", "nm-frames-text", "ct-gap", "study-store-junk", "study-out-existing-file"])
def test_a_fresh_process_exits_2_without_traceback(ctx, case):
    build = next(b for i, b, _ in CASES if i == case)
    argv = build(ctx)
    before = _tree(ctx.tmp)
    proc = run_cli(*argv)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert _tree(ctx.tmp) == before


def test_pet_without_accession_number_is_selected(ctx, tmp_path):
    """Common in real files: AccessionNumber absent (type 2 allows only empty); the SR gets it empty."""
    pet = tmp_path / "pet"
    pet.mkdir()
    for path in sorted(ctx.pet.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        del ds.AccessionNumber
        ds.save_as(pet / path.name)
    out = tmp_path / "selected"
    assert cli.main(_select(ctx, pet=str(pet), out=str(out))) == 0
    assert pydicom.dcmread(out / "sr.dcm").AccessionNumber == ""


def test_ct_of_another_frame_is_used_when_stated_registered(ctx, tmp_path):
    """The opt-in: the same CT that is refused above reconstructs with --ct-registered, and says so."""
    out = tmp_path / "registered"
    ct = ctx.ct(_other_frame)
    assert cli.main(_recon(ctx, None, "--ct-registered", "--iterations", "1", "--subsets", "1", "--no-psf", "--scatter", "none",
                           ct=ct, out=str(out))) == 0
    inputs = json.loads((out / "recon.json").read_text())["inputs"]
    assert inputs["ct_alignment"] == "other frame of reference, stated registered (--ct-registered)"


def test_flows_refuse_a_ct_of_another_frame(tmp_path):
    """No CT shares the NM frame of reference: the plan says why instead of taking the largest CT."""
    inbox = tmp_path / "inbox"
    (inbox / "ct").mkdir(parents=True)
    shutil.copy(NM, inbox / "nm.dcm")
    frame = generate_uid()
    for path in sorted(CT.glob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        ds.FrameOfReferenceUID = frame
        ds.save_as(inbox / "ct" / path.name)
    source = FolderSource(inbox)
    plan = jobs.plan_study(source.inventory(source.list_studies(None)[0]), require_ct=False)
    assert plan.ct_series is None and "no CT series shares the NM frame of reference" in plan.problem

"""Every therapy nuclide end to end (issue #13, done-when bullet 2): I-131 with a high-energy
collimator, In-111 (171 and 245 keV, ``--photopeaks all``), Pb-212 (239 keV, Tl-208's 583 keV
photons in equilibrium) and the alpha emitter Ra-223 (154 and 270 keV, ``--photopeaks all``), each a Monte Carlo sample made by ``simulate_lu177_mc.py --nuclide``
(photon transport, ray-traced hexagonal-hole
collimator with septal penetration, energy resolution; it takes only the photon lines, data, from
theraflow), calibrated by ``theraflow calibrate spect`` of its own simulated point source in air,
reconstructed with the defaults. One reconstruction per sample (module-scoped fixture).

The samples (data-samples/<nuclide>-mc) are committed; their READMEs give the regeneration
command. ``test_committed_sample_is_what_the_simulator_sets_up`` checks cheaply that each sample's
truth file and header are what the simulator sets up for that nuclide and collimator today (lines,
windows, holes, activity, seed), without re-running the transport."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pydicom
import pytest
from test_spect_mc_sample import figures

ROOT = Path(__file__).resolve().parents[1]
SIMULATOR = ROOT / "data-samples" / "simulate_lu177_mc.py"


@dataclass(frozen=True)
class Case:
    nuclide: str
    folder: str
    collimator: str
    photopeaks: str          # recon spect --photopeaks
    total_tolerance: float   # relative, on the total activity in the field of view

    @property
    def path(self) -> Path:
        return ROOT / "data-samples" / self.folder


CASES = {c.nuclide: c for c in (
    Case("I-131", "i131-mc", "HEGP", "main", 0.05),
    Case("In-111", "in111-mc", "MEGP", "all", 0.05),
    Case("Pb-212", "pb212-mc", "MEGP", "main", 0.05),
    Case("Ra-223", "ra223-mc", "MEGP", "all", 0.10),     # an alpha emitter: the 10 %
)}

# calibrate spect of Ra-223's point source in air misses the true primary sensitivity by -18 % (155 keV) and
# -10 % (270 keV): its TEW removes neighbouring lines' primaries (144 and 122 keV, 324 keV) as scatter
CALIBRATION_CASES = [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=(
    "Ra-223: calibrate spect gives 7.086 and 13.817 cps/MBq against the true 8.654 and 15.30 (-18.1 %, -9.7 %): "
    "TEW in air subtracts the primaries of the neighbouring lines"))) if n == "Ra-223" else n for n in CASES]


def fresh_simulator(name: str, set_up: Callable[[ModuleType], None]) -> ModuleType:
    """A fresh copy of the simulator module (its own module ``name``), ``set_up`` applied to it."""
    spec = importlib.util.spec_from_file_location(name, SIMULATOR)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module       # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        set_up(module)
    finally:
        del sys.modules[spec.name]
    return module


def simulator_set_up(case: Case) -> ModuleType:
    """The simulator set up for ``case`` as its command line would."""
    def set_up(module: ModuleType) -> None:
        module.use_nuclide(case.nuclide)
        module.use_collimator(case.collimator)
    return fresh_simulator(f"simulate_mc_{case.folder}", set_up)


def truth_of(case: Case) -> dict:
    if not (case.path / "nm" / "projections.dcm").exists():
        pytest.fail(f"sample missing: run python {SIMULATOR.relative_to(ROOT)} --nuclide {case.nuclide} "
                    f"--collimator {case.collimator} --out {case.path.relative_to(ROOT)}")
    return json.loads((case.path / "truth" / "phantom.json").read_text())


@pytest.mark.parametrize("name", CASES)
def test_committed_sample_is_what_the_simulator_sets_up(name):
    case = CASES[name]
    truth, sim = truth_of(case), simulator_set_up(case)
    assert truth["seed"] == sim.SEED
    assert truth["nuclide"]["name"] == case.nuclide
    assert truth["nuclide"]["lines_keV_yield"] == [list(x) for x in sim.LINES]
    assert truth["camera"]["windows_keV"] == {n: [lo, hi] for n, lo, hi in sim.WINDOWS}
    assert truth["camera"]["collimator"] == case.collimator
    assert [truth["camera"]["holes"][k] for k in ("across_flats_mm", "septa_mm", "length_mm")] == list(sim.COLLIMATORS[case.collimator])
    assert truth["camera"]["frame_s"] == sim.FRAME_S
    assert truth["total_activity_MBq"] == round(sim.analytic_activity_mbq()["total_MBq"], 4)
    header = pydicom.dcmread(case.path / "nm" / "projections.dcm", stop_before_pixels=True)
    assert [(float(w.EnergyWindowRangeSequence[0].EnergyWindowLowerLimit), float(w.EnergyWindowRangeSequence[0].EnergyWindowUpperLimit))
            for w in header.EnergyWindowInformationSequence] == [(lo, hi) for _, lo, hi in sim.WINDOWS]
    assert {d.CollimatorGridName for d in header.DetectorInformationSequence} == {case.collimator}


def true_sensitivities(truth: dict) -> dict[tuple[float, float], float]:
    """{photopeak window (keV): the simulation's true sensitivity (cps/MBq per head)}."""
    if "photopeak_windows" in truth:
        return {tuple(w["window_keV"]): w["true_cps_per_MBq_per_head"] for w in truth["photopeak_windows"]}
    (peak,) = [w for n, w in truth["camera"]["windows_keV"].items() if n.endswith("_EM")]
    return {tuple(peak): truth["calibration"]["true_photopeak_cps_per_MBq_per_head"]}


@pytest.mark.parametrize("name", CALIBRATION_CASES)
def test_calibrate_spect_of_the_point_source_is_the_sample_registry(name):
    """``calibrate spect`` of the simulated point source in air: within 6 % of the simulation's
    true sensitivity per photopeak window (TEW in air removes some primaries), and the sample's
    registry is what it measured, marked simulated."""
    from conftest import run_cli

    case = CASES[name]
    truth = true_sensitivities(truth_of(case))
    out = json.loads(run_cli("calibrate", "spect", "--nm", str(case.path / "calibration" / "point_source.dcm"),
                             "--photopeaks", "all", check=True).stdout)
    measured = out if isinstance(out, list) else [out]
    assert sorted(tuple(m["window_keV"]) for m in measured) == sorted(truth), measured
    registry = json.loads((case.path / "sensitivity.json").read_text())["entries"]
    assert len(registry) == len(measured)
    for m in measured:
        assert m["nuclide"] == case.nuclide
        assert m["cps_per_MBq"] == pytest.approx(truth[tuple(m["window_keV"])], rel=0.06), (m, truth)
        entry = next(e for e in registry if tuple(e["window_keV"]) == tuple(m["window_keV"]))
        assert entry["cps_per_MBq"] == pytest.approx(m["cps_per_MBq"], rel=1e-4)
        assert entry["collimator"] == case.collimator and entry["origin"] == "simulated"


@pytest.fixture(scope="module", params=list(CASES))
def reconstructed(request, tmp_path_factory) -> tuple[Case, dict, dict, dict]:
    """The default reconstruction of one sample (OSEM, CT attenuation, PSF, TEW, the sample's
    registry, --strict; ``--photopeaks all`` for the two-photopeak nuclides): the case, its
    truth, the reconstruction's figures and its recon.json."""
    from conftest import run_cli

    case = CASES[request.param]
    truth = truth_of(case)
    out = tmp_path_factory.mktemp(case.folder) / "recon"
    run_cli("recon", "spect", "--nm", str(case.path / "nm" / "projections.dcm"), "--ct", str(case.path / "ct"), "--out", str(out),
            "--registry", str(case.path / "sensitivity.json"), "--strict", "--photopeaks", case.photopeaks, check=True)
    result = figures(out, truth)
    print(case.nuclide, json.dumps(result))
    return case, truth, result, json.loads((out / "recon.json").read_text())


def test_total_activity(reconstructed):
    case, truth, result, _ = reconstructed
    assert result["total_MBq"] == pytest.approx(truth["total_activity_MBq"], rel=case.total_tolerance), result


def test_the_reconstruction_used_every_windowed_photopeak_and_its_collimator(reconstructed):
    """The photopeak windows the reconstruction used are the sample's, with the sample's registry
    entries (one per window for ``--photopeaks all``), and the collimator response is that of the
    collimator the header names."""
    case, truth, _, record = reconstructed
    windows = sorted(w for n, w in truth["camera"]["windows_keV"].items() if n.endswith("_EM"))
    if case.photopeaks == "all":
        used = record["joint_photopeaks"]["windows"]
        assert sorted(w["photopeak_window_keV"] for w in used) == windows
        assert all(w["calibration"]["entry"]["origin"] == "simulated" for w in used)
        assert all(w["collimator_response"]["name"].endswith(case.collimator) for w in used)
    else:
        assert [record["windows_keV"]["photopeak"]] == windows and "joint_photopeaks" not in record
        assert record["corrections"]["collimator_response"]["name"].endswith(case.collimator)

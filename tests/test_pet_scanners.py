"""`theraflow recon pet` with its defaults on a held-out simulation (never used to choose a
default): the sample's physical ring described as 188 block modules of 8 x 4 crystals (not
columns; 4 axial modules), gantry alignment rotated by 57 crystal columns (54.6 degrees), crystal
efficiencies +-10 %, another seed, 20 s instead of 35 s (other count level), the phantom moved by
(+25, -15) mm and the scanner's axial centre 10 mm from the spheres' plane (activity outside the
axial field, as in every variant). Generated in a temporary folder by
data-samples/simulate_pet_iec.py (Monte Carlo independent of the reconstruction); reconstructed
with the defaults and with ``--scatter sss``. A second held-out case, a long axial field (64 rings of
4 mm: 256 mm, the whole phantom inside; 16 axial block modules), with its own seed, count level,
rotation, efficiency spread and phantom position, is reconstructed with the defaults and held to
the same bounds. Also: randoms from delayeds on a ring of blocks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pet_truth_checks as checks
import pytest
import SimpleITK as sitk
from conftest import run_cli
from test_pet_sensitivity import _Scanner

from recon.io.petsird_listmode import Coincidences
from recon.pet.randoms import FanSumRandoms

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = ["--layout", "blocks", "--rotation", "57", "--efficiency-spread", "0.10", "--seed", "777", "--duration", "20",
            "--phantom-shift", "25", "-15", "--axial-offset", "10"]

# Long axial FOV (issue 12 item 4): 64 rings x 4 mm = 256 mm covering the whole IEC phantom, as 752
# blocks of 8 x 4 crystals (16 axial modules), 24,064 crystals; other rotation, seed, count level
# (4 s: about the prompts of the short scanner's 20 s), phantom position and axial offset.
# Simulated first on 2026-12-07 (731,242 prompts, scatter 183,657, MC trues / trues expected from the
# PETSIRD efficiencies 1.0009; 6 min wall on the loaded 2-core machine, 4.4 GB peak; 32 min at load
# average 15-19). It could not be reconstructed then (recon pet ran out of memory holding all
# representative LORs at once: 22 GB); with the sensitivity streamed in chunks it runs with the
# defaults (bounded memory: 1.49 GB peak, was 22 GB and killed), held to the bounds set beforehand.
# First measured on 2026-12-07 (14 min for simulation + reconstruction at load average 3-5): RC37 >= 0.8
# and the sphere centres hold; background 1.177, whole field 1.128 and the tail-fitted scatter fraction
# 0.181 (simulated 0.251: -28 %) MISS their bounds. Too little scatter is subtracted, in the direction
# of the excess. Then DIAGNOSED on this case with the simulator's labels of each prompt (README,
# long-axial-field paragraph): the near tails hold no trues and exact randoms leave exactly their scatter, so
# the fit was right and the shape wrong: extend_axially replaced the field's weak (empty) end slices
# by the phantom's end slices, putting 5.9 % of the shape in the tails where 4.5 % of the true scatter
# is (with the true activity: scatter fraction 0.192). Fix (physics, scanner-independent): the
# field's own end slices are continued beyond it; with the true activity it gives 0.239. Unchanged
# on the sample (extension bit-identical; no slice was replaced there); the short held-out scanner's
# phantom also crosses both ends of its field (re-run: its tests pass).
# Because this truth has been looked at, the case no longer holds the scatter shape out.
# Re-measured with the fix (2026-12-07, same simulation): background 1.013, whole field 1.016, scatter
# fraction 0.2517 against 0.2512 simulated, RC37 0.88 now HOLD; the 22-mm sphere's centre, 1.54 mm off
# (bound 1.5), now misses: a strict expected failure with that figure. With the coarse per-study
# sensitivity pass that this scanner takes since (recon/pet/sensitivity.py, > 16 M LORs), measured once
# more on main: background 1.008, whole field 1.004, scatter fraction 0.2527, RC37 0.883; centres
# 17/22/28/37 mm: 1.23/1.54/0.84/0.84 mm.
LONG_FOV_MISSED = {
    "spheres": "after the scatter fix the 22-mm sphere is 1.54 mm from its true centre (bound 1.5 mm; 17, 28, 37 mm: "
               "1.23, 0.84, 0.84 mm with the coarse per-study sensitivity); before it every sphere >= 17 mm held",
}
# Why the single-scatter simulation is not the default (issue 12 items 2 and 4: one default for every
# scanner; measured once, 2026-12-08): on this held-out scanner its 22-mm sphere is off its centre; on
# the long axial field (run once, not a test: 72 min at load) it subtracts too much scatter, scatter
# fraction 0.285 against 0.251, background 0.947 and whole field 0.938 (bounds 5 %), 22-mm sphere 1.55 mm.
SSS_MISSED = ("with --scatter sss the held-out scanner's 22-mm sphere is 1.71 mm from its true centre (bound 1.5 mm; "
              "the default scatter: 1.45 mm); 17, 28, 37 mm: 1.13, 0.98, 0.93 mm")
LONG_FOV_SLOW = pytest.mark.skipif(os.environ.get("THERAFLOW_SKIP_SLOW") == "1",
                                   reason="slow: simulates and reconstructs 24,064 crystals (THERAFLOW_SKIP_SLOW=1)")
LONG_FOV = ["--layout", "blocks", "--rings", "64", "--rotation", "123", "--efficiency-spread", "0.10", "--seed", "4242",
            "--duration", "4", "--phantom-shift", "-10", "12", "--axial-offset", "-10"]


def _simulate(tmp_path_factory, name: str, args: list[str]) -> Path:
    data = tmp_path_factory.mktemp(name)
    subprocess.run([sys.executable, str(ROOT / "data-samples" / "simulate_pet_iec.py"), "--out", str(data), *args],
                   check=True, capture_output=True)
    return data


@pytest.fixture(scope="module")
def held_out_data(tmp_path_factory) -> Path:
    return _simulate(tmp_path_factory, "pet-held-out", HELD_OUT)


@pytest.fixture(scope="module")
def long_fov_data(tmp_path_factory) -> Path:
    return _simulate(tmp_path_factory, "pet-long-fov", LONG_FOV)


def _reconstructed(data: Path) -> Path:
    """``theraflow recon pet`` with its defaults on a simulated case, once per case: the output folder."""
    out = data / "recon"
    if not (out / "recon.json").is_file():
        run_cli("recon", "pet", "--listmode", str(data / "listmode.petsird"), "--ct", str(data / "ct"), "--out", str(out), check=True)
    return out


@pytest.fixture(scope="module", params=["held_out_data", pytest.param("long_fov_data", marks=LONG_FOV_SLOW)])
def held_out(request) -> tuple[Path, dict, sitk.Image]:
    data = request.getfixturevalue(request.param)
    out = _reconstructed(data)
    truth = json.loads((data / "truth" / "phantom.json").read_text())
    return data / "truth", truth, sitk.ReadImage(str(out / "recon.nii.gz"))


# Both bounds were set before the held-out truth was first reconstructed, and missed at first
# (2026-12-07: background 0.942, whole field 0.853). Two causes, both fixed in the reconstruction
# (not re-tuned): the image support was cut on the attenuated sensitivity, which dropped the axial
# end planes behind the phantom; and the randoms from delayeds counted each element's partners over
# whole module pairs, 7 % too few randoms with blocks at the edge of the coincidence fan, which the
# tail fit took for scatter. Now 0.984 and 0.969.


def _long_fov_missed(request, bound: str) -> None:
    """Mark the long-FOV case of a held-out test as a strict expected failure (figure measured once)."""
    if request.node.callspec.params.get("held_out") == "long_fov_data":
        request.applymarker(pytest.mark.xfail(strict=True, reason=LONG_FOV_MISSED[bound]))


def test_held_out_background_within_5_percent(held_out):
    truth_dir, truth, image = held_out
    assert checks.background_ratio(image, truth, truth_dir) == pytest.approx(1.0, abs=0.05)


def test_held_out_rc37_at_least_0_8(held_out):
    _, truth, image = held_out
    rc = checks.sphere_rcs(image, truth)
    assert rc[-1] >= 0.8, rc


def test_held_out_spheres_where_they_are(held_out, request):
    """Every sphere of 17 mm or more within 1.5 mm of its true centre (LPS): geometry, gantry
    rotation and block layout read right."""
    _long_fov_missed(request, "spheres")
    _, truth, image = held_out
    offsets = checks.sphere_offsets_mm(image, truth)
    large = np.array([s["diameter_mm"] >= 17 for s in truth["spheres"]])
    assert np.all(offsets[large] <= 1.5), offsets


def test_held_out_activity_in_the_whole_field(held_out):
    truth_dir, _, image = held_out
    ratio = checks.field_activity_ratio(image, truth_dir)
    assert ratio == pytest.approx(1.0, abs=0.05), ratio


@pytest.fixture(scope="module")
def held_out_sss(held_out_data) -> tuple[Path, sitk.Image, dict]:
    """``--scatter sss`` on the held-out scanner, once: truth folder, image, scatter fit."""
    out = held_out_data / "recon-sss"
    run_cli("recon", "pet", "--listmode", str(held_out_data / "listmode.petsird"), "--ct", str(held_out_data / "ct"),
            "--scatter", "sss", "--out", str(out), check=True)
    fit = json.loads((out / "recon.json").read_text())["corrections"]["scatter"]
    return held_out_data / "truth", sitk.ReadImage(str(out / "recon.nii.gz")), fit


def test_held_out_sss_scatter_fraction_within_15_percent_of_the_simulated(held_out_sss):
    """``--scatter sss`` on the held-out scanner (its Monte Carlo scatter is photon transport, no
    constant of the single-scatter simulation was chosen on it): the tail-fitted scatter fraction
    within 15 % of the simulated one (measured 0.272 against 0.246)."""
    truth_dir, _, fit = held_out_sss
    counts = json.loads((truth_dir / "phantom.json").read_text())["counts"]
    assert fit["method"] == "tail-fitted single-scatter simulation"
    assert fit["scatter_fraction"] == pytest.approx(counts["scatter"] / counts["prompts"], rel=0.15)


def test_held_out_sss_image_within_the_bounds_of_the_defaults(held_out_sss):
    """Issue 12 item 4's image bounds with ``--scatter sss`` (whether SSS could be the default):
    background and whole-field activity within 5 %, RC37 >= 0.8 (measured 0.978, 0.972, 0.90)."""
    truth_dir, image, _ = held_out_sss
    truth = json.loads((truth_dir / "phantom.json").read_text())
    assert checks.background_ratio(image, truth, truth_dir) == pytest.approx(1.0, abs=0.05)
    assert checks.field_activity_ratio(image, truth_dir) == pytest.approx(1.0, abs=0.05)
    assert checks.sphere_rcs(image, truth)[-1] >= 0.8


@pytest.mark.xfail(strict=True, reason=SSS_MISSED)
def test_held_out_sss_spheres_where_they_are(held_out_sss):
    """Every sphere of 17 mm or more within 1.5 mm of its true centre with ``--scatter sss``."""
    truth_dir, image, _ = held_out_sss
    truth = json.loads((truth_dir / "phantom.json").read_text())
    offsets = checks.sphere_offsets_mm(image, truth)
    large = np.array([s["diameter_mm"] for s in truth["spheres"]]) >= 17
    assert np.all(offsets[large] <= 1.5), offsets


@LONG_FOV_SLOW
def test_long_fov_scatter_fraction_within_15_percent_of_the_simulated(long_fov_data):
    """The defaults' (tail-fitted) scatter fraction on the long axial field within 15 % of the
    simulated one (photon transport), the bound set before it was first reconstructed: 0.181 then
    (-28 %); 0.2517 against 0.2512 since the shape continues the field's own end slices (diagnosed
    on this case, see the comment at LONG_FOV)."""
    counts = json.loads((long_fov_data / "truth" / "phantom.json").read_text())["counts"]
    fit = json.loads((_reconstructed(long_fov_data) / "recon.json").read_text())["corrections"]["scatter"]
    assert fit["scatter_fraction"] == pytest.approx(counts["scatter"] / counts["prompts"], rel=0.15)


def test_fan_sum_randoms_of_blocks_at_the_edge_of_the_coincidence_fan():
    """Randoms from delayeds on a ring of 4 x 4 blocks whose module pairs at the edge of the
    coincidence fan hold element pairs both in and out of coincidence (the held-out layout's
    case): delayeds drawn here with probability ~ S_i S_j over the element pairs in coincidence,
    from known singles S. The model's randoms add up to the delayeds over exactly those pairs and
    follow S_i S_j pair by pair. (Partners counted per module pair put 7 % fewer randoms than
    delayeds on the held-out scanner, hence too much tail-fitted scatter: background 0.93.)"""
    scanner = _Scanner((4, 4))
    first, second = np.tril_indices(scanner.n_elements, -1)
    in_coincidence = scanner.pair_efficiency(first, second) > 0
    per_module = scanner.pair_efficiency.elements_per_module
    module_pairs = scanner.pair_efficiency.sgid[first // per_module, second // per_module] >= 0
    assert np.any(module_pairs & ~in_coincidence)  # the case under test exists
    first, second = first[in_coincidence], second[in_coincidence]
    rng = np.random.default_rng(11)
    singles = rng.uniform(0.5, 1.5, scanner.n_elements)
    truth = singles[first] * singles[second]
    n_delayeds = 400_000
    drawn = rng.choice(first.size, n_delayeds, p=truth / truth.sum())
    zeros = np.zeros(n_delayeds, dtype=np.int64)
    acq = SimpleNamespace(n_elements=scanner.n_elements, pair_efficiency=scanner.pair_efficiency, tof_edges_mm=np.arange(3.0),
                          delayeds=Coincidences(first[drawn], second[drawn], zeros, np.ones(n_delayeds)))
    model = FanSumRandoms(acq).per_pair(first, second)
    assert model.sum() == pytest.approx(n_delayeds, rel=1e-6)
    ratio = model / (truth * n_delayeds / truth.sum())
    # ~1600 delayeds per element: 2.5 % noise per element's singles, 3.6 % per pair
    assert abs(ratio.mean() - 1) <= 0.005 and np.sqrt(np.mean((ratio - 1) ** 2)) <= 0.045, ratio


LONG_FOV_GEOMETRY = """
import json, sys
import numpy as np
sys.path.insert(0, "data-samples")
import simulate_pet_iec as sim
sim.configure(layout="blocks", rings=64)
n = sim.N_MOD * sim.N_RING
header = sim.make_header(np.ones(n), np.zeros((sim.N_SGID, sim.N_RING, sim.N_RING)), 1.0)
modules = header.scanner.scanner_geometry.replicated_modules[0]
corners = np.array([c.c for c in modules.object.detecting_elements.object.shape.corners], dtype=float)
centre = np.append(corners.mean(axis=0), 1.0)
elements = np.array([np.vstack([t.matrix, [0, 0, 0, 1]]) @ centre for t in modules.object.detecting_elements.transforms])
in_file = np.concatenate([(np.vstack([t.matrix, [0, 0, 0, 1]]) @ elements.T)[:3].T for t in modules.transforms])
b = np.arange(n)
mc = sim.box_centre(b // sim.N_RING, b % sim.N_RING).T
print(json.dumps({"modules": len(modules.transforms), "elements": len(elements), "z_mm": [float(mc[:, 2].min()), float(mc[:, 2].max())],
                  "max_deviation_mm": float(np.abs(in_file[sim.file_bin(b)] - mc).max())}))
"""


def test_long_fov_scanner_description_matches_the_monte_carlo():
    """The long-FOV variant's PETSIRD description (64 rings as 16 axial rows of 8 x 4 blocks) puts
    every crystal where the Monte Carlo detects it: box centres from the module and element
    transforms at the detection bin of each simulated crystal, within float32 rounding (in a
    separate process: the simulator's variant lives in module globals)."""
    run = subprocess.run([sys.executable, "-c", LONG_FOV_GEOMETRY], cwd=ROOT, check=True, capture_output=True, text=True)
    geometry = json.loads(run.stdout)
    assert (geometry["modules"], geometry["elements"]) == (752, 32)
    assert geometry["z_mm"] == [-126.0, 126.0]
    assert geometry["max_deviation_mm"] < 1e-3, geometry

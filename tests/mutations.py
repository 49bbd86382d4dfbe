"""Ten deliberate breaks of the physics or of a rule (issue #14, item 3), each with the accuracy
tests that must fail under it. Applied from outside production code, which carries no hook.

Used as a pytest plugin: ``THERAFLOW_MUTATION=<name> python -m pytest -p mutations ...`` (with
``tests`` on PYTHONPATH) applies the mutation at start-up, before any test module is imported,
and also in the ``theraflow`` processes the tests start through ``conftest.run_cli``. Without the
variable the plugin does nothing. ``tests/mutation_check.py`` runs each mutation's tests in a
subprocess and requires that they fail (and that they pass unmutated).

A mutation either wraps a function (replacing it in every loaded theraflow module that bound it)
or rewrites one expression in a function's source; the expression must occur exactly once, so a
change of the production code that moves it makes the mutation fail loudly instead of silently
not mutating.
"""

from __future__ import annotations

import __future__
import importlib
import inspect
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ENV = "THERAFLOW_MUTATION"
_PACKAGES = ("recon", "quant", "flows")


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str                      # the break, in words
    apply: Callable[[], None]
    tests: tuple[str, ...]         # node ids (relative to the repository root) that must fail
    shared_data: str | None = None  # the ../shared/data path those tests need, if any


def _rebind(old: object, new: object) -> None:
    """Replace ``old`` by ``new`` wherever a loaded theraflow module bound it by name."""
    for name, module in list(sys.modules.items()):
        if module is None or name.split(".")[0] not in _PACKAGES:
            continue
        for attribute, value in list(vars(module).items()):
            if value is old:
                setattr(module, attribute, new)


def _wrap(module_name: str, name: str, make: Callable[[Callable], Callable]) -> None:
    """Replace function ``module_name.name`` by ``make(original)``."""
    module = importlib.import_module(module_name)
    original = getattr(module, name)
    _rebind(original, make(original))


def _rewrite(module_name: str, function: str, old: str, new: str) -> None:
    """Recompile ``module_name.function`` with the one occurrence of ``old`` replaced by ``new``."""
    module = importlib.import_module(module_name)
    original = getattr(module, function)
    source = textwrap.dedent(inspect.getsource(original))
    if source.count(old) != 1:
        raise RuntimeError(f"mutation target {old!r} occurs {source.count(old)} times in {module_name}.{function}: "
                           "update tests/mutations.py to the production code")
    code = compile(source.replace(old, new), inspect.getsourcefile(original), "exec",
                   flags=__future__.annotations.compiler_flag, dont_inherit=True)
    namespace = vars(module)
    exec(code, namespace)  # defines the mutant under the same name in the module
    mutant = namespace[function]
    namespace[function] = original
    _rebind(original, mutant)


# --------------------------------------------------------------------------- the ten mutations


def _spect_psf_off() -> None:
    def make(original):
        def system_matrix(geometry, rows, mu_map, response, *args, **kwargs):
            return original(geometry, rows, mu_map, None, *args, **kwargs)
        return system_matrix
    _wrap("recon.spect.system", "system_matrix", make)


def _spect_scatter_off() -> None:
    def make(original):
        def energy_window_scatter(*args, **kwargs):
            return np.zeros_like(original(*args, **kwargs))
        return energy_window_scatter
    _wrap("recon.spect.scatter", "energy_window_scatter", make)


def _rotation_flipped() -> None:
    _rewrite("recon.io.nm_projections", "_angles_and_radii",
             'sign = -1.0 if str(rot_item.get("RotationDirection", "CC")).upper() == "CW" else 1.0',
             'sign = 1.0 if str(rot_item.get("RotationDirection", "CC")).upper() == "CW" else -1.0')


def _bed_offset_flipped() -> None:
    _rewrite("recon.io.nm_projections", "stitch_beds",
             "round((g0.z_first_row_mm - b.geometry.z_first_row_mm) / g0.pixel_mm)",
             "round((b.geometry.z_first_row_mm - g0.z_first_row_mm) / g0.pixel_mm)")


def _sensitivity_high() -> None:
    def make(original):
        def bq_per_ml_scale(cps_per_MBq, *args, **kwargs):
            return original(1.1 * cps_per_MBq, *args, **kwargs)
        return bq_per_ml_scale
    _wrap("recon.spect.calibration", "bq_per_ml_scale", make)


def _hu_mu_slope() -> None:
    def make(original):
        def hu_to_mu(hu, energy_keV, kvp):
            mu = original(hu, energy_keV, kvp)
            water = original(np.zeros(1), energy_keV, kvp)[0]
            return np.where(mu > 0, np.maximum(water + 1.2 * (mu - water), 0.0), 0.0).astype(np.float32)
        return hu_to_mu
    _wrap("recon.spect.attenuation", "hu_to_mu", make)


def _pet_tof_flipped() -> None:
    from recon.pet.projector import ListModeProjector

    def flipped(original):  # TOF position measured towards p1: l → −l; non-TOF line integrals unchanged
        def method(self, values, p1, p2, tof_bin=None):
            return original(self, values, p1, p2) if tof_bin is None else original(self, values, p2, p1, tof_bin)
        return method
    # both public methods, so the C kernel and the PyTorch path are mutated alike
    ListModeProjector.forward = flipped(ListModeProjector.forward)
    ListModeProjector.back = flipped(ListModeProjector.back)


def _pet_randoms_off() -> None:
    from recon.pet.randoms import FanSumRandoms

    original = FanSumRandoms.per_pair  # per_tof_bin and the pipeline's LOR groups use it
    FanSumRandoms.per_pair = lambda self, first, second: np.zeros_like(original(self, first, second))
    _wrap("recon.pet.randoms", "randoms_from_tof_margins", lambda original: lambda *args: 0.0)


def _suv_decay_wrong_time() -> None:
    from quant import suv

    def make(original):
        def _start_reference(series, half_life_s):
            return min(suv._acquisition_starts(series)), original(series, half_life_s)[1]
        return _start_reference
    _wrap("quant.suv", "_start_reference", make)


def _selection_threshold_step() -> None:
    def make(original):
        def load_criteria(*args, **kwargs):
            criteria = original(*args, **kwargs)
            criteria["therap"]["at_least_one_site_min"] += 0.01  # one step of tests/test_selection_thresholds.py
            return criteria
        return load_criteria
    _wrap("quant.selection", "load_criteria", make)


_SPECT = "tests/test_spect_phantom.py::"
_MC = "tests/test_spect_mc_sample.py::"  # the Monte Carlo sample: a truth that shares no model with the reconstruction
MUTATIONS = {m.name: m for m in (
    Mutation("spect-psf-off", "SPECT collimator-detector response (PSF) not modelled", _spect_psf_off,
             (_MC + "test_recovery_of_the_largest_spheres", _SPECT + "test_psf_modelling_recovers_more_than_without")),
    Mutation("spect-scatter-off", "SPECT energy-window scatter estimate zero (no scatter correction)", _spect_scatter_off,
             (_MC + "test_background_concentration_within_5_percent", _SPECT + "test_background_concentration_within_5_percent")),
    Mutation("rotation-flipped", "NM RotationDirection read the wrong way (CW as CC)", _rotation_flipped,
             (_MC + "test_sphere_centroids_within_2_mm", _SPECT + "test_activity_lands_where_the_ct_says")),
    Mutation("bed-offset-flipped", "axial offset between bed positions with the wrong sign", _bed_offset_flipped,
             ("tests/test_nm_reader.py::test_ge_two_beds_are_stitched",), "spect-lu177-ge-d670/NM.zip"),
    Mutation("sensitivity-x1.1", "SPECT sensitivity used for Bq/mL 10 % too high", _sensitivity_high,
             (_MC + "test_total_activity_within_5_percent", _SPECT + "test_total_activity_within_5_percent")),
    Mutation("hu-mu-slope-x1.2", "HU→μ slope ×1.2 on both segments of the bilinear line", _hu_mu_slope,
             ("tests/test_attenuation.py::test_mu_map_of_the_sample_on_a_spect_grid",)),
    Mutation("pet-tof-flipped", "PET TOF coordinate with the wrong sign in the projector", _pet_tof_flipped,
             ("tests/test_pet.py::test_one_tof_update_is_centred_on_the_source",)),
    Mutation("pet-randoms-off", "PET randoms estimate zero (delayeds and TOF-margin estimators)", _pet_randoms_off,
             ("tests/test_pet.py::test_randoms_add_no_activity",)),
    Mutation("suv-decay-wrong-time", "SUV dose decayed to the earliest AcquisitionTime instead of the scan reference time",
             _suv_decay_wrong_time, ("tests/test_suv.py::test_ge_private_scan_time_takes_precedence",)),
    Mutation("selection-threshold-step", "TheraP SUVmax ≥ 20 threshold moved up by one step (0.01)", _selection_threshold_step,
             ("tests/test_selection_thresholds.py::test_therap_one_site_at_suvmax_20",)),
)}


# --------------------------------------------------------------------------- pytest plugin


def _mutated_run_cli(name: str):
    """``conftest.run_cli`` running ``theraflow`` with mutation ``name`` applied in the child."""
    root = Path(__file__).resolve().parents[1]
    boot = ("import sys; sys.path.insert(0, 'tests'); import mutations; mutations.MUTATIONS[sys.argv[1]].apply(); "
            "from flows.cli import main; sys.exit(main(sys.argv[2:]))")

    def run_cli(*args: str, check: bool = False) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-c", boot, name, *args], capture_output=True, text=True, cwd=root)
        if check and proc.returncode != 0:
            raise AssertionError(f"theraflow {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc
    return run_cli


def pytest_sessionstart(session) -> None:
    name = os.environ.get(ENV)
    if not name:
        return
    MUTATIONS[name].apply()
    conftest = sys.modules["conftest"]
    conftest.run_cli = _mutated_run_cli(name)

"""Dosimetry from VOI activities: doses against the MIRD and sphere formulas, the uncertainty
budget's bookkeeping, and the analytic budget against Monte Carlo resampling of the whole chain."""

from __future__ import annotations

import math

import pytest

from quant.dosimetry import organ, study, tac

from dosimetry_fixtures import TEST_S_TABLE_CITATION, write_test_s_table

LP = tac.physical_decay_per_h()
TIMES = [24.0, 96.0, 168.0]


def mono(a0: float, lam: float) -> tuple[float, ...]:
    return tuple(a0 * math.exp(-lam * t) for t in TIMES)


@pytest.fixture()
def vois() -> list[study.VoiData]:
    return [
        study.VoiData("Kidneys", "organ", mono(40.0, LP + 0.01), recovery=0.9, recovery_sd=0.05, mass_g=330.0, mass_relative_sd=0.10),
        study.VoiData("liver", "organ", mono(120.0, LP + 0.006), recovery_sd=0.02, mass_g=1700.0, mass_relative_sd=0.05),
        study.VoiData("total_body", "organ", mono(2500.0, LP + 0.02)),
        study.VoiData("L1", "lesion", mono(15.0, LP + 0.002), recovery=0.7, recovery_sd=0.07, volume_mL=8.0, mass_relative_sd=0.15),
    ]


@pytest.fixture()
def mird(tmp_path) -> dict:
    """DoseSettings fields for the made-up test S-value table."""
    return {"s_values": str(write_test_s_table(tmp_path / "s.csv")), "s_values_source": TEST_S_TABLE_CITATION}


def test_doses_follow_the_formulas(vois, mird):
    settings = study.DoseSettings(tac_model="mono", administered_MBq=7400.0, **mird)
    table = organ.read_s_table(mird["s_values"], TEST_S_TABLE_CITATION)
    results = {r.name: r for r in study.dosimetry(TIMES, vois, settings)}
    kidney_tia = 40.0 / 0.9 / (LP + 0.01)  # noise-free mono-exponential, recovery-corrected
    liver_tia = 120.0 / (LP + 0.006)
    body_tia = 2500.0 / (LP + 0.02)
    assert results["Kidneys"].tia.value == pytest.approx(kidney_tia, rel=1e-4)
    assert results["Kidneys"].tiac_h == pytest.approx(kidney_tia / 7400.0, rel=1e-4)
    expected = organ.organ_doses({"kidneys": kidney_tia, "liver": liver_tia, "remainder": body_tia - kidney_tia - liver_tia},
                                 {"kidneys": 330.0, "liver": 1700.0}, targets=["kidneys"], table=table)["kidneys"].dose_Gy
    assert results["Kidneys"].dose.value == pytest.approx(expected, rel=1e-4)
    lesion = organ.sphere_dose("L1", 15.0 / 0.7 / (LP + 0.002), 8.0)
    assert results["L1"].dose.value == pytest.approx(lesion.dose_Gy, rel=1e-4)
    assert results["Kidneys"].bed.value > results["Kidneys"].dose.value  # kidney BED by default
    assert results["liver"].bed is None
    assert TEST_S_TABLE_CITATION in results["Kidneys"].method


def test_electron_self_dose_without_table(vois):
    """No S-value table: each organ's dose is its own TIA × E_e / its mass; the mass enters with
    sensitivity −1 (10 % mass uncertainty → 10 % of the dose); the total body is its own target."""
    results = {r.name: r for r in study.dosimetry(TIMES, vois, study.DoseSettings(tac_model="mono"))}
    kidney_tia = 40.0 / 0.9 / (LP + 0.01)
    joules_per_MBq_h = 3.6e9 * 0.147923 * 1.602176634e-13
    kidney = results["Kidneys"]
    assert kidney.dose.value == pytest.approx(kidney_tia * joules_per_MBq_h / 0.330, rel=1e-4)
    assert kidney.dose.components["mass:Kidneys"] == pytest.approx(0.10 * kidney.dose.value, rel=1e-9)
    assert kidney.method.startswith(organ.ELECTRON_ONLY) and organ.ELECTRON_ONLY in kidney.notes
    body = results["total_body"]  # no CT mass: ICRP-89 reference 73 kg
    assert body.mass_g == 73000.0 and body.dose.value == pytest.approx(2500.0 / (LP + 0.02) * joules_per_MBq_h / 73.0, rel=1e-4)


def test_budget_bookkeeping(vois, mird):
    settings = study.DoseSettings(tac_model="mono", calibration_relative_sd=0.04, **mird)
    results = {r.name: r for r in study.dosimetry(TIMES, vois, settings)}
    kidney = results["Kidneys"]
    assert kidney.tia.components["calibration"] == pytest.approx(0.04 * kidney.tia.value)
    assert kidney.tia.components["recovery:Kidneys"] == pytest.approx(kidney.tia.value * 0.05 / 0.9)
    assert sum(kidney.dose.shares.values()) == pytest.approx(1.0)
    # calibration scales every source alike, the remainder (body − organs) included: exactly 4 % of the dose
    assert kidney.dose.components["calibration"] == pytest.approx(0.04 * kidney.dose.value, rel=1e-9)
    # the kidney mass enters through the self-dose only: u = 10 % × |(m/S)dS/dm| × self-dose
    s_self, sensitivity = organ.self_s_value(organ.read_s_table(mird["s_values"], TEST_S_TABLE_CITATION), "kidneys", 330.0)
    self_dose = kidney.tia.value * 3600.0 * s_self * 1e-3
    assert kidney.dose.components["mass:Kidneys"] == pytest.approx(0.10 * abs(sensitivity) * self_dose, rel=1e-9)


def test_analytic_budget_matches_monte_carlo(vois, mird):
    """The first-order budget and 200 resampled repetitions of the whole chain (calibration,
    recovery, mass and per-point noise all drawn) agree within 20 % for organs and lesions."""
    settings = study.DoseSettings(tac_model="mono", point_relative_sd=0.05, calibration_relative_sd=0.03, **mird)
    results = {r.name: r for r in study.dosimetry(TIMES, vois, settings)}
    check = study.monte_carlo(TIMES, vois, settings, repetitions=200)
    assert check.failed == 0
    for name in ("Kidneys", "liver", "L1"):
        assert check.tia_sd[name] == pytest.approx(results[name].tia.sd, rel=0.2), name
        assert check.dose_sd[name] == pytest.approx(results[name].dose.sd, rel=0.2), name


def test_single_time_point_and_refusals(vois):
    one = [study.VoiData("kidneys", "organ", (30.0,), mass_g=300.0)]
    result = study.dosimetry([96.0], one)[0]
    assert result.integration.method == "hanscheid"
    assert result.tia.value == pytest.approx(30.0 * 2 * 96.0 / math.log(2))
    madsen = study.dosimetry([96.0], one, study.DoseSettings(single_time_point="madsen", madsen_half_life_h={"kidneys": (50.0, 5.0)}))[0]
    assert madsen.integration.method == "madsen" and madsen.tia.components["fit:kidneys"] > 0
    with pytest.raises(ValueError, match="half-life"):
        study.dosimetry([96.0], one, study.DoseSettings(single_time_point="madsen"))
    with pytest.raises(ValueError, match="activities for"):
        study.dosimetry(TIMES[:2], vois)
    with pytest.raises(ValueError, match="citation"):
        study.DoseSettings(s_values="s.csv")
    with pytest.raises(ValueError, match="unknown dosimetry settings"):
        study.DoseSettings.from_dict({"alpha": 1})
    with pytest.raises(ValueError, match="volume"):
        study.VoiData("L2", "lesion", (1.0,))

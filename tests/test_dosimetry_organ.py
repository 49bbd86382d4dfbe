"""Organ (MIRD) doses, mass scaling, the remainder of body, the sphere model and BED against
hand computations and independent checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate

from quant.dosimetry import kernel as K
from quant.dosimetry import organ as O
from quant.dosimetry import tac

from dosimetry_fixtures import TEST_S_TABLE_CITATION, write_test_s_table


E_E_MEV = 0.147923  # ICRP-107 Lu-177 electron energy per decay (β + conversion + Auger), MeV
MEV_J = 1.602176634e-13


@pytest.fixture()
def table(tmp_path) -> O.SValueTable:
    return O.read_s_table(write_test_s_table(tmp_path / "s.csv"), TEST_S_TABLE_CITATION)


def test_read_s_table(table, tmp_path):
    assert table.value("kidneys", "liver") == 1.2e-7  # row Kidneys (target), column Liver (source)
    assert table.value("liver", "kidneys") == 1.1e-7
    assert table.value("red_marrow", "red_marrow") == 1.5e-5 and table.value("total_body", "kidneys") == 4.0e-7
    assert table.phantom_mass_g["kidneys"] == 300.0 and "phantom_mass_g" not in table.s
    assert table.citation == TEST_S_TABLE_CITATION and table.has("spleen") and not table.has("lungs")
    # without a phantom_mass_g row: the ICRP-89 adult male masses
    plain = O.read_s_table(write_test_s_table(tmp_path / "plain.csv", with_masses=False), "test")
    assert plain.mass("kidneys") == 310.0 and plain.mass("liver") == 1800.0 and "ICRP Publication 89" in plain.mass_source
    with pytest.raises(ValueError, match="no phantom mass"):
        plain.mass("parotids")
    with pytest.raises(ValueError, match="citation"):
        O.read_s_table(tmp_path / "s.csv", " ")
    (tmp_path / "bad.csv").write_text(",Kidneys,Liver\nKidneys,1e-5\n")
    with pytest.raises(ValueError, match="1 values for 2 sources"):
        O.read_s_table(tmp_path / "bad.csv", "test")


def test_mass_scaling(table):
    """Electrons (absorbed fraction 1 at the phantom mass) scale with 1/mass, the photon rest with 1/mass^(2/3)."""
    s_e = E_E_MEV * MEV_J * 1e6 / 0.300 * 1e3  # mGy/(MBq·s), all electron energy in the 300 g phantom kidney
    s_g = 8.0e-5 - s_e
    assert 0 < s_g < 0.03 * 8.0e-5
    assert O.self_s_value(table, "kidneys")[0] == pytest.approx(8.0e-5)
    s, sensitivity = O.self_s_value(table, "kidneys", 400.0)
    assert s == pytest.approx(s_e * 300 / 400 + s_g * (300 / 400) ** (2 / 3), rel=1e-5)
    assert sensitivity == pytest.approx(-(s_e * 300 / 400 + 2 / 3 * s_g * (300 / 400) ** (2 / 3)) / s, rel=1e-5)
    # red marrow: the table's self S is below E_e/m: all electrons, no photon part invented
    assert O.self_s_value(table, "red_marrow", 2340.0) == pytest.approx((1.5e-5 / 2, -1.0))


def test_organ_doses_self_and_cross(table):
    tia = {"Kidneys": 1000.0, "liver": 5000.0}  # MBq·h
    doses = O.organ_doses(tia, masses_g={"kidneys": 400.0}, table=table)
    kidney = doses["kidneys"]
    assert kidney.self_Gy == pytest.approx(1000 * 3600 * O.self_s_value(table, "kidneys", 400.0)[0] * 1e-3)
    assert kidney.cross_Gy == pytest.approx(5000 * 3600 * 1.2e-7 * 1e-3)
    assert doses["liver"].cross_Gy == pytest.approx(1000 * 3600 * 1.1e-7 * 1e-3)
    assert kidney.dose_Gy == pytest.approx(kidney.self_Gy + kidney.cross_Gy)
    assert kidney.mass_from == "patient" and doses["liver"].mass_from == "phantom" and doses["liver"].mass_g == 1800.0
    with pytest.raises(ValueError, match="no S-values"):
        O.organ_doses({"tumour": 10.0}, table=table)


def test_remainder_of_body_partition(table):
    """Activity spread uniformly through the body (TIA ∝ mass): organs + remainder give the same
    dose to every target as the total body alone (the defining property of the remainder S-value)."""
    total = 50000.0
    organs = ["kidneys", "liver", "spleen"]
    partition = {o: total * table.mass(o) / table.mass("total_body") for o in organs}
    partition["remainder"] = total - sum(partition.values())
    split = O.organ_doses(partition, targets=organs + ["red_marrow"], table=table)
    whole = O.organ_doses({"total_body": total}, targets=organs + ["red_marrow"], table=table)
    for target in organs + ["red_marrow"]:
        assert split[target].dose_Gy == pytest.approx(whole[target].dose_Gy, rel=1e-9), target
    assert split["kidneys"].cross_Gy > 0


def test_electron_self_dose_without_table():
    """No S-value table: D = Ã·E_e/m, nothing from photons or other organs. 1 MBq·h in a 300 g
    kidney pair: 3.6e9 decays × 0.147923 MeV × 1.602e-13 J/MeV / 0.3 kg = 2.844e-4 Gy."""
    doses = O.organ_doses({"kidneys": 1.0, "liver": 1000.0, "total_body": 5000.0}, masses_g={"kidneys": 300.0, "total_body": 70000.0})
    kidney = doses["kidneys"]
    assert kidney.dose_Gy == pytest.approx(3.6e9 * E_E_MEV * MEV_J / 0.300, rel=1e-5)
    assert kidney.dose_Gy == pytest.approx(2.844e-4, abs=1e-7)
    assert kidney.cross_Gy == 0.0 and kidney.by_source_Gy == {"kidneys": kidney.dose_Gy} and kidney.mass_sensitivity == -1.0
    assert kidney.notes == [O.ELECTRON_ONLY] and "no S-value table given" in O.ELECTRON_ONLY
    # red marrow: E_e/m with absorbed fraction 1 ignores the trabecular bone: said in its result
    assert O.organ_doses({"marrow": 1.0})["red_marrow"].notes == [O.ELECTRON_ONLY, O.MARROW_ELECTRON_ONLY]
    # no CT mass: the ICRP-89 reference mass (liver 1800 g)
    assert doses["liver"].mass_g == 1800.0 and doses["liver"].mass_from == "ICRP-89 reference"
    assert doses["liver"].dose_Gy == pytest.approx(1000 * 3.6e9 * E_E_MEV * MEV_J / 1.8, rel=1e-5)
    assert doses["total_body"].dose_Gy == pytest.approx(5000 * 3.6e9 * E_E_MEV * MEV_J / 70.0, rel=1e-5)
    with pytest.raises(ValueError, match="no mass"):
        O.organ_doses({"parotids": 10.0})


def _decays_in_sphere(rng: np.random.Generator, n: int, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """``n`` decay points uniform in a sphere of ``radius`` [mm] about the origin, and isotropic unit directions."""
    start = rng.normal(size=(n, 3))
    start *= (radius * rng.random(n) ** (1 / 3) / np.linalg.norm(start, axis=1))[:, None]
    direction = rng.normal(size=(n, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    return start, direction


def test_sphere_absorbed_fraction_against_monte_carlo():
    """φ_e of a small sphere by the reduction-factor integral agrees with direct sampling
    (uniform start in the sphere, isotropic direction, distance from the kernel)."""
    volume = 0.05  # mL, radius 2.29 mm
    radius = (3 * volume * 1000 / (4 * math.pi)) ** (1 / 3)
    r, cdf, beta = K.radial_energy_cdf(1.04)
    rng = np.random.default_rng(5)
    n = 400_000
    start, direction = _decays_in_sphere(rng, n, radius)
    end = start + direction * np.interp(rng.random(n), cdf, r)[:, None]
    beta_inside = float(np.mean(np.linalg.norm(end, axis=1) <= radius))
    e = K.electron_energy_per_decay_MeV()
    expected = (beta_inside * beta + (e - beta)) / e
    phi_e, phi_g = O.sphere_absorbed_fractions(volume)
    assert phi_e == pytest.approx(expected, abs=0.003)
    assert 0.85 < phi_e < 0.97 and phi_g < 0.02
    assert O.sphere_absorbed_fractions(1000.0)[0] == pytest.approx(1.0, abs=0.005)


def test_sphere_photon_absorbed_fraction_against_direct_sampling():
    """φ_γ of a 100 mL sphere against the mean of 1 − exp(−μ·s) over uniform decay points and
    isotropic directions, s the distance to the surface (the mean chord 4R/3 in place of 3R/4
    gives 78 % too much)."""
    volume, density = 100.0, 1.04
    radius = (3 * volume * 1000 / (4 * math.pi)) ** (1 / 3)
    start, direction = _decays_in_sphere(np.random.default_rng(7), 400_000, radius)
    b = np.sum(start * direction, axis=1)
    exit_mm = -b + np.sqrt(b * b - np.sum(start * start, axis=1) + radius**2)
    sampled = float(np.mean(1.0 - np.exp(-O.MU_EN_WATER_CM2_PER_G * density * 0.1 * exit_mm)))
    assert O.sphere_absorbed_fractions(volume, density)[1] == pytest.approx(sampled, rel=0.05)


def test_sphere_dose():
    lesion = O.sphere_dose("L1", 100.0, 10.0)
    energy = lesion.phi_electrons * K.electron_energy_per_decay_MeV() + lesion.phi_photons * 0.035098
    assert lesion.dose_Gy == pytest.approx(100 * 3600 * 1e6 * energy * K.MEV_TO_J / (10.4e-3), rel=1e-9)
    assert -1.0 < lesion.mass_sensitivity < -0.95


def test_bed():
    lam, mu = math.log(2) / 50.0, math.log(2) / 2.8
    dose = 20.0
    dale = dose * (1 + dose * lam / ((lam + mu) * 2.6))
    assert O.bed(dose, [(7.0, lam)], 2.6, 2.8) == pytest.approx(dale, rel=1e-12)
    # uptake then washout: against numerical integration of the Lea–Catcheside factor
    fit = tac.fit_model([2.0, 6.0, 24.0, 48.0, 96.0], [5.0 * (math.exp(-lam * t) - math.exp(-0.4 * t)) for t in (2, 6, 24, 48, 96)], "mono_uptake", [0.01] * 5)
    terms = O.exponential_terms(fit)
    a, l1, l2 = fit.parameters.values()
    scale = dose / (a / l1 - a / l2)

    def rate(t: float) -> float:
        return scale * a * (math.exp(-l1 * t) - math.exp(-l2 * t))

    inner = integrate.dblquad(lambda s, t: rate(t) * rate(s) * math.exp(-mu * (t - s)), 0, 3000, 0, lambda t: t, epsabs=1e-10)[0]
    assert O.bed(dose, terms, 2.6, 2.8) == pytest.approx(dose + 2 * inner / 2.6, rel=1e-4)
    with pytest.raises(ValueError, match="trapezoid"):
        O.exponential_terms(tac.trapezoid([1.0, 2.0], [1.0, 1.0]))

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


def test_table_is_the_published_one_and_physically_consistent():
    # values quoted in the shared notes (PyTheranostics Lu177-Male-Svalues.csv)
    assert O.phantom_s("kidneys", "kidneys") == 7.76e-5
    assert O.phantom_s("liver", "liver") == 1.37e-5
    assert O.phantom_s("spleen", "spleen") == 1.60e-4
    assert O.phantom_s("kidneys", "liver") == 1.20e-7  # row Kidneys (target), column Liver (source)
    # self S ≈ electron energy / phantom mass; the excess is the photon self-dose (1–4 %)
    for organ in ("kidneys", "liver", "spleen"):
        ratio = O.phantom_s(organ, organ) / O.electron_s_limit(O.ORGANS[organ][2])
        assert 1.005 < ratio < 1.05, organ


def test_mass_scaling():
    s_ref = 7.76e-5
    s_e = O.electron_s_limit(310.0)  # electrons: absorbed fraction 1
    s_g = s_ref - s_e
    assert O.self_s_value("kidneys")[0] == pytest.approx(s_ref)
    s, sensitivity = O.self_s_value("kidneys", 400.0)
    assert s == pytest.approx(s_e * 310 / 400 + s_g * (310 / 400) ** (2 / 3), rel=1e-12)
    assert sensitivity == pytest.approx(-(s_e * 310 / 400 + 2 / 3 * s_g * (310 / 400) ** (2 / 3)) / s, rel=1e-12)
    # red marrow: the table's self S is below E_e/m (trabecular geometry): no photon part is invented
    assert O.self_s_value("red_marrow", 2340.0)[0] == pytest.approx(1.15e-5 / 2)


def test_organ_doses_self_and_cross():
    tia = {"Kidneys": 1000.0, "liver": 5000.0}  # MBq·h
    doses = O.organ_doses(tia, masses_g={"kidneys": 400.0})
    kidney = doses["kidneys"]
    s_kidney = O.self_s_value("kidneys", 400.0)[0]
    assert kidney.self_Gy == pytest.approx(1000 * 3600 * s_kidney * 1e-3)
    assert kidney.cross_Gy == pytest.approx(5000 * 3600 * 1.20e-7 * 1e-3)
    assert kidney.dose_Gy == pytest.approx(kidney.self_Gy + kidney.cross_Gy)
    assert kidney.mass_from == "patient" and doses["liver"].mass_from == "phantom"
    # about 3.4 Gy per 1000 MBq·h in a 400 g kidney pair (0.148 MeV per decay)
    assert kidney.self_Gy == pytest.approx(1000 * 3600 * 1e6 * 0.14792 * 1.602e-13 / 0.4, rel=0.03)
    with pytest.raises(ValueError, match="no S-values"):
        O.organ_doses({"tumour": 10.0})


def test_remainder_of_body_partition():
    """Activity spread uniformly through the body (TIA ∝ mass): organs + remainder give the same
    dose to every target as the total body alone (the defining property of the remainder S-value)."""
    total = 50000.0
    organs = ["kidneys", "liver", "spleen", "salivary_glands"]
    m_tb = O.ORGANS["total_body"][2]
    partition = {o: total * O.ORGANS[o][2] / m_tb for o in organs}
    partition["remainder"] = total - sum(partition.values())
    split = O.organ_doses(partition, targets=organs + ["red_marrow"])
    whole = O.organ_doses({"total_body": total}, targets=organs + ["red_marrow"])
    for target in organs + ["red_marrow"]:
        assert split[target].dose_Gy == pytest.approx(whole[target].dose_Gy, rel=1e-9), target


def test_sphere_absorbed_fraction_against_monte_carlo():
    """φ_e of a small sphere by the reduction-factor integral agrees with direct sampling
    (uniform start in the sphere, isotropic direction, distance from the kernel)."""
    volume = 0.05  # mL, radius 2.29 mm
    radius = (3 * volume * 1000 / (4 * math.pi)) ** (1 / 3)
    r, cdf, beta = K.radial_energy_cdf(1.04)
    rng = np.random.default_rng(5)
    n = 400_000
    start = rng.normal(size=(n, 3))
    start *= (radius * rng.random(n) ** (1 / 3) / np.linalg.norm(start, axis=1))[:, None]
    direction = rng.normal(size=(n, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    end = start + direction * np.interp(rng.random(n), cdf, r)[:, None]
    beta_inside = float(np.mean(np.linalg.norm(end, axis=1) <= radius))
    e = K.electron_energy_per_decay_MeV()
    expected = (beta_inside * beta + (e - beta)) / e
    phi_e, phi_g = O.sphere_absorbed_fractions(volume)
    assert phi_e == pytest.approx(expected, abs=0.003)
    assert 0.85 < phi_e < 0.97 and phi_g < 0.02
    assert O.sphere_absorbed_fractions(1000.0)[0] == pytest.approx(1.0, abs=0.005)


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

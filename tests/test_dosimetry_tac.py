"""Time–activity fits and TIA against analytic truth (known exponential curves sampled at
clinical times), and the coverage of the stated TIA uncertainty over noisy repetitions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from quant.dosimetry import tac

LP = tac.physical_decay_per_h("Lu-177")  # 1/h
CLINICAL = np.array([4.0, 24.0, 48.0, 96.0, 168.0])  # h after administration
CLINICAL6 = np.array([1.0, 4.0, 24.0, 48.0, 96.0, 168.0])

# (model, parameters, times): kidney-like uptake/washout, slow tumour, fast + slow, two washouts with uptake
CASES = [
    ("mono", (50.0, LP + 0.004), np.array([24.0, 96.0, 168.0])),
    ("mono_uptake", (100.0, LP + 0.01, 0.5), CLINICAL),
    ("bi", (60.0, 0.3, 40.0, LP + 0.005), CLINICAL6),
    ("tri", (70.0, 0.08, 30.0, LP + 0.003, 1.5), CLINICAL6),
]


def truth(model: str, params: tuple[float, ...], t: np.ndarray) -> tuple[np.ndarray, float]:
    spec = tac.MODELS[model]
    tia, _ = __import__("scipy.integrate", fromlist=["quad"]).quad(lambda x: float(spec.curve(x, *params)), 0, np.inf, limit=200)
    return spec.curve(t, *params), tia


def test_lutetium_decay_constant():
    assert LP == pytest.approx(math.log(2) / (6.647 * 24), rel=1e-9)


@pytest.mark.parametrize("model,params,times", CASES, ids=[c[0] for c in CASES])
def test_noise_free_tia_within_one_percent(model, params, times):
    activities, tia_true = truth(model, params, times)
    # the analytic TIA formula agrees with numerical integration of the curve
    assert tac.MODELS[model].tia(*params) == pytest.approx(tia_true, rel=1e-6)
    fit = tac.fit_model(times, activities, model, sigmas_MBq=0.05 * activities)
    assert fit.tia_MBq_h == pytest.approx(tia_true, rel=0.01)
    chosen, _ = tac.fit_best(times, activities, 0.05 * activities)
    if len(params) + 2 <= times.size:  # AICc can rank the true model (tri, 5 parameters, needs 7 points)
        assert chosen.tia_MBq_h == pytest.approx(tia_true, rel=0.01)
    assert abs(chosen.tia_MBq_h - tia_true) <= max(chosen.tia_sd_MBq_h, 0.01 * tia_true)
    assert chosen.tiac_h(1000.0) == pytest.approx(chosen.tia_MBq_h / 1000.0)


def test_model_choice_by_aicc():
    """Clearly bi-exponential data choose 'bi'; mono-exponential data keep the simplest model."""
    rng = np.random.default_rng(3)
    bi, _ = truth("bi", (60.0, 0.3, 40.0, LP + 0.005), CLINICAL6)
    chosen, fits = tac.fit_best(CLINICAL6, bi * (1 + 0.01 * rng.standard_normal(6)), 0.01 * bi)
    assert chosen.model == "bi" and {f.model for f in fits} >= {"mono", "bi"}
    mono, _ = truth("mono", (50.0, LP + 0.004), CLINICAL6)
    chosen, _ = tac.fit_best(CLINICAL6, mono * (1 + 0.02 * rng.standard_normal(6)), 0.02 * mono)
    assert chosen.model == "mono"


def test_clearance_bounded_by_physical_decay():
    """Activity that rises late (bad data) cannot give a washout slower than physical decay."""
    fit = tac.fit_model([24.0, 96.0, 168.0], [10.0, 10.5, 11.0], "mono", [0.5, 0.5, 0.5])
    assert fit.parameters["lambda"] >= LP * (1 - 1e-9)
    assert any("physical decay" in n for n in fit.notes)


def test_trapezoid_weights_and_tail():
    t = np.array([2.0, 24.0, 72.0])
    a = np.array([10.0, 20.0, 15.0])
    fit = tac.trapezoid(t, a, sigmas_MBq=[1.0, 2.0, 3.0], start="zero")
    expected = 10 * 2 / 2 + (10 + 20) / 2 * 22 + (20 + 15) / 2 * 48 + 15 / LP
    assert fit.tia_MBq_h == pytest.approx(expected, rel=1e-12)
    w = np.asarray(fit.weights)
    assert fit.tia_sd_MBq_h == pytest.approx(math.sqrt(w[0] ** 2 + 4 * w[1] ** 2 + 9 * w[2] ** 2))
    hold = tac.trapezoid(t, a, start="hold")
    assert hold.tia_MBq_h - fit.tia_MBq_h == pytest.approx(10 * 2 / 2)
    # physical decay only, densely sampled: the rule integrates it within 1 %
    dense = np.linspace(0.5, 300, 60)
    assert tac.trapezoid(dense, 80 * np.exp(-LP * dense), start="hold").tia_MBq_h == pytest.approx(80 / LP, rel=0.01)
    assert float(fit.evaluate(72.0 + 24.0)) == pytest.approx(15 * math.exp(-LP * 24))


def test_single_time_point_methods():
    lam = math.log(2) / 60.0  # effective half-life 60 h
    a0 = 40.0
    exact = a0 / lam
    # Hänscheid is exact when imaged at t = effective half-life, and off elsewhere
    assert tac.hanscheid(60.0, a0 * math.exp(-lam * 60.0)).tia_MBq_h == pytest.approx(exact, rel=1e-12)
    assert abs(tac.hanscheid(150.0, a0 * math.exp(-lam * 150.0)).tia_MBq_h / exact - 1) > 0.05
    # Madsen is exact with the right half-life at any time; its uncertainty is the half-life's, propagated
    m = tac.madsen(96.0, a0 * math.exp(-lam * 96.0), 60.0, half_life_sd_h=6.0)
    assert m.tia_MBq_h == pytest.approx(exact, rel=1e-12)
    hi = tac.madsen(96.0, a0 * math.exp(-lam * 96.0), 60.0 + 1e-4).tia_MBq_h
    lo = tac.madsen(96.0, a0 * math.exp(-lam * 96.0), 60.0 - 1e-4).tia_MBq_h
    assert m.tia_sd_MBq_h == pytest.approx(abs(hi - lo) / 2e-4 * 6.0, rel=1e-4)


def test_stated_uncertainty_covers_truth_68_percent():
    """≥ 200 noisy repetitions (8 % Gaussian noise per point): the true TIA lies within the
    fit's ±1 standard uncertainty in about 68 % of them (binomial SD 3.3 % for 200)."""
    rng = np.random.default_rng(20260101)
    for model, params, times, select in (("mono_uptake", CASES[1][1], CLINICAL, False), ("mono", CASES[0][1], CASES[0][2], True)):
        activities, tia_true = truth(model, params, times)
        sigma = 0.08 * activities
        hits = []
        for _ in range(200):
            noisy = activities + rng.normal(0.0, sigma)
            fit = tac.fit_best(times, noisy, sigma)[0] if select else tac.fit_model(times, noisy, model, sigma)
            hits.append(abs(fit.tia_MBq_h - tia_true) <= fit.tia_sd_MBq_h)
        coverage = float(np.mean(hits))
        assert 0.60 <= coverage <= 0.76, (model, coverage)


def test_bad_points_refused():
    with pytest.raises(ValueError, match="increasing"):
        tac.fit_model([24.0, 4.0, 96.0], [1.0, 2.0, 3.0], "mono")
    with pytest.raises(ValueError, match="need"):
        tac.fit_model([24.0, 96.0], [2.0, 1.0], "mono_uptake")
    with pytest.raises(ValueError, match="no time–activity model"):
        tac.fit_best([24.0], [2.0])

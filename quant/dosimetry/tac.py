"""Time–activity curves: fits, model choice and time-integrated activity (TIA).

Units: times in hours (h) after the administration (t = 0); activities in MBq **as measured at
each time** (not decay-corrected: each image's Bq/mL refers to its own acquisition start, so the
curve already contains physical decay); TIA in MBq·h (the number of decays / 3600 × 10⁶); the TIA
coefficient (TIAC, "residence time") in h = TIA / administered activity.

Models (A(t), all rate constants λ in 1/h, bounded below by the physical decay constant
λ_phys: biological clearance cannot make a compartment decay slower than the nuclide):

- ``mono``:        A₀·e^(−λt)
- ``mono_uptake``: A₀·(e^(−λt) − e^(−λᵤt))           (uptake then washout; A(0) = 0)
- ``bi``:          A₁·e^(−λ₁t) + A₂·e^(−λ₂t)
- ``tri``:         A₁·e^(−λ₁t) + A₂·e^(−λ₂t) − (A₁ + A₂)·e^(−λᵤt)   (two washouts, uptake; A(0) = 0)
- ``trapezoid``:   trapezoids between the measured points, from t = 0 either a linear rise from 0
  ('zero') or the first value held ('hold'), and after the last point physical decay only
  (A_n / λ_phys): a rule, not a fit, linear in the activities.

Fits are weighted least squares (scipy ``curve_fit``, trust-region with bounds, a few starts).
With per-point standard uncertainties σᵢ (MBq) the covariance is absolute and the corrected
Akaike criterion is AICc = χ² + 2k + 2k(k+1)/(n−k−1); without σ the residual variance scales
the covariance and AICc = n·ln(RSS/n) + 2k + 2k(k+1)/(n−k−1). :func:`fit_best` fits every model
with more points than parameters, compares those with n ≥ k + 2 by AICc and keeps the lowest, preferring the model with fewer parameters when it is
within ``parsimony`` (2) of the best (as PyTheranostics does). The TIA's standard uncertainty
is the first-order propagation gᵀ·C·g of the parameter covariance C with the analytic gradient g
of the TIA (∫₀^∞ A dt) — checked against resampling in the tests.

Single time point (one image): Hänscheid et al. 2018 (J Nucl Med 59:75): TIA ≈ A(t)·2t/ln 2,
exact for a mono-exponential whose effective half-life equals t; Madsen et al. 2018 (Med Phys
45:2318): TIA = A(t)·e^(λt)/λ with a population effective half-life T = ln 2/λ (given, with its
standard uncertainty, which is propagated).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit

from recon.nuclides import get_nuclide

FIT_MODELS = ("mono", "mono_uptake", "bi", "tri")
TRAPEZOID_STARTS = ("zero", "hold")


def physical_decay_per_h(nuclide: str = "Lu-177") -> float:
    """Physical decay constant λ_phys [1/h] of ``nuclide``."""
    return get_nuclide(nuclide).decay_constant_per_s * 3600.0


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class _Model:
    names: tuple[str, ...]
    rates: tuple[int, ...]  # indices of parameters that are rate constants (bounded by λ_phys)
    curve: Callable[..., np.ndarray]
    tia: Callable[..., float]
    gradient: Callable[..., np.ndarray]


def _mono(t, a, lam):
    return a * np.exp(-lam * t)


def _mono_uptake(t, a, lam, lam_u):
    return a * (np.exp(-lam * t) - np.exp(-lam_u * t))


def _bi(t, a1, lam1, a2, lam2):
    return a1 * np.exp(-lam1 * t) + a2 * np.exp(-lam2 * t)


def _tri(t, a1, lam1, a2, lam2, lam_u):
    return a1 * np.exp(-lam1 * t) + a2 * np.exp(-lam2 * t) - (a1 + a2) * np.exp(-lam_u * t)


MODELS: dict[str, _Model] = {
    "mono": _Model(("A0", "lambda"), (1,), _mono,
                   lambda a, lam: a / lam,
                   lambda a, lam: np.array([1 / lam, -a / lam**2])),
    "mono_uptake": _Model(("A0", "lambda", "lambda_uptake"), (1, 2), _mono_uptake,
                          lambda a, lam, lu: a * (1 / lam - 1 / lu),
                          lambda a, lam, lu: np.array([1 / lam - 1 / lu, -a / lam**2, a / lu**2])),
    "bi": _Model(("A1", "lambda1", "A2", "lambda2"), (1, 3), _bi,
                 lambda a1, l1, a2, l2: a1 / l1 + a2 / l2,
                 lambda a1, l1, a2, l2: np.array([1 / l1, -a1 / l1**2, 1 / l2, -a2 / l2**2])),
    "tri": _Model(("A1", "lambda1", "A2", "lambda2", "lambda_uptake"), (1, 3, 4), _tri,
                  lambda a1, l1, a2, l2, lu: a1 / l1 + a2 / l2 - (a1 + a2) / lu,
                  lambda a1, l1, a2, l2, lu: np.array([1 / l1 - 1 / lu, -a1 / l1**2, 1 / l2 - 1 / lu, -a2 / l2**2, (a1 + a2) / lu**2])),
}


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class TacFit:
    """One time–activity curve integrated by one model.

    ``parameters``: model parameters (MBq, 1/h); ``covariance``: their covariance (same order);
    ``tia_MBq_h`` ± ``tia_sd_MBq_h``: TIA and its standard uncertainty from the fit;
    ``aicc``: corrected AIC (None when n < k + 2 or for the trapezoid rule); ``chi2``: χ² with
    σ given, else the residual sum of squares (MBq²); ``weights``: for the trapezoid rule the
    coefficient of each activity in the TIA (h)."""

    model: str
    times_h: tuple[float, ...]
    activities_MBq: tuple[float, ...]
    sigmas_MBq: tuple[float, ...] | None
    parameters: dict[str, float]
    covariance: tuple[tuple[float, ...], ...]
    tia_MBq_h: float
    tia_sd_MBq_h: float
    aicc: float | None
    chi2: float
    lambda_phys_per_h: float
    weights: tuple[float, ...] | None = None
    start: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def tia_relative_sd(self) -> float:
        return self.tia_sd_MBq_h / self.tia_MBq_h if self.tia_MBq_h else float("inf")

    def tiac_h(self, administered_MBq: float) -> float:
        """TIA coefficient [h] for an administered activity [MBq]."""
        return self.tia_MBq_h / administered_MBq

    def evaluate(self, t_h: np.ndarray | float) -> np.ndarray:
        """A(t) [MBq] of the fitted curve (for the trapezoid rule: the piecewise-linear curve with its tail)."""
        t = np.asarray(t_h, dtype=np.float64)
        if self.model == "trapezoid":
            values = np.r_[0.0 if self.start == "zero" else self.activities_MBq[0], self.activities_MBq]
            tail = self.activities_MBq[-1] * np.exp(-self.lambda_phys_per_h * (t - self.times_h[-1]))
            return np.where(t <= self.times_h[-1], np.interp(t, np.r_[0.0, self.times_h], values), tail)
        return MODELS[self.model].curve(t, *self.parameters.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "times_h": list(self.times_h), "activities_MBq": list(self.activities_MBq),
            "sigmas_MBq": None if self.sigmas_MBq is None else list(self.sigmas_MBq),
            "parameters": dict(self.parameters), "covariance": [list(r) for r in self.covariance],
            "tia_MBq_h": self.tia_MBq_h, "tia_sd_MBq_h": self.tia_sd_MBq_h, "aicc": self.aicc, "chi2": self.chi2,
            "lambda_phys_per_h": self.lambda_phys_per_h,
            "weights_h": None if self.weights is None else list(self.weights), "start": self.start, "notes": list(self.notes),
        }


# --------------------------------------------------------------------------- fitting


def _check(times_h: Sequence[float], activities: Sequence[float], sigmas: Sequence[float] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    t = np.asarray(times_h, dtype=np.float64)
    a = np.asarray(activities, dtype=np.float64)
    if t.ndim != 1 or t.shape != a.shape or t.size == 0:
        raise ValueError("times and activities: one value per time point")
    if np.any(t <= 0) or np.any(np.diff(t) <= 0):
        raise ValueError("time points must be after the administration and strictly increasing")
    if not np.all(np.isfinite(a)):
        raise ValueError("activities must be finite")
    s = None
    if sigmas is not None:
        s = np.asarray(sigmas, dtype=np.float64)
        if s.shape != t.shape or np.any(s <= 0) or not np.all(np.isfinite(s)):
            raise ValueError("sigmas: one positive value per time point")
    return t, a, s


def aicc(chi2_or_rss: float, n: int, k: int, sigma_known: bool) -> float | None:
    """Corrected AIC (None when n < k + 2). With σ known: χ² + 2k + 2k(k+1)/(n−k−1); else n·ln(RSS/n) + …"""
    if n < k + 2:
        return None
    base = chi2_or_rss if sigma_known else n * math.log(max(chi2_or_rss, 1e-300) / n)
    return base + 2 * k + 2 * k * (k + 1) / (n - k - 1)


def _starts(model: str, t: np.ndarray, a: np.ndarray, lam_phys: float) -> list[list[float]]:
    """A few initial parameter sets: a log-linear fit of the later points gives the slow washout."""
    later = slice(max(0, a.size // 2 - 1 if a.size > 2 else 0), None)
    positive = a[later] > 0
    if positive.sum() >= 2:
        slope, intercept = np.polyfit(t[later][positive], np.log(a[later][positive]), 1)
        lam = max(-slope, lam_phys * 1.05)
        a0 = float(np.exp(intercept))
    else:
        lam, a0 = lam_phys * 2.0, float(max(a.max(), 1e-6)) * 2.0
    a0 = min(max(a0, 1e-9), 1e3 * max(float(np.abs(a).max()), 1e-9))
    uptakes = [max(10.0 / t[0], 4 * lam), max(1.0 / t[0], 2 * lam), max(0.3 / t[0], 1.5 * lam)]
    if model == "mono":
        return [[a0, lam], [float(a[0]) * math.exp(lam * t[0]), lam]]
    if model == "mono_uptake":
        return [[a0, lam, lu] for lu in uptakes]
    if model == "bi":
        return [[a0 * f, lam * m, a0 * (1 - f), lam] for f, m in ((0.5, 5.0), (0.3, 2.0), (0.7, 20.0))]
    return [[a0 * f, lam * m, a0 * (1 - f), lam, lu] for f, m in ((0.5, 5.0), (0.3, 2.0)) for lu in uptakes[:2]]


def fit_model(times_h: Sequence[float], activities_MBq: Sequence[float], model: str,
              sigmas_MBq: Sequence[float] | None = None, nuclide: str = "Lu-177") -> TacFit:
    """Fit ``model`` (one of :data:`FIT_MODELS`) to the points; ValueError when it cannot be fitted
    (fewer points than parameters, or no start converged)."""
    if model == "trapezoid":
        return trapezoid(times_h, activities_MBq, sigmas_MBq, nuclide=nuclide)
    if model not in MODELS:
        raise ValueError(f"TAC model {model!r}: one of {FIT_MODELS} or 'trapezoid'")
    t, a, s = _check(times_h, activities_MBq, sigmas_MBq)
    spec = MODELS[model]
    k, n = len(spec.names), t.size
    if n < k or (s is None and n == k):
        raise ValueError(f"{model}: {k} parameters need {'at least' if s is not None else 'more than'} {k} time points (have {n})")
    lam_phys = physical_decay_per_h(nuclide)
    lower = np.zeros(k)
    lower[list(spec.rates)] = lam_phys
    upper = np.full(k, np.inf)
    best = None
    for p0 in _starts(model, t, a, lam_phys):
        p0 = np.clip(p0, lower * 1.0001 + 1e-12, None)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", OptimizeWarning)
                p, cov = curve_fit(spec.curve, t, a, p0=p0, sigma=s, absolute_sigma=s is not None,
                                   bounds=(lower, upper), method="trf", max_nfev=2000, x_scale="jac")
        except (RuntimeError, ValueError):
            continue
        residual = (a - spec.curve(t, *p)) / (s if s is not None else 1.0)
        cost = float(residual @ residual)
        if best is None or cost < best[0] - 1e-12 * max(cost, 1.0):
            best = (cost, p, cov)
    if best is None:
        raise ValueError(f"{model}: the fit did not converge")
    cost, p, cov = best
    notes = []
    if not np.all(np.isfinite(cov)):
        cov = np.where(np.isfinite(cov), cov, 0.0)
        notes.append("covariance undetermined (parameter at a bound or as many points as parameters)")
    at_bound = [spec.names[i] for i in spec.rates if p[i] <= lam_phys * (1 + 1e-6)]
    if at_bound:
        notes.append(f"{', '.join(at_bound)} at the physical decay constant (no biological clearance)")
    tia = float(spec.tia(*p))
    g = spec.gradient(*p)
    variance = float(g @ cov @ g)
    return TacFit(model, tuple(map(float, t)), tuple(map(float, a)), None if s is None else tuple(map(float, s)),
                  dict(zip(spec.names, map(float, p))), tuple(tuple(map(float, r)) for r in cov), tia,
                  math.sqrt(max(variance, 0.0)), aicc(cost, n, k, s is not None), cost, lam_phys, notes=tuple(notes))


def fit_best(times_h: Sequence[float], activities_MBq: Sequence[float], sigmas_MBq: Sequence[float] | None = None,
             models: Sequence[str] = FIT_MODELS, parsimony: float = 2.0, nuclide: str = "Lu-177") -> tuple[TacFit, list[TacFit]]:
    """Fit every model of ``models`` with more points than parameters and choose by AICc among
    those where it is defined (n ≥ k + 2); a model with fewer parameters within ``parsimony`` of
    the lowest AICc wins. When AICc is defined for none (e.g. 3 points), the fitted model with
    the fewest parameters is chosen. Returns the chosen fit and all fits; ValueError when no
    model can be fitted."""
    n = len(times_h)
    fits = []
    for model in models:
        if n <= len(MODELS[model].names):
            continue
        try:
            fit = fit_model(times_h, activities_MBq, model, sigmas_MBq, nuclide)
        except ValueError:
            continue
        if fit.tia_MBq_h > 0 and math.isfinite(fit.tia_MBq_h):
            fits.append(fit)
    if not fits:
        raise ValueError(f"no time–activity model can be fitted to {n} point(s); use the trapezoid rule or a single-time-point method")
    ranked = [f for f in fits if f.aicc is not None and math.isfinite(f.aicc)]
    if not ranked:
        return min(fits, key=lambda f: len(f.parameters)), fits
    lowest = min(f.aicc for f in ranked)
    eligible = [f for f in ranked if f.aicc <= lowest + parsimony]
    return min(eligible, key=lambda f: (len(f.parameters), f.aicc)), fits


def trapezoid(times_h: Sequence[float], activities_MBq: Sequence[float], sigmas_MBq: Sequence[float] | None = None,
              start: str = "zero", nuclide: str = "Lu-177") -> TacFit:
    """Trapezoid rule between the points, ``start`` 'zero' (linear rise from 0 at t = 0) or
    'hold' (the first activity from t = 0), and a physical-decay tail A_n/λ_phys after the last
    point. TIA = Σ wᵢ·Aᵢ, so its variance is Σ wᵢ²·σᵢ² (0 without σ)."""
    if start not in TRAPEZOID_STARTS:
        raise ValueError(f"trapezoid start {start!r}: one of {TRAPEZOID_STARTS}")
    t, a, s = _check(times_h, activities_MBq, sigmas_MBq)
    lam_phys = physical_decay_per_h(nuclide)
    w = np.zeros(t.size)
    w[0] += t[0] / 2 if start == "zero" else t[0]
    dt = np.diff(t)
    w[:-1] += dt / 2
    w[1:] += dt / 2
    w[-1] += 1 / lam_phys
    tia = float(w @ a)
    sd = float(math.sqrt(w**2 @ s**2)) if s is not None else 0.0
    return TacFit("trapezoid", tuple(map(float, t)), tuple(map(float, a)), None if s is None else tuple(map(float, s)),
                  {}, (), tia, sd, None, 0.0, lam_phys, tuple(map(float, w)), start,
                  (f"{'linear rise from 0 at administration' if start == 'zero' else 'first activity held from administration'}; "
                   "physical-decay tail after the last point",))


# --------------------------------------------------------------------------- single time point


@dataclass(frozen=True)
class SingleTimePoint:
    """TIA [MBq·h] ± standard uncertainty from one measurement, with the method and its assumption."""

    method: str
    time_h: float
    activity_MBq: float
    tia_MBq_h: float
    tia_sd_MBq_h: float
    assumption: str

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def hanscheid(time_h: float, activity_MBq: float, sigma_MBq: float = 0.0, method_relative_sd: float = 0.0) -> SingleTimePoint:
    """Hänscheid et al. 2018: TIA ≈ A(t)·2t/ln 2 (exact when the effective half-life equals t).
    ``method_relative_sd``: the relative standard uncertainty the user assigns to that
    assumption (added in quadrature to the measurement's)."""
    if time_h <= 0:
        raise ValueError("the time point must be after the administration")
    tia = activity_MBq * 2.0 * time_h / math.log(2.0)
    relative = math.hypot(sigma_MBq / activity_MBq if activity_MBq else 0.0, method_relative_sd)
    return SingleTimePoint("hanscheid", time_h, activity_MBq, tia, abs(tia) * relative,
                           f"mono-exponential with effective half-life = {time_h:g} h (the imaging time)")


def madsen(time_h: float, activity_MBq: float, effective_half_life_h: float, half_life_sd_h: float = 0.0,
           sigma_MBq: float = 0.0) -> SingleTimePoint:
    """Madsen et al. 2018: TIA = A(t)·e^(λt)/λ with λ = ln 2 / (population effective half-life [h]);
    the half-life's standard uncertainty and the activity's are propagated (first order)."""
    if time_h <= 0 or effective_half_life_h <= 0:
        raise ValueError("time and effective half-life must be positive")
    lam = math.log(2.0) / effective_half_life_h
    tia = activity_MBq * math.exp(lam * time_h) / lam
    dtia_dlam = tia * (time_h - 1.0 / lam)
    sd_lam = lam * half_life_sd_h / effective_half_life_h
    sd = math.hypot(dtia_dlam * sd_lam, tia * (sigma_MBq / activity_MBq if activity_MBq else 0.0))
    return SingleTimePoint("madsen", time_h, activity_MBq, tia, sd,
                           f"mono-exponential with the population effective half-life {effective_half_life_h:g} ± {half_life_sd_h:g} h")

"""Dosimetry of one administration from VOI activities over time (numbers only, no images):
recovery correction, time–activity fits, TIA, organ (MIRD) and lesion (sphere) doses, BED, each
with its uncertainty budget, and a Monte Carlo check of that budget.

Units: times in h after administration; activities in MBq at each acquisition time (as
measured, physical decay included); TIA in MBq·h; doses in Gy; masses in g.

Uncertainty components (EANM guidance, Gear et al. 2018), all as standard uncertainties:

- ``calibration``: the camera calibration factor (relative, one for the whole study: fully
  correlated over VOIs and time points);
- ``recovery:<voi>``: the VOI's recovery coefficient (one per VOI, correlated over its time
  points);
- ``fit:<voi>``: the time–activity fit, from per-point uncertainties (count noise and
  delineation, ``point_relative_sd``) through the fit covariance (or the single-time-point
  method's own uncertainty);
- ``mass:<voi>``: the VOI mass (CT volume × density) through the mass dependence of its self
  S-value (organs); for lesions the delineated volume, which scales the lesion's activity (mean
  concentration × volume) and so its TIA, and its dose by 1 + (m/S)·dS/dm (the sphere S-value's
  mass dependence nearly cancels it).

The activities entering the fit are A/RC; calibration and recovery scale the whole curve, so
they scale the TIA: u = TIA·u_rel. :func:`monte_carlo` repeats the whole chain with all inputs
resampled and is the check of the analytic budget.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from quant.dosimetry import organ, tac
from quant.dosimetry.uncertainty import Uncertain, combine

KINDS = ("organ", "lesion")


@dataclass(frozen=True)
class VoiData:
    """One VOI over the time points. ``activities_MBq``: measured (before recovery correction),
    one per time point (lesions: mean concentration × ``volume_mL``, so they scale with the
    volume); ``recovery``: recovery coefficient (measured/true, ≤ 1) ± ``recovery_sd``;
    ``mass_g`` ± ``mass_relative_sd`` (organs: None → phantom mass; lesions: of the volume too);
    ``volume_mL`` (lesions)."""

    name: str
    kind: str
    activities_MBq: tuple[float, ...]
    recovery: float = 1.0
    recovery_sd: float = 0.0
    mass_g: float | None = None
    mass_relative_sd: float = 0.0
    volume_mL: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"VOI kind {self.kind!r}: one of {KINDS}")
        if not 0.0 < self.recovery <= 1.5:
            raise ValueError(f"{self.name}: recovery coefficient {self.recovery} out of (0, 1.5]")
        if self.kind == "lesion" and not self.volume_mL:
            raise ValueError(f"lesion {self.name}: volume needed for the sphere model")


@dataclass(frozen=True)
class DoseSettings:
    """Configuration of the dosimetry (defaults stated; set them per site).

    ``tac_model``: 'auto' (AICc among ``models``; 2 points: mono-exponential), one of
    tac.FIT_MODELS, or 'trapezoid'; ``trapezoid_start``: 'zero' or 'hold'.
    ``point_relative_sd``: relative standard uncertainty of each VOI activity at each time
    point (count noise + delineation; assumed 5 % by default).
    ``calibration_relative_sd``: of the camera calibration factor (assumed 3 %).
    ``single_time_point``: 'hanscheid' or 'madsen' (with ``madsen_half_life_h`` {voi: [T, sd]} in h);
    ``hanscheid_relative_sd``: the uncertainty assigned to Hänscheid's assumption (assumed 0).
    ``bed``: {organ: [α/β Gy, repair half-time h]} (kidneys: 2.6 Gy, 2.8 h, Bodei et al. 2008).
    ``lesion_density_g_per_mL``: for the sphere model. ``administered_MBq``: for the TIAC.
    ``s_values``: organ S-value table (CSV, quant.dosimetry.organ.read_s_table) with its citation
    ``s_values_source`` (required with it); None: organ doses are the electron self-dose only."""

    tac_model: str = "auto"
    models: tuple[str, ...] = tac.FIT_MODELS
    trapezoid_start: str = "zero"
    point_relative_sd: float = 0.05
    calibration_relative_sd: float = 0.03
    single_time_point: str = "hanscheid"
    madsen_half_life_h: Mapping[str, Sequence[float]] = field(default_factory=dict)
    hanscheid_relative_sd: float = 0.0
    bed: Mapping[str, Sequence[float]] = field(default_factory=lambda: {"kidneys": (organ.KIDNEY_ALPHA_BETA_GY, organ.KIDNEY_REPAIR_HALF_LIFE_H)})
    lesion_density_g_per_mL: float = 1.04
    administered_MBq: float | None = None
    nuclide: str = "Lu-177"
    s_values: str | None = None
    s_values_source: str | None = None

    def __post_init__(self) -> None:
        if self.tac_model not in ("auto", "trapezoid", *tac.FIT_MODELS):
            raise ValueError(f"tac_model {self.tac_model!r}: 'auto', 'trapezoid' or one of {tac.FIT_MODELS}")
        if self.single_time_point not in ("hanscheid", "madsen"):
            raise ValueError("single_time_point: 'hanscheid' or 'madsen'")
        if self.point_relative_sd <= 0 or self.calibration_relative_sd < 0:
            raise ValueError("point_relative_sd must be > 0 and calibration_relative_sd ≥ 0")
        if self.s_values and not (self.s_values_source or "").strip():
            raise ValueError("s_values_source: give the S-value table's citation")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DoseSettings:
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown dosimetry settings: {sorted(unknown)}")
        return cls(**{k: tuple(v) if k == "models" else v for k, v in values.items()})


@dataclass(frozen=True)
class VoiResult:
    """Results of one VOI: the curve integration (fit or single-time-point), TIA (MBq·h) and TIAC
    (h) and absorbed dose (Gy) with budgets, BED (Gy) where configured, the mass used (g) and how
    the dose was computed."""

    name: str
    kind: str
    integration: Any  # tac.TacFit | tac.SingleTimePoint
    candidates: tuple[Any, ...]
    tia: Uncertain
    tiac_h: float | None
    dose: Uncertain | None
    bed: Uncertain | None
    mass_g: float | None
    method: str
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "method": self.method, "mass_g": self.mass_g,
            "integration": self.integration.as_dict(), "candidates": [c.as_dict() for c in self.candidates],
            "tia_MBq_h": self.tia.as_dict(), "tiac_h": self.tiac_h,
            "dose_Gy": None if self.dose is None else self.dose.as_dict(),
            "bed_Gy": None if self.bed is None else self.bed.as_dict(), "notes": list(self.notes),
        }


def _integrate(times: Sequence[float], activities: np.ndarray, voi: VoiData, settings: DoseSettings) -> tuple[Any, tuple[Any, ...]]:
    sigmas = settings.point_relative_sd * np.abs(activities)
    sigmas = np.where(sigmas > 0, sigmas, settings.point_relative_sd * max(float(np.abs(activities).max()), 1e-9))
    n = len(times)
    if n == 1:
        if settings.single_time_point == "madsen":
            if voi.name not in settings.madsen_half_life_h:
                raise ValueError(f"{voi.name}: Madsen's method needs a population effective half-life (madsen_half_life_h)")
            half_life, half_life_sd = settings.madsen_half_life_h[voi.name]
            return tac.madsen(times[0], float(activities[0]), half_life, half_life_sd, float(sigmas[0])), ()
        return tac.hanscheid(times[0], float(activities[0]), float(sigmas[0]), settings.hanscheid_relative_sd), ()
    if settings.tac_model == "trapezoid":
        return tac.trapezoid(times, activities, sigmas, settings.trapezoid_start, settings.nuclide), ()
    if settings.tac_model != "auto":
        return tac.fit_model(times, activities, settings.tac_model, sigmas, settings.nuclide), ()
    if n == 2:
        return tac.fit_model(times, activities, "mono", sigmas, settings.nuclide), ()
    chosen, fits = tac.fit_best(times, activities, sigmas, settings.models, nuclide=settings.nuclide)
    return chosen, tuple(fits)


def dosimetry(times_h: Sequence[float], vois: Sequence[VoiData], settings: DoseSettings | None = None) -> list[VoiResult]:
    """TIA, dose and BED with uncertainty budgets for every VOI. With an S-value table
    (``settings.s_values``) organs in it are both sources and targets of the MIRD calculation
    (cross-dose included) and a 'total_body' organ VOI is replaced as a source by the remainder
    of the body; without one each organ gets its electron self-dose only. Lesions get the sphere
    model (their dose from organ activity is not included)."""
    settings = settings or DoseSettings()
    times = [float(t) for t in times_h]
    for voi in vois:
        if len(voi.activities_MBq) != len(times):
            raise ValueError(f"{voi.name}: {len(voi.activities_MBq)} activities for {len(times)} time points")
    integrations: dict[str, tuple[Any, tuple[Any, ...]]] = {}
    tias: dict[str, Uncertain] = {}
    for voi in vois:
        corrected = np.asarray(voi.activities_MBq, dtype=np.float64) / voi.recovery
        integration, candidates = _integrate(times, corrected, voi, settings)
        integrations[voi.name] = (integration, candidates)
        value = integration.tia_MBq_h
        tias[voi.name] = Uncertain(value, {
            "calibration": abs(value) * settings.calibration_relative_sd,
            f"recovery:{voi.name}": abs(value) * voi.recovery_sd / voi.recovery,
            f"fit:{voi.name}": integration.tia_sd_MBq_h,
        } | ({f"mass:{voi.name}": abs(value) * voi.mass_relative_sd} if voi.kind == "lesion" else {}))
    table = organ.read_s_table(settings.s_values, settings.s_values_source or "") if settings.s_values else None
    organ_names = {voi.name: organ.canonical_organ(voi.name) for voi in vois if voi.kind == "organ"}
    if table is None:  # electron self-dose: every organ with a mass (CT, or ICRP-89 reference)
        with_mass = {voi.name for voi in vois if voi.mass_g}
        mirdable = {name: c for name, c in organ_names.items() if name in with_mass or c in organ.PHANTOM_MASS_G}
        sources = {c: tias[name] for name, c in mirdable.items()}
    else:
        mirdable = {name: c for name, c in organ_names.items() if table.has(c)}
        sources = _sources(tias, mirdable)
    masses = {mirdable[v.name]: v.mass_g for v in vois if v.name in mirdable and v.mass_g}
    mird = organ.organ_doses({k: u.value for k, u in sources.items()}, masses, list(mirdable.values()), table) if mirdable else {}

    results = []
    for voi in vois:
        integration, candidates = integrations[voi.name]
        tia = tias[voi.name]
        notes: list[str] = list(getattr(integration, "notes", ()))
        if getattr(integration, "method", None) == "hanscheid" and not settings.hanscheid_relative_sd:
            notes.append("single time point (Hänscheid): the error of its assumption (effective half-life = imaging time) "
                         "is not in the uncertainty; set hanscheid_relative_sd")
        dose = bed_value = None
        mass = voi.mass_g
        if voi.kind == "lesion":
            sphere = organ.sphere_dose(voi.name, tia.value, voi.volume_mL, settings.lesion_density_g_per_mL)
            dose = tia.scaled(sphere.dose_Gy / tia.value if tia.value else 0.0)
            dose = dose.with_component(f"mass:{voi.name}", sphere.dose_Gy * (1.0 + sphere.mass_sensitivity) * voi.mass_relative_sd)
            mass, method = sphere.mass_g, "sphere model (electrons: Loevinger kernel, photons: μ_en approximation)"
        elif voi.name in mirdable:
            target = mirdable[voi.name]
            result = mird[target]
            dose = combine({src: (gy / sources[src].value if sources[src].value else 0.0, sources[src]) for src, gy in result.by_source_Gy.items()})
            dose = dose.with_component(f"mass:{voi.name}", result.dose_Gy * result.mass_sensitivity * voi.mass_relative_sd)
            mass = result.mass_g
            method = (f"{organ.ELECTRON_ONLY}; {result.mass_from} mass" if table is None else
                      f"MIRD organ S-values ({table.citation}; phantom masses: {table.mass_source}); self-dose mass-scaled to the {result.mass_from} mass")
            notes.extend(result.notes)
            bed_parameters = settings.bed.get(target)
            if bed_parameters is not None:
                bed_value = _bed(dose, integration, *bed_parameters)
        else:
            method = "no mass for this organ: TIA only" if table is None else "no S-values for this organ in the table: TIA only"
        tiac = tia.value / settings.administered_MBq if settings.administered_MBq else None
        results.append(VoiResult(voi.name, voi.kind, integration, candidates, tia, tiac, dose, bed_value, mass, method, tuple(notes)))
    return results


def _sources(tias: Mapping[str, Uncertain], mirdable: Mapping[str, str]) -> dict[str, Uncertain]:
    """MIRD sources (canonical names): the organs, and the remainder = total body − organs when a
    total-body VOI is given (its uncertainty follows, calibration cancelling as it should)."""
    sources = {canonical: tias[name] for name, canonical in mirdable.items() if canonical != "total_body"}
    body = [name for name, canonical in mirdable.items() if canonical == "total_body"]
    if body:
        terms = {"total_body": (1.0, tias[body[0]])} | {k: (-1.0, u) for k, u in sources.items()}
        remainder = combine(terms)
        if remainder.value <= 0:
            raise ValueError("the organs hold more TIA than the whole body: check the whole-body VOI")
        sources[organ.REMAINDER] = remainder
    return sources


def _bed(dose: Uncertain, integration: Any, alpha_beta: float, repair_h: float) -> Uncertain | None:
    try:
        terms = organ.exponential_terms(integration)
    except (ValueError, AttributeError):
        return None
    value = organ.bed(dose.value, terms, alpha_beta, repair_h)
    step = 1e-4 * dose.value
    slope = (organ.bed(dose.value + step, terms, alpha_beta, repair_h) - organ.bed(dose.value - step, terms, alpha_beta, repair_h)) / (2 * step)
    return Uncertain(value, {k: slope * c for k, c in dose.components.items()})


# --------------------------------------------------------------------------- Monte Carlo check


@dataclass(frozen=True)
class MonteCarloCheck:
    """Standard deviations over resampled repetitions of the whole chain, per VOI, beside the
    analytic ones: TIA (MBq·h) and dose (Gy)."""

    repetitions: int
    tia_sd: dict[str, float]
    dose_sd: dict[str, float]
    failed: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def monte_carlo(times_h: Sequence[float], vois: Sequence[VoiData], settings: DoseSettings | None = None,
                repetitions: int = 200, seed: int = 20260101) -> MonteCarloCheck:
    """Resample the calibration factor (one per repetition), each VOI's recovery coefficient and
    mass, and each activity (independent, ``point_relative_sd``) from their stated standard
    uncertainties (Gaussian), repeat :func:`dosimetry`, and report the spread of TIA and dose."""
    settings = settings or DoseSettings()
    rng = np.random.default_rng(seed)
    tia_samples: dict[str, list[float]] = {v.name: [] for v in vois}
    dose_samples: dict[str, list[float]] = {v.name: [] for v in vois}
    failed = 0
    for _ in range(repetitions):
        calibration = 1.0 + settings.calibration_relative_sd * rng.standard_normal()
        sampled = []
        for voi in vois:
            activities = np.asarray(voi.activities_MBq, dtype=np.float64)
            noisy = activities * (1.0 + settings.point_relative_sd * rng.standard_normal(activities.size)) * calibration
            recovery = voi.recovery + voi.recovery_sd * rng.standard_normal()
            factor = 1.0 + voi.mass_relative_sd * rng.standard_normal()
            if voi.kind == "lesion":   # mean concentration × volume
                noisy = noisy * factor
            sampled.append(replace(voi, activities_MBq=tuple(noisy), recovery=recovery,
                                   mass_g=None if voi.mass_g is None else voi.mass_g * factor,
                                   volume_mL=None if voi.volume_mL is None else voi.volume_mL * factor))
        try:
            results = dosimetry(times_h, sampled, settings)
        except ValueError:
            failed += 1
            continue
        for result in results:
            tia_samples[result.name].append(result.tia.value)
            if result.dose is not None:
                dose_samples[result.name].append(result.dose.value)
    return MonteCarloCheck(repetitions, {k: float(np.std(v, ddof=1)) for k, v in tia_samples.items() if len(v) > 1},
                           {k: float(np.std(v, ddof=1)) for k, v in dose_samples.items() if len(v) > 1}, failed)

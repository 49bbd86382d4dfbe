"""CT-to-CT registration (rigid, optionally refined by a B-spline) with SimpleITK, and the
transfer of emission images (SPECT, PET) that share the moving CT's frame of reference onto the
fixed CT's grid.

Conventions: images carry LPS geometry in mm. A registration of ``moving`` onto ``fixed``
returns the transform T that maps a **fixed** physical point x (mm) to the **moving** point
T(x) (the ITK/SimpleITK convention), so ``moving`` resampled through T lies on ``fixed``.
Rotations are reported in degrees, translations in mm. CT values are HU; emission values keep
their units (Bq/mL, SUV…): resampling interpolates concentrations, it does not conserve counts
when the grids differ.

Every registration comes with a quality figure (:class:`RegistrationQuality`): the final metric
value (Mattes mutual information, negative: lower is better), and the normalised
cross-correlation and normalised mutual information of the two CTs inside the body before and
after registration, with an acceptance flag from configurable thresholds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

TRANSFORMS = ("versor", "euler")
INITIALISERS = ("geometry", "moments")


@dataclass(frozen=True)
class RegistrationSettings:
    """Parameters of :func:`register_ct` (configuration, not code).

    ``transform``: 'versor' (VersorRigid3DTransform) or 'euler' (Euler3DTransform);
    ``initialiser``: centred initialiser by 'geometry' (image centres) or 'moments' (centres of
    mass of HU + 1000); Mattes MI with ``histogram_bins`` bins on a random
    ``sampling_fraction`` of the voxels drawn with ``seed``; a multi-resolution pyramid of
    ``shrink_factors`` with Gaussian ``smoothing_sigmas_mm`` (mm); regular-step gradient
    descent (``learning_rate``, ``min_step``, ``iterations`` per level, steps in mm through
    physical-shift scales). HU are clipped to ``hu_range`` before registration.
    ``bspline``: refine the rigid result with a B-spline of about ``bspline_grid_mm`` control
    point spacing (mm), LBFGS-B, ``bspline_iterations`` per level, Mattes MI on a random
    ``bspline_sampling_fraction`` of the voxels (each sample costs a dense Jacobian over all
    control points in ITK, so this stage is kept sparse).
    Quality: NCC and NMI are computed where either CT exceeds ``body_hu`` (HU); the
    registration is flagged acceptable when NCC after ≥ ``min_ncc`` and it did not get worse.
    """

    transform: str = "versor"
    initialiser: str = "geometry"
    histogram_bins: int = 50
    sampling_fraction: float = 0.25
    seed: int = 20260101
    shrink_factors: tuple[int, ...] = (4, 2, 1)
    smoothing_sigmas_mm: tuple[float, ...] = (8.0, 4.0, 0.0)
    learning_rate: float = 2.0
    min_step: float = 1e-3
    iterations: int = 300
    hu_range: tuple[float, float] = (-1000.0, 2000.0)
    bspline: bool = False
    bspline_grid_mm: float = 60.0
    bspline_iterations: int = 50
    bspline_sampling_fraction: float = 0.05
    bspline_shrink_factors: tuple[int, ...] = (2, 1)
    bspline_smoothing_sigmas_mm: tuple[float, ...] = (4.0, 0.0)
    body_hu: float = -500.0
    min_ncc: float = 0.8
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.transform not in TRANSFORMS:
            raise ValueError(f"transform {self.transform!r}: one of {TRANSFORMS}")
        if self.initialiser not in INITIALISERS:
            raise ValueError(f"initialiser {self.initialiser!r}: one of {INITIALISERS}")
        if len(self.shrink_factors) != len(self.smoothing_sigmas_mm):
            raise ValueError("shrink_factors and smoothing_sigmas_mm need one value per pyramid level")
        if len(self.bspline_shrink_factors) != len(self.bspline_smoothing_sigmas_mm):
            raise ValueError("bspline_shrink_factors and bspline_smoothing_sigmas_mm need one value per level")
        if not (0.0 < self.sampling_fraction <= 1.0 and 0.0 < self.bspline_sampling_fraction <= 1.0):
            raise ValueError("sampling fractions must be in (0, 1]")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RegistrationSettings:
        """Settings from a JSON-style dict (lists become tuples; unknown keys are refused)."""
        known = set(cls.__dataclass_fields__)
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown registration settings: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


@dataclass(frozen=True)
class RegistrationQuality:
    """How well the CTs agree. ``final_metric`` is the optimiser's last Mattes MI value of the
    rigid stage (of the B-spline stage when refined); NCC (Pearson, -1..1) and NMI
    ((H(A) + H(B)) / H(A, B), 1..2) are computed inside the body before (the fixed CT against
    the moving CT placed by the initial, identity transform) and after registration."""

    final_metric: float
    ncc_before: float
    ncc_after: float
    nmi_before: float
    nmi_after: float
    overlap_voxels: int
    acceptable: bool
    reason: str


@dataclass(frozen=True)
class RegistrationResult:
    """A transform (fixed point → moving point, mm), its rigid parameters and its quality.

    ``rotation_deg``: rotation about x, y, z (Euler ZXY as ITK composes them, degrees);
    ``translation_mm``: translation after rotation about ``centre_mm``."""

    transform: sitk.Transform
    rigid: sitk.Transform
    rotation_deg: tuple[float, float, float]
    translation_mm: tuple[float, float, float]
    centre_mm: tuple[float, float, float]
    iterations: list[int]
    stop_conditions: list[str]
    quality: RegistrationQuality
    settings: RegistrationSettings
    bspline: bool = False
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no transform object)."""
        settings = asdict(self.settings)
        return {
            "rotation_deg": list(self.rotation_deg),
            "translation_mm": list(self.translation_mm),
            "centre_mm": list(self.centre_mm),
            "bspline": self.bspline,
            "iterations": list(self.iterations),
            "stop_conditions": list(self.stop_conditions),
            "quality": asdict(self.quality),
            "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
            "notes": list(self.notes),
        }


# --------------------------------------------------------------------------- registration


def register_ct(fixed: sitk.Image, moving: sitk.Image, settings: RegistrationSettings | None = None) -> RegistrationResult:
    """Register CT ``moving`` onto CT ``fixed`` (both HU, LPS): rigid (Mattes MI, centred
    initialiser, multi-resolution), then an optional B-spline refinement. Deterministic for a
    given ``settings.seed`` and thread count."""
    settings = settings or RegistrationSettings()
    fixed_f = _prepare(fixed, settings)
    moving_f = _prepare(moving, settings)
    rigid_initial = _initial_transform(fixed_f, moving_f, settings)
    centre = tuple(float(c) for c in rigid_initial.GetCenter())
    identity_like = sitk.Transform(rigid_initial)

    method = _method(settings, settings.shrink_factors, settings.smoothing_sigmas_mm)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=settings.learning_rate,
        minStep=settings.min_step,
        numberOfIterations=settings.iterations,
        relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-8,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetInitialTransform(rigid_initial, inPlace=True)
    iterations: list[int] = []
    stops: list[str] = []
    _track_levels(method, iterations)
    method.Execute(fixed_f, moving_f)
    iterations.append(method.GetOptimizerIteration())
    stops.append(method.GetOptimizerStopConditionDescription())
    final_metric = float(method.GetMetricValue())
    rigid = _as_rigid(rigid_initial)

    transform: sitk.Transform = rigid
    if settings.bspline:
        transform, metric_b, its, stop = _bspline_refine(fixed_f, moving_f, rigid, settings)
        final_metric = metric_b
        iterations.append(its)
        stops.append(stop)

    quality = registration_quality(fixed, moving, identity_like, transform, final_metric, settings)
    angles = _euler_angles_deg(rigid)
    translation = tuple(float(t) for t in rigid.GetTranslation())
    return RegistrationResult(transform, rigid, angles, translation, centre, iterations, stops, quality, settings, settings.bspline)


def _prepare(image: sitk.Image, settings: RegistrationSettings) -> sitk.Image:
    low, high = settings.hu_range
    return sitk.Clamp(sitk.Cast(image, sitk.sitkFloat32), sitk.sitkFloat32, low, high)


def _method(settings: RegistrationSettings, shrink: Sequence[int], sigmas: Sequence[float],
            sampling_fraction: float | None = None) -> sitk.ImageRegistrationMethod:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=settings.histogram_bins)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(sampling_fraction or settings.sampling_fraction, settings.seed)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetShrinkFactorsPerLevel(list(shrink))
    method.SetSmoothingSigmasPerLevel(list(sigmas))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    if settings.threads is not None:
        method.SetNumberOfThreads(settings.threads)
    return method


def _track_levels(method: sitk.ImageRegistrationMethod, iterations: list[int]) -> None:
    """Record the iterations spent at each pyramid level but the last (added after Execute)."""
    state = {"level": 0}

    def on_level() -> None:
        if state["level"] > 0:
            iterations.append(method.GetOptimizerIteration())
        state["level"] += 1

    method.AddCommand(sitk.sitkMultiResolutionIterationEvent, on_level)


def _initial_transform(fixed: sitk.Image, moving: sitk.Image, settings: RegistrationSettings) -> sitk.Transform:
    base = sitk.VersorRigid3DTransform() if settings.transform == "versor" else sitk.Euler3DTransform()
    if settings.initialiser == "moments":
        low = settings.hu_range[0]
        mass_f, mass_m = fixed - low, moving - low  # non-negative "mass" for the centres of mass
        initial = sitk.CenteredTransformInitializer(mass_f, mass_m, base, sitk.CenteredTransformInitializerFilter.MOMENTS)
    else:
        initial = sitk.CenteredTransformInitializer(fixed, moving, base, sitk.CenteredTransformInitializerFilter.GEOMETRY)
    return sitk.VersorRigid3DTransform(initial) if settings.transform == "versor" else sitk.Euler3DTransform(initial)


def _as_rigid(transform: sitk.Transform) -> sitk.Transform:
    """The optimised transform as its concrete class (Execute may hand back a generic one)."""
    if isinstance(transform, (sitk.VersorRigid3DTransform, sitk.Euler3DTransform)):
        return transform
    try:
        return sitk.VersorRigid3DTransform(transform)
    except (RuntimeError, TypeError):
        return sitk.Euler3DTransform(transform)


def _euler_angles_deg(rigid: sitk.Transform) -> tuple[float, float, float]:
    euler = sitk.Euler3DTransform()
    euler.SetCenter(rigid.GetCenter())
    euler.SetMatrix(rigid.GetMatrix())
    return tuple(math.degrees(a) for a in (euler.GetAngleX(), euler.GetAngleY(), euler.GetAngleZ()))


def _bspline_refine(fixed: sitk.Image, moving: sitk.Image, rigid: sitk.Transform,
                    settings: RegistrationSettings) -> tuple[sitk.Transform, float, int, str]:
    """B-spline on top of the rigid transform: x → rigid(bspline(x))."""
    extent = [sz * sp for sz, sp in zip(fixed.GetSize(), fixed.GetSpacing())]
    mesh = [max(1, int(round(e / settings.bspline_grid_mm))) for e in extent]
    bspline = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
    method = _method(settings, settings.bspline_shrink_factors, settings.bspline_smoothing_sigmas_mm, settings.bspline_sampling_fraction)
    method.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=settings.bspline_iterations,
                                maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=4 * settings.bspline_iterations)
    method.SetMovingInitialTransform(rigid)
    method.SetInitialTransform(bspline, inPlace=True)
    method.Execute(fixed, moving)
    composite = sitk.CompositeTransform(rigid)
    composite.AddTransform(bspline)  # applied first
    return composite, float(method.GetMetricValue()), method.GetOptimizerIteration(), method.GetOptimizerStopConditionDescription()


# --------------------------------------------------------------------------- quality


def registration_quality(fixed: sitk.Image, moving: sitk.Image, before: sitk.Transform, after: sitk.Transform,
                         final_metric: float, settings: RegistrationSettings | None = None) -> RegistrationQuality:
    """NCC and NMI of the CTs inside the body (either CT above ``settings.body_hu``, moving
    inside its field of view) with the ``before`` and ``after`` transforms."""
    settings = settings or RegistrationSettings()
    ncc_b, nmi_b, _ = _similarity(fixed, moving, before, settings)
    ncc_a, nmi_a, n = _similarity(fixed, moving, after, settings)
    if not np.isfinite(ncc_a):
        acceptable, reason = False, "no overlap of the two CTs inside the body"
    elif ncc_a < settings.min_ncc:
        acceptable, reason = False, f"NCC after registration {ncc_a:.3f} < {settings.min_ncc:g}"
    elif np.isfinite(ncc_b) and ncc_a < ncc_b - 0.01:
        acceptable, reason = False, f"NCC fell from {ncc_b:.3f} to {ncc_a:.3f}"
    else:
        acceptable, reason = True, f"NCC after registration {ncc_a:.3f} ≥ {settings.min_ncc:g}"
    return RegistrationQuality(final_metric, ncc_b, ncc_a, nmi_b, nmi_a, n, acceptable, reason)


def _similarity(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform,
                settings: RegistrationSettings) -> tuple[float, float, int]:
    low, high = settings.hu_range
    outside = low - 1000.0
    moved = sitk.Resample(sitk.Cast(moving, sitk.sitkFloat32), fixed, transform, sitk.sitkLinear, outside, sitk.sitkFloat32)
    a = np.clip(sitk.GetArrayViewFromImage(fixed).astype(np.float64), low, high)
    b_raw = sitk.GetArrayViewFromImage(moved).astype(np.float64)
    inside_fov = b_raw > outside + 1.0
    b = np.clip(b_raw, low, high)
    region = inside_fov & ((a > settings.body_hu) | (b > settings.body_hu))
    n = int(region.sum())
    if n < 10:
        return float("nan"), float("nan"), n
    return normalised_cross_correlation(a[region], b[region]), normalised_mutual_information(a[region], b[region]), n


def normalised_cross_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two samples (1 = identical up to a linear map)."""
    a = a - a.mean()
    b = b - b.mean()
    denominator = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def normalised_mutual_information(a: np.ndarray, b: np.ndarray, bins: int = 64) -> float:
    """Studholme's NMI (H(A) + H(B)) / H(A, B) from a ``bins``² joint histogram (1: independent, 2: identical)."""
    joint, _, _ = np.histogram2d(a, b, bins=bins)
    p = joint / joint.sum()
    pa, pb = p.sum(axis=1), p.sum(axis=0)

    def entropy(q: np.ndarray) -> float:
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())

    h_joint = entropy(p.ravel())
    return (entropy(pa) + entropy(pb)) / h_joint if h_joint > 0 else float("nan")


# --------------------------------------------------------------------------- applying transforms


def resample_emission(emission: sitk.Image, reference: sitk.Image, transform: sitk.Transform | None = None,
                      interpolator: int = sitk.sitkLinear, default_value: float = 0.0) -> sitk.Image:
    """``emission`` (any units; its frame of reference is the moving CT's) on the grid of
    ``reference`` (the fixed CT, or any grid in the fixed frame) through ``transform`` (fixed →
    moving; identity when None). float32; voxels outside the emission's field get ``default_value``."""
    transform = transform if transform is not None else sitk.Transform(3, sitk.sitkIdentity)
    return sitk.Resample(sitk.Cast(emission, sitk.sitkFloat32), reference, transform, interpolator, default_value, sitk.sitkFloat32)


def resample_mask(mask: sitk.Image, reference: sitk.Image, transform: sitk.Transform | None = None) -> sitk.Image:
    """A label/mask image on ``reference``'s grid through ``transform`` (nearest neighbour, uint8/label type kept)."""
    transform = transform if transform is not None else sitk.Transform(3, sitk.sitkIdentity)
    return sitk.Resample(mask, reference, transform, sitk.sitkNearestNeighbor, 0, mask.GetPixelID())


def target_registration_error(estimated: sitk.Transform, truth: sitk.Transform, points_mm: Sequence[Sequence[float]]) -> np.ndarray:
    """Distance (mm) between where ``estimated`` and ``truth`` send each fixed point."""
    return np.array([np.linalg.norm(np.subtract(estimated.TransformPoint(tuple(map(float, p))), truth.TransformPoint(tuple(map(float, p)))))
                     for p in points_mm])

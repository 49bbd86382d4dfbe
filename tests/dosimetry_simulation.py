"""A simulated multi-time-point Lu-177 SPECT/CT study for dosimetry, made by the IEC sample's
independent simulator (``data-samples/simulate_lu177_iec.py``: its own analytic phantom,
projector, collimator response, scatter model and Poisson noise; nothing from recon/ or quant/).

The IEC body phantom stands for a patient: its background is the body (mono-exponential
clearance), its six spheres are lesions with their own kinetics, an uptake and a slower washout
c(t) = c·(exp(−λ_w t) − exp(−λ_u t)) (uptake half-time 1–1.4 h). At each time
point the phantom is repositioned with its table (shifted in x, y and z; the camera and its axis
stay) before projection and CT, so that the time points differ as repositioned scans do. A coarser
camera than the sample's (64 × 64 pixels of 8.84 mm, 2 heads × 15 views of 12°; the projector's
fine grid 4.42 mm) keeps the simulation and the reconstructions short.

Truth: activity concentrations (Bq/mL, t in h after administration) per compartment
(background water, each sphere); the TIA of a region of voxels is Σ_j ã_j × (volume of
compartment j inside those voxels), ã_j = ∫c_j dt (:func:`tia_density_Bq_h_per_mL`), the volumes
from the simulator's analytic volume fractions on that grid.

Recovery curve: separate acquisitions of the IEC phantom (:func:`simulate_recovery_phantom`:
another position, one per filling of :data:`RECOVERY_FILLINGS_BQ_ML`, each its own noise) with
the same camera and reconstruction, analysed by ``quant phantom`` (the users' code path), as a
site would measure it; nothing of the study's own truth goes into it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parents[1]
SIMULATOR = ROOT / "data-samples" / "simulate_lu177_iec.py"
SENSITIVITY_REGISTRY = ROOT / "data-samples" / "lu177-iec" / "sensitivity.json"   # measured on the simulated planar source


def simulator():
    """The simulator as a module (imported once; its globals are set per time point)."""
    if "simulate_lu177_iec" not in sys.modules:
        spec = importlib.util.spec_from_file_location("simulate_lu177_iec", SIMULATOR)
        module = importlib.util.module_from_spec(spec)
        sys.modules["simulate_lu177_iec"] = module
        spec.loader.exec_module(module)
    return sys.modules["simulate_lu177_iec"]


LP = math.log(2.0) / (6.647 * 24.0)        # Lu-177 physical decay (1/h)
BACKGROUND = (50e3, LP + 0.012)             # body: Bq/mL at administration, effective decay 1/h
# spheres: (c Bq/mL, washout λ_w 1/h, uptake λ_u 1/h): c(t) = c·(exp(−λ_w t) − exp(−λ_u t))
SPHERES = {1: (350e3, LP + 0.010, 0.5), 2: (350e3, LP + 0.010, 0.5), 3: (350e3, LP + 0.010, 0.5), 4: (350e3, LP + 0.010, 0.5),
           5: (450e3, LP + 0.006, 0.5), 6: (550e3, LP + 0.003, 0.7)}
RECOVERY_SHIFT_MM = (6.0, -4.0, 15.0)       # the recovery phantom's position (another voxelisation)
# background, spheres (Bq/mL) of the recovery acquisitions: 4:1 (NEMA NU 2's lower ratio), the
# sample's 10:1 (EARL) and 30:1 (the upper end of lesion-to-background ratios): OSEM's recovery
# depends on the contrast, so a site measures it at several
RECOVERY_FILLINGS_BQ_ML = ((40e3, 160e3), (40e3, 400e3), (40e3, 1200e3))
RECOVERY_MIN_DIAMETER_MM = 17.0             # smaller spheres may hold no centre of the 8.84 mm voxels: not described
HOURS = (4.0, 24.0, 96.0)
# phantom position per time point (x, y, z mm), large enough that regions left where time point 1
# had them miss their spheres. The phantom is uniform along z but for its end caps and sphere
# plane: z shifts are whole CT slices (5 mm), else the CT registration's z is ill-conditioned on
# it (a 9 mm shift came out 15 mm, NCC 0.14)
SHIFTS_MM = ((0.0, 0.0, 0.0), (15.0, -10.0, 30.0), (-12.0, 8.0, -25.0))
VIEWS_PER_HEAD, STEP_DEG = 15, 12.0
N_PIX, PIXEL_MM = 64, 8.8392
PATIENT_ID = "SIM-LU177-DOSE"


@dataclass
class TimePointFiles:
    nm: Path
    ct: Path
    hours: float
    shift_mm: tuple[float, float, float]


@dataclass
class SimulatedStudy:
    folder: Path
    points: list[TimePointFiles]


class _Placed:
    """The simulator's phantom moved by ``shift`` (x, y, z mm) and its acquisition settings,
    restored on exit."""

    NAMES = ("inside_table", "N_PIX", "PIXEL_MM", "FINE_MM", "N_FINE", "N_DEPTH", "Z_TOP_MM", "AXIS_XY_MM", "Z_RANGE_MM", "SPHERE_PLANE_Z_MM", "N_VIEWS", "STEP_DEG", "ACQ_START", "RADIOPHARM_START", "CT_TIME",
             "PHANTOM_SUBJECT", "BACKGROUND_BQ_ML", "SPHERE_BQ_ML", "uid")

    def __init__(self, shift: Sequence[float], hours: float = 0.0, study_uid: str = "") -> None:
        self.shift, self.hours, self.study_uid = tuple(shift), hours, study_uid

    def __enter__(self):
        sim = simulator()
        self.saved = {name: getattr(sim, name) for name in self.NAMES}
        dx, dy, dz = self.shift
        sim.AXIS_XY_MM = (self.saved["AXIS_XY_MM"][0] + dx, self.saved["AXIS_XY_MM"][1] + dy)
        sim.Z_RANGE_MM = (self.saved["Z_RANGE_MM"][0] + dz, self.saved["Z_RANGE_MM"][1] + dz)
        sim.SPHERE_PLANE_Z_MM = self.saved["SPHERE_PLANE_Z_MM"] + dz
        table = self.saved["inside_table"]
        sim.inside_table = lambda x, y: table(x - dx, y - dy)
        sim.N_VIEWS, sim.STEP_DEG = VIEWS_PER_HEAD, STEP_DEG
        sim.N_PIX, sim.PIXEL_MM = N_PIX, PIXEL_MM
        sim.FINE_MM, sim.N_FINE = PIXEL_MM / 2.0, 2 * N_PIX
        sim.N_DEPTH = round(self.saved["N_DEPTH"] * self.saved["FINE_MM"] / sim.FINE_MM)   # the same depth (±216 mm)
        sim.Z_TOP_MM = -100.0 + (N_PIX - 1) / 2.0 * PIXEL_MM                                   # centred axially, as the sample
        administration = self.saved["RADIOPHARM_START"]
        sim.ACQ_START = administration + timedelta(hours=self.hours)
        sim.CT_TIME = sim.ACQ_START + timedelta(minutes=10)
        sim.PHANTOM_SUBJECT = sim.Subject("SIMULATED^DOSIMETRY", PATIENT_ID, self.study_uid or generate_uid(), generate_uid(),
                                          sim.ACQ_START, "1")
        # the header's administered activity: the phantom's activity at administration
        sim.BACKGROUND_BQ_ML, sim.SPHERE_BQ_ML = BACKGROUND[0], SPHERES[6][0]
        sim.uid = lambda name: generate_uid()
        return sim

    def __exit__(self, *exc) -> None:
        sim = simulator()
        for name, value in self.saved.items():
            setattr(sim, name, value)


def concentrations(hours: float) -> tuple[float, list[float]]:
    """Background and sphere concentrations (Bq/mL) at ``hours`` after administration."""
    return (BACKGROUND[0] * math.exp(-BACKGROUND[1] * hours),
            [c * (math.exp(-washout * hours) - math.exp(-uptake * hours)) for c, washout, uptake in (SPHERES[k] for k in range(1, 7))])


def tia_density_Bq_h_per_mL(compartment: str) -> float:
    """∫₀^∞ c(t) dt (Bq·h/mL) of ``compartment`` ('background' or 'sphere_K')."""
    if compartment == "background":
        return BACKGROUND[0] / BACKGROUND[1]
    c, washout, uptake = SPHERES[int(compartment.removeprefix("sphere_"))]
    return c * (1.0 / washout - 1.0 / uptake)


def simulate_time_point(folder: Path, hours: float, shift: Sequence[float], rng: np.random.Generator, study_uid: str = "",
                        filling: tuple[float, Sequence[float]] | None = None) -> TimePointFiles:
    """Projections (NM TOMO) and CT of the phantom at ``shift``, ``hours`` after administration
    (concentrations ``filling`` = (background, spheres) Bq/mL, default the study's kinetics)."""
    background, spheres = filling or concentrations(hours)
    with _Placed(shift, hours, study_uid) as sim:
        angles = np.stack([sim.view_angles_deg(s) for s in sim.HEAD_START_DEG])
        radii = np.vectorize(sim.orbit_radius_mm)(angles)
        per_mbq = np.array([sim.SENSITIVITY_CPS_PER_MBQ * sim.frame_time_integral_s(k * sim.FRAME_S, sim.FRAME_S) for k in range(sim.N_VIEWS)])
        primary = np.stack([np.stack([sim.project_view(angles[h, k], radii[h, k], per_mbq[k], background, spheres)
                                      for k in range(sim.N_VIEWS)]) for h in range(len(sim.HEAD_START_DEG))])
        expected = sim.window_expectations(primary, sim.SCATTER_FRACTION)
        tomo = sim.Tomo(angles, radii, per_mbq, primary, expected, sim.poisson_uint16(rng, expected))
        nm = folder / "nm" / "projections.dcm"
        sim.write_projections(tomo, nm)
        _centre_detector_position(nm, sim)
        sim.write_ct(folder / "ct")
    return TimePointFiles(nm, folder / "ct", hours, tuple(shift))


def _centre_detector_position(path: Path, sim) -> None:
    """The simulator writes the first pixel's position for its 128-pixel detector (−63.5 pixels):
    rewrite it for this detector's size (the view geometry it projected with)."""
    ds = pydicom.dcmread(path)
    for item in ds.DetectorInformationSequence:
        item.ImagePositionPatient = [sim.ds_str(-(N_PIX - 1) / 2.0 * PIXEL_MM)] * 2 + [sim.ds_str(sim.Z_TOP_MM)]
    ds.save_as(path, enforce_file_format=True)


def make_study(folder: Path, hours: Sequence[float] = HOURS, shifts: Sequence[Sequence[float]] = SHIFTS_MM, seed: int = 177) -> SimulatedStudy:
    rng = np.random.Generator(np.random.PCG64(seed))
    study_uid = generate_uid()
    points = [simulate_time_point(folder / f"tp{k + 1}", h, shifts[k], rng, study_uid) for k, h in enumerate(hours)]
    return SimulatedStudy(folder, points)


# --------------------------------------------------------------------------- regions and truth


def sphere_centres(shift: Sequence[float]) -> dict[int, np.ndarray]:
    """Sphere centres (mm, LPS) of the phantom placed at ``shift``."""
    with _Placed(shift) as sim:
        return {s.label: np.asarray(s.centre_mm, dtype=np.float64) for s in sim.spheres()}


def _grid(image: sitk.Image):
    sim = simulator()
    return sim.Grid(np.asarray(image.GetOrigin()), np.asarray(image.GetDirection()).reshape(3, 3).T, tuple(image.GetSpacing()), image.GetSize())


def compartment_volumes_mL(image: sitk.Image, shift: Sequence[float]) -> dict[str, np.ndarray]:
    """Per voxel of ``image``'s grid (array order z, y, x): mL of background water and of each
    sphere of the phantom placed at ``shift``, from the simulator's analytic fractions."""
    grid = _grid(image)
    with _Placed(shift) as sim:
        water = sim.material_fractions(grid).water
        out = {}
        for sphere in sim.spheres():
            fraction = np.zeros(grid.shape)
            found = sim.sphere_fraction(grid, sphere)
            if found is not None:
                box, frac = found
                fraction[box] = frac
            out[f"sphere_{sphere.label}"] = fraction
    out["background"] = water - sum(out.values())
    return {name: np.ascontiguousarray(v.transpose(2, 1, 0)) * grid.voxel_ml for name, v in out.items()}


def truth_tia_MBq_h(volumes: dict[str, np.ndarray], mask: np.ndarray) -> float:
    """TIA (MBq·h, from administration to infinity) of the voxels in ``mask`` (z, y, x)."""
    return sum(tia_density_Bq_h_per_mL(name) * float(v[mask].sum()) for name, v in volumes.items()) * 1e-6


def ball_mask(image: sitk.Image, centre_mm: Sequence[float], radius_mm: float) -> sitk.Image:
    """uint8 mask of the voxel centres of ``image`` within ``radius_mm`` of ``centre_mm``."""
    size = image.GetSize()
    index = np.stack(np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")[::-1], axis=-1).reshape(-1, 3).astype(np.float64)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    points = np.asarray(image.GetOrigin()) + (index * np.asarray(image.GetSpacing())) @ direction.T
    inside = (np.linalg.norm(points - np.asarray(centre_mm), axis=1) <= radius_mm).reshape(size[::-1])
    mask = sitk.GetImageFromArray(inside.astype(np.uint8))
    mask.CopyInformation(image)
    return mask


# organ-like regions (mm, LPS, in the phantom's own frame at time point 1): balls around the two
# largest spheres (sphere + surrounding background) and one in uniform background, posterior and
# below the sphere plane, clear of spheres, lung insert and end caps
REGIONS = {"kidney_left": (6, 35.0), "spleen": (5, 35.0), "liver": (None, 40.0)}   # (sphere label or None, radius mm)
LIVER_CENTRE_OFFSET_MM = (0.0, 80.0, -70.0)   # from (axis x, axis y, sphere plane z)
OSEM_ITERATIONS_SUBSETS = (3, 5)


def region_centre(name: str) -> np.ndarray:
    """Centre (mm, LPS) of region ``name`` at time point 1."""
    label, _ = REGIONS[name]
    first = SHIFTS_MM[0]
    if label is not None:
        return sphere_centres(first)[label]
    with _Placed(first) as sim:
        return np.add((sim.AXIS_XY_MM[0], sim.AXIS_XY_MM[1], sim.SPHERE_PLANE_Z_MM), LIVER_CENTRE_OFFSET_MM)


def write_region_masks(study: SimulatedStudy) -> dict[str, Path]:
    """The regions as NIfTI masks on time point 1's CT grid."""
    from recon.io.ct import read_ct_series

    ct, _, _ = read_ct_series(study.points[0].ct)
    masks = {}
    for name, (_, radius) in REGIONS.items():
        masks[name] = study.folder / f"{name}.nii.gz"
        sitk.WriteImage(ball_mask(ct, region_centre(name), radius), str(masks[name]))
    return masks


LESIONS = (4, 5, 6)   # spheres given as lesions (22, 28, 37 mm), masks of their inner diameter on time point 1's CT


def write_lesion_masks(study: SimulatedStudy) -> dict[str, Path]:
    """The lesions (spheres of :data:`LESIONS`, their inner radius) as NIfTI masks on time point 1's CT grid."""
    from recon.io.ct import read_ct_series

    ct, _, _ = read_ct_series(study.points[0].ct)
    centres = sphere_centres(SHIFTS_MM[0])
    with _Placed(SHIFTS_MM[0]) as sim:
        diameters = {s.label: s.diameter_mm for s in sim.spheres()}
    masks = {}
    for label in LESIONS:
        masks[f"lesion_{label}"] = study.folder / f"lesion_{label}.nii.gz"
        sitk.WriteImage(ball_mask(ct, centres[label], diameters[label] / 2.0), str(masks[f"lesion_{label}"]))
    return masks


def simulate_recovery_phantom(folder: Path, filling: tuple[float, float] = RECOVERY_FILLINGS_BQ_ML[1], seed: int = 2026) -> tuple[TimePointFiles, Path]:
    """A separate IEC acquisition for the recovery curve: the phantom at :data:`RECOVERY_SHIFT_MM`
    filled with ``filling`` (background, spheres Bq/mL), the study's camera; its projections, CT and
    phantom description (``quant phantom``'s layout, concentrations at the acquisition start)."""
    background, sphere = filling
    point = simulate_time_point(folder, 24.0, RECOVERY_SHIFT_MM, np.random.Generator(np.random.PCG64(seed)), filling=(background, [sphere] * 6))
    with _Placed(RECOVERY_SHIFT_MM, 24.0) as sim:
        description = {"description": "IEC phantom for the dosimetry test's recovery curve (tests/dosimetry_simulation.py)",
                       "reference_datetime": sim.ACQ_START.isoformat(), "nuclide": {"name": "Lu-177", "half_life_s": sim.HALF_LIFE_S},
                       "background_concentration_Bq_per_mL": background,
                       "spheres": [{"label": s.label, "diameter_mm": s.diameter_mm, "centre_mm": list(s.centre_mm), "concentration_Bq_per_mL": sphere}
                                   for s in sim.spheres() if s.diameter_mm >= RECOVERY_MIN_DIAMETER_MM]}
    path = folder / "phantom.json"
    path.write_text(json.dumps(description, indent=2))
    return point, path


def recon_folder(point: TimePointFiles) -> Path:
    return point.nm.parent.parent / "recon"


def reconstruct(point: TimePointFiles) -> Path:
    """theraflow's SPECT reconstruction of one time point (OSEM 3 × 5, CT attenuation, PSF, TEW,
    sensitivity measured on the simulated planar source) into :func:`recon_folder`."""
    from recon.spect.outputs import write_spect_result
    from recon.spect.pipeline import SpectParameters, reconstruct_spect
    from recon.spect.reconstruct import Algorithm

    params = SpectParameters(algorithm=Algorithm("osem", *OSEM_ITERATIONS_SUBSETS), registry=SENSITIVITY_REGISTRY)
    return write_spect_result(reconstruct_spect([point.nm], point.ct, params), recon_folder(point))


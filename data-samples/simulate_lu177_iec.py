#!/usr/bin/env python3
"""Deterministic simulator of a Lu-177 SPECT/CT acquisition of a NEMA IEC body phantom.

It writes the ground truth that ``theraflow``'s reconstruction is tested against, and is
deliberately independent of it: no import from ``recon``, ``quant``, ``flows`` or PyTomography,
its own projector, and an analytic phantom evaluated directly at the projector's sample points
(no voxelised object is rotated or interpolated), so a reconstruction is never checked against
its own model ("inverse crime").

Units and conventions
---------------------
* Coordinates: DICOM patient LPS in millimetres (x -> patient left, y -> posterior, z -> head).
  The camera's axis of rotation is the line x = y = 0.
* Activity concentration in Bq/mL, activity in MBq, times in seconds, attenuation in 1/mm
  inside the code (1/cm in the JSON), energies in keV. Reference time of every concentration:
  acquisition start, 2026-11-02T10:00:00.

Phantom (approximate NEMA IEC body phantom, supine, head first)
---------------------------------------------------------------
Interior: a prism along z (z = -190 ... -10 mm) about the axis (xc, yc) = (8, 22) mm. Cross
section relative to the axis: for y >= yc a half disc of radius 147 mm; for yc - 77 <= y < yc
all points within 77 mm of the segment |x - xc| <= 70 (two quarter circles joined by a flat).
A 3 mm PMMA shell surrounds it (sides and end caps). A lung insert (cylinder, diameter 51 mm,
on the axis, whole interior length) has no activity. Six water spheres (10 ... 37 mm inner
diameter, walls ignored) centred in the plane z = -70 mm, 57.2 mm from the axis. A 10 mm
patient table lies below the phantom. Background 40 kBq/mL, spheres 400 kBq/mL.

Camera (GE Discovery 670, two heads, MEGP collimator, 208 keV)
--------------------------------------------------------------
Head at DICOM angle theta: unit vector axis -> detector n = (sin t, cos t, 0), columns along
u = (-cos t, sin t, 0), rows along -z; pixel (i, j) centre at lateral (j - 63.5) * 4.4196 mm
along u and z = z_top - i * 4.4196 mm. Heads 1 and 2 start at 180 and 0 degrees and step
6 degrees counter-clockwise ("CC": theta = start + 6 k). Body-contour orbit: the radius R
(axis -> collimator face) of each view is the phantom's outer-wall support function along n plus
30 mm.

Forward model of one view, on a fine grid of 2.2098 mm (half a detector pixel) aligned with the
detector (depth along n, lateral along u, axial along -z):

1. volume fractions of every material in every fine voxel, computed analytically: the phantom's
   parts are prisms along z (exact axial overlap x 8 x 8 in-plane sub-samples) and spheres
   (6 x 6 x 6 sub-samples);
2. activity per voxel (MBq) = concentration x volume; attenuation factor exp(-integral mu ds)
   from the voxel centre to the collimator face along n (half-voxel midpoint rule);
3. collimator-detector response: per depth plane a 2-D Gaussian of
   sigma(d) = sqrt((D (L_eff + d) / L_eff)^2 + FWHM_int^2) / 2.3548, d = R - depth
   (distance to the collimator face), D = 3.0 mm hole diameter, L_eff = 58 - 2 / mu_Pb with
   mu_Pb = 1.26 /mm, FWHM_int = 3.6 mm * sqrt(140 / 208);
4. sum over depth, bin 2 x 2 fine pixels into one detector pixel;
5. expected primary counts = sum A[MBq] * S * integral_frame exp(-lambda t) dt * attenuation
   * blur with S = 9.2 counts/s/MBq (one head, 208 keV photopeak window, source in air) and
   25 s frames, both heads simultaneous, views back to back (Lu-177 T1/2 = 574300 s).

Scatter (P = expected primary photopeak projection, G_s = 2-D Gaussian of sigma s mm):
  photopeak  187.2-228.8 keV : P + f * G_25(P)                       (f = 0.30)
  lower      166.4-187.2 keV : 2 w_low / w_peak * 0.85 * f * G_30(P)
  upper      228.8-249.6 keV : 2 w_up / w_peak * 0.15 * f * G_30(P) + 0.02 P
The 0.02 P in the upper window stands for the 249.7 keV line. The triple-energy-window estimate
(C_low / w_low + C_up / w_up) * w_peak / 2 = f G_30(P) + 0.02 P is thus close to, not equal to,
the true photopeak scatter f G_25(P). Counts are Poisson draws (numpy PCG64, seed 20261129),
stored as uint16.

Outputs (see the README.md written next to them): ``nm/projections.dcm`` (GE-style NM TOMO),
``ct/CT0001.dcm`` ... (RLE-compressed CT of the same frame of reference),
``calibration/planar_source.dcm`` (NM STATIC, 100 MBq source in air), ``truth/phantom.json``,
``truth/activity.nii.gz`` (Bq/mL), ``truth/spheres.nii.gz`` (labels 1..6 = 10 ... 37 mm).

Run: ``python data-samples/simulate_lu177_iec.py --out data-samples/lu177-iec``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.datadict import tag_for_keyword
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid
from scipy.ndimage import gaussian_filter
from scipy.special import erf

# --- camera and acquisition ------------------------------------------------------------------
PIXEL_MM = 4.4196                      # detector pixel (square)
N_PIX = 128                            # detector matrix
FINE_MM = PIXEL_MM / 2                 # projector's fine grid step
N_FINE = 2 * N_PIX                     # fine lateral / axial samples across the detector
Z_TOP_MM = -100.0 + 63.5 * PIXEL_MM    # z of detector row 0 (phantom centred axially)
N_DEPTH = 196                          # fine depth samples, centred on the axis (+-216 mm)
HEAD_START_DEG = (180.0, 0.0)          # heads 1 and 2
N_VIEWS = 30                           # views per head
STEP_DEG = 6.0                         # "CC": theta = start + k * step
FRAME_S = 25.0                         # per view
CLEARANCE_MM = 30.0                    # body-contour orbit clearance
SENSITIVITY_CPS_PER_MBQ = 9.2          # one head, primary photons, photopeak window, in air
HOLE_DIAMETER_MM = 3.0                 # GE MEGP
HOLE_LENGTH_MM = 58.0
MU_LEAD_PER_MM = 1.26                  # lead at 208 keV
L_EFF_MM = HOLE_LENGTH_MM - 2.0 / MU_LEAD_PER_MM
INTRINSIC_FWHM_MM = 3.6 * math.sqrt(140.0 / 208.0)
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
GAUSS_TRUNCATE = 4.0                   # Gaussian kernels cut at 4 sigma

# --- nuclide and time ------------------------------------------------------------------------
HALF_LIFE_S = 574300.0
DECAY_PER_S = math.log(2.0) / HALF_LIFE_S
ACQ_START = datetime(2026, 11, 2, 10, 0, 0)
RADIOPHARM_START = ACQ_START - timedelta(hours=2)
CT_TIME = ACQ_START + timedelta(minutes=27)
CAL_ACQ = datetime(2026, 11, 2, 9, 0, 0)
CAL_RADIOPHARM_START = CAL_ACQ - timedelta(hours=1)
CAL_ACTIVITY_MBQ = 100.0               # at CAL_RADIOPHARM_START
CAL_FRAME_S = 300.0
CAL_RADIUS_MM = 200.0                  # both heads, source on the axis
CAL_SCATTER_FRACTION = 0.02
SEED = 20261129

# --- energy windows (order as stored in the DICOM file) and scatter model --------------------
WINDOWS = (("Lu177_SC1", 166.4, 187.2), ("Lu177_EM", 187.2, 228.8), ("Lu177_SC2", 228.8, 249.6))
LOW, PEAK, UP = 0, 1, 2
SCATTER_FRACTION = 0.30                # photopeak scatter / primary (before its blur)
PEAK_SCATTER_SIGMA_MM = 25.0
SIDE_SCATTER_SIGMA_MM = 30.0
LOW_SHARE, UP_SHARE = 0.85, 0.15       # shares of the side-window scatter (see docstring)
UPPER_PRIMARY_FRACTION = 0.02          # 249.7 keV line in the upper window

# --- phantom (mm, LPS) -----------------------------------------------------------------------
AXIS_XY_MM = (8.0, 22.0)
Z_RANGE_MM = (-190.0, -10.0)
POSTERIOR_RADIUS_MM = 147.0
CORNER_RADIUS_MM = 77.0
HALF_FLAT_MM = 70.0
WALL_MM = 3.0
LUNG_RADIUS_MM = 25.5
SPHERE_PLANE_Z_MM = -70.0
SPHERE_RING_MM = 57.2
SPHERE_LAYOUT = ((10.0, 330.0), (13.0, 270.0), (17.0, 210.0),
                 (22.0, 150.0), (28.0, 90.0), (37.0, 30.0))   # (diameter mm, angle deg); label = index + 1
BACKGROUND_BQ_ML = 40e3
SPHERE_BQ_ML = 400e3
TABLE_Y_MM = (AXIS_XY_MM[1] + POSTERIOR_RADIUS_MM + 5.0, AXIS_XY_MM[1] + POSTERIOR_RADIUS_MM + 15.0)
TABLE_HALF_WIDTH_MM = 200.0

# --- materials: linear attenuation at 208 keV (1/mm) and CT number (HU) ----------------------
MU_WATER = 0.01370
MU_LUNG = MU_WATER * (1.0 - 0.700)
MU_PMMA = MU_WATER * 1.18
MU_TABLE = MU_WATER * 1.20
HU = {"air": -1000.0, "water": 0.0, "lung": -700.0, "pmma": 120.0, "table": 200.0}

# --- CT and truth grids ----------------------------------------------------------------------
CT_N = 256
CT_PIXEL_MM = 500.0 / CT_N
CT_SLICE_MM = 5.0
CT_Z_MM = np.arange(-240.0, 40.0 + 1e-9, CT_SLICE_MM)
CT_INTERCEPT = -1024.0
TRUTH_SHAPE_XYZ = (142, 110, 86)
TRUTH_CENTRE_MM = (AXIS_XY_MM[0], AXIS_XY_MM[1] + 35.0, -100.0)
SUB_2D = 8                             # in-plane sub-samples per axis for prisms
SUB_3D = 6                             # sub-samples per axis for spheres

# --- DICOM identity --------------------------------------------------------------------------
NM_STORAGE = "1.2.840.10008.5.1.4.1.1.20"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MANUFACTURER = "GE MEDICAL SYSTEMS"
MODEL = "Tandem_Discovery_670_Pro"


def uid(name: str) -> str:
    """A fixed UID derived from ``name`` (reproducible across runs)."""
    return generate_uid(entropy_srcs=["theraflow", "data-samples", "lu177-iec", name])


# =============================================================================================
# Geometry
# =============================================================================================

def detector_normal(theta_deg: float) -> np.ndarray:
    """Unit vector (LPS) from the axis of rotation towards the detector at DICOM angle theta."""
    t = math.radians(theta_deg)
    return np.array([math.sin(t), math.cos(t), 0.0])


def detector_lateral(theta_deg: float) -> np.ndarray:
    """Unit vector (LPS) along which the detector's column index grows."""
    t = math.radians(theta_deg)
    return np.array([-math.cos(t), math.sin(t), 0.0])


def view_angles_deg(start_deg: float) -> np.ndarray:
    """DICOM angles (degrees, [0, 360)) of the views of a head rotating 'CC' from start_deg."""
    return (start_deg + STEP_DEG * np.arange(N_VIEWS)) % 360.0


def orbit_radius_mm(theta_deg: float) -> float:
    """Axis-to-collimator distance (mm, rounded to 0.01 as stored in DICOM) of a body-contour
    orbit: the support function of the phantom's outer wall along n(theta) plus clearance."""
    n = detector_normal(theta_deg)
    centre = n[0] * AXIS_XY_MM[0] + n[1] * AXIS_XY_MM[1]
    if n[1] >= 0.0:   # posterior half: half disc
        extent = POSTERIOR_RADIUS_MM
    else:             # anterior half: segment |x| <= 70 grown by 77 mm
        extent = HALF_FLAT_MM * abs(n[0]) + CORNER_RADIUS_MM
    return round(centre + extent + WALL_MM + CLEARANCE_MM, 2)


def cdr_sigma_mm(distance_mm: np.ndarray | float) -> np.ndarray | float:
    """Gaussian sigma (mm) of the collimator-detector response at distance_mm from the
    collimator face: geometric MEGP resolution combined in quadrature with the intrinsic one."""
    fwhm_coll = HOLE_DIAMETER_MM * (L_EFF_MM + np.asarray(distance_mm)) / L_EFF_MM
    return np.sqrt(fwhm_coll**2 + INTRINSIC_FWHM_MM**2) / FWHM_PER_SIGMA


def pixel_of(point_mm: Sequence[float], theta_deg: float) -> tuple[float, float]:
    """Continuous (row, column) detector coordinates of an LPS point seen at angle theta."""
    lateral = float(np.dot(point_mm, detector_lateral(theta_deg)))
    return (Z_TOP_MM - point_mm[2]) / PIXEL_MM, lateral / PIXEL_MM + 63.5


# =============================================================================================
# Analytic phantom
# =============================================================================================

@dataclass(frozen=True)
class Sphere:
    """A hot sphere: label 1..6, inner diameter (mm), centre (mm, LPS)."""

    label: int
    diameter_mm: float
    centre_mm: tuple[float, float, float]

    @property
    def volume_ml(self) -> float:
        """Inner volume in mL."""
        return math.pi / 6.0 * self.diameter_mm**3 / 1000.0


def spheres() -> list[Sphere]:
    """The six spheres, label 1 (10 mm) ... 6 (37 mm)."""
    out = []
    for k, (diameter, angle) in enumerate(SPHERE_LAYOUT):
        a = math.radians(angle)
        centre = (AXIS_XY_MM[0] + SPHERE_RING_MM * math.cos(a),
                  AXIS_XY_MM[1] + SPHERE_RING_MM * math.sin(a), SPHERE_PLANE_Z_MM)
        out.append(Sphere(k + 1, diameter, tuple(round(c, 4) for c in centre)))
    return out


def inside_body(x: np.ndarray, y: np.ndarray, grow_mm: float = 0.0) -> np.ndarray:
    """True where (x, y) (mm) lies in the IEC cross-section grown by grow_mm (0: interior,
    WALL_MM: outer surface of the wall)."""
    dx = x - AXIS_XY_MM[0]
    dy = y - AXIS_XY_MM[1]
    posterior = (dy >= 0.0) & (dx * dx + dy * dy <= (POSTERIOR_RADIUS_MM + grow_mm) ** 2)
    off_flat = np.maximum(np.abs(dx) - HALF_FLAT_MM, 0.0)
    anterior = (dy < 0.0) & (off_flat * off_flat + dy * dy <= (CORNER_RADIUS_MM + grow_mm) ** 2)
    return posterior | anterior


def inside_wall_outline(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """True inside the outer surface of the phantom wall."""
    return inside_body(x, y, WALL_MM)


def inside_lung(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """True inside the lung insert's cross-section."""
    return (x - AXIS_XY_MM[0]) ** 2 + (y - AXIS_XY_MM[1]) ** 2 <= LUNG_RADIUS_MM**2


def inside_table(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """True inside the patient table's cross-section."""
    return (np.abs(x) < TABLE_HALF_WIDTH_MM) & (y >= TABLE_Y_MM[0]) & (y <= TABLE_Y_MM[1])


def analytic_volumes_ml() -> dict[str, float]:
    """Exact volumes (mL) of the interior, the lung insert, all spheres and the background."""
    area = (math.pi * (POSTERIOR_RADIUS_MM**2 + CORNER_RADIUS_MM**2) / 2.0
            + 2.0 * HALF_FLAT_MM * CORNER_RADIUS_MM)
    length = Z_RANGE_MM[1] - Z_RANGE_MM[0]
    interior = area * length / 1000.0
    lung = math.pi * LUNG_RADIUS_MM**2 * length / 1000.0
    sphere_total = sum(s.volume_ml for s in spheres())
    return {"interior": interior, "lung": lung, "spheres": sphere_total,
            "background": interior - lung - sphere_total}


def total_activity_mbq() -> float:
    """Phantom activity (MBq) at acquisition start, from the analytic volumes."""
    v = analytic_volumes_ml()
    return (BACKGROUND_BQ_ML * v["background"] + SPHERE_BQ_ML * v["spheres"]) * 1e-6


# =============================================================================================
# Volume fractions on regular grids
# =============================================================================================

@dataclass(frozen=True)
class Grid:
    """Regular grid of box voxels. Voxel (i, j, k) has its centre at
    origin + i*step[0]*axes[0] + j*step[1]*axes[1] + k*step[2]*axes[2] (mm, LPS); axes[0] and
    axes[1] are orthonormal vectors in the x-y plane, axes[2] is +z or -z."""

    origin: np.ndarray
    axes: np.ndarray
    step: tuple[float, float, float]
    shape: tuple[int, int, int]

    def plane_xy(self) -> tuple[np.ndarray, np.ndarray]:
        """x and y (mm) of the voxel centres of one slice, arrays of shape (shape[0], shape[1])."""
        i = np.arange(self.shape[0])[:, None] * self.step[0]
        j = np.arange(self.shape[1])[None, :] * self.step[1]
        x = self.origin[0] + i * self.axes[0, 0] + j * self.axes[1, 0]
        y = self.origin[1] + i * self.axes[0, 1] + j * self.axes[1, 1]
        return x, y

    def z_centres(self) -> np.ndarray:
        """z (mm) of the slices."""
        return self.origin[2] + np.arange(self.shape[2]) * self.step[2] * self.axes[2, 2]

    @property
    def voxel_ml(self) -> float:
        """Voxel volume in mL."""
        return self.step[0] * self.step[1] * self.step[2] / 1000.0


def area_fraction(inside: Callable[[np.ndarray, np.ndarray], np.ndarray], grid: Grid) -> np.ndarray:
    """Fraction (0..1) of each in-plane voxel of ``grid`` covered by a cross-section, from
    SUB_2D x SUB_2D sub-samples; shape (shape[0], shape[1])."""
    x, y = grid.plane_xy()
    offsets = (np.arange(SUB_2D) + 0.5) / SUB_2D - 0.5
    acc = np.zeros(x.shape)
    for a in offsets:
        for b in offsets:
            dx = a * grid.step[0] * grid.axes[0, 0] + b * grid.step[1] * grid.axes[1, 0]
            dy = a * grid.step[0] * grid.axes[0, 1] + b * grid.step[1] * grid.axes[1, 1]
            acc += inside(x + dx, y + dy)
    return acc / SUB_2D**2


def interval_fraction(grid: Grid, z_lo: float, z_hi: float) -> np.ndarray:
    """Exact fraction of each slice's thickness lying within [z_lo, z_hi] (mm)."""
    z = grid.z_centres()
    half = grid.step[2] / 2.0
    overlap = np.minimum(z + half, z_hi) - np.maximum(z - half, z_lo)
    return np.clip(overlap / grid.step[2], 0.0, 1.0)


def sphere_fraction(grid: Grid, sphere: Sphere) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
    """Fraction of each voxel inside ``sphere`` (SUB_3D^3 sub-samples), on the smallest box of
    voxels that holds it: (index slices, fractions), or None when the sphere misses the grid."""
    step = np.asarray(grid.step)
    index = (np.asarray(sphere.centre_mm) - grid.origin) @ grid.axes.T / step
    half = sphere.diameter_mm / 2.0 / step + 1.0
    lo = np.maximum(np.floor(index - half).astype(int), 0)
    hi = np.minimum(np.ceil(index + half).astype(int) + 1, grid.shape)
    if np.any(hi <= lo):
        return None
    offsets = (np.arange(SUB_3D) + 0.5) / SUB_3D - 0.5
    d2 = [((np.arange(lo[a], hi[a])[:, None] + offsets[None, :] - index[a]) * step[a]) ** 2
          for a in range(3)]
    r2 = d2[0][:, :, None, None, None, None] + d2[1][None, None, :, :, None, None] \
        + d2[2][None, None, None, None, :, :]
    frac = (r2 <= (sphere.diameter_mm / 2.0) ** 2).mean(axis=(1, 3, 5))
    return tuple(slice(a, b) for a, b in zip(lo, hi)), frac


@dataclass
class Materials:
    """Volume fractions (0..1) per voxel of a grid; ``water`` includes the spheres' water."""

    water: np.ndarray
    lung: np.ndarray
    pmma: np.ndarray
    table: np.ndarray

    def mu_per_mm(self) -> np.ndarray:
        """Linear attenuation coefficient at 208 keV (1/mm)."""
        return MU_WATER * self.water + MU_LUNG * self.lung + MU_PMMA * self.pmma + MU_TABLE * self.table

    def hounsfield(self) -> np.ndarray:
        """CT number (HU), partial-volume mixture of the materials with air."""
        air = HU["air"]
        return (air + (HU["water"] - air) * self.water + (HU["lung"] - air) * self.lung
                + (HU["pmma"] - air) * self.pmma + (HU["table"] - air) * self.table)


def material_fractions(grid: Grid) -> Materials:
    """Volume fractions of water, lung, PMMA and table on ``grid``: each is a prism along z,
    so its fraction is the product of an in-plane area fraction and an exact axial overlap."""
    interior_z = interval_fraction(grid, *Z_RANGE_MM)
    outer_z = interval_fraction(grid, Z_RANGE_MM[0] - WALL_MM, Z_RANGE_MM[1] + WALL_MM)
    interior = area_fraction(inside_body, grid)
    outer = area_fraction(inside_wall_outline, grid)
    lung = area_fraction(inside_lung, grid)
    table = area_fraction(inside_table, grid)
    interior_3d = interior[:, :, None] * interior_z
    return Materials(
        water=(interior - lung)[:, :, None] * interior_z,
        lung=lung[:, :, None] * interior_z,
        pmma=outer[:, :, None] * outer_z - interior_3d,
        table=np.repeat(table[:, :, None], grid.shape[2], axis=2),
    )


def concentration_bq_ml(grid: Grid, materials: Materials, background_bq_ml: float,
                        sphere_bq_ml: Sequence[float]) -> np.ndarray:
    """Mean activity concentration (Bq/mL) per voxel: background in the water outside the
    spheres, ``sphere_bq_ml[label - 1]`` in each sphere, nothing in the lung."""
    conc = background_bq_ml * materials.water
    for sphere in spheres():
        found = sphere_fraction(grid, sphere)
        if found is not None:
            box, frac = found
            conc[box] += (sphere_bq_ml[sphere.label - 1] - background_bq_ml) * frac
    return conc


def sphere_labels(grid: Grid) -> np.ndarray:
    """uint8 label map: voxels at least half inside sphere k get label k (1..6), others 0."""
    labels = np.zeros(grid.shape, dtype=np.uint8)
    for sphere in spheres():
        found = sphere_fraction(grid, sphere)
        if found is not None:
            box, frac = found
            labels[box][frac >= 0.5] = sphere.label
    return labels


# =============================================================================================
# Emission projector
# =============================================================================================

def frame_time_integral_s(start_s: float, duration_s: float) -> float:
    """Integral of exp(-lambda t) over [start_s, start_s + duration_s] (s): counts per cps of
    activity present at time 0."""
    return math.exp(-DECAY_PER_S * start_s) * -math.expm1(-DECAY_PER_S * duration_s) / DECAY_PER_S


def fine_axial_z_mm(rows: np.ndarray) -> np.ndarray:
    """z (mm) of fine axial samples: two per detector row, row 0 at Z_TOP_MM."""
    return Z_TOP_MM + FINE_MM / 2.0 - rows * FINE_MM


def active_fine_rows(radius_mm: float) -> tuple[int, int]:
    """Fine axial rows [first, stop) that hold activity, widened by the largest blur kernel."""
    z = fine_axial_z_mm(np.arange(N_FINE))
    rows = np.nonzero((z - FINE_MM / 2 < Z_RANGE_MM[1]) & (z + FINE_MM / 2 > Z_RANGE_MM[0]))[0]
    farthest_mm = radius_mm + (N_DEPTH / 2) * FINE_MM
    pad = int(math.ceil(GAUSS_TRUNCATE * cdr_sigma_mm(farthest_mm) / FINE_MM)) + 1
    return max(rows[0] - pad, 0), min(rows[-1] + 1 + pad, N_FINE)


def view_grid(theta_deg: float, rows: tuple[int, int]) -> Grid:
    """Fine grid of one view: axis 0 = depth along n (towards the detector), axis 1 = lateral
    along u (fine column l at (l - 127.5) * FINE_MM), axis 2 = fine axial rows[0]..rows[1]."""
    n, u = detector_normal(theta_deg), detector_lateral(theta_deg)
    depth0 = -(N_DEPTH - 1) / 2.0 * FINE_MM
    lateral0 = -(N_FINE - 1) / 2.0 * FINE_MM
    origin = depth0 * n + lateral0 * u + np.array([0.0, 0.0, fine_axial_z_mm(np.array(rows[0]))])
    axes = np.stack([n, u, np.array([0.0, 0.0, -1.0])])
    return Grid(origin, axes, (FINE_MM, FINE_MM, FINE_MM), (N_DEPTH, N_FINE, rows[1] - rows[0]))


def project_view(theta_deg: float, radius_mm: float, counts_per_mbq: float,
                 background_bq_ml: float = BACKGROUND_BQ_ML,
                 sphere_bq_ml: Sequence[float] = (SPHERE_BQ_ML,) * 6,
                 attenuate: bool = True) -> np.ndarray:
    """Expected primary photopeak counts [row, column] (128 x 128) of one view.

    counts_per_mbq: counts recorded per MBq present at the reference time (S x decay-weighted
    frame time, s x cps/MBq). Concentrations in Bq/mL at the reference time."""
    rows = active_fine_rows(radius_mm)
    grid = view_grid(theta_deg, rows)
    materials = material_fractions(grid)
    source = concentration_bq_ml(grid, materials, background_bq_ml, sphere_bq_ml)
    source *= grid.voxel_ml * 1e-6 * counts_per_mbq
    depth = (np.arange(N_DEPTH) - (N_DEPTH - 1) / 2.0) * FINE_MM
    if attenuate:
        mu = materials.mu_per_mm()
        mu[depth > radius_mm] = 0.0
        towards_detector = np.cumsum(mu[::-1], axis=0)[::-1]
        source *= np.exp(-FINE_MM * (towards_detector - mu / 2.0))
    fine = np.zeros((N_FINE, N_FINE))   # [lateral, axial]
    for k in np.nonzero(source.any(axis=(1, 2)))[0]:
        sigma = cdr_sigma_mm(radius_mm - depth[k]) / FINE_MM
        fine[:, rows[0]:rows[1]] += gaussian_filter(source[k], sigma, mode="constant",
                                                    truncate=GAUSS_TRUNCATE)
    return fine.reshape(N_PIX, 2, N_PIX, 2).sum(axis=(1, 3)).T


def window_widths_kev() -> np.ndarray:
    """Widths (keV) of the windows, in DICOM order."""
    return np.array([hi - lo for _, lo, hi in WINDOWS])


def window_expectations(primary: np.ndarray, scatter_fraction: float) -> np.ndarray:
    """Expected counts [window, ...] in the three windows (DICOM order) given the expected
    primary photopeak counts (last two axes: row, column) and the photopeak scatter fraction."""
    w = window_widths_kev()
    sigma_peak = (0,) * (primary.ndim - 2) + (PEAK_SCATTER_SIGMA_MM / PIXEL_MM,) * 2
    sigma_side = (0,) * (primary.ndim - 2) + (SIDE_SCATTER_SIGMA_MM / PIXEL_MM,) * 2
    peak_scatter = scatter_fraction * gaussian_filter(primary, sigma_peak, mode="constant",
                                                      truncate=GAUSS_TRUNCATE)
    side_scatter = scatter_fraction * gaussian_filter(primary, sigma_side, mode="constant",
                                                      truncate=GAUSS_TRUNCATE)
    out = np.empty((3,) + primary.shape)
    out[PEAK] = primary + peak_scatter
    out[LOW] = 2.0 * w[LOW] / w[PEAK] * LOW_SHARE * side_scatter
    out[UP] = 2.0 * w[UP] / w[PEAK] * UP_SHARE * side_scatter + UPPER_PRIMARY_FRACTION * primary
    return out


def tew_scatter(counts: np.ndarray) -> np.ndarray:
    """Triple-energy-window scatter estimate in the photopeak from counts [window, ...]."""
    w = window_widths_kev()
    return (counts[LOW] / w[LOW] + counts[UP] / w[UP]) * w[PEAK] / 2.0


@dataclass
class Tomo:
    """Simulated SPECT acquisition: angles / radii [head, view]; expected primary photopeak
    counts [head, view, row, col]; expected and Poisson counts [window, head, view, row, col]."""

    angles_deg: np.ndarray
    radii_mm: np.ndarray
    counts_per_mbq: np.ndarray
    primary: np.ndarray
    expected: np.ndarray
    counts: np.ndarray


def simulate_tomo(rng: np.random.Generator) -> Tomo:
    """Project every view of both heads, add scatter and Poisson noise."""
    angles = np.stack([view_angles_deg(s) for s in HEAD_START_DEG])
    radii = np.vectorize(orbit_radius_mm)(angles)
    counts_per_mbq = np.array([SENSITIVITY_CPS_PER_MBQ * frame_time_integral_s(k * FRAME_S, FRAME_S)
                               for k in range(N_VIEWS)])
    primary = np.zeros((len(HEAD_START_DEG), N_VIEWS, N_PIX, N_PIX))
    t0 = time.time()
    for h in range(len(HEAD_START_DEG)):
        for k in range(N_VIEWS):
            primary[h, k] = project_view(angles[h, k], radii[h, k], counts_per_mbq[k])
            print(f"  head {h + 1} view {k + 1:2d}/{N_VIEWS}: theta {angles[h, k]:5.1f} deg, "
                  f"R {radii[h, k]:6.2f} mm, primary {primary[h, k].sum():9.1f} counts "
                  f"({time.time() - t0:5.1f} s)", flush=True)
    expected = window_expectations(primary, SCATTER_FRACTION)
    counts = poisson_uint16(rng, expected)
    return Tomo(angles, radii, counts_per_mbq, primary, expected, counts)


def poisson_uint16(rng: np.random.Generator, expected: np.ndarray) -> np.ndarray:
    """Poisson draws of ``expected`` as uint16 (fails if a count would overflow)."""
    counts = rng.poisson(expected)
    if counts.max() > np.iinfo(np.uint16).max:
        raise OverflowError(f"{counts.max()} counts do not fit uint16")
    return counts.astype(np.uint16)


@dataclass
class Calibration:
    """Planar point-source acquisition: activity (MBq) at acquisition start, expected and
    Poisson counts [window, head, row, col]."""

    activity_at_acq_mbq: float
    expected: np.ndarray
    counts: np.ndarray


def simulate_calibration(rng: np.random.Generator) -> Calibration:
    """A CAL_ACTIVITY_MBQ point source in air on the axis at the centre of the field of view,
    seen by both heads at CAL_RADIUS_MM: Gaussian CDR integrated over the pixels."""
    delay_s = (CAL_ACQ - CAL_RADIOPHARM_START).total_seconds()
    activity = CAL_ACTIVITY_MBQ * math.exp(-DECAY_PER_S * delay_s)
    total = activity * SENSITIVITY_CPS_PER_MBQ * frame_time_integral_s(0.0, CAL_FRAME_S)
    sigma = float(cdr_sigma_mm(CAL_RADIUS_MM))
    edges = (np.arange(N_PIX + 1) - 64.0) * PIXEL_MM   # source at the centre of the detector
    profile = np.diff(erf(edges / (math.sqrt(2.0) * sigma))) / 2.0
    primary = total * np.outer(profile, profile)
    expected = window_expectations(np.stack([primary, primary]), CAL_SCATTER_FRACTION)
    return Calibration(activity, expected, poisson_uint16(rng, expected))


# =============================================================================================
# Truth volumes and CT
# =============================================================================================

def truth_grid() -> Grid:
    """Axis-aligned FINE_MM grid covering the phantom (LPS axes, index order x, y, z)."""
    shape = TRUTH_SHAPE_XYZ
    origin = np.array([c - (n - 1) / 2.0 * FINE_MM for c, n in zip(TRUTH_CENTRE_MM, shape)])
    return Grid(origin, np.eye(3), (FINE_MM, FINE_MM, FINE_MM), shape)


def write_nifti(volume_xyz: np.ndarray, grid: Grid, path: Path) -> None:
    """Write an (x, y, z)-indexed volume on an axis-aligned grid with SimpleITK (LPS aware)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume_xyz.transpose(2, 1, 0)))
    image.SetSpacing(grid.step)
    image.SetOrigin(tuple(float(v) for v in grid.origin))
    image.SetDirection(tuple(float(v) for v in np.eye(3).ravel()))
    sitk.WriteImage(image, str(path), useCompression=True)


def ct_grid() -> Grid:
    """CT voxels: 256 x 256 pixels of CT_PIXEL_MM centred on the axis, slices CT_Z_MM thick
    CT_SLICE_MM (index order x, y, z)."""
    origin = np.array([-(CT_N - 1) / 2.0 * CT_PIXEL_MM, -(CT_N - 1) / 2.0 * CT_PIXEL_MM, CT_Z_MM[0]])
    return Grid(origin, np.eye(3), (CT_PIXEL_MM, CT_PIXEL_MM, CT_SLICE_MM), (CT_N, CT_N, len(CT_Z_MM)))


# =============================================================================================
# DICOM
# =============================================================================================

def ds_str(value: float, decimals: int = 4) -> str:
    """A DS string of ``value`` rounded to ``decimals`` (trailing zeros removed)."""
    text = f"{value:.{decimals}f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    """A code sequence item."""
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def new_dataset(sop_class: str, sop_instance: str, transfer_syntax: str = ExplicitVRLittleEndian) -> Dataset:
    """An empty dataset with its file meta information and SOP Common identifiers."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    return ds


@dataclass(frozen=True)
class Subject:
    """Patient/study identity shared by the series of one study."""

    name: str
    patient_id: str
    study_uid: str
    frame_of_reference_uid: str
    study_time: datetime
    study_id: str


PHANTOM_SUBJECT = Subject("Phantom^IEC", "IEC-LU177", uid("study"), uid("frame-of-reference"),
                          ACQ_START, "1")
CAL_SUBJECT = Subject("Calibration^Lu177Source", "CAL-LU177", uid("calibration-study"),
                      uid("calibration-frame-of-reference"), CAL_ACQ, "2")


def add_common_modules(ds: Dataset, subject: Subject, modality: str, series_uid: str,
                       series_number: int, series_time: datetime, description: str) -> None:
    """Patient, General Study, Patient Study, General Series, Frame of Reference and General
    Equipment modules."""
    ds.PatientName = subject.name
    ds.PatientID = subject.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientWeight = "10"
    ds.StudyInstanceUID = subject.study_uid
    ds.StudyDate = subject.study_time.strftime("%Y%m%d")
    ds.StudyTime = subject.study_time.strftime("%H%M%S")
    ds.StudyID = subject.study_id
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Lu177 IEC phantom (simulated)"
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDate = series_time.strftime("%Y%m%d")
    ds.SeriesTime = series_time.strftime("%H%M%S")
    ds.SeriesDescription = description
    ds.BodyPartExamined = "ABDOMEN"
    ds.FrameOfReferenceUID = subject.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MODEL
    ds.InstitutionName = "theraflow simulation"
    ds.StationName = "SIM670"
    ds.SoftwareVersions = "simulate_lu177_iec.py"


def add_nm_modules(ds: Dataset, image_type: str, frames: np.ndarray, vectors: dict[str, list[int]],
                   acq_time: datetime, radiopharm_start: datetime, dose_mbq: float,
                   radiopharmaceutical: str) -> None:
    """General Image, Image Pixel, NM/PET Patient Orientation, Multi-frame, NM Multi-frame,
    NM Image Pixel, NM Image and NM Isotope modules. ``frames``: uint16 [frame, row, col];
    ``vectors``: frame vectors in FrameIncrementPointer order."""
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", image_type, "EMISSION"]
    ds.AcquisitionDate = ds.ContentDate = acq_time.strftime("%Y%m%d")
    ds.AcquisitionTime = ds.ContentTime = acq_time.strftime("%H%M%S")
    ds.PatientOrientation = ""
    orientation = code_item("F-10450", "SRT", "recumbent")
    orientation.PatientOrientationModifierCodeSequence = DicomSequence(
        [code_item("F-10340", "SRT", "supine")])
    ds.PatientOrientationCodeSequence = DicomSequence([orientation])
    ds.PatientGantryRelationshipCodeSequence = DicomSequence([code_item("F-10470", "SRT", "headfirst")])

    ds.NumberOfFrames = frames.shape[0]
    ds.FrameIncrementPointer = [tag_for_keyword(k) for k in vectors]
    for keyword, values in vectors.items():
        setattr(ds, keyword, values)
    ds.NumberOfEnergyWindows = len(WINDOWS)
    ds.NumberOfDetectors = len(HEAD_START_DEG)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = N_PIX, N_PIX
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [ds_str(PIXEL_MM), ds_str(PIXEL_MM)]
    ds.SliceThickness = ds_str(PIXEL_MM)
    ds.CountsAccumulated = int(frames.sum(dtype=np.int64))
    ds.AcquisitionTerminationCondition = "TIME"

    windows = []
    for name, lo, hi in WINDOWS:
        rng_item = Dataset()
        rng_item.EnergyWindowLowerLimit = ds_str(lo)
        rng_item.EnergyWindowUpperLimit = ds_str(hi)
        item = Dataset()
        item.EnergyWindowRangeSequence = DicomSequence([rng_item])
        item.EnergyWindowName = name
        windows.append(item)
    ds.EnergyWindowInformationSequence = DicomSequence(windows)
    pharm = Dataset()
    pharm.RadionuclideCodeSequence = DicomSequence([code_item("C-145A8", "SRT", "^177^Lutetium")])
    pharm.Radiopharmaceutical = radiopharmaceutical
    pharm.RadiopharmaceuticalStartTime = radiopharm_start.strftime("%H%M%S")
    pharm.RadiopharmaceuticalStartDateTime = radiopharm_start.strftime("%Y%m%d%H%M%S")
    pharm.RadionuclideTotalDose = ds_str(dose_mbq, 3)
    pharm.RadionuclideHalfLife = ds_str(HALF_LIFE_S, 1)
    ds.RadiopharmaceuticalInformationSequence = DicomSequence([pharm])
    ds.PixelData = np.ascontiguousarray(frames, dtype="<u2").tobytes()


def detector_items(start_angles: Sequence[float], radii: Sequence[Sequence[float]]) -> DicomSequence:
    """DetectorInformationSequence items (GE style: first pixel relative to the axis at x=y=0)."""
    items = []
    for start, radial in zip(start_angles, radii):
        item = Dataset()
        item.CollimatorGridName = "MEGP"
        item.CollimatorType = "PARA"
        item.FocalDistance = 0
        item.ZoomFactor = ["1", "1"]
        item.StartAngle = ds_str(start)
        item.RadialPosition = [ds_str(r, 2) for r in radial]
        item.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
        item.ImagePositionPatient = [ds_str(-63.5 * PIXEL_MM), ds_str(-63.5 * PIXEL_MM), ds_str(Z_TOP_MM)]
        items.append(item)
    return DicomSequence(items)


def save(ds: Dataset, path: Path) -> None:
    """Write ``ds`` as a DICOM Part 10 file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write_projections(tomo: Tomo, path: Path) -> None:
    """The SPECT projections as one GE-style multi-frame NM TOMO file; frames ordered energy
    window, then detector, then view."""
    ds = new_dataset(NM_STORAGE, uid("nm-projections"))
    add_common_modules(ds, PHANTOM_SUBJECT, "NM", uid("nm-series"), 1, ACQ_START, "Lu177 IEC SPECT")
    n_win, n_det, n_view = tomo.counts.shape[:3]
    win, det, view = np.meshgrid(np.arange(n_win), np.arange(n_det), np.arange(n_view), indexing="ij")
    vectors = {"EnergyWindowVector": (win.ravel() + 1).tolist(),
               "DetectorVector": (det.ravel() + 1).tolist(),
               "RotationVector": [1] * win.size,
               "AngularViewVector": (view.ravel() + 1).tolist()}
    dose = total_activity_mbq() * math.exp(DECAY_PER_S * (ACQ_START - RADIOPHARM_START).total_seconds())
    add_nm_modules(ds, "TOMO", tomo.counts.reshape(-1, N_PIX, N_PIX), vectors, ACQ_START,
                   RADIOPHARM_START, dose, "Lu-177 (phantom)")
    ds.NumberOfRotations = 1
    ds.DetectorInformationSequence = detector_items(HEAD_START_DEG, tomo.radii_mm)
    rotation = Dataset()
    rotation.StartAngle = ds_str(HEAD_START_DEG[0])
    rotation.AngularStep = ds_str(STEP_DEG)
    rotation.RotationDirection = "CC"
    rotation.ScanArc = ds_str(STEP_DEG * N_VIEWS)
    rotation.ActualFrameDuration = int(FRAME_S * 1000)
    rotation.RadialPosition = [ds_str(r, 2) for r in tomo.radii_mm[0]]
    rotation.NumberOfFramesInRotation = N_VIEWS
    rotation.TableTraverse = "0"
    rotation.TableHeight = "150"
    ds.RotationInformationSequence = DicomSequence([rotation])
    ds.TypeOfDetectorMotion = "STEP AND SHOOT"
    save(ds, path)


def write_calibration(cal: Calibration, path: Path) -> None:
    """The planar point-source acquisition as an NM STATIC file; frames ordered energy window,
    then detector."""
    ds = new_dataset(NM_STORAGE, uid("calibration-image"))
    add_common_modules(ds, CAL_SUBJECT, "NM", uid("calibration-series"), 1, CAL_ACQ,
                       "Lu177 planar sensitivity")
    n_win, n_det = cal.counts.shape[:2]
    win, det = np.meshgrid(np.arange(n_win), np.arange(n_det), indexing="ij")
    vectors = {"EnergyWindowVector": (win.ravel() + 1).tolist(),
               "DetectorVector": (det.ravel() + 1).tolist()}
    add_nm_modules(ds, "STATIC", cal.counts.reshape(-1, N_PIX, N_PIX), vectors, CAL_ACQ,
                   CAL_RADIOPHARM_START, CAL_ACTIVITY_MBQ, "Lu-177 (calibration source)")
    ds.ActualFrameDuration = int(CAL_FRAME_S * 1000)
    ds.DetectorInformationSequence = detector_items(HEAD_START_DEG, [[CAL_RADIUS_MM]] * len(HEAD_START_DEG))
    save(ds, path)


def write_ct(folder: Path) -> None:
    """The CT series (RLE lossless), instance 1 = most superior slice."""
    grid = ct_grid()
    hu = np.round(material_fractions(grid).hounsfield())
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("CT*.dcm"):
        old.unlink()
    series_uid = uid("ct-series")
    for number, k in enumerate(np.argsort(-CT_Z_MM), start=1):
        z = float(CT_Z_MM[k])
        ds = new_dataset(CT_STORAGE, uid(f"ct-image-{k}"))
        add_common_modules(ds, PHANTOM_SUBJECT, "CT", series_uid, 2, CT_TIME, "Lu177 IEC CTAC")
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientPosition = "HFS"
        ds.InstanceNumber = number
        ds.AcquisitionNumber = 1
        ds.AcquisitionDate = ds.ContentDate = CT_TIME.strftime("%Y%m%d")
        ds.AcquisitionTime = ds.ContentTime = CT_TIME.strftime("%H%M%S")
        ds.KVP = "120"
        ds.XRayTubeCurrent = 80
        ds.ConvolutionKernel = "STANDARD"
        ds.PixelSpacing = [ds_str(CT_PIXEL_MM, 6), ds_str(CT_PIXEL_MM, 6)]
        ds.SliceThickness = ds_str(CT_SLICE_MM)
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.ImagePositionPatient = [ds_str(grid.origin[0], 6), ds_str(grid.origin[1], 6), ds_str(z)]
        ds.SliceLocation = ds_str(z)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = CT_N, CT_N
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = ds_str(CT_INTERCEPT)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        stored = (hu[:, :, k].T - CT_INTERCEPT).astype(np.uint16)   # rows along y, columns along x
        ds.compress(RLELossless, stored, generate_instance_uid=False)
        save(ds, folder / f"CT{number:04d}.dcm")


# =============================================================================================
# Truth description and README
# =============================================================================================

def phantom_description(tomo: Tomo, cal: Calibration) -> dict:
    """Everything a test needs to know about the simulated truth (JSON-serialisable)."""
    vols = analytic_volumes_ml()
    w = window_widths_kev()
    expected = tomo.expected
    return {
        "description": "Simulated Lu-177 SPECT/CT of a NEMA IEC body phantom (simulate_lu177_iec.py)",
        "coordinates": "DICOM patient LPS, mm (x -> patient left, y -> posterior, z -> head)",
        "reference_datetime": ACQ_START.isoformat(),
        "nuclide": {"name": "Lu-177", "half_life_s": HALF_LIFE_S, "photon_energy_keV": 208.4},
        "rotation_axis": {"point_mm": [0.0, 0.0, 0.0], "direction": [0.0, 0.0, 1.0]},
        "phantom": {
            "axis_xy_mm": list(AXIS_XY_MM),
            "z_range_mm": list(Z_RANGE_MM),
            "cross_section": ("relative to the axis: y >= 0 half disc r=147 mm; -77 <= y < 0 within "
                              "77 mm of the segment |x| <= 70 mm"),
            "posterior_radius_mm": POSTERIOR_RADIUS_MM,
            "corner_radius_mm": CORNER_RADIUS_MM,
            "half_flat_mm": HALF_FLAT_MM,
            "wall_mm": WALL_MM,
            "lung_insert": {"radius_mm": LUNG_RADIUS_MM, "axis_xy_mm": list(AXIS_XY_MM),
                            "z_range_mm": list(Z_RANGE_MM), "concentration_Bq_per_mL": 0.0},
            "table": {"y_range_mm": list(TABLE_Y_MM), "half_width_mm": TABLE_HALF_WIDTH_MM,
                      "HU": HU["table"]},
        },
        "spheres": [{"label": s.label, "diameter_mm": s.diameter_mm, "centre_mm": list(s.centre_mm),
                     "volume_mL": round(s.volume_ml, 5), "concentration_Bq_per_mL": SPHERE_BQ_ML}
                    for s in spheres()],
        "background_concentration_Bq_per_mL": BACKGROUND_BQ_ML,
        "volumes_mL": {k: round(v, 4) for k, v in vols.items()},
        "total_activity_MBq": round(total_activity_mbq(), 4),
        "attenuation_208keV_per_cm": {"water": MU_WATER * 10, "lung": round(MU_LUNG * 10, 6),
                                      "pmma": round(MU_PMMA * 10, 6), "table": round(MU_TABLE * 10, 6)},
        "ct_HU": HU,
        "camera": {
            "model": MODEL, "collimator": "MEGP", "pixel_mm": PIXEL_MM, "matrix": N_PIX,
            "hole_diameter_mm": HOLE_DIAMETER_MM, "hole_length_mm": HOLE_LENGTH_MM,
            "mu_lead_per_mm": MU_LEAD_PER_MM, "effective_hole_length_mm": round(L_EFF_MM, 4),
            "intrinsic_fwhm_mm": round(INTRINSIC_FWHM_MM, 4),
            "cdr": "sigma(d) = sqrt((D (L_eff + d) / L_eff)^2 + FWHM_int^2) / 2.3548, d from collimator face",
            "sensitivity_cps_per_MBq": SENSITIVITY_CPS_PER_MBQ,
            "sensitivity_note": "one head, primary 208 keV photons in the photopeak window, source in air",
        },
        "acquisition": {
            "start": ACQ_START.isoformat(), "frame_duration_s": FRAME_S, "views_per_head": N_VIEWS,
            "angular_step_deg": STEP_DEG, "rotation_direction": "CC",
            "head_start_angles_deg": list(HEAD_START_DEG),
            "angles_deg": tomo.angles_deg.tolist(), "radial_position_mm": tomo.radii_mm.tolist(),
            "z_first_row_mm": round(Z_TOP_MM, 4),
            "radiopharmaceutical_start": RADIOPHARM_START.isoformat(),
        },
        "windows": [{"name": n, "lower_keV": lo, "upper_keV": hi, "role": r}
                    for (n, lo, hi), r in zip(WINDOWS, ("lower scatter", "photopeak", "upper scatter"))],
        "scatter_model": {
            "photopeak": f"{SCATTER_FRACTION} * G({PEAK_SCATTER_SIGMA_MM} mm) * P",
            "lower": f"2*w_low/w_peak * {LOW_SHARE} * {SCATTER_FRACTION} * G({SIDE_SCATTER_SIGMA_MM} mm) * P",
            "upper": (f"2*w_up/w_peak * {UP_SHARE} * {SCATTER_FRACTION} * G({SIDE_SCATTER_SIGMA_MM} mm) * P"
                      f" + {UPPER_PRIMARY_FRACTION} * P"),
            "P": "expected primary photopeak projection",
        },
        "expected_counts": {
            "primary_photopeak_per_view": np.round(tomo.primary.sum(axis=(2, 3)), 2).tolist(),
            "primary_photopeak_total": round(float(tomo.primary.sum()), 1),
            "scatter_photopeak_total": round(float(expected[PEAK].sum() - tomo.primary.sum()), 1),
            "window_totals": [round(float(expected[k].sum()), 1) for k in range(3)],
            "tew_scatter_total": round(float(tew_scatter(expected).sum()), 1),
        },
        "calibration": {
            "file": "calibration/planar_source.dcm", "activity_MBq": CAL_ACTIVITY_MBQ,
            "activity_reference": CAL_RADIOPHARM_START.isoformat(), "acquisition_start": CAL_ACQ.isoformat(),
            "activity_at_acquisition_MBq": round(cal.activity_at_acq_mbq, 5),
            "frame_duration_s": CAL_FRAME_S, "radial_position_mm": CAL_RADIUS_MM,
            "source_position_mm": [0.0, 0.0, -100.0], "scatter_fraction": CAL_SCATTER_FRACTION,
            "expected_primary_per_head": round(float(cal.expected[PEAK, 0].sum()) / (1 + CAL_SCATTER_FRACTION), 1),
        },
        "truth_images": {"activity": "truth/activity.nii.gz (float32, Bq/mL at reference time)",
                         "spheres": "truth/spheres.nii.gz (uint8, 1..6 = 10..37 mm, voxels >= 50% inside)",
                         "voxel_mm": FINE_MM},
        "window_widths_keV": w.tolist(),
        "seed": SEED,
    }


def readme_text(tomo: Tomo) -> str:
    """Markdown description of the data set."""
    vols = analytic_volumes_ml()
    sph = "\n".join(f"| {s.label} | {s.diameter_mm:g} | ({s.centre_mm[0]:.2f}, {s.centre_mm[1]:.2f}, "
                    f"{s.centre_mm[2]:.1f}) | {s.volume_ml:.3f} |" for s in spheres())
    return f"""# Simulated Lu-177 SPECT/CT of a NEMA IEC body phantom

Ground truth for testing `theraflow`'s SPECT reconstruction and quantification. Generated by
`data-samples/simulate_lu177_iec.py`, which shares no code with the project (own projector,
analytic phantom), so the tests are free of the "inverse crime". Regenerate (under a minute
on two CPU cores, deterministic, seed {SEED}) with

    python data-samples/simulate_lu177_iec.py --out data-samples/lu177-iec

## Files

| path | content |
|---|---|
| `nm/projections.dcm` | NM Image Storage, multi-frame TOMO, 180 frames of 128 x 128 uint16 counts |
| `ct/CT0001.dcm` ... `CT{len(CT_Z_MM):04d}.dcm` | CT Image Storage, RLE lossless, 256 x 256 x {CT_PIXEL_MM} mm, {len(CT_Z_MM)} slices of {CT_SLICE_MM:g} mm (z = {CT_Z_MM[0]:g} ... {CT_Z_MM[-1]:g} mm; instance 1 is the most superior) |
| `calibration/planar_source.dcm` | NM Image Storage, STATIC, 100 MBq Lu-177 point source in air, 2 heads x 3 windows, 300 s |
| `truth/phantom.json` | geometry, concentrations, volumes, total activity, camera model, windows, expected counts, seed |
| `truth/activity.nii.gz` | float32 activity concentration (Bq/mL at acquisition start), {FINE_MM} mm voxels, partial-volume averaged |
| `truth/spheres.nii.gz` | uint8 sphere labels 1..6 (10 ... 37 mm), voxels at least half inside |

Units: mm (DICOM patient LPS: x to patient left, y posterior, z head), Bq/mL, MBq, s, keV.
NIfTI files were written by SimpleITK from LPS (their headers are RAS as NIfTI requires).

## Phantom (reference time {ACQ_START.isoformat()}, acquisition start)

* Interior prism along z from {Z_RANGE_MM[0]:g} to {Z_RANGE_MM[1]:g} mm about the axis (x, y) = {AXIS_XY_MM}
  mm, off the camera's axis of rotation (x = y = 0). Cross-section relative to the axis: half
  disc of radius 147 mm for y >= 0 (posterior), and for -77 <= y < 0 the points within 77 mm of
  the segment |x| <= 70 mm. Volume {vols['interior']:.2f} mL.
* 3 mm PMMA shell (sides and end caps), CT 120 HU, mu = 1.18 mu_water.
* Lung insert: cylinder r = 25.5 mm on the phantom axis, whole length, no activity, -700 HU,
  {vols['lung']:.2f} mL.
* Spheres (water, walls not modelled) at 57.2 mm from the axis in the plane z = -70 mm,
  {SPHERE_BQ_ML / 1e3:g} kBq/mL; background water {BACKGROUND_BQ_ML / 1e3:g} kBq/mL
  ({vols['background']:.2f} mL):

| label | diameter (mm) | centre (mm, LPS) | volume (mL) |
|---|---|---|---|
{sph}

* Total activity {total_activity_mbq():.3f} MBq at acquisition start (analytic volumes);
  RadionuclideTotalDose in the NM header is this activity decay-corrected back to
  RadiopharmaceuticalStartDateTime ({RADIOPHARM_START.isoformat()}).
* Patient table: 10 mm slab, 200 HU (mu = 1.2 mu_water), y = {TABLE_Y_MM[0]:g} ... {TABLE_Y_MM[1]:g} mm,
  |x| < {TABLE_HALF_WIDTH_MM:g} mm, along the whole CT; it attenuates the emission data too.
* Attenuation at 208 keV (1/cm): water {MU_WATER * 10:.4f}, lung {MU_LUNG * 10:.4f}, PMMA
  {MU_PMMA * 10:.4f}, table {MU_TABLE * 10:.4f}, air 0.

## Camera and acquisition (GE Discovery 670, MEGP, 2 heads)

* 128 x 128 pixels of {PIXEL_MM} mm; 30 views per head, 6 degree steps, "CC", head 1 starts at
  180 degrees, head 2 at 0 degrees (60 angles over 360 degrees), 25 s per view, step and shoot,
  both heads simultaneous, views back to back from {ACQ_START.isoformat()}.
* Geometry: at angle theta the detector lies along n = (sin t, cos t, 0) from the axis, columns
  grow along u = (-cos t, sin t, 0), rows along -z. Pixel (i, j) is centred at lateral
  (j - 63.5) x {PIXEL_MM} mm along u and z = {Z_TOP_MM:.4f} - i x {PIXEL_MM} mm. DICOM
  ImagePositionPatient of each detector is (-63.5 x {PIXEL_MM}, -63.5 x {PIXEL_MM}, {Z_TOP_MM:.4f}) (GE:
  first pixel relative to the axis of rotation at the origin), ImageOrientationPatient
  (1, 0, 0, 0, 0, -1).
* Body-contour orbit: radius (axis to collimator face) = support function of the outer wall
  along n + 30 mm, {tomo.radii_mm.min():.2f} ... {tomo.radii_mm.max():.2f} mm, stored per view in
  RadialPosition of each DetectorInformationSequence item.
* Frames ordered by FrameIncrementPointer (EnergyWindowVector, DetectorVector, RotationVector,
  AngularViewVector): energy window outermost, then detector, then view. Windows in file order:
  1 `Lu177_SC1` 166.4-187.2 keV, 2 `Lu177_EM` 187.2-228.8 keV (photopeak), 3 `Lu177_SC2`
  228.8-249.6 keV.

## Forward model

Per view, on a {FINE_MM} mm grid aligned with the detector (depth, lateral, axial), the
analytic phantom gives exact volume fractions (prisms: exact axial overlap x 8 x 8 in-plane
sub-samples; spheres: 6 x 6 x 6 sub-samples). Activity per voxel (MBq) is attenuated by
exp(-integral mu ds) from the voxel centre to the collimator face (half-voxel midpoint rule),
blurred per depth plane by a 2-D Gaussian with sigma(d) = sqrt((D (L_eff + d)/L_eff)^2 +
FWHM_int^2) / 2.3548 (d: distance to the collimator face, D = 3.0 mm, L_eff = 58 - 2/1.26 mm =
{L_EFF_MM:.3f} mm, FWHM_int = 3.6 mm x sqrt(140/208) = {INTRINSIC_FWHM_MM:.3f} mm), summed over
depth and binned 2 x 2 into detector pixels. Expected primary counts = A[MBq] x S x
integral over the frame of exp(-lambda t) dt x attenuation x blur, S = {SENSITIVITY_CPS_PER_MBQ} cps/MBq (one head,
primary photons in the photopeak window, source in air), T1/2 = {HALF_LIFE_S:g} s.

Scatter, with P the expected primary projection and G_s a 2-D Gaussian blur of sigma s mm:

* photopeak: P + {SCATTER_FRACTION} G_{PEAK_SCATTER_SIGMA_MM:g}(P)
* lower window: 2 w_low/w_peak x {LOW_SHARE} x {SCATTER_FRACTION} G_{SIDE_SCATTER_SIGMA_MM:g}(P)
* upper window: 2 w_up/w_peak x {UP_SHARE} x {SCATTER_FRACTION} G_{SIDE_SCATTER_SIGMA_MM:g}(P) + {UPPER_PRIMARY_FRACTION} P (249.7 keV line)

so the TEW estimate (C_low/w_low + C_up/w_up) w_peak/2 = {SCATTER_FRACTION} G_{SIDE_SCATTER_SIGMA_MM:g}(P) + {UPPER_PRIMARY_FRACTION} P is
close to, but not exactly, the true photopeak scatter. Counts are Poisson draws
(numpy PCG64, seed {SEED}; projections drawn first, then the calibration), uint16.

## Calibration file

100 MBq at {CAL_RADIOPHARM_START.isoformat()} (RadiopharmaceuticalStartDateTime), acquired from
{CAL_ACQ.isoformat()} for 300 s (ActualFrameDuration) by both heads at {CAL_RADIUS_MM:g} mm from the
source, which sits on the axis at the centre of the field of view (x, y, z) = (0, 0, -100) mm.
Expected primary counts per head = A(t) x S integrated over the frame with decay; the same
window model with a scatter fraction of {CAL_SCATTER_FRACTION} (in air). So the sensitivity
from the primary counts is {SENSITIVITY_CPS_PER_MBQ} cps/MBq; from all photopeak counts
{SENSITIVITY_CPS_PER_MBQ * (1 + CAL_SCATTER_FRACTION):.3f}; after TEW subtraction about
{SENSITIVITY_CPS_PER_MBQ * (1 - UPPER_PRIMARY_FRACTION):.3f} (the same 2 % upper-window term biases the TEW estimate of the phantom scatter, so
TEW-calibrated quantification is consistent).

`sensitivity.json` (beside this README, not written by the simulator) is the registry entry that
`theraflow calibrate spect` derives from this file, marked `"origin": "simulated"` with
`"simulator": "simulate_lu177_iec.py"` (the projections' Software Versions): it applies to these
projections only, never to a real camera of the same model. Pass it with `--registry`.

## Simplifications

Spheres' and the lung insert's walls are not modelled; scatter is a convolution model; no
collimator penetration tails, dead time or energy-dependent effects; the orbit follows the
phantom only (the table is ignored for clearance, attenuation is integrated only up to the
collimator face).
"""


# =============================================================================================
# Self-checks
# =============================================================================================

def self_checks(tomo: Tomo, cal: Calibration, activity: np.ndarray, grid: Grid) -> None:
    """Print the numbers that show the data set is what it claims to be."""
    print("\nSelf-checks")
    peak_counts = tomo.counts[PEAK].sum(axis=(2, 3)).astype(float)
    peak_expected = tomo.expected[PEAK].sum(axis=(2, 3))
    z = (peak_counts - peak_expected) / np.sqrt(peak_expected)
    print(f"  photopeak counts per view: expected {peak_expected.min():.0f} ... {peak_expected.max():.0f}, "
          f"measured {peak_counts.min():.0f} ... {peak_counts.max():.0f}; (measured - expected)/sqrt: "
          f"mean {z.mean():+.2f}, sd {z.std():.2f} over {z.size} views")
    print(f"  total: primary {tomo.primary.sum():.0f}, photopeak expected {tomo.expected[PEAK].sum():.0f}, "
          f"measured {tomo.counts[PEAK].sum(dtype=np.int64)}; true scatter / TEW estimate = "
          f"{(tomo.expected[PEAK] - tomo.primary).sum() / tew_scatter(tomo.expected).sum():.3f}")

    no_att = project_view(tomo.angles_deg[0, 0], tomo.radii_mm[0, 0], tomo.counts_per_mbq[0], attenuate=False)
    ideal = total_activity_mbq() * tomo.counts_per_mbq[0]
    print(f"  normalisation (view 1, no attenuation): {no_att.sum():.1f} counts vs A S T = {ideal:.1f} "
          f"({100 * (no_att.sum() / ideal - 1):+.3f} %); attenuated view 1 / unattenuated = "
          f"{tomo.primary[0, 0].sum() / no_att.sum():.3f}")

    voxel_sum = float(activity.sum(dtype=np.float64)) * grid.voxel_ml * 1e-6
    print(f"  activity: analytic {total_activity_mbq():.4f} MBq, truth voxel sum {voxel_sum:.4f} MBq "
          f"({100 * (voxel_sum / total_activity_mbq() - 1):+.3f} %)")

    big = spheres()[-1]
    only_big = (0.0,) * 5 + (SPHERE_BQ_ML,)
    for h, k in ((0, 0), (1, 0), (0, 7), (1, 12)):
        theta = tomo.angles_deg[h, k]
        image = project_view(theta, tomo.radii_mm[h, k], tomo.counts_per_mbq[k], 0.0, only_big)
        row, col = np.unravel_index(np.argmax(image), image.shape)
        ii, jj = np.indices(image.shape)
        centroid = np.array([(ii * image).sum(), (jj * image).sum()]) / image.sum()
        pred = np.array(pixel_of(big.centre_mm, theta))
        ok = np.all(np.abs(np.array([row, col]) - pred) <= 0.5 + 0.1) and np.all(np.abs(centroid - pred) < 0.2)
        print(f"  geometry head {h + 1} view {k + 1} (theta {theta:5.1f}): 37 mm sphere alone, brightest "
              f"pixel (row {row}, col {col}), centroid ({centroid[0]:.2f}, {centroid[1]:.2f}); predicted "
              f"centre ({pred[0]:.2f}, {pred[1]:.2f}) -> {'PASS' if ok else 'FAIL'}")

    cal_primary = cal.expected[PEAK].sum(axis=(1, 2)) / (1 + CAL_SCATTER_FRACTION)
    print(f"  calibration: expected primary/head {cal_primary[0]:.0f}, photopeak counts per head "
          f"{cal.counts[PEAK].sum(axis=(1, 2)).tolist()}, max pixel {cal.counts.max()}")


# =============================================================================================
# Main
# =============================================================================================

def main() -> None:
    """Simulate everything and write it under --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "lu177-iec",
                        help="output folder (default: data-samples/lu177-iec next to this script)")
    out = parser.parse_args().out
    rng = np.random.Generator(np.random.PCG64(SEED))

    print(f"Phantom total activity {total_activity_mbq():.3f} MBq at {ACQ_START.isoformat()}")
    print("Projecting SPECT views ...")
    tomo = simulate_tomo(rng)
    cal = simulate_calibration(rng)
    write_projections(tomo, out / "nm" / "projections.dcm")
    write_calibration(cal, out / "calibration" / "planar_source.dcm")
    print("Writing CT ...")
    write_ct(out / "ct")
    print("Writing truth ...")
    grid = truth_grid()
    activity = concentration_bq_ml(grid, material_fractions(grid), BACKGROUND_BQ_ML,
                                   (SPHERE_BQ_ML,) * 6).astype(np.float32)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    write_nifti(activity, grid, out / "truth" / "activity.nii.gz")
    write_nifti(sphere_labels(grid), grid, out / "truth" / "spheres.nii.gz")
    (out / "truth" / "phantom.json").write_text(json.dumps(phantom_description(tomo, cal), indent=2) + "\n")
    (out / "README.md").write_text(readme_text(tomo))
    self_checks(tomo, cal, activity, grid)
    print(f"Done: {out}")


if __name__ == "__main__":
    main()

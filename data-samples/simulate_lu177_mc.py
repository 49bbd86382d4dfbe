#!/usr/bin/env python3
"""Monte Carlo simulator of a Lu-177 SPECT/CT acquisition that shares no model with theraflow.

It imports nothing from ``recon``, ``quant``, ``flows``, PyTomography or the other sample's
simulator (``simulate_lu177_iec.py``); numpy and scipy do the physics, pydicom writes the files.
Where theraflow models the collimator as a depth-dependent Gaussian and the scatter by the
triple-energy-window (TEW) estimate, this program transports photons:

* emission: Lu-177 photons of 112.9, 208.4, 249.7 and 321.3 keV with their yields (``LINES``);
  112.9 keV photons are emitted but cannot reach any window (>= 166.4 keV: Compton scattering only
  lowers the energy and the window starts 53 keV, more than 8 sigma of the energy resolution, above
  the line), so they are ended at emission (the truth file lists their share as 0);
* transport in the object: water cylinder with a cortical-bone rod (ICRU-44 composition and
  density) and four hot water spheres; free paths by delta (Woodcock) tracking, interactions split
  by implicit capture into Compton scattering (Klein-Nishina, free electrons: electron densities
  from ``Z_OVER_A``) and absorption (the rest of the tabulated total attenuation: photoelectric,
  and coherent scattering treated as removal, about 1 % of the total at 208 keV), any number of
  scatter orders until the photon leaves the object, falls below ``E_CUT_KEV`` or reaches
  ``MAX_ORDER``;
* variance reduction: convolution-based forced detection (as in SIMIND, Ljungberg & Strand 1989,
  and de Jong et al. 2001): at emission (isotropic) and at every Compton interaction the photon's
  weight times the probability per steradian of leaving towards each view's detector (Klein-Nishina
  for scattering), times its attenuation along that path at its energy after scattering, times the
  crystal's absorption at that energy, is binned at its projection with its distance to the
  collimator; each distance and energy bin is then convolved with the collimator-detector response;
* collimator: hexagonal holes (3.0 mm across flats, 1.05 mm lead septa, 58 mm long, a
  MEGP-like design), transmission through the hole lattice computed by ray tracing for every
  direction (geometric response and septal penetration, lead attenuation at the photon's
  energy; ``collimator_transmission``) out to the tangent where it becomes negligible (the
  transmission over a ring of directions below 1e-4 of the on-axis one), 10 mm from the
  collimator's back to the mean depth of interaction in the crystal; intrinsic resolution 3.6 mm FWHM at 140 keV scaled by sqrt(140/E);
* energy resolution: Gaussian, FWHM 9.5 % at 208.4 keV scaling with sqrt(E); the counts in each
  window are the Gaussian's mass inside it (no window is defined from another);
* Poisson noise (numpy PCG64, seed ``SEED``).

A separate planar acquisition of a 100 MBq point source in air, with the same camera physics,
is the sample's calibration (``calibration/point_source.dcm``); ``theraflow calibrate spect``
derives the sample's registry entry from it (see data-samples/lu177-mc/README.md).

Units: mm, keV, s, MBq, Bq/mL; coordinates DICOM patient LPS (x patient left, y posterior, z head),
camera axis of rotation x = y = 0. Attenuation in 1/mm inside the code.

Run: ``nice python data-samples/simulate_lu177_mc.py --out data-samples/lu177-mc`` (about one
minute of CPU on one core; 3 to 9 minutes of wall time under ``nice`` on a loaded 2-core machine).

``--nuclide Ac-225`` (or another nuclide) simulates the same phantom and camera with that
nuclide's photon lines, windows and activity (``use_nuclide``): the lines are the one thing taken
from theraflow (``recon.nuclides``, ICRP-107 data, not a model); without it the output is the
Lu-177 sample, unchanged. ``nice python data-samples/simulate_lu177_mc.py --nuclide Ac-225 --out
data-samples/ac225-mc`` makes the Ac-225 sample (see its README); ``--nuclide I-131 --collimator
HEGP``, ``--nuclide In-111`` and ``--nuclide Pb-212`` the i131-mc, in111-mc and pb212-mc samples.
``--collimator HEGP`` replaces the MEGP-like hole geometry by a high-energy one (``COLLIMATORS``).

``--camera starguide`` replaces the dual-head NaI camera by a CZT ring like GE's StarGuide
(``use_starguide``, ``starguide_frames``): 12 columns of 16 x 128 pixels of 2.46 mm, each frame
with its own angle, radius, sideways offset and duration; 7.25 mm CZT with 6 % FWHM at 140 keV and
a low-energy tail; narrow windows; the same phantom, transport and collimator. Its files are
written as the StarGuide writes them: one multi-frame NM TOMO file per column, the per-frame
geometry and durations in the StarGuide's private attributes (``write_starguide``). ``nice python
data-samples/simulate_lu177_mc.py --camera starguide --nuclide Ac-225 --out data-samples/ac225-czt-mc``
(and Ra-223, ra223-czt-mc). Without it the output is unchanged.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)
from scipy import fft
from scipy.ndimage import map_coordinates
from scipy.special import ndtr

SEED = 20261207
PROGRAM = "simulate_lu177_mc.py"

# --- physical data ---------------------------------------------------------------------------
# Mass attenuation coefficients (cm^2/g, total with coherent scattering) typed from the NIST XCOM /
# NIST Standard Reference Database 126 tables (Hubbell & Seltzer, "Tables of X-Ray Mass Attenuation
# Coefficients", water liquid, bone cortical ICRU-44, lead Z=82, sodium iodide). Water, bone and
# lead are the tabulated values as recalled to 3-4 digits; the NaI row is approximate (within
# about 5 %) and only sets the crystal's absorption, which the calibration measures with the
# same camera. Interpolated log-log in energy.
MU_RHO = {  # material: (energies keV, mass attenuation cm^2/g)
    "water": ((60, 80, 100, 150, 200, 300, 400, 500, 600),
              (0.2059, 0.1837, 0.1707, 0.1505, 0.1370, 0.1186, 0.1061, 0.09687, 0.08956)),
    "bone": ((60, 80, 100, 150, 200, 300, 400, 500, 600),
             (0.3148, 0.2229, 0.1855, 0.1480, 0.1309, 0.1113, 0.09908, 0.09050, 0.08371)),
    "lead": ((100, 150, 200, 300, 400, 500, 600), (5.549, 2.014, 0.9985, 0.4031, 0.2323, 0.1614, 0.1248)),
    "NaI": ((100, 150, 200, 300, 400, 500, 600), (1.65, 0.60, 0.335, 0.172, 0.120, 0.0962, 0.0828)),
    "CZT": ((100, 150, 200, 300, 400, 500, 600), (1.57, 0.57, 0.318, 0.163, 0.114, 0.0914, 0.0787)),
}
# CZT (Cd0.9Zn0.1Te, --camera starguide only): the NaI row x 0.95 (Z_eff 49 against 51), as
# approximate as that row; it only sets the detector's absorption, which the calibration measures.
# The 500 and 600 keV points (used only by --nuclide other than Lu-177, whose energies stay
# below 400 keV, so the Lu-177 sample is unchanged) are recalled like the rest, not re-read.
DENSITY = {"water": 1.0, "bone": 1.92, "lead": 11.35, "NaI": 3.667, "CZT": 5.78}     # g/cm^3
Z_OVER_A = {"water": 0.55508, "bone": 0.51478}                           # ICRU-44 <Z/A>
AVOGADRO = 6.02214076e23
ELECTRON_RADIUS_CM = 2.8179403e-13
ELECTRON_KEV = 510.99895
CT_EFFECTIVE_KEV = 70.0          # CT numbers from the tables at this effective energy (120 kVp)

# Lu-177 photon lines (keV, photons per decay; ENSDF / NNDC NuDat, Lu-177 beta- decay)
LINES = ((112.95, 0.0623), (208.37, 0.1041), (249.67, 0.0020), (321.32, 0.0022))
HALF_LIFE_S = 574300.0
DECAY_PER_S = math.log(2.0) / HALF_LIFE_S
E_CUT_KEV = 140.0                # photons below cannot reach the lower window (166.4 keV)
MAX_ORDER = 8
NUCLIDE = "Lu-177"
SAMPLE = "lu177-mc"              # UIDs derive from it
TAG = "Lu177"                    # in series and study descriptions
NUCLIDE_CODE = ("C-145A8", "^177^Lutetium")
LINES_SOURCE = "ENSDF via NNDC NuDat"

# --- camera (own model name; MEGP-like collimator) ------------------------------------------
MANUFACTURER = "theraflow simulation"
MODEL = "TF-MC-DualHead-ME"
COLLIMATOR = "MEGP"
N_PIX = 128
PIXEL_MM = 4.42
Z_TOP_MM = 63.5 * PIXEL_MM       # detector row 0; the phantom is centred axially on z = 0
HOLE_MM = 3.0                    # hexagonal holes, across flats
SEPTA_MM = 1.05
HOLE_LENGTH_MM = 58.0
BACK_GAP_MM = 10.0               # collimator back -> mean depth of interaction in the crystal
CRYSTAL_MM = 9.525               # 3/8 inch NaI(Tl)
CRYSTAL = "NaI"
INTRINSIC_FWHM_140_MM = 3.6
ENERGY_FWHM_208 = 0.095          # relative FWHM at 208.37 keV, scaling with sqrt(E)
TAIL_FRACTION = 0.0              # NaI: no low-energy tail (CZT: see use_starguide)
TAIL_RANGE = (0.70, 0.95)        # tail events recorded at these fractions of the absorbed energy
WINDOWS = (("Lu177_SC1", 166.4, 187.2), ("Lu177_EM", 187.2, 228.8), ("Lu177_SC2", 228.8, 249.6))
PHOTOPEAK = 1
TEW = ((1, 0, 2),)               # (photopeak, lower, upper scatter window) indices in WINDOWS
HEAD_START_DEG = (180.0, 0.0)
N_VIEWS = 45                     # per head
STEP_DEG = 4.0                   # "CC": theta = start + k * step
FRAME_S = 25.0
ORBIT_MM = 200.0                 # circular orbit, axis -> collimator face

# --- phantom ---------------------------------------------------------------------------------
CYL_XY_MM = (10.0, 15.0)         # water cylinder axis, off the axis of rotation
CYL_RADIUS_MM = 100.0
Z_RANGE_MM = (-90.0, 90.0)
BONE_XY_MM = (-30.0, 55.0)       # cortical-bone rod, whole length, no activity
BONE_RADIUS_MM = 20.0
BACKGROUND_BQ_ML = 50e3
SPHERE_BQ_ML = 400e3
SPHERES = (  # diameter (mm), centre (mm LPS)
    (37.0, (65.0, 15.0, 10.0)),
    (28.0, (10.0, -40.0, 10.0)),
    (22.0, (-45.0, -5.0, 10.0)),
    (17.0, (50.0, 70.0, 10.0)),
)
GRID_MM = 2.5                    # jittered emission grid, background
SPHERE_GRID_MM = 1.25            # jittered emission grid, spheres

# --- calibration acquisition -----------------------------------------------------------------
ACQ_START = datetime(2026, 12, 1, 10, 0, 0)
RADIOPHARM_START = ACQ_START - timedelta(hours=3)
CT_TIME = ACQ_START + timedelta(minutes=42)
CAL_ACQ = datetime(2026, 12, 1, 8, 0, 0)
CAL_REFERENCE = CAL_ACQ - timedelta(minutes=30)
CAL_ACTIVITY_MBQ = 100.0         # at CAL_REFERENCE
CAL_FRAME_S = 300.0
CAL_DISTANCE_MM = 100.0          # point source on the axis, both heads at this distance

# --- CT ----------------------------------------------------------------------------------------
CT_N = 256
CT_PIXEL_MM = 2.0
CT_SLICE_MM = 5.0
CT_Z_MM = np.arange(-120.0, 120.0 + 1e-6, CT_SLICE_MM)
NM_STORAGE = "1.2.840.10008.5.1.4.1.1.20"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


# =============================================================================================
# Cross sections
# =============================================================================================

def mu_per_mm(material: str, energy_kev: np.ndarray | float) -> np.ndarray:
    """Linear attenuation coefficient (1/mm, total) of ``material`` at ``energy_kev``."""
    energies, values = MU_RHO[material]
    logs = np.interp(np.log(energy_kev), np.log(energies), np.log(values))
    return np.exp(logs) * DENSITY[material] / 10.0


def klein_nishina_cm2(energy_kev: np.ndarray | float) -> np.ndarray:
    """Total Klein-Nishina cross section per free electron (cm^2)."""
    k = np.asarray(energy_kev, dtype=np.float64) / ELECTRON_KEV
    a = 1.0 + 2.0 * k
    return 2.0 * math.pi * ELECTRON_RADIUS_CM**2 * (
        (1.0 + k) / k**2 * (2.0 * (1.0 + k) / a - np.log(a) / k) + np.log(a) / (2.0 * k) - (1.0 + 3.0 * k) / a**2)


def compton_mu_per_mm(material: str, energy_kev: np.ndarray | float) -> np.ndarray:
    """Compton part of the attenuation (1/mm): electron density x Klein-Nishina."""
    electrons_per_cm3 = DENSITY[material] * Z_OVER_A[material] * AVOGADRO
    return electrons_per_cm3 * klein_nishina_cm2(energy_kev) / 10.0


def scattered_energy(energy_kev: np.ndarray, cos_theta: np.ndarray) -> np.ndarray:
    return energy_kev / (1.0 + energy_kev / ELECTRON_KEV * (1.0 - cos_theta))


def sample_kn_cos(rng: np.random.Generator, energy_kev: np.ndarray) -> np.ndarray:
    """cos(theta) drawn from Klein-Nishina by rejection (envelope: uniform cos, bound 2)."""
    out = np.empty_like(energy_kev)
    todo = np.arange(energy_kev.size)
    while todo.size:
        cos = rng.uniform(-1.0, 1.0, todo.size)
        k = energy_kev[todo] / ELECTRON_KEV
        ratio = 1.0 / (1.0 + k * (1.0 - cos))
        keep = rng.uniform(0.0, 2.0, todo.size) < ratio**2 * (ratio + 1.0 / ratio - (1.0 - cos**2))
        out[todo[keep]] = cos[keep]
        todo = todo[~keep]
    return out


def rotate_direction(rng: np.random.Generator, direction: np.ndarray, cos_theta: np.ndarray) -> np.ndarray:
    """Unit vectors at polar angle theta (azimuth uniform) from ``direction`` [N, 3]."""
    phi = rng.uniform(0.0, 2.0 * math.pi, cos_theta.size)
    sin_theta = np.sqrt(np.clip(1.0 - cos_theta**2, 0.0, None))
    helper = np.where(np.abs(direction[:, :1]) < 0.9, [[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]])
    a = np.cross(direction, helper)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b = np.cross(direction, a)
    return (direction * cos_theta[:, None] + a * (sin_theta * np.cos(phi))[:, None]
            + b * (sin_theta * np.sin(phi))[:, None])


def energy_sigma_kev(energy_kev: np.ndarray | float) -> np.ndarray:
    return ENERGY_FWHM_208 * np.sqrt(208.37 * np.asarray(energy_kev)) / (2.0 * math.sqrt(2.0 * math.log(2.0)))


def window_probability(energy_kev: np.ndarray | float) -> np.ndarray:
    """[window, ...] probability that a photon of ``energy_kev`` absorbed in the crystal is
    recorded in each window (Gaussian energy resolution). With a low-energy tail (CZT,
    TAIL_FRACTION > 0), that fraction of the photons is recorded at an energy spread uniformly
    over TAIL_RANGE times ``energy_kev`` (26 points), each with the Gaussian resolution."""
    e = np.asarray(energy_kev, dtype=np.float64)
    full = window_probability_at(e)
    if TAIL_FRACTION == 0.0:
        return full
    tail = np.mean([window_probability_at(f * e) for f in np.linspace(*TAIL_RANGE, 26)], axis=0)
    return (1.0 - TAIL_FRACTION) * full + TAIL_FRACTION * tail


def window_probability_at(recorded_kev: np.ndarray) -> np.ndarray:
    """[window, ...] Gaussian mass in each window of an event recorded around ``recorded_kev``."""
    s = energy_sigma_kev(recorded_kev)
    return np.stack([ndtr((hi - recorded_kev) / s) - ndtr((lo - recorded_kev) / s) for _, lo, hi in WINDOWS])


def crystal_absorption(energy_kev: np.ndarray | float) -> np.ndarray:
    """Fraction of photons reaching the crystal that interact in it (all counted at full energy)."""
    return 1.0 - np.exp(-mu_per_mm(CRYSTAL, energy_kev) * CRYSTAL_MM)


# =============================================================================================
# Collimator
# =============================================================================================

ENERGY_GROUP_EDGES = np.array([195.0, 225.0, 275.0])   # keV; collimator response per group
ENERGY_GROUP_KEV = np.array([185.0, 208.37, 249.67, 321.32])
T_MAX = 0.3                      # direction tangents |tx|, |ty| <= T_MAX: the fine grid (every group)
T_STEP = 0.004
T_STEP_FAR = 0.02                # the coarser grid of the far tail, beyond T_MAX
TAIL_RING = 1e-4                 # a group's far tail ends at the first ring below this x on-axis
# The Lu-177 sample keeps the cut at T_MAX for every group: its only group with a far tail, 321 keV
# (photons above 275 keV), reaches no window but the upper scatter window's edge; traced, it adds
# 0.1 of that window's 40 618 expected counts, and redraws the Poisson noise of 1.8 % of the pixels
# (numpy's draws shift after the first changed one), so the sample and its tests' figures are kept.
# use_nuclide traces the far tail.
FAR_TAIL = False
DEPTH_STEPS = 24                 # lead-path samples along the hole length, up to tangent T_MAX


def energy_group(energy_kev: np.ndarray) -> np.ndarray:
    return np.searchsorted(ENERGY_GROUP_EDGES, energy_kev)


def hex_distance(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Hexagonal norm (flats perpendicular to x, 60 and 120 degrees): the half-width across flats
    of the smallest such hexagon centred at 0 that holds (x, y)."""
    c = math.sqrt(3.0) / 2.0
    return np.maximum(np.abs(x), np.maximum(np.abs(0.5 * x + c * y), np.abs(-0.5 * x + c * y)))


def lead_fraction_in_lattice(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """True where (x, y) (mm, collimator face plane) is in lead: outside the hole of its nearest
    lattice cell (holes on a triangular lattice of pitch HOLE_MM + SEPTA_MM)."""
    pitch = HOLE_MM + SEPTA_MM
    c = math.sqrt(3.0) / 2.0
    b = y / (pitch * c)                      # lattice coordinates along a1 = (p, 0), a2 = (p/2, p c)
    a = x / pitch - 0.5 * b
    a0, b0 = np.floor(a), np.floor(b)
    best = np.full(x.shape, np.inf)
    for da in (0.0, 1.0):
        for db in (0.0, 1.0):
            ca, cb = a0 + da, b0 + db
            best = np.minimum(best, hex_distance(x - pitch * (ca + 0.5 * cb), y - pitch * c * cb))
    return best > HOLE_MM / 2.0


@dataclass
class Transmission:
    """The collimator's transmission [group, iy, ix] for direction tangents (tx, ty) on two
    grids, centred: ``near`` (step T_STEP, |tx|, |ty| <= T_MAX) and ``far`` (step T_STEP_FAR,
    out to the largest ``t_max``); group g is transmitted where max(|tx|, |ty|) <= t_max[g]."""

    near: np.ndarray
    far: np.ndarray
    t_max: np.ndarray


def lattice_transmission(tx: np.ndarray, ty: np.ndarray, entry_x: np.ndarray, entry_y: np.ndarray, mu: np.ndarray,
                         steps: int) -> np.ndarray:
    """[group, direction]: exp(-mu x lead path) averaged over the entry points (mm, collimator
    face), for directions of tangents (tx[k], ty[k]); the lead path traced in ``steps`` equal
    steps along the hole length (``mu``: lead's attenuation per group, 1/mm)."""
    depth = (np.arange(steps) + 0.5) / steps * HOLE_LENGTH_MM
    x = entry_x[None, :, None] + tx[:, None, None] * depth[None, None, :]
    y = entry_y[None, :, None] + ty[:, None, None] * depth[None, None, :]
    lead = lead_fraction_in_lattice(x, y).mean(axis=2)                      # [direction, entry]
    path = lead * HOLE_LENGTH_MM * np.sqrt(1.0 + tx[:, None] ** 2 + ty[:, None] ** 2)
    return np.exp(-mu[:, None, None] * path[None]).mean(axis=2)


def mirrored(quadrant: np.ndarray) -> np.ndarray:
    """[group, 2n+1, 2n+1] from the quadrant [group, n+1, n+1] (tx, ty >= 0): the lattice is
    symmetric under x -> -x and y -> -y."""
    full = np.concatenate([quadrant[:, ::-1, :], quadrant[:, 1:, :]], axis=1)
    return np.concatenate([full[:, :, ::-1], full[:, :, 1:]], axis=2)


def far_tangent_limit() -> float:
    """Tangent beyond which no direction reaches the detector (128 pixels) from the nearest
    distance bin: the far tail never extends past it."""
    return (N_PIX - 1) * PIXEL_MM / (DIST_MM[0] + HOLE_LENGTH_MM + BACK_GAP_MM)


def collimator_transmission(rng: np.random.Generator) -> Transmission:
    """Fraction of photons arriving along direction tangents (tx, ty) that cross the collimator,
    averaged over where they enter the hole lattice: exp(-mu_lead(E) x lead path), the lead path
    traced along the hole length for 144 jittered entry points of one lattice cell (the same
    points for every direction and group), on one quadrant and mirrored.

    Near grid (|tx|, |ty| <= T_MAX, step T_STEP): DEPTH_STEPS samples along the hole. Far tail:
    square rings max(|tx|, |ty|) = k T_STEP_FAR outwards, each direction traced with enough
    samples that the lateral step along the hole stays at most T_MAX x HOLE_LENGTH_MM /
    DEPTH_STEPS; group g is transmitted out to t_max[g], the first ring at or beyond T_MAX whose
    mean transmission is below TAIL_RING x the on-axis one (at most ``far_tangent_limit``; T_MAX
    unless FAR_TAIL). For a group already below at T_MAX the cut is T_MAX, as before the far
    tail existed."""
    n = round(T_MAX / T_STEP)
    t = T_STEP * np.arange(n + 1)
    pitch = HOLE_MM + SEPTA_MM
    side = 12
    u = (np.arange(side)[:, None] + rng.uniform(size=(side, side))) / side
    v = (np.arange(side)[None, :] + rng.uniform(size=(side, side))) / side
    entry_x = (pitch * (u + 0.5 * v)).ravel()
    entry_y = (pitch * math.sqrt(3.0) / 2.0 * v).ravel()
    mu = mu_per_mm("lead", ENERGY_GROUP_KEV)
    quadrant = np.empty((mu.size, n + 1, n + 1))
    for iy, ty in enumerate(t):
        quadrant[:, iy, :] = lattice_transmission(t, np.full(n + 1, ty), entry_x, entry_y, mu, DEPTH_STEPS)
    limit = far_tangent_limit() if FAR_TAIL else T_MAX
    rings, t_max, k = [], np.full(mu.size, np.nan), 0
    while np.isnan(t_max).any():
        tk = k * T_STEP_FAR
        side_t = T_STEP_FAR * np.arange(k + 1)
        tx = np.concatenate([np.full(k + 1, tk), side_t[:k]])          # ring points, tx or ty = tk
        ty = np.concatenate([side_t, np.full(k, tk)])
        steps = max(DEPTH_STEPS, math.ceil(DEPTH_STEPS * tk / T_MAX))
        values = np.concatenate([lattice_transmission(tx[i:i + 16], ty[i:i + 16], entry_x, entry_y, mu, steps)
                                 for i in range(0, tx.size, 16)], axis=1)
        rings.append(values)
        if tk >= T_MAX - 1e-9:
            ends = np.isnan(t_max) & ((values.mean(axis=1) < TAIL_RING * rings[0][:, 0]) | (tk >= limit))
            t_max[ends] = max(tk, T_MAX)
        k += 1
    far = np.zeros((mu.size, k, k))
    for j, values in enumerate(rings):
        far[:, :j + 1, j] = values[:, :j + 1]            # [group, iy, ix]: tx = j step, ty = 0 .. j step
        far[:, j, :j] = values[:, j + 1:]                # ty = j step, tx = 0 .. (j - 1) step
    return Transmission(mirrored(quadrant), mirrored(far), t_max)


PAD_MIN = 192                    # FFT size for the convolution (projections padded from 128) ...
DIST_MM = np.arange(40.0, 380.0 + 1e-6, 10.0)           # distance bins to the collimator face


def fft_size(t_max: float) -> int:
    """... enlarged (a multiple of 32) so that a response reaching tangent ``t_max`` from the
    farthest distance bin, or the whole detector, does not wrap around onto the projection."""
    z = DIST_MM[-1] + HOLE_LENGTH_MM + BACK_GAP_MM
    reach = min(N_PIX - 1, math.ceil(t_max * z / PIXEL_MM))
    return max(PAD_MIN, 32 * math.ceil((N_PIX + reach + 1) / 32))


def response_kernels(transmission: Transmission) -> np.ndarray:
    """rfft2 of the collimator-detector response [group, distance bin] on the pad x pad grid
    (``fft_size`` of the largest t_max).

    For a source at distance d from the collimator face, z = d + HOLE_LENGTH_MM + BACK_GAP_MM
    from the detection plane, the response at lateral (x, y) is T(x/z, y/z) cos^3 / (4 pi z^2)
    (transmitted fraction per mm^2 of isotropic photons; T zero beyond the group's t_max),
    integrated over each pixel (4 x 4 sub-samples), then blurred by the intrinsic resolution
    (Gaussian, in Fourier space). Its sum is the collimator's efficiency for that energy."""
    n = (transmission.near.shape[1] - 1) // 2
    m = (transmission.far.shape[1] - 1) // 2
    pad = fft_size(float(transmission.t_max.max()))
    sub = 4
    freq = fft.fftfreq(pad, d=PIXEL_MM)
    freq2 = freq[:, None] ** 2 + fft.rfftfreq(pad, d=PIXEL_MM)[None, :] ** 2
    out = np.empty((len(ENERGY_GROUP_KEV), DIST_MM.size, pad, pad // 2 + 1), dtype=np.complex128)
    for b, d in enumerate(DIST_MM):
        z = d + HOLE_LENGTH_MM + BACK_GAP_MM
        for g, e in enumerate(ENERGY_GROUP_KEV):
            t_max = transmission.t_max[g]
            half = min(pad // 2 - 1, math.ceil(t_max * z / PIXEL_MM) + 1)      # pixels holding the response
            offsets = (np.arange(-half * sub, (half + 1) * sub) + 0.5) / sub - 0.5      # pixel units
            tan = offsets * PIXEL_MM / z
            ty, tx = np.meshgrid(tan, tan, indexing="ij")
            near = (np.abs(tx) <= T_MAX) & (np.abs(ty) <= T_MAX)
            weight = (1.0 + tx**2 + ty**2) ** -1.5 / (4.0 * math.pi * z**2) * (PIXEL_MM / sub) ** 2
            value = map_coordinates(transmission.near[g], np.stack([ty / T_STEP + n, tx / T_STEP + n]), order=1,
                                    mode="constant")
            if t_max > T_MAX:
                far = map_coordinates(transmission.far[g], np.stack([ty / T_STEP_FAR + m, tx / T_STEP_FAR + m]),
                                      order=1, mode="constant")
                value = np.where(near, value, far) * weight * (np.maximum(np.abs(tx), np.abs(ty)) <= t_max)
            else:
                value = value * weight * near
            pixels = value.reshape(2 * half + 1, sub, 2 * half + 1, sub).sum(axis=(1, 3))
            kernel = np.zeros((pad, pad))
            kernel[:2 * half + 1, :2 * half + 1] = pixels
            kernel = np.roll(kernel, (-half, -half), axis=(0, 1))
            sigma = INTRINSIC_FWHM_140_MM * math.sqrt(140.0 / e) / (2.0 * math.sqrt(2.0 * math.log(2.0)))
            out[g, b] = fft.rfft2(kernel) * np.exp(-2.0 * math.pi**2 * sigma**2 * freq2)
    return out


# =============================================================================================
# Phantom and emission
# =============================================================================================

def in_cylinder(p: np.ndarray, centre: tuple[float, float], radius: float) -> np.ndarray:
    return ((p[..., 0] - centre[0]) ** 2 + (p[..., 1] - centre[1]) ** 2 <= radius**2) & (
        p[..., 2] >= Z_RANGE_MM[0]) & (p[..., 2] <= Z_RANGE_MM[1])


def in_sphere(p: np.ndarray, diameter: float, centre: tuple[float, float, float]) -> np.ndarray:
    return ((p - np.asarray(centre)) ** 2).sum(axis=-1) <= (diameter / 2.0) ** 2


def in_object(p: np.ndarray) -> np.ndarray:
    return in_cylinder(p, CYL_XY_MM, CYL_RADIUS_MM)


def in_bone(p: np.ndarray) -> np.ndarray:
    return in_cylinder(p, BONE_XY_MM, BONE_RADIUS_MM)


def jittered_grid(rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray, step: float) -> np.ndarray:
    axes = [np.arange(a, b, step) for a, b in zip(lo, hi)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    return grid + rng.uniform(0.0, step, grid.shape)


def emission_sites(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Points (mm) and their activity (Bq at acquisition start) sampling the phantom: a jittered
    grid of GRID_MM in the background (points in spheres dropped) and of SPHERE_GRID_MM in each
    sphere; weight = concentration x cell volume (stratified: the sum estimates the analytic
    activity to a fraction of a per mil)."""
    lo = np.array([CYL_XY_MM[0] - CYL_RADIUS_MM, CYL_XY_MM[1] - CYL_RADIUS_MM, Z_RANGE_MM[0]])
    hi = np.array([CYL_XY_MM[0] + CYL_RADIUS_MM, CYL_XY_MM[1] + CYL_RADIUS_MM, Z_RANGE_MM[1]])
    points = jittered_grid(rng, lo, hi, GRID_MM)
    keep = in_object(points) & ~in_bone(points)
    for diameter, centre in SPHERES:
        keep &= ~in_sphere(points, diameter, centre)
    points = [points[keep]]
    weights = [np.full(keep.sum(), BACKGROUND_BQ_ML * GRID_MM**3 / 1000.0)]
    for diameter, centre in SPHERES:
        c = np.asarray(centre)
        inner = jittered_grid(rng, c - diameter / 2, c + diameter / 2, SPHERE_GRID_MM)
        inner = inner[in_sphere(inner, diameter, centre)]
        points.append(inner)
        weights.append(np.full(len(inner), SPHERE_BQ_ML * SPHERE_GRID_MM**3 / 1000.0))
    return np.concatenate(points), np.concatenate(weights)


def analytic_activity_mbq() -> dict[str, float]:
    length = Z_RANGE_MM[1] - Z_RANGE_MM[0]
    sphere_ml = [math.pi / 6.0 * d**3 / 1000.0 for d, _ in SPHERES]
    background_ml = (math.pi * (CYL_RADIUS_MM**2 - BONE_RADIUS_MM**2) * length) / 1000.0 - sum(sphere_ml)
    total = (background_ml * BACKGROUND_BQ_ML + sum(sphere_ml) * SPHERE_BQ_ML) / 1e6
    return {"background_mL": background_ml, "spheres_mL": sphere_ml, "total_MBq": total}


# =============================================================================================
# Transport
# =============================================================================================

@dataclass
class Sources:
    """Points from which forced detection scores: position (mm), photon energy (keV), weight
    (photons per second at acquisition start), incoming direction (None: isotropic emission),
    scatter order (0: primary) and the index in LINES of the line emitted."""

    position: np.ndarray
    energy: np.ndarray
    weight: np.ndarray
    direction: np.ndarray | None
    order: np.ndarray
    line: np.ndarray

    @staticmethod
    def join(parts: list[Sources]) -> Sources:
        direction = None if parts[0].direction is None else np.concatenate([p.direction for p in parts])
        return Sources(*(np.concatenate([getattr(p, k) for p in parts]) for k in ("position", "energy", "weight")),
                       direction, *(np.concatenate([getattr(p, k) for p in parts]) for k in ("order", "line")))

    @property
    def kn_total(self) -> np.ndarray:
        """Klein-Nishina total cross section (cm^2) at each source's energy (cached)."""
        if not hasattr(self, "_kn"):
            self._kn = klein_nishina_cm2(self.energy)
        return self._kn


def track(rng: np.random.Generator, position: np.ndarray, energy: np.ndarray, weight: np.ndarray, line: int) -> Sources:
    """Transport photons emitted isotropically at ``position``; returns every Compton interaction
    (position, energy and direction before scattering, weight after implicit capture)."""
    n = len(position)
    direction = rotate_direction(rng, np.tile([0.0, 0.0, 1.0], (n, 1)), rng.uniform(-1.0, 1.0, n))
    order = np.zeros(n, dtype=np.int64)
    found: list[tuple] = []
    alive = energy >= E_CUT_KEV
    pos, e, w, d, o = position[alive], energy[alive], weight[alive], direction[alive], order[alive]
    while len(pos):
        mu_max = mu_per_mm("bone", e)
        pos = pos + d * (-np.log(rng.uniform(size=len(e))) / mu_max)[:, None]
        inside = in_object(pos)
        pos, e, w, d, o, mu_max = pos[inside], e[inside], w[inside], d[inside], o[inside], mu_max[inside]
        bone = in_bone(pos)
        mu = np.where(bone, mu_per_mm("bone", e), mu_per_mm("water", e))
        real = rng.uniform(size=len(e)) * mu_max < mu
        if not real.any():
            continue
        r = np.flatnonzero(real)
        compton = np.where(bone[r], compton_mu_per_mm("bone", e[r]), compton_mu_per_mm("water", e[r]))
        w[r] *= compton / mu[r]
        o[r] += 1
        found.append((pos[r].copy(), e[r].copy(), w[r].copy(), d[r].copy(), o[r].copy()))
        cos = sample_kn_cos(rng, e[r])
        d[r] = rotate_direction(rng, d[r], cos)
        e[r] = scattered_energy(e[r], cos)
        keep = (e >= E_CUT_KEV) & (o < MAX_ORDER)
        pos, e, w, d, o = pos[keep], e[keep], w[keep], d[keep], o[keep]
    order = np.concatenate([f[4] for f in found])
    return Sources(*(np.concatenate([f[i] for f in found]) for i in range(3)),
                   np.concatenate([f[3] for f in found]), order, np.full(order.size, line))


def chord_to_exit(p: np.ndarray, n: np.ndarray, centre: tuple[float, float], radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Entry and exit distances (clipped at 0) of the in-plane ray p + s n (n = unit vector in
    the xy plane) through the z-parallel cylinder; equal where the ray misses it."""
    qx, qy = p[:, 0] - centre[0], p[:, 1] - centre[1]
    b = qx * n[0] + qy * n[1]
    disc = b**2 - (qx**2 + qy**2 - radius**2)
    root = np.sqrt(np.clip(disc, 0.0, None))
    enter, leave = np.clip(-b - root, 0.0, None), np.clip(-b + root, 0.0, None)
    inside_z = (p[:, 2] >= Z_RANGE_MM[0]) & (p[:, 2] <= Z_RANGE_MM[1])
    hit = (disc > 0) & inside_z
    return np.where(hit, enter, 0.0), np.where(hit, leave, 0.0)


def view_geometry(theta_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors (LPS) axis -> detector and along the detector's columns at DICOM angle theta."""
    t = math.radians(theta_deg)
    return np.array([math.sin(t), math.cos(t), 0.0]), np.array([-math.cos(t), math.sin(t), 0.0])


E_GRID_KEV = np.arange(100.0, 340.0, 0.02)   # energy-dependent quantities looked up on this grid


@dataclass(frozen=True)
class EnergyTable:
    """Per E_GRID_KEV energy: window probabilities [window, energy], crystal absorption,
    attenuation of water and bone (1/mm) and collimator energy group."""

    window: np.ndarray
    absorption: np.ndarray
    mu_water: np.ndarray
    mu_bone: np.ndarray
    group: np.ndarray

    @classmethod
    def build(cls) -> EnergyTable:
        e = E_GRID_KEV
        return cls(window_probability(e), crystal_absorption(e), mu_per_mm("water", e), mu_per_mm("bone", e), energy_group(e))

    @staticmethod
    def index(energy_kev: np.ndarray) -> np.ndarray:
        step = E_GRID_KEV[1] - E_GRID_KEV[0]
        return np.clip(np.rint((energy_kev - E_GRID_KEV[0]) / step).astype(np.int64), 0, E_GRID_KEV.size - 1)


TALLY_KEYS = MAX_ORDER + 1                   # tally label = line index x TALLY_KEYS + scatter order


def score_view(sources: Sources, table: EnergyTable, theta_deg: float, radius_mm: float, attenuate: bool = True,
               tally: np.ndarray | None = None, offset_mm: float = 0.0) -> np.ndarray:
    """Forced-detection scores [window, group, distance bin, row, column] (photons per second
    reaching the crystal and recorded in the window, before the collimator response) of one view.
    ``attenuate`` False: a source in air (the calibration). ``tally`` [window, len(LINES) x
    TALLY_KEYS]: the scores' sums by line and scatter order are added to it. ``offset_mm``: the
    N_PIX columns are centred at this distance along the lateral axis from the axis of rotation."""
    normal, lateral = view_geometry(theta_deg)
    p = sources.position
    if sources.direction is None:
        energy, angular = sources.energy, 1.0                      # isotropic: 4 pi x 1 / (4 pi)
    else:
        cos = sources.direction @ normal
        energy = scattered_energy(sources.energy, cos)
        k = sources.energy / ELECTRON_KEV
        ratio = 1.0 / (1.0 + k * (1.0 - cos))
        # 4 pi x Klein-Nishina probability per steradian: d(sigma)/d(Omega) / sigma_total
        angular = (2.0 * math.pi * ELECTRON_RADIUS_CM**2) * ratio**2 * (ratio + 1.0 / ratio - (1.0 - cos**2)) / sources.kn_total
    at = table.index(energy)
    weight = sources.weight * angular * table.absorption[at]
    if attenuate:
        _, water_out = chord_to_exit(p, normal, CYL_XY_MM, CYL_RADIUS_MM)
        bone_in, bone_out = chord_to_exit(p, normal, BONE_XY_MM, BONE_RADIUS_MM)
        bone = bone_out - bone_in
        weight = weight * np.exp(-table.mu_water[at] * (water_out - bone) - table.mu_bone[at] * bone)
    distance = radius_mm - p @ normal
    column = np.floor((p @ lateral - offset_mm) / PIXEL_MM + 64.0).astype(np.int64)
    row = np.floor((Z_TOP_MM - p[:, 2]) / PIXEL_MM + 0.5).astype(np.int64)
    dbin = np.clip(np.rint((distance - DIST_MM[0]) / (DIST_MM[1] - DIST_MM[0])).astype(np.int64), 0, DIST_MM.size - 1)
    ok = (column >= 0) & (column < N_PIX) & (row >= 0) & (row < N_PIX) & (distance > 0)
    index = ((table.group[at] * DIST_MM.size + dbin) * N_PIX + row) * N_PIX + column
    index, weight, at = index[ok], weight[ok], at[ok]
    size = len(ENERGY_GROUP_KEV) * DIST_MM.size * N_PIX * N_PIX
    scores = [np.bincount(index, weights=weight * table.window[w, at], minlength=size) for w in range(len(WINDOWS))]
    if tally is not None:
        label = (sources.line * TALLY_KEYS + sources.order)[ok]
        for w in range(len(WINDOWS)):
            tally[w] += np.bincount(label, weights=weight * table.window[w, at], minlength=tally.shape[1])
    return np.stack(scores).reshape(len(WINDOWS), len(ENERGY_GROUP_KEV), DIST_MM.size, N_PIX, N_PIX)


def detect(scores: np.ndarray, kernels: np.ndarray) -> np.ndarray:
    """[window, row, column]: the scores convolved with the collimator-detector response."""
    pad = kernels.shape[2]
    out = np.zeros((scores.shape[0], N_PIX, N_PIX))
    lo = (pad - N_PIX) // 2
    for w in range(scores.shape[0]):
        spectrum = np.zeros((pad, pad // 2 + 1), dtype=np.complex128)
        for g in range(scores.shape[1]):
            for b in np.flatnonzero(scores[w, g].any(axis=(1, 2))):
                padded = np.zeros((pad, pad))
                padded[lo:lo + N_PIX, lo:lo + N_PIX] = scores[w, g, b]
                spectrum += fft.rfft2(padded) * kernels[g, b]
        out[w] = fft.irfft2(spectrum, s=(pad, pad))[lo:lo + N_PIX, lo:lo + N_PIX]
    return np.clip(out, 0.0, None)


def frame_decay_integral_s(start_s: float, duration_s: float) -> float:
    """Integral of exp(-lambda t) over [start, start + duration] (s)."""
    return math.exp(-DECAY_PER_S * start_s) * (1.0 - math.exp(-DECAY_PER_S * duration_s)) / DECAY_PER_S


def view_angles_deg(start_deg: float) -> np.ndarray:
    return (start_deg + STEP_DEG * np.arange(N_VIEWS)) % 360.0


@dataclass
class Acquisition:
    """Expected counts [window, head, view, row, column] of primary (unscattered in the object)
    and object-scattered photons, the Poisson draw, and the detected photons' shares [window,
    line, scatter order] (before the collimator response: the collimator's efficiency differs by
    under 4 % between the energy groups)."""

    primary: np.ndarray
    scatter: np.ndarray
    shares: np.ndarray
    counts: np.ndarray
    sampled_mbq: float                  # sum of the emission sites' activity


def tomo_sources(rng: np.random.Generator) -> tuple[Sources, Sources, np.ndarray]:
    """The emission sites' primaries and every Compton interaction tracked from them (forced
    detection scores both), and the sites' activity (Bq at acquisition start)."""
    points, bq = emission_sites(rng)
    primaries, scattered = [], []
    for line, (energy, yield_) in enumerate(LINES):
        if energy < E_CUT_KEV:                         # 112.95 keV: nothing reaches a window
            continue
        stride = 1 if yield_ > 0.05 else 4             # weak lines from every 4th site
        pts, w = points[::stride], bq[::stride] * stride * yield_
        e = np.full(len(pts), energy)
        primaries.append(Sources(pts, e, w, None, np.zeros(len(pts), dtype=np.int64), np.full(len(pts), line)))
        scattered.append(track(rng, pts, e, w, line))
    return Sources.join(primaries), Sources.join(scattered), bq


def acquired(rng: np.random.Generator, primary: np.ndarray, scatter: np.ndarray, tally: np.ndarray, bq: np.ndarray) -> Acquisition:
    """The Poisson draw of the expected counts, and the tally's shares per window."""
    counts = rng.poisson(primary + scatter)
    if counts.max() > 65535:
        raise SystemExit("counts exceed uint16")
    shares = tally.reshape(len(WINDOWS), len(LINES), TALLY_KEYS)
    return Acquisition(primary, scatter, shares / shares.sum(axis=(1, 2), keepdims=True), counts.astype(np.uint16),
                       float(bq.sum()) / 1e6)


def simulate_tomo(rng: np.random.Generator, table: EnergyTable, kernels: np.ndarray) -> Acquisition:
    """The SPECT acquisition: forced detection of the primaries and of the Compton interactions
    tracked from every emission site, for each of the 2 x N_VIEWS views."""
    primary_sources, scatter_sources, bq = tomo_sources(rng)
    shape = (len(WINDOWS), len(HEAD_START_DEG), N_VIEWS, N_PIX, N_PIX)
    primary, scatter = np.zeros(shape), np.zeros(shape)
    tally = np.zeros((len(WINDOWS), len(LINES) * TALLY_KEYS))
    for v in range(N_VIEWS):
        seconds = frame_decay_integral_s(v * FRAME_S, FRAME_S)
        for h, start in enumerate(HEAD_START_DEG):
            theta = float(view_angles_deg(start)[v])
            primary[:, h, v] = detect(score_view(primary_sources, table, theta, ORBIT_MM, tally=tally), kernels) * seconds
            scatter[:, h, v] = detect(score_view(scatter_sources, table, theta, ORBIT_MM, tally=tally), kernels) * seconds
    return acquired(rng, primary, scatter, tally, bq)


@dataclass
class Calibration:
    expected: np.ndarray            # [window, head, row, column]
    counts: np.ndarray


def simulate_calibration(rng: np.random.Generator, table: EnergyTable, kernels: np.ndarray) -> Calibration:
    """Planar acquisition of a point source (CAL_ACTIVITY_MBQ at CAL_REFERENCE) in air on the axis
    at z = 0, both heads at CAL_DISTANCE_MM, CAL_FRAME_S from CAL_ACQ: the same lines, collimator,
    crystal and energy resolution; no object, so no attenuation or scatter (air ignored)."""
    parts = [Sources(np.zeros((1, 3)), np.array([e]), np.array([CAL_ACTIVITY_MBQ * 1e6 * y]), None,
                     np.zeros(1, dtype=np.int64), np.array([i])) for i, (e, y) in enumerate(LINES)]
    source = Sources.join(parts)
    seconds = frame_decay_integral_s((CAL_ACQ - CAL_REFERENCE).total_seconds(), CAL_FRAME_S)
    expected = np.stack([detect(score_view(source, table, float(start), CAL_DISTANCE_MM, attenuate=False), kernels) * seconds
                         for start in HEAD_START_DEG], axis=1)
    counts = rng.poisson(expected)
    if counts.max() > 65535:
        raise SystemExit("calibration counts exceed uint16")
    return Calibration(expected, counts.astype(np.uint16))


# =============================================================================================
# DICOM
# =============================================================================================

def uid(name: str) -> str:
    """A reproducible UID derived from ``name``."""
    return generate_uid(entropy_srcs=["theraflow", SAMPLE, name])


def ds_text(value: float, digits: int = 4) -> str:
    text = f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def coded(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def base_dataset(sop_class: str, name: str, transfer_syntax: str, modality: str, series: str, number: int,
                 when: datetime, study: str) -> Dataset:
    """File meta, SOP common, patient, study, series, frame of reference and equipment."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = uid(name)
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid(name)
    calibration = study == "calibration"
    ds.PatientName = "Calibration^PointSource" if calibration else "Phantom^BoneWaterSpheres"
    ds.PatientID = "MC-CAL" if calibration else f"MC-{TAG.upper()}"
    ds.PatientBirthDate, ds.PatientSex, ds.PatientWeight = "", "O", "6"
    ds.StudyInstanceUID = uid(f"{study}-study")
    ds.StudyDate, ds.StudyTime = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
    ds.StudyDescription = f"{TAG} {'calibration' if calibration else 'phantom'} (Monte Carlo simulation)"
    ds.Modality = modality
    ds.SeriesInstanceUID = uid(f"{study}-{series}")
    ds.SeriesNumber = number
    ds.SeriesDate, ds.SeriesTime = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    ds.SeriesDescription = series
    ds.BodyPartExamined = "ABDOMEN"
    ds.FrameOfReferenceUID = uid(f"{study}-frame")
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer, ds.ManufacturerModelName = MANUFACTURER, MODEL
    ds.InstitutionName, ds.StationName = "theraflow simulation", "MCSIM"
    ds.SoftwareVersions = PROGRAM
    return ds


def write_nm(path: Path, counts: np.ndarray, image_type: str, acquired: datetime, reference: datetime,
             dose_mbq: float, frame_s: float, radii: list[list[float]], study: str, pharmaceutical: str) -> None:
    """Multi-frame NM (deflated transfer syntax) of ``counts`` [window, head, (view,) row, col],
    frames ordered window, head, view (FrameIncrementPointer)."""
    ds = base_dataset(NM_STORAGE, f"{study}-nm", DeflatedExplicitVRLittleEndian, "NM", f"{TAG} {image_type}", 1, acquired, study)
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", image_type, "EMISSION"]
    ds.AcquisitionDate = ds.ContentDate = acquired.strftime("%Y%m%d")
    ds.AcquisitionTime = ds.ContentTime = acquired.strftime("%H%M%S")
    ds.PatientOrientation = ""
    recumbent = coded("F-10450", "SRT", "recumbent")
    recumbent.PatientOrientationModifierCodeSequence = DicomSequence([coded("F-10340", "SRT", "supine")])
    ds.PatientOrientationCodeSequence = DicomSequence([recumbent])
    ds.PatientGantryRelationshipCodeSequence = DicomSequence([coded("F-10470", "SRT", "headfirst")])
    index = np.indices(counts.shape[:-2]).reshape(counts.ndim - 2, -1) + 1
    vectors = {"EnergyWindowVector": index[0].tolist(), "DetectorVector": index[1].tolist()}
    if image_type == "TOMO":
        vectors |= {"RotationVector": [1] * index.shape[1], "AngularViewVector": index[2].tolist()}
    ds.NumberOfFrames = index.shape[1]
    ds.FrameIncrementPointer = [tag_for_keyword(k) for k in vectors]
    for keyword, values in vectors.items():
        setattr(ds, keyword, values)
    ds.NumberOfEnergyWindows, ds.NumberOfDetectors = len(WINDOWS), len(HEAD_START_DEG)
    set_nm_pixels(ds, N_PIX, N_PIX)
    ds.SliceThickness = ds_text(PIXEL_MM)
    ds.CountsAccumulated = int(counts.sum(dtype=np.int64))
    ds.AcquisitionTerminationCondition = "TIME"
    if image_type == "STATIC":                      # TOMO: in the Rotation Information Sequence
        ds.ActualFrameDuration = round(frame_s * 1000)
    ds.EnergyWindowInformationSequence = energy_window_sequence()
    ds.RadiopharmaceuticalInformationSequence = radiopharmaceutical_sequence(reference, dose_mbq, pharmaceutical)
    heads = []
    for start, radial in zip(HEAD_START_DEG, radii):
        item = Dataset()
        item.CollimatorGridName, item.CollimatorType, item.FocalDistance = COLLIMATOR, "PARA", 0
        item.ZoomFactor = ["1", "1"]
        item.StartAngle = ds_text(start)
        item.RadialPosition = [ds_text(r, 2) for r in radial]
        item.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
        item.ImagePositionPatient = [ds_text(-63.5 * PIXEL_MM), ds_text(-63.5 * PIXEL_MM), ds_text(Z_TOP_MM)]
        heads.append(item)
    ds.DetectorInformationSequence = DicomSequence(heads)
    if image_type == "TOMO":
        ds.NumberOfRotations = 1
        rotation = Dataset()
        rotation.StartAngle = ds_text(HEAD_START_DEG[0])
        rotation.AngularStep = ds_text(STEP_DEG)
        rotation.RotationDirection = "CC"
        rotation.ScanArc = ds_text(STEP_DEG * N_VIEWS)
        rotation.ActualFrameDuration = round(frame_s * 1000)
        rotation.RadialPosition = [ds_text(r, 2) for r in radii[0]]
        rotation.NumberOfFramesInRotation = N_VIEWS
        rotation.TableTraverse, rotation.TableHeight = "0", "150"
        ds.RotationInformationSequence = DicomSequence([rotation])
        ds.TypeOfDetectorMotion = "STEP AND SHOOT"
    ds.PixelData = np.ascontiguousarray(counts.reshape(-1, N_PIX, N_PIX), dtype="<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def set_nm_pixels(ds: Dataset, rows: int, cols: int) -> None:
    """The NM image's pixel description: 16-bit unsigned counts, ``rows`` x ``cols`` pixels of PIXEL_MM."""
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    ds.PixelSpacing = [ds_text(PIXEL_MM), ds_text(PIXEL_MM)]


def energy_window_sequence() -> DicomSequence:
    """EnergyWindowInformationSequence of WINDOWS."""
    items = []
    for name, lo, hi in WINDOWS:
        limits = Dataset()
        limits.EnergyWindowLowerLimit, limits.EnergyWindowUpperLimit = ds_text(lo), ds_text(hi)
        item = Dataset()
        item.EnergyWindowRangeSequence = DicomSequence([limits])
        item.EnergyWindowName = name
        items.append(item)
    return DicomSequence(items)


def radiopharmaceutical_sequence(reference: datetime, dose_mbq: float, pharmaceutical: str) -> DicomSequence:
    """RadiopharmaceuticalInformationSequence: ``dose_mbq`` at ``reference``."""
    pharm = Dataset()
    if NUCLIDE_CODE[0]:                             # no SNOMED code at hand for --nuclide: the name only
        pharm.RadionuclideCodeSequence = DicomSequence([coded(NUCLIDE_CODE[0], "SRT", NUCLIDE_CODE[1])])
    pharm.Radiopharmaceutical = pharmaceutical
    pharm.RadiopharmaceuticalStartTime = reference.strftime("%H%M%S")
    pharm.RadiopharmaceuticalStartDateTime = reference.strftime("%Y%m%d%H%M%S")
    pharm.RadionuclideTotalDose = ds_text(dose_mbq, 3)
    pharm.RadionuclideHalfLife = ds_text(HALF_LIFE_S, 1)
    return DicomSequence([pharm])


def ct_numbers() -> tuple[np.ndarray, dict[str, float]]:
    """HU [z, y, x] of the CT grid (in-plane partial volume by 4 x 4 sub-samples, slabs thinner
    than the phantom's ends by overlap) and the HU of each material: 1000 (mu - mu_water) / mu_water
    at CT_EFFECTIVE_KEV from the same tables (air -1000)."""
    hu = {m: 1000.0 * (float(mu_per_mm(m, CT_EFFECTIVE_KEV)) / float(mu_per_mm("water", CT_EFFECTIVE_KEV)) - 1.0)
          for m in ("water", "bone")}
    sub = 4
    fine = (np.arange(CT_N * sub) - (CT_N * sub - 1) / 2.0) * CT_PIXEL_MM / sub
    y, x = np.meshgrid(fine, fine, indexing="ij")
    def fraction(c: tuple[float, float], r: float) -> np.ndarray:
        inside = (x - c[0]) ** 2 + (y - c[1]) ** 2 <= r**2
        return inside.reshape(CT_N, sub, CT_N, sub).mean(axis=(1, 3))
    water_disc, bone_disc = fraction(CYL_XY_MM, CYL_RADIUS_MM), fraction(BONE_XY_MM, BONE_RADIUS_MM)
    slabs = []
    for z in CT_Z_MM:
        overlap = np.clip(min(z + CT_SLICE_MM / 2, Z_RANGE_MM[1]) - max(z - CT_SLICE_MM / 2, Z_RANGE_MM[0]), 0, None) / CT_SLICE_MM
        water, bone = overlap * (water_disc - bone_disc), overlap * bone_disc
        slabs.append(-1000.0 * (1.0 - water - bone) + hu["water"] * water + hu["bone"] * bone)
    return np.stack(slabs), hu


def write_ct(folder: Path) -> dict[str, float]:
    """The CT series (RLE lossless), instance 1 the most superior slice; returns the HU used."""
    hu, table = ct_numbers()
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("CT*.dcm"):
        old.unlink()
    origin = -(CT_N - 1) / 2.0 * CT_PIXEL_MM
    for number, k in enumerate(np.argsort(-CT_Z_MM), start=1):
        z = float(CT_Z_MM[k])
        ds = base_dataset(CT_STORAGE, f"ct-{k}", RLELossless, "CT", "CTAC", 2, CT_TIME, "phantom")
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientPosition = "HFS"
        ds.InstanceNumber, ds.AcquisitionNumber = number, 1
        ds.AcquisitionDate = ds.ContentDate = CT_TIME.strftime("%Y%m%d")
        ds.AcquisitionTime = ds.ContentTime = CT_TIME.strftime("%H%M%S")
        ds.KVP, ds.XRayTubeCurrent, ds.ConvolutionKernel = "120", 80, "STANDARD"
        ds.PixelSpacing = [ds_text(CT_PIXEL_MM), ds_text(CT_PIXEL_MM)]
        ds.SliceThickness = ds_text(CT_SLICE_MM)
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.ImagePositionPatient = [ds_text(origin), ds_text(origin), ds_text(z)]
        ds.SliceLocation = ds_text(z)
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = CT_N
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.compress(RLELossless, np.round(hu[k] + 1024.0).astype(np.uint16), generate_instance_uid=False)
        ds.save_as(folder / f"CT{number:04d}.dcm", enforce_file_format=True)
    return table


# =============================================================================================
# Truth and main
# =============================================================================================

def window_widths() -> np.ndarray:
    return np.array([hi - lo for _, lo, hi in WINDOWS])


def tew_scatter(counts: np.ndarray) -> np.ndarray:
    """Triple-energy-window estimate of the photopeak scatter from [window, ...] counts (for the
    truth file only: how far TEW is from this simulation's true scatter)."""
    return tew_scatter_of(counts, TEW[0])


def tew_scatter_of(counts: np.ndarray, windows: tuple[int, int, int]) -> np.ndarray:
    """The TEW estimate for the (photopeak, lower, upper) windows ``windows``."""
    w = window_widths()
    peak, lower, upper = windows
    return (counts[lower] / w[lower] + counts[upper] / w[upper]) * w[peak] / 2.0


def truth(tomo: Acquisition, cal: Calibration, hu: dict[str, float], seconds: float) -> dict:
    """Everything a test needs to know (JSON)."""
    activity = analytic_activity_mbq()
    prim, scat = tomo.primary.sum(axis=(3, 4)), tomo.scatter.sum(axis=(3, 4))      # [window, head, view]
    sp_view = scat[PHOTOPEAK] / prim[PHOTOPEAK]
    tew = tew_scatter(prim + scat)
    cal_mean_mbq = CAL_ACTIVITY_MBQ * frame_decay_integral_s((CAL_ACQ - CAL_REFERENCE).total_seconds(), CAL_FRAME_S) / CAL_FRAME_S
    shares = tomo.shares[PHOTOPEAK]
    return {
        "description": f"Monte Carlo {NUCLIDE} SPECT/CT of a water cylinder with a cortical-bone rod and hot spheres ({PROGRAM})",
        "shares_model_with_reconstruction": "nothing: own transport, collimator ray tracing, energy resolution; no TEW-shaped window",
        "seed": SEED,
        "generation_s": round(seconds, 1),
        "coordinates": "DICOM patient LPS, mm; axis of rotation x = y = 0",
        "reference_datetime": ACQ_START.isoformat(),
        "nuclide": {"name": NUCLIDE, "half_life_s": HALF_LIFE_S,
                    "lines_keV_yield": [list(x) for x in LINES], "lines_source": LINES_SOURCE},
        "phantom": {
            "water_cylinder": {"axis_xy_mm": list(CYL_XY_MM), "radius_mm": CYL_RADIUS_MM, "z_range_mm": list(Z_RANGE_MM)},
            "bone_rod": {"axis_xy_mm": list(BONE_XY_MM), "radius_mm": BONE_RADIUS_MM, "z_range_mm": list(Z_RANGE_MM),
                         "material": "cortical bone ICRU-44, 1.92 g/cm3", "concentration_Bq_per_mL": 0.0},
            "walls": "none",
        },
        "background_concentration_Bq_per_mL": BACKGROUND_BQ_ML,
        "background_volume_mL": round(activity["background_mL"], 3),
        "spheres": [{"diameter_mm": d, "centre_mm": list(c), "volume_mL": round(v, 4), "concentration_Bq_per_mL": SPHERE_BQ_ML}
                    for (d, c), v in zip(SPHERES, activity["spheres_mL"])],
        "total_activity_MBq": round(activity["total_MBq"], 4),
        "sampled_activity_MBq": round(tomo.sampled_mbq, 4),
        "attenuation": {"source": "NIST XCOM (Hubbell & Seltzer) mass attenuation, typed; NaI approximate",
                        "mu_per_cm_208keV": {m: round(float(mu_per_mm(m, 208.37)) * 10, 4) for m in ("water", "bone", "lead", "NaI")},
                        "ct_HU": {k: round(v, 1) for k, v in hu.items()}, "ct_effective_keV": CT_EFFECTIVE_KEV},
        "camera": {
            "manufacturer": MANUFACTURER, "model": MODEL, "collimator": COLLIMATOR,
            "holes": {"shape": "hexagonal", "across_flats_mm": HOLE_MM, "septa_mm": SEPTA_MM, "length_mm": HOLE_LENGTH_MM,
                      "back_gap_mm": BACK_GAP_MM},
            "crystal_NaI_mm": CRYSTAL_MM, "intrinsic_fwhm_140keV_mm": INTRINSIC_FWHM_140_MM,
            "energy_fwhm_at_208keV": ENERGY_FWHM_208,
            "pixels": N_PIX, "pixel_mm": PIXEL_MM, "heads": len(HEAD_START_DEG), "views_per_head": N_VIEWS,
            "step_deg": STEP_DEG, "head_start_deg": list(HEAD_START_DEG), "rotation": "CC",
            "frame_s": FRAME_S, "orbit_radius_mm": ORBIT_MM,
            "windows_keV": {name: [lo, hi] for name, lo, hi in WINDOWS},
        },
        "expected_counts": {
            "primary_per_window": [round(float(x), 1) for x in prim.sum(axis=(1, 2))],
            "scatter_per_window": [round(float(x), 1) for x in scat.sum(axis=(1, 2))],
        },
        "photopeak_scatter_to_primary": {
            "total": round(float(scat[PHOTOPEAK].sum() / prim[PHOTOPEAK].sum()), 4),
            "per_view_min": round(float(sp_view.min()), 4), "per_view_max": round(float(sp_view.max()), 4),
            "per_view": [[round(float(x), 4) for x in head] for head in sp_view],
            "tew_estimate_over_true_scatter": round(float(tew.sum() / scat[PHOTOPEAK].sum()), 4),
            "definition": "object-scattered / unscattered photons of all lines recorded in the photopeak window (expected counts)",
        },
        "photopeak_shares": {
            "by_line_keV": {f"{e:g}": round(float(shares[i].sum()), 5) for i, (e, _) in enumerate(LINES)},
            "by_scatter_order": {str(o): round(float(shares[:, o].sum()), 5) for o in range(TALLY_KEYS) if shares[:, o].sum() > 0},
            "note": "fractions of the detected photopeak photons, before the collimator response",
        },
        "calibration": {
            "file": "calibration/point_source.dcm", "activity_MBq": CAL_ACTIVITY_MBQ,
            "activity_time": CAL_REFERENCE.isoformat(), "acquisition_start": CAL_ACQ.isoformat(),
            "frame_s": CAL_FRAME_S, "distance_mm": CAL_DISTANCE_MM, "position_mm": [0.0, 0.0, 0.0],
            "expected_counts_per_window_per_head": [[round(float(x), 1) for x in w] for w in cal.expected.sum(axis=(2, 3))],
            "true_photopeak_cps_per_MBq_per_head": round(float(cal.expected[PHOTOPEAK].sum(axis=(1, 2)).mean() / (CAL_FRAME_S * cal_mean_mbq)), 4),
        },
        "variance_reduction": "convolution-based forced detection at emission and at every Compton interaction; stratified (jittered-grid) emission sites",
        **({"photopeak_windows": [photopeak_truth(tomo, cal, t, cal_mean_mbq) for t in TEW]} if len(TEW) > 1 else {}),
    }


def photopeak_truth(tomo: Acquisition, cal: Calibration, windows: tuple[int, int, int], cal_mean_mbq: float) -> dict:
    """Per photopeak window (several-photopeak nuclides): expected counts, true and TEW scatter,
    and the true calibration sensitivity."""
    peak = windows[0]
    prim, scat = tomo.primary[peak].sum(), tomo.scatter[peak].sum()
    return {
        "window": WINDOWS[peak][0], "window_keV": list(WINDOWS[peak][1:]),
        "scatter_windows": [WINDOWS[w][0] for w in windows[1:]],
        "expected_primary": round(float(prim), 1), "expected_scatter": round(float(scat), 1),
        "scatter_to_primary": round(float(scat / prim), 4),
        "tew_estimate_over_true_scatter": round(float(tew_scatter_of(tomo.primary + tomo.scatter, windows).sum() / scat), 4),
        "true_cps_per_MBq_per_head": round(float(cal.expected[peak].sum(axis=(1, 2)).mean() / (CAL_FRAME_S * cal_mean_mbq)), 4),
    }


# --nuclide: photon lines at least this abundant [photons per parent decay], emitted below E_MAX_KEV
MIN_LINE_YIELD = 0.003
E_MAX_KEV = 600.0                # the attenuation tables end here
E_MIN_KEV = 100.0                # ... and the lead and NaI tables start here
# Background concentration [Bq/mL] per nuclide (spheres 10 x) and seconds per view: a few MBq in
# all for the alpha emitters (1 kBq/mL: 5.8 MBq), 45 views x 40 s (30 min per head, as in clinical
# Ac-225 SPECT); for the others, photopeak counts of a few million, as in clinical SPECT
BACKGROUND_BQ_ML_BY_NUCLIDE = {"Ac-225": 1.0e3, "Ra-223": 1.0e3, "I-131": 10e3, "In-111": 4e3, "Pb-212": 20e3}
FRAME_S_BY_NUCLIDE = {"Ac-225": 40.0, "Ra-223": 40.0, "In-111": 30.0, "Pb-212": 40.0}
# Calibration point source [MBq] where 100 MBq would put more than 65535 counts in a pixel
CAL_ACTIVITY_MBQ_BY_NUCLIDE = {"I-131": 10.0, "In-111": 10.0, "Pb-212": 20.0, "Ra-223": 40.0}
# Photopeaks [keV] given windows, where not every photopeak of at least 0.1 photons per decay:
# Pb-212 the 239 keV line only (76.5 keV X-rays below the tables; 583 keV Tl-208 emitted, not
# windowed: its upper scatter window would pass the tables' end); Ra-223 the 154 and 270 keV
# lines (the 82-84 keV X-rays lie below the tables, across lead's K edge at 88 keV)
WINDOWED_PEAKS_KEV_BY_NUCLIDE = {"Pb-212": (239.0,), "Ra-223": (154.0, 270.0)}
# Photopeak window [fractions of the photopeak energy]: 20 % (CZT: see use_starguide)
PEAK_WINDOW = (0.9, 1.1)
SAMPLE_TAG = ""                  # in the sample's name, before "-mc" (CZT: "-czt")
# Scatter window width [fraction of the photopeak energy]: 10 %, In-111's 6 % (10 % windows of
# the 171 and 245 keV photopeaks would overlap between them)
SCATTER_FRACTION_BY_NUCLIDE = {"In-111": 0.06}
# --collimator: hexagonal holes (across flats, septa, length; mm). MEGP: the default above. HEGP:
# the GE high-energy general-purpose collimator as in SIMIND's collimator database (4.0 mm holes,
# 1.8 mm septa, 66 mm long; the values theraflow's collimators.json gives GE's HEGP)
COLLIMATORS = {"MEGP": (HOLE_MM, SEPTA_MM, HOLE_LENGTH_MM), "HEGP": (4.0, 1.8, 66.0)}


def use_nuclide(name: str) -> None:
    """Re-point the module's nuclide-dependent settings at ``name`` (any nuclide but Lu-177, whose
    settings are the defaults above and are left untouched).

    Photon lines (energies and yields per parent decay, progeny in equilibrium) are DATA read
    from theraflow's ``recon.nuclides`` (ICRP-107), the only thing taken from theraflow: lines at
    least ``MIN_LINE_YIELD`` abundant between E_CUT_KEV and E_MAX_KEV (the tables' end; Ac-225's
    807, 1100 and 1567 keV lines, 2.6 % per decay in all, are left out with their down-scatter).
    Windows, as a camera's nuclide preset would set them: for each photopeak of at least 0.1
    photons per decay, a photopeak window (PEAK_WINDOW: 20 %) and 10 %-wide scatter windows on
    each side. The
    collimator's energy groups: the photopeak energies and a 10 %-step grid between."""
    from recon.nuclides import load_nuclide  # data only: energies and yields

    nuclide = load_nuclide(name)
    chosen = WINDOWED_PEAKS_KEV_BY_NUCLIDE.get(nuclide.name)
    peaks = sorted(p.energy_keV for p in nuclide.photopeaks if p.yield_per_decay >= 0.1) if chosen is None else \
        sorted(min(nuclide.photopeaks_keV, key=lambda p: abs(p - e)) for e in chosen)
    scatter = SCATTER_FRACTION_BY_NUCLIDE.get(nuclide.name, 0.1)
    windows, tew = [], []
    symbol, mass = nuclide.name.split("-")
    for e in peaks:
        lo, hi = round(PEAK_WINDOW[0] * e, 1), round(PEAK_WINDOW[1] * e, 1)
        base = len(windows)
        windows += [(f"{symbol}{mass}_{e:.0f}_SCL", round(lo - scatter * e, 1), lo), (f"{symbol}{mass}_{e:.0f}_EM", lo, hi),
                    (f"{symbol}{mass}_{e:.0f}_SCU", hi, round(hi + scatter * e, 1))]
        tew.append((base + 1, base, base + 2))
    if any(a[2] > b[1] for a, b in itertools.pairwise(windows)):
        raise SystemExit(f"{name}: photopeak and scatter windows overlap ({windows})")
    e_cut = max(windows[0][1] - 5.0 * float(energy_sigma_kev(windows[0][1])), E_MIN_KEV)
    lines = tuple((round(x.energy_keV, 2), round(x.yield_per_decay, 6)) for x in nuclide.photon_lines
                  if e_cut <= x.energy_keV <= E_MAX_KEV and x.yield_per_decay >= MIN_LINE_YIELD)
    centres = sorted(set(peaks) | {e for e in e_cut * 1.1 ** np.arange(40) if e <= windows[-1][2] + 20
                                   and all(abs(e - p) > 0.05 * p for p in peaks)})
    background = BACKGROUND_BQ_ML_BY_NUCLIDE.get(nuclide.name, 50e3)
    globals().update(
        NUCLIDE=nuclide.name, SAMPLE=f"{symbol.lower()}{mass}{SAMPLE_TAG}-mc", TAG=f"{symbol}{mass}",
        NUCLIDE_CODE=("", ""), LINES_SOURCE="ICRP-107 via theraflow recon.nuclides (equilibrium)",
        LINES=lines, HALF_LIFE_S=nuclide.half_life_s, DECAY_PER_S=math.log(2.0) / nuclide.half_life_s, E_CUT_KEV=e_cut,
        WINDOWS=tuple(windows), TEW=tuple(tew), PHOTOPEAK=tew[0][0], FAR_TAIL=True,
        ENERGY_GROUP_KEV=np.array(centres), ENERGY_GROUP_EDGES=0.5 * (np.array(centres[1:]) + np.array(centres[:-1])),
        E_GRID_KEV=np.arange(100.0, windows[-1][2] + 60.0, 0.02),
        BACKGROUND_BQ_ML=background, SPHERE_BQ_ML=10.0 * background, FRAME_S=FRAME_S_BY_NUCLIDE.get(nuclide.name, FRAME_S),
        CAL_ACTIVITY_MBQ=CAL_ACTIVITY_MBQ_BY_NUCLIDE.get(nuclide.name, CAL_ACTIVITY_MBQ),
    )


def use_collimator(name: str) -> None:
    """Re-point the collimator's name and hole geometry at ``name`` (a key of COLLIMATORS)."""
    hole, septa, length = COLLIMATORS[name]
    globals().update(COLLIMATOR=name, HOLE_MM=hole, SEPTA_MM=septa, HOLE_LENGTH_MM=length)


# =============================================================================================
# --camera starguide: a CZT ring camera like GE's StarGuide, files as the StarGuide writes them
# =============================================================================================
# 12 detector columns of SG_PIXELS x N_PIX CZT pixels of 2.46 mm on a ring, 30 degrees apart.
# Each column swivels about a pivot SG_PIVOT_MM from the axis: at ring angle psi and swivel s it
# looks along psi + s, its face R cos s from the axis and its pixels centred R sin s sideways.
# At each gantry step (SG_GANTRY_DEG; one, to keep the simulation to ~10 min of CPU) every column
# sweeps SG_SWIVELS offsets whose strips tile the field of view side by side; frames last SG_DWELL
# (relative) of the scan, longer mid-body. The calibration (point source in air, 100 mm) is a
# planar image of N_PIX x N_PIX pixels: the strips of a column swept across the source put side by
# side, so that it holds the whole response, septal penetration included (a single 16-pixel strip
# would lose the penetration tails that the reconstruction's model spreads beyond it).
SG_COLUMNS = 12
SG_PIXELS = 16
SG_PIVOT_MM = 170.0
SG_GANTRY_DEG = (0.0,)
SG_SWIVELS = 6
SG_DWELL = (1.0, 1.25, 1.5, 1.5, 1.25, 1.0)
CZT_PIXEL_MM = 2.46
CZT_MM = 7.25
CZT_FWHM_140 = 0.06              # relative energy FWHM at 140 keV; the absolute FWHM scales with sqrt(E)
CZT_TAIL_FRACTION = 0.2          # hole tailing: events recorded 5-30 % low (TAIL_RANGE)
CZT_PEAK_WINDOW = (0.94, 1.05)   # narrow photopeak windows, wider below the peak for the tail


def use_starguide() -> None:
    """Re-point the camera at the CZT ring (before ``use_nuclide``, which sets the windows):
    pixelated CZT (2.46 mm pixels, no intrinsic blur beyond the pixel), 7.25 mm thick, energy
    FWHM 6 % at 140 keV (sqrt(E) scaling of the absolute FWHM, so 4.8 % at 218 keV, 3.4 % at
    440 keV), a low-energy tail of CZT_TAIL_FRACTION of the absorbed photons, narrow photopeak
    windows; the collimator stays this simulator's hexagonal-hole one (``--collimator``)."""
    globals().update(
        MODEL="TF-MC-StarGuide-CZT", PIXEL_MM=CZT_PIXEL_MM, Z_TOP_MM=63.5 * CZT_PIXEL_MM, CRYSTAL="CZT", CRYSTAL_MM=CZT_MM,
        INTRINSIC_FWHM_140_MM=0.0, ENERGY_FWHM_208=CZT_FWHM_140 * math.sqrt(140.0 / 208.37),
        TAIL_FRACTION=CZT_TAIL_FRACTION, PEAK_WINDOW=CZT_PEAK_WINDOW, SAMPLE_TAG="-czt",
    )


@dataclass(frozen=True)
class Frame:
    """One frame of one column: DICOM-convention angle (degrees; normal (sin, cos, 0) in LPS),
    face distance from the axis and sideways offset of the pixels' centre along (-cos, sin, 0)
    (mm), the pivot (x, y) in LPS (mm), start after the acquisition start and duration (s)."""

    angle_deg: float
    radius_mm: float
    offset_mm: float
    pivot_xy: tuple[float, float]
    start_s: float
    duration_s: float


def starguide_frames() -> list[list[Frame]]:
    """[column][frame]: every column steps with the gantry and sweeps its swivels; all columns
    move together. The scan lasts as long as one head's of the dual-head camera (N_VIEWS x FRAME_S)."""
    strip = SG_PIXELS * PIXEL_MM
    offsets = (np.arange(SG_SWIVELS) - (SG_SWIVELS - 1) / 2) * strip
    unit_s = N_VIEWS * FRAME_S / (len(SG_GANTRY_DEG) * sum(SG_DWELL))
    frames: list[list[Frame]] = [[] for _ in range(SG_COLUMNS)]
    start = 0.0
    for gantry in SG_GANTRY_DEG:
        for offset, dwell in zip(offsets, SG_DWELL):
            swivel = math.degrees(math.asin(offset / SG_PIVOT_MM))
            for c in range(SG_COLUMNS):
                ring = 360.0 / SG_COLUMNS * c + gantry
                pivot = (SG_PIVOT_MM * math.sin(math.radians(ring)), SG_PIVOT_MM * math.cos(math.radians(ring)))
                frames[c].append(Frame((ring + swivel) % 360.0, SG_PIVOT_MM * math.cos(math.radians(swivel)), float(offset),
                                       pivot, start, unit_s * dwell))
            start += unit_s * dwell
    return frames


def pixel_columns() -> slice:
    """The detector column's SG_PIXELS central columns of the N_PIX-wide scoring grid."""
    lo = (N_PIX - SG_PIXELS) // 2
    return slice(lo, lo + SG_PIXELS)


def near_strip(sources: Sources, frame: Frame) -> Sources:
    """The sources whose collimator response (tangents up to T_MAX) can reach the frame's pixels."""
    normal, lateral = view_geometry(frame.angle_deg)
    p = sources.position
    depth = frame.radius_mm - p @ normal + HOLE_LENGTH_MM + BACK_GAP_MM
    keep = np.abs(p @ lateral - frame.offset_mm) <= (SG_PIXELS / 2 + 1) * PIXEL_MM + T_MAX * depth
    direction = None if sources.direction is None else sources.direction[keep]
    return Sources(p[keep], sources.energy[keep], sources.weight[keep], direction, sources.order[keep], sources.line[keep])


def simulate_starguide(rng: np.random.Generator, table: EnergyTable, kernels: np.ndarray) -> Acquisition:
    """The ring acquisition: as ``simulate_tomo``, each frame scored on an N_PIX-wide grid centred
    on its pixels (so that photons from beside the strip blur into it) and cut to its pixels.
    Counts [window, column, frame, row, pixel column]."""
    primary_sources, scatter_sources, bq = tomo_sources(rng)
    frames = starguide_frames()
    shape = (len(WINDOWS), SG_COLUMNS, len(frames[0]), N_PIX, SG_PIXELS)
    primary, scatter = np.zeros(shape), np.zeros(shape)
    tally = np.zeros((len(WINDOWS), len(LINES) * TALLY_KEYS))
    for c, column in enumerate(frames):
        for f, frame in enumerate(column):
            seconds = frame_decay_integral_s(frame.start_s, frame.duration_s)
            for out, sources in ((primary, primary_sources), (scatter, scatter_sources)):
                scores = score_view(near_strip(sources, frame), table, frame.angle_deg, frame.radius_mm, tally=tally,
                                    offset_mm=frame.offset_mm)
                out[:, c, f] = detect(scores, kernels)[..., pixel_columns()] * seconds
    return acquired(rng, primary, scatter, tally, bq)


def private(ds: Dataset, group: int, creator: str, element: int, vr: str, value) -> None:
    ds.private_block(group, creator, create=True).add_new(element, vr, value)


def write_starguide(folder: Path, counts: np.ndarray, frames: list[list[Frame]], dose_mbq: float) -> None:
    """One multi-frame NM TOMO file per column (deflated), frames window by window, each window's
    frames in time order, the geometry in the StarGuide's private attributes as PyTomography's
    StarGuide reader reads them: per frame detector x, y [cm] (0099,1051/1052) = minus the pivot,
    angle [deg] (0099,1053) = DICOM angle - 180, duration [ms] (0009,1003); pixel scale
    (0011,103B) 1. ``counts`` [window, column, frame, row, pixel column]."""
    n_windows, _, n_frames, rows, cols = counts.shape
    unit_ms = round(1000.0 * frames[0][0].duration_s / SG_DWELL[0])
    for c, column in enumerate(frames):
        ds = base_dataset(NM_STORAGE, f"phantom-nm-{c + 1}", DeflatedExplicitVRLittleEndian, "NM", f"{TAG} TOMO", 1, ACQ_START, "phantom")
        ds.InstanceNumber = c + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "TOMO", "EMISSION"]
        ds.AcquisitionDate = ds.ContentDate = ACQ_START.strftime("%Y%m%d")
        ds.AcquisitionTime = ds.ContentTime = ACQ_START.strftime("%H%M%S")
        ds.NumberOfFrames = n_windows * n_frames
        ds.FrameIncrementPointer = [tag_for_keyword("EnergyWindowVector"), tag_for_keyword("DetectorVector")]
        ds.EnergyWindowVector = [w + 1 for w in range(n_windows) for _ in range(n_frames)]
        ds.DetectorVector = [1] * (n_windows * n_frames)
        ds.NumberOfEnergyWindows, ds.NumberOfDetectors = n_windows, 1
        set_nm_pixels(ds, rows, cols)
        ds.CountsAccumulated = int(counts[:, c].sum(dtype=np.int64))
        ds.EnergyWindowInformationSequence = energy_window_sequence()
        ds.RadiopharmaceuticalInformationSequence = radiopharmaceutical_sequence(RADIOPHARM_START, dose_mbq, f"{NUCLIDE} (phantom)")
        detector = Dataset()
        detector.CollimatorGridName, detector.CollimatorType = COLLIMATOR, "PARA"
        detector.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
        detector.ImagePositionPatient = [ds_text(-(cols - 1) / 2 * PIXEL_MM), ds_text(-63.5 * PIXEL_MM), ds_text(Z_TOP_MM)]
        ds.DetectorInformationSequence = DicomSequence([detector])
        rotation = Dataset()
        rotation.ActualFrameDuration = unit_ms           # nominal; each frame's own duration is private
        ds.RotationInformationSequence = DicomSequence([rotation])
        ds.TypeOfDetectorMotion = "STEP AND SHOOT"
        private(ds, 0x0009, "GEMS_GENIE_1", 0x03, "FD", [1000.0 * f.duration_s for f in column] * n_windows)
        private(ds, 0x0011, "GEMS_GENIE_1", 0x3B, "FL", 1.0)
        private(ds, 0x0099, "GEHC_STARGUIDE", 0x51, "FD", [-f.pivot_xy[0] / 10.0 for f in column] * n_windows)
        private(ds, 0x0099, "GEHC_STARGUIDE", 0x52, "FD", [-f.pivot_xy[1] / 10.0 for f in column] * n_windows)
        private(ds, 0x0099, "GEHC_STARGUIDE", 0x53, "FD", [(f.angle_deg - 180.0) % 360.0 for f in column] * n_windows)
        ds.PixelData = np.ascontiguousarray(counts[:, c].reshape(-1, rows, cols), dtype="<u2").tobytes()
        folder.mkdir(parents=True, exist_ok=True)
        ds.save_as(folder / f"column{c + 1:02d}.dcm", enforce_file_format=True)


def starguide_camera(frames: list[list[Frame]]) -> dict:
    """The truth file's camera section for --camera starguide."""
    return {
        "manufacturer": MANUFACTURER, "model": MODEL, "format": "GE StarGuide (one NM TOMO file per column, private per-frame geometry)",
        "collimator": COLLIMATOR,
        "holes": {"shape": "hexagonal", "across_flats_mm": HOLE_MM, "septa_mm": SEPTA_MM, "length_mm": HOLE_LENGTH_MM,
                  "back_gap_mm": BACK_GAP_MM},
        "detector": {"material": "CZT", "thickness_mm": CRYSTAL_MM, "pixel_mm": PIXEL_MM, "pixels": [SG_PIXELS, N_PIX],
                     "energy_fwhm_at_140keV": CZT_FWHM_140, "energy_fwhm_scaling": "absolute FWHM ~ sqrt(E)",
                     "low_energy_tail": {"fraction": TAIL_FRACTION, "recorded_at_fraction_of_E": list(TAIL_RANGE),
                                         "shape": "uniform, each point with the Gaussian resolution"},
                     "absorption": "all interactions recorded (Compton escape not modelled apart from the tail)"},
        "columns": SG_COLUMNS, "pivot_radius_mm": SG_PIVOT_MM, "gantry_steps_deg": list(SG_GANTRY_DEG),
        "swivels": SG_SWIVELS, "relative_dwell": list(SG_DWELL),
        "frames": [[{"angle_deg": round(f.angle_deg, 4), "radius_mm": round(f.radius_mm, 3), "offset_mm": round(f.offset_mm, 3),
                     "start_s": round(f.start_s, 3), "duration_s": round(f.duration_s, 3)} for f in column] for column in frames],
        "scan_s": round(sum(f.duration_s for f in frames[0]), 3),
        "windows_keV": {name: [lo, hi] for name, lo, hi in WINDOWS},
        "frame_s": FRAME_S,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--nuclide", default="Lu-177",
                        help="Lu-177 (default: this file's own settings), or another nuclide (e.g. Ac-225): see use_nuclide")
    parser.add_argument("--collimator", choices=sorted(COLLIMATORS), default="MEGP",
                        help="hole geometry (default MEGP; HEGP for I-131): see COLLIMATORS")
    parser.add_argument("--camera", choices=("dual-head", "starguide"), default="dual-head",
                        help="dual-head NaI camera (default), or the CZT ring written as GE StarGuide files: see use_starguide")
    args = parser.parse_args()
    out = args.out
    starguide = args.camera == "starguide"
    if starguide:
        use_starguide()
    if args.nuclide != "Lu-177" or starguide:
        use_nuclide(args.nuclide)
    use_collimator(args.collimator)
    started = time.time()
    rng = np.random.default_rng(SEED)
    table = EnergyTable.build()
    kernels = response_kernels(collimator_transmission(rng))
    start_dose = analytic_activity_mbq()["total_MBq"] * math.exp(DECAY_PER_S * (ACQ_START - RADIOPHARM_START).total_seconds())
    if starguide:
        frames = starguide_frames()
        tomo = simulate_starguide(rng, table, kernels)
        cal = simulate_calibration(rng, table, kernels)
        write_starguide(out / "nm", tomo.counts, frames, start_dose)
    else:
        tomo = simulate_tomo(rng, table, kernels)
        cal = simulate_calibration(rng, table, kernels)
        write_nm(out / "nm" / "projections.dcm", tomo.counts, "TOMO", ACQ_START, RADIOPHARM_START, start_dose, FRAME_S,
                 [[ORBIT_MM] * N_VIEWS] * len(HEAD_START_DEG), "phantom", f"{NUCLIDE} (phantom)")
    write_nm(out / "calibration" / "point_source.dcm", cal.counts, "STATIC", CAL_ACQ, CAL_REFERENCE, CAL_ACTIVITY_MBQ, CAL_FRAME_S,
             [[CAL_DISTANCE_MM]] * len(HEAD_START_DEG), "calibration", f"{NUCLIDE} (calibration source)")
    hu = write_ct(out / "ct")
    (out / "truth").mkdir(parents=True, exist_ok=True)
    description = truth(tomo, cal, hu, time.time() - started)
    if starguide:
        description["camera"] = starguide_camera(frames)
    (out / "truth" / "phantom.json").write_text(json.dumps(description, indent=1) + "\n")
    print(json.dumps({k: description[k] for k in ("generation_s", "total_activity_MBq", "expected_counts", "calibration")}, indent=1))
    print("S/P", {k: v for k, v in description["photopeak_scatter_to_primary"].items() if k != "per_view"})
    print(description["photopeak_shares"])


if __name__ == "__main__":
    main()

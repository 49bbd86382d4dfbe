#!/usr/bin/env python3
"""Deterministic Monte Carlo of a Ga-68 TOF PET list-mode acquisition of a NEMA IEC body phantom,
written as a PETSIRD file (with its CT and ground truth).

Independent of the reconstruction: no import from ``recon``, ``quant`` or ``flows``, no voxel
projector. Photon pairs are emitted from points sampled in the analytic phantom, tracked along
straight lines through analytic shapes (exact chord lengths), scattered with Klein-Nishina and
detected where they cross the crystal ring. The phantom geometry (and the CT/NIfTI helpers) are
imported from the SPECT simulator ``simulate_lu177_iec.py`` next to this file.

Conventions (see also the README.md written with the data)
-----------------------------------------------------------
* PETSIRD gantry coordinates in mm, gantry axis = z. ``scanner.gantry_alignment`` maps gantry
  to DICOM patient LPS: identity rotation, translation (0, 0, -70) (the spheres' plane), so
  LPS = gantry + (0, 0, -70).
* 376 modules; module m sits at angle a_m = 2 pi m / 376 (counter-clockwise in gantry x-y, from
  +x); its transform is the rotation R(a_m) = ((cos a, -sin a, 0, 0), (sin a, cos a, 0, 0),
  (0, 0, 1, 0)), so the module's local first axis (radial) points to (cos a_m, sin a_m, 0).
  Each module = 16 crystals along z (element index = ring index r, centre z = (r - 7.5) * 4 mm);
  crystal box 20 (radial, local x = 240 ... 260) x 4.0106 (tangential, = 2 * 240 * tan(pi/376),
  the crystals' inner faces tile the 376-gon without gaps) x 4 mm (axial). One energy bin,
  detection_bin = ring + 16 * module. (``--rings N``: N crystals per module, centre z = (r - (N - 1) / 2)
  * 4 mm, detection_bin = ring + N * module.)
* TOF: value (t1 - t2) c / 2 in mm for detection bins (b1, b2), b1 >= b2; negative: b1's crystal
  was hit first. 35 bins of 16 mm from -280 to 280 mm; CTR 214 ps FWHM (32.08 mm).

Run: ``python data-samples/simulate_pet_iec.py`` (writes data-samples/ga68-iec-pet) and
``python data-samples/simulate_pet_iec.py --check`` (reads the file back and checks it).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter1d
from scipy.special import ndtr

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
import simulate_lu177_iec as iec  # noqa: E402  (phantom geometry, CT / NIfTI helpers)

import petsird  # noqa: E402
from petsird.helpers.create import (  # noqa: E402
    construct_lower_triangular_matrix, initialize_scanner_information_dimensions)

# --- scanner ---------------------------------------------------------------------------------
N_MOD = 376                                   # modules around the ring (one crystal column each)
N_RING = 16                                   # rings (crystals along z); --rings changes it
R_IN = 240.0                                  # inner face radius (apothem of the 376-gon), mm
DEPTH = 20.0                                  # crystal length (radial), mm
R_MID = R_IN + DEPTH / 2                      # box centres, the MC's detection surface
R_OUT = R_IN + DEPTH
AX_PITCH = 4.0                                # axial crystal size = pitch, mm
Z_HALF = N_RING * AX_PITCH / 2                # axial FOV +-32 mm (gantry)
DPHI = 2 * math.pi / N_MOD
W_TAN = 2 * R_IN * math.tan(math.pi / N_MOD)  # crystal box tangential size (4.0106 mm)
W_MID = 2 * R_MID * math.tan(math.pi / N_MOD)  # face of the 376-gon through the box centres
FACE_AREA_MID = W_MID * AX_PITCH
MU_LYSO = 0.087                               # 1/mm at 511 keV
D_MIN = 77                                    # folded module difference in coincidence: 77..188
N_SGID = N_MOD // 2 - D_MIN + 1               # SGID = min(d, 376 - d) - 77
E_LOW, E_HIGH = 435.0, 585.0                  # keV
E_RES = 0.10                                  # FWHM / E at 511 keV, scales as sqrt(E)
E_MIN_SCATTER = 350.0                         # scatter below this energy is never accepted
C_MM_PER_PS = 0.299792458                     # mm / ps
CTR_PS = 214.0
TOF_FWHM_MM = CTR_PS * C_MM_PER_PS / 2        # 32.08 mm
TOF_SIGMA_MM = TOF_FWHM_MM / (2 * math.sqrt(2 * math.log(2)))
TOF_EDGES = np.linspace(-280.0, 280.0, 36)
EFF_SPREAD = 0.05                             # crystal efficiency relative spread (gamma)

# --- nuclide, acquisition, identity ----------------------------------------------------------
HALF_LIFE_S = 4062.6
DECAY = math.log(2) / HALF_LIFE_S
BRANCHING = 0.8891
ACQ_START = datetime(2026, 11, 9, 10, 0, 0, tzinfo=timezone.utc)
INJECTION = ACQ_START - timedelta(minutes=60)
CT_TIME = ACQ_START - timedelta(minutes=3)
DURATION_S = 35
INJECTED_MBQ = 150.0
PATIENT_KG, PATIENT_M = 75.0, 1.75
SEED = 20261109

# --- phantom (imported geometry; gantry z = LPS z + 70) ----------------------------------------
Z_SHIFT = -iec.SPHERE_PLANE_Z_MM              # gantry z = LPS z + Z_SHIFT
XC, YC = iec.AXIS_XY_MM
Z_INT = (iec.Z_RANGE_MM[0] + Z_SHIFT, iec.Z_RANGE_MM[1] + Z_SHIFT)   # interior, gantry
Z_OUT = (Z_INT[0] - iec.WALL_MM, Z_INT[1] + iec.WALL_MM)
BACKGROUND_BQ_ML = 1000.0
SPHERE_BQ_ML = 10000.0
TABLE_Y = iec.TABLE_Y_MM                      # same slab as the SPECT phantom, but narrower:
TABLE_HALF_WIDTH = 120.0                      # it has to fit in a 480-mm ring
TABLE_HU = iec.HU["table"]
# linear attenuation at 511 keV (1/mm)
MU_WATER = 0.0096
MU_LUNG = MU_WATER * 0.3                      # -700 HU, as in the SPECT phantom
MU_PMMA = 0.0107
MU_TABLE = 0.0106                             # 200 HU
RANDOMS_FRACTION = 0.15                       # of prompts (expected)
CHUNK = 1_000_000

# --- variants (command-line options; defaults = the sample) ------------------------------------
LAYOUT = "columns"          # PETSIRD description: "columns" (376 modules of N_RING rings) or "blocks"
BLOCK_TAN, BLOCK_AX = 8, 4  # blocks: 8 crystal columns x 4 rings per module (47 x 4 = 188 modules)
ROTATION = 0                # gantry alignment rotated by ROTATION x 2 pi / 376 about z
Z_BAND = Z_HALF + 0.01      # slightly wider than the FOV: exact test at the detection surface



def configure(layout: str = "columns", rotation: int = 0, efficiency_spread: float = 0.05, seed: int = 20261109,
              duration_s: int = 35, phantom_shift_mm: tuple[float, float] = (0.0, 0.0), axial_offset_mm: float = 0.0,
              rings: int = 16) -> None:
    """Set the variant (module globals; call before simulating). ``layout``: how the same
    physical ring is described in PETSIRD (``blocks``: modules of 8 x 4 crystals, not columns);
    ``rotation``: gantry alignment rotation in crystal columns (LPS angle = gantry angle +
    rotation x 2 pi / 376); ``phantom_shift_mm``: phantom (and its CT and truth) moved in LPS
    x, y; ``axial_offset_mm``: the scanner's axial centre moved to LPS z = -70 + offset (the
    spheres' plane off the axial centre); ``rings``: crystals along z (axial FOV rings x 4 mm,
    centred on the scanner's axial centre; a multiple of 4 for blocks: rings / 4 axial modules)."""
    global LAYOUT, ROTATION, EFF_SPREAD, SEED, DURATION_S, Z_SHIFT, XC, YC, Z_INT, Z_OUT, N_RING, Z_HALF, Z_BAND, CT_Z_LPS
    if layout not in ("columns", "blocks"):
        raise ValueError(f"unknown layout {layout!r}")
    if rings < 1 or (layout == "blocks" and rings % BLOCK_AX):
        raise ValueError(f"rings must be positive (a multiple of {BLOCK_AX} for blocks): {rings}")
    N_RING = int(rings)
    Z_HALF = N_RING * AX_PITCH / 2
    Z_BAND = Z_HALF + 0.01
    LAYOUT, ROTATION, EFF_SPREAD, SEED, DURATION_S = layout, int(rotation) % N_MOD, efficiency_spread, seed, duration_s
    axis = (8.0 + phantom_shift_mm[0], 22.0 + phantom_shift_mm[1])   # the SPECT phantom's axis, moved
    iec.AXIS_XY_MM = axis
    iec.TRUTH_CENTRE_MM = (axis[0], axis[1] + 35.0, -100.0)
    XC, YC = axis
    Z_SHIFT = -iec.SPHERE_PLANE_Z_MM - axial_offset_mm
    Z_INT = (iec.Z_RANGE_MM[0] + Z_SHIFT, iec.Z_RANGE_MM[1] + Z_SHIFT)
    Z_OUT = (Z_INT[0] - iec.WALL_MM, Z_INT[1] + iec.WALL_MM)
    CT_Z_LPS = ct_slices_lps(-Z_HALF - Z_SHIFT, Z_HALF - Z_SHIFT)


def file_bin(b: np.ndarray) -> np.ndarray:
    """PETSIRD detection bin of the MC's crystal index b = ring + N_RING x column (column: LPS angle
    2 pi column / 376), for the layout and gantry rotation of the variant."""
    column = (b // N_RING - ROTATION) % N_MOD
    ring = b % N_RING
    if LAYOUT == "columns":
        return ring + N_RING * column
    tb, et = np.divmod(column, BLOCK_TAN)
    ab, ea = np.divmod(ring, BLOCK_AX)
    return ea * BLOCK_TAN + et + BLOCK_TAN * BLOCK_AX * (ab * (N_MOD // BLOCK_TAN) + tb)


# --- CT (own series of the PET study) ------------------------------------------------------------
CT_N = 256
CT_PIXEL_MM = 500.0 / CT_N
CT_SLICE_MM = 5.0


def ct_slices_lps(fov_lo: float, fov_hi: float) -> np.ndarray:
    """CT slice positions (LPS z, mm): every 5 mm from -200 to 0, extended to cover the axial
    field LPS z fov_lo ... fov_hi (a long scanner)."""
    lo = min(-200.0, CT_SLICE_MM * math.floor(fov_lo / CT_SLICE_MM))
    hi = max(0.0, CT_SLICE_MM * math.ceil(fov_hi / CT_SLICE_MM))
    return np.arange(lo, hi + 1e-9, CT_SLICE_MM)


CT_Z_LPS = ct_slices_lps(-Z_HALF - Z_SHIFT, Z_HALF - Z_SHIFT)


def uid(name: str) -> str:
    """A fixed UID derived from ``name``."""
    return iec.generate_uid(entropy_srcs=["theraflow", "data-samples", "ga68-iec-pet", name])


STUDY_UID = uid("study")
FOR_UID = uid("frame-of-reference")
PET_SERIES_UID = uid("pet-listmode-series")
PET_SOP_UID = uid("pet-listmode-instance")
CT_SERIES_UID = uid("ct-series")

COS = np.cos(DPHI * np.arange(N_MOD))
SIN = np.sin(DPHI * np.arange(N_MOD))


# =============================================================================================
# Physics helpers
# =============================================================================================

def kn_total(k: np.ndarray | float) -> np.ndarray | float:
    """Klein-Nishina total cross-section per electron (arbitrary units), k = E / 511 keV."""
    k = np.asarray(k, dtype=float)
    l2 = np.log1p(2 * k)
    return ((1 + k) / k**2 * (2 * (1 + k) / (1 + 2 * k) - l2 / k) + l2 / (2 * k)
            - (1 + 3 * k) / (1 + 2 * k) ** 2)


KN_511 = float(kn_total(1.0))


def mu_ratio(e_kev: np.ndarray) -> np.ndarray:
    """mu(E) / mu(511 keV), Compton (Klein-Nishina) scaling used for water, PMMA and LYSO."""
    return kn_total(e_kev / 511.0) / KN_511


def energy_acceptance(e_kev: np.ndarray | float) -> np.ndarray | float:
    """Probability that a photon depositing e_kev is measured within [E_LOW, E_HIGH]
    (Gaussian, FWHM = 10 % at 511 keV, scaling as sqrt(E))."""
    sigma = E_RES * 511.0 / (2 * math.sqrt(2 * math.log(2))) * np.sqrt(np.asarray(e_kev) / 511.0)
    return ndtr((E_HIGH - e_kev) / sigma) - ndtr((E_LOW - e_kev) / sigma)


P511 = float(energy_acceptance(511.0))
COS_MIN = 2.0 - 511.0 / E_MIN_SCATTER        # Compton: E' = 511 / (2 - cos)


def _kn_table() -> tuple[np.ndarray, np.ndarray, float]:
    """Inverse-CDF table of the Klein-Nishina angular distribution at 511 keV restricted to
    cos >= COS_MIN, and the fraction of all scatters that it holds."""
    def pdf(c):
        p = 1.0 / (2.0 - c)
        return p * p * (p + 1.0 / p - 1.0 + c * c)
    c_all = np.linspace(-1, 1, 200001)
    total = np.trapezoid(pdf(c_all), c_all)
    c = np.linspace(COS_MIN, 1.0, 20001)
    cdf = np.concatenate([[0.0], np.cumsum((pdf(c[1:]) + pdf(c[:-1])) / 2 * np.diff(c))])
    return c, cdf / cdf[-1], float(cdf[-1] / total)


KN_COS, KN_CDF, KN_FRACTION = _kn_table()


# =============================================================================================
# Ray geometry (vectorised; rays p + s u, u unit 3-D, s in mm)
# =============================================================================================

INF = np.inf


def _slab(p, u, lo_b, hi_b):
    """Parameter interval where lo_b <= p + s u <= hi_b (one coordinate)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = (lo_b - p) / u
        t2 = (hi_b - p) / u
    lo = np.minimum(t1, t2)
    hi = np.maximum(t1, t2)
    flat = np.abs(u) < 1e-14
    if np.any(flat):
        inside = (p >= lo_b) & (p <= hi_b)
        lo = np.where(flat, np.where(inside, -INF, INF), lo)
        hi = np.where(flat, np.where(inside, INF, -INF), hi)
    return lo, hi


def _disc(px, py, ux, uy, a, cx, cy, r):
    """Parameter interval inside the infinite cylinder of radius r about (cx, cy)."""
    dx = px - cx
    dy = py - cy
    b = dx * ux + dy * uy
    c = dx * dx + dy * dy - r * r
    disc = b * b - a * c
    ok = disc >= 0
    sq = np.sqrt(np.where(ok, disc, 0.0))
    return np.where(ok, (-b - sq) / a, INF), np.where(ok, (-b + sq) / a, -INF)


def _cap(lo1, hi1, lo2, hi2):
    return np.maximum(lo1, lo2), np.minimum(hi1, hi2)


def body_interval(p, u, grow: float, z_range):
    """Interval of the ray inside the IEC body prism (cross-section grown by ``grow``, z within
    z_range, gantry mm). The cross-section is convex, so this is one interval: the union of the
    half disc, two anterior quarter discs and the anterior rectangle."""
    px, py, pz = p
    ux, uy, uz = u
    a = np.maximum(ux * ux + uy * uy, 1e-300)
    r1 = iec.POSTERIOR_RADIUS_MM + grow
    r2 = iec.CORNER_RADIUS_MM + grow
    post = _slab(py, uy, YC, INF)
    ant = _slab(py, uy, -INF, YC)
    pieces = [
        _cap(*_disc(px, py, ux, uy, a, XC, YC, r1), *post),
        _cap(*_disc(px, py, ux, uy, a, XC - iec.HALF_FLAT_MM, YC, r2), *ant),
        _cap(*_disc(px, py, ux, uy, a, XC + iec.HALF_FLAT_MM, YC, r2), *ant),
        _cap(*_slab(px, ux, XC - iec.HALF_FLAT_MM, XC + iec.HALF_FLAT_MM), *_slab(py, uy, YC - r2, YC)),
    ]
    lo = np.full(px.shape, INF)
    hi = np.full(px.shape, -INF)
    for plo, phi in pieces:
        ok = plo < phi
        lo = np.where(ok, np.minimum(lo, plo), lo)
        hi = np.where(ok, np.maximum(hi, phi), hi)
    return _cap(lo, hi, *_slab(pz, uz, *z_range))


def lung_interval(p, u):
    a = np.maximum(u[0] * u[0] + u[1] * u[1], 1e-300)
    return _cap(*_disc(p[0], p[1], u[0], u[1], a, XC, YC, iec.LUNG_RADIUS_MM), *_slab(p[2], u[2], *Z_INT))


def table_interval(p, u):
    return _cap(*_slab(p[0], u[0], -TABLE_HALF_WIDTH, TABLE_HALF_WIDTH), *_slab(p[1], u[1], *TABLE_Y))


def sphere_interval(p, u, centre, radius):
    d = [p[k] - centre[k] for k in range(3)]
    b = d[0] * u[0] + d[1] * u[1] + d[2] * u[2]
    c = d[0] * d[0] + d[1] * d[1] + d[2] * d[2] - radius * radius
    disc = b * b - c
    ok = disc >= 0
    sq = np.sqrt(np.where(ok, disc, 0.0))
    return np.where(ok, -b - sq, INF), np.where(ok, -b + sq, -INF)


def media_intervals(p, u):
    """Intervals of the outer wall outline, interior, lung insert and table along the ray."""
    return (body_interval(p, u, iec.WALL_MM, Z_OUT), body_interval(p, u, 0.0, Z_INT),
            lung_interval(p, u), table_interval(p, u))


def reverse(media):
    """The same media intervals for the opposite direction (u -> -u)."""
    return tuple((-hi, -lo) for lo, hi in media)


def _fwd(iv):
    lo, hi = iv
    return np.maximum(hi - np.maximum(lo, 0.0), 0.0)


def _full(iv):
    lo, hi = iv
    return np.maximum(hi - lo, 0.0)


def tau_from(media, length=_fwd):
    """Attenuation line integral (at 511 keV) of the media intervals: forward from s = 0
    (length=_fwd) or along the whole line (length=_full)."""
    o, i, l, t = (length(iv) for iv in media)
    return MU_PMMA * (o - i) + MU_WATER * (i - l) + MU_LUNG * l + MU_TABLE * t


def sample_interaction(media, tau_star):
    """Point (ray parameter s) where the forward optical depth (511-keV mu) reaches tau_star
    (tau_star must be below the total forward optical depth)."""
    o, i, l, t = media
    bks = np.stack([np.zeros_like(tau_star)] + [x for iv in (o, i, l, t) for x in iv], axis=1)
    finite_max = np.max(np.where(np.isfinite(bks), bks, 0.0), axis=1, keepdims=True)
    bks = np.sort(np.clip(bks, 0.0, finite_max), axis=1)
    mid = (bks[:, 1:] + bks[:, :-1]) / 2
    def inside(iv):
        return (mid > iv[0][:, None]) & (mid < iv[1][:, None])
    mu = np.where(inside(l), MU_LUNG, np.where(inside(i), MU_WATER, np.where(
        inside(o), MU_PMMA, np.where(inside(t), MU_TABLE, 0.0))))
    seg = np.diff(bks, axis=1) * mu
    cum = np.concatenate([np.zeros((len(tau_star), 1)), np.cumsum(seg, axis=1)], axis=1)
    k = np.clip(np.sum(cum[:, 1:] < tau_star[:, None], axis=1), 0, seg.shape[1] - 1)
    rows = np.arange(len(tau_star))
    mu_k = mu[rows, k]
    return bks[rows, k] + (tau_star - cum[rows, k]) / np.where(mu_k > 0, mu_k, 1.0)


def circle_exit(p, u, r):
    """Ray parameter where a ray from inside leaves the cylinder of radius r about the z axis."""
    a = np.maximum(u[0] * u[0] + u[1] * u[1], 1e-300)
    b = p[0] * u[0] + p[1] * u[1]
    c = p[0] * p[0] + p[1] * p[1] - r * r
    return (-b + np.sqrt(np.maximum(b * b - a * c, 0.0))) / a


@dataclass
class Hit:
    """Where rays cross the detection surface (the 376-gon through the crystal box centres)."""

    module: np.ndarray
    ring: np.ndarray
    s: np.ndarray          # ray parameter (mm) of the crossing
    valid: np.ndarray      # crossing within the axial FOV


def ring_hit(p, u) -> Hit:
    """Crystal whose mid-depth face (plane at distance R_MID from the axis, normal along the
    module's radial axis) the ray crosses."""
    s0 = circle_exit(p, u, R_MID)
    phi = np.arctan2(p[1] + s0 * u[1], p[0] + s0 * u[0])
    m0 = np.rint(phi / DPHI).astype(np.int64)
    best_s = np.full(s0.shape, INF)
    best_m = np.zeros(s0.shape, dtype=np.int64)
    for k in (-1, 0, 1):
        m = (m0 + k) % N_MOD
        den = COS[m] * u[0] + SIN[m] * u[1]
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.where(den > 1e-12, (R_MID - (COS[m] * p[0] + SIN[m] * p[1])) / den, INF)
        better = s < best_s
        best_s = np.where(better, s, best_s)
        best_m = np.where(better, m, best_m)
    z = p[2] + best_s * u[2]
    valid = np.isfinite(best_s) & (z >= -Z_HALF) & (z < Z_HALF)
    ring = np.clip(np.floor((z + Z_HALF) / AX_PITCH), 0, N_RING - 1).astype(np.int64)
    return Hit(best_m, ring, best_s, valid)


def annulus_path(p, u):
    """Path length (mm) of the ray in the LYSO annulus R_IN <= r <= R_OUT, |z| <= Z_HALF."""
    s_in = circle_exit(p, u, R_IN)
    s_out = circle_exit(p, u, R_OUT)
    zlo, zhi = _slab(p[2], u[2], -Z_HALF, Z_HALF)
    return np.maximum(np.minimum(s_out, zhi) - np.maximum(s_in, zlo), 0.0)


def folded_difference(m1, m2):
    d = np.abs(m1 - m2)
    return np.minimum(d, N_MOD - d)


def in_coincidence(m1, m2):
    return folded_difference(m1, m2) >= D_MIN


# =============================================================================================
# Scanner efficiencies
# =============================================================================================

def box_centre(module, ring):
    """Box centre (gantry mm) of crystal (module, ring)."""
    return np.stack([R_MID * COS[module], R_MID * SIN[module], (ring - (N_RING - 1) / 2) * AX_PITCH])


FACE_QUADRATURE = 6      # midpoint rule, points per face side


def geometric_efficiency(m1, r1, m2, r2) -> np.ndarray:
    """Module-pair (geometric) efficiency of the MC for the crystal pair: the etendue / (2 pi)
    of the two mid-depth faces (integral of cos1 cos2 / D^2 over both faces) weighted by the
    two stopping probabilities in the LYSO annulus along each line, times the 511-keV energy
    window acceptance squared (midpoint rule, 6 x 6 points per face)."""
    c1 = box_centre(m1, r1)
    c2 = box_centre(m2, r2)
    off = ((np.arange(FACE_QUADRATURE) + 0.5) / FACE_QUADRATURE - 0.5)
    acc = np.zeros(c1.shape[1])
    for t1 in off:
        for z1 in off:
            p1 = c1 + np.stack([-SIN[m1] * t1 * W_MID, COS[m1] * t1 * W_MID, np.full(m1.shape, z1 * AX_PITCH)])
            for t2 in off:
                for z2 in off:
                    p2 = c2 + np.stack([-SIN[m2] * t2 * W_MID, COS[m2] * t2 * W_MID,
                                        np.full(m2.shape, z2 * AX_PITCH)])
                    d = p2 - p1
                    dist = np.sqrt(np.sum(d * d, axis=0))
                    u = d / dist
                    cos1 = -(COS[m1] * u[0] + SIN[m1] * u[1])
                    cos2 = COS[m2] * u[0] + SIN[m2] * u[1]
                    mid = (p1 + p2) / 2
                    s1 = 1 - np.exp(-MU_LYSO * annulus_path(mid, -u))
                    s2 = 1 - np.exp(-MU_LYSO * annulus_path(mid, u))
                    acc += cos1 * cos2 / dist**2 * s1 * s2
    return FACE_AREA_MID**2 * acc / FACE_QUADRATURE**4 / (2 * math.pi) * P511**2


def module_pair_table() -> np.ndarray:
    """g[sgid, r1, r2] for folded module differences D_MIN..188 (symmetric in r1, r2)."""
    d = np.arange(D_MIN, N_MOD // 2 + 1)
    dd, r1, r2 = np.meshgrid(d, np.arange(N_RING), np.arange(N_RING), indexing="ij")
    g = geometric_efficiency(dd.ravel(), r1.ravel(), np.zeros(dd.size, dtype=np.int64), r2.ravel())
    g = g.reshape(dd.shape)
    return (g + g.transpose(0, 2, 1)) / 2


def crystal_efficiencies(rng) -> np.ndarray:
    """Relative detection efficiency per detection bin: gamma, mean 1, 5 % spread."""
    k = 1 / EFF_SPREAD**2
    eps = rng.gamma(k, 1 / k, N_MOD * N_RING)
    return eps / eps.mean()


# =============================================================================================
# Activity sampling
# =============================================================================================

def cross_section_areas() -> tuple[float, float]:
    """Interior and lung cross-section areas (mm^2)."""
    interior = (math.pi * (iec.POSTERIOR_RADIUS_MM**2 + iec.CORNER_RADIUS_MM**2) / 2
                + 2 * iec.HALF_FLAT_MM * iec.CORNER_RADIUS_MM)
    return interior, math.pi * iec.LUNG_RADIUS_MM**2


def decay_integral(rate: float = DECAY) -> float:
    """Integral over the acquisition of exp(-rate t) (s)."""
    return -math.expm1(-rate * DURATION_S) / rate


def annihilations_per_mm3(conc_bq_ml: float) -> float:
    """Annihilations per mm^3 over the acquisition for a concentration at acquisition start."""
    return conc_bq_ml * 1e-3 * BRANCHING * decay_integral()


def sample_times(rng, n, rate=DECAY):
    """Emission times (s) on [0, DURATION_S] with density ~ exp(-rate t)."""
    return -np.log1p(-rng.random(n) * -math.expm1(-rate * DURATION_S)) / rate


def sample_background(rng, n, z_lo, z_hi, z_sampler=None):
    """n points uniform in the interior minus the lung insert (gantry mm), z in [z_lo, z_hi]
    or drawn by z_sampler."""
    out = []
    got = 0
    x0, x1 = XC - iec.POSTERIOR_RADIUS_MM, XC + iec.POSTERIOR_RADIUS_MM
    y0, y1 = YC - iec.CORNER_RADIUS_MM, YC + iec.POSTERIOR_RADIUS_MM
    while got < n:
        m = int((n - got) * 1.3) + 100
        x = rng.uniform(x0, x1, m)
        y = rng.uniform(y0, y1, m)
        ok = iec.inside_body(x, y) & ~iec.inside_lung(x, y)
        x, y = x[ok][: n - got], y[ok][: n - got]
        out.append((x, y))
        got += len(x)
    x = np.concatenate([o[0] for o in out])
    y = np.concatenate([o[1] for o in out])
    z = z_sampler(n) if z_sampler is not None else rng.uniform(z_lo, z_hi, n)
    return np.stack([x, y, z])


def sphere_centres_gantry():
    return [(np.array(s.centre_mm) + np.array([0, 0, Z_SHIFT]), s.diameter_mm / 2) for s in iec.spheres()]


def sample_spheres(rng, n):
    """n points with density ~ (SPHERE - BACKGROUND) inside the spheres (all equal
    concentration, so proportional to volume)."""
    sph = sphere_centres_gantry()
    vol = np.array([r**3 for _, r in sph])
    which = rng.choice(len(sph), n, p=vol / vol.sum())
    v = rng.normal(size=(3, n))
    v /= np.sqrt(np.sum(v * v, axis=0))
    rad = np.array([r for _, r in sph])[which] * rng.random(n) ** (1 / 3)
    cen = np.stack([c for c, _ in sph], axis=1)[:, which]
    return cen + v * rad


def sphere_extra_volume_mm3() -> float:
    return sum(4 / 3 * math.pi * r**3 for _, r in sphere_centres_gantry())


# =============================================================================================
# Monte Carlo: true coincidences
# =============================================================================================

@dataclass
class Events:
    """Coincidences: crystal bins (b1 >= b2), TOF value (mm, before binning), time (s) and
    (for QA) the annihilation point."""

    b1: np.ndarray
    b2: np.ndarray
    tof_mm: np.ndarray
    t: np.ndarray
    origin: np.ndarray | None = None

    @staticmethod
    def concat(parts: list["Events"]) -> "Events":
        return Events(*(np.concatenate([getattr(p, f) for p in parts], axis=-1)
                        for f in ("b1", "b2", "tof_mm", "t", "origin")))

    def __len__(self) -> int:
        return len(self.b1)


def make_events(rng, m1, r1, m2, r2, d1, d2, t, origin) -> Events:
    """Order the pair (bin1 >= bin2), TOF = (d1 - d2)/2 for photon 1 at bin (m1, r1), blurred."""
    bin1 = r1 + N_RING * m1
    bin2 = r2 + N_RING * m2
    tof = (d1 - d2) / 2 + rng.normal(0.0, TOF_SIGMA_MM, len(t))
    swap = bin1 < bin2
    return Events(np.where(swap, bin2, bin1), np.where(swap, bin1, bin2), np.where(swap, -tof, tof), t, origin)


def uz_from_tan(t):
    return t / np.sqrt(1 + t * t)


def transverse_distance(p, cphi, sphi, r=R_MID):
    """Transverse distance from p to the cylinder of radius r along direction (cphi, sphi)."""
    b = p[0] * cphi + p[1] * sphi
    c = p[0] ** 2 + p[1] ** 2 - r * r
    return -b + np.sqrt(b * b - c)


def chunk_tasks(component: int, counts: dict[str, int]) -> list[tuple[str, int, np.random.SeedSequence]]:
    """Split Poisson candidate counts into chunks, each with its own seed (results do not depend
    on how many worker processes run them)."""
    tasks = []
    for k, (kind, n_total) in enumerate(counts.items()):
        for c, start in enumerate(range(0, n_total, CHUNK)):
            tasks.append((kind, min(CHUNK, n_total - start), np.random.SeedSequence([SEED, component, k, c])))
    return tasks


def run_tasks(func, tasks, *args):
    """Run func(task, *args) for all tasks, on up to WORKERS processes, results in task order."""
    if WORKERS > 1 and len(tasks) > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(WORKERS) as pool:
            return pool.starmap(func, [(t,) + args for t in tasks])
    return [func(t, *args) for t in tasks]


WORKERS = 2


def trues_bound() -> float:
    rho_max = math.hypot(XC, YC) + iec.POSTERIOR_RADIUS_MM
    return math.sin(math.atan(2 * Z_BAND / (2 * math.sqrt(R_MID**2 - rho_max**2)))) * 1.001


def trues_z_range() -> tuple[float, float]:
    """Gantry z range (mm) of the background annihilations that can give trues: the band
    |z| <= Z_BAND within the phantom's interior (the band itself on a short scanner)."""
    return max(-Z_BAND, Z_INT[0]), min(Z_BAND, Z_INT[1])


def simulate_trues(rng, eps, eps_max, stats) -> Events:
    """Unscattered coincidences. Annihilations in the axial FOV; the photon direction is drawn
    uniformly among those whose both photons cross the detection surface within the axial FOV
    (exact band in u_z for the sampled azimuth; the band's probability thins the candidates);
    both photons escape unscattered with probability exp(-tau), are stopped in the LYSO with
    probability 1 - exp(-mu L), pass the energy window and the crystal efficiencies."""
    interior, lung = cross_section_areas()
    w_max = trues_bound()
    z_lo, z_hi = trues_z_range()
    lam_bg = annihilations_per_mm3(BACKGROUND_BQ_ML) * (interior - lung) * (z_hi - z_lo)
    lam_sph = annihilations_per_mm3(SPHERE_BQ_ML - BACKGROUND_BQ_ML) * sphere_extra_volume_mm3()
    n_bg = int(rng.poisson(lam_bg * w_max))
    n_sph = int(rng.poisson(lam_sph * w_max))
    stats.update(trues_annihilations_in_slab=lam_bg + lam_sph, trues_candidates=n_bg + n_sph,
                 trues_band_bound=w_max)
    tasks = chunk_tasks(1, {"bg": n_bg, "sph": n_sph})
    return Events.concat(run_tasks(_trues_chunk, tasks, eps, eps_max))


def _trues_chunk(task, eps, eps_max) -> Events:
    kind, n, seed = task
    rng = np.random.Generator(np.random.PCG64(seed))
    w_max = trues_bound()
    p = sample_background(rng, n, *trues_z_range()) if kind == "bg" else sample_spheres(rng, n)
    phi = rng.uniform(0, 2 * math.pi, n)
    cphi, sphi = np.cos(phi), np.sin(phi)
    s1 = transverse_distance(p, cphi, sphi)
    s2 = transverse_distance(p, -cphi, -sphi)
    t_lo = np.maximum((-Z_BAND - p[2]) / s1, (p[2] - Z_BAND) / s2)
    t_hi = np.minimum((Z_BAND - p[2]) / s1, (p[2] + Z_BAND) / s2)
    u_lo, u_hi = uz_from_tan(t_lo), uz_from_tan(t_hi)
    w = np.maximum(u_hi - u_lo, 0.0) / 2
    if np.any(w > w_max):
        raise RuntimeError("trues band bound violated")
    keep = rng.random(n) * w_max < w
    p, cphi, sphi, u_lo, u_hi = p[:, keep], cphi[keep], sphi[keep], u_lo[keep], u_hi[keep]
    uz = rng.uniform(u_lo, u_hi)
    st = np.sqrt(1 - uz * uz)
    u = np.stack([st * cphi, st * sphi, uz])
    h1 = ring_hit(p, u)
    h2 = ring_hit(p, -u)
    ok = h1.valid & h2.valid
    med = media_intervals(p, u)
    tau = tau_from(med) + tau_from(reverse(med))
    stop = (1 - np.exp(-MU_LYSO * annulus_path(p, u))) * (1 - np.exp(-MU_LYSO * annulus_path(p, -u)))
    e1 = eps[h1.ring + N_RING * h1.module] / eps_max
    e2 = eps[h2.ring + N_RING * h2.module] / eps_max
    prob = np.exp(-tau) * stop * P511**2 * e1 * e2
    ok &= rng.random(len(prob)) < prob
    ok &= in_coincidence(h1.module, h2.module)
    idx = np.nonzero(ok)[0]
    return make_events(rng, h1.module[idx], h1.ring[idx], h2.module[idx], h2.ring[idx],
                       h1.s[idx], h2.s[idx], sample_times(rng, len(idx)), p[:, idx])


# =============================================================================================
# Monte Carlo: single-scatter coincidences
# =============================================================================================

def single_band_weight(z0, s):
    """Probability that an isotropic photon with transverse distance s to the detection
    surface crosses it within |z| <= Z_BAND, given its azimuth."""
    return (uz_from_tan((Z_BAND - z0) / s) - uz_from_tan((-Z_BAND - z0) / s)) / 2


def z_bound_table(cell=1.0):
    """Piecewise-constant upper bound of single_band_weight over the phantom for z cells."""
    rho_max = math.hypot(XC, YC) + iec.POSTERIOR_RADIUS_MM
    s = np.linspace(R_MID - rho_max, R_MID + rho_max, 800)
    edges = np.arange(Z_INT[0], Z_INT[1] + cell / 2, cell)
    zz = np.linspace(0, 1, 9)
    bound = np.empty(len(edges) - 1)
    for k in range(len(edges) - 1):
        z = edges[k] + zz * cell
        bound[k] = single_band_weight(z[:, None], s[None, :]).max()
    return edges, np.minimum(bound * 1.02 + 1e-4, 1.0)


def simulate_scatter(rng, eps, eps_max, stats) -> tuple[Events, np.ndarray]:
    """Coincidences of one unscattered photon and one photon Compton-scattered once in the
    phantom or table. The unscattered photon's direction is drawn among those crossing the
    detection surface within the FOV (exact band, as for trues; both photons of each pair can
    play either role, hence 2 x annihilations). The other photon interacts at a point drawn from
    mu(s) exp(-tau(s)) along its path, scatters with the Klein-Nishina angle
    (E' = 511 / (2 - cos)), and reaches the detector if it escapes (mu scaled to E').
    Returns the events and the histogram of unscattered singles (per detection bin)."""
    interior, lung = cross_section_areas()
    edges, bound = z_bound_table()
    cdf = np.concatenate([[0.0], np.cumsum(bound * np.diff(edges))])
    lam_bg = 2 * annihilations_per_mm3(BACKGROUND_BQ_ML) * (interior - lung) * cdf[-1]
    lam_sph = 2 * annihilations_per_mm3(SPHERE_BQ_ML - BACKGROUND_BQ_ML) * sphere_extra_volume_mm3() * bound.max()
    n_bg, n_sph = int(rng.poisson(lam_bg)), int(rng.poisson(lam_sph))
    tasks = chunk_tasks(2, {"bg": n_bg, "sph": n_sph})
    results = run_tasks(_scatter_chunk, tasks, eps, eps_max, edges, bound, cdf)
    counters = np.sum([r[2] for r in results], axis=0)
    stats.update(scatter_candidates=n_bg + n_sph, kn_fraction_accepted_angles=KN_FRACTION,
                 scatter_after_band=int(counters[0]), scatter_partner_detected=int(counters[1]),
                 scatter_interacting=int(counters[2]))
    return Events.concat([r[0] for r in results]), np.sum([r[1] for r in results], axis=0)


def _scatter_chunk(task, eps, eps_max, edges, bound, cdf):
    kind, n, seed = task
    rng = np.random.Generator(np.random.PCG64(seed))
    counters = np.zeros(3, dtype=np.int64)
    singles = np.zeros(N_MOD * N_RING)

    def z_sampler(m):
        v = rng.random(m) * cdf[-1]
        k = np.clip(np.searchsorted(cdf, v, side="right") - 1, 0, len(bound) - 1)
        return edges[k] + (v - cdf[k]) / bound[k]

    if kind == "bg":
        p = sample_background(rng, n, 0, 0, z_sampler)
        cell = np.clip(np.floor((p[2] - edges[0]) / (edges[1] - edges[0])).astype(np.int64), 0, len(bound) - 1)
        wb = bound[cell]
    else:
        p = sample_spheres(rng, n)
        wb = np.full(n, bound.max())
    phi = rng.uniform(0, 2 * math.pi, n)
    cphi, sphi = np.cos(phi), np.sin(phi)
    s1 = transverse_distance(p, cphi, sphi)
    w = single_band_weight(p[2], s1)
    if np.any(w > wb):
        raise RuntimeError("scatter band bound violated")
    keep = rng.random(n) * wb < w
    counters[0] = keep.sum()
    p, cphi, sphi, s1 = p[:, keep], cphi[keep], sphi[keep], s1[keep]
    uz = rng.uniform(uz_from_tan((-Z_BAND - p[2]) / s1), uz_from_tan((Z_BAND - p[2]) / s1))
    st = np.sqrt(1 - uz * uz)
    u = np.stack([st * cphi, st * sphi, uz])
    # unscattered photon: escape, stop, energy window, efficiency
    hp = ring_hit(p, u)
    bin_p = hp.ring + N_RING * hp.module
    med = media_intervals(p, u)
    prob = (np.exp(-tau_from(med)) * (1 - np.exp(-MU_LYSO * annulus_path(p, u)))
            * P511 * eps[bin_p] / eps_max)
    ok = hp.valid & (rng.random(len(prob)) < prob)
    np.add.at(singles, bin_p[ok], 1.0)
    idx = np.nonzero(ok)[0]
    counters[1] = len(idx)
    p, u, hp, bin_p = p[:, idx], u[:, idx], Hit(*(x[idx] for x in (hp.module, hp.ring, hp.s, hp.valid))), bin_p[idx]
    # the other photon interacts in the phantom (and scatters into the accepted angles)
    v = -u
    med = reverse(tuple((lo[idx], hi[idx]) for lo, hi in med))
    p_int = -np.expm1(-tau_from(med))
    idx = np.nonzero(rng.random(len(p_int)) < p_int * KN_FRACTION)[0]
    counters[2] = len(idx)
    p, v, hp, p_int = p[:, idx], v[:, idx], Hit(*(x[idx] for x in (hp.module, hp.ring, hp.s, hp.valid))), p_int[idx]
    med = tuple((lo[idx], hi[idx]) for lo, hi in med)
    tau_star = -np.log1p(-rng.random(len(idx)) * p_int)
    s_sc = sample_interaction(med, tau_star)
    q = p + v * s_sc
    cos_t = np.interp(rng.random(len(idx)), KN_CDF, KN_COS)
    sin_t = np.sqrt(np.maximum(1 - cos_t**2, 0.0))
    psi = rng.uniform(0, 2 * math.pi, len(idx))
    helper = np.where(np.abs(v[2]) < 0.9, 1.0, 0.0)
    a_vec = np.stack([1.0 - helper, np.zeros_like(helper), helper])
    e1 = np.cross(a_vec, v, axis=0)
    e1 /= np.sqrt(np.sum(e1 * e1, axis=0))
    e2 = np.cross(v, e1, axis=0)
    v2 = cos_t * v + sin_t * (np.cos(psi) * e1 + np.sin(psi) * e2)
    energy = 511.0 / (2.0 - cos_t)
    hs = ring_hit(q, v2)
    bin_s = hs.ring + N_RING * hs.module
    ratio = mu_ratio(energy)
    prob = (np.exp(-ratio * tau_from(media_intervals(q, v2)))
            * (1 - np.exp(-MU_LYSO * ratio * annulus_path(q, v2)))
            * energy_acceptance(energy) * eps[bin_s] / eps_max)
    ok = hs.valid & (rng.random(len(prob)) < prob) & in_coincidence(hp.module, hs.module)
    j = np.nonzero(ok)[0]
    d_s = s_sc[j] + hs.s[j]
    ev = make_events(rng, hs.module[j], hs.ring[j], hp.module[j], hp.ring[j],
                     d_s, hp.s[j], sample_times(rng, len(j)), p[:, j])
    return ev, singles, counters


# =============================================================================================
# Randoms and delayeds
# =============================================================================================

def singles_model(singles_hist: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """Per-crystal singles rate shape: efficiency x smoothed ring profile x smoothed module
    profile of the unscattered singles detected by the MC."""
    h = singles_hist.reshape(N_MOD, N_RING)
    ring = gaussian_filter1d(h.sum(axis=0), 1.0, mode="nearest")
    module = gaussian_filter1d(h.sum(axis=1), 4.0, mode="wrap")
    s = (module[:, None] * ring[None, :]).ravel() * eps
    return s / s.sum()


def simulate_randoms(rng, n_mean: float, singles: np.ndarray) -> Events:
    """Poisson(n_mean) accidental coincidences: crystal pairs drawn with probability ~ S_i S_j
    among pairs in coincidence, TOF uniform over the coincidence window (all bins), times with
    density ~ A(t)^2."""
    n = rng.poisson(n_mean)
    cdf = np.cumsum(singles)
    cdf /= cdf[-1]
    b1, b2 = [], []
    got = 0
    while got < n:
        m = int((n - got) * 1.2) + 100
        i = np.searchsorted(cdf, rng.random(m))
        j = np.searchsorted(cdf, rng.random(m))
        ok = in_coincidence(i // N_RING, j // N_RING)
        i, j = i[ok][: n - got], j[ok][: n - got]
        b1.append(i)
        b2.append(j)
        got += len(i)
    i = np.concatenate(b1).astype(np.int64)
    j = np.concatenate(b2).astype(np.int64)
    tof = rng.uniform(TOF_EDGES[0], TOF_EDGES[-1], n)
    t = sample_times(rng, n, 2 * DECAY)
    return Events(np.maximum(i, j), np.minimum(i, j), tof, t, np.full((3, n), np.nan))


# =============================================================================================
# PETSIRD header and writing
# =============================================================================================

def code(value, scheme, meaning):
    return petsird.DICOMBasicCodeSequence(code_value=value, coding_scheme_designator=scheme, code_meaning=meaning)


def _rz(angle: float, translation: tuple[float, float, float]) -> petsird.RigidTransformation:
    """Rotation by ``angle`` about z followed by ``translation`` [mm]."""
    c, s = math.cos(angle), math.sin(angle)
    return petsird.RigidTransformation(matrix=np.array(
        ((c, -s, 0, translation[0]), (s, c, 0, translation[1]), (0, 0, 1, translation[2])), dtype=np.float32))


def _block_pair_tables(g_fold: np.ndarray):
    """SGID lookup table and module-pair factors of the block layout: one SGID per (tangential
    block difference mod 47, axial block of the higher module, of the lower one) with any pair
    in coincidence; factor[e1][e2] = g of the crystal pair (e1 of the higher module)."""
    n_tb, per = N_MOD // BLOCK_TAN, BLOCK_TAN * BLOCK_AX
    ea, et = np.divmod(np.arange(per), BLOCK_TAN)
    n_modules = n_tb * (N_RING // BLOCK_AX)
    keys: dict[tuple[int, int, int], int] = {}
    tables = []
    lut = construct_lower_triangular_matrix(n_modules, dtype=int, value=-1)
    for m1 in range(n_modules):
        ab1, tb1 = divmod(m1, n_tb)
        for m2 in range(m1 + 1):
            ab2, tb2 = divmod(m2, n_tb)
            key = ((tb1 - tb2) % n_tb, ab1, ab2)
            if key not in keys:
                fd = folded_difference((key[0] * BLOCK_TAN + et)[:, None], et[None, :])
                table = g_fold[fd, (ab1 * BLOCK_AX + ea)[:, None], (ab2 * BLOCK_AX + ea)[None, :]]
                keys[key] = len(tables) if table.any() else -1
                if table.any():
                    tables.append(table.astype(np.float32))
            lut[m1][m2] = keys[key]
    return lut, tables


def make_header(eps: np.ndarray, g: np.ndarray, calibration: float) -> petsird.Header:
    corners = [(0, 0, 0), (0, 0, AX_PITCH), (0, W_TAN, AX_PITCH), (0, W_TAN, 0),
               (DEPTH, 0, 0), (DEPTH, 0, AX_PITCH), (DEPTH, W_TAN, AX_PITCH), (DEPTH, W_TAN, 0)]
    crystal = petsird.BoxSolidVolume(shape=petsird.BoxShape(corners=[
        petsird.Coordinate(c=np.array(c, dtype=np.float32)) for c in corners]), material_id=0)
    elements = petsird.ReplicatedBoxSolidVolume(object=crystal)
    modules = petsird.ReplicatedDetectorModule(object=petsird.DetectorModule(detecting_elements=elements))
    if LAYOUT == "columns":
        for r in range(N_RING):
            elements.transforms.append(_rz(0.0, (R_IN, -W_TAN / 2, (r - N_RING / 2) * AX_PITCH)))
        for m in range(N_MOD):
            modules.transforms.append(_rz(DPHI * m, (0.0, 0.0, 0.0)))
    else:  # blocks of BLOCK_TAN columns x BLOCK_AX rings, element = ea x BLOCK_TAN + et
        for ea in range(BLOCK_AX):
            for et in range(BLOCK_TAN):
                a = DPHI * et
                elements.transforms.append(_rz(a, (R_IN * math.cos(a) + W_TAN / 2 * math.sin(a),
                                                   R_IN * math.sin(a) - W_TAN / 2 * math.cos(a), ea * AX_PITCH)))
        for ab in range(N_RING // BLOCK_AX):
            for tb in range(N_MOD // BLOCK_TAN):
                modules.transforms.append(_rz(DPHI * BLOCK_TAN * tb, (0.0, 0.0, (ab * BLOCK_AX - N_RING / 2) * AX_PITCH)))
    scanner = petsird.ScannerInformation(
        model_name=f"THERAFLOW-SIM-DPET-376x{N_RING}",
        scanner_geometry=petsird.ScannerGeometry(replicated_modules=[modules]),
        bulk_materials=[petsird.BulkMaterial(id=0, name="LYSO", density=7.1)],
        gantry_alignment=_rz(DPHI * ROTATION, (0.0, 0.0, -Z_SHIFT)),
        collimator_type="NONE")
    initialize_scanner_information_dimensions(scanner, 1, allocate_detection_bin_efficiencies=True,
                                              allocate_module_pair_efficiencies=True)
    scanner.tof_bin_edges[0][0] = petsird.BinEdges(edges=TOF_EDGES.astype(np.float32))
    scanner.tof_resolution[0][0] = TOF_FWHM_MM
    scanner.event_energy_bin_edges[0] = petsird.BinEdges(edges=np.array([E_LOW, E_HIGH], dtype=np.float32))
    scanner.energy_resolution_at_511[0] = E_RES
    scanner.prompt_event_policy = petsird.CoincidencePolicy.REJECT_HIGHER_MULTIPLES
    scanner.delayed_event_policy = petsird.CoincidencePolicy.REJECT_HIGHER_MULTIPLES
    scanner.single_event_policy = petsird.SingleEventPolicy.NONE
    scanner.triple_event_policy = petsird.TripleEventPolicy.NONE
    scanner.quadruple_event_policy = petsird.QuadrupleEventPolicy.NONE
    eff = scanner.detection_efficiencies
    eff.method_description = (
        "simulate_pet_iec.py: detection_bin_efficiencies = simulated relative crystal efficiencies "
        "(gamma, mean 1, 5 % spread; the MC accepts a pair with probability e_i e_j / max(e)^2); "
        "module-pair efficiencies = geometric factor of the MC for the crystal pair: "
        "etendue / (2 pi) of the two mid-depth faces (4.1776 x 4 mm^2, integral of cos1 cos2 / D^2, "
        "6 x 6 points per face) weighted by the LYSO stopping probabilities along each line (mu 0.087/mm, "
        "path in the 20-mm annulus) x 511-keV energy-window acceptance^2; SGID = min(d, 376 - d) - 77 for module difference d, -1 (not in coincidence) "
        "below 77; calibration_factor = 1 / max(e)^2 (no residual MC/analytic correction).")
    eff.calibration_factor = calibration
    eps_file = np.empty_like(eps)
    eps_file[file_bin(np.arange(N_MOD * N_RING))] = eps
    eff.detection_bin_efficiencies[0] = [float(x) for x in eps_file.astype(np.float32)]
    if LAYOUT == "columns":
        lut = construct_lower_triangular_matrix(N_MOD, dtype=int, value=-1)
        for m1 in range(N_MOD):
            for m2 in range(m1 + 1):
                d = min(m1 - m2, N_MOD - (m1 - m2))
                lut[m1][m2] = d - D_MIN if d >= D_MIN else -1
        tables = list(g.astype(np.float32))
    else:
        lut, tables = _block_pair_tables(g_fold_from_table(g))
    eff.module_pair_sgidlut[0][0] = lut
    eff.module_pair_efficiencies_vectors[0][0] = [
        petsird.ModulePairEfficiencies(values=[[float(x) for x in row] for row in table], sgid=k)
        for k, table in enumerate(tables)]

    radiopharm = petsird.DICOMRadiopharmaceuticalInformation(
        radiopharmaceutical_start_date_time=petsird.DateTime.from_datetime(INJECTION),
        radiopharmaceutical_stop_date_time=petsird.DateTime.from_datetime(INJECTION + timedelta(seconds=30)),
        radionuclide_total_dose=INJECTED_MBQ,
        radiopharmaceutical_administration_event_uid=uid("administration"),
        radiopharmaceutical_code_sequence=code("C118961", "NCIt", "PSMA-11 Ga^68^"),
        radionuclide_code_sequence=code("35337001", "SCT", "^68^Gallium"))
    exam = petsird.ExamInformation(
        modality="PT", study_instance_uid=STUDY_UID, series_instance_uid=PET_SERIES_UID,
        sop_instance_uid=PET_SOP_UID, frame_of_reference_uid=FOR_UID,
        start_of_study=petsird.DateTime.from_datetime(CT_TIME),
        start_of_acquisition=petsird.DateTime.from_datetime(ACQ_START),
        patient=petsird.DICOMPatientInformation(patient_id="PHANTOM-PET", patients_sex="M",
                                                patients_size=PATIENT_M, patients_weight=PATIENT_KG,
                                                patients_body_mass_index=PATIENT_KG / PATIENT_M**2),
        radiopharmaceuticals=[radiopharm])
    po = exam.patient_orientation
    po.patient_orientation_code_sequence = code("102538003", "SCT", "recumbent")
    po.patient_orientation_modifier_code_sequence = code("40199007", "SCT", "supine")
    po.patient_gantry_relationship_code_sequence = code("102540008", "SCT", "headfirst")
    return petsird.Header(exam=exam, scanner=scanner)


def to_file(ev: Events) -> Events:
    """The events with PETSIRD detection bins of the variant (file_bin), ordered bin1 >= bin2 (TOF
    sign flipped where the order changes)."""
    f1, f2 = file_bin(ev.b1), file_bin(ev.b2)
    swap = f1 < f2
    return Events(np.where(swap, f2, f1), np.where(swap, f1, f2), np.where(swap, -ev.tof_mm, ev.tof_mm), ev.t, ev.origin)


def tof_index(tof_mm: np.ndarray) -> np.ndarray:
    return np.searchsorted(TOF_EDGES, tof_mm, side="right") - 1


def write_petsird(path: Path, header, prompts: Events, delayeds: Events) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pb = np.floor(prompts.t).astype(np.int64)
    db = np.floor(delayeds.t).astype(np.int64)
    p_order = np.lexsort((prompts.t, pb))
    d_order = np.lexsort((delayeds.t, db))
    p_idx = tof_index(prompts.tof_mm)
    d_idx = tof_index(delayeds.tof_mm)
    p_split = np.searchsorted(pb[p_order], np.arange(DURATION_S + 1))
    d_split = np.searchsorted(db[d_order], np.arange(DURATION_S + 1))

    def events(ev, order, idx, lo, hi):
        sel = order[lo:hi]
        return [petsird.CoincidenceEvent(detection_bins=[int(a), int(b)], tof_idx=int(k))
                for a, b, k in zip(ev.b1[sel], ev.b2[sel], idx[sel])]

    def blocks():
        for k in range(DURATION_S):
            yield petsird.TimeBlock.EventTimeBlock(petsird.EventTimeBlock(
                time_interval=petsird.TimeInterval(start=1000 * k, stop=1000 * (k + 1)),
                prompt_events=[[events(prompts, p_order, p_idx, p_split[k], p_split[k + 1])]],
                delayed_events=[[events(delayeds, d_order, d_idx, d_split[k], d_split[k + 1])]]))

    with open(path, "wb") as f, petsird.BinaryPETSIRDWriter(f) as writer:
        writer.write_header(header)
        writer.write_time_blocks(blocks())


# =============================================================================================
# Expected trues from the stored efficiencies (analytic line integrals)
# =============================================================================================

def expected_trues_by_lor(eps, lut_g_fold, calibration, box=None):
    """Expected true unscattered coincidences predicted by the PETSIRD efficiency model:
    sum over crystal pairs in coincidence of cal * e_i e_j * g_ij * (line integral of
    annihilations/mm^3 between the box centres) * exp(-line integral of mu). Returns totals by
    folded module difference [d] and by |ring difference| [0..15] and the total.
    lut_g_fold: g[folded difference 0..188, r1, r2] (0 where not in coincidence).
    box: optional (centres[bin, 3]) to take crystal centres from the file header."""
    rho_bg = annihilations_per_mm3(BACKGROUND_BQ_ML)
    rho_extra = annihilations_per_mm3(SPHERE_BQ_ML - BACKGROUND_BQ_ML)
    sph = sphere_centres_gantry()
    m1_all, m2_all = np.tril_indices(N_MOD, -1)
    keep = folded_difference(m1_all, m2_all) >= D_MIN
    m1_all, m2_all = m1_all[keep], m2_all[keep]
    r1, r2 = np.meshgrid(np.arange(N_RING), np.arange(N_RING), indexing="ij")
    r1, r2 = r1.ravel(), r2.ravel()
    eps2 = eps.reshape(N_MOD, N_RING)
    by_d = np.zeros(N_MOD // 2 + 1)
    by_dr = np.zeros(N_RING)
    for start in range(0, len(m1_all), 2000):
        m1 = np.repeat(m1_all[start:start + 2000], N_RING * N_RING)
        m2 = np.repeat(m2_all[start:start + 2000], N_RING * N_RING)
        ra = np.tile(r1, len(m1) // len(r1))
        rb = np.tile(r2, len(m1) // len(r2))
        if box is None:
            c1, c2 = box_centre(m1, ra), box_centre(m2, rb)
        else:
            c1, c2 = box[ra + N_RING * m1].T, box[rb + N_RING * m2].T
        d = c2 - c1
        u = d / np.sqrt(np.sum(d * d, axis=0))
        med = media_intervals(c1, u)
        tau = tau_from(med, _full)
        o, i, l, t = (_full(iv) for iv in med)
        act = rho_bg * (i - l)
        near = np.zeros(len(m1), dtype=bool)
        for cen, rad in sph:
            w = cen[:, None] - c1
            b = np.sum(w * u, axis=0)
            perp2 = np.sum(w * w, axis=0) - b * b
            hit = perp2 < rad * rad
            act = act + rho_extra * np.where(hit, 2 * np.sqrt(np.maximum(rad * rad - perp2, 0)), 0.0)
            near |= hit
        fd = folded_difference(m1, m2)
        val = calibration * eps2[m1, ra] * eps2[m2, rb] * lut_g_fold[fd, ra, rb] * act * np.exp(-tau)
        by_d += np.bincount(fd, val, minlength=len(by_d))
        by_dr += np.bincount(np.abs(ra - rb), val, minlength=N_RING)
    return by_d, by_dr, float(by_d.sum())


def g_fold_from_table(g):
    out = np.zeros((N_MOD // 2 + 1, N_RING, N_RING))
    out[D_MIN:] = g
    return out


# =============================================================================================
# CT, truth, README
# =============================================================================================

def inside_pet_table(x, y):
    return (np.abs(x) <= TABLE_HALF_WIDTH) & (y >= TABLE_Y[0]) & (y <= TABLE_Y[1])


def pet_materials(grid) -> "iec.Materials":
    """Material fractions of the PET phantom on an LPS grid (the SPECT phantom with the
    narrower table)."""
    interior_z = iec.interval_fraction(grid, *iec.Z_RANGE_MM)
    outer_z = iec.interval_fraction(grid, iec.Z_RANGE_MM[0] - iec.WALL_MM, iec.Z_RANGE_MM[1] + iec.WALL_MM)
    interior = iec.area_fraction(iec.inside_body, grid)
    outer = iec.area_fraction(iec.inside_wall_outline, grid)
    lung = iec.area_fraction(iec.inside_lung, grid)
    table = iec.area_fraction(inside_pet_table, grid)
    return iec.Materials(water=(interior - lung)[:, :, None] * interior_z, lung=lung[:, :, None] * interior_z,
                         pmma=outer[:, :, None] * outer_z - interior[:, :, None] * interior_z,
                         table=np.repeat(table[:, :, None], grid.shape[2], axis=2))


SUBJECT = iec.Subject("PHANTOM^IEC^PET", "PHANTOM-PET", STUDY_UID, FOR_UID, CT_TIME.replace(tzinfo=None), "1")


def write_ct(folder: Path) -> None:
    """CT of the PET study (own series, same study and frame of reference as the list mode),
    RLE lossless, 256 x 256 x 1.953 mm, 5-mm slices, instance 1 = most superior."""
    origin = np.array([-(CT_N - 1) / 2 * CT_PIXEL_MM, -(CT_N - 1) / 2 * CT_PIXEL_MM, CT_Z_LPS[0]])
    grid = iec.Grid(origin, np.eye(3), (CT_PIXEL_MM, CT_PIXEL_MM, CT_SLICE_MM), (CT_N, CT_N, len(CT_Z_LPS)))
    hu = np.round(pet_materials(grid).hounsfield())
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("CT*.dcm"):
        old.unlink()
    t = CT_TIME.replace(tzinfo=None)
    for number, k in enumerate(np.argsort(-CT_Z_LPS), start=1):
        z = float(CT_Z_LPS[k])
        ds = iec.new_dataset(iec.CT_STORAGE, uid(f"ct-image-{k}"))
        iec.add_common_modules(ds, SUBJECT, "CT", CT_SERIES_UID, 2, t, "Ga68 IEC CTAC")
        ds.PatientSex = "M"
        ds.PatientWeight = iec.ds_str(PATIENT_KG)
        ds.PatientSize = iec.ds_str(PATIENT_M)
        ds.StudyDescription = "Ga68 IEC phantom PET/CT (simulated)"
        ds.Manufacturer = "theraflow"
        ds.ManufacturerModelName = f"SIM-DPET-376x{N_RING}"
        ds.StationName = "SIMPET"
        ds.SoftwareVersions = "simulate_pet_iec.py"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientPosition = "HFS"
        ds.InstanceNumber = number
        ds.AcquisitionNumber = 1
        ds.AcquisitionDate = ds.ContentDate = t.strftime("%Y%m%d")
        ds.AcquisitionTime = ds.ContentTime = t.strftime("%H%M%S")
        ds.KVP = "120"
        ds.XRayTubeCurrent = 80
        ds.ConvolutionKernel = "STANDARD"
        ds.PixelSpacing = [iec.ds_str(CT_PIXEL_MM, 6), iec.ds_str(CT_PIXEL_MM, 6)]
        ds.SliceThickness = iec.ds_str(CT_SLICE_MM)
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.ImagePositionPatient = [iec.ds_str(origin[0], 6), iec.ds_str(origin[1], 6), iec.ds_str(z)]
        ds.SliceLocation = iec.ds_str(z)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = CT_N, CT_N
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = iec.ds_str(iec.CT_INTERCEPT)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        stored = (hu[:, :, k].T - iec.CT_INTERCEPT).astype(np.uint16)
        ds.compress(iec.RLELossless, stored, generate_instance_uid=False)
        iec.save(ds, folder / f"CT{number:04d}.dcm")


def write_truth(out: Path) -> float:
    """Truth NIfTIs; returns the activity (Bq) summed over the truth image."""
    grid = iec.truth_grid()
    activity = iec.concentration_bq_ml(grid, iec.material_fractions(grid), BACKGROUND_BQ_ML,
                                       (SPHERE_BQ_ML,) * 6).astype(np.float32)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    iec.write_nifti(activity, grid, out / "truth" / "activity.nii.gz")
    iec.write_nifti(iec.sphere_labels(grid), grid, out / "truth" / "spheres.nii.gz")
    return float(activity.sum(dtype=np.float64)) * grid.voxel_ml


def activity_in_fov_mbq() -> float:
    interior, lung = cross_section_areas()
    z_lo, z_hi = max(-Z_HALF, Z_INT[0]), min(Z_HALF, Z_INT[1])
    return (BACKGROUND_BQ_ML * (interior - lung) * (z_hi - z_lo) * 1e-3
            + (SPHERE_BQ_ML - BACKGROUND_BQ_ML) * sphere_extra_volume_mm3() * 1e-3) * 1e-6


def phantom_json(counts: dict, checks: dict, eps_max: float, calibration: float, file_bytes: int) -> dict:
    vols = iec.analytic_volumes_ml()
    total_mbq = (BACKGROUND_BQ_ML * vols["background"] + SPHERE_BQ_ML * vols["spheres"]) * 1e-6
    a_acq = INJECTED_MBQ * math.exp(-DECAY * (ACQ_START - INJECTION).total_seconds())
    suv_scale = a_acq * 1e6 / (PATIENT_KG * 1000.0)   # Bq/mL per SUV unit (1 g/mL)
    return {
        "description": "Simulated Ga-68 TOF PET list mode (PETSIRD) of a NEMA IEC body phantom (simulate_pet_iec.py)",
        "coordinates": {
            "patient": "DICOM patient LPS, mm (x -> patient left, y -> posterior, z -> head)",
            "gantry": "PETSIRD gantry mm; gantry axis = z = LPS z axis through x = y = 0",
            "gantry_to_LPS": "LPS = gantry + (0, 0, -70) (scanner.gantry_alignment, identity rotation)",
        },
        "reference_datetime": ACQ_START.isoformat(),
        "datetimes_note": "PETSIRD DateTimes are UTC; the CT's DICOM dates/times carry the same wall-clock values",
        "nuclide": {"name": "Ga-68", "half_life_s": HALF_LIFE_S, "positron_branching": BRANCHING},
        "acquisition": {"start": ACQ_START.isoformat(), "duration_s": DURATION_S, "time_block_ms": 1000,
                        "injection": INJECTION.isoformat(), "injected_MBq": INJECTED_MBQ,
                        "radionuclide_total_dose_unit": "MBq (PETSIRD docstring of radionuclide_total_dose)",
                        "activity_of_injection_at_acquisition_start_MBq": round(a_acq, 4),
                        "patient_weight_kg": PATIENT_KG, "patient_size_m": PATIENT_M,
                        "suv_bw_of_1_Bq_per_mL": 1.0 / suv_scale,
                        "expected_suv_bw": {"background": round(BACKGROUND_BQ_ML / suv_scale, 4),
                                            "spheres": round(SPHERE_BQ_ML / suv_scale, 4)}},
        "scanner": {
            "modules": N_MOD, "module_angle": "a_m = 2 pi m / 376, rotation R(a) = ((cos,-sin),(sin,cos))",
            "crystals_per_module": N_RING, "detection_bin": f"ring + {N_RING} * module (one energy bin)",
            "inner_radius_mm": R_IN, "crystal_mm": [DEPTH, round(W_TAN, 4), AX_PITCH],
            "box_centre_radius_mm": R_MID, "axial_fov_mm": 2 * Z_HALF,
            "ring_z_gantry_mm": [(r - (N_RING - 1) / 2) * AX_PITCH for r in range(N_RING)],
            "lyso_mu_per_mm": MU_LYSO, "energy_window_keV": [E_LOW, E_HIGH], "energy_resolution_fwhm_511": E_RES,
            "ctr_ps": CTR_PS, "tof_fwhm_mm": round(TOF_FWHM_MM, 4),
            "tof_bin_edges_mm": TOF_EDGES.tolist(),
            "coincidence": f"modules with folded difference min(d, 376-d) >= {D_MIN} (LORs within ~200 mm of the axis)",
            "sgid": f"min(d, 376 - d) - {D_MIN}; -1 otherwise ({N_SGID} SGIDs)",
            "calibration_factor": calibration, "max_crystal_efficiency": eps_max,
        },
        "phantom": {
            "axis_xy_mm": [XC, YC], "z_range_mm": list(iec.Z_RANGE_MM), "wall_mm": iec.WALL_MM,
            "cross_section": ("relative to the axis: y >= 0 half disc r=147 mm; -77 <= y < 0 within "
                              "77 mm of the segment |x| <= 70 mm"),
            "lung_insert": {"radius_mm": iec.LUNG_RADIUS_MM, "concentration_Bq_per_mL": 0.0},
            "table": {"y_range_mm": list(TABLE_Y), "half_width_mm": TABLE_HALF_WIDTH, "HU": TABLE_HU},
            "mu_511_per_mm": {"water": MU_WATER, "lung": MU_LUNG, "pmma": MU_PMMA, "table": MU_TABLE},
            "ct_HU": iec.HU,
        },
        "spheres": [{"label": s.label, "diameter_mm": s.diameter_mm, "centre_mm": list(s.centre_mm),
                     "volume_mL": round(s.volume_ml, 5), "concentration_Bq_per_mL": SPHERE_BQ_ML}
                    for s in iec.spheres()],
        "background_concentration_Bq_per_mL": BACKGROUND_BQ_ML,
        "concentration_reference": "acquisition start",
        "volumes_mL": {k: round(v, 4) for k, v in vols.items()},
        "total_activity_MBq": round(total_mbq, 5),
        "activity_in_axial_fov_MBq": round(activity_in_fov_mbq(), 5),
        "axial_fov_LPS_z_mm": [-Z_HALF - Z_SHIFT, Z_HALF - Z_SHIFT],
        "counts": counts,
        "self_checks": checks,
        "files": {"listmode": "listmode.petsird", "listmode_bytes": file_bytes, "ct": "ct/CT0001.dcm ...",
                  "activity": "truth/activity.nii.gz (float32 Bq/mL at acquisition start, LPS)",
                  "spheres": "truth/spheres.nii.gz (uint8 labels 1..6 = 10..37 mm)"},
        "ct": {"series_uid": CT_SERIES_UID, "z_LPS_mm": [float(CT_Z_LPS[0]), float(CT_Z_LPS[-1])],
               "pixel_mm": CT_PIXEL_MM, "slice_mm": CT_SLICE_MM, "matrix": CT_N},
        "uids": {"study": STUDY_UID, "frame_of_reference": FOR_UID, "pet_series": PET_SERIES_UID,
                 "pet_sop_instance": PET_SOP_UID},
        "seed": SEED,
    }


# =============================================================================================
# Reading back
# =============================================================================================

def read_back(path: Path) -> dict:
    """Read header and all time blocks; return arrays and timing."""
    t0 = time.time()
    with petsird.BinaryPETSIRDReader(str(path)) as reader:
        header = reader.read_header()
        p1, p2, pt, d1, d2, dt, starts = [], [], [], [], [], [], []
        for block in reader.read_time_blocks():
            if not isinstance(block, petsird.TimeBlock.EventTimeBlock):
                continue
            eb = block.value
            starts.append((eb.time_interval.start, eb.time_interval.stop))
            for ev in eb.prompt_events[0][0]:
                p1.append(ev.detection_bins[0]); p2.append(ev.detection_bins[1]); pt.append(ev.tof_idx)
            for ev in eb.delayed_events[0][0]:
                d1.append(ev.detection_bins[0]); d2.append(ev.detection_bins[1]); dt.append(ev.tof_idx)
    return {"header": header, "seconds": time.time() - t0, "blocks": starts,
            "prompts": (np.array(p1), np.array(p2), np.array(pt)),
            "delayeds": (np.array(d1), np.array(d2), np.array(dt))}


def header_arrays(header):
    """Efficiencies and box centres from a PETSIRD header."""
    sc = header.scanner
    eff = sc.detection_efficiencies
    eps = np.array(eff.detection_bin_efficiencies[0], dtype=float)
    lut = eff.module_pair_sgidlut[0][0]
    vecs = eff.module_pair_efficiencies_vectors[0][0]
    g = np.zeros((N_MOD // 2 + 1, N_RING, N_RING))
    for d in range(1, N_MOD // 2 + 1):
        sgid = lut[d][0]
        if sgid >= 0:
            assert vecs[sgid].sgid == sgid
            g[d] = np.array(vecs[sgid].values)
    rep = sc.scanner_geometry.replicated_modules[0]
    corners = np.array([c.c for c in rep.object.detecting_elements.object.shape.corners], dtype=float)
    centre = np.append(corners.mean(axis=0), 1.0)
    box = np.empty((N_MOD * N_RING, 3))
    for m, mt in enumerate(rep.transforms):
        M = np.vstack([mt.matrix, [0, 0, 0, 1]]).astype(float)
        for r, et in enumerate(rep.object.detecting_elements.transforms):
            E = np.vstack([et.matrix, [0, 0, 0, 1]]).astype(float)
            box[r + N_RING * m] = (M @ E @ centre)[:3]
    return eps, g, float(eff.calibration_factor), box


def tof_sign_check(b1, b2, tof_idx, box) -> dict:
    """For prompts whose LOR passes within 12 mm of the 37-mm sphere's centre: mean signed
    distance, along the LOR, between the TOF-bin centre position (PETSIRD convention, point =
    midpoint + tof * (c2 - c1)/|c2 - c1|) and the sphere centre's projection; should be ~0
    (and far off with the opposite sign convention)."""
    cen = sphere_centres_gantry()[-1][0]
    c1, c2 = box[b1], box[b2]
    d = c2 - c1
    u = d / np.linalg.norm(d, axis=1, keepdims=True)
    mid = (c1 + c2) / 2
    proj = np.sum((cen - mid) * u, axis=1)
    perp = np.linalg.norm((cen - mid) - proj[:, None] * u, axis=1)
    sel = perp < 12.0
    centres = (TOF_EDGES[:-1] + TOF_EDGES[1:]) / 2
    tof = centres[tof_idx[sel]]
    return {"lors_near_37mm_sphere": int(sel.sum()),
            "median_abs_offset_mm_petsird_sign": round(float(np.median(np.abs(tof - proj[sel]))), 2),
            "median_abs_offset_mm_flipped_sign": round(float(np.median(np.abs(-tof - proj[sel]))), 2)}


def check_file(out: Path) -> dict:
    """Read the file back and check it against truth/phantom.json."""
    truth = json.loads((out / "truth" / "phantom.json").read_text())
    rb = read_back(out / "listmode.petsird")
    b1, b2, ti = rb["prompts"]
    d1, d2, dti = rb["delayeds"]
    eps, g, cal, box = header_arrays(rb["header"])
    box_expected = np.stack([box_centre(np.arange(N_MOD * N_RING) // N_RING, np.arange(N_MOD * N_RING) % N_RING)], 0)[0].T
    res = {
        "read_seconds": round(rb["seconds"], 2),
        "time_blocks": len(rb["blocks"]),
        "prompts": int(len(b1)), "delayeds": int(len(d1)),
        "prompts_match_json": int(len(b1)) == truth["counts"]["prompts"],
        "delayeds_match_json": int(len(d1)) == truth["counts"]["delayeds"],
        "ordered_b1_ge_b2": bool(np.all(b1 >= b2) and np.all(d1 >= d2)),
        "bins_in_range": bool(b1.max() < N_MOD * N_RING and d1.max() < N_MOD * N_RING),
        "tof_idx_in_range": bool(ti.max() < len(TOF_EDGES) - 1 and dti.max() < len(TOF_EDGES) - 1),
        "all_pairs_in_coincidence": bool(np.all(in_coincidence(b1 // N_RING, b2 // N_RING))
                                         and np.all(in_coincidence(d1 // N_RING, d2 // N_RING))),
        "box_centres_max_dev_mm": round(float(np.abs(box - box_expected).max()), 5),
        "tof_sign": tof_sign_check(b1, b2, ti, box),
    }
    _, _, pred = expected_trues_by_lor(eps, g, cal, box)
    res["expected_trues_from_file_efficiencies"] = round(pred, 1)
    res["mc_trues"] = truth["counts"]["trues"]
    res["mc_over_expected"] = round(truth["counts"]["trues"] / pred, 4)
    return res


# =============================================================================================
# README
# =============================================================================================

def readme_text(info: dict) -> str:
    c = info["counts"]
    ch = info["self_checks"]
    sph = "\n".join(f"| {s['label']} | {s['diameter_mm']:g} | ({s['centre_mm'][0]:.2f}, {s['centre_mm'][1]:.2f}, "
                    f"{s['centre_mm'][2]:.1f}) |" for s in info["spheres"])
    return f"""# Simulated Ga-68 TOF PET list mode (PETSIRD) of a NEMA IEC body phantom

Sample for `theraflow`'s PET reconstruction (issue 6). Made by
`data-samples/simulate_pet_iec.py`, a photon-pair Monte Carlo with analytic geometry that shares
no code with the reconstruction (no voxel projector: no "inverse crime"); the phantom geometry
comes from `data-samples/simulate_lu177_iec.py`. Deterministic (seed {SEED}); regenerate with

    python data-samples/simulate_pet_iec.py          # about a minute or two on 2 cores
    python data-samples/simulate_pet_iec.py --check  # read back and check

## Files

| path | content |
|---|---|
| `listmode.petsird` | PETSIRD 0.12 binary stream: header + {DURATION_S} EventTimeBlocks of 1000 ms with prompts and delayeds |
| `ct/CT0001.dcm` ... `CT{len(CT_Z_LPS):04d}.dcm` | CT of the same study and frame of reference (own series), RLE lossless, 256 x 256 x {CT_PIXEL_MM} mm, {len(CT_Z_LPS)} slices of 5 mm, z = {CT_Z_LPS[0]:g} ... {CT_Z_LPS[-1]:g} mm (instance 1 most superior) |
| `truth/phantom.json` | geometry, concentrations, scanner, counts, self-check results |
| `truth/activity.nii.gz` | float32 Bq/mL at acquisition start (LPS, 2.2098 mm, partial-volume averaged) |
| `truth/spheres.nii.gz` | uint8 labels 1..6 (10 ... 37 mm), voxels at least half inside |

## Coordinates

PETSIRD gantry coordinates (mm), gantry axis = z. `scanner.gantry_alignment` = identity
rotation + translation (0, 0, -70): LPS = gantry + (0, 0, -70), so the scanner's centre is the
spheres' plane (LPS z = -70) and its axis is LPS x = y = 0. Axial FOV LPS z = -102 ... -38 mm.

## Scanner (digital-PET-like, one module type)

* 376 modules at angles a_m = 2 pi m / 376 (counter-clockwise from +x in gantry x-y), module
  transform R(a_m) = ((cos a, -sin a, 0, 0), (sin a, cos a, 0, 0), (0, 0, 1, 0)).
* Module = 16 crystals along z; element index = ring index r (centre z = (r - 7.5) x 4 mm).
  Crystal box {DEPTH:g} (radial, local x from 240 to 260) x {W_TAN:.4f} (tangential,
  2 x 240 x tan(pi/376): inner faces tile the 376-gon) x 4 mm (axial). LYSO, mu = 0.087/mm.
* One energy bin 435-585 keV; detection_bin = ring + 16 x module. Energy resolution 10 % FWHM at 511 keV.
* TOF: CTR 214 ps FWHM = {TOF_FWHM_MM:.2f} mm in (t1 - t2) c / 2; 35 bins of 16 mm from -280 to
  +280 mm. Events (b1, b2) with b1 >= b2; a negative TOF value means b1's crystal was hit first:
  the annihilation lies at midpoint + tof x (c2 - c1)/|c2 - c1| (c = box centres).
* Coincidences only between modules with folded difference min(d, 376 - d) >= {D_MIN} (LORs
  within about 200 mm of the axis). SGID = min(d, 376 - d) - {D_MIN} ({N_SGID} SGIDs), -1 otherwise.
* Efficiencies: `detection_bin_efficiencies` = crystal efficiencies e_i (gamma, mean 1, 5 %
  spread); module-pair values = the MC's geometric factor of the crystal pair,
  g = (1 / 2 pi) x integral over both mid-depth faces (A = {W_MID:.4f} x 4 mm^2) of cos1 cos2 / D^2 x s1 s2,
  times p511^2 (6 x 6 points per face), s = 1 - exp(-0.087 L) (L = path of the line in the
  20-mm LYSO annulus), p511 = {P511:.5f} (energy window acceptance of a 511-keV photon); calibration_factor = 1 / max(e)^2 =
  {info['scanner']['calibration_factor']:.6f} (the MC accepts a pair with probability e_i e_j / max(e)^2).
  So mean true unscattered coincidences of a pair = calibration_factor x e_i x e_j x g x line
  integral (box centre to box centre) of annihilations/mm^3 over the acquisition x exp(-integral mu).

## Phantom and activity (reference: acquisition start {ACQ_START.isoformat()})

NEMA IEC body phantom of the SPECT sample (imported geometry): interior prism LPS z = -190 ...
-10 mm about (x, y) = (8, 22), 3 mm PMMA wall, lung insert (r = 25.5 mm, no activity, -700 HU),
spheres (walls ignored) in the plane z = -70 mm:

| label | diameter (mm) | centre (mm, LPS) |
|---|---|---|
{sph}

Background {BACKGROUND_BQ_ML:g} Bq/mL, spheres {SPHERE_BQ_ML:g} Bq/mL (10:1), total
{info['total_activity_MBq']:.3f} MBq, {info['activity_in_axial_fov_MBq']:.3f} MBq in the axial FOV.
Patient table: 10-mm slab, y = {TABLE_Y[0]:g} ... {TABLE_Y[1]:g} mm, |x| <= {TABLE_HALF_WIDTH:g} mm (narrower than the
SPECT sample's, to fit in the ring), 200 HU. mu at 511 keV (1/mm): water {MU_WATER}, lung {MU_LUNG:.5f},
PMMA {MU_PMMA}, table {MU_TABLE}. Ga-68: T1/2 = {HALF_LIFE_S} s, positron branching {BRANCHING};
{INJECTED_MBQ:g} MBq "injected" at {INJECTION.isoformat()} (radionuclide_total_dose, in MBq as the
PETSIRD docstring specifies), patient 75 kg / 1.75 m / M, ID PHANTOM-PET, Ga-68 PSMA-11.

## Physics of the Monte Carlo

* Annihilation points sampled uniformly in the analytic activity distribution (background
  in the interior minus the lung insert, plus the spheres' excess), emission times with
  density ~ exp(-lambda t) over the {DURATION_S} s. Positron range and photon non-collinearity are ignored.
* Photons are tracked along straight lines with exact chord lengths through the analytic
  shapes (convex prisms, cylinder, slab). Detection: the crystal is the one whose mid-depth face
  (the 376-gon through the box centres, radius 250 mm) the photon crosses; the photon is
  stopped with probability 1 - exp(-mu_LYSO L), L = its path in the continuous LYSO annulus
  (240 ... 260 mm, |z| <= 32 mm); depth of interaction is not resolved (the LOR is at
  mid-depth), no inter-crystal scatter, full energy deposit.
* Trues: both photons escape the phantom unscattered (probability exp(-integral mu)). The
  direction is drawn exactly among those whose two photons reach the axial FOV (importance
  sampling by the analytic u_z band; candidates thinned by its probability, so counts remain
  Poisson and unweighted).
* Scatter: one photon Compton-scatters once (interaction point drawn from mu(s) exp(-tau(s))
  along its path in the phantom or table, Klein-Nishina angle, E' = 511 / (2 - cos theta)); the
  scattered photon must escape (mu scaled by the Klein-Nishina cross-section ratio at E', also
  for LYSO stopping) and reach a crystal in coincidence; its partner escapes unscattered. The
  measured energy is Gaussian-blurred (10 % FWHM at 511 keV, ~sqrt(E)) and accepted in 435-585
  keV (also for unscattered photons: p511 = {P511:.5f}). Events with both photons scattered, or
  multiple scatter, are not simulated. Activity from the whole phantom (LPS z -190 ... -10)
  contributes.
* TOF: (t1 - t2) c / 2 from the true path lengths (annihilation -> (scatter point ->) detection
  surface) plus a Gaussian of {TOF_FWHM_MM:.2f} mm FWHM, then binned.
* Crystal efficiencies: a pair is accepted with probability e_i e_j / max(e)^2.
* Randoms: Poisson number with mean {RANDOMS_FRACTION:.0%} / {1 - RANDOMS_FRACTION:.0%} of the simulated trues + scatter
  (randoms fraction ~{RANDOMS_FRACTION:.0%} of prompts); crystal pairs drawn with probability ~ S_i S_j among
  pairs in coincidence, S_i = e_i x (smoothed ring profile) x (smoothed module profile) of the
  unscattered singles of the MC; TOF uniform over the 35 bins; times ~ A(t)^2. The delayed
  coincidences are an independent draw from the same distribution (delayed_event_policy
  REJECT_HIGHER_MULTIPLES, like the prompts).
* Dead time, pile-up and multiples are not modelled.

## Counts

| prompts | trues | scatter | randoms (in prompts) | delayeds |
|---|---|---|---|---|
| {c['prompts']} | {c['trues']} | {c['scatter']} | {c['randoms']} | {c['delayeds']} |

Scatter fraction S/(T+S) = {c['scatter'] / (c['trues'] + c['scatter']):.3f}, randoms fraction
{c['randoms'] / c['prompts']:.3f}. File size {info['files']['listmode_bytes'] / 1e6:.2f} MB.

## Self-checks (at generation)

Expected trues predicted by the stored efficiencies (sum over all crystal pairs in
coincidence, analytic line integrals) = {ch['expected_trues']:.0f}; MC trues {c['trues']}; ratio
{ch['mc_over_expected']:.4f} (Poisson sd {1 / math.sqrt(max(c['trues'], 1)):.4f}). Ratios per band of module
difference: {ch['mc_over_expected_by_module_difference']}; per band of ring difference:
{ch['mc_over_expected_by_ring_difference']}. TOF localisation of simulated trues (TOF value
vs the true annihilation point along the LOR): mean {ch['tof_error_mean_mm']} mm, sd
{ch['tof_error_sd_mm']} mm (CTR sigma {TOF_SIGMA_MM:.2f} mm, finite LOR width adds a little).
"""


# =============================================================================================
# Main
# =============================================================================================

def simulate(out: Path) -> None:
    t_start = time.time()
    seeds = np.random.SeedSequence(SEED).spawn(5)
    rng_eff, rng_t, rng_s, rng_r, rng_d = (np.random.Generator(np.random.PCG64(s)) for s in seeds)
    eps = crystal_efficiencies(rng_eff)
    eps_max = float(eps.astype(np.float32).max())
    calibration = 1.0 / eps_max**2
    g = module_pair_table()
    stats: dict = {}
    print(f"Activity in FOV {activity_in_fov_mbq():.3f} MBq; simulating trues ...", flush=True)
    trues = simulate_trues(rng_t, eps, eps_max, stats)
    print(f"  {len(trues)} trues ({time.time() - t_start:.1f} s); simulating scatter ...", flush=True)
    scatter, singles_hist = simulate_scatter(rng_s, eps, eps_max, stats)
    print(f"  {len(scatter)} scatter ({time.time() - t_start:.1f} s)", flush=True)
    singles = singles_model(singles_hist, eps)
    n_rand = RANDOMS_FRACTION / (1 - RANDOMS_FRACTION) * (len(trues) + len(scatter))
    randoms = simulate_randoms(rng_r, n_rand, singles)
    delayeds = simulate_randoms(rng_d, n_rand, singles)
    prompts = Events.concat([trues, scatter, randoms])
    header = make_header(eps, g, calibration)
    print(f"  {len(randoms)} randoms, {len(delayeds)} delayeds; writing ...", flush=True)
    write_petsird(out / "listmode.petsird", header, to_file(prompts), to_file(delayeds))
    t_sim = time.time() - t_start
    write_ct(out / "ct")
    truth_mbq = write_truth(out)

    # self-checks
    by_d, by_dr, pred = expected_trues_by_lor(eps, g_fold_from_table(g), calibration)
    fd = folded_difference(trues.b1 // N_RING, trues.b2 // N_RING)
    dr = np.abs(trues.b1 % N_RING - trues.b2 % N_RING)
    mc_d = np.bincount(fd, minlength=len(by_d))
    mc_dr = np.bincount(dr, minlength=N_RING)
    d_bands = [(77, 110), (110, 130), (130, 150), (150, 170), (170, 189)]
    r_bands = [(0, 2), (2, 5), (5, 9), (9, N_RING)]
    c1 = box_centre(trues.b1 // N_RING, trues.b1 % N_RING)
    c2 = box_centre(trues.b2 // N_RING, trues.b2 % N_RING)
    u = (c2 - c1) / np.linalg.norm(c2 - c1, axis=0)
    along = np.sum((trues.origin - (c1 + c2) / 2) * u, axis=0)
    err = tof_index_centre(trues.tof_mm) - along
    checks = {
        "expected_trues": round(pred, 1),
        "mc_over_expected": round(len(trues) / pred, 4),
        "mc_over_expected_by_module_difference": {
            f"{a}-{b - 1}": round(float(mc_d[a:b].sum() / by_d[a:b].sum()), 4) for a, b in d_bands},
        "mc_over_expected_by_ring_difference": {
            f"{a}-{b - 1}": round(float(mc_dr[a:b].sum() / by_dr[a:b].sum()), 4) for a, b in r_bands},
        "tof_error_mean_mm": round(float(err.mean()), 3),
        "tof_error_sd_mm": round(float(err.std()), 3),
        "truth_image_activity_MBq": round(truth_mbq * 1e-6, 4),
        "mc_stats": {k: (round(v, 6) if isinstance(v, float) else v) for k, v in stats.items()},
        "simulation_seconds": round(t_sim, 1),
    }
    counts = {"prompts": len(prompts), "trues": len(trues), "scatter": len(scatter), "randoms": len(randoms),
              "delayeds": len(delayeds)}
    info = phantom_json(counts, checks, eps_max, calibration, (out / "listmode.petsird").stat().st_size)
    info["variant"] = {"layout": LAYOUT, "rotation_columns": ROTATION, "efficiency_spread": EFF_SPREAD,
                       "phantom_axis_xy_mm": [XC, YC], "gantry_to_LPS_z_mm": -Z_SHIFT}
    (out / "truth" / "phantom.json").write_text(json.dumps(info, indent=2) + "\n")
    if (LAYOUT, ROTATION, EFF_SPREAD, SEED, DURATION_S, XC, YC, Z_SHIFT, N_RING) == (
            "columns", 0, 0.05, 20261109, 35, 8.0, 22.0, 70.0, 16):
        (out / "README.md").write_text(readme_text(info))
    print(json.dumps({"counts": counts, "self_checks": checks}, indent=2))
    print(f"Done in {time.time() - t_start:.1f} s: {out}")


def tof_index_centre(tof_mm):
    centres = (TOF_EDGES[:-1] + TOF_EDGES[1:]) / 2
    return centres[np.clip(tof_index(tof_mm), 0, len(centres) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "ga68-iec-pet")
    parser.add_argument("--check", action="store_true", help="read the written file back and check it (sample layout)")
    variant = parser.add_argument_group("variants (other scanners and held-out truths; defaults = the sample)")
    variant.add_argument("--layout", choices=("columns", "blocks"), default="columns",
                         help="PETSIRD modules: 376 columns of 16 crystals, or 188 blocks of 8 x 4")
    variant.add_argument("--rotation", type=int, default=0, help="gantry alignment rotation, in crystal columns")
    variant.add_argument("--efficiency-spread", type=float, default=EFF_SPREAD, help="crystal efficiency relative spread")
    variant.add_argument("--seed", type=int, default=SEED)
    variant.add_argument("--duration", type=int, default=DURATION_S, help="acquisition [s] (count level)")
    variant.add_argument("--phantom-shift", type=float, nargs=2, default=(0.0, 0.0), metavar=("DX", "DY"),
                         help="phantom moved in LPS x, y [mm]")
    variant.add_argument("--axial-offset", type=float, default=0.0,
                         help="scanner's axial centre at LPS z = -70 + offset [mm] (spheres off the axial centre)")
    variant.add_argument("--rings", type=int, default=N_RING,
                         help="crystal rings of 4 mm (axial FOV = 4 x rings mm); blocks: a multiple of 4 (rings / 4 axial modules)")
    args = parser.parse_args()
    try:
        configure(args.layout, args.rotation, args.efficiency_spread, args.seed, args.duration,
                  tuple(args.phantom_shift), args.axial_offset, args.rings)
    except ValueError as exc:
        parser.error(str(exc))
    if args.check:
        res = check_file(args.out)
        print(json.dumps(res, indent=2))
        ok = (res["prompts_match_json"] and res["delayeds_match_json"] and res["ordered_b1_ge_b2"]
              and res["bins_in_range"] and res["tof_idx_in_range"] and res["all_pairs_in_coincidence"]
              and res["box_centres_max_dev_mm"] < 1e-3 and abs(res["mc_over_expected"] - 1) < 0.02
              and res["tof_sign"]["median_abs_offset_mm_petsird_sign"]
              < res["tof_sign"]["median_abs_offset_mm_flipped_sign"])
        print("CHECK", "PASS" if ok else "FAIL")
        sys.exit(0 if ok else 1)
    simulate(args.out)


if __name__ == "__main__":
    main()

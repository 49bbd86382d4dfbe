"""The SPECT reconstruction grid and the PyTomography system matrix built on it.

The grid is the camera's: a cube of projection pixels centred on the axis of rotation, axial
slices at the rows of the projections, identity direction in LPS, ``geometry.grid_cols`` pixels
wide (the detector width, or wider for laterally offset detectors such as the StarGuide's). PyTomography's object axes
are (x, y, z) with z increasing toward the head; its projections are [view, column, row from
the bottom] at internal angle = DICOM angle + 180°.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import SimpleITK as sitk
import torch

from recon.errors import InputError
from recon.io.nm_projections import ProjectionGeometry
from recon.ptomo import (
    SPECTAttenuationTransform,
    SPECTObjectMeta,
    SPECTProjMeta,
    SPECTPSFMeta,
    SPECTPSFTransform,
    SPECTSystemMatrix,
    pytomography,
)
from recon.spect.penetration import PenetrationResponse, PenetrationTail, tail_reach_px
from recon.spect.psf import CollimatorResponse


@dataclass(frozen=True)
class RowRange:
    """Projection rows [first, stop) reconstructed (row 0 is the most superior)."""

    first: int
    stop: int

    @property
    def n(self) -> int:
        return self.stop - self.first


def axial_extent(photopeak: np.ndarray, fraction: float = 0.005, margin: int = 6) -> RowRange:
    """Rows holding the activity: the outermost rows whose summed counts exceed ``fraction`` of
    the brightest row, widened by ``margin`` rows (collimator blur and scatter tails)."""
    profile = photopeak.sum(axis=(0, 2))
    hot = np.flatnonzero(profile > fraction * profile.max())
    if hot.size == 0:
        return RowRange(0, profile.size)
    return RowRange(max(0, int(hot[0]) - margin), min(profile.size, int(hot[-1]) + 1 + margin))


def z_range_mm(geometry: ProjectionGeometry, rows: RowRange) -> tuple[float, float]:
    """(lowest, highest) z [mm] of the outer edges of ``rows``."""
    top = geometry.z_first_row_mm - (rows.first - 0.5) * geometry.pixel_mm
    return top - rows.n * geometry.pixel_mm, top


def reconstruction_grid(geometry: ProjectionGeometry, rows: RowRange) -> sitk.Image:
    """Empty float32 image (LPS, mm) of the voxels reconstructed from ``rows``."""
    n, d = geometry.grid_cols, geometry.pixel_mm
    image = sitk.Image([n, n, rows.n], sitk.sitkFloat32)
    image.SetSpacing([d, d, d])
    image.SetOrigin([
        geometry.axis_xy_mm[0] - (n - 1) / 2 * d,
        geometry.axis_xy_mm[1] - (n - 1) / 2 * d,
        geometry.z_first_row_mm - (rows.stop - 1) * d,
    ])
    return image


def to_object(image: sitk.Image) -> torch.Tensor:
    """SimpleITK image on the grid → PyTomography object tensor [x, y, z]."""
    array = np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose(2, 1, 0))
    return torch.from_numpy(array).to(pytomography.dtype).to(pytomography.device)


def to_image(obj: torch.Tensor, grid: sitk.Image) -> sitk.Image:
    """PyTomography object tensor [x, y, z] → float32 image with the grid's geometry."""
    image = sitk.GetImageFromArray(obj.detach().cpu().numpy().transpose(2, 1, 0).astype(np.float32))
    image.CopyInformation(grid)
    return image


def to_projections(counts: np.ndarray, rows: RowRange) -> torch.Tensor:
    """Camera projections [view, row, column] → PyTomography layout [view, column, z]."""
    array = np.ascontiguousarray(counts[:, rows.first : rows.stop, :][:, ::-1, :].transpose(0, 2, 1))
    return torch.from_numpy(array).to(pytomography.dtype).to(pytomography.device)


def from_projections(proj: torch.Tensor) -> np.ndarray:
    """PyTomography projections [view, column, z] → camera layout [view, row, column]."""
    return proj.detach().cpu().numpy().transpose(0, 2, 1)[:, ::-1, :].copy()


PROJECTORS = ("native", "pytomography")


def tail_lateral_grid(geometry: ProjectionGeometry, reach_px: int) -> tuple[ProjectionGeometry, np.ndarray]:
    """The lateral grid on which a tail of half-width ``reach_px`` [pixels] is applied: per view,
    columns on the detector's pixel lattice covering its own columns and, within ``reach_px`` of
    them, the reconstruction grid's width (``geometry.grid_cols``: nothing lies outside it), all views
    equally wide. Returns the geometry of those wider detectors (their lateral offsets shifted by
    whole pixels; the same grid) and, per view, the wide column holding the detector's first column.
    A detector as wide as the grid (rotating gantries) is its own grid: the geometry is returned."""
    n_strip, n_grid = geometry.n_cols, geometry.grid_cols
    centre = geometry.offsets_mm / geometry.pixel_mm                  # strip centres, pixels from the axis
    low = np.minimum(np.maximum(centre - n_strip / 2 - reach_px, -n_grid / 2), centre - n_strip / 2)
    high = np.maximum(np.minimum(centre + n_strip / 2 + reach_px, n_grid / 2), centre + n_strip / 2)
    shift = np.round((low + high) / 2 - centre)                          # whole pixels: the strip's lattice
    margin = max(0, int(np.ceil(np.max(np.maximum(centre + shift - low, high - centre - shift)) - n_strip / 2 - 1e-6)))
    if margin == 0:
        return geometry, np.zeros(centre.size, dtype=np.int64)
    wide = replace(geometry, n_cols=n_strip + 2 * margin, lateral_offsets_mm=(centre + shift) * geometry.pixel_mm)
    return wide, (margin - shift).astype(np.int64)


def _metas(geometry: ProjectionGeometry, rows: RowRange, grid_cols: int) -> tuple[SPECTObjectMeta, SPECTProjMeta]:
    """PyTomography's metadata of a ``grid_cols``-wide grid and of ``geometry``'s projections."""
    d_cm = geometry.pixel_mm / 10.0
    object_meta = SPECTObjectMeta((d_cm, d_cm, d_cm), (grid_cols, grid_cols, rows.n))
    proj_meta = SPECTProjMeta(
        (geometry.n_cols, rows.n), (d_cm, d_cm), (geometry.angles_deg + 180.0) % 360.0, geometry.radii_mm / 10.0
    )
    return object_meta, proj_meta


def system_matrix(
    geometry: ProjectionGeometry,
    rows: RowRange,
    mu_map: sitk.Image | Callable[[], sitk.Image] | None,
    response: CollimatorResponse | None,
    projector: str = "native",
    view_weights: np.ndarray | None = None,
    penetration: PenetrationResponse | None = None,
):
    """SPECT system matrix with attenuation (μ in 1/cm on the grid) and the depth-dependent
    Gaussian collimator response, either of which may be None: theraflow's own projector
    (``'native'``, same physics, much faster) or PyTomography's ``SPECTSystemMatrix``.
    ``mu_map`` may be a function returning the map: the native projector calls it once its
    rotation operators are built, so that the map can be made meanwhile in another thread.

    ``view_weights``: per view, its acquisition time relative to the reference frame duration
    (None: all views equally long). Laterally offset or narrow detectors (``geometry.
    lateral_offsets_mm``, the StarGuide) and view weights need the native projector; asking
    PyTomography's for them raises InputError.

    ``penetration``: the collimator's septal-penetration tail, composed with the matrix by
    :class:`~recon.spect.penetration.PenetrationTail`. The geometric matrix then projects onto
    :func:`tail_lateral_grid` (wider than narrow detectors, so that the tail of the activity beside
    them reaches them) and the tail cuts the detector's columns out of it."""
    if penetration is not None:
        wide, first_columns = tail_lateral_grid(geometry, tail_reach_px(penetration, geometry.radii_mm, geometry.pixel_mm))
        geometric = _geometric_matrix(wide, geometry.grid_cols, rows, mu_map, response, projector, view_weights)
        _, proj_meta = _metas(geometry, rows, geometry.grid_cols)
        return PenetrationTail(geometric, penetration, geometry.radii_mm, geometry.pixel_mm, proj_meta, first_columns)
    return _geometric_matrix(geometry, geometry.grid_cols, rows, mu_map, response, projector, view_weights)


def _geometric_matrix(geometry: ProjectionGeometry, grid_cols: int, rows: RowRange,
                      mu_map: sitk.Image | Callable[[], sitk.Image] | None,
                      response: CollimatorResponse | None, projector: str, view_weights: np.ndarray | None):
    """:func:`system_matrix` without the penetration tail, on a ``grid_cols``-wide grid."""
    if projector not in PROJECTORS:
        raise ValueError(f"unknown projector {projector!r} ({' or '.join(PROJECTORS)})")
    object_meta, proj_meta = _metas(geometry, rows, grid_cols)

    def mu() -> torch.Tensor | None:
        return None if mu_map is None else to_object(mu_map() if callable(mu_map) else mu_map)

    psf_meta = None
    if response is not None:
        a, b, c = response.slope, response.intercept_mm / 10.0, response.intrinsic_mm / 10.0
        psf_meta = SPECTPSFMeta(
            sigma_fit_params=(a, b, c), sigma_fit=lambda r, a, b, c: np.sqrt((a * r + b) ** 2 + c**2), min_sigmas=3
        )
    if projector == "native":
        from recon.spect.native import NativeSPECTSystemMatrix

        offsets = None if geometry.lateral_offsets_mm is None else geometry.lateral_offsets_mm / 10.0
        return NativeSPECTSystemMatrix(
            object_meta, proj_meta, mu, psf_meta, lateral_offsets_cm=offsets, view_weights=view_weights
        )
    if geometry.lateral_offsets_mm is not None or grid_cols != geometry.n_cols or view_weights is not None:
        raise InputError(
            None,
            "the 'pytomography' projector models only centred detectors as wide as the field of view "
            "with equal view durations; use the native projector for this camera",
        )
    transforms = []
    attenuation_map = mu()
    if attenuation_map is not None:
        transforms.append(SPECTAttenuationTransform(attenuation_map=attenuation_map))
    if psf_meta is not None:
        transforms.append(SPECTPSFTransform(psf_meta))
    return SPECTSystemMatrix(transforms, [], object_meta, proj_meta)

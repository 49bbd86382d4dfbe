"""The SPECT reconstruction grid and the PyTomography system matrix built on it.

The grid is the camera's: a cube of projection pixels centred on the axis of rotation, axial
slices at the rows of the projections, identity direction in LPS, ``geometry.grid_cols`` pixels
wide (the detector width, or wider for laterally offset detectors such as the StarGuide's). PyTomography's object axes
are (x, y, z) with z increasing toward the head; its projections are [view, column, row from
the bottom] at internal angle = DICOM angle + 180°.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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
from recon.spect.penetration import PenetrationResponse, PenetrationTail
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
    :class:`~recon.spect.penetration.PenetrationTail`."""
    if penetration is not None:
        geometric = system_matrix(geometry, rows, mu_map, response, projector, view_weights)
        return PenetrationTail(geometric, penetration, geometry.radii_mm, geometry.pixel_mm)
    if projector not in PROJECTORS:
        raise ValueError(f"unknown projector {projector!r} ({' or '.join(PROJECTORS)})")
    n, d_cm = geometry.grid_cols, geometry.pixel_mm / 10.0
    object_meta = SPECTObjectMeta((d_cm, d_cm, d_cm), (n, n, rows.n))
    proj_meta = SPECTProjMeta(
        (geometry.n_cols, rows.n), (d_cm, d_cm), (geometry.angles_deg + 180.0) % 360.0, geometry.radii_mm / 10.0
    )

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
    if geometry.lateral_offsets_mm is not None or n != geometry.n_cols or view_weights is not None:
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

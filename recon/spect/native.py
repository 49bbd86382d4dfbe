"""A rotate-and-sum SPECT system matrix with PyTomography's physics, built for speed.

:class:`NativeSPECTSystemMatrix` models what ``SPECTSystemMatrix`` with
``SPECTAttenuationTransform`` and ``SPECTPSFTransform`` models, in the same coordinates:

* object ``[x, y, z]`` (voxel sizes ``object_meta.dr`` in cm), projections ``[view, r, z]``;
* for view ``i`` the object, zero-padded in x and y by PyTomography's ``compute_pad_size`` to
  ``P × P``, is rotated about the centre of the padded plane by ``angle_i − 270°`` (kornia's
  ``rotate``, bilinear, zeros outside), giving the detector frame: depth along x with the
  detector face beyond the last plane (+x), r along y, z unchanged;
* attenuation: each voxel is weighted by ``exp(−dx·(Σ_{x'>x} μ' + μ'/2))`` where ``μ'`` is the
  μ-map (1/cm) rotated the same way — PyTomography's ``exp(−rev_cumsum(μ'·dx))``;
* collimator response: depth plane ``x`` is blurred along r and z by sampled Gaussians of
  ``σ = sigma_fit(d, *sigma_fit_params)`` cm, ``d = radius_i + ((P − 1)/2 − x)·dx`` (clipped at
  0) the distance to the detector face, truncated at PyTomography's kernel half-width for that
  view and normalised to unit sum (``SPECTPSFMeta.shape == 'square'`` and
  ``kernel_dimensions == '1D'`` are honoured too);
* the projection is the sum over depth, cropped to the central ``Lr = Ly`` columns.

The speed comes from precomputing, per view, everything that does not depend on the object:

* the bilinear rotation as a sparse CSR matrix (and its transpose) from the object's ``(x, y)``
  plane to the depth planes of the columns the detector needs, applied to all z at once (the
  object as a ``[Lx·Ly, Lz]`` matrix) — only the ``Lr + 2·h_r`` columns that reach the detector
  after the lateral blur of half-width ``h_r`` are produced;
* the attenuation factors, computed once per view on first use and kept in float16
  (``cache_attenuation``; 2 bytes × ``(Lr + 2h_r)·P·Lz`` per view);
* the blur: z as a depthwise 1-D convolution (one kernel per depth plane), r together with the
  sum over depth as a dense product with a banded matrix, by blocks of output columns.

The back projection applies the transposes of the same operators, so it is the exact adjoint of
the forward projection (PyTomography's back projection rotates the other way instead, which is
adjoint only up to interpolation error). Everything runs on ``pytomography.device`` in
``pytomography.dtype`` (float32).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from recon.ptomo import SPECTObjectMeta, SPECTProjMeta, SPECTPSFMeta, pytomography
from pytomography.projectors import SystemMatrix  # noqa: E402  (after recon.ptomo: warning filters)
from pytomography.utils import compute_pad_size  # noqa: E402

_BLOCK = 32  # output columns per banded-matrix product of the lateral blur


class NativeSPECTSystemMatrix(SystemMatrix):
    """SPECT system matrix: rotation, attenuation, depth-dependent Gaussian blur, sum over depth.

    Same interface and physics as PyTomography's ``SPECTSystemMatrix`` built with
    ``[SPECTAttenuationTransform(attenuation_map), SPECTPSFTransform(psf_meta)]``; see the
    module docstring for the conventions.

    Args:
        object_meta: object voxel sizes (cm) and shape ``(Lx, Ly, Lz)`` with ``Lx == Ly``.
        proj_meta: projection shape ``(views, Ly, Lz)``, PyTomography's internal angles (degrees)
            and detector radii (cm, distance from the axis of rotation to the detector face,
            one per view; needed only with ``psf_meta``).
        attenuation_map: μ (1/cm) on the object grid ``[Lx, Ly, Lz]``, or None for no attenuation.
        psf_meta: collimator response, or None for no blur.
        cache_attenuation: keep the per-view attenuation factors (float16) after first use;
            False recomputes them at every projection (slower, less memory).
    """

    def __init__(
        self,
        object_meta: SPECTObjectMeta,
        proj_meta: SPECTProjMeta,
        attenuation_map: torch.Tensor | None = None,
        psf_meta: SPECTPSFMeta | None = None,
        cache_attenuation: bool = True,
    ) -> None:
        super().__init__(object_meta, proj_meta, [], [])
        lx, ly, lz = (int(n) for n in object_meta.shape)
        if lx != ly or tuple(proj_meta.shape[1:]) != (ly, lz):
            raise ValueError(
                f"object {tuple(object_meta.shape)} and projections {tuple(proj_meta.shape)} must be "
                "[L, L, Lz] and [views, L, Lz]"
            )
        if psf_meta is not None and proj_meta.radii is None:
            raise ValueError("collimator response modelling needs proj_meta.radii")
        self.device = pytomography.device
        self.dtype = pytomography.dtype
        self.n_xy, self.n_z = lx, lz
        self.pad = compute_pad_size(lx)
        self.n_depth = lx + 2 * self.pad
        self.dx = float(object_meta.dx)
        self.cache_attenuation = cache_attenuation

        angles = proj_meta.angles.detach().cpu().double().numpy()
        if psf_meta is None:
            self.kernels_r = self.kernels_z = None
            self.half_r = self.half_z = 0
        else:
            radii = np.asarray(proj_meta.radii, dtype=np.float64)
            self.kernels_r = self._blur_kernels(psf_meta, radii, float(object_meta.dr[0]))
            self.kernels_z = (
                self._blur_kernels(psf_meta, radii, float(object_meta.dr[2]))
                if psf_meta.kernel_dimensions == "2D" else None
            )
            self.half_r = self.kernels_r.shape[-1] // 2
            self.half_z = 0 if self.kernels_z is None else self.kernels_z.shape[-1] // 2
        self.n_band = ly + 2 * self.half_r  # detector-frame columns that reach the detector
        self.rotations, self.rotations_t = zip(*(self._rotation_operator(a - 270.0) for a in angles))
        self.mu = (
            None if attenuation_map is None
            else attenuation_map.to(self.device, self.dtype).reshape(lx * ly, lz).contiguous()
        )
        self._attenuation_cache: list[torch.Tensor | None] = [None] * len(angles)
        if self.kernels_r is not None:
            offset = torch.arange(_BLOCK + 2 * self.half_r, device=self.device) - torch.arange(
                min(_BLOCK, ly), device=self.device
            ).unsqueeze(1)  # [output column in block, input column in block] → tap index
            self._tap = offset.clamp(0, 2 * self.half_r)
            self._tap_valid = (offset >= 0) & (offset <= 2 * self.half_r)

    # ------------------------------------------------------------------ construction helpers

    def _blur_kernels(self, psf_meta: SPECTPSFMeta, radii: np.ndarray, spacing_cm: float) -> torch.Tensor:
        """Normalised 1-D kernels ``[views, depth planes, taps]`` along an axis of voxel size
        ``spacing_cm``: PyTomography's per-radius kernels, zero-extended to a common width."""
        planes = np.arange(self.n_depth)
        distance = np.clip(radii[:, None] + ((self.n_depth - 1) / 2 - planes) * self.dx, 0.0, None)
        sigma = np.stack([psf_meta.sigma_fit(d, *psf_meta.sigma_fit_params) for d in distance]) / spacing_cm
        half = (np.ceil(sigma.max(axis=1) * psf_meta.min_sigmas)).astype(int)  # per view, as PyTomography
        taps = np.arange(-half.max(), half.max() + 1, dtype=np.float64)
        if psf_meta.shape == "square":
            kernel = np.clip(1.0 - np.abs(taps) / sigma[..., None], 0.0, None)
        else:
            kernel = np.exp(-(taps**2) / (2 * sigma[..., None] ** 2 + pytomography.delta))
        kernel = np.where(np.abs(taps) > half[:, None, None], 0.0, kernel)
        kernel /= kernel.sum(axis=-1, keepdims=True)
        return torch.as_tensor(kernel, dtype=self.dtype, device=self.device)

    def _rotation_operator(self, alpha_deg: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Bilinear rotation by ``alpha_deg`` (kornia's convention, about the centre of the padded
        plane) as CSR matrices: ``[band·depth, Lx·Ly]`` from the object's (x, y) plane to the
        detector-frame planes (row = column·P + depth) and its transpose."""
        n, p = self.n_xy, self.n_depth
        column = torch.arange(self.n_band, dtype=torch.float64) + (self.pad - self.half_r)
        depth = torch.arange(p, dtype=torch.float64)
        w, h = torch.meshgrid(column, depth, indexing="ij")  # rows ordered (column, depth)
        c, cos, sin = (p - 1) / 2, math.cos(math.radians(alpha_deg)), math.sin(math.radians(alpha_deg))
        src_y = c + cos * (w - c) - sin * (h - c) - self.pad  # source position in the unpadded object
        src_x = c + sin * (w - c) + cos * (h - c) - self.pad
        x0, y0 = src_x.floor(), src_y.floor()
        fx, fy = src_x - x0, src_y - y0
        inside = ((w >= 0) & (w < p)).reshape(-1, 1)  # PyTomography's planes end at the padded edge
        xs = torch.stack([x0, x0, x0 + 1, x0 + 1], -1).reshape(-1, 4)
        ys = torch.stack([y0, y0 + 1, y0, y0 + 1], -1).reshape(-1, 4)
        weight = torch.stack([(1 - fx) * (1 - fy), (1 - fx) * fy, fx * (1 - fy), fx * fy], -1).reshape(-1, 4)
        keep = inside & (xs >= 0) & (xs < n) & (ys >= 0) & (ys < n) & (weight > 0)
        rows = torch.arange(xs.shape[0]).unsqueeze(1).expand(-1, 4)[keep]
        cols = (xs * n + ys).long()[keep]  # ascending within a row
        vals = weight[keep].to(self.dtype)
        shape = (xs.shape[0], n * n)
        forward = _csr(rows, cols, vals, shape, self.device)
        order = torch.sort(cols, stable=True).indices  # transposed: by column, rows stay ascending
        transpose = _csr(cols[order], rows[order], vals[order], shape[::-1], self.device)
        return forward, transpose

    # ------------------------------------------------------------------ per-view operators

    def _attenuation(self, view: int) -> torch.Tensor:
        """``exp(−∫μ)`` from each detector-frame voxel to the detector, ``[band, depth, Lz]``."""
        cached = self._attenuation_cache[view]
        if cached is not None:
            return cached
        mu = torch.mm(self.rotations[view], self.mu).view(self.n_band, self.n_depth, self.n_z)
        beyond = torch.cumsum(mu.flip(1), 1).flip(1) - mu / 2  # PyTomography's rev_cumsum
        factor = torch.exp(-self.dx * beyond)
        if self.cache_attenuation:
            self._attenuation_cache[view] = factor = factor.to(torch.float16)
        return factor

    def _lateral_blocks(self, view: int) -> torch.Tensor:
        """Lateral blur and sum over depth for one block of output columns as a matrix
        ``[block, (block + 2h_r)·depth]`` (the same for every block: the blur is shift-invariant)."""
        kernels = self.kernels_r[view].T  # [taps, depth]
        return (kernels[self._tap] * self._tap_valid.unsqueeze(-1)).reshape(self._tap.shape[0], -1)

    def _project_columns(self, planes: torch.Tensor, view: int, out: torch.Tensor) -> None:
        """``out[r, z] = Σ_depth Σ_tap kernel_r[depth, tap]·planes[r + tap, depth, z]``."""
        if self.kernels_r is None:
            torch.sum(planes, 1, out=out)
            return
        blocks, width = self._lateral_blocks(view), self.n_depth
        for start in range(0, self.n_xy, _BLOCK):
            size = min(_BLOCK, self.n_xy - start)
            matrix = blocks[:size, : (size + 2 * self.half_r) * width]
            torch.mm(matrix, planes[start : start + size + 2 * self.half_r].reshape(-1, self.n_z), out=out[start : start + size])

    def _spread_columns(self, proj: torch.Tensor, view: int, planes: torch.Tensor) -> None:
        """Adjoint of :meth:`_project_columns`: ``planes`` (zeroed here) ``= blurᵀ proj``."""
        if self.kernels_r is None:
            planes.copy_(proj.unsqueeze(1).expand_as(planes))
            return
        planes.zero_()
        blocks, width = self._lateral_blocks(view), self.n_depth
        for start in range(0, self.n_xy, _BLOCK):
            size = min(_BLOCK, self.n_xy - start)
            matrix = blocks[:size, : (size + 2 * self.half_r) * width]
            planes[start : start + size + 2 * self.half_r].reshape(-1, self.n_z).addmm_(matrix.T, proj[start : start + size])

    def _blur_z(self, planes_padded: torch.Tensor, view: int) -> torch.Tensor:
        """Axial blur of ``[band, depth, Lz + 2h_z]`` (zero z margins) → ``[band, depth, Lz]``;
        the kernels are symmetric, so this is also its own adjoint on the padded layout."""
        if self.kernels_z is None:
            return planes_padded
        return F.conv1d(planes_padded, self.kernels_z[view].unsqueeze(1), groups=self.n_depth)

    # ------------------------------------------------------------------ SystemMatrix interface

    def _views(self, subset_idx: int | None) -> list[int]:
        if subset_idx is None:
            return list(range(self.proj_meta.num_projections))
        return self.subset_indices_array[subset_idx].tolist()

    def set_n_subsets(self, n_subsets: int) -> None:
        """Subset ``m`` holds views ``m, m + n_subsets, …`` (as PyTomography)."""
        indices = torch.arange(self.proj_meta.num_projections, dtype=torch.long, device=self.device)
        self.subset_indices_array = [indices[i::n_subsets] for i in range(n_subsets)]

    def get_projection_subset(self, projections: torch.Tensor, subset_idx: int) -> torch.Tensor:
        """Views of ``projections`` ``[..., views, r, z]`` in subset ``subset_idx``."""
        return projections[..., self.subset_indices_array[subset_idx], :, :]

    def get_weighting_subset(self, subset_idx: int | None) -> float:
        """Fraction of the views in subset ``subset_idx`` (1 for all views)."""
        if subset_idx is None:
            return 1
        return len(self.subset_indices_array[subset_idx]) / self.proj_meta.num_projections

    def compute_normalization_factor(self, subset_idx: int | None = None) -> torch.Tensor:
        """``Hᵀ1`` over the views of ``subset_idx`` (all views when None)."""
        n_views = len(self._views(subset_idx))
        return self.backward(torch.ones((n_views, *self.proj_meta.shape[1:]), dtype=self.dtype, device=self.device), subset_idx)

    @torch.no_grad()
    def forward(self, object: torch.Tensor, subset_idx: int | None = None) -> torch.Tensor:
        """Projections ``[views in subset, Ly, Lz]`` of ``object`` ``[Lx, Ly, Lz]``."""
        views = self._views(subset_idx)
        n, nz, hz = self.n_xy, self.n_z, self.half_z
        source = torch.zeros((n * n, nz + 2 * hz), dtype=self.dtype, device=self.device)
        source[:, hz : hz + nz] = object.to(self.device, self.dtype).reshape(n * n, nz)
        planes = torch.empty((self.n_band * self.n_depth, nz + 2 * hz), dtype=self.dtype, device=self.device)
        planes_3d = planes.view(self.n_band, self.n_depth, nz + 2 * hz)
        proj = torch.empty((len(views), n, nz), dtype=self.dtype, device=self.device)
        for i, view in enumerate(views):
            torch.mm(self.rotations[view], source, out=planes)
            if self.mu is not None:
                planes_3d[..., hz : hz + nz].mul_(self._attenuation(view))
            self._project_columns(self._blur_z(planes_3d, view), view, proj[i])
        return proj

    @torch.no_grad()
    def backward(self, proj: torch.Tensor, subset_idx: int | None = None) -> torch.Tensor:
        """Back projection ``[Lx, Ly, Lz]`` of ``proj`` ``[views in subset, Ly, Lz]`` (exact adjoint of
        :meth:`forward`)."""
        views = self._views(subset_idx)
        n, nz, hz = self.n_xy, self.n_z, self.half_z
        proj = proj.to(self.device, self.dtype)
        planes_3d = torch.zeros((self.n_band, self.n_depth, nz + 2 * hz), dtype=self.dtype, device=self.device)
        image = torch.zeros((n * n, nz), dtype=self.dtype, device=self.device)
        for i, view in enumerate(views):
            self._spread_columns(proj[i], view, planes_3d[..., hz : hz + nz])
            planes = self._blur_z(planes_3d, view)
            if self.mu is not None:
                planes = planes * self._attenuation(view)
            image.addmm_(self.rotations_t[view], planes.reshape(-1, nz))
        return image.view(n, n, nz)


def _csr(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """CSR matrix from entries sorted by row (columns ascending within a row)."""
    counts = torch.bincount(rows, minlength=shape[0])
    crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, cols, vals, shape, check_invariants=False).to(device)

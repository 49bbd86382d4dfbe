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
* the projection is the sum over depth, cropped to the detector's ``Lr`` columns: by default
  the central ``Lr = Ly`` ones, as PyTomography. Two generalisations (for cameras whose
  detectors are narrower than the field of view and moved sideways, the GE StarGuide ring):
  ``Lr`` may differ from ``Ly``, and view ``i`` may have a lateral offset ``o_i`` (cm), its
  column ``k`` then sampling the detector-frame position ``(P − 1)/2 + k − (Lr − 1)/2 + o_i/dx``
  along r (bilinear, so sub-voxel offsets are modelled, not rounded). The measured data are
  never resampled;
* optional per-view weights ``w_i`` (relative acquisition times) multiply view ``i``.

The speed comes from precomputing, per view, everything that does not depend on the object:

* the bilinear rotation as a sparse CSR matrix (and its transpose) from the object's ``(x, y)``
  plane to the detector-frame planes, applied to all z at once (the object as a ``[Lx·Ly, Lz]``
  matrix); it produces only the ``Lr + 2·h_r`` columns that reach the detector after the lateral
  blur of half-width ``h_r``, and only the depths the rotated object reaches;
* for views 180° apart with mirrored lateral offsets (every opposed pair of a 360° orbit) the
  detector frame of one is the other's mirrored in column and depth: the second's rotation
  operator is the first's with its rows reversed, and its attenuation factors follow from the
  first's (``exp(−dx·Σμ')`` over the line divided by them), so each pair costs one interpolation
  and one rotation of the μ-map;
* the attenuation factors, computed once per view (pair) on first use and kept in float16
  (``cache_attenuation``), only on the depth planes that hold some μ: nearer the detector they
  are 1, farther every plane has the whole line's;
* the blur: z as a depthwise 1-D convolution (one kernel per depth plane), r together with the
  sum over depth as dense products with a banded matrix, by blocks of output columns;
* work tensors allocated once per instance (the convolution's output is the only large tensor
  allocated per view);
* the sensitivity images ``Hᵀ1`` without blurring: the blur of ones is separable, so its adjoint
  is an outer product of two small per-view tables (``compute_normalization_factor``).

For 128³ voxels and 120 views (a 34 × 22 cm water body) this holds about 135 MB of rotation
operators, 310 MB of attenuation factors (765 MB on every depth plane) and about 55 MB of work tensors.

The back projection applies the transposes of the same operators, so it is the exact adjoint of
the forward projection (PyTomography's back projection rotates the other way instead, which is
adjoint only up to interpolation error). Everything runs on ``pytomography.device`` in
``pytomography.dtype`` (float32).
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from recon.ptomo import SPECTObjectMeta, SPECTProjMeta, SPECTPSFMeta, pytomography
from pytomography.projectors import SystemMatrix  # noqa: E402  (after recon.ptomo: warning filters)
from pytomography.utils import compute_pad_size  # noqa: E402

_BLOCK = 16  # output columns per banded-matrix product of the lateral blur


class NativeSPECTSystemMatrix(SystemMatrix):
    """SPECT system matrix: rotation, attenuation, depth-dependent Gaussian blur, sum over depth.

    Same interface and physics as PyTomography's ``SPECTSystemMatrix`` built with
    ``[SPECTAttenuationTransform(attenuation_map), SPECTPSFTransform(psf_meta)]``; see the
    module docstring for the conventions.

    Args:
        object_meta: object voxel sizes (cm) and shape ``(Lx, Ly, Lz)`` with ``Lx == Ly``.
        proj_meta: projection shape ``(views, Lr, Lz)``, PyTomography's internal angles (degrees)
            and detector radii (cm, distance from the axis of rotation to the detector face,
            one per view; needed only with ``psf_meta``). ``Lr`` is usually ``Ly``.
        attenuation_map: μ (1/cm) on the object grid ``[Lx, Ly, Lz]``, or None for no attenuation; or
            a function returning it, called once the rotation operators are built (so that the map
            may be made meanwhile, e.g. from a CT read in another thread).
        psf_meta: collimator response, or None for no blur.
        cache_attenuation: keep the per-view attenuation factors (float16) after first use;
            False recomputes them at every projection (slower, less memory).
        lateral_offsets_cm: per view, the position (cm) of the centre of the detector's columns
            along r relative to the axis of rotation; None for centred detectors.
        view_weights: per view, a factor on its projection (e.g. its acquisition time relative
            to the reference frame duration); None for 1.
    """

    def __init__(
        self,
        object_meta: SPECTObjectMeta,
        proj_meta: SPECTProjMeta,
        attenuation_map: torch.Tensor | Callable[[], torch.Tensor] | None = None,
        psf_meta: SPECTPSFMeta | None = None,
        cache_attenuation: bool = True,
        lateral_offsets_cm: np.ndarray | None = None,
        view_weights: np.ndarray | None = None,
    ) -> None:
        super().__init__(object_meta, proj_meta, [], [])
        lx, ly, lz = (int(n) for n in object_meta.shape)
        if lx != ly or int(proj_meta.shape[2]) != lz:
            raise ValueError(
                f"object {tuple(object_meta.shape)} and projections {tuple(proj_meta.shape)} must be "
                "[L, L, Lz] and [views, Lr, Lz]"
            )
        n_views = int(proj_meta.num_projections)
        offsets = np.zeros(n_views) if lateral_offsets_cm is None else np.asarray(lateral_offsets_cm, dtype=np.float64)
        if offsets.shape != (n_views,):
            raise ValueError(f"{offsets.size} lateral offsets for {n_views} views")
        if view_weights is not None and np.shape(view_weights) != (n_views,):
            raise ValueError(f"{np.size(view_weights)} view weights for {n_views} views")
        if psf_meta is not None and proj_meta.radii is None:
            raise ValueError("collimator response modelling needs proj_meta.radii")
        self.device = pytomography.device
        self.dtype = pytomography.dtype
        self.n_xy, self.n_z = lx, lz
        self.n_r = int(proj_meta.shape[1])  # detector columns
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
        self.n_band = self.n_r + 2 * self.half_r  # detector-frame columns that reach the detector
        self.opposite = _opposite_views(angles, offsets)
        # the views' own operators, then those of their opposite views (the partner's, mirrored: no new
        # interpolation weights)
        operators: list = [None] * n_views
        own = [view for view in range(n_views) if not 0 <= self.opposite[view] < view]
        for view, operator in zip(own, map_views(lambda v: self._rotation_operator(angles[v] - 270.0, offsets[v] / self.dx), own)):
            operators[view] = operator
        mirrored = [view for view in range(n_views) if 0 <= self.opposite[view] < view]
        for view, operator in zip(mirrored, map_views(lambda v: _mirrored(*operators[self.opposite[v]], self.n_depth), mirrored)):
            operators[view] = operator
        self.rotations, self.rotations_t, self.depth_ranges = zip(*operators)
        self.view_weights = (
            None if view_weights is None
            else torch.as_tensor(np.asarray(view_weights, dtype=np.float64), dtype=self.dtype, device=self.device)
        )
        if callable(attenuation_map):
            attenuation_map = attenuation_map()
        self.mu = (  # −μ·dx/2: minus half the optical depth of a voxel, [(x, y), z]
            None if attenuation_map is None
            else attenuation_map.to(self.device, self.dtype).reshape(lx * ly, lz).mul(-0.5 * self.dx).contiguous()
        )
        self._attenuation_cache: list[tuple[int, int, torch.Tensor, torch.Tensor] | None] = [None] * len(angles)
        self._mu_support = (  # 1 at the (x, y) where some z has μ, [(x, y), 1]
            None if self.mu is None else self.mu.ne(0).any(1, keepdim=True).to(self.dtype)
        )
        self._attenuation_work = threading.local()  # per thread: two [band, P, Lz] work tensors
        if psf_meta is not None:
            offset = torch.arange(_BLOCK + 2 * self.half_r, device=self.device) - torch.arange(
                _BLOCK, device=self.device
            ).unsqueeze(1)  # [b, j] → tap index j − b
            self._tap = offset.clamp(0, 2 * self.half_r)
            self._tap_valid = ((offset >= 0) & (offset <= 2 * self.half_r)).to(self.dtype).unsqueeze(-1)
        # Work tensors reused by every projection (so one instance projects one thing at a time):
        # large tensors allocated per view or per call are page-faulted in again and again (the C
        # allocator returns them to the system), which costs as much as the arithmetic. The zero
        # margins of the object (z) and of the padded projection (r) stay zero; the per-view
        # tensors are leading parts of buffers sized for all P depths.
        depth, hr, hz = self.n_depth, self.half_r, self.half_z
        self._source = self._zeros(lx * ly, lz + 2 * hz)  # the object as [(x, y), z]
        self._planes = self._zeros(self.n_band, depth, lz + 2 * hz)  # detector frame [column, depth, z]
        self._taps = self._zeros(_BLOCK, _BLOCK + 2 * hr, depth) if psf_meta is not None else None
        self._matrix = self._zeros(_BLOCK * depth, _BLOCK + 2 * hr) if psf_meta is not None else None
        self._proj_padded = self._zeros(self.n_r + 4 * hr, lz)  # one view, 2h_r zero rows on each side

    # ------------------------------------------------------------------ construction helpers

    def _zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

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

    def _rotation_operator(
        self, alpha_deg: float, shift: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Bilinear rotation by ``alpha_deg`` (kornia's convention, about the centre of the padded
        plane) as CSR matrices: ``[band·depth, Lx·Ly]`` from the object's (x, y) plane to the
        detector-frame planes that the object reaches, depths ``[first, stop)`` of ``P`` (row =
        column·(stop − first) + depth − first), its transpose and ``(first, stop)``. ``shift``:
        the detector's lateral offset in voxels (its columns sample the plane that far along r)."""
        n, p = self.n_xy, self.n_depth
        first_column = (p - 1) / 2 - (self.n_r - 1) / 2 + shift - self.half_r  # = pad − h_r when centred
        column = torch.arange(self.n_band, dtype=torch.float64) + first_column
        depth = torch.arange(p, dtype=torch.float64)
        w, h = torch.meshgrid(column, depth, indexing="ij")  # rows ordered (column, depth)
        c, cos, sin = (p - 1) / 2, math.cos(math.radians(alpha_deg)), math.sin(math.radians(alpha_deg))
        src_y = c + cos * (w - c) - sin * (h - c) - self.pad  # source position in the unpadded object
        src_x = c + sin * (w - c) + cos * (h - c) - self.pad
        x0, y0 = src_x.floor(), src_y.floor()
        fx, fy = src_x - x0, src_y - y0
        inside = ((w > -1) & (w < p)).unsqueeze(-1)  # PyTomography's planes end at the padded edge
        x_in, x1_in = ((x0 >= low) & (x0 < low + n) for low in (0, -1))  # x0, x0 + 1 inside the object
        y_in, y1_in = ((y0 >= low) & (y0 < low + n) for low in (0, -1))
        weight = torch.stack([(1 - fx) * (1 - fy), (1 - fx) * fy, fx * (1 - fy), fx * fy], -1)  # [column, depth, corner]
        keep = torch.stack([x_in & y_in, x_in & y1_in, x1_in & y_in, x1_in & y1_in], -1) & inside & (weight > 0)
        used = keep.any(2).any(0).nonzero().flatten()
        first, stop = (int(used[0]), int(used[-1]) + 1) if used.numel() else (0, 1)  # (0, 1): sees nothing
        # kept entries in (column, depth, corner) order, as flat indices: entry // 4 is its row
        entry = keep[:, first:stop].reshape(-1).nonzero().squeeze(1)
        rows = entry >> 2
        corner = torch.tensor([0.0, 1.0, n, n + 1.0], dtype=torch.float64)[entry & 3]  # (x0, y0) → that corner
        cols = ((x0 * n + y0)[:, first:stop].reshape(-1)[rows] + corner).long()  # ascending within a row
        vals = weight[:, first:stop].reshape(-1)[entry].to(self.dtype)
        shape = (self.n_band * (stop - first), n * n)
        forward = _csr(rows, cols, vals, shape, self.device)
        # transposed: by column, rows stay ascending (a stable sort: radix on 16-bit keys, in numpy)
        keys = cols.numpy().astype(np.uint16 if n * n <= 1 << 16 else np.int64)
        order = torch.from_numpy(np.argsort(keys, kind="stable"))
        transpose = _csr(cols[order], rows[order], vals[order], shape[::-1], self.device)
        return forward, transpose, (first, stop)

    # ------------------------------------------------------------------ per-view operators

    def _attenuation(self, view: int) -> tuple[int, int, torch.Tensor, torch.Tensor]:
        """``exp(−∫μ)`` from each detector-frame voxel to the detector (μ is zero beyond the view's
        depth range) as ``(a, b, inner, far)``: the depth planes ``[a, b)`` hold some μ and their
        factors are ``inner`` ``[band, b − a, Lz]``; nearer the detector than ``b`` nothing is crossed
        (factor 1); farther than ``a`` the whole line is, the same ``far`` ``[band, Lz]`` on every
        plane. Cached in float16 (``cache_attenuation``), the opposite view's with it: there the same
        μ line is crossed the other way, ``exp(−dx·(Σ_{x'<x} μ' + μ'/2)) = exp(−dx·Σ μ') /
        exp(−dx·(Σ_{x'>x} μ' + μ'/2))``, mirrored in column and depth."""
        cached = self._attenuation_cache[view]
        if cached is not None:
            return cached
        # in two work tensors kept for this, per thread (fresh large tensors cost their page faults again and again)
        work = getattr(self._attenuation_work, "tensors", None)
        if work is None:
            work = self._attenuation_work.tensors = tuple(self._zeros(self.n_band, self.n_depth, self.n_z) for _ in range(2))
        first, stop = self.depth_ranges[view]
        band, depths, nz = self.n_band, stop - first, self.n_z
        total, exponent = (_leading(w, band, depths, nz) for w in work)
        total.view(-1, nz).addmm_(self.rotations[view], self.mu, beta=0)  # −μ'·dx/2
        reach = torch.mm(self.rotations[view], self._mu_support).view(band, depths).amax(0)  # > 0: some μ
        crossed = reach.nonzero().flatten()
        a, b = (int(crossed[0]), int(crossed[-1]) + 1) if crossed.numel() else (0, 0)
        for depth in range(b - 2, a - 1, -1):  # −dx/2·Σ_{x' ≥ x} μ', in place: a loop over the
            total[:, depth].add_(total[:, depth + 1])  # planes is 3-4× faster than flip-cumsum-flip
        # −dx·(Σ_{x' > x} μ' + μ'/2): PyTomography's rev_cumsum (total is 0 nearer than b)
        end = min(b, depths - 1)
        torch.add(total[:, a:end], total[:, a + 1 : end + 1], out=exponent[:, a:end])
        if b == depths:
            exponent[:, -1] = total[:, -1]
        line = total[:, a].clone() if a < b else total.new_zeros(band, nz)  # −dx/2·Σ μ' over the line
        whole = line + line  # the exponent farther than a
        inner = exponent[:, a:b]
        if not self.cache_attenuation:
            return a, b, inner.exp_(), whole.exp_()
        partner = self.opposite[view]
        if partner >= 0:  # −dx·(Σ_{x' < x} μ' + μ'/2) = 2·line − exponent, then mirrored in column and depth
            reverse = _leading(work[0], band, b - a, nz)  # over the sums, no longer needed
            torch.neg(inner, out=reverse).add_(line.unsqueeze(1), alpha=2.0).exp_()
            factors = inner.exp_().to(torch.float16)
            flipped = _leading(work[1], band * (b - a), nz)  # over the exponent, used
            last_first = torch.arange(flipped.shape[0] - 1, -1, -1, device=self.device)
            torch.index_select(reverse.view(-1, nz), 0, last_first, out=flipped)
            self._attenuation_cache[partner] = (
                depths - b,
                depths - a,
                flipped.view(band, b - a, nz).to(torch.float16),
                whole.exp().flip(0).to(torch.float16),
            )
        else:
            factors = inner.exp_().to(torch.float16)
        self._attenuation_cache[view] = cached = (a, b, factors, whole.exp_().to(torch.float16))
        return cached

    def _cache_attenuation(self, subset_idx: int | None) -> None:
        """Every view's cached attenuation factors (:meth:`_attenuation`), computed over the views in
        parallel (:func:`map_views`). Each opposite pair's are computed from the view that first use
        would have reached first: those of ``subset_idx`` (all views when None), then the subsets in
        order, so the factors are those of the lazy path to the last bit."""
        if self.mu is None or not self.cache_attenuation:
            return
        order = self._views(subset_idx)
        if subset_idx is not None:
            order += [view for subset in range(len(self.subset_indices_array)) for view in self._views(subset)]
        computed, claimed = [], set()
        for view in order:
            if self._attenuation_cache[view] is None and view not in claimed:
                computed.append(view)
                claimed.update((view, self.opposite[view]))
        map_views(self._attenuation, computed)

    def _attenuate(self, planes: torch.Tensor, view: int) -> torch.Tensor:
        """``planes`` ``[band, depths, Lz]`` multiplied in place by the attenuation factors of ``view``
        (:meth:`_attenuation`): the whole line's on the planes farther than those holding μ, nothing
        (1) on the planes nearer the detector."""
        a, b, inner, far = self._attenuation(view)
        # the cached float16 factors converted first: a product of mixed types costs 3-4× more
        planes[:, :a].mul_(far.to(planes.dtype).unsqueeze(1))
        planes[:, a:b].mul_(inner.to(planes.dtype))
        return planes

    def _lateral_matrix(self, view: int, taps: torch.Tensor, matrix: torch.Tensor | None = None) -> torch.Tensor:
        """Lateral blur and sum over depth for one block of ``r``, written into the buffers.

        ``taps[b, j, depth] = kernel_r[depth, j − b]`` (zero where ``j − b`` is not a tap), viewed as
        ``[block, (block + 2h_r)·depths]``, maps detector-frame columns ``j`` to output columns ``b``.
        With ``matrix`` (``[(block·depths), block + 2h_r]``) the adjoint's block, from the reversed
        kernels, is written there and returned instead."""
        first, stop = self.depth_ranges[view]
        kernels = self.kernels_r[view, first:stop]
        if matrix is not None:
            kernels = kernels.flip(-1)
        taps = _leading(taps, _BLOCK, _BLOCK + 2 * self.half_r, stop - first)
        torch.index_select(kernels.T, 0, self._tap.flatten(), out=taps.view(-1, stop - first))
        taps.mul_(self._tap_valid)
        if matrix is None:
            return taps.view(_BLOCK, -1)
        matrix = _leading(matrix, _BLOCK * (stop - first), _BLOCK + 2 * self.half_r)
        matrix.view(_BLOCK, stop - first, -1).copy_(taps.permute(0, 2, 1))
        return matrix

    def _project_columns(self, planes: torch.Tensor, view: int, out: torch.Tensor, taps: torch.Tensor) -> None:
        """Lateral blur and sum over depth: ``out[r, z] = Σ_depth Σ_tap kernel[depth, tap]·
        planes[r + tap, depth, z]``, as products with one banded matrix per block of ``r``."""
        if self.kernels_r is None:
            torch.sum(planes, 1, out=out)
            return
        matrix = self._lateral_matrix(view, taps)
        for start in range(0, self.n_r, _BLOCK):
            size = min(_BLOCK, self.n_r - start)
            inputs = planes[start : start + size + 2 * self.half_r].reshape(-1, self.n_z)
            torch.mm(matrix[:size, : inputs.shape[0]], inputs, out=out[start : start + size])

    def _spread_columns(
        self, proj: torch.Tensor, view: int, planes: torch.Tensor, taps: torch.Tensor, matrix: torch.Tensor
    ) -> None:
        """Adjoint of :meth:`_project_columns`: ``planes[column, depth, z]`` from ``proj`` padded with
        ``2h_r`` zero rows at both ends (``[Lr + 4h_r, Lz]``), block by block of columns."""
        if self.kernels_r is None:
            planes.copy_(proj.unsqueeze(1).expand_as(planes))
            return
        matrix = self._lateral_matrix(view, taps, matrix)
        for start in range(0, self.n_band, _BLOCK):
            size = min(_BLOCK, self.n_band - start)
            torch.mm(
                matrix[: size * planes.shape[1], : size + 2 * self.half_r],
                proj[start : start + size + 2 * self.half_r],
                out=planes[start : start + size].reshape(-1, self.n_z),
            )

    def _blur_z(self, planes_padded: torch.Tensor, view: int, adjoint: bool = False) -> torch.Tensor:
        """Axial blur of ``[band, depths, Lz + 2h_z]`` (zero z margins) → ``[band, depths, Lz]``; with
        ``adjoint`` the transpose, which is the same operation with the kernels reversed."""
        if self.kernels_z is None:
            return planes_padded
        first, stop = self.depth_ranges[view]
        kernels = self.kernels_z[view, first:stop]
        if adjoint:
            kernels = kernels.flip(-1)
        return F.conv1d(planes_padded, kernels.unsqueeze(1), groups=stop - first)

    def _view_planes(self, view: int) -> torch.Tensor:
        """The detector-frame work tensor for ``view``: ``[band, depths, Lz + 2h_z]``."""
        first, stop = self.depth_ranges[view]
        return _leading(self._planes, self.n_band, stop - first, self.n_z + 2 * self.half_z)

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

    def _blurred_ones(
        self, kernels: torch.Tensor | None, view: int, positions: int, length: int, reach: int
    ) -> torch.Tensor:
        """One axis's blur, adjoint, applied to ``length`` ones: ``[depths, positions]``, at position
        ``p`` of depth plane ``d`` the sum of the taps ``t`` of ``kernels[view, d]`` whose output
        ``p − t + reach`` lies in ``[0, length)`` (1 away from the edges); ones without blur."""
        first, stop = self.depth_ranges[view]
        if kernels is None:
            return torch.ones((stop - first, positions), dtype=self.dtype, device=self.device)
        output = (
            torch.arange(positions, device=self.device)[:, None]
            - torch.arange(kernels.shape[-1], device=self.device)
            + reach
        )
        inside = ((output >= 0) & (output < length)).to(self.dtype)  # [positions, taps]
        return kernels[view, first:stop] @ inside.T

    @torch.no_grad()
    def compute_normalization_factor(self, subset_idx: int | None = None) -> torch.Tensor:
        """``Hᵀ1`` over the views of ``subset_idx`` (all views when None).

        Equal to ``backward`` of ones, computed without blurring: the blur is separable, so its
        adjoint applied to ones is, per view, the outer product of the adjoints along r and z
        applied to ones (each 1 except within a kernel's reach of the detector's edges)."""
        n, nz = self.n_xy, self.n_z
        self._cache_attenuation(subset_idx)
        image = torch.zeros((n * n, nz), dtype=self.dtype, device=self.device)
        for view in self._views(subset_idx):
            first, stop = self.depth_ranges[view]
            planes = _leading(self._planes, self.n_band, stop - first, nz)
            along_r = self._blurred_ones(self.kernels_r, view, self.n_band, self.n_r, 0)  # [depths, band]
            along_z = self._blurred_ones(self.kernels_z, view, nz, nz, self.half_z)  # [depths, Lz]
            if self.view_weights is not None:
                along_z.mul_(self.view_weights[view])
            torch.mul(along_r.T.unsqueeze(-1), along_z, out=planes)
            if self.mu is not None:
                self._attenuate(planes, view)
            image.addmm_(self.rotations_t[view], planes.view(-1, nz))
        return image.view(n, n, nz)

    @torch.no_grad()
    def forward(self, object: torch.Tensor, subset_idx: int | None = None) -> torch.Tensor:
        """Projections ``[views in subset, Lr, Lz]`` of ``object`` ``[Lx, Ly, Lz]``."""
        views = self._views(subset_idx)
        n, nz, hz = self.n_xy, self.n_z, self.half_z
        source = self._source
        source[:, hz : hz + nz] = object.to(self.device, self.dtype).reshape(n * n, nz)
        proj = torch.empty((len(views), self.n_r, nz), dtype=self.dtype, device=self.device)
        for i, view in enumerate(views):
            planes = self._view_planes(view)
            planes.view(-1, nz + 2 * hz).addmm_(self.rotations[view], source, beta=0)
            if self.mu is not None:
                self._attenuate(planes[..., hz : hz + nz], view)
            self._project_columns(self._blur_z(planes, view), view, proj[i], self._taps)
            if self.view_weights is not None:
                proj[i].mul_(self.view_weights[view])
        return proj

    @torch.no_grad()
    def backward(self, proj: torch.Tensor, subset_idx: int | None = None) -> torch.Tensor:
        """Back projection ``[Lx, Ly, Lz]`` of ``proj`` ``[views in subset, Lr, Lz]`` (exact adjoint of
        :meth:`forward`)."""
        views = self._views(subset_idx)
        n, nz, hz, hr = self.n_xy, self.n_z, self.half_z, self.half_r
        padded = self._proj_padded
        proj = proj.to(self.device, self.dtype)
        image = torch.zeros((n * n, nz), dtype=self.dtype, device=self.device)
        for i, view in enumerate(views):
            padded[2 * hr : 2 * hr + self.n_r] = proj[i]
            if self.view_weights is not None:
                padded[2 * hr : 2 * hr + self.n_r].mul_(self.view_weights[view])
            planes = self._view_planes(view)
            planes[..., :hz].zero_()  # the z margins move with the view's depth range
            planes[..., hz + nz :].zero_()
            self._spread_columns(padded, view, planes[..., hz : hz + nz], self._taps, self._matrix)
            blurred = self._blur_z(planes, view, adjoint=True)
            if self.mu is not None:
                # in place: a fresh tensor, or the buffer that the next view rewrites
                self._attenuate(blurred, view)
            image.addmm_(self.rotations_t[view], blurred.reshape(-1, nz))
        return image.view(n, n, nz)


def map_views(function: Callable, views: Sequence[int]) -> list:
    """``[function(view) for view in views]`` by a pool of as many threads as torch's intra-op threads
    (torch's kernels release the GIL), each running its own kernels on one thread so that the cores
    are not oversubscribed; in this thread on a GPU, at one thread or for one view. ``function`` must
    write nothing another view's call reads (each view's arithmetic is then the sequential one)."""
    threads = torch.get_num_threads()
    if pytomography.device.type != "cpu" or threads < 2 or len(views) < 2:
        return [function(view) for view in views]
    try:
        with ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            return list(pool.map(function, views))
    finally:
        torch.set_num_threads(threads)  # the workers set the process's default to 1


def _opposite_views(angles_deg: np.ndarray, offsets: np.ndarray) -> list[int]:
    """Per view, a view 180° away whose detector is offset the other way (so that its detector
    frame is this one's mirrored in column and depth), or −1; views are paired once, in order."""
    opposite = [-1] * len(angles_deg)
    for view, (angle, offset) in enumerate(zip(angles_deg, offsets)):
        if opposite[view] >= 0:
            continue
        for other in range(view + 1, len(angles_deg)):
            turn = (angles_deg[other] - angle) % 360.0
            if opposite[other] < 0 and abs(turn - 180.0) < 1e-6 and abs(offsets[other] + offset) < 1e-9:
                opposite[view], opposite[other] = other, view
                break
    return opposite


def _mirrored(
    forward: torch.Tensor, transpose: torch.Tensor, depths: tuple[int, int], n_depth: int
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """The rotation operator of the opposite view (see :meth:`NativeSPECTSystemMatrix.
    _rotation_operator`): rotating by another 180° mirrors the detector frame in column and depth
    about the centre of the padded plane, so its rows are those of ``forward`` in reverse order
    (row ``k`` ↔ ``rows − 1 − k``), over depths ``[P − stop, P − first)``."""
    crow, cols, vals = (a.cpu().numpy() for a in (forward.crow_indices(), forward.col_indices(), forward.values()))
    n_rows = crow.size - 1
    counts = np.diff(crow)[::-1]
    new_crow = np.concatenate([[0], np.cumsum(counts)]).astype(crow.dtype)
    row = np.repeat(np.arange(n_rows, dtype=crow.dtype), counts)  # of each new entry
    source = crow[n_rows - 1 - row] + np.arange(row.size, dtype=crow.dtype) - new_crow[row]
    mirrored = _csr_from(*(torch.from_numpy(a) for a in (new_crow, cols[source], vals[source])), forward.shape)
    crow, cols, vals = (a.cpu().numpy() for a in (transpose.crow_indices(), transpose.col_indices(), transpose.values()))
    row = np.repeat(np.arange(crow.size - 1, dtype=crow.dtype), np.diff(crow))
    source = crow[row] + crow[row + 1] - 1 - np.arange(row.size, dtype=crow.dtype)  # reversed in each row
    mirrored_t = _csr_from(*(torch.from_numpy(a) for a in (crow, n_rows - 1 - cols[source], vals[source])), transpose.shape)
    first, stop = depths
    device = forward.device
    return mirrored.to(device), mirrored_t.to(device), (n_depth - stop, n_depth - first)


def _leading(buffer: torch.Tensor, *shape: int) -> torch.Tensor:
    """The first elements of contiguous ``buffer`` viewed as ``shape``."""
    return buffer.view(-1)[: math.prod(shape)].view(shape)


def _csr(
    rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, shape: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """CSR matrix from entries sorted by row (columns ascending within a row)."""
    counts = torch.bincount(rows, minlength=shape[0])
    crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return _csr_from(crow, cols, vals, shape).to(device)


def _csr_from(crow: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, shape) -> torch.Tensor:
    """CSR tensor with 32-bit indices (what MKL takes)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow.int(), cols.int(), vals, tuple(shape), check_invariants=False)

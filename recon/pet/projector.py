"""List-mode line integrals with time of flight, in PyTorch, forward and exactly adjoint.

Ray-driven model: the line of response (LOR) from element position ``p1`` to ``p2`` (mm) is
clipped to the image box and its stretch [a, b] cut into n = max(2, ceil((b - a) / ``step_mm``))
equal pieces, sampled at their midpoints; the image is interpolated trilinearly at each sample
(``grid_sample``) and the samples are summed times their spacing [mm], so a value is a line
integral (image units x mm).

Time of flight: position along the LOR is ``l`` [mm] from its midpoint towards ``p2``; PETSIRD's
TOF coordinate (t1 - t2) c / 2 equals ``l``. The probability that an annihilation at ``l`` lands in
TOF bin [e_k, e_k+1) is Phi((e_k+1 - l) / sigma) - Phi((e_k - l) / sigma), sigma = FWHM / 2.3548;
the bins' kernels sum to 1 so the non-TOF line integral is the sum over all bins. For TOF events
only the stretch within ``n_sigma`` sigmas of the bin is sampled.

The back-projection is the adjoint of the forward sum (same samples, same weights), so
<A x, y> = <x, A^T y> holds to floating-point rounding.

Two implementations of this one model: on the CPU a C kernel with OpenMP threads
(``lm_kernel.c``, compiled once per machine with the system's C compiler into the user cache,
``$THERAFLOW_CACHE`` or ``~/.cache/theraflow``), one LOR per loop iteration, so nothing of size
events x samples is held in memory and the back-projection needs no autograd graph; on a GPU (or
where no C compiler is found, or with ``THERAFLOW_PET_KERNEL=torch``) PyTorch's ``grid_sample``
in chunks of ``batch`` LORs, the back-projection its autograd adjoint. Both agree to float
rounding (tests/test_pet_projector.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch


@dataclass(frozen=True)
class ImageGrid:
    """Axis-aligned image grid in patient LPS: ``shape`` (nx, ny, nz), voxel ``spacing_mm`` and
    ``origin_mm`` (centre of voxel (0, 0, 0)). Arrays on this grid are indexed [x, y, z]."""

    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing_mm)) / 1000.0

    def box_mm(self) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper) corners of the image box [mm] (voxel edges)."""
        origin, spacing = np.asarray(self.origin_mm), np.asarray(self.spacing_mm)
        return origin - spacing / 2, origin + (np.asarray(self.shape) - 0.5) * spacing

    def to_image(self, array_xyz: np.ndarray) -> sitk.Image:
        """A SimpleITK image (identity direction) of an [x, y, z] array on this grid."""
        image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array_xyz, (2, 1, 0))))
        image.SetSpacing(tuple(float(s) for s in self.spacing_mm))
        image.SetOrigin(tuple(float(o) for o in self.origin_mm))
        return image

    def reference_image(self) -> sitk.Image:
        return self.to_image(np.zeros(self.shape, dtype=np.float32))


@dataclass(frozen=True)
class TOFBins:
    """TOF bin edges [mm of (t1 - t2) c / 2] and the timing resolution as FWHM [mm]."""

    edges_mm: tuple[float, ...]
    fwhm_mm: float

    @property
    def sigma_mm(self) -> float:
        return self.fwhm_mm / (2.0 * math.sqrt(2.0 * math.log(2.0)))

    @property
    def max_bin_width_mm(self) -> float:
        return float(np.max(np.diff(self.edges_mm)))


_KERNEL_SOURCE = Path(__file__).with_name("lm_kernel.c")
MAX_CHANNELS = 8  # images projected together (lm_kernel.c)


@cache
def cpu_kernel() -> ctypes.CDLL | None:
    """The compiled C kernel (built on first use and cached per source hash), or None when it
    is switched off (``THERAFLOW_PET_KERNEL=torch``) or no C compiler with OpenMP is found."""
    if os.environ.get("THERAFLOW_PET_KERNEL", "").lower() == "torch":
        return None
    source = _KERNEL_SOURCE.read_bytes()
    cache_dir = Path(os.environ.get("THERAFLOW_CACHE") or Path.home() / ".cache" / "theraflow")
    library = cache_dir / f"lm_kernel-{hashlib.sha256(source).hexdigest()[:16]}.so"
    if not library.exists():
        compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
        if compiler is None:
            return None
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            built = Path(tmp) / library.name
            command = [compiler, "-O3", "-fopenmp", "-fPIC", "-shared", "-o", str(built), str(_KERNEL_SOURCE), "-lm"]
            if subprocess.run(command, capture_output=True).returncode != 0:
                return None
            os.replace(built, library)  # atomic: concurrent builders leave one complete file
    lib = ctypes.CDLL(str(library))
    pointer, int64 = ctypes.c_void_p, ctypes.c_int64
    for function in (lib.lm_forward, lib.lm_back):
        function.argtypes = [pointer, pointer, pointer, pointer, pointer, pointer, pointer, int64, pointer, ctypes.c_int, int64]
        function.restype = ctypes.c_int
    return lib


class ListModeProjector:
    """Forward and back projection of batches of LORs (see module docstring).

    ``tof``: None for non-TOF projection. ``step_mm``: largest sample spacing along a LOR
    (default: half the median voxel side). ``batch``: LORs per chunk of the PyTorch path (memory
    ~ batch x samples), which processes LORs in chunks of similar sampled length.
    """

    def __init__(self, grid: ImageGrid, tof: TOFBins | None = None, *, step_mm: float | None = None,
                 n_sigma: float = 3.5, batch: int = 65536, device: str | torch.device | None = None) -> None:
        self.grid = grid
        self.tof = tof
        self.step_mm = float(step_mm or float(np.median(grid.spacing_mm)) / 2.0)
        self.n_sigma = n_sigma
        self.batch = batch
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        lower, upper = grid.box_mm()
        self._lower = torch.tensor(lower, dtype=torch.float32, device=self.device)
        self._upper = torch.tensor(upper, dtype=torch.float32, device=self.device)
        origin = torch.tensor(grid.origin_mm, dtype=torch.float32, device=self.device)
        extent = torch.tensor([(n - 1) * s for n, s in zip(grid.shape, grid.spacing_mm)], dtype=torch.float32, device=self.device)
        self._origin, self._extent = origin, torch.clamp(extent, min=1e-6)
        if tof is not None:
            self._tof_edges = torch.tensor(tof.edges_mm, dtype=torch.float32, device=self.device)
            self._tof_half_range = tof.max_bin_width_mm / 2.0 + n_sigma * tof.sigma_mm
        self._kernel = cpu_kernel() if self.device.type == "cpu" else None
        if self._kernel is not None:
            scale = 1.0 / (tof.sigma_mm * math.sqrt(2.0)) if tof is not None else 0.0
            half_range = self._tof_half_range if tof is not None else 0.0
            self._geometry = torch.tensor([*grid.origin_mm, *grid.spacing_mm, *lower, *upper, self.step_mm, scale, half_range],
                                          dtype=torch.float64)
            self._dims = torch.tensor(grid.shape, dtype=torch.int64)
            self._edges = torch.tensor(tof.edges_mm if tof is not None else (0.0,), dtype=torch.float32)

    # -- geometry -------------------------------------------------------------------------
    def clip(self, p1: torch.Tensor, p2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Midpoint, unit direction p1->p2, and the stretch [l_in, l_out] (mm from the midpoint) inside the box."""
        mid = (p1 + p2) / 2
        d = p2 - p1
        length = torch.linalg.norm(d, dim=1, keepdim=True).clamp(min=1e-6)
        u = d / length
        safe = torch.where(u.abs() < 1e-9, torch.full_like(u, 1e-9), u)
        t1 = (self._lower - mid) / safe
        t2 = (self._upper - mid) / safe
        l_in = torch.minimum(t1, t2).amax(dim=1)
        l_out = torch.maximum(t1, t2).amin(dim=1)
        return mid, u, l_in, l_out

    def _stretch(self, p1: torch.Tensor, p2: torch.Tensor, tof_bin: torch.Tensor | None):
        """Midpoint, direction and the sampled stretch [a, b] (mm from the midpoint) of each LOR."""
        mid, u, l_in, l_out = self.clip(p1, p2)
        if tof_bin is None:
            return mid, u, l_in, l_out
        centre = (self._tof_edges[tof_bin] + self._tof_edges[tof_bin + 1]) / 2
        return mid, u, torch.maximum(l_in, centre - self._tof_half_range), torch.minimum(l_out, centre + self._tof_half_range)

    def _samples(self, p1: torch.Tensor, p2: torch.Tensor, tof_bin: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised grid_sample coordinates (1, B, S, 1, 3) and weights (B, S) [mm x TOF probability]."""
        mid, u, a, b = self._stretch(p1, p2, tof_bin)
        span = torch.clamp(b - a, min=0.0)
        pieces = torch.clamp(torch.ceil(span / self.step_mm), min=2.0)  # per LOR
        n = int(pieces.max()) if span.numel() else 2
        delta = span / pieces
        k = torch.arange(n, dtype=torch.float32, device=self.device)
        used = k[None, :] < pieces[:, None]  # (B, S): samples beyond a LOR's own count weigh 0
        ell = torch.addcmul(a[:, None], k[None, :] + 0.5, delta[:, None])  # (B, S) mm from the midpoint
        if tof_bin is None:
            weight = delta[:, None] * used
        else:
            scale = 1.0 / (self.tof.sigma_mm * math.sqrt(2.0))
            upper = (self._tof_edges[tof_bin + 1][:, None] - ell).mul_(scale).erf_()
            lower = (self._tof_edges[tof_bin][:, None] - ell).mul_(scale).erf_()
            weight = upper.sub_(lower).mul_(0.5 * delta[:, None]).mul_(used)
        # normalised grid_sample coordinates, computed directly: c(l) = c(mid) + l * dc/dl
        start = 2.0 * (mid - self._origin) / self._extent - 1.0
        slope = 2.0 * u / self._extent
        normalised = torch.addcmul(start[:, None, :], ell[..., None], slope[:, None, :])
        return normalised[None, :, :, None, :], weight

    # -- projections ------------------------------------------------------------------------
    def _volume(self, image_xyzc: torch.Tensor) -> torch.Tensor:
        return image_xyzc.permute(3, 2, 1, 0)[None]

    def _forward_chunk(self, volume: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, tof_bin: torch.Tensor | None) -> torch.Tensor:
        grid, weight = self._samples(p1, p2, tof_bin)
        values = torch.nn.functional.grid_sample(volume, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        return (values[0, :, :, :, 0] * weight).sum(dim=2).T  # (B, channels)

    def _chunks(self, p1: torch.Tensor, p2: torch.Tensor, tof_bin: torch.Tensor | None):
        """Index tensors of chunks of LORs sorted by sampled length (so each chunk needs few samples)."""
        with torch.no_grad():
            _, _, a, b = self._stretch(p1, p2, tof_bin)
            order = torch.argsort(torch.clamp(b - a, min=0.0))
        for start in range(0, order.numel(), self.batch):
            yield order[start:start + self.batch]

    def _call_kernel(self, function, values: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor,
                     tof_bin: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
        """Run ``lm_forward`` (values: image, out: per LOR) or ``lm_back`` (values: per LOR, out: image)."""
        values = values.detach().to(torch.float32).contiguous()
        p1, p2 = (p.detach().to(torch.float32).contiguous() for p in (p1, p2))
        bins = None if tof_bin is None else tof_bin.contiguous()  # int64 (forward, back)
        status = function(values.data_ptr(), self._dims.data_ptr(), self._geometry.data_ptr(), p1.data_ptr(), p2.data_ptr(),
                          None if bins is None else bins.data_ptr(), self._edges.data_ptr(), p1.shape[0], out.data_ptr(),
                          torch.get_num_threads(), out.shape[-1])
        if status != 0:
            raise MemoryError("PET back-projection: no memory for the per-thread images")
        return out

    def forward(self, image_xyz: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor,
                tof_bin: torch.Tensor | None = None) -> torch.Tensor:
        """Line integrals (image units x mm; TOF-weighted when ``tof_bin`` (any integer type) is
        given) of B LORs: (B,) of an [x, y, z] image, or (B, C) of C images [x, y, z, C] projected
        together along the same samples (C <= 8)."""
        tof_bin = None if tof_bin is None else tof_bin.long()
        image = image_xyz if image_xyz.dim() == 4 else image_xyz[..., None]
        if image.shape[3] > MAX_CHANNELS:
            raise ValueError(f"at most {MAX_CHANNELS} images projected together")
        out = torch.empty((p1.shape[0], image.shape[3]), dtype=torch.float32, device=self.device)
        if self._kernel is not None:
            self._call_kernel(self._kernel.lm_forward, image, p1, p2, tof_bin, out)
        else:
            volume = self._volume(image.to(self.device, torch.float32))
            with torch.no_grad():
                for sl in self._chunks(p1, p2, tof_bin):
                    out[sl] = self._forward_chunk(volume, p1[sl], p2[sl], None if tof_bin is None else tof_bin[sl])
        return out if image_xyz.dim() == 4 else out[:, 0]

    def back(self, values: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor,
             tof_bin: torch.Tensor | None = None) -> torch.Tensor:
        """Adjoint of :meth:`forward`: an [x, y, z] image from one value per LOR (B,), or C images
        [x, y, z, C] from C values per LOR (B, C), back-projected together."""
        tof_bin = None if tof_bin is None else tof_bin.long()
        columns = values if values.dim() == 2 else values[:, None]
        if columns.shape[1] > MAX_CHANNELS:
            raise ValueError(f"at most {MAX_CHANNELS} images projected together")
        total = torch.zeros((*self.grid.shape, columns.shape[1]), dtype=torch.float32, device=self.device)
        if self._kernel is not None:
            self._call_kernel(self._kernel.lm_back, columns, p1, p2, tof_bin, total)
        else:
            for sl in self._chunks(p1, p2, tof_bin):
                with torch.enable_grad():  # the adjoint is autograd's, also inside reconstruction loops run without grad
                    probe = torch.zeros(total.shape, dtype=torch.float32, device=self.device, requires_grad=True)
                    projected = self._forward_chunk(self._volume(probe), p1[sl], p2[sl], None if tof_bin is None else tof_bin[sl])
                    (grad,) = torch.autograd.grad(projected, probe, grad_outputs=columns[sl].to(self.device, torch.float32))
                total += grad
        return total if values.dim() == 2 else total[..., 0]

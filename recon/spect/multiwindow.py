"""Joint reconstruction of one activity image from several photopeak windows.

PyTomography's composition: one system matrix per window (its own attenuation map at the
window's photopeak energy and collimator response at that energy), each followed by the
window's sensitivity, stacked by ``ExtendedSystemMatrix`` so that projections are
``[window, view, r, z]`` and the Poisson log-likelihood sums over windows. A window's
sensitivity is its counts per unit of the object per frame relative to a reference window (for
a calibrated camera: cps/MBq of that window over the reference window's), so the image is in
the reference window's units and calibrates as a single-window reconstruction does.

``theraflow recon spect --photopeaks all`` (``SpectParameters(photopeaks='all')``) uses it; the
single-window reconstruction (the default) does not, and its result is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from recon.ptomo import SystemMatrix
from recon.spect.reconstruct import Algorithm, Progress, reconstruct


class WindowSensitivity:
    """Projection-to-projection transform multiplying a window's projections by its relative
    sensitivity (dimensionless); self-adjoint."""

    def __init__(self, sensitivity: float) -> None:
        if not sensitivity > 0:
            raise ValueError(f"window sensitivity {sensitivity!r} must be positive")
        self.sensitivity = float(sensitivity)

    def configure(self, object_meta, proj_meta) -> None:   # PyTomography's Transform interface
        self.object_meta, self.proj_meta = object_meta, proj_meta

    def forward(self, proj: torch.Tensor) -> torch.Tensor:
        return proj * self.sensitivity

    def backward(self, proj: torch.Tensor) -> torch.Tensor:
        return proj * self.sensitivity


def joint_system(systems: Sequence[SystemMatrix], sensitivities: Sequence[float]) -> SystemMatrix:
    """The windows' system matrices (same object grid and views) stacked with their relative
    sensitivities: forward ``[window, view, r, z]``, backward summed over windows."""
    from pytomography.projectors import ExtendedSystemMatrix

    if len(systems) != len(sensitivities) or not systems:
        raise ValueError("one sensitivity per window system matrix is needed")
    return ExtendedSystemMatrix(list(systems), proj2proj_transforms=[WindowSensitivity(s) for s in sensitivities])


def reconstruct_windows(
    systems: Sequence[SystemMatrix],
    sensitivities: Sequence[float],
    projections: Sequence[torch.Tensor],
    additive: Sequence[torch.Tensor | None],
    algorithm: Algorithm,
    progress: Progress | None = None,
) -> torch.Tensor:
    """One object [x, y, z] from every window's counts ``[view, r, z]`` and expected additive
    counts (scatter; None for none), maximising the likelihood summed over windows."""
    stacked = torch.stack(list(projections))
    extra = torch.stack([torch.zeros_like(p) if a is None else a for p, a in zip(projections, additive)])
    return reconstruct(joint_system(systems, sensitivities), stacked, extra, algorithm, progress)

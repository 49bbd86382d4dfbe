"""The list-mode PET system matrix, behind PyTomography's ``SystemMatrix`` interface.

For event e on the LOR of elements (i, j) in TOF bin k, the expected count density is

    ybar_e = w_e * [A_e x] + r_e + s_e,   w_e = q * eff_ij * a_ij,

x: activity concentration [Bq/mL] at acquisition start on an :class:`ImageGrid`; A_e: the TOF
line integral [mm] of :class:`ListModeProjector`; eff_ij: PETSIRD detection efficiency [mm^2]
(normalisation and calibration); a_ij = exp(-integral mu): attenuation; q = 1e-3 mL/mm^3 x
positron fraction x integral of exp(-lambda t) over the acquisition [s], which turns Bq/mL into
annihilations per mm^3; r_e, s_e: randoms and scatter (additive terms, given to the likelihood).

The sensitivity image H^T 1 (sum over every LOR of w times its non-TOF line integral) comes from
:func:`recon.pet.sensitivity.sensitivity_image`. PyTomography's ``OSEM`` with a
``PoissonLogLikelihood`` (projections None = list mode, ``additive_term`` = r + s per event)
reconstructs with it unchanged; subsets are interleaved events.
"""

from __future__ import annotations

import torch

from recon.pet.projector import ImageGrid, ListModeProjector
from recon.ptomo import ObjectMeta, SystemMatrix


class EventMeta:
    """Projection-space metadata of a list-mode system matrix: the number of events."""

    def __init__(self, n_events: int) -> None:
        self.n_events = n_events
        self.shape = (n_events,)


class ListModeSystemMatrix(SystemMatrix):
    """H for a list of events (see module docstring); tensors on the projector's device.

    ``p1``, ``p2``: (n, 3) element positions [mm]; ``tof_bin``: (n,) or None (non-TOF);
    ``weights``: (n,) w_e; ``sensitivity``: [x, y, z] image H^T 1 over all LORs.
    """

    def __init__(self, projector: ListModeProjector, p1: torch.Tensor, p2: torch.Tensor, tof_bin: torch.Tensor | None,
                 weights: torch.Tensor, sensitivity: torch.Tensor) -> None:
        grid: ImageGrid = projector.grid
        super().__init__(ObjectMeta(grid.spacing_mm, grid.shape), EventMeta(p1.shape[0]))
        self.projector = projector
        self.p1, self.p2, self.tof_bin, self.weights = p1, p2, tof_bin, weights
        self.sensitivity = sensitivity
        self.initial_level = 1.0  # Bq/mL of the uniform initial image (see start_from_counts)
        self.subset_indices_array = [torch.arange(p1.shape[0])]

    def start_from_counts(self, expected_trues: float) -> None:
        """Start OSEM from the uniform image that predicts ``expected_trues`` counts over all LORs.

        From a far too low start (1 Bq/mL), EM's multiplicative updates are throttled by the
        additive terms, which then dominate every event's expectation: a few subsets are lost."""
        total = float(self.sensitivity.sum())
        self.initial_level = expected_trues / total if total > 0 else 1.0

    def _events(self, subset_idx: int | None):
        if subset_idx is None:
            return self.p1, self.p2, self.tof_bin, self.weights
        idx = self.subset_indices_array[subset_idx]
        return self.p1[idx], self.p2[idx], None if self.tof_bin is None else self.tof_bin[idx], self.weights[idx]

    def forward(self, object: torch.Tensor, subset_idx: int | None = None) -> torch.Tensor:
        p1, p2, tof_bin, weights = self._events(subset_idx)
        return weights * self.projector.forward(object, p1, p2, tof_bin)

    def backward(self, proj: torch.Tensor, subset_idx: int | None = None, return_norm_constant: bool = False):
        p1, p2, tof_bin, weights = self._events(subset_idx)
        values = proj.expand(weights.shape) if proj.numel() == 1 else proj
        image = self.projector.back(weights * values, p1, p2, tof_bin)
        if return_norm_constant:
            return image, self.compute_normalization_factor(subset_idx)
        return image

    def set_n_subsets(self, n_subsets: int) -> None:
        n = self.p1.shape[0]
        self.subset_indices_array = [torch.arange(k, n, n_subsets) for k in range(n_subsets)]

    def get_subset_splits(self, n_subsets: int) -> list:
        self.set_n_subsets(n_subsets)
        return self.subset_indices_array

    def get_projection_subset(self, projections: torch.Tensor, subset_idx: int | None) -> torch.Tensor:
        if subset_idx is None or projections.numel() <= 1:
            return projections
        return projections[self.subset_indices_array[subset_idx]]

    def get_weighting_subset(self, subset_idx: int | None) -> float:
        if subset_idx is None:
            return 1.0
        return len(self.subset_indices_array[subset_idx]) / self.p1.shape[0]

    def compute_normalization_factor(self, subset_idx: int | None = None) -> torch.Tensor:
        """H_m^T 1: the subset's share of the sensitivity image (interleaved subsets)."""
        return self.get_weighting_subset(subset_idx) * self.sensitivity

    def _get_object_initial(self, device=None) -> torch.Tensor:
        return torch.full(self.object_meta.shape, self.initial_level, device=self.sensitivity.device) * (self.sensitivity > 0)

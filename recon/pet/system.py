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
reconstructs with it unchanged; subsets are interleaved events or time frames (``subsets``), and
events are projected in chunks whose LOR end points are looked up from their element indices.
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


DEFAULT_CHUNK = 1_000_000  # events per projector call: end points (2 x 12 bytes per event) exist for one chunk at a time


class ListModeSystemMatrix(SystemMatrix):
    """H for a list of events (see module docstring); tensors on the projector's device.

    ``positions``: (N, 3) element centres [mm]; ``elements``: (n, 2) element indices of each
    event (its LOR's end points are looked up per chunk of ``chunk`` events, never for all events
    at once, so memory grows by the ids, TOF bins and weights only); ``tof_bin``: (n,) or None
    (non-TOF); ``weights``: (n,) w_e; ``sensitivity``: [x, y, z] image H^T 1 over all LORs.
    ``subsets``: how OSEM splits the events, "interleaved" (every n-th event, the default) or
    "time" (consecutive blocks of the list, i.e. time frames of equal counts); both are views,
    no index arrays are held.
    """

    def __init__(self, projector: ListModeProjector, positions: torch.Tensor, elements: torch.Tensor, tof_bin: torch.Tensor | None,
                 weights: torch.Tensor, sensitivity: torch.Tensor, *, chunk: int = DEFAULT_CHUNK, subsets: str = "interleaved") -> None:
        if subsets not in ("interleaved", "time"):
            raise ValueError(f"subsets must be 'interleaved' or 'time', not {subsets!r}")
        grid: ImageGrid = projector.grid
        super().__init__(ObjectMeta(grid.spacing_mm, grid.shape), EventMeta(elements.shape[0]))
        self.projector = projector
        self.positions, self.elements, self.tof_bin, self.weights = positions, elements, tof_bin, weights
        self.sensitivity = sensitivity
        self.chunk = chunk
        self.subset_mode = subsets
        self.initial_level = 1.0  # Bq/mL of the uniform initial image (see start_from_counts)
        self.subset_indices_array = [slice(None)]

    def start_from_counts(self, expected_trues: float) -> None:
        """Start OSEM from the uniform image that predicts ``expected_trues`` counts over all LORs.

        From a far too low start (1 Bq/mL), EM's multiplicative updates are throttled by the
        additive terms, which then dominate every event's expectation: a few subsets are lost."""
        total = float(self.sensitivity.sum())
        self.initial_level = expected_trues / total if total > 0 else 1.0

    def _chunks(self, subset_idx: int | None):
        """(elements, tof_bin, weights) of the subset's events, chunk by chunk (views)."""
        index = slice(None) if subset_idx is None else self.subset_indices_array[subset_idx]
        elements, weights = self.elements[index], self.weights[index]
        tof_bin = None if self.tof_bin is None else self.tof_bin[index]
        for start in range(0, elements.shape[0], self.chunk):
            part = slice(start, start + self.chunk)
            yield elements[part], None if tof_bin is None else tof_bin[part], weights[part]

    def _ends(self, elements: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.positions[elements[:, 0].long()], self.positions[elements[:, 1].long()]

    def line_integrals(self, image: torch.Tensor, subset_idx: int | None = None) -> torch.Tensor:
        """A_e x of every event of the subset (TOF-weighted when TOF bins are given), without w_e."""
        return torch.cat([self.projector.forward(image, *self._ends(elements), tof_bin)
                          for elements, tof_bin, _ in self._chunks(subset_idx)])

    def forward(self, object: torch.Tensor, subset_idx: int | None = None) -> torch.Tensor:
        return torch.cat([weights * self.projector.forward(object, *self._ends(elements), tof_bin)
                          for elements, tof_bin, weights in self._chunks(subset_idx)])

    def backward(self, proj: torch.Tensor, subset_idx: int | None = None, return_norm_constant: bool = False):
        image, start = torch.zeros(self.object_meta.shape, dtype=torch.float32, device=self.sensitivity.device), 0
        for elements, tof_bin, weights in self._chunks(subset_idx):
            values = proj.expand(weights.shape) if proj.numel() == 1 else proj[start:start + weights.shape[0]]
            image += self.projector.back(weights * values, *self._ends(elements), tof_bin)
            start += weights.shape[0]
        if return_norm_constant:
            return image, self.compute_normalization_factor(subset_idx)
        return image

    def set_n_subsets(self, n_subsets: int) -> None:
        n = self.elements.shape[0]
        if self.subset_mode == "interleaved":
            self.subset_indices_array = [slice(k, n, n_subsets) for k in range(n_subsets)]
        else:
            edges = [round(k * n / n_subsets) for k in range(n_subsets + 1)]
            self.subset_indices_array = [slice(edges[k], edges[k + 1]) for k in range(n_subsets)]

    def get_subset_splits(self, n_subsets: int) -> list:
        self.set_n_subsets(n_subsets)
        return self.subset_indices_array

    def get_projection_subset(self, projections: torch.Tensor, subset_idx: int | None) -> torch.Tensor:
        if subset_idx is None or projections.numel() <= 1:
            return projections
        return projections[self.subset_indices_array[subset_idx]]

    def _subset_size(self, subset_idx: int) -> int:
        return len(range(self.elements.shape[0])[self.subset_indices_array[subset_idx]])

    def get_weighting_subset(self, subset_idx: int | None) -> float:
        if subset_idx is None:
            return 1.0
        return self._subset_size(subset_idx) / self.elements.shape[0]

    def compute_normalization_factor(self, subset_idx: int | None = None) -> torch.Tensor:
        """H_m^T 1: the subset's share of the sensitivity image (its share of the events: a
        uniform sample of all LORs for interleaved events, and for time frames of a distribution
        that does not change shape during the acquisition)."""
        return self.get_weighting_subset(subset_idx) * self.sensitivity

    def _get_object_initial(self, device=None) -> torch.Tensor:
        return torch.full(self.object_meta.shape, self.initial_level, device=self.sensitivity.device) * (self.sensitivity > 0)

"""Scatter: a tail-fitted estimate of the scattered coincidences of each prompt event [counts].

Shape: scatter is a broad distribution over LOR space centred on the activity. Its shape is
modelled as the (TOF) line integrals of the first-pass activity estimate, extended beyond the
axial field of view (activity there scatters into it too) and blurred by a wide Gaussian
(``sigma_mm``, default 40 mm), times the pair's detection efficiency.

Level: LORs that miss the attenuating object (integral of mu below ``tail_mu``) carry no trues,
only scatter and randoms ("tails"). Only the near tails are used, LORs passing within
``margin_mm`` of the object: further out the counts are randoms and scatter from activity
outside the field of view, and the blurred shape has no weight there (fitting them makes the
scale depend on the shape's far tail). The scale is
alpha = (prompts in the near tails - randoms there) / (shape summed over all near-tail LORs),
the sum over LOR space coming from the grouped LORs of :mod:`recon.pet.sensitivity`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
from scipy.ndimage import gaussian_filter

from recon.pet.projector import ImageGrid, ListModeProjector
from recon.pet.sensitivity import LORGroups


@dataclass(frozen=True)
class TailFit:
    """Result of the fit: scale, tail counts, and the scatter fraction of all prompts."""

    scale: float
    tail_prompts: int
    tail_randoms: float
    scatter_fraction: float


def scatter_shape_image(activity: torch.Tensor, grid: ImageGrid, sigma_mm: float = 40.0,
                        axial_extension_mm: float = 100.0) -> torch.Tensor:
    """The activity image [x, y, z] blurred by an isotropic Gaussian of ``sigma_mm``.

    Activity beyond the axial field of view scatters into it too: before blurring, the image is
    extended by ``axial_extension_mm`` at both ends with copies of its outermost well-measured
    slice (slice total at least half the median; the sparsely seen end slices are replaced too)."""
    array = activity.detach().cpu().numpy().astype(np.float32)
    totals = array.sum(axis=(0, 1))
    good = np.flatnonzero(totals >= 0.5 * np.median(totals[totals > 0])) if (totals > 0).any() else np.arange(array.shape[2])
    first, last = int(good[0]), int(good[-1])
    pad = int(round(axial_extension_mm / grid.spacing_mm[2]))
    core = array[:, :, first:last + 1]
    extended = np.concatenate([np.repeat(core[:, :, :1], pad + first, axis=2), core,
                               np.repeat(core[:, :, -1:], pad + array.shape[2] - 1 - last, axis=2)], axis=2)
    sigma_voxels = [sigma_mm / s for s in grid.spacing_mm]
    blurred = gaussian_filter(extended, sigma_voxels, mode="constant", truncate=3.0)[:, :, pad:pad + array.shape[2]]
    return torch.tensor(np.clip(blurred, 0, None), dtype=torch.float32, device=activity.device)


def near_object(mu: torch.Tensor, grid: ImageGrid, margin_mm: float, mu_object: float = 0.002) -> torch.Tensor:
    """[x, y, z] 0/1 image: voxels within ``margin_mm`` of the object (mu > ``mu_object`` 1/mm)."""
    body = grid.to_image((mu.cpu().numpy() > mu_object).astype(np.uint8))
    distance = sitk.SignedMaurerDistanceMap(body, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    near = np.transpose(sitk.GetArrayFromImage(distance), (2, 1, 0)) <= margin_mm
    return torch.tensor(near.astype(np.float32), device=mu.device)


def in_near_tails(mu_integral: torch.Tensor, near_integral: torch.Tensor, tail_mu: float) -> torch.Tensor:
    """LORs missing the object (integral of mu < ``tail_mu``) but crossing its neighbourhood."""
    return (mu_integral < tail_mu) & (near_integral > 0)


def fit_tails(shape_image: torch.Tensor, groups: LORGroups, group_tail: torch.Tensor, projector_non_tof: ListModeProjector,
              tail_prompts: int, tail_randoms: float, n_prompts: int) -> TailFit:
    """Scale of the scatter shape so that it explains the tail prompts left after randoms.

    ``group_tail``: which grouped LORs are near-tail LORs; ``tail_prompts`` and ``tail_randoms``:
    prompts and expected randoms on the near-tail LORs."""
    shape_per_group = groups.efficiency * projector_non_tof.forward(shape_image, groups.p1, groups.p2)
    tail = group_tail
    tail_shape = float(shape_per_group[tail].sum())
    excess = max(0.0, tail_prompts - tail_randoms)
    scale = excess / tail_shape if tail_shape > 0 else 0.0
    total = scale * float(shape_per_group.sum())
    return TailFit(scale, tail_prompts, tail_randoms, total / max(n_prompts, 1))

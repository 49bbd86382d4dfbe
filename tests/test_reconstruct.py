"""OSEM and BSREM (relative-difference prior) on a small noisy problem."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recon.io.nm_projections import ProjectionGeometry
from recon.spect.reconstruct import Algorithm, reconstruct
from recon.spect.system import RowRange, system_matrix


@pytest.fixture(scope="module")
def problem():
    n, rows = 32, 12
    geometry = ProjectionGeometry(np.arange(0, 360, 6.0), np.full(60, 150.0), 4.0, rows, n, (0.0, 0.0), 30.0)
    system = system_matrix(geometry, RowRange(0, rows), None, None)
    x = torch.arange(n) - (n - 1) / 2
    disc = (x[:, None] ** 2 + x[None, :] ** 2 < 10**2).float()[:, :, None].expand(n, n, rows).clone()
    torch.manual_seed(1)
    projections = torch.poisson(system.forward(disc * 5.0))
    return system, projections, disc.bool()


def test_bsrem_is_smoother_than_osem_at_the_same_mean(problem):
    system, projections, inside = problem
    core = inside.clone()
    core[:, :, :2] = core[:, :, -2:] = False
    osem = reconstruct(system, projections, None, Algorithm("osem", 6, 6))
    bsrem = reconstruct(system, projections, None, Algorithm("bsrem", 6, 6, beta=1.0))
    cov = lambda img: float(img[core].std() / img[core].mean())  # noqa: E731
    assert float(bsrem[core].mean()) == pytest.approx(float(osem[core].mean()), rel=0.05)
    assert float(osem[core].mean()) == pytest.approx(5.0, rel=0.05)
    assert cov(bsrem) < 0.7 * cov(osem), (cov(bsrem), cov(osem))


def test_algorithm_is_validated():
    with pytest.raises(ValueError):
        Algorithm("mlem")
    with pytest.raises(ValueError):
        Algorithm("osem", 0, 4)

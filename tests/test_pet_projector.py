"""PET list-mode projector: the C kernel and the PyTorch path are one model (agree to float
rounding), and each back-projection is its forward's adjoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recon.pet.projector import ImageGrid, ListModeProjector, TOFBins, cpu_kernel

GRID = ImageGrid((24, 20, 9), (4.0, 5.0, 3.0), (-46.0, -47.5, -12.0))
TOF = TOFBins(tuple(np.linspace(-150.0, 150.0, 21)), 40.0)

pytestmark = pytest.mark.skipif(cpu_kernel() is None, reason="no C compiler: only the PyTorch path exists here")


def _lors(n: int, seed: int = 1):
    """LORs of a 120 mm ring, some missing the box or grazing it, some axis-parallel."""
    rng = np.random.default_rng(seed)
    a, b = rng.uniform(0, 2 * np.pi, (2, n))
    p1 = np.stack([120 * np.cos(a), 120 * np.sin(a), rng.uniform(-20, 20, n)], 1)
    p2 = np.stack([120 * np.cos(b), 120 * np.sin(b), rng.uniform(-20, 20, n)], 1)
    p2[:20, 2] = p1[:20, 2]                 # transaxial planes
    p2[20:30, :2] = -p1[20:30, :2]          # through the axis
    p2[30:40, 0], p1[30:40, 0] = 10.0, 10.0  # parallel to y
    as_f = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    return as_f(p1), as_f(p2), torch.tensor(rng.integers(0, 20, n))


def _pair(tof):
    kernel = ListModeProjector(GRID, tof)
    reference = ListModeProjector(GRID, tof, batch=300)
    reference._kernel = None  # the PyTorch (grid_sample + autograd) path
    assert kernel._kernel is not None
    return kernel, reference


@pytest.mark.parametrize("tof", [None, TOF], ids=["non-TOF", "TOF"])
def test_kernel_and_pytorch_path_agree(tof):
    kernel, reference = _pair(tof)
    p1, p2, bins = _lors(2000)
    bins = bins if tof else None
    image = torch.rand(GRID.shape, generator=torch.Generator().manual_seed(2))
    fast, slow = kernel.forward(image, p1, p2, bins), reference.forward(image, p1, p2, bins)
    assert float(slow.abs().max()) > 5.0 and int((slow == 0).sum()) > 100  # hits and misses both tested
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    values = torch.rand(2000, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(kernel.back(values, p1, p2, bins), reference.back(values, p1, p2, bins), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tof", [None, TOF], ids=["non-TOF", "TOF"])
@pytest.mark.parametrize("path", ["kernel", "pytorch"])
def test_back_projection_is_the_adjoint_on_both_paths(tof, path):
    projector = _pair(tof)[0 if path == "kernel" else 1]
    p1, p2, bins = _lors(1500, seed=4)
    bins = bins if tof else None
    generator = torch.Generator().manual_seed(5)
    x, y = torch.rand(GRID.shape, generator=generator), torch.rand(1500, generator=generator)
    lhs = float((projector.forward(x, p1, p2, bins).double() * y.double()).sum())
    rhs = float((x.double() * projector.back(y, p1, p2, bins).double()).sum())
    assert lhs == pytest.approx(rhs, rel=1e-5)

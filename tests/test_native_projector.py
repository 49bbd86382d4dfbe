"""NativeSPECTSystemMatrix against PyTomography's SPECTSystemMatrix on the same metadata.

A 64×64×32 grid of 4.4 mm voxels, 60 views on a non-circular orbit, a body with lungs and a spine
in the μ-map, background activity with three hot spheres, the GE MEGP response at 208 keV. The
reference matrices come from ``recon.spect.system.system_matrix`` (as the pipeline builds them,
with ``projector="pytomography"``); the native ones from the reference's metadata, μ-map and PSF
metadata.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recon.io.nm_projections import ProjectionGeometry
from recon.ptomo import OSEM, PoissonLogLikelihood, pytomography
from recon.spect.native import NativeSPECTSystemMatrix
from recon.spect.psf import collimator_response
from recon.spect.system import RowRange, reconstruction_grid, system_matrix, to_image

N, NZ, VIEWS, PIXEL_MM = 64, 32, 60, 4.4
SPHERES_CM = ((4.0, 3.0, 1.0, 2.2), (-5.0, 1.0, -1.5, 1.6), (0.5, -6.0, 0.5, 2.6))  # x, y, z, radius


def _coordinates() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Voxel centres [x, y, z] in cm, relative to the centre of the grid."""
    xy = (torch.arange(N) - (N - 1) / 2) * PIXEL_MM / 10
    z = (torch.arange(NZ) - (NZ - 1) / 2) * PIXEL_MM / 10
    return torch.meshgrid(xy, xy, z, indexing="ij")


def _sphere_masks() -> list[torch.Tensor]:
    x, y, z = _coordinates()
    return [(x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 < r**2 for cx, cy, cz, r in SPHERES_CM]


def _phantom() -> tuple[torch.Tensor, torch.Tensor]:
    """(μ-map in 1/cm, activity) on the object grid [x, y, z]."""
    x, y, z = _coordinates()
    body = (x / 11.0) ** 2 + (y / 8.5) ** 2 < 1
    lungs = ((x.abs() - 4.5) / 3.0) ** 2 + ((y - 1.0) / 4.5) ** 2 < 1
    spine = x**2 + (y + 5.5) ** 2 < 1.3**2
    mu = 0.135 * body.float()
    mu[lungs] = 0.04
    mu[spine] = 0.25
    activity = body.float() * (1.0 - 0.7 * lungs.float())
    for mask in _sphere_masks():
        activity[mask] = 8.0
    return mu, activity


def _geometry() -> ProjectionGeometry:
    angles = np.arange(VIEWS) * 360.0 / VIEWS
    radii_mm = 210.0 + 40.0 * np.cos(np.radians(2 * angles)) + 5.0 * np.sin(np.radians(3 * angles))
    return ProjectionGeometry(angles, radii_mm, PIXEL_MM, NZ, N, (0.0, 0.0), (NZ - 1) / 2 * PIXEL_MM)


@pytest.fixture(scope="module")
def phantom() -> tuple[torch.Tensor, torch.Tensor]:
    return _phantom()


@pytest.fixture(scope="module")
def pairs(phantom) -> dict[str, tuple]:
    """(PyTomography matrix, native matrix) without and with attenuation and collimator response."""
    geometry, rows = _geometry(), RowRange(0, NZ)
    mu_image = to_image(phantom[0], reconstruction_grid(geometry, rows))
    response = collimator_response("GE", "MEGP", 208.4)
    built = {}
    for name, mu, psf in (("plain", None, None), ("attenuation", mu_image, None), ("psf", None, response),
                          ("both", mu_image, response)):
        reference = system_matrix(geometry, rows, mu, psf, projector="pytomography")
        transforms = {type(t).__name__: t for t in reference.obj2obj_transforms}
        attenuation, blur = transforms.get("SPECTAttenuationTransform"), transforms.get("SPECTPSFTransform")
        native = NativeSPECTSystemMatrix(
            reference.object_meta,
            reference.proj_meta,
            None if attenuation is None else attenuation.attenuation_map,
            None if blur is None else blur.psf_meta,
        )
        built[name] = reference, native
    return built


def _relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", ["plain", "attenuation", "psf", "both"])
def test_forward_matches_pytomography(pairs, phantom, name):
    reference, native = pairs[name]
    expected = reference.forward(phantom[1])
    projected = native.forward(phantom[1])
    assert projected.shape == expected.shape == (VIEWS, N, NZ)
    assert _relative_l2(projected, expected) < 0.01


def test_attenuation_of_activity_outside_the_body(pairs):
    """Sources in the air beside the body: seen from their side nothing attenuates them (the
    native projector stores no factors on the planes nearer than the μ-map), from the other side
    the whole body does (one plane of whole-line factors for every plane farther than the μ-map)."""
    reference, native = pairs["attenuation"]
    x, y, z = _coordinates()
    sources = (((x - 12.5) ** 2 + y**2 < 1.0) | (x**2 + (y - 11.0) ** 2 < 1.0)) & (z.abs() < 3.0)
    expected = reference.forward(sources.float())
    projected = native.forward(sources.float())
    near, far = expected.sum((1, 2)).max(), expected.sum((1, 2)).min()
    assert far < 0.3 * near  # the body's shadow is in the data
    assert _relative_l2(projected, expected) < 0.01
    assert float((projected.sum((1, 2)) / expected.sum((1, 2)) - 1).abs().max()) < 0.01  # every view


@pytest.mark.parametrize("name", ["plain", "both"])
def test_backward_is_the_adjoint(pairs, name):
    native = pairs[name][1]
    generator = torch.Generator().manual_seed(1)
    x = torch.rand((N, N, NZ), generator=generator).to(pytomography.device)
    y = torch.rand((VIEWS, N, NZ), generator=generator).to(pytomography.device)
    forward = float((native.forward(x).double() * y.double()).sum())
    backward = float((x.double() * native.backward(y).double()).sum())
    assert abs(forward - backward) / abs(forward) < 1e-4


def test_subsets_are_views_of_the_full_projection(pairs, phantom):
    native = pairs["both"][1]
    native.set_n_subsets(7)  # subsets of 9 and of 8 views
    full = native.forward(phantom[1])
    total = torch.zeros_like(phantom[1])
    for k in range(7):
        subset = native.forward(phantom[1], k)
        torch.testing.assert_close(subset, native.get_projection_subset(full, k), rtol=1e-5, atol=1e-5)
        assert native.get_weighting_subset(k) == len(native.subset_indices_array[k]) / VIEWS
        total += native.backward(native.get_projection_subset(full, k), k)
    torch.testing.assert_close(total, native.backward(full), rtol=1e-4, atol=1e-3)
    ones = torch.ones((len(native.subset_indices_array[3]), N, NZ), device=pytomography.device)
    torch.testing.assert_close(native.compute_normalization_factor(3), native.backward(ones, 3))


def test_osem_agrees_with_pytomography(pairs, phantom):
    reference, native = pairs["both"]
    torch.manual_seed(0)
    counts = torch.poisson(native.forward(phantom[1]) * 0.5)
    images = {}
    for name, system in (("reference", reference), ("native", native)):
        with torch.no_grad():
            images[name] = OSEM(PoissonLogLikelihood(system, counts))(4, 6)
    for mask in _sphere_masks():
        ours, theirs = float(images["native"][mask].mean()), float(images["reference"][mask].mean())
        assert abs(ours - theirs) / theirs < 0.02


@pytest.mark.parametrize("name", ["plain", "psf"])
def test_normalization_is_the_back_projection_of_ones(pairs, name):
    """``Hᵀ1`` is computed without blurring ones (separable blur): it must equal ``backward(ones)``,
    also with laterally offset, narrower detectors and unequal view durations."""
    reference, _ = pairs[name]
    transforms = {type(t).__name__: t for t in reference.obj2obj_transforms}
    blur = transforms.get("SPECTPSFTransform")
    meta = reference.proj_meta
    narrow = type(meta)((N - 8, NZ), (PIXEL_MM / 10, PIXEL_MM / 10), meta.angles.cpu().numpy(), meta.radii)
    offsets = 1.5 * np.sin(np.arange(VIEWS))  # cm
    weights = 1.0 + 0.5 * np.cos(np.arange(VIEWS))
    native = NativeSPECTSystemMatrix(reference.object_meta, narrow, _phantom()[0], None if blur is None else blur.psf_meta,
                                     lateral_offsets_cm=offsets, view_weights=weights)
    native.set_n_subsets(4)
    ones = torch.ones((len(native.subset_indices_array[1]), N - 8, NZ), device=pytomography.device)
    torch.testing.assert_close(native.compute_normalization_factor(1), native.backward(ones, 1), rtol=1e-5, atol=1e-5)


def test_opposite_views_share_mirrored_operators(pairs, phantom):
    """A view 180° from another (its detector offset the other way) takes that view's rotation
    operator with its rows reversed and its attenuation factors from the other side of the same
    μ lines: both must equal what is built directly for its angle and offset."""
    reference = pairs["both"][0]
    blur = {type(t).__name__: t for t in reference.obj2obj_transforms}["SPECTPSFTransform"]
    angles = reference.proj_meta.angles.double().numpy()
    offsets = 1.5 * np.cos(np.radians(angles))  # cm, mirrored at 180°
    built = {
        cache: NativeSPECTSystemMatrix(reference.object_meta, reference.proj_meta, phantom[0], blur.psf_meta,
                                       cache_attenuation=cache, lateral_offsets_cm=offsets)
        for cache in (True, False)
    }
    native, direct = built[True], built[False]
    mirrored = [v for v in range(VIEWS) if 0 <= native.opposite[v] < v]
    assert len(mirrored) == VIEWS // 2

    probe = torch.rand((N * N, 4), generator=torch.Generator().manual_seed(2))

    def all_depths(operator: torch.Tensor, depths: tuple[int, int]) -> torch.Tensor:
        """The operator applied to ``probe``, at every depth of the padded plane: ``[band, P, 4]``."""
        full = torch.zeros((native.n_band, native.n_depth, 4))
        full[:, depths[0] : depths[1]] = torch.mm(operator, probe).view(native.n_band, depths[1] - depths[0], 4)
        return full

    for view in mirrored[::7]:
        forward, _, depths = direct._rotation_operator(angles[view] - 270.0, offsets[view] / native.dx)
        ours = all_depths(native.rotations[view], native.depth_ranges[view])
        torch.testing.assert_close(ours, all_depths(forward, depths), rtol=0, atol=1e-5)
        planes = torch.rand((native.rotations[view].shape[0], 4), generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close((torch.mm(native.rotations[view], probe) * planes).sum(),
                                   (probe * torch.mm(native.rotations_t[view], planes)).sum())  # its transpose
        native._attenuation(native.opposite[view])  # computes both views' factors
        first, stop = native.depth_ranges[view]
        ones = torch.ones((native.n_band, stop - first, native.n_z))
        torch.testing.assert_close(native._attenuate(ones.clone(), view), direct._attenuate(ones, view), rtol=2e-3, atol=1e-4)


def test_set_up_over_views_in_threads_is_the_sequential_one(monkeypatch):
    """The rotation operators and the attenuation factors built over the views by a pool of threads
    (``map_views``, at two torch threads) equal, to the last bit, those built one view after another
    (the factors on first use), and so do ``Hᵀ1`` of every subset. Two heads of 16 views with 10 subsets: views 4 and 20 are
    180° apart and subset 0 reaches 20 first, so the pool must compute that pair's factors from 20,
    as first use does."""
    import recon.spect.native as native_module

    angles = np.concatenate([np.arange(16) * 180.0 / 16, 180.0 + np.arange(16) * 180.0 / 16])
    radii_mm = np.hypot(150.0 * np.sin(np.radians(angles)), 110.0 * np.cos(np.radians(angles))) + 40.0
    n, nz = 32, 6
    geometry = ProjectionGeometry(angles, radii_mm, 2 * PIXEL_MM, nz, n, (0.0, 0.0), (nz - 1) * PIXEL_MM)
    grid = reconstruction_grid(geometry, RowRange(0, nz))
    x, y = np.meshgrid(np.arange(n) - (n - 1) / 2, np.arange(n) - (n - 1) / 2, indexing="ij")
    mu = to_image(torch.from_numpy(np.repeat(0.135 * ((x / 13.0) ** 2 + ((y - 2) / 9.0) ** 2 < 1), nz).reshape(n, n, nz)), grid)
    response = collimator_response("GE", "MEGP", 208.4)

    def built() -> tuple[list[np.ndarray], list[np.ndarray]]:
        matrix = system_matrix(geometry, RowRange(0, nz), mu, response)
        assert matrix.opposite[4] == 20
        matrix.set_n_subsets(10)
        norms = [matrix.compute_normalization_factor(k).numpy() for k in range(10)]
        operators = [a.numpy() for m in matrix.rotations + matrix.rotations_t for a in (m.crow_indices(), m.col_indices(), m.values())]
        return operators, norms

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pooled = built()
        monkeypatch.setattr(native_module, "map_views", lambda function, views: [function(v) for v in views])
        monkeypatch.setattr(NativeSPECTSystemMatrix, "_cache_attenuation", lambda self, subset_idx: None)  # on first use
        sequential = built()
    finally:
        torch.set_num_threads(threads)
    for ours, theirs in zip(pooled[0] + pooled[1], sequential[0] + sequential[1]):
        assert np.array_equal(ours, theirs)

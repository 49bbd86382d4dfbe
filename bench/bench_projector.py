"""SPECT projector benchmark (not a test): PyTomography's ``SPECTSystemMatrix`` against
``NativeSPECTSystemMatrix`` on the same clinical-size data, in one process.

Data: ``--size``³ voxels of 4.42 mm, ``--views`` views over 360° on a non-circular orbit (radius
25 cm ± 3 cm), a water cylinder (μ = 0.135 /cm, radius 20 cm) holding activity and three hot
spheres, GE MEGP collimator response at 208.4 keV (Lu-177). The reference matrix is built by
``recon.spect.system.system_matrix(..., projector="pytomography")``; the native one from the
reference's own metadata, μ-map and PSF metadata. Both reconstruct the same Poisson data with
PyTomography's OSEM (8 subsets).

Reported per projector: seconds to build it and to compute the sensitivity images (``Hᵀ1`` of
every subset, once per reconstruction), seconds and CPU seconds (all threads) per OSEM iteration
(forward and back projection of every view), the peak resident memory of the process during
its stage (the native stage runs first and its matrix is deleted before the reference's stage;
on Linux the high-water mark is reset in between), peak GPU memory on a GPU, and the useful
arithmetic rate against that of a large float32 matrix product on the same device. Useful
arithmetic per view and direction, on the ``(Lr + 2h_r)·P·Lz`` voxels that reach the detector
(``P`` the padded width, ``h_r`` the lateral kernel half-width): bilinear rotation 8 flop,
attenuation 1, Gaussian blur 2 per tap along r and along z, sum over depth 1.

Usage: python bench/bench_projector.py [--threads N] [--device cpu|cuda] [--size N] [--views N]
       [--iterations N] [--reference-iterations N]   (0 reference iterations: native only)
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Callable

import numpy as np
import SimpleITK as sitk
import torch
from bench_spect import water_body  # bench/ is on the path when a bench script runs

from recon.io.nm_projections import ProjectionGeometry
from recon.ptomo import OSEM, PoissonLogLikelihood, pytomography
from recon.spect.native import NativeSPECTSystemMatrix
from recon.spect.psf import collimator_response
from recon.spect.system import RowRange, reconstruction_grid, system_matrix

SUBSETS = 8
PIXEL_MM = 4.42


def _sync() -> None:
    if pytomography.device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of ``fn()``."""
    return _timed_cpu(fn)[0]


def _timed_cpu(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds of the process, all threads) of ``fn()``. On a shared
    machine the CPU time is the steadier of the two: other processes stretch the wall clock."""
    _sync()
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    _sync()
    return time.perf_counter() - start, time.process_time() - start_cpu


def _reset_peak_memory() -> None:
    """Start a new peak-memory measurement (resident set: Linux only; GPU: torch's counter)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets the high-water mark that ru_maxrss reports
    except OSError:
        pass
    if pytomography.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak_memory_mb() -> tuple[float, float | None]:
    """(peak resident set of the process, peak GPU memory allocated by torch) since the last reset."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    gpu = torch.cuda.max_memory_allocated() / 2**20 if pytomography.device.type == "cuda" else None
    return rss, gpu


def matmul_gflops(n: int = 2048) -> float:
    """Best float32 rate (GFLOP/s) of an n×n matrix product on ``pytomography.device``."""
    a = torch.rand((n, n), device=pytomography.device)
    a @ a
    return 2 * n**3 / min(_timed(lambda: a @ a) for _ in range(3)) / 1e9


def phantom(size: int, views: int) -> tuple[ProjectionGeometry, sitk.Image, torch.Tensor]:
    """Geometry, μ-map (1/cm) and activity [x, y, z] of the water cylinder with hot spheres."""
    angles = np.arange(views) * 360.0 / views
    radii_mm = 250.0 + 30.0 * np.cos(np.radians(2 * angles))
    geometry = ProjectionGeometry(angles, radii_mm, PIXEL_MM, size, size, (0.0, 0.0), (size - 1) / 2 * PIXEL_MM)
    grid = reconstruction_grid(geometry, RowRange(0, size))
    c = (np.arange(size) - (size - 1) / 2) * PIXEL_MM / 10.0  # cm
    z, y, x = np.meshgrid(c, c, c, indexing="ij")  # SimpleITK array order
    cylinder = (x**2 + y**2 < 20.0**2) & (np.abs(z) < 0.4 * size * PIXEL_MM / 10.0)
    mu, activity = water_body(grid, (x, y, z), cylinder, ((6.0, 4.0, 0.0, 3.0), (-8.0, 2.0, 5.0, 2.0), (0.0, -9.0, -6.0, 4.0)))
    return geometry, mu, activity


def useful_gflop(native: NativeSPECTSystemMatrix) -> float:
    """Useful arithmetic of one OSEM iteration (every view forward and back), GFLOP."""
    taps_r = 2 * native.half_r + 1 if native.kernels_r is not None else 0
    taps_z = 2 * native.half_z + 1 if native.kernels_z is not None else 0
    voxels = native.n_band * native.n_depth * native.n_z
    per_view = voxels * (8 + 1 + 2 * taps_r + 2 * taps_z + 1)
    return 2 * native.proj_meta.num_projections * per_view / 1e9


def run_osem(system, projections: torch.Tensor, iterations: int) -> tuple[float, float, float]:
    """(seconds for the sensitivity images, seconds and CPU seconds per OSEM iteration)."""
    likelihood = PoissonLogLikelihood(system, projections)
    setup = _timed(lambda: likelihood._set_n_subsets(SUBSETS))  # OSEM reuses these
    wall, cpu = _timed_cpu(lambda: OSEM(likelihood)(iterations, SUBSETS))
    return setup, wall / iterations, cpu / iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--size", type=int, default=128, help="voxels per side (default 128)")
    parser.add_argument("--views", type=int, default=120, help="views over 360° (default 120)")
    parser.add_argument("--iterations", type=int, default=3, help="OSEM iterations timed, native (default 3)")
    parser.add_argument("--reference-iterations", type=int, default=1, help="same for PyTomography (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pytomography.device = torch.device(args.device)
    torch.manual_seed(0)

    geometry, mu, truth = phantom(args.size, args.views)
    start = time.perf_counter()
    response = collimator_response("GE", "MEGP", 208.4)
    reference = system_matrix(geometry, RowRange(0, args.size), mu, response, projector="pytomography")
    reference_build = time.perf_counter() - start
    attenuation, psf = reference.obj2obj_transforms
    rows = []

    _reset_peak_memory()
    start = time.perf_counter()
    native = NativeSPECTSystemMatrix(
        reference.object_meta, reference.proj_meta, attenuation.attenuation_map, psf.psf_meta
    )
    native_build = time.perf_counter() - start
    with torch.no_grad():
        first_forward = _timed(lambda: native.forward(truth))  # computes the attenuation factors
        projections = torch.poisson(native.forward(truth))
    timings = run_osem(native, projections, args.iterations)
    rows.append(("native", native_build, *timings, args.iterations, *_peak_memory_mb()))
    gflop = useful_gflop(native)
    del native

    if args.reference_iterations > 0:
        _reset_peak_memory()
        timings = run_osem(reference, projections, args.reference_iterations)
        rows.insert(0, ("PyTomography", reference_build, *timings, args.reference_iterations, *_peak_memory_mb()))

    peak = matmul_gflops()
    print(f"{args.size}³ voxels of {PIXEL_MM / 10:.3f} cm, {args.views} views, {SUBSETS} subsets, "
          f"device {pytomography.device}, {torch.get_num_threads()} threads; "
          f"matmul {peak:.0f} GFLOP/s, useful work {gflop:.0f} GFLOP per iteration")
    print(f"{'projector':12} {'build s':>8} {'Hᵀ1 s':>7} {'s/iter':>7} {'CPU s/iter':>10} {'iters':>5} "
          f"{'peak RSS MB':>11} {'GPU MB':>7} {'GFLOP/s':>8} {'% matmul':>8}")
    for name, build_s, setup_s, iter_s, cpu_s, iters, rss, gpu in rows:
        gpu_text = "-" if gpu is None else f"{gpu:.0f}"
        print(f"{name:12} {build_s:>8.2f} {setup_s:>7.2f} {iter_s:>7.2f} {cpu_s:>10.2f} {iters:>5} {rss:>11.0f} "
              f"{gpu_text:>7} {gflop / iter_s:>8.1f} {100 * gflop / iter_s / peak:>7.1f}%")
    print(f"native: first projection {first_forward:.2f} s (computes the attenuation factors of every view)")
    if len(rows) == 2:
        print(f"speed-up per OSEM iteration: {rows[0][3] / rows[1][3]:.1f}× "
              f"(in CPU time {rows[0][4] / rows[1][4]:.1f}×)")


if __name__ == "__main__":
    main()

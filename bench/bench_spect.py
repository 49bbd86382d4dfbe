"""SPECT reconstruction benchmark (not a test): the WHOLE default reconstruction (OSEM 4 iterations
× 10 subsets, CT/μ-map attenuation, MEGP collimator response, energy-window scatter as the
additive term), set-up included, with the native projector and with PyTomography's side by side.

Layouts:

* ``sample``: the Lu-177 IEC sample (``data-samples/lu177-iec``) through ``reconstruct_spect``, as the
  command runs it: DICOM reading, CT → μ-map, TEW scatter, system matrix, OSEM, calibration;
* ``two-head``: a two-head acquisition, 2 × 32 views over 360° on a body-contour (elliptical) orbit,
  128 × 128 × 88 voxels of 4.42 mm, elliptical water body with hot spheres, scatter 30 % of the
  primary counts (smoothed) as the additive term;
* ``clinical``: 120 views, circular orbit of 26 cm, 128³ voxels of 4.42 mm, same body.

For the synthetic layouts the timed run is ``system_matrix`` + ``reconstruct`` (what the pipeline
times as ``reconstruction_s``); the projections are simulated beforehand (not timed). Set-up is
reported two ways: the run less its OSEM sub-iterations (building the system matrix, the
attenuation factors and the sensitivity images ``Hᵀ1`` of every subset), s/iteration measured
between the progress callbacks of the first and last sub-iterations; and (``set-up*``, the figure
to quote) the run less ``iterations`` × the median of its steady iterations (the 2nd to the last,
each from the end of one iteration to the end of the next), so that work deferred into the first
iteration, lazily computed caches included, still counts as set-up. Each (layout, projector) runs
in its own process so that its peak resident memory (Linux ``ru_maxrss``, reset after the simulation) is its own;
``--parallel`` starts them all at once (on a machine shared with other work, each pair then runs
under the same load). PyTomography's run is long: ``--reference-iterations 1`` runs one iteration
and reports its whole run as set-up + 4 × its seconds per iteration (each of its iterations costs
the same: it caches nothing between them). CPU s: the process's CPU seconds (all its threads) over the
same timed run, and the same extrapolation; on a machine shared with other work they vary far
less than wall seconds at ``--threads 1``, so the CPU ratio at one thread is the load-robust figure
(with more threads on a loaded machine OpenMP threads spin while their sibling waits for a core,
which inflates CPU seconds too).

Usage: python bench/bench_spect.py [--threads N] [--layouts sample two-head clinical]
       [--projectors native pytomography] [--reference-iterations N] [--parallel]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data-samples" / "lu177-iec"
LAYOUTS = ("sample", "two-head", "clinical")
PIXEL_MM = 4.42
DEFAULT_ITERATIONS = 4  # recon.spect.reconstruct.Algorithm's default (10 subsets)


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets the high-water mark that ru_maxrss reports
    except OSError:
        pass


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class _Clock:
    """Progress callable recording when each OSEM sub-iteration ends, in wall and CPU seconds, and
    the whole run's seconds between ``start`` and ``stop``."""

    def __init__(self) -> None:
        self.times: list[tuple[float, float]] = []

    def __call__(self, done: int, total: int) -> None:
        self.times.append(_now())

    def start(self) -> None:
        self.started = _now()

    def stop(self, subsets: int) -> dict:
        """total_s, s_per_iteration (between the first and last sub-iterations), steady_s_per_iteration
        (the median of the whole iterations after the first; None with one iteration) and their CPU
        seconds (all the process's threads)."""
        stopped, (first, last) = _now(), (self.times[0], self.times[-1])
        per = [(b - a) / (len(self.times) - 1) * subsets for a, b in zip(first, last)]
        total = [b - a for a, b in zip(self.started, stopped)]
        ends = np.array(self.times[subsets - 1 :: subsets])  # [iteration, (wall, CPU)]
        steady = np.median(np.diff(ends, axis=0), axis=0).tolist() if len(ends) > 1 else [None, None]
        return {"total_s": total[0], "s_per_iteration": per[0], "steady_s_per_iteration": steady[0],
                "cpu_s": total[1], "cpu_s_per_iteration": per[1], "cpu_steady_s_per_iteration": steady[1]}


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def run_sample(projector: str, iterations: int) -> dict:
    from recon.spect.pipeline import SpectParameters, reconstruct_spect
    from recon.spect.reconstruct import Algorithm

    params = SpectParameters(algorithm=Algorithm(iterations=iterations), projector=projector, registry=SAMPLE / "sensitivity.json")
    clock = _Clock()
    clock.start()
    result = reconstruct_spect([SAMPLE / "nm" / "projections.dcm"], SAMPLE / "ct", params, progress=clock)
    shape = result.provenance["parameters"]["shape_xyz"]
    return {"shape_xyz": shape, "views": int(result.acquisition.geometry.angles_deg.size),
            **clock.stop(params.algorithm.subsets), "iterations": params.algorithm.iterations}


def synthetic(layout: str):
    """(geometry, rows, μ-map, activity [x, y, z]) of a synthetic layout."""
    import numpy as np

    from recon.io.nm_projections import ProjectionGeometry
    from recon.spect.system import RowRange, reconstruction_grid

    if layout == "two-head":
        n, nz = 128, 88
        # two heads 180° apart, 32 views each: the heads' angles interleave over 360°
        angles = np.concatenate([np.arange(32) * 180.0 / 32, 180.0 + np.arange(32) * 180.0 / 32])
        t = np.radians(angles)
        radii = np.hypot(200.0 * np.sin(t), 140.0 * np.cos(t)) + 40.0  # body contour: ellipse + 4 cm
    else:
        n, nz = 128, 128
        angles = np.arange(120) * 3.0
        radii = np.full(120, 260.0)
    geometry = ProjectionGeometry(angles, radii, PIXEL_MM, nz, n, (0.0, 0.0), (nz - 1) / 2 * PIXEL_MM)
    rows = RowRange(0, nz)
    grid = reconstruction_grid(geometry, rows)
    c = (np.arange(n) - (n - 1) / 2) * PIXEL_MM / 10.0  # cm
    cz = (np.arange(nz) - (nz - 1) / 2) * PIXEL_MM / 10.0
    z, y, x = np.meshgrid(cz, c, c, indexing="ij")  # SimpleITK array order
    body = ((x / 17.0) ** 2 + (y / 11.0) ** 2 < 1) & (np.abs(z) < 0.4 * nz * PIXEL_MM / 10.0)
    mu, activity = water_body(grid, (x, y, z), body, ((6.0, 4.0, 0.0, 3.0), (-8.0, 2.0, 5.0, 2.0), (0.0, -6.0, -6.0, 4.0)))
    return geometry, rows, mu, activity


def water_body(grid, xyz_cm, body, spheres):
    """μ-map (water, 0.135 /cm, inside the boolean array ``body``; SimpleITK image on ``grid``) and
    activity [x, y, z] (1 in the body, 8 in each sphere (cx, cy, cz, radius) [cm]; ``xyz_cm`` the
    voxel centres' coordinates [cm] in SimpleITK array order) of a synthetic phantom."""
    import numpy as np
    import SimpleITK as sitk

    from recon.spect.system import to_object

    x, y, z = xyz_cm
    mu = sitk.GetImageFromArray((0.135 * body).astype(np.float32))
    mu.CopyInformation(grid)
    activity = body.astype(np.float32)
    for cx, cy, cz, r in spheres:
        activity[(x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 < r**2] = 8.0
    image = sitk.GetImageFromArray(activity)
    image.CopyInformation(grid)
    return mu, to_object(image)


def run_synthetic(layout: str, projector: str, iterations: int) -> dict:
    import torch
    from scipy.ndimage import gaussian_filter

    from recon.spect.psf import collimator_response
    from recon.spect.reconstruct import Algorithm, reconstruct
    from recon.spect.system import system_matrix

    geometry, rows, mu, truth = synthetic(layout)
    response = collimator_response("GE", "MEGP", 208.4)
    torch.manual_seed(0)
    with torch.no_grad():
        primary = system_matrix(geometry, rows, mu, response).forward(truth * 5.0)
    scatter = torch.from_numpy(gaussian_filter(0.3 * primary.numpy(), (0, 2, 2))).to(primary.dtype)
    projections = torch.poisson(primary + scatter)
    del primary
    gc.collect()
    _reset_peak_rss()
    algorithm = Algorithm(iterations=iterations)
    clock = _Clock()
    clock.start()
    system = system_matrix(geometry, rows, mu, response, projector)
    reconstruct(system, projections, scatter, algorithm, clock)
    return {"shape_xyz": [int(s) for s in truth.shape], "views": int(geometry.angles_deg.size),
            **clock.stop(algorithm.subsets), "iterations": algorithm.iterations}


def _keys(cpu: bool) -> tuple[str, str]:
    return ("cpu_s", "cpu_s_per_iteration") if cpu else ("total_s", "s_per_iteration")


def _whole_run(r: dict, cpu: bool = False) -> float:
    """Seconds (wall, or CPU with ``cpu``) of the whole default reconstruction: measured, or for a
    run of fewer iterations its time plus the missing iterations at the measured seconds per iteration."""
    total, per_iteration = _keys(cpu)
    return r[total] + (DEFAULT_ITERATIONS - r["iterations"]) * r[per_iteration]


def _setup(r: dict, cpu: bool = False) -> float:
    """Seconds (wall, or CPU with ``cpu``) of the run outside its OSEM sub-iterations."""
    total, per_iteration = _keys(cpu)
    return r[total] - r["iterations"] * r[per_iteration]


def _steady_setup(r: dict, cpu: bool = False) -> float | None:
    """Seconds (wall, or CPU with ``cpu``) of the run less ``iterations`` × its median steady iteration
    (work deferred into the first iteration counts as set-up); None for a run of one iteration."""
    steady = r["cpu_steady_s_per_iteration" if cpu else "steady_s_per_iteration"]
    return None if steady is None else r[_keys(cpu)[0]] - r["iterations"] * steady


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    parser.add_argument("--projectors", nargs="+", choices=("native", "pytomography"), default=["native", "pytomography"])
    parser.add_argument("--reference-iterations", type=int, default=DEFAULT_ITERATIONS,
                        help=f"OSEM iterations run with PyTomography (default {DEFAULT_ITERATIONS}; fewer: the whole run is "
                             "extrapolated from its set-up and seconds per iteration)")
    parser.add_argument("--parallel", action="store_true",
                        help="run every (layout, projector) at once (on a loaded machine: each pair then shares the same load)")
    parser.add_argument("--case", nargs=3, help=argparse.SUPPRESS)  # layout projector iterations, in a child process
    args = parser.parse_args()
    if args.case:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        layout, projector, iterations = args.case[0], args.case[1], int(args.case[2])
        result = run_sample(projector, iterations) if layout == "sample" else run_synthetic(layout, projector, iterations)
        result.update(layout=layout, projector=projector, peak_rss_MB=_peak_rss_mb(), threads=torch.get_num_threads(),
                      device="cuda" if torch.cuda.is_available() else "cpu")
        print(json.dumps(result))
        return
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    cases = [(layout, projector) for layout in args.layouts for projector in args.projectors]
    running = {}
    for layout, projector in cases:
        iterations = args.reference_iterations if projector == "pytomography" else DEFAULT_ITERATIONS
        cmd = [sys.executable, __file__, "--case", layout, projector, str(iterations), "--threads", str(args.threads)]
        print(f"running {layout} / {projector} ...", file=sys.stderr, flush=True)
        running[layout, projector] = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        if not args.parallel:
            running[layout, projector].wait()
    results = {}
    for case, process in running.items():
        out, _ = process.communicate()
        if process.returncode:
            print(f"{case} failed ({process.returncode})", file=sys.stderr)
            continue
        results[case] = json.loads(out.strip().splitlines()[-1])
        print(json.dumps(results[case]), file=sys.stderr, flush=True)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"{'layout':9} {'voxels':>11} {'views':>5} {'projector':12} {'whole s':>8} {'s/iter':>7} {'set-up s':>8} "
          f"{'set-up %':>8} {'set-up* s':>9} {'set-up* %':>9} {'ratio':>6} {'CPU s':>7} {'CPU s/it':>8} "
          f"{'CPU set-up %':>12} {'CPU set-up* s':>13} {'CPU set-up* %':>13} {'CPU ratio':>9} {'peak MB':>8} "
          f"{'threads':>7} device")
    for (layout, projector), r in results.items():
        whole, cpu_whole = _whole_run(r), _whole_run(r, cpu=True)
        reference = results.get((layout, "pytomography")) if projector == "native" else None
        ratio = f"{_whole_run(reference) / whole:.1f}x" if reference else "-"
        cpu_ratio = f"{_whole_run(reference, cpu=True) / cpu_whole:.1f}x" if reference else "-"
        note = "" if r["iterations"] == DEFAULT_ITERATIONS else f" (extrapolated from {r['iterations']} iteration(s))"
        steady, cpu_steady = _steady_setup(r), _steady_setup(r, cpu=True)
        steady_s, steady_pct = (f"{steady:.1f}", f"{100 * steady / whole:.0f}%") if steady is not None else ("-", "-")
        cpu_steady_s, cpu_steady_pct = (
            (f"{cpu_steady:.2f}", f"{100 * cpu_steady / cpu_whole:.0f}%") if cpu_steady is not None else ("-", "-")
        )
        print(f"{layout:9} {'x'.join(map(str, r['shape_xyz'])):>11} {r['views']:>5} {projector:12} {whole:>8.1f} "
              f"{r['s_per_iteration']:>7.2f} {_setup(r):>8.1f} {100 * _setup(r) / whole:>7.0f}% {steady_s:>9} "
              f"{steady_pct:>9} {ratio:>6} {cpu_whole:>7.1f} {r['cpu_s_per_iteration']:>8.2f} "
              f"{100 * _setup(r, cpu=True) / cpu_whole:>11.0f}% {cpu_steady_s:>13} {cpu_steady_pct:>13} "
              f"{cpu_ratio:>9} {r['peak_rss_MB']:>8.0f} {r['threads']:>7} {r['device']}{note}")


if __name__ == "__main__":
    main()

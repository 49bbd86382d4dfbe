"""SPECT reconstruction benchmark (not a test): wall time, seconds per OSEM iteration and peak
memory, for the sample phantom and for a clinical-size 128×128×128, 120-view study.

Each case runs in its own process so that its peak resident memory is its own.
Usage: python bench/bench_spect.py [--iterations N] [--clinical-iterations N] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data-samples" / "lu177-iec"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_sample(iterations: int, subsets: int) -> dict:
    from recon.spect.pipeline import SpectParameters, reconstruct_spect
    from recon.spect.reconstruct import Algorithm

    params = SpectParameters(algorithm=Algorithm("osem", iterations, subsets), registry=SAMPLE / "sensitivity.json")
    t0 = time.perf_counter()
    result = reconstruct_spect([SAMPLE / "nm" / "projections.dcm"], SAMPLE / "ct", params)
    total = time.perf_counter() - t0
    timings = result.provenance["timings_s"]
    return {
        "case": "sample IEC phantom",
        "shape_xyz": result.provenance["parameters"]["shape_xyz"],
        "views": int(result.acquisition.geometry.angles_deg.size),
        "iterations x subsets": f"{iterations}x{subsets}",
        "total_s": total,
        "s_per_iteration": timings["reconstruction_s"] / iterations,
        "peak_rss_MB": _peak_rss_mb(),
    }


def run_clinical(iterations: int, subsets: int) -> dict:
    """128³ voxels of 4.42 mm, 120 views, water cylinder attenuation, MEGP PSF at 208 keV."""
    import numpy as np
    import torch

    from recon.io.nm_projections import ProjectionGeometry
    from recon.spect.psf import collimator_response
    from recon.spect.reconstruct import Algorithm, reconstruct
    from recon.spect.system import RowRange, reconstruction_grid, system_matrix, to_object
    import SimpleITK as sitk

    n, views, d = 128, 120, 4.4196
    geometry = ProjectionGeometry(np.arange(views) * 360.0 / views, np.full(views, 260.0), d, n, n, (0.0, 0.0), 280.0)
    rows = RowRange(0, n)
    grid = reconstruction_grid(geometry, rows)
    x = (np.arange(n) - (n - 1) / 2) * d
    inside = (x[None, :, None] ** 2 + x[None, None, :] ** 2 < 150.0**2) & (np.abs(x)[:, None, None] < 200)
    mu = sitk.GetImageFromArray((0.135 * inside).astype(np.float32))
    mu.CopyInformation(grid)
    system = system_matrix(geometry, rows, mu, collimator_response("GE", "MEGP", 208.4))
    truth = to_object(sitk.Cast(mu, sitk.sitkFloat32)) * 10.0
    t0 = time.perf_counter()
    with torch.no_grad():
        projections = torch.poisson(system.forward(truth))
    forward_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    reconstruct(system, projections, None, Algorithm("osem", iterations, subsets))
    recon_s = time.perf_counter() - t1
    return {
        "case": "clinical size (synthetic)",
        "shape_xyz": [n, n, n],
        "views": views,
        "iterations x subsets": f"{iterations}x{subsets}",
        "total_s": forward_s + recon_s,
        "s_per_iteration": recon_s / iterations,
        "peak_rss_MB": _peak_rss_mb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--subsets", type=int, default=10)
    parser.add_argument("--clinical-iterations", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--case", choices=("sample", "clinical"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        result = run_sample(args.iterations, args.subsets) if args.case == "sample" else run_clinical(args.clinical_iterations, 8)
        result["threads"] = torch.get_num_threads()
        result["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        print(json.dumps(result))
        return
    rows = []
    for case in ("sample", "clinical"):
        cmd = [sys.executable, __file__, "--case", case, "--iterations", str(args.iterations), "--subsets", str(args.subsets),
               "--clinical-iterations", str(args.clinical_iterations), "--threads", str(args.threads)]
        print(f"running {case} ...", file=sys.stderr, flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    header = f"{'case':28} {'voxels':>13} {'views':>5} {'it x sub':>8} {'total s':>8} {'s/iter':>7} {'peak MB':>8} {'threads':>7} device"
    print(header)
    for r in rows:
        shape = "x".join(map(str, r["shape_xyz"]))
        print(f"{r['case']:28} {shape:>13} {r['views']:>5} {r['iterations x subsets']:>8} {r['total_s']:>8.1f} "
              f"{r['s_per_iteration']:>7.1f} {r['peak_rss_MB']:>8.0f} {r['threads']:>7} {r['device']}")


if __name__ == "__main__":
    main()

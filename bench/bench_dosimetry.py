"""Dosimetry benchmark (not a test): wall time of ``run_dose`` for one patient (three SPECT/CT
time points with repositioning, organ and lesion VOIs, registration, fits, organ and voxel
doses, Monte Carlo check, RT Dose and report) on the synthetic study of tests/dosimetry_fixtures.py,
or (``--size simulated``) the whole dosimetry of one patient from projections: the three
reconstructions of tests/dosimetry_simulation.py's simulated study, then ``run_dose``.

Usage: python bench/bench_dosimetry.py [--size small|clinical|simulated] [--repetitions N]
  small: SPECT 40×40×30, CT 60×60×45 (the test's); clinical: SPECT 128×128×80 at 4.8 mm, CT 256×256×160 at 2.4 mm;
  simulated: projections 64×64, 2×15 views, OSEM 3×5 (the test's), CT 256×256×57.
The clinical CTs are sampled at voxel centres (no partial volume, to keep their generation
short): their aliased edges keep the registration's NCC near 0.6 although it recovers the
repositioning (within 0.2 mm and 0.1°), so the quality threshold is lowered to 0.5 there.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

SIZES = {"small": {}, "clinical": {"spect_size": (128, 128, 80), "ct_size": (256, 256, 160), "ct_spacing": 2.4, "ct_subsamples": 1}}


def simulated(folder: Path, repetitions: int) -> dict:
    """Simulate (not counted), then the whole dosimetry: three reconstructions and ``run_dose``."""
    import dosimetry_simulation as sim

    from quant.dosimetry import pipeline

    t0 = time.perf_counter()
    study = sim.make_study(folder / "study")
    made = time.perf_counter() - t0
    print(f"study simulated in {made:.1f} s", file=sys.stderr, flush=True)
    masks = sim.write_region_masks(study)
    t0 = time.perf_counter()
    recon_s = []
    for point in study.points:
        t1 = time.perf_counter()
        sim.reconstruct(point)
        recon_s.append(round(time.perf_counter() - t1, 2))
    t1 = time.perf_counter()
    settings = pipeline.PipelineSettings(monte_carlo_repetitions=repetitions)
    result = pipeline.run_dose([pipeline.TimePoint(sim.recon_folder(p), p.ct) for p in study.points], masks, folder / "out", settings,
                               lesions=sim.write_lesion_masks(study))
    dose_s = time.perf_counter() - t1
    return {"case": "simulated 3-time-point Lu-177 study (IEC phantom, independent simulator), from projections",
            "simulation_s": round(made, 2), "reconstructions_s": recon_s, "run_dose_total_s": round(dose_s, 2),
            "whole_dosimetry_s": round(time.perf_counter() - t0, 2), "stages_s": {k: round(v, 2) for k, v in result.timings_s.items()},
            "monte_carlo_repetitions": repetitions, "files": result.files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted([*SIZES, "simulated"]), default="small")
    parser.add_argument("--repetitions", type=int, default=200, help="Monte Carlo repetitions of the uncertainty check")
    args = parser.parse_args()
    from dosimetry_fixtures import make_study

    from quant import registration as reg
    from quant.dosimetry import pipeline

    if args.size == "simulated":
        with tempfile.TemporaryDirectory() as folder:
            report = simulated(Path(folder), args.repetitions)
        print(json.dumps(report | {"peak_rss_MB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)}, indent=2))
        return
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        study = make_study(Path(folder) / "study", **SIZES[args.size])
        made = time.perf_counter() - t0
        print(f"study written in {made:.1f} s", file=sys.stderr, flush=True)
        registration = reg.RegistrationSettings(**pipeline.REGISTRATION_DEFAULTS, min_ncc=0.5 if args.size == "clinical" else 0.8)
        settings = pipeline.PipelineSettings(registration=registration, monte_carlo_repetitions=args.repetitions)
        t0 = time.perf_counter()
        result = pipeline.run_dose([pipeline.TimePoint(s, c) for s, c in zip(study.spects, study.cts)], study.masks,
                                   Path(folder) / "out", settings, lesions=study.lesions)
        total = time.perf_counter() - t0
    print(json.dumps({"case": f"synthetic 3-time-point Lu-177 study ({args.size})", "study_generation_s": round(made, 2),
                      "run_dose_total_s": round(total, 2), "stages_s": {k: round(v, 2) for k, v in result.timings_s.items()},
                      "monte_carlo_repetitions": args.repetitions, "files": result.files,
                      "peak_rss_MB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)}, indent=2))


if __name__ == "__main__":
    main()

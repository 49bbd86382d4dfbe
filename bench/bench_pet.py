"""PET list-mode benchmark (not a test): projector throughput and OSEM seconds per iteration.

1. Events per second through TOF forward + back projection (and non-TOF), ``--events`` random
   LORs of a 480 mm ring on the sample's image grid (80 x 80 x 32 voxels of 4 x 4 x 2 mm), on
   ``--threads`` CPU threads and, when CUDA is present, on the GPU.
2. The sample acquisition (data-samples/ga68-iec-pet) through ``reconstruct_pet``: seconds per
   stage (sensitivity, scatter, reconstruction) and per OSEM iteration, peak resident memory.

PyTomography's own list-mode PET projector needs parallelproj, which cannot be installed here
(see the issue), so no side-by-side ratio against it can be measured; the SPECT benchmark has one.

Usage: python bench/bench_pet.py [--threads N] [--events N] [--iterations N] [--skip-sample]
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np
import torch

from recon.pet.projector import ImageGrid, ListModeProjector, TOFBins

SAMPLE = Path(__file__).resolve().parents[1] / "data-samples" / "ga68-iec-pet"
GRID = ImageGrid((80, 80, 32), (4.0, 4.0, 2.0), (-158.0, -158.0, -31.0))
TOF = TOFBins(tuple(np.linspace(-280.0, 280.0, 36)), 32.1)


def _lors(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random LORs of a 250 mm-radius ring, 64 mm long, crossing the central 150 mm radius."""
    rng = np.random.default_rng(0)
    phi = rng.uniform(0, np.pi, n)
    s = rng.uniform(-150, 150, n)
    half = np.sqrt(250.0**2 - s**2)
    centre = np.stack([s * np.cos(phi), s * np.sin(phi)], 1)
    direction = np.stack([-np.sin(phi), np.cos(phi)], 1)
    z1, z2 = rng.uniform(-32, 32, n), rng.uniform(-32, 32, n)
    p1 = np.concatenate([centre - half[:, None] * direction, z1[:, None]], 1)
    p2 = np.concatenate([centre + half[:, None] * direction, z2[:, None]], 1)
    tof = rng.integers(10, 25, n)
    as_tensor = lambda a, dt=torch.float32: torch.tensor(a, dtype=dt, device=device)  # noqa: E731
    return as_tensor(p1), as_tensor(p2), as_tensor(tof, torch.long)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def projector_rate(n_events: int, device: torch.device, tof: bool) -> float:
    """Events per second through one forward and one back projection."""
    projector = ListModeProjector(GRID, TOF if tof else None, device=device)
    p1, p2, bins = _lors(n_events, device)
    bins = bins if tof else None
    image = torch.rand(GRID.shape, device=device)
    projector.forward(image, p1[:1000], p2[:1000], None if bins is None else bins[:1000])  # warm-up
    _sync(device)
    start = time.perf_counter()
    values = projector.forward(image, p1, p2, bins)
    projector.back(values, p1, p2, bins)
    _sync(device)
    return n_events / (time.perf_counter() - start)


def sample_timings(iterations: int) -> dict:
    from recon.pet.pipeline import PetParameters, reconstruct_pet
    from recon.spect.reconstruct import Algorithm

    params = PetParameters(algorithm=Algorithm(iterations=iterations, subsets=7))
    result = reconstruct_pet(SAMPLE / "listmode.petsird", SAMPLE / "ct", params)
    timings = result.provenance["timings_s"]
    return {**timings, "seconds_per_iteration": timings["reconstruction_s"] / iterations,
            "events": result.provenance["events"]["reconstructed"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--skip-sample", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        for tof in (True, False):
            rate = projector_rate(args.events, device, tof)
            label = f"{device.type}{'' if device.type == 'cuda' else f' ({args.threads} threads)'}"
            print(f"{label:<16} {'TOF' if tof else 'non-TOF':<8} forward+back: {rate:,.0f} events/s")
    if not args.skip_sample:
        timings = sample_timings(args.iterations)
        print("sample (ga68-iec-pet): " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in timings.items()))
    print(f"peak resident memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()

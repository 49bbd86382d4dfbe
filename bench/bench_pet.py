"""PET list-mode benchmark (not a test): projector throughput, seconds per iteration, peak memory.

1. Events per second through TOF forward + back projection (and non-TOF) of random LORs of a
   500 mm ring on the sample's image grid (80 x 80 x 32 voxels of 4 x 4 x 2 mm), on ``--threads``
   CPU threads (the C kernel, and the PyTorch path for comparison) and, when CUDA is present, on
   the GPU. For each of ``--sizes`` (default 1e6, 1e7, 1e8 events) events are streamed in chunks of
   ``--chunk`` (generated per chunk, never all held at once); one "iteration" = one forward and one
   back projection of every event, the projector work of one OSEM iteration over all subsets.
   Sizes above ``--measure-up-to`` are extrapolated from the largest measured one (memory does not
   grow with the number of events when streaming) and labelled so.
2. The sample acquisition (data-samples/ga68-iec-pet) through ``reconstruct_pet``: seconds per
   stage (sensitivity, scatter, reconstruction) and per OSEM iteration.
Peak resident memory of the process after each step (sizes run in increasing order).

PyTomography's own list-mode PET projector needs parallelproj, which cannot be installed here
(see the issue), so no side-by-side ratio against it can be measured; the SPECT benchmark has one.

Usage: nice python bench/bench_pet.py [--threads N] [--sizes 1e6 1e7 1e8] [--measure-up-to 1e7]
       [--chunk N] [--iterations N] [--skip-sample]
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


def _lors(n: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random LORs of a 250 mm-radius ring, 64 mm long, crossing the central 150 mm radius."""
    rng = np.random.default_rng(seed)
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


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def iteration_seconds(projector: ListModeProjector, n_events: int, chunk: int) -> float:
    """Seconds of projector work for one forward + back projection of ``n_events`` events, streamed
    in chunks of ``chunk`` (event generation not timed)."""
    device = projector.device
    image = torch.rand(GRID.shape, device=device)
    back = torch.zeros(GRID.shape, device=device)
    p1, p2, bins = _lors(1000, device, seed=2**31)
    projector.forward(image, p1, p2, bins if projector.tof is not None else None)  # warm-up
    elapsed = 0.0
    for k, start in enumerate(range(0, n_events, chunk)):
        p1, p2, bins = _lors(min(chunk, n_events - start), device, seed=k)
        bins = bins if projector.tof is not None else None
        _sync(device)
        t0 = time.perf_counter()
        back += projector.back(projector.forward(image, p1, p2, bins), p1, p2, bins)
        _sync(device)
        elapsed += time.perf_counter() - t0
    return elapsed


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
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7, 1e8])
    parser.add_argument("--measure-up-to", type=float, default=1e7)
    parser.add_argument("--chunk", type=int, default=1_000_000)
    parser.add_argument("--pytorch-path-events", type=int, default=200_000, help="events for the PyTorch-path comparison")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--skip-sample", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        label = "cuda" if device.type == "cuda" else f"cpu ({args.threads} threads)"
        for tof in (TOF, None):
            projector = ListModeProjector(GRID, tof, device=device)
            path = "C kernel" if projector._kernel is not None else "PyTorch"
            measured: tuple[int, float] | None = None
            for size in sorted(int(s) for s in args.sizes):
                if size <= args.measure_up_to or measured is None:
                    seconds, note = iteration_seconds(projector, size, args.chunk), "measured"
                    measured = (size, seconds)
                else:
                    seconds, note = measured[1] * size / measured[0], f"extrapolated from {measured[0]:.0e} events"
                print(f"{label:<16} {'TOF' if tof else 'non-TOF':<8} {path:<8} {size:.0e} events: {size / seconds:,.0f} events/s "
                      f"forward+back, {seconds:.1f} s per iteration ({note}), peak memory {_peak_mib():.0f} MiB")
            if device.type == "cpu" and projector._kernel is not None:
                projector._kernel = None
                seconds = iteration_seconds(projector, args.pytorch_path_events, args.chunk)
                print(f"{label:<16} {'TOF' if tof else 'non-TOF':<8} PyTorch  {args.pytorch_path_events:.0e} events: "
                      f"{args.pytorch_path_events / seconds:,.0f} events/s forward+back (grid_sample + autograd, for comparison)")
    if not args.skip_sample:
        timings = sample_timings(args.iterations)
        print("sample (ga68-iec-pet): " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in timings.items()))
    print(f"peak resident memory: {_peak_mib():.0f} MiB")


if __name__ == "__main__":
    main()

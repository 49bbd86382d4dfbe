"""PET list-mode benchmark (not a test): projector throughput, seconds per iteration, peak memory.

1. Events per second through TOF forward + back projection (and non-TOF) of a synthetic event
   stream on a 500 mm ring (600 x 32 elements) on the sample's image grid (80 x 80 x 32 voxels of
   4 x 4 x 2 mm), on ``--threads`` CPU threads (the C kernel, and the PyTorch path for
   comparison) and, when CUDA is present, on the GPU; wall-clock rates beside rates per
   CPU-second of the process (the machine may be shared). For each of ``--sizes`` (default 1e6,
   1e7, 1e8 events) the events are held as element ids (int32), TOF bins (int16) and weights
   (float32) and go through :class:`recon.pet.system.ListModeSystemMatrix`, which looks their
   LOR end points up per chunk of ``--chunk`` events; one "iteration" = one forward and one back
   projection of every event, the projector work of one OSEM iteration over all subsets. Sizes
   above ``--measure-up-to`` are held whole but timed on one interleaved subset of
   size/measure-up-to of them, scaled up and labelled so.
2. The sample acquisition (data-samples/ga68-iec-pet) through ``reconstruct_pet``: seconds per
   stage (sensitivity, scatter, reconstruction) and per OSEM iteration.
Peak resident memory of the process after each step (sizes run in increasing order).

PyTomography's own list-mode PET projector needs parallelproj, which cannot be installed here
(see the issue), so no side-by-side ratio against it can be measured; the SPECT benchmark has one.

Usage: nice python bench/bench_pet.py [--threads N] [--sizes 1e6 1e7 1e8] [--measure-up-to 1e8]
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
from recon.pet.system import ListModeSystemMatrix

SAMPLE = Path(__file__).resolve().parents[1] / "data-samples" / "ga68-iec-pet"
GRID = ImageGrid((80, 80, 32), (4.0, 4.0, 2.0), (-158.0, -158.0, -31.0))
TOF = TOFBins(tuple(np.linspace(-280.0, 280.0, 36)), 32.1)


RING_RADIUS_MM, N_ANGLES, N_RINGS = 250.0, 600, 32


def _ring(device: torch.device) -> torch.Tensor:
    """Element centres (N_ANGLES x N_RINGS, 3) [mm] of a 500 mm ring, rings 64 mm apart in all."""
    angle = np.repeat(np.arange(N_ANGLES) * 2 * np.pi / N_ANGLES, N_RINGS)
    z = np.tile(np.linspace(-32, 32, N_RINGS), N_ANGLES)
    return torch.tensor(np.stack([RING_RADIUS_MM * np.cos(angle), RING_RADIUS_MM * np.sin(angle), z], 1), dtype=torch.float32, device=device)


def _events(n: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic event stream: (n, 2) int32 element ids of LORs crossing the central ~150 mm
    radius (second element within +-37 degrees of opposite the first, any rings) and int16 TOF
    bins near the centre; generated in pieces of 1e7 (never more than that as int64 at once)."""
    rng = np.random.default_rng(seed)
    elements = torch.empty((n, 2), dtype=torch.int32)
    bins = torch.empty(n, dtype=torch.int16)
    half_fan = int(N_ANGLES * 37 / 360)
    for start in range(0, n, 10_000_000):
        k = min(10_000_000, n - start)
        a1 = rng.integers(0, N_ANGLES, k)
        a2 = (a1 + N_ANGLES // 2 + rng.integers(-half_fan, half_fan + 1, k)) % N_ANGLES
        elements[start:start + k, 0] = torch.from_numpy((a1 * N_RINGS + rng.integers(0, N_RINGS, k)).astype(np.int32))
        elements[start:start + k, 1] = torch.from_numpy((a2 * N_RINGS + rng.integers(0, N_RINGS, k)).astype(np.int32))
        bins[start:start + k] = torch.from_numpy(rng.integers(10, 25, k).astype(np.int16))
    return elements.to(device), bins.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def iteration_seconds(projector: ListModeProjector, n_events: int, chunk: int, fraction: int = 1) -> tuple[float, float]:
    """(wall, CPU) seconds of one forward + back projection of ``n_events`` events through
    :class:`ListModeSystemMatrix` (end points looked up per chunk of ``chunk`` events); with
    ``fraction`` k > 1 only the first of k interleaved subsets is projected and the times are
    multiplied by k (labelled so by the caller). Event generation is not timed."""
    device = projector.device
    elements, bins = _events(n_events, device)
    weights = torch.ones(n_events, dtype=torch.float32, device=device)
    system = ListModeSystemMatrix(projector, _ring(device), elements, bins if projector.tof is not None else None, weights,
                                  torch.ones(GRID.shape, device=device), chunk=chunk)
    image = torch.rand(GRID.shape, device=device)
    subset = None
    if fraction > 1:
        system.set_n_subsets(fraction)
        subset = 0
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    system.backward(system.forward(image, subset), subset)
    _sync(device)
    return (time.perf_counter() - t0) * fraction, (time.process_time() - c0) * fraction


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
    parser.add_argument("--measure-up-to", type=float, default=1e8)
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
            for size in sorted(int(s) for s in args.sizes):
                fraction = max(1, round(size / args.measure_up_to))
                wall, cpu = iteration_seconds(projector, size, args.chunk, fraction)
                note = "measured" if fraction == 1 else f"measured on 1/{fraction} of them (one interleaved subset), x {fraction}"
                print(f"{label:<16} {'TOF' if tof else 'non-TOF':<8} {path:<8} {size:.0e} events: {size / wall:,.0f} events/s "
                      f"({size / cpu:,.0f} per CPU-second) forward+back, {wall:.1f} s per iteration ({note}), "
                      f"peak memory {_peak_mib():.0f} MiB", flush=True)
            if device.type == "cpu" and projector._kernel is not None:
                projector._kernel = None
                seconds = iteration_seconds(projector, args.pytorch_path_events, args.chunk)[0]
                print(f"{label:<16} {'TOF' if tof else 'non-TOF':<8} PyTorch  {args.pytorch_path_events:.0e} events: "
                      f"{args.pytorch_path_events / seconds:,.0f} events/s forward+back (grid_sample + autograd, for comparison)")
    if not args.skip_sample:
        timings = sample_timings(args.iterations)
        print("sample (ga68-iec-pet): " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in timings.items()))
    print(f"peak resident memory: {_peak_mib():.0f} MiB")


if __name__ == "__main__":
    main()

"""PET sensitivity benchmark (not a test): seconds to build the grouped LORs and the sensitivity
image of a clinical-size scanner (recon.pet.sensitivity), on ``--threads`` CPU threads.

Scanner: a ring of 636 x 48 crystals of 4 mm (30,528; 810 mm diameter; ``--crystals``) in 4 x 4
blocks, crystal efficiencies +-10 %, coincidence between blocks at least 84 degrees apart (a
300-mm field at 810 mm); image grid of the pipeline's defaults (400 mm, 4-mm voxels, the
detector's axial extent).

Before (2026-12-07, every study projected all 58.5 million fine representative LORs; load 15-19,
nice'd): 1940 s for the first study (exact sums 1007 s, projections ~930 s scaled from 2.07
million LORs), < 1268 s for later ones, peak RSS 862 MiB.

Before petsens3 (2026-12-07; per-study pass on the coarse groups, 8.5 mm, refined by the cached
fine geometric image): the full run could not be completed (load 19-21); scaled from the first
1-2 million LORs of each stage: later studies ~25 s of CPU, first study ~185 s of CPU (exact
group-pair sums fine ~77 s, coarse ~63 s; fine geometric back-projection ~19 s). Those scalings
were optimistic for the projections (see below).

Now (2026-12-08, group-pair sums factorised where the module-pair factor is one constant, see
recon/pet/sensitivity.py), measured in full, nice'd, on the shared 2-core machine at load average
16-18 (the process got ~40 % of a core pair, so wall-clock seconds say nothing about quiet cores;
CPU seconds are both threads together):
  exact group-pair sums alone (scripted, same scanner): fine 71.4 M group pairs 90.2 s CPU before ->
  20.6 s now; coarse 5.5 M 41.9 s -> 6.4 s; identical keys and sums (float32 chunks equal).
  first study (nothing cached): 216 s CPU, 523 s wall: fine geometric image 163 s CPU (sums ~21 s;
  the rest, ~140 s, back-projecting those of the 71.4 M fine group pairs that cross the box), per-study
  pass 54 s CPU (coarse sums ~6 s, 4.39 M crossing coarse LORs projected); peak RSS 636 MiB.
  later study (scanner cached, a process of its own): 72 s CPU, 299 s wall; peak RSS 448 MiB.
  (cProfile of a later study, wall at load 17: projector kernel 140 s, chunk clipping and tensor
  conversion in lor_space 113 s, of 291 s.)
So issue #12's <= 60 s on 2 cores is NOT met at 30,528 crystals: the first study is dominated by the
fine geometric back-projection (once per scanner and image grid), and a later study needs ~72 s of
CPU (<= 60 s wall on 2 quiet cores only if both threads stay busy throughout: NOT measured).

Stages timed: the fine geometric image (exact sums streamed and back-projected, once per scanner
and image grid, then cached), and the per-study pass (coarse exact sums, once per scanner then
read from the cache; per chunk the water cylinder's mu (300 mm) and the near-object mask (400 mm)
projected forward, geometric, attenuated and near-tail images back-projected together, refined).

Usage: python bench/bench_pet_sensitivity.py [--threads 2] [--group-mm 4.5 0] [--crystals 636 48] [--cache DIR] [--studies 2]
(first study: --studies 1 with an empty --cache DIR; later study: the same command again.)
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import tempfile
import time

import numpy as np
import torch

from recon.io.petsird_listmode import PairEfficiency
from recon.pet import sensitivity
from recon.pet.projector import ImageGrid, ListModeProjector
from recon.pet.scatter import in_near_tails

PITCH, BLOCK = 4.0, 4


class Scanner:
    """The attributes of a ListModeAcquisition that recon.pet.sensitivity reads: a ring of
    n_tan x n_ax crystals of 4 mm (multiples of 4), radius n_tan x 4 mm / 2 pi."""

    def __init__(self, n_tan: int, n_ax: int) -> None:
        radius = n_tan * PITCH / (2 * math.pi)
        n_blocks_tan, n_blocks_ax = n_tan // BLOCK, n_ax // BLOCK
        mt, ma, et, ea = np.meshgrid(np.arange(n_blocks_tan), np.arange(n_blocks_ax), np.arange(BLOCK), np.arange(BLOCK), indexing="ij")
        tangential = (mt * BLOCK + et).ravel()
        axial = (ma * BLOCK + ea).ravel()
        angle = 2 * math.pi * tangential / n_tan
        self.element_positions_mm = np.stack([radius * np.cos(angle), radius * np.sin(angle), (axial - (n_ax - 1) / 2) * PITCH], 1)
        self.n_elements = len(angle)
        n_modules = n_blocks_tan * n_blocks_ax
        module_angle = 2 * math.pi * (np.arange(n_modules) // n_blocks_ax) * BLOCK / n_tan
        apart = np.abs((module_angle[:, None] - module_angle[None] + math.pi) % (2 * math.pi) - math.pi) >= math.radians(84)
        sgid = np.where(apart, 0, -1).astype(np.int64)
        efficiency = np.random.default_rng(1).uniform(0.9, 1.1, self.n_elements)
        self.pair_efficiency = PairEfficiency(1.0, efficiency, BLOCK * BLOCK, sgid, np.ones((1, BLOCK * BLOCK, BLOCK * BLOCK)))


def _study(space: sensitivity.LORSpace, projector: ListModeProjector, mu: torch.Tensor, near: torch.Tensor) -> tuple[int, dict]:
    """The pipeline's per-study pass (recon.pet.pipeline._lor_space_sums, images only): per chunk
    mu and the near-object mask forward together, geometric, attenuated and near-tail images
    back-projected together, then refined; seconds per stage."""
    times = dict.fromkeys(("forward", "back"), 0.0)
    images = torch.zeros((*projector.grid.shape, 3))
    n_lors = 0
    for chunk in space:
        t2 = time.perf_counter()
        integrals = projector.forward(torch.stack([mu, near], 3), chunk.p1, chunk.p2)
        tail = in_near_tails(integrals[:, 0], integrals[:, 1], 0.02)
        t3 = time.perf_counter()
        ones = torch.ones(len(chunk))
        images += sensitivity.sensitivity_image(chunk, torch.stack([ones, torch.exp(-integrals[:, 0]), tail.float()], 1), projector, 1.0)
        t1 = time.perf_counter()
        times["forward"] += t3 - t2
        times["back"] += t1 - t3
        n_lors += len(chunk)
    sensitivity.refine(space, images)
    return n_lors, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--group-mm", type=float, nargs=2, default=sensitivity.DEFAULT_GROUP_MM)
    parser.add_argument("--crystals", type=int, nargs=2, default=(636, 48), metavar=("TANGENTIAL", "AXIAL"),
                        help="636 x 48 = 30,528")
    parser.add_argument("--cache", help="THERAFLOW_CACHE folder (default: a new empty one): a second run on the same "
                                        "folder measures a later study in a process of its own")
    parser.add_argument("--studies", type=int, default=2, help="studies run one after the other in this process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["THERAFLOW_CACHE"] = args.cache or tempfile.mkdtemp(prefix="bench-pet-sens-")
    scanner = Scanner(*args.crystals)
    n_z = round((args.crystals[1] - 1) * PITCH / 4.0) + 1
    grid = ImageGrid((100, 100, n_z), (4.0, 4.0, 4.0), (-198.0, -198.0, -(n_z - 1) * 2.0))
    projector = ListModeProjector(grid, step_mm=4.0)
    group_mm = tuple(args.group_mm)
    x = torch.arange(grid.shape[0]) * 4.0 - 198.0
    radius = torch.hypot(x[:, None], x[None, :])[:, :, None].expand(grid.shape)
    mu, near = (radius <= 150.0).float().contiguous() * 0.0096, (radius <= 200.0).float().contiguous()
    print(f"crystals {scanner.n_elements}, group_mm {group_mm}, {args.threads} threads, cache {os.environ['THERAFLOW_CACHE']}")
    for number in range(args.studies):
        cached = os.path.isdir(os.path.join(os.environ["THERAFLOW_CACHE"], "pet-lor-groups"))
        study = f"study {number + 1} ({'scanner cached' if cached else 'nothing cached'})"
        t0, c0 = time.perf_counter(), time.process_time()
        space = sensitivity.lor_space(scanner, projector, group_mm)
        t_space, c_space = time.perf_counter() - t0, time.process_time() - c0
        n_lors, times = _study(space, projector, mu, near)
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
        coarse = "coarse groups " + repr(sensitivity.COARSE_GROUP_MM) if space.geometric is not None else "fine groups"
        print(f"{study}: {total:.1f} s = fine geometric image {t_space:.1f} s + per-study pass on {n_lors} LORs ({coarse}): "
              f"forward {times['forward']:.1f} s, back {times['back']:.1f} s, chunks summed or read "
              f"{total - t_space - times['forward'] - times['back']:.1f} s (wall); CPU {cpu:.1f} s (fine geometric image "
              f"{c_space:.1f} s); load average {os.getloadavg()[0]:.1f}; "
              f"peak RSS so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB", flush=True)


if __name__ == "__main__":
    main()

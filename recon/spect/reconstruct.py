"""Statistical reconstruction with PyTomography's algorithms: OSEM, or BSREM with a
relative-difference prior. Progress is reported through a plain callable."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from recon.ptomo import BSREM, OSEM, Callback, PoissonLogLikelihood, RelativeDifferencePrior, SystemMatrix

Progress = Callable[[int, int], None]  # (sub-iterations done, total)


@dataclass(frozen=True)
class Algorithm:
    """OSEM (``name='osem'``) or BSREM with a relative-difference prior (``name='bsrem'``)."""

    name: str = "osem"
    iterations: int = 4
    subsets: int = 10
    beta: float | None = 0.3  # prior weight (BSREM); None: set by the caller from the counts (recon.spect.priors)
    gamma: float = 2.0  # edge preservation of the relative-difference prior (BSREM)
    prior: str = "rdp"  # BSREM's prior: the relative difference prior (Nuyts et al. 2002)

    def __post_init__(self) -> None:
        if self.name not in ("osem", "bsrem"):
            raise ValueError(f"unknown algorithm {self.name!r} (osem or bsrem)")
        if self.iterations < 1 or self.subsets < 1:
            raise ValueError("iterations and subsets must be at least 1")
        if self.prior != "rdp":
            raise ValueError(f"unknown prior {self.prior!r} (rdp)")
        if not ((self.beta is None or (math.isfinite(self.beta) and self.beta >= 0)) and math.isfinite(self.gamma) and self.gamma > 0):
            raise ValueError(f"prior weight beta ({self.beta}) must be finite and not negative, gamma ({self.gamma}) finite and positive")


class _ProgressCallback(Callback):
    def __init__(self, progress: Progress, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0

    def run(self, obj: torch.Tensor, n_iter: int, n_subset: int | None = None) -> torch.Tensor:
        self.done += 1
        self.progress(self.done, self.total)
        return obj

    def finalize(self, obj: torch.Tensor) -> None:
        return None


def reconstruct(
    system: SystemMatrix,
    projections: torch.Tensor | None,
    additive: torch.Tensor | None,
    algorithm: Algorithm,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Estimate the object [x, y, z] from ``projections`` with the expected ``additive`` counts
    (scatter, randoms) in the same layout; ``projections`` None for list mode (one per event)."""
    torch.manual_seed(0)
    likelihood = PoissonLogLikelihood(system, projections, additive_term=additive)
    if algorithm.name == "osem":
        solver = OSEM(likelihood)
    else:
        if algorithm.beta is None:
            raise ValueError("BSREM needs the prior weight beta (recon.spect.priors.rdp_beta sets it from the counts)")
        prior = RelativeDifferencePrior(beta=algorithm.beta, gamma=algorithm.gamma)
        solver = BSREM(likelihood, prior=prior, relaxation_sequence=lambda n: 1.0 / (n / 50 + 1))
    # subsets of views: projections are [view, r, z], or [window, view, r, z] for several windows
    subsets = algorithm.subsets if projections is None else min(algorithm.subsets, projections.shape[-3])
    callback = _ProgressCallback(progress, algorithm.iterations * subsets) if progress else None
    with torch.no_grad():
        return solver(algorithm.iterations, subsets, callback=callback)

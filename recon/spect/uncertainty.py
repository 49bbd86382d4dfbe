"""Standard uncertainty of VOI activities from count noise: a Poisson bootstrap of the
acquisition.

Each replicate redraws every energy window's counts (photopeak and scatter windows) as Poisson
variates whose means are the measured counts, and repeats the whole estimate (scatter from the
redrawn side windows, the same system matrix and algorithm, the same calibration). The standard
deviation of a VOI's activity over the replicates is its standard uncertainty from count noise
(Efron & Tibshirani 1993, ch. 6, parametric bootstrap; for emission tomography Haynor & Woods
1989, IEEE TMI 8:397, and Dahlbom 2002, IEEE TNS 49:2062, by resampling the counts). Replicates
use a fixed seed, so the figures repeat. Cost: one reconstruction per replicate.

It covers count noise only: partial-volume loss, model errors (scatter, collimator, attenuation)
and the calibration's uncertainty are not in it, so it covers the truth only where those are
small against it (a VOI well inside a large uniform region, the total of the image).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping

import numpy as np

SEED = 20261207


def poisson_bootstrap(
    estimate: Callable[[Callable[[Hashable], np.ndarray]], np.ndarray],
    counts: Callable[[Hashable], np.ndarray],
    replicates: int,
    seed: int = SEED,
) -> np.ndarray:
    """The estimate repeated on ``replicates`` Poisson redraws of the counts: ``estimate``
    takes a function giving each window's counts (``counts`` itself for the measured estimate)
    and returns an array (an image); the result stacks the replicates' arrays on a first axis.
    Each window is redrawn once per replicate, whatever the number of times it is asked for."""
    if replicates < 2:
        raise ValueError(f"a bootstrap needs at least 2 replicates, not {replicates}")
    rng = np.random.default_rng(seed)
    return np.stack([np.asarray(estimate(_redraw(counts, rng))) for _ in range(replicates)])


def _redraw(counts: Callable[[Hashable], np.ndarray], rng: np.random.Generator) -> Callable[[Hashable], np.ndarray]:
    """One replicate's counts: each window drawn once, as Poisson variates of its measured counts."""
    drawn: dict[Hashable, np.ndarray] = {}

    def redrawn(window: Hashable) -> np.ndarray:
        if window not in drawn:
            measured = np.asarray(counts(window))
            drawn[window] = rng.poisson(np.clip(measured, 0, None)).astype(measured.dtype)
        return drawn[window]

    return redrawn


def voi_uncertainty(replicates: np.ndarray, masks: Mapping[str, np.ndarray], voxel_mL: float) -> dict[str, float]:
    """Standard uncertainty [MBq] of the activity in each VOI: the sample standard deviation
    over bootstrap replicates (images in Bq/mL, [replicate, ...voxels]) of the VOI's summed
    activity; ``masks`` are boolean arrays of the image's shape, ``voxel_mL`` the voxel volume."""
    flat = replicates.reshape(replicates.shape[0], -1).astype(np.float64)
    return {name: float(flat[:, np.asarray(mask).ravel()].sum(axis=1).std(ddof=1) * voxel_mL / 1e6)
            for name, mask in masks.items()}

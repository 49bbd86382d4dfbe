"""Import PyTomography in one place: it silences every warning of the process on import
(``warnings.simplefilter('ignore')``); the filters are restored here."""

from __future__ import annotations

import warnings

_saved = warnings.filters[:]
import pytomography  # noqa: E402
from pytomography.algorithms import BSREM, OSEM  # noqa: E402
from pytomography.callbacks import Callback  # noqa: E402
from pytomography.likelihoods import PoissonLogLikelihood  # noqa: E402
from pytomography.metadata import ObjectMeta  # noqa: E402
from pytomography.metadata.SPECT import SPECTObjectMeta, SPECTProjMeta, SPECTPSFMeta  # noqa: E402
from pytomography.priors import RelativeDifferencePrior  # noqa: E402
from pytomography.projectors import SystemMatrix  # noqa: E402
from pytomography.projectors.SPECT import SPECTSystemMatrix  # noqa: E402
from pytomography.transforms.SPECT import SPECTAttenuationTransform, SPECTPSFTransform  # noqa: E402

warnings.filters[:] = _saved
pytomography.verbose = False

__all__ = [
    "pytomography", "BSREM", "OSEM", "Callback", "PoissonLogLikelihood", "ObjectMeta", "SystemMatrix", "SPECTObjectMeta", "SPECTProjMeta",
    "SPECTPSFMeta", "RelativeDifferencePrior", "SPECTSystemMatrix", "SPECTAttenuationTransform", "SPECTPSFTransform",
]

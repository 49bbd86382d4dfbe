"""Values with an uncertainty budget (EANM practical guidance on uncertainty analysis for
molecular radiotherapy absorbed-dose calculations, Gear et al. 2018, Eur J Nucl Med Mol Imaging
45:2456, doi 10.1007/s00259-018-4136-7): first-order propagation, independent components.

A value carries the standard uncertainty contributed by each independent source of error, in
the value's unit (|∂value/∂x|·u(x)); the combined standard uncertainty is their root sum of
squares and each component's share is its fraction of the variance.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Uncertain:
    """``value`` ± combined standard uncertainty; ``components``: name → standard uncertainty
    (same unit as ``value``) of each independent source."""

    value: float
    components: Mapping[str, float] = field(default_factory=dict)

    @property
    def sd(self) -> float:
        return math.sqrt(sum(c * c for c in self.components.values()))

    @property
    def relative_sd(self) -> float:
        return self.sd / abs(self.value) if self.value else float("inf")

    @property
    def shares(self) -> dict[str, float]:
        """Fraction of the variance from each component (sums to 1)."""
        variance = self.sd**2
        return {k: (c * c / variance if variance else 0.0) for k, c in self.components.items()}

    def scaled(self, factor: float) -> Uncertain:
        """The value times an exact factor (units change, relative uncertainties do not)."""
        return Uncertain(self.value * factor, {k: abs(factor) * c for k, c in self.components.items()})

    def with_component(self, name: str, sd: float) -> Uncertain:
        return Uncertain(self.value, {**self.components, name: abs(sd)})

    def as_dict(self) -> dict[str, Any]:
        return {"value": self.value, "sd": self.sd, "relative_sd": self.relative_sd,
                "components": dict(self.components), "shares": self.shares}


def combine(values: Mapping[str, tuple[float, Uncertain]]) -> Uncertain:
    """Σ coefficientᵢ·valueᵢ of ``{name: (coefficient, value)}``: components with the same name
    are fully correlated, with the same sign of effect on each value (they add linearly with the
    coefficients' signs, e.g. a calibration error cancels in a difference); different names are
    independent."""
    total = 0.0
    components: dict[str, float] = {}
    for coefficient, item in values.values():
        total += coefficient * item.value
        for key, c in item.components.items():
            components[key] = components.get(key, 0.0) + coefficient * c
    return Uncertain(total, {k: abs(c) for k, c in components.items()})

"""Linear attenuation coefficients from the NIST XCOM tables shipped with PyTomography."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytomography


@cache
def _table(material: str) -> tuple[float, np.ndarray, np.ndarray]:
    path = Path(pytomography.__file__).parent / "data" / "NIST_attenuation_data" / f"{material}.csv"
    lines = path.read_text().split("\n")
    density = float(lines[0].split()[0])
    # rows: [edge label] energy [MeV], mu/rho [cm2/g], mu_en/rho; edges repeat the energy
    rows = [line.split()[-3:] for line in lines[1:] if line.strip()]
    data = np.array([[float(e), float(mu)] for e, mu, _ in rows])
    energies = data[:, 0] * 1000.0
    energies[1:][np.diff(data[:, 0]) <= 0] += 1e-6  # absorption edges: keep energies increasing
    return density, energies, data[:, 1]


def linear_attenuation_per_cm(material: str, energy_keV: float) -> float:
    """Narrow-beam linear attenuation coefficient μ [1/cm] of ``material`` ('water',
    'bonecortical', 'lead', ...) at ``energy_keV``: log-log interpolation of μ/ρ times density."""
    density, energies, mass_att = _table(material)
    value = np.exp(np.interp(np.log(energy_keV), np.log(energies), np.log(mass_att)))
    return float(value * density)

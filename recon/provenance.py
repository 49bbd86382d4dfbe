"""Software versions recorded with every result."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version


def versions(packages: tuple[str, ...] = ("theraflow", "pytomography", "torch", "SimpleITK", "pydicom", "numpy")) -> dict[str, str]:
    """Python's version and those of ``packages`` ('not installed' when absent)."""
    out = {"python": platform.python_version()}
    for package in packages:
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    return out

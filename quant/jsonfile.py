"""Reading the small JSON configuration files of the quantification commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from recon.errors import InputError


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in ``path``; InputError naming ``what`` when missing, not JSON or not an object."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, f"no such {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(path, f"{what} is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(path, f"{what} must hold a JSON object")
    return data

"""The one exception for bad input: the command line turns it into ``error: <file>: <problem>`` and exit 2."""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """An input file (or folder) cannot be used, with the reason.

    ``path`` names the offending file; ``str(error)`` is the one line shown to the user.
    No patient identifiers go into the message (UIDs and file names only).
    """

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)

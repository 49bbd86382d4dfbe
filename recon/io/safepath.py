"""Names from data as path components, and paths that stay inside their root.

Anything read from data (manifest labels, UIDs, series descriptions, pseudonyms, ROI names) may
be hostile: ``..``, an absolute path, a NUL, a name longer than the file system allows, bytes
that are not UTF-8. ``safe_name`` accepts only a short name of plain characters;
``inside(root, *parts)`` joins and resolves (symbolic links included) and refuses a result
outside ``root``. Output locations given by the user are checked before any heavy work with
``check_writable``.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from recon.errors import InputError

MAX_NAME = 64   # characters of a name taken from data (DICOM LO is 64 too)
NAME_MAX_BYTES = 255   # a path component on the common Linux file systems
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._+-]*$")


def safe_name(text: str, what: str) -> str:
    """``text`` when it is usable as one path component: 1-64 characters of letters, digits,
    space, ``. _ + -``, starting with a letter or digit (so never ``..`` nor hidden); else an
    InputError naming ``what`` (the text itself is shown only as a harmless repr)."""
    if not 0 < len(text) <= MAX_NAME or _NAME.match(text) is None or text != text.strip():
        shown = repr(text[:40]) + ("…" if len(text) > 40 else "")
        raise InputError(None, f"{what} {shown} cannot be a folder name (1-{MAX_NAME} letters, digits, space, . _ + -; "
                               "starting with a letter or digit)")
    return text


def inside(root: str | Path, *parts: str) -> Path:
    """``root/parts…`` resolved (symbolic links followed as far as they exist); an InputError
    when that is not inside the resolved ``root`` (``..``, an absolute part, a link leading out)."""
    base = Path(root).resolve()
    for part in parts:
        if "\x00" in part:
            raise InputError(None, f"{part!r}: NUL in a path component")
    target = base.joinpath(*parts).resolve()
    if not target.is_relative_to(base):
        raise InputError(None, f"{Path(*parts)!s:.80}: leads outside {base}")
    return target


def check_writable(path: str | Path, what: str = "output") -> Path:
    """Refuse ``path`` as an output folder before any work: an existing file, a component
    longer than the file system allows, a parent that is a file, a folder (or the nearest
    existing ancestor that would hold it) we may not write to. Returns the absolute path."""
    path = Path(os.path.abspath(Path(path).expanduser()))
    for part in path.parts:
        if len(os.fsencode(part)) > NAME_MAX_BYTES:
            raise InputError(path, f"{what}: a name is longer than {NAME_MAX_BYTES} bytes")
    if path.exists() and not path.is_dir():
        raise InputError(path, f"{what} exists and is not a folder")
    existing = path
    while not existing.exists():
        if existing.is_symlink():
            raise InputError(path, f"{what}: {existing} is a dangling symbolic link")
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(path, f"{what}: {existing} is a file, not a folder")
    try:   # a real try (permissions, read-only file systems, root): an empty folder, removed at once
        os.rmdir(tempfile.mkdtemp(prefix=".theraflow-probe-", dir=existing))
        if existing == path:
            os.listdir(path)
    except OSError as exc:
        raise InputError(path, f"{what}: cannot write in {existing} ({exc.strerror or exc})") from None
    return path

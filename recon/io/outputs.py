"""Result folders written atomically: everything goes to a temporary sibling folder that is
renamed into place at the end, so a failed run leaves nothing half-written."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import SimpleITK as sitk

from recon.errors import InputError
from recon.io.safepath import check_writable

MARKER = "recon.json"


def check_output_folder(out_dir: str | Path, marker: str = MARKER) -> None:
    """Refuse an existing ``out_dir`` unless it is empty or a previous result (holds the
    result's ``marker`` file), so that no unrelated files are lost, and a folder that cannot be
    written (``safepath.check_writable``). Cheap: call it before heavy work."""
    out_dir = check_writable(out_dir, "output folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / marker).exists():
        raise InputError(out_dir, "output folder exists and is not a previous theraflow result; choose another")


@contextlib.contextmanager
def atomic_folder(out_dir: str | Path, marker: str = MARKER) -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir``; on success it replaces ``out_dir``
    (see ``check_output_folder`` for when an existing one may be replaced)."""
    out_dir = Path(out_dir).absolute()
    check_output_folder(out_dir, marker)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def write_nifti(path: Path, image: sitk.Image) -> None:
    """float32 NIfTI (SimpleITK converts LPS to the NIfTI RAS convention)."""
    sitk.WriteImage(sitk.Cast(image, sitk.sitkFloat32), str(path), useCompression=True)

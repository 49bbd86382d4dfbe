"""Reading a CT series (HU, LPS geometry) for attenuation maps and fused displays."""

from __future__ import annotations

from pathlib import Path

import pydicom
import SimpleITK as sitk

from recon.errors import InputError


def read_ct_series(folder: str | Path) -> tuple[sitk.Image, pydicom.Dataset, list[str]]:
    """Read the CT series in ``folder`` (HU, LPS geometry), its first header and its SOP Instance UIDs.

    The folder must hold exactly one CT series (other files are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "CT folder does not exist")
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    ct_series = []
    for uid in series:
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
        header = pydicom.dcmread(files[0], stop_before_pixels=True)
        if header.get("Modality") == "CT":
            ct_series.append((files, header))
    if not ct_series:
        raise InputError(folder, "no CT series found (need DICOM files with Modality CT)")
    if len(ct_series) > 1:
        raise InputError(folder, f"{len(ct_series)} CT series found; give a folder with one")
    files, header = ct_series[0]
    if len(files) < 2:
        raise InputError(folder, "the CT series has a single slice")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = sitk.Cast(reader.Execute(), sitk.sitkFloat32)
    except RuntimeError as exc:
        raise InputError(folder, f"CT series cannot be read ({str(exc).strip().splitlines()[-1]})") from None
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID) for f in files]
    return image, header, uids

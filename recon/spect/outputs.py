"""The result folder of a SPECT reconstruction: recon.nii.gz, dicom/, recon.json."""

from __future__ import annotations

from pathlib import Path

from recon.io.nm_recon_dicom import write_nm_recon_series
from recon.io.outputs import atomic_folder, write_json, write_nifti
from recon.spect.pipeline import SpectResult


def write_spect_result(result: SpectResult, out_dir: str | Path) -> Path:
    """Write ``result`` into ``out_dir`` atomically and return the folder."""
    out_dir = Path(out_dir)
    params = result.provenance["parameters"]["algorithm"]
    corrections = result.provenance["corrections"]
    applied = ["ATTN" if corrections["attenuation"] else None, "SCAT" if corrections["scatter"] != "none" else None,
               "PSF" if corrections["collimator_response"] else None, "DECY"]
    summary = (
        f"theraflow {params['name'].upper()} {params['iterations']}i{params['subsets']}s; "
        f"corrections {' '.join(c for c in applied if c)}; Bq/mL at acquisition start"
    )
    comments = summary + "".join(f"; CALIBRATION WARNING: {w}" for w in result.provenance["calibration"]["warnings"])
    with atomic_folder(out_dir) as tmp:
        write_nifti(tmp / "recon.nii.gz", result.image)
        (tmp / "dicom").mkdir()
        files = write_nm_recon_series(
            result.image,
            tmp / "dicom",
            result.acquisition.header,
            series_description=f"theraflow SPECT {result.provenance['nuclide']} Bq/mL",
            image_comments=comments,
            derivation_description=summary,
            photopeak_window=(result.windows.photopeak.lower_keV, result.windows.photopeak.upper_keV),
        )
        provenance = dict(result.provenance)
        provenance["outputs"] = {"nifti": "recon.nii.gz", "dicom": [f"dicom/{f.name}" for f in files]}
        write_json(tmp / "recon.json", provenance)
    return out_dir

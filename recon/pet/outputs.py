"""The result folder of a PET reconstruction: recon.nii.gz, dicom/ (PET Image Storage), recon.json."""

from __future__ import annotations

from pathlib import Path

from recon.io.outputs import atomic_folder, write_json, write_nifti
from recon.io.pet_image_dicom import PetSeriesInfo, write_pet_series
from recon.pet.pipeline import PetResult

RAW_DATA_STORAGE = "1.2.840.10008.5.1.4.1.1.66"  # the list-mode file is referenced as raw data
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def series_info(result: PetResult) -> PetSeriesInfo:
    """What the PET DICOM series says about the study, the corrections and the reconstruction."""
    exam = result.acquisition.exam
    prov = result.provenance
    algorithm = prov["parameters"]["algorithm"]
    corrections = prov["corrections"]
    sources = [(uid, cls) for uid, cls in [(exam.sop_instance_uid, RAW_DATA_STORAGE),
                                            *((u, CT_IMAGE_STORAGE) for u in prov["inputs"]["ct_sop_instance_uids"])] if uid]
    method = f"{algorithm['name'].upper()} {algorithm['iterations']}i{algorithm['subsets']}s{' TOF' if prov['parameters']['tof'] else ''}"
    return PetSeriesInfo(
        study_instance_uid=exam.study_instance_uid,
        frame_of_reference_uid=exam.frame_of_reference_uid,
        patient_id=exam.patient_id,
        patient_name="",
        patient_sex=exam.patient_sex.upper()[:1] if exam.patient_sex.upper()[:1] in ("M", "F", "O") else "",
        patient_weight_kg=exam.patient_weight_kg,
        patient_size_m=exam.patient_size_m,
        study_datetime=exam.start_of_study,
        acquisition_start=result.acquisition_start,
        duration_s=result.acquisition.duration_s,
        radiopharmaceutical=exam.radiopharmaceutical,
        nuclide=result.nuclide.name,
        half_life_s=result.nuclide.half_life_s,
        positron_fraction=result.nuclide.positron_fraction,
        injected_activity_bq=exam.injected_activity_bq,
        injection_datetime=exam.injection_datetime,
        corrections=tuple(corrections["applied"]),
        randoms_method=corrections["randoms"],  # DLYD, or TOFM (estimated from the TOF margins; an extended term)
        reconstruction_method=method,
        attenuation_method=corrections["attenuation"],
        scatter_method="tail-fitted" if corrections["scatter"] else "NONE",
        manufacturer="",
        model_name=result.acquisition.model_name,
        series_description=f"theraflow PET {result.nuclide.name} Bq/mL",
        source_uids=tuple(uid for uid, _ in sources),
        source_sop_class_uids=tuple(cls for _, cls in sources),
    )


def write_pet_result(result: PetResult, out_dir: str | Path) -> Path:
    """Write ``result`` into ``out_dir`` atomically and return the folder."""
    out_dir = Path(out_dir)
    with atomic_folder(out_dir) as tmp:
        write_nifti(tmp / "recon.nii.gz", result.image)
        (tmp / "dicom").mkdir()
        files = write_pet_series(result.image, tmp / "dicom", series_info(result))
        provenance = dict(result.provenance)
        provenance["outputs"] = {"nifti": "recon.nii.gz", "dicom": [f"dicom/{f.name}" for f in files]}
        write_json(tmp / "recon.json", provenance)
    return out_dir

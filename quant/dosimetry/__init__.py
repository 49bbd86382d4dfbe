"""Post-therapy dosimetry (Lu-177): time–activity fits, organ (MIRD) and voxel absorbed doses,
their uncertainties. Plain functions over numbers and SimpleITK images; no Prefect here."""

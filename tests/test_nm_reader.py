"""Reading NM projections as cameras write them: the real GE Discovery 670 Lu-177 patient."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from recon.errors import InputError
from recon.io.nm_projections import read_acquisition, read_nm_projections
from recon.spect.windows import select_windows


def test_ge_windows_views_and_geometry(ge_d670):
    bed = read_nm_projections(ge_d670[0])
    assert bed.vendor == "GE" and bed.collimator == "MEGP"
    assert bed.nuclide.name == "Lu-177"
    chosen = select_windows(bed.windows, bed.nuclide)
    assert (chosen.photopeak.lower_keV, chosen.photopeak.upper_keV) == (187.2, 228.8)
    assert (chosen.lower.lower_keV, chosen.upper.upper_keV) == (166.89, 251.16)
    assert bed.counts.shape == (6, 60, 128, 128)
    g = bed.geometry
    assert np.allclose(np.diff(g.angles_deg), 6.0) and g.angles_deg[0] == pytest.approx(0.16)
    assert np.all(g.radii_mm == 253.7)
    assert bed.frame_duration_s == 25.0
    # every frame of the file lands once in the array, counts unchanged
    raw = pydicom.dcmread(ge_d670[0]).pixel_array
    assert bed.counts.sum() == pytest.approx(float(raw.sum(dtype=np.int64)))
    # the photopeak frames are those whose EnergyWindowVector is 2
    ds = pydicom.dcmread(ge_d670[0])
    photopeak_frames = np.asarray(ds.EnergyWindowVector) == chosen.photopeak.index + 1
    assert bed.window_counts(chosen.photopeak).sum() == pytest.approx(float(raw[photopeak_frames].sum(dtype=np.int64)))


def test_ge_two_beds_are_stitched(ge_d670):
    beds = [read_nm_projections(p) for p in ge_d670]
    both = read_acquisition(ge_d670)
    offset = round((beds[0].geometry.z_first_row_mm - beds[1].geometry.z_first_row_mm) / beds[0].geometry.pixel_mm)
    assert offset == 80
    assert both.counts.shape == (6, 60, 128 + offset, 128)
    assert both.geometry.z_first_row_mm == beds[0].geometry.z_first_row_mm
    assert both.sop_instance_uids == [b.sop_instance_uids[0] for b in beds]
    # top rows from bed 1, bottom rows from bed 2, the 48-row overlap split at its middle
    assert np.array_equal(both.counts[:, :, :100], beds[0].counts[:, :, :100])
    assert np.array_equal(both.counts[:, :, 110:], beds[1].counts[:, :, 110 - offset :])


def test_rescale_slope_is_applied(ge_d670, tmp_path):
    ds = pydicom.dcmread(ge_d670[0])
    ds.RescaleSlope, ds.RescaleIntercept = 2.5, 0
    path = tmp_path / "scaled.dcm"
    ds.save_as(path)
    assert read_nm_projections(path).counts.sum() == pytest.approx(2.5 * read_nm_projections(ge_d670[0]).counts.sum())


def test_raw_input_is_not_modified(ge_d670):
    before = ge_d670[0].read_bytes()
    read_acquisition(ge_d670)
    assert ge_d670[0].read_bytes() == before


def test_truncated_file_is_refused(ge_d670, tmp_path):
    path = tmp_path / "truncated.dcm"
    path.write_bytes(ge_d670[0].read_bytes()[:-100_000])
    with pytest.raises(InputError, match="truncated"):
        read_nm_projections(path)

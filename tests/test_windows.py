"""Energy windows are chosen by energy, whatever their order in the file."""

from __future__ import annotations

import pytest

from recon.nuclides import get_nuclide
from recon.spect.windows import EnergyWindow, guess_nuclide, photopeak_windows, select_windows


def windows(*ranges: tuple[float, float]) -> list[EnergyWindow]:
    return [EnergyWindow(i, lo, hi) for i, (lo, hi) in enumerate(ranges)]


def test_lu177_windows_of_the_real_ge_file_in_file_order():
    ws = windows((101.7, 124.3), (187.2, 228.8), (229.63, 251.16), (166.89, 186.31), (124.32, 134.68), (91.2, 100.8))
    chosen = select_windows(ws, get_nuclide("Lu-177"))
    assert (chosen.photopeak.index, chosen.lower.index, chosen.upper.index) == (1, 3, 2)
    assert guess_nuclide(ws).name == "Lu-177"


@pytest.mark.parametrize(
    "nuclide, ranges, expected",
    [
        ("Tc-99m", [(129.5, 150.5), (108.0, 129.5), (150.5, 171.6)], (0, 1, 2)),
        ("I-131", [(295.0, 328.0), (328.0, 401.0), (401.0, 434.0)], (1, 0, 2)),
        # ICRP-107: 245.35 keV (94.1 %) outranks 171.28 keV (90.7 %); the 171 keV set is tested below
        ("In-111", [(245.0, 260.0), (154.2, 188.4), (140.0, 154.2), (220.9, 269.9)], (3, None, None)),
        ("Lu-177", [(228.8, 249.6), (166.4, 187.2), (187.2, 228.8)], (2, 1, 0)),
    ],
)
def test_photopeak_and_scatter_windows(nuclide, ranges, expected):
    chosen = select_windows(windows(*ranges), get_nuclide(nuclide))
    got = (chosen.photopeak.index, chosen.lower.index if chosen.lower else None, chosen.upper.index if chosen.upper else None)
    assert got == expected


def test_no_photopeak_window():
    assert select_windows(windows((126.0, 154.0), (110.0, 126.0)), get_nuclide("Lu-177")) is None


def test_collimator_names_as_cameras_write_them():
    from recon.errors import InputError
    from recon.spect.psf import collimator_response

    assert collimator_response("GE", "me-gp", 208.4) == collimator_response("GE", "MEGP", 208.4)
    assert collimator_response("Siemens", "MELP", 208.4).name == "Siemens ME"
    megp = collimator_response("GE", "MEGP", 208.4)
    # GE MEGP: ~9-10 mm FWHM at 10 cm for Lu-177 (data sheet 9.4 mm at 140 keV)
    assert 8.0 < megp.sigma_mm(100.0) * 2.3548 < 10.5
    with pytest.raises(InputError, match="unknown collimator"):
        collimator_response("GE", "PINHOLE", 208.4)


def header_windows(*named: tuple[str, float, float]) -> list[EnergyWindow]:
    """The windows of an NM header's EnergyWindowInformationSequence, read as the pipeline reads them."""
    from pathlib import Path

    from pydicom.dataset import Dataset

    from recon.io.nm_projections import energy_windows

    items = []
    for name, lo, hi in named:
        rng = Dataset()
        rng.EnergyWindowLowerLimit, rng.EnergyWindowUpperLimit = f"{lo:g}", f"{hi:g}"
        item = Dataset()
        item.EnergyWindowRangeSequence, item.EnergyWindowName = [rng], name
        items.append(item)
    ds = Dataset()
    ds.EnergyWindowInformationSequence = items
    return energy_windows(Path("header.dcm"), ds)


def summary(sets) -> list[tuple[int, int, int | None, int | None, bool]]:
    """(photopeak keV, photopeak window index, lower, upper, lower in CZT tail) per photopeak."""
    return [(round(s.photopeak_keV), s.photopeak.index, s.lower.index if s.lower else None,
             s.upper.index if s.upper else None, s.lower_in_tail) for s in sets]


def test_ge_like_actinium_two_photopeaks_each_with_scatter_windows():
    # 218 and 440 keV ±10 %, lower and upper scatter windows, in no particular order, no names
    ws = header_windows(("", 396.4, 484.6), ("", 174.6, 196.4), ("", 196.4, 240.0), ("", 352.4, 396.4),
                        ("", 240.0, 262.0), ("", 484.6, 528.6))
    assert summary(photopeak_windows(ws, get_nuclide("Ac-225"))) == [(441, 0, 3, 5, False), (218, 2, 1, 4, False)]
    assert guess_nuclide(ws).name == "Ac-225"


def test_czt_like_narrow_windows_and_their_low_energy_tail():
    # CZT: ±3 % windows; the windows just below lie in the photopeak's low-energy tail
    ws = header_windows(("Ac225_EM1", 211.6, 224.8), ("Ac225_TAIL1", 196.4, 211.6), ("Ac225_EM2", 427.2, 453.8),
                        ("Ac225_TAIL2", 405.0, 427.2), ("Ac225_SC2", 453.8, 470.0))
    assert guess_nuclide(ws).name == "Ac-225"
    assert summary(photopeak_windows(ws, get_nuclide("Ac-225"))) == [(441, 2, 3, 4, True), (218, 0, 1, None, True)]
    # CZT window widened below the peak for its tail (Lu-177 208 keV: -7 %/+4 %) is still a photopeak window
    lu = header_windows(("EM", 193.8, 216.7), ("SC", 176.0, 193.8))
    assert summary(photopeak_windows(lu, get_nuclide("Lu-177"))) == [(208, 0, 1, None, True)]


def test_ge_like_indium_radium_and_lead():
    indium = header_windows(("", 154.2, 188.4), ("", 220.9, 269.9), ("", 140.0, 154.2))
    assert summary(photopeak_windows(indium, get_nuclide("In-111"))) == [(245, 1, None, None, False), (171, 0, 2, None, False)]
    assert guess_nuclide(indium).name == "In-111"
    radium = header_windows(("", 68.0, 98.0), ("", 139.0, 170.0), ("", 243.0, 297.0), ("", 297.0, 320.0))
    assert summary(photopeak_windows(radium, get_nuclide("Ra-223"))) == [(83, 0, None, None, False), (270, 2, None, 3, False),
                                                                          (155, 1, None, None, False)]
    lead = header_windows(("", 215.0, 262.0), ("", 525.0, 641.0), ("", 190.0, 215.0))
    assert summary(photopeak_windows(lead, get_nuclide("Pb-212"))) == [(239, 0, 2, None, False), (583, 1, None, None, False)]


def test_windows_that_fit_no_photopeak_of_the_nuclide():
    tc = header_windows(("", 126.45, 154.55), ("", 112.4, 126.45))
    assert photopeak_windows(tc, get_nuclide("Ac-225")) == [] and select_windows(tc, get_nuclide("Ra-223")) is None
    assert guess_nuclide(tc).name == "Tc-99m"
    # Fr-221's 218 keV sits 75 % up Lu-177's 208 keV ±10 % window: off-centre by 4.7 %, not its photopeak window
    assert select_windows(windows((187.2, 228.8), (166.4, 187.2), (228.8, 249.6)), get_nuclide("Ac-225")) is None
    # a lower scatter window of a wide window is not a photopeak window of another nuclide's peak
    assert guess_nuclide(header_windows(("", 300.0, 330.0))) is None

"""Nuclide data read from the ICRP-107 libraries: half-lives, chains at equilibrium or after
separation (checked against Bateman's two-member solution and radioactivedecay's own solver),
photopeaks against published yields."""

from __future__ import annotations

import math

import pytest

from recon.nuclides import canonical_name, get_nuclide, load_nuclide


def _peak(nuclide, energy_keV: float):
    return min(nuclide.photopeaks, key=lambda p: abs(p.energy_keV - energy_keV))


def test_lutetium_matches_the_values_used_before_the_library():
    lu = get_nuclide("^177^Lutetium")
    assert lu.half_life_s == pytest.approx(6.647 * 86400, rel=1e-9)   # the hand-typed value it replaces
    assert [round(e) for e in lu.photopeaks_keV] == [208, 113]        # main photopeak first, as before
    assert [m.name for m in lu.chain] == ["Lu-177"]                     # Hf-177 is stable


@pytest.mark.parametrize("text, name", [("Lu177", "Lu-177"), ("177Lu", "Lu-177"), ("tc-99m", "Tc-99m"),
                                        ("^99m^Tc", "Tc-99m"), ("Ac225", "Ac-225"), ("Pb-212", "Pb-212")])
def test_names(text, name):
    assert canonical_name(text) == name


def test_unknown_nuclide():
    with pytest.raises(KeyError, match="not in the ICRP-107 decay data"):
        get_nuclide("Xx-999")
    assert get_nuclide("Sm-153").half_life_s == pytest.approx(46.5 * 3600, rel=0.01)  # any ICRP-107 nuclide


def test_actinium_daughters_give_the_imaged_photons():
    ac = get_nuclide("Ac-225")
    assert {"Fr-221", "At-217", "Bi-213", "Po-213", "Tl-209", "Pb-209"} <= {m.name for m in ac.chain}
    # published yields (NNDC): Fr-221 218.1 keV 11.4-11.6 %, Bi-213 440.5 keV 25.9-26.1 %; at
    # equilibrium every Ac-225 decay is followed by one Fr-221 and one Bi-213 decay
    fr, bi = _peak(ac, 218.0), _peak(ac, 440.0)
    share = lambda peak, emitter: sum(x.yield_per_decay for x in peak.lines if x.emitter == emitter) / peak.yield_per_decay  # noqa: E731
    assert share(fr, "Fr-221") > 0.9 and 0.113 < fr.yield_per_decay < 0.125
    assert share(bi, "Bi-213") > 0.9 and 0.255 < bi.yield_per_decay < 0.27
    assert ac.photopeaks_keV[0] == pytest.approx(440.5, abs=0.2)


def test_radium_photopeaks():
    ra = get_nuclide("Ra-223")
    # 81-84 keV Pb/Po K X-rays (~40 % per decay with the progeny), 154 keV (5.7 %), 269-271 keV (Ra-223 + Rn-219)
    assert ra.photopeaks_keV[0] == pytest.approx(83, abs=1.5) and 0.35 < ra.photopeaks[0].yield_per_decay < 0.5
    assert _peak(ra, 154.0).yield_per_decay == pytest.approx(0.057, abs=0.01)
    assert {line.emitter for line in _peak(ra, 270.0).lines} == {"Ra-223", "Rn-219"}


def test_transient_equilibrium_and_time_since_separation_pb212():
    pb = get_nuclide("Pb-212")
    lp, lb = (math.log(2) / m.half_life_s for m in pb.chain[:2])
    bi = {m.name: m for m in pb.chain}["Bi-212"]
    assert bi.activity_ratio == pytest.approx(lb / (lb - lp), rel=1e-9)   # transient equilibrium, 1.105
    tl = {m.name: m for m in pb.chain}["Tl-208"]
    assert tl.branching == pytest.approx(0.3594, abs=0.001)
    one_hour = pb.separated(3600.0)
    bi_1h = {m.name: m for m in one_hour.chain}["Bi-212"]
    bateman = lb / (lb - lp) * (1 - math.exp(-(lb - lp) * 3600.0))
    assert bi_1h.activity_ratio == pytest.approx(bateman, rel=1e-6)
    # Tl-208 583 keV photons grow in with Bi-212
    assert _peak(one_hour, 583.0).yield_per_decay < 0.5 * _peak(pb, 583.0).yield_per_decay
    assert "equilibrium" in pb.provenance()["progeny"] and "3600 s" in one_hour.provenance()["progeny"]
    assert get_nuclide("Pb-212").separated(0.0).photopeaks_keV[0] == pytest.approx(238.6, abs=0.1)


def test_equilibrium_agrees_with_radioactivedecay_solver():
    rd = pytest.importorskip("radioactivedecay")
    for name in ("Ac-225", "Ra-223"):
        nuclide = load_nuclide(name)
        t = 60 * max(m.half_life_s for m in nuclide.chain[1:])
        activities = {str(k): v for k, v in rd.Inventory({name: 1.0}, "Bq").decay(t, "s").activities("Bq").items()}
        for member in nuclide.chain:
            assert member.activity_ratio == pytest.approx(activities[member.name] / activities[name], rel=1e-6, abs=1e-9)


def test_positron_emitters_and_longer_lived_progeny():
    assert get_nuclide("Ga-68").positron_fraction == pytest.approx(0.889, abs=0.001)
    assert get_nuclide("F-18").positron_fraction == pytest.approx(0.967, abs=0.001)
    assert get_nuclide("Cu-64").positron_fraction == pytest.approx(0.175, abs=0.003)
    i131 = get_nuclide("I-131")   # Xe-131m (11.8 d) outlives I-131: no equilibrium, left out
    assert [m.name for m in i131.chain] == ["I-131"] and i131.photopeaks_keV[0] == pytest.approx(364.5, abs=0.1)
    assert get_nuclide("Tb-161").photopeaks_keV and get_nuclide("In-111").photopeaks_keV[:2] == pytest.approx((245.4, 171.3), abs=0.1)


def test_reconstruction_nuclide_equilibrium_unless_separation_given():
    from types import SimpleNamespace

    from recon.errors import InputError
    from recon.spect.pipeline import SpectParameters, _nuclide

    acq = SimpleNamespace(nuclide=get_nuclide("Pb-212"), nuclide_named=True, paths=["nm.dcm"])
    assert _nuclide(acq, SpectParameters()).since_separation_s is None
    assert _nuclide(acq, SpectParameters(nuclide="212Pb", since_separation_h=2.0)).since_separation_s == 7200.0
    with pytest.raises(InputError, match="header names Pb-212 but --nuclide says Ra-223"):
        _nuclide(acq, SpectParameters(nuclide="Ra-223"))
    guessed = SimpleNamespace(nuclide=get_nuclide("Lu-177"), nuclide_named=False, paths=["nm.dcm"])
    assert _nuclide(guessed, SpectParameters(nuclide="In-111")).name == "In-111"   # windows guessed, the user knows
    with pytest.raises(ValueError, match="separation"):
        SpectParameters(since_separation_h=-1.0)

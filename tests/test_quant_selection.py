"""Theranostic selection (quant/selection.py, quant/data/criteria.json) on synthetic PSMA PET
scenes with known lesion SUVs: VISION, TheraP and PROMISE miPSMA, each with an eligible and a
non-eligible case, and the reasons and numbers behind every verdict."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from quant import selection as sel
from quant import synthetic as syn
from quant import voi
from quant.tracer import tracer_from_text
from recon.errors import InputError

SPACING = 2.5
SIZE = (80, 80, 80)
# references of the scene: liver 5 ± 1 (PERCIST threshold 9.5), parotid 12, blood pool 1.8, spleen 4, background 0.5
NODE = (11.25, -43.75, 8.75)
BONE = (-41.25, -51.25, 51.25)
OTHER = (41.25, -43.75, 46.25)
FOURTH = (41.25, -51.25, -68.75)


def _sphere_mask(scene: syn.Scene, centre, diameter) -> sitk.Image:
    r = np.linalg.norm(syn.points_mm(scene.suv) - np.asarray(centre), axis=-1)
    return syn.image_like((r <= diameter / 2.0).astype(np.uint8), scene.suv, sitk.sitkUInt8)


def _analyse(lesions: list[syn.SphereLesion], given: dict[str, tuple] | None = None, sites=None, criteria=None, tracer=None,
             method: str = "percist"):
    """Scene → automatic VOIs (+ given lesion masks) → measurements → selection."""
    scene = syn.psma_scene(lesions, size=SIZE, spacing=(SPACING,) * 3)
    criteria = criteria or sel.load_criteria()
    settings = voi.VoiSettings.from_dict({**criteria["voi"], "method": method})
    references = voi.reference_stats(scene.suv, scene.masks)
    exclude = voi.union_mask(list(scene.masks.values()), scene.suv)
    seg = voi.segment_lesions(scene.suv, settings, references.get("liver"), exclude=exclude)
    given_masks = {name: _sphere_mask(scene, centre, d) for name, (centre, d) in (given or {}).items()}
    labels, names = voi.add_given_lesions(scene.suv, seg.labels, given_masks)
    measured = voi.measure_lesions(scene.suv, labels, references, settings, sites=sites or {}, names=names)
    return measured, sel.select(measured, references, criteria, tracer)


def _rules(verdict: sel.Verdict) -> list[str]:
    return [f.rule for f in verdict.decided_by]


# --------------------------------------------------------------------------- an eligible patient


def test_eligible_patient():
    lesions, result = _analyse(
        [syn.SphereLesion(NODE, 20.0, 25.0), syn.SphereLesion(BONE, 16.0, 10.5)],
        sites={1: {"site": "lymph_node", "short_axis_mm": 20.0}, 2: {"site": "bone"}},
    )
    assert [round(lesion.suv_max, 2) for lesion in lesions] == [25.0, 10.5]
    assert result.vision.eligible is True
    assert "vision.psma_positive_disease" in _rules(result.vision)
    positive = result.vision.decided_by[0]
    assert positive.values["reference_value"] == pytest.approx(5.0, abs=0.02)
    assert [item["label"] for item in positive.values["positive_lesions"]] == [1, 2]
    assert result.therap.eligible is True
    assert set(_rules(result.therap)) == {"therap.one_site_high", "therap.all_measurable_sites"}
    measured_sites = next(f for f in result.therap.findings if f.rule == "therap.all_measurable_sites").values["sites"]
    assert [item["label"] for item in measured_sites] == [1]  # the bone lesion is not a measurable site
    assert "FDG" in " ".join(result.therap.not_assessed)
    assert [score.score for score in result.promise] == [3, 2]  # 25 ≥ parotid 12; liver 5 ≤ 10.5 < 12
    assert result.promise_summary["highest_score"] == 3
    json.dumps(result.as_dict())  # JSON-ready


# --------------------------------------------------------------------------- VISION


def test_vision_psma_negative_lymph_node_above_size_excludes():
    """A lymph node at SUV 4 (≤ liver 5) with a 30 mm short axis excludes; at 20 mm it does not."""
    lesions = [syn.SphereLesion(NODE, 20.0, 25.0), syn.SphereLesion(OTHER, 30.0, 4.0)]
    given = {"node_ct": (OTHER, 30.0)}
    _, excluded = _analyse(lesions, given, sites={"node_ct": {"site": "lymph_node", "short_axis_mm": 30.0}})
    assert excluded.vision.eligible is False
    (decisive,) = excluded.vision.decided_by
    assert decisive.rule == "vision.psma_negative_lesion" and decisive.passed is False
    assert decisive.values["size_mm"] == 30.0 and decisive.values["threshold_mm"] == 25.0
    assert decisive.values["suv_max"] == pytest.approx(4.0)
    assert "lymph_node" in decisive.detail and "30.0 mm" in decisive.detail
    _, small = _analyse(lesions, given, sites={"node_ct": {"site": "lymph_node", "short_axis_mm": 20.0}})
    assert small.vision.eligible is True
    assert any(f.rule == "vision.psma_negative_lesion" and f.passed and "< 25 mm" in f.detail for f in small.vision.findings)


def test_vision_size_thresholds_by_site():
    lesions = [syn.SphereLesion(NODE, 20.0, 25.0), syn.SphereLesion(OTHER, 14.0, 3.0)]
    given = {"met": (OTHER, 14.0)}
    for site, eligible in [("solid_organ", False), ("bone_soft_tissue", False), ("lymph_node", True), ("bone", True), ("unknown", False)]:
        _, result = _analyse(lesions, given, sites={"met": {"site": site}})
        assert result.vision.eligible is eligible, (site, result.vision.summary)
    # the PET VOI's short axis (≈ 14 mm) is used when no CT size is given
    negative = next(f for f in result.vision.findings if f.rule == "vision.psma_negative_lesion")
    assert negative.values["size_mm"] == pytest.approx(14.0, abs=SPACING)
    assert "strictest" in negative.detail


def test_vision_without_psma_positive_disease():
    _, result = _analyse([syn.SphereLesion(OTHER, 14.0, 4.5)], given={"met": (OTHER, 14.0)}, sites={"met": {"site": "bone"}})
    assert result.vision.eligible is False
    assert _rules(result.vision) == ["vision.psma_positive_disease"]
    assert "no lesion with suv_max > liver" in result.vision.decided_by[0].detail


def test_vision_without_a_liver_is_undetermined():
    scene = syn.psma_scene([syn.SphereLesion(NODE, 20.0, 25.0)], size=SIZE, spacing=(SPACING,) * 3)
    references = voi.reference_stats(scene.suv, {k: v for k, v in scene.masks.items() if k != "liver"})
    seg = voi.segment_lesions(scene.suv, voi.VoiSettings(method="fixed", fixed_threshold=15.0))
    lesions = voi.measure_lesions(scene.suv, seg.labels, references)
    result = sel.select(lesions, references)
    assert result.vision.eligible is None and result.vision.not_assessed == ["liver reference"]
    assert result.promise[0].score == 3  # 25 ≥ parotid: decided without the liver
    assert result.promise_summary["highest_score"] == 3


# --------------------------------------------------------------------------- TheraP


def test_therap_needs_one_site_at_20():
    _, result = _analyse([syn.SphereLesion(NODE, 20.0, 18.0), syn.SphereLesion(BONE, 16.0, 12.0)],
                         sites={1: {"site": "lymph_node", "short_axis_mm": 20.0}})
    assert result.therap.eligible is False
    assert _rules(result.therap) == ["therap.one_site_high"]
    assert result.therap.decided_by[0].values["highest"] == {"label": 1, "suv_max": pytest.approx(18.0)}
    assert result.vision.eligible is True  # still PSMA-positive disease


def test_therap_low_measurable_site_excludes():
    lesions = [syn.SphereLesion(NODE, 20.0, 25.0), syn.SphereLesion(OTHER, 16.0, 8.0)]
    given = {"liver_met": (OTHER, 16.0)}
    _, result = _analyse(lesions, given, sites={"liver_met": {"site": "solid_organ"}})
    assert result.therap.eligible is False
    (decisive,) = result.therap.decided_by
    assert decisive.rule == "therap.measurable_site_low" and decisive.values["suv_max"] == pytest.approx(8.0)
    assert "< 10" in decisive.detail
    # the same lesion in bone (no soft-tissue component) is not measurable: eligible
    _, bone = _analyse(lesions, given, sites={"liver_met": {"site": "bone"}})
    assert bone.therap.eligible is True


def test_therap_small_lymph_node_is_not_measurable():
    lesions = [syn.SphereLesion(NODE, 20.0, 25.0), syn.SphereLesion(OTHER, 12.0, 8.0)]
    given = {"node": (OTHER, 12.0)}
    _, result = _analyse(lesions, given, sites={"node": {"site": "lymph_node", "short_axis_mm": 12.0}})
    assert result.therap.eligible is True  # 12 mm < 15 mm short axis: not a measurable node


# --------------------------------------------------------------------------- PROMISE


def test_promise_scores_each_level():
    lesions = [syn.SphereLesion(NODE, 20.0, 25.0), syn.SphereLesion(BONE, 16.0, 8.0), syn.SphereLesion(OTHER, 16.0, 3.0),
               syn.SphereLesion(FOURTH, 16.0, 1.0)]
    given = {"b": (BONE, 16.0), "c": (OTHER, 16.0), "d": (FOURTH, 16.0)}
    measured, result = _analyse(lesions, given)
    by_value = {round(score.value): score for score in result.promise}
    assert by_value[25].score == 3 and by_value[8].score == 2 and by_value[3].score == 1 and by_value[1].score == 0
    assert "< blood_pool 1.80" in by_value[1].detail
    assert "≥ blood_pool" in by_value[3].detail and "< liver" in by_value[3].detail
    assert result.promise_summary["counts"] == {"0": 1, "1": 1, "2": 1, "3": 1}
    assert {m.name for m in measured} == {"auto", "b", "c", "d"}


def test_promise_uses_spleen_for_psma_1007():
    lesions = [syn.SphereLesion(NODE, 20.0, 25.0), syn.SphereLesion(OTHER, 16.0, 4.5)]
    given = {"c": (OTHER, 16.0)}
    _, ga = _analyse(lesions, given, tracer=tracer_from_text("PSMA-11"))
    _, f18 = _analyse(lesions, given, tracer=tracer_from_text("18F-PSMA1007"))
    assert [s.score for s in ga.promise] == [3, 1]  # 4.5 < liver 5
    assert [s.score for s in f18.promise] == [3, 2]  # 4.5 ≥ spleen 4
    assert f18.promise_summary["reference_for_score_2"] == "spleen"


# --------------------------------------------------------------------------- configuration


def test_thresholds_come_from_the_criteria_file(tmp_path):
    path = tmp_path / "criteria.json"
    path.write_text(json.dumps({"therap": {"at_least_one_site_min": 30.0}}))
    criteria = sel.load_criteria(path)
    assert criteria["therap"]["all_measurable_sites_min"] == 10.0  # merged over the defaults
    _, result = _analyse([syn.SphereLesion(NODE, 20.0, 25.0)], criteria=criteria)
    assert result.therap.eligible is False and "≥ 30" in result.therap.decided_by[0].detail
    assert result.criteria["therap"]["at_least_one_site_min"] == 30.0
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="not JSON"):
        sel.load_criteria(tmp_path / "bad.json")
    (tmp_path / "odd.json").write_text(json.dumps({"visoin": {}}))
    with pytest.raises(InputError, match="unknown criteria sections"):
        sel.load_criteria(tmp_path / "odd.json")


def test_unknown_site_is_refused():
    lesion = voi.Lesion(1, 10, 1.0, 20.0, 10.0, 1.0, 15.0, 10.0, 12.0, 12.0, (0, 0, 0), (0, 0, 0), (0, 0, 0), site="brain")
    with pytest.raises(InputError, match="site 'brain'"):
        sel.select([lesion], {})


def test_default_criteria_match_the_notes():
    criteria = sel.load_criteria()
    assert criteria["vision"]["negative_size_mm"] == {"solid_organ": 10.0, "lymph_node": 25.0, "bone_soft_tissue": 10.0}
    assert (criteria["therap"]["at_least_one_site_min"], criteria["therap"]["all_measurable_sites_min"]) == (20.0, 10.0)
    assert criteria["voi"]["percent_of_max"] == 0.41
    assert math.isclose(criteria["voi"]["percist_liver_factor"], 1.5) and math.isclose(criteria["voi"]["percist_sd_factor"], 2.0)

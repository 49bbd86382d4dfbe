"""Selection rules at their exact thresholds and one step either side (0.01 SUV, 0.1 mm), so that
a ``>``/``≥`` swap, the wrong statistic (lesion SUVmean for SUVmax, liver SUVmax for SUVmean),
the wrong size (long for short axis) or a threshold moved by one step fails a test.

Lesions and reference regions are given as numbers (no image): each lesion's SUVmean and
long axis sit far from its SUVmax and short axis, each region's SUVmax far from its SUVmean.
PSMA-1007 is recognised from the header's code or any spelling of its name (quant/tracer.py)."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from quant import selection as sel
from quant.tracer import identify_tracer, tracer_from_text
from quant.voi import Lesion, RegionStats

CRITERIA = sel.load_criteria()
STEP_SUV, STEP_MM = 0.01, 0.1


def _region(name: str, mean: float) -> RegionStats:
    return RegionStats(name, suv_mean=mean, suv_sd=0.5, suv_max=2.0 * mean + 3.0, suv_median=mean, volume_mL=100.0, voxels=1000)


# references (SUVmean): blood pool 1.8, spleen 4, liver 5, parotid 12; their SUVmax: 6.6, 11, 13, 27
REFS = {name: _region(name, mean) for name, mean in (("blood_pool", 1.8), ("spleen", 4.0), ("liver", 5.0), ("parotid", 12.0))}


def _lesion(label: int, suv_max: float, site: str = "unknown", short: float = 5.0, site_short: float | None = None) -> Lesion:
    """A lesion with SUVmean and SUVpeak at a fifth of SUVmax, long axis twice the short one."""
    return Lesion(label=label, voxels=10, volume_mL=1.0, suv_max=suv_max, suv_mean=suv_max / 5, suv_sd=0.1, suv_peak=suv_max / 5,
                  tlu=1.0, long_axis_mm=2 * short, short_axis_mm=short, max_position_mm=(0, 0, 0), peak_centre_mm=(0, 0, 0),
                  centroid_mm=(0, 0, 0), site=site, site_short_axis_mm=site_short)


def _sides(value: float, step: float) -> tuple[float, float, float]:
    return round(value - step, 6), value, round(value + step, 6)


# --------------------------------------------------------------------------- VISION


def test_vision_positive_means_lesion_suvmax_above_liver_suvmean():
    below, at, above = _sides(5.0, STEP_SUV)
    verdicts = [sel.vision([_lesion(1, v, "bone")], REFS, CRITERIA) for v in (below, at, above)]
    assert [v.eligible for v in verdicts] == [False, False, True]      # uptake equal to the liver is not positive
    assert verdicts[1].decided_by[0].rule == "vision.psma_positive_disease"
    assert verdicts[2].findings[0].values["reference_value"] == 5.0     # the liver's SUVmean, not its SUVmax (13)


@pytest.mark.parametrize("site, limit", [("lymph_node", 25.0), ("solid_organ", 10.0), ("bone_soft_tissue", 10.0)])
@pytest.mark.parametrize("given_on_ct", [False, True])
def test_vision_psma_negative_lesion_size_thresholds(site, limit, given_on_ct):
    """A PSMA-negative lesion (SUVmax equal to the liver SUVmean) at or above its site's size
    threshold excludes; one step below does not. The size is the short axis: given with the
    site (CT) when there is one, else the PET VOI's."""
    positive = _lesion(1, 30.0, "bone")
    outcomes = []
    for size in _sides(limit, STEP_MM):
        negative = _lesion(2, 5.0, site, short=3.0 if given_on_ct else size, site_short=size if given_on_ct else None)
        verdict = sel.vision([positive, negative], REFS, CRITERIA)
        outcomes.append(verdict.eligible)
        finding = next(f for f in verdict.findings if f.rule == "vision.psma_negative_lesion")
        assert finding.values["size_mm"] == size and finding.values["threshold_mm"] == limit
        assert finding.values["size_source"] == ("short axis given with the site" if given_on_ct else "short axis of the PET VOI")
    assert outcomes == [True, False, False]


def test_vision_lesion_just_above_liver_is_not_negative():
    """A large node one step above the liver SUVmean is PSMA-positive: no size rule applies."""
    verdict = sel.vision([_lesion(1, 5.01, "lymph_node", short=40.0)], REFS, CRITERIA)
    assert verdict.eligible is True


# --------------------------------------------------------------------------- TheraP


def test_therap_one_site_at_suvmax_20():
    outcomes = [sel.therap([_lesion(1, v, "bone")], CRITERIA).eligible for v in _sides(20.0, STEP_SUV)]
    assert outcomes == [False, True, True]


def test_therap_every_measurable_site_at_suvmax_10():
    outcomes = [sel.therap([_lesion(1, 25.0, "bone"), _lesion(2, v, "lymph_node", short=20.0)], CRITERIA).eligible
                for v in _sides(10.0, STEP_SUV)]
    assert outcomes == [False, True, True]


def test_therap_measurable_lymph_node_from_15_mm_short_axis():
    """A node with SUVmax 9 fails TheraP only when measurable: short axis ≥ 15 mm (its long axis is twice that)."""
    outcomes = [sel.therap([_lesion(1, 25.0, "bone"), _lesion(2, 9.0, "lymph_node", short=size)], CRITERIA).eligible
                for size in _sides(15.0, STEP_MM)]
    assert outcomes == [True, False, False]


# --------------------------------------------------------------------------- PROMISE miPSMA


@pytest.mark.parametrize("reference, score_below", [(1.8, 0), (5.0, 1), (12.0, 2)])
def test_promise_score_boundaries(reference, score_below):
    """0 < blood pool ≤ 1 < liver ≤ 2 < parotid ≤ 3, each against the region's SUVmean."""
    lesions = [_lesion(k, v) for k, v in enumerate(_sides(reference, STEP_SUV), start=1)]
    scores, _ = sel.promise_scores(lesions, REFS, CRITERIA)
    assert [s.score for s in scores] == [score_below, score_below + 1, score_below + 1]


@pytest.mark.parametrize("name", ["PSMA-1007", "PSMA1007", "18F-PSMA-1007", "[18F]PSMA-1007", "F-18 PSMA 1007"])
def test_promise_uses_the_spleen_for_psma_1007_however_named(name):
    tracer = tracer_from_text(name)
    assert sel.liver_reference_name(CRITERIA, tracer) == "spleen"
    scores, summary = sel.promise_scores([_lesion(k, v) for k, v in enumerate(_sides(4.0, STEP_SUV), start=1)], REFS, CRITERIA, tracer)
    assert [s.score for s in scores] == [1, 2, 2] and summary["reference_for_score_2"] == "spleen"


def test_promise_tracer_code_comes_before_the_name():
    item = Dataset()
    item.Radiopharmaceutical = "PSMA"                                   # free text alone: no agent, the liver
    dataset = Dataset()
    dataset.RadiopharmaceuticalInformationSequence = [item]
    assert sel.liver_reference_name(CRITERIA, identify_tracer(dataset)) == "liver"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator = codes.cid4021.PSMA1007F18.value, "SCT"
    code.CodeMeaning = codes.cid4021.PSMA1007F18.meaning
    item.RadiopharmaceuticalCodeSequence = [code]
    assert sel.liver_reference_name(CRITERIA, identify_tracer(dataset)) == "spleen"
    for other in ("PSMA-11", "Ga-68 gozetotide", None):
        assert sel.liver_reference_name(CRITERIA, None if other is None else tracer_from_text(other)) == "liver"

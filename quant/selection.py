"""Theranostic selection from PSMA PET lesion measurements: VISION and TheraP eligibility, and
the PROMISE miPSMA expression score per lesion. Thresholds come from a criteria file
(``quant/data/criteria.json`` by default), never from code.

Inputs are :class:`quant.voi.Lesion` measurements (SUV in the image's unit, sizes in mm) and
reference-region statistics (:class:`quant.voi.RegionStats`). Every verdict says which rules
decided it and the numbers behind them; a criterion that cannot be assessed (no liver mask, no
FDG PET) is said to be so, never silently passed.

Lesion sites: 'solid_organ', 'lymph_node', 'bone' (no soft-tissue component),
'bone_soft_tissue' (its size is the soft-tissue component's), or 'unknown'. A lesion's size is
the CT reading given with its site (``site_short_axis_mm``) when present, else the VOI's.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quant.jsonfile import read_json_object
from quant.tracer import Tracer
from quant.voi import Lesion, RegionStats
from recon.errors import InputError

DEFAULT_CRITERIA = Path(__file__).resolve().parent / "data" / "criteria.json"
SITES = ("solid_organ", "lymph_node", "bone", "bone_soft_tissue", "unknown")


# --------------------------------------------------------------------------- criteria file


def load_criteria(path: str | Path | None = None) -> dict[str, Any]:
    """The default criteria, with the file at ``path`` (if any) merged over them key by key."""
    criteria = json.loads(DEFAULT_CRITERIA.read_text())
    if path is None:
        return criteria
    path = Path(path)
    override = read_json_object(path, "criteria file")
    unknown = set(override) - set(criteria)
    if unknown:
        raise InputError(path, f"unknown criteria sections {sorted(unknown)} (known: {sorted(criteria)})")
    return _merge(criteria, override)


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Finding:
    """One rule applied: ``passed`` True/False, or None when it could not be assessed;
    ``detail`` says it in words, ``values`` holds the numbers (SUV, mm, lesion labels)."""

    rule: str
    passed: bool | None
    detail: str
    values: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    """A criterion's outcome: ``eligible`` True/False, or None when undetermined;
    ``decided_by``: the findings that settled it; ``findings``: every rule evaluated."""

    criterion: str
    eligible: bool | None
    summary: str
    decided_by: list[Finding]
    findings: list[Finding]
    not_assessed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LesionScore:
    """PROMISE miPSMA score of one lesion (0-3, None when a needed reference is missing), the
    lesion value and reference values compared (SUV)."""

    label: int
    score: int | None
    value: float
    references: dict[str, float]
    detail: str


@dataclass(frozen=True)
class Selection:
    """All verdicts and scores, with the reference values and the criteria used."""

    vision: Verdict
    therap: Verdict
    promise: list[LesionScore]
    promise_summary: dict[str, Any]
    references: dict[str, dict[str, float]]
    criteria: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "vision": asdict(self.vision),
            "therap": asdict(self.therap),
            "promise": {"lesions": [asdict(score) for score in self.promise], **self.promise_summary},
            "references": self.references,
            "criteria": self.criteria,
        }


# --------------------------------------------------------------------------- helpers


def _value(lesion: Lesion, statistic: str) -> float:
    return float(getattr(lesion, statistic))


def _reference(references: Mapping[str, RegionStats], name: str, statistic: str) -> float | None:
    region = references.get(name)
    return None if region is None else float(getattr(region, statistic))


def lesion_size_mm(lesion: Lesion, measure: str) -> tuple[float, str]:
    """The size used by the criteria (mm) and where it came from: the CT short axis given with
    the site when ``measure`` is 'short_axis_mm' and one was given, else the VOI's measure."""
    if measure == "short_axis_mm" and lesion.site_short_axis_mm is not None:
        return float(lesion.site_short_axis_mm), "short axis given with the site"
    if measure not in ("short_axis_mm", "long_axis_mm"):
        raise ValueError(f"size measure {measure!r}: short_axis_mm or long_axis_mm")
    how = f" ({lesion.size_method})" if lesion.size_method else ""
    return float(getattr(lesion, measure)), f"{measure.replace('_mm', '').replace('_', ' ')} of the PET VOI{how}"


def _check_sites(lesions: Sequence[Lesion]) -> None:
    for lesion in lesions:
        if lesion.site not in SITES:
            raise InputError(None, f"lesion {lesion.label}: site {lesion.site!r} is not one of {SITES}")


# --------------------------------------------------------------------------- VISION


def vision(lesions: Sequence[Lesion], references: Mapping[str, RegionStats], criteria: Mapping[str, Any]) -> Verdict:
    """VISION: eligible with ≥ 1 PSMA-positive lesion (statistic > liver reference) and no
    PSMA-negative lesion (≤ liver) at or above the size threshold of its site."""
    c = criteria["vision"]
    _check_sites(lesions)
    liver = _reference(references, c["reference"], c["reference_statistic"])
    stat, ref_name = c["lesion_statistic"], c["reference"]
    if liver is None:
        finding = Finding("vision.reference", None, f"no {ref_name} reference region: PSMA positivity cannot be judged")
        return Verdict("VISION", None, f"undetermined: no {ref_name} mask", [finding], [finding], [f"{ref_name} reference"])
    positive = [lesion for lesion in lesions if _value(lesion, stat) > liver]
    negative = [lesion for lesion in lesions if _value(lesion, stat) <= liver]
    findings: list[Finding] = []
    pos_values = {"reference": f"{ref_name} {c['reference_statistic']}", "reference_value": liver, "statistic": stat,
                  "positive_lesions": [{"label": lesion.label, stat: _value(lesion, stat)} for lesion in positive]}
    if positive:
        best = max(positive, key=lambda lesion: _value(lesion, stat))
        detail = (f"{len(positive)} PSMA-positive lesion(s) ({stat} > {ref_name} {c['reference_statistic']} {liver:.2f}); "
                  f"highest: lesion {best.label}, {stat} {_value(best, stat):.2f}")
    else:
        detail = f"no lesion with {stat} > {ref_name} {c['reference_statistic']} {liver:.2f}" + ("" if lesions else " (no lesion found)")
    findings.append(Finding("vision.psma_positive_disease", bool(positive), detail, pos_values))

    thresholds: Mapping[str, float] = c["negative_size_mm"]
    strictest = min(thresholds.values())
    disqualifying = []
    for lesion in negative:
        finding = _vision_negative(lesion, liver, thresholds, strictest, c, stat, ref_name)
        findings.append(finding)
        if finding.passed is False:
            disqualifying.append(finding)
    if not negative:
        findings.append(Finding("vision.psma_negative_lesions", True, f"no PSMA-negative lesion ({stat} ≤ {ref_name} {liver:.2f})",
                                {"reference_value": liver}))
    if not positive:
        decided = [findings[0]] + disqualifying
        return Verdict("VISION", False, "not eligible: no PSMA-positive disease" + (" and PSMA-negative lesion(s) above size thresholds" if disqualifying else ""),
                       decided, findings)
    if disqualifying:
        labels = ", ".join(str(f.values["label"]) for f in disqualifying)
        return Verdict("VISION", False, f"not eligible: PSMA-negative lesion(s) {labels} at or above the size threshold", disqualifying, findings)
    decided = [f for f in findings if f.passed is True]
    return Verdict("VISION", True, "eligible: PSMA-positive disease and no PSMA-negative lesion at or above the size thresholds", decided, findings)


def _vision_negative(lesion: Lesion, liver: float, thresholds: Mapping[str, float], strictest: float,
                     c: Mapping[str, Any], stat: str, ref_name: str) -> Finding:
    size, source = lesion_size_mm(lesion, c["size_measure"])
    values = {"label": lesion.label, stat: _value(lesion, stat), "reference_value": liver, "site": lesion.site,
              "size_mm": size, "size_source": source}
    head = f"lesion {lesion.label} PSMA-negative ({stat} {_value(lesion, stat):.2f} ≤ {ref_name} {liver:.2f}), site {lesion.site}, {size:.1f} mm ({source})"
    if lesion.site in c["sites_without_size_rule"]:
        return Finding("vision.psma_negative_lesion", True, f"{head}: no size rule for this site", values)
    if lesion.site == "unknown":
        if c["unknown_site"] == "ignore":
            return Finding("vision.psma_negative_lesion", True, f"{head}: site unknown, ignored by configuration", values)
        if c["unknown_site"] == "undetermined":
            return Finding("vision.psma_negative_lesion", None, f"{head}: site unknown, cannot be judged", values)
        limit, rule = strictest, "site unknown: the strictest size threshold"
    else:
        limit, rule = float(thresholds[lesion.site]), f"{lesion.site} threshold"
    values["threshold_mm"] = limit
    if size >= limit:
        return Finding("vision.psma_negative_lesion", False, f"{head} ≥ {limit:g} mm ({rule}): exclusion", values)
    return Finding("vision.psma_negative_lesion", True, f"{head} < {limit:g} mm ({rule})", values)


# --------------------------------------------------------------------------- TheraP


def measurable(lesion: Lesion, criteria: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether a lesion is a measurable site for TheraP (by its site's rule), and why."""
    rule = criteria["therap"]["measurable"].get(lesion.site)
    if rule is None:
        return False, f"site {lesion.site}: not measurable"
    size, source = lesion_size_mm(lesion, rule["measure"])
    ok = size >= float(rule["min_mm"])
    return ok, f"{size:.1f} mm ({source}) {'≥' if ok else '<'} {rule['min_mm']:g} mm for {lesion.site}"


def therap(lesions: Sequence[Lesion], criteria: Mapping[str, Any]) -> Verdict:
    """TheraP: SUVmax ≥ 20 at one site at least, and ≥ 10 at every measurable site; the FDG
    discordance rule is reported as not assessed."""
    c = criteria["therap"]
    _check_sites(lesions)
    stat, high, floor = c["lesion_statistic"], float(c["at_least_one_site_min"]), float(c["all_measurable_sites_min"])
    findings: list[Finding] = []
    hot = [lesion for lesion in lesions if _value(lesion, stat) >= high]
    best = max(lesions, key=lambda lesion: _value(lesion, stat), default=None)
    best_text = f"highest: lesion {best.label}, {stat} {_value(best, stat):.2f}" if best else "no lesion found"
    first = Finding("therap.one_site_high", bool(hot),
                    f"{len(hot)} site(s) with {stat} ≥ {high:g} ({best_text})",
                    {"threshold": high, "statistic": stat, "sites": [{"label": lesion.label, stat: _value(lesion, stat)} for lesion in hot],
                     "highest": None if best is None else {"label": best.label, stat: _value(best, stat)}})
    findings.append(first)
    low_measurable = []
    measured = []
    for lesion in lesions:
        ok, why = measurable(lesion, criteria)
        if not ok:
            continue
        value = _value(lesion, stat)
        measured.append({"label": lesion.label, stat: value, "why_measurable": why})
        if value < floor:
            low_measurable.append(Finding("therap.measurable_site_low", False,
                                          f"measurable lesion {lesion.label} ({why}) has {stat} {value:.2f} < {floor:g}",
                                          {"label": lesion.label, stat: value, "threshold": floor}))
    findings.extend(low_measurable)
    if not low_measurable:
        findings.append(Finding("therap.all_measurable_sites", True,
                                f"all {len(measured)} measurable site(s) have {stat} ≥ {floor:g}", {"threshold": floor, "sites": measured}))
    not_assessed = [c["fdg"]]
    findings.append(Finding("therap.fdg_discordance", None, f"not assessed: {c['fdg']}"))
    if not hot or low_measurable:
        decided = ([first] if not hot else []) + low_measurable
        reasons = ([f"no site with {stat} ≥ {high:g}"] if not hot else []) + ([f"{len(low_measurable)} measurable site(s) with {stat} < {floor:g}"] if low_measurable else [])
        return Verdict("TheraP", False, "not eligible: " + "; ".join(reasons), decided, findings, not_assessed)
    decided = [f for f in findings if f.passed is True]
    return Verdict("TheraP", True, f"eligible on PSMA PET ({stat} ≥ {high:g} at one site, ≥ {floor:g} at all measurable sites); FDG not assessed",
                   decided, findings, not_assessed)


# --------------------------------------------------------------------------- PROMISE


def liver_reference_name(criteria: Mapping[str, Any], tracer: Tracer | None) -> str:
    """'liver', or the organ the criteria name for the tracer's agent (PROMISE v2: spleen for
    PSMA-1007, however the header names it: see quant/tracer.py)."""
    table: Mapping[str, str] = criteria["promise"]["liver_reference"]
    if tracer is not None:
        for key, organ in table.items():
            if key != "default" and key.lower() == tracer.agent.lower():
                return organ
    return table["default"]


def promise_scores(lesions: Sequence[Lesion], references: Mapping[str, RegionStats], criteria: Mapping[str, Any],
                   tracer: Tracer | None = None) -> tuple[list[LesionScore], dict[str, Any]]:
    """miPSMA score of each lesion: 0 below blood pool, 1 ≥ blood pool and < liver, 2 ≥ liver
    and < parotid, 3 ≥ parotid (liver → spleen for PSMA-1007 by default)."""
    c = criteria["promise"]
    stat, ref_stat = c["lesion_statistic"], c["reference_statistic"]
    middle = liver_reference_name(criteria, tracer)
    ladder = [("blood_pool", 1), (middle, 2), ("parotid", 3)]
    refs = {name: _reference(references, name, ref_stat) for name, _ in ladder}
    scores = []
    for lesion in lesions:
        value = _value(lesion, stat)
        score, detail = _promise_level(value, stat, [(name, refs[name]) for name, _ in ladder])
        scores.append(LesionScore(lesion.label, score, value, {k: v for k, v in refs.items() if v is not None}, f"score {score}: {detail}"))
    known = [s.score for s in scores if s.score is not None]
    summary = {
        "reference_for_score_2": middle,
        "statistic": stat,
        "reference_statistic": ref_stat,
        "highest_score": max(known) if known else None,
        "counts": {str(k): known.count(k) for k in range(4)},
        "undetermined": sum(s.score is None for s in scores),
    }
    return scores, summary


def _promise_level(value: float, stat: str, ladder: list[tuple[str, float | None]]) -> tuple[int | None, str]:
    """Score = the number of ladder references (blood pool, liver, parotid) the value reaches,
    decided when the references around the value are known."""
    (bp_name, bp), (mid_name, mid), (top_name, top) = ladder
    text = f"{stat} {value:.2f}"

    def missing(name: str) -> tuple[None, str]:
        return None, f"{text}: no {name} reference to decide"

    if top is not None and value >= top:
        return 3, f"{text} ≥ {top_name} {top:.2f}"
    if mid is not None and value >= mid:
        return (2, f"{text} ≥ {mid_name} {mid:.2f} and < {top_name} {top:.2f}") if top is not None else missing(top_name)
    if bp is not None and value >= bp:
        return (1, f"{text} ≥ {bp_name} {bp:.2f} and < {mid_name} {mid:.2f}") if mid is not None else missing(mid_name)
    if bp is not None:
        return 0, f"{text} < {bp_name} {bp:.2f}"
    return missing(bp_name)


# --------------------------------------------------------------------------- all together


def select(lesions: Sequence[Lesion], references: Mapping[str, RegionStats], criteria: Mapping[str, Any] | None = None,
           tracer: Tracer | None = None) -> Selection:
    """VISION and TheraP verdicts and PROMISE scores for ``lesions``."""
    criteria = dict(criteria) if criteria is not None else load_criteria()
    scores, summary = promise_scores(lesions, references, criteria, tracer)
    refs = {name: {"suv_mean": r.suv_mean, "suv_sd": r.suv_sd, "suv_max": r.suv_max, "volume_mL": r.volume_mL} for name, r in references.items()}
    return Selection(vision(lesions, references, criteria), therap(lesions, criteria), scores, summary, refs, criteria)

"""Which radiopharmaceutical a DICOM image shows: coded first, free text second.

``identify_tracer(dataset)`` reads the first item of RadiopharmaceuticalInformationSequence:
its RadiopharmaceuticalCodeSequence (DICOM CID 4021 codes, as pydicom's code dictionary gives
them) when present and known, else the code meaning, else the free-text Radiopharmaceutical
(0018,0031). Free text is compared without case, spaces, hyphens or brackets, so that
``PSMA1007``, ``18F-PSMA-1007`` and ``[18F]PSMA-1007`` all name PSMA-1007.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

PSMA, SSTR, FDG, OTHER = "PSMA", "SSTR", "FDG", "other"


@dataclass(frozen=True)
class Tracer:
    """A recognised agent (``PSMA-1007``, ``DOTATATE``…), its target family (PSMA, SSTR, FDG or
    other), the text it was recognised from, and how (``code`` or ``name``)."""

    agent: str
    family: str
    text: str
    how: str

    @property
    def selects_for_therapy(self) -> bool:
        """Whether the tracer is one of a theranostic pair that theraflow selects for (PSMA, SSTR)."""
        return self.family in (PSMA, SSTR)


# CID 4021 codes → (agent, family).
_CODES = {
    codes.cid4021.PSMA11Ga68.value: ("PSMA-11", PSMA),
    codes.cid4021.PSMA617Ga68.value: ("PSMA-617", PSMA),
    codes.cid4021.PSMA1007F18.value: ("PSMA-1007", PSMA),
    codes.cid4021.PiflufolastatF18.value: ("DCFPyL", PSMA),
    codes.cid4021.DotatateGa68.value: ("DOTATATE", SSTR),
    codes.cid4021.EdotreotideGa68.value: ("DOTATOC", SSTR),
    codes.cid4021.FluorodeoxyglucoseF18.value: ("FDG", FDG),
}

# Patterns on the normalised text (upper case, letters and digits only); first match wins.
_NAMES = (
    (r"PSMA1007", "PSMA-1007", PSMA),
    (r"PSMA11|GOZETOTIDE|HBEDCC", "PSMA-11", PSMA),
    (r"PSMA617|VIPIVOTIDE", "PSMA-617", PSMA),
    (r"PSMAIT|PSMAI\&T|ZADAVOTIDE", "PSMA-I&T", PSMA),
    (r"DCFPYL|PIFLUFOLASTAT", "DCFPyL", PSMA),
    (r"RHPSMA|FLOTUFOLASTAT", "rhPSMA-7.3", PSMA),
    (r"PSMA", "PSMA", PSMA),
    (r"DOTATATE|OXODOTREOTIDE|OCTREOTATE", "DOTATATE", SSTR),
    (r"DOTATOC|EDOTREOTIDE", "DOTATOC", SSTR),
    (r"DOTANOC", "DOTANOC", SSTR),
    (r"OCTREOTIDE|PENTETREOTIDE|SSTR|SOMATOSTATIN", "somatostatin analogue", SSTR),
    (r"FDG|FLUORODEOXYGLUCOSE|FLUDEOXYGLUCOSE", "FDG", FDG),
)


def _normalised(text: str) -> str:
    return re.sub(r"[^A-Z0-9&]", "", text.upper())


def tracer_from_text(text: str, how: str = "name") -> Tracer | None:
    """The tracer a free text names, or None."""
    key = _normalised(text)
    for pattern, agent, family in _NAMES:
        if re.search(pattern, key):
            return Tracer(agent, family, text, how)
    return None


def identify_tracer(dataset: Dataset) -> Tracer | None:
    """The tracer of an image (see the module text), or None when its header names none that is known."""
    items = dataset.get("RadiopharmaceuticalInformationSequence") or []
    if not items:
        return None
    item = items[0]
    for code in item.get("RadiopharmaceuticalCodeSequence") or []:
        known = _CODES.get(str(code.get("CodeValue", "")))
        if known is not None:
            return Tracer(*known, str(code.get("CodeMeaning", code.get("CodeValue"))), "code")
        found = tracer_from_text(str(code.get("CodeMeaning", "")), "code")
        if found is not None:
            return found
    name = str(item.get("Radiopharmaceutical", "") or "")
    return tracer_from_text(name) if name else None

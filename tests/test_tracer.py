"""Tracer identification from DICOM: coded first, free-text variants second."""

import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from quant.tracer import PSMA, SSTR, identify_tracer


def _image(name: str | None = None, code=None) -> Dataset:
    item = Dataset()
    if name is not None:
        item.Radiopharmaceutical = name
    if code is not None:
        coded = Dataset()
        coded.CodeValue, coded.CodingSchemeDesignator, coded.CodeMeaning = code.value, code.scheme_designator, code.meaning
        item.RadiopharmaceuticalCodeSequence = [coded]
    ds = Dataset()
    ds.RadiopharmaceuticalInformationSequence = [item]
    return ds


@pytest.mark.parametrize("name", ["PSMA1007", "18F-PSMA-1007", "[18F]PSMA-1007", "F18 psma 1007", "PSMA-1007"])
def test_psma1007_name_variants(name):
    tracer = identify_tracer(_image(name))
    assert (tracer.agent, tracer.family, tracer.how) == ("PSMA-1007", PSMA, "name")


@pytest.mark.parametrize("name, agent, family", [
    ("Ga68 PSMA-11", "PSMA-11", PSMA), ("68Ga-gozetotide", "PSMA-11", PSMA), ("Lu-177 PSMA-617", "PSMA-617", PSMA),
    ("[18F]DCFPyL", "DCFPyL", PSMA), ("Ga-68 DOTATATE", "DOTATATE", SSTR), ("Ga-68 DOTA-TOC", "DOTATOC", SSTR),
    ("Fludeoxyglucose", "FDG", "FDG"),
])
def test_names(name, agent, family):
    tracer = identify_tracer(_image(name))
    assert (tracer.agent, tracer.family) == (agent, family)


def test_code_wins_over_contradicting_text():
    tracer = identify_tracer(_image("FDG", codes.cid4021.PSMA1007F18))
    assert (tracer.agent, tracer.how) == ("PSMA-1007", "code")
    assert identify_tracer(_image(None, codes.cid4021.DotatateGa68)).family == SSTR


def test_unknown_or_missing():
    assert identify_tracer(_image("Water O-15")) is None
    assert identify_tracer(Dataset()) is None
    assert not identify_tracer(_image("FDG")).selects_for_therapy

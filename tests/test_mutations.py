"""Tests that fail when the physics breaks (issue #14, item 3): each mutation of
``tests/mutations.py`` makes its accuracy tests fail; unmutated, the same tests pass.

Each run is a fresh pytest process (``tests/mutation_check.py``); together they take a few
minutes (the SPECT ones reconstruct the sample phantom, the PET ones a toy point source).
"""

from __future__ import annotations

import pytest

from ci_policy import shared_data
from mutation_check import all_tests, caught, run_tests
from mutations import MUTATIONS


@pytest.fixture(scope="module")
def control():
    """The tests of every mutation, unmutated: they must pass, or no failure below means anything."""
    outcome = run_tests(all_tests())
    assert outcome.returncode == 0, f"unmutated selection fails: {outcome.failed}: {outcome.message}"
    return outcome


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_mutation_is_caught(control, name):
    mutation = MUTATIONS[name]
    if mutation.shared_data:
        shared_data(mutation.shared_data)  # skipped without the real data (a failure under CI)
    outcome = run_tests(mutation.tests, name)
    assert caught(name, outcome), f"mutation {name} ({mutation.what}) survived {mutation.tests}: pytest exit {outcome.returncode}, {outcome.message}"

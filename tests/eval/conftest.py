"""Evaluation tests (whole models) run the ops' plain-PyTorch references on the CPU (see ``ops_on_references``)."""

import pytest


@pytest.fixture(autouse=True)
def _ops_on_references(ops_on_references):
    """Every model test: ops on their references."""

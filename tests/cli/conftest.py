"""CLI tests run whole (reduced) models: ops on their plain-PyTorch references."""

import pytest


@pytest.fixture(autouse=True)
def _ops_on_references(ops_on_references):
    """Every CLI test: ops on their references."""

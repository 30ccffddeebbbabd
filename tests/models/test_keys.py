"""Our state dicts equal the official models' key for key and shape for shape.

The expected keys come from ``fixtures/derive_bevformer_keys.py``, written from the official sources
independently of ``bevdeploy.models``; the JSON files are its output.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bevdeploy.models import MODELS
from tests.models.fixtures.derive_bevformer_keys import derive

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("variant", ["tiny", "small", "base"])
def test_state_dict_matches_official_keys(variant):
    expected = json.loads((FIXTURES / f"bevformer_{variant}_keys.json").read_text())
    assert expected == derive(variant), "the JSON fixture is stale: rerun fixtures/derive_bevformer_keys.py"
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = MODELS[f"bevformer-{variant}"]()
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(ours))
    extra = sorted(set(ours) - set(expected))
    shapes = sorted(k for k in set(ours) & set(expected) if ours[k] != expected[k])
    assert not missing, f"{len(missing)} official keys missing, e.g. {missing[:5]}"
    assert not extra, f"{len(extra)} keys the official model does not have, e.g. {extra[:5]}"
    assert not shapes, f"{len(shapes)} shapes differ, e.g. {[(k, ours[k], expected[k]) for k in shapes[:5]]}"

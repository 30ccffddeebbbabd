"""Calibration tables must cover the int8 scope exactly; --allow-partial-calib proceeds knowingly."""

import json

import pytest
import torch

from bevdeploy.engine import build
from bevdeploy.engine.deploy import fold_batchnorms, int8_scope
from bevdeploy.engine.engine_file import read_archive
from bevdeploy.models import MODELS
from bevdeploy.quant.calibrate import CalibrationTable

from .conftest import TINY


@pytest.fixture(scope="module")
def scope():
    torch.manual_seed(0)
    model = MODELS["bevformer-tiny"](**TINY)
    fold_batchnorms(model)  # the builder's names: after folding
    return int8_scope(model)


def _table(tmp_path, amax: dict, name="t.calib.json"):
    path = tmp_path / name
    CalibrationTable(amax=amax, method="minmax", num_samples=1).save(path)
    return str(path)


def _build(tmp_path, table, **kw):
    return build("bevformer-tiny", "int8", out=tmp_path / "q.engine", model_overrides=TINY, calib_table=table,
                 progress=False, **kw)


def _nothing_written(tmp_path):
    return not any(p.name.startswith("q.engine") for p in tmp_path.iterdir())


@pytest.mark.parametrize("edit,match", [
    (lambda a, s: {n: a[n] for n in s[: len(s) // 2]}, r"int8 layers without a range: "),
    (lambda a, s: dict(a, **{"other_model.backbone.conv9": 3.0}), r"1 layers this model does not have: other_model\.backbone\.conv9"),
    (lambda a, s: {n: 0.0 for n in a}, r"int8 layers with a zero range: img_backbone\.layer1\.0\.conv1"),  # the stem is kept float
])
def test_bad_tables_are_errors_naming_layers(tmp_path, scope, edit, match):
    full = {n: 4.0 for n in scope}
    with pytest.raises(ValueError, match=match):
        _build(tmp_path, _table(tmp_path, edit(full, scope)))
    assert _nothing_written(tmp_path)


def test_nonfinite_ranges(tmp_path, scope):
    bad = tmp_path / "nan.calib.json"
    bad.write_text(CalibrationTable(amax={n: 1.0 for n in scope}, method="minmax", num_samples=1).to_json()
                   .replace("1.0", "NaN", 1))
    with pytest.raises(ValueError, match=r"nan\.calib\.json: amax of 'img_backbone\.conv1' must be a finite number"):
        _build(tmp_path, str(bad))
    table = CalibrationTable(amax={n: (float("inf") if i == 2 else 1.0) for i, n in enumerate(scope)}, method="minmax",
                             num_samples=1)
    assert table.coverage_problems(scope, scope) == [f"1 int8 layers with a non-finite range: {scope[2]}"]


def test_exact_table_builds_every_layer_and_partial_needs_the_flag(tmp_path, scope, ops_on_references):
    path = _build(tmp_path, _table(tmp_path, {n: 4.0 for n in scope}))
    full = read_archive(path).metadata["int8_layers"]
    half = _table(tmp_path, {n: 4.0 for n in scope[: len(scope) // 2]}, "half.calib.json")
    with pytest.warns(UserWarning, match="partial calibration accepted.*int8 layers without a range"):
        path = _build(tmp_path, half, allow_partial_calib=True)
    meta = read_archive(path).metadata
    assert 0 < meta["int8_layers"] < full
    assert json.loads((tmp_path / "q.engine.calib.json").read_text())["amax"].keys() == set(scope[: len(scope) // 2])

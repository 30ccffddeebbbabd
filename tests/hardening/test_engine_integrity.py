"""Engine integrity: one hash over graph, weights, constants and metadata; a metadata schema."""

import json

import pytest

from bevdeploy.engine import Engine
from bevdeploy.engine.engine_file import integrity_hash, read_archive, validate_metadata

from .conftest import edit_json, member_name, members, rewrite


def _meta(path) -> dict:
    return read_archive(path).metadata


def test_changed_constant_in_the_stored_graph_is_refused(tiny_engine_path, tmp_path):
    changed = []

    def bump_a_float(doc):
        for node in doc["graph_module"]["graph"]["nodes"]:
            for arg in node["inputs"]:
                if "as_float" in arg["arg"]:
                    arg["arg"]["as_float"] += 0.125
                    changed.append(node["name"])
                    return

    graph = edit_json(tiny_engine_path, "models/model.json", bump_a_float)
    assert changed
    bad = tmp_path / "const.engine"
    rewrite(tiny_engine_path, bad, replace={"models/model.json": graph})
    with pytest.raises(ValueError, match=r"const\.engine: corrupt engine file: its integrity hash .*graph / weights / constants"):
        Engine.load(bad, device="cpu")


def test_changed_tensor_constant_or_weight_is_refused(tiny_engine_path, tmp_path):
    files = members(tiny_engine_path)
    for suffix in ("data/constants/tensor_0", "data/weights/weight_0"):
        data = bytearray(files[member_name(files, suffix)])
        data[0] ^= 0x01
        bad = tmp_path / "w.engine"
        rewrite(tiny_engine_path, bad, replace={suffix: bytes(data)})
        with pytest.raises(ValueError, match="integrity hash"):
            Engine.load(bad, device="cpu")


def test_changed_metadata_is_refused_even_when_valid(tiny_engine_path, tmp_path):
    bad = tmp_path / "m.engine"
    rewrite(tiny_engine_path, bad, replace={"extra/bevdeploy.json": edit_json(
        tiny_engine_path, "extra/bevdeploy.json", lambda m: m.update(checkpoint="other.pth"))})
    with pytest.raises(ValueError, match=r"integrity hash .*\(the metadata changed"):
        Engine.load(bad, device="cpu")


def test_hashes_reproduce_and_cover_the_metadata(tiny_engine_path):
    archive = read_archive(tiny_engine_path)
    meta = archive.metadata
    assert archive.content_hash == meta["content_hash"] and archive.integrity_hash == meta["integrity_hash"]
    assert integrity_hash(meta["content_hash"], dict(meta, precision="fp16")) != meta["integrity_hash"]


def _expect(meta, edit, match):
    m = json.loads(json.dumps(meta))
    edit(m)
    with pytest.raises(ValueError, match=match):
        validate_metadata(m, "x.engine")


def test_metadata_schema_names_the_field(tiny_engine_path):
    meta = _meta(tiny_engine_path)
    validate_metadata(meta, "x.engine")
    _expect(meta, lambda m: m.pop("inputs"), r"x\.engine: engine metadata lacks the field 'inputs'")
    _expect(meta, lambda m: m["inputs"]["image"].update(dtype="float8"), r"'inputs\.image\.dtype' must be one of")
    _expect(meta, lambda m: m.update(precision="int4"), r"'precision' must be one of .* got 'int4'")
    _expect(meta, lambda m: m.update(outputs=m["outputs"][::-1]), r"'outputs' must be \['bev_embed'.* in this order")
    _expect(meta, lambda m: m.update(outputs=["bev_embed", "bev_embed", "all_bbox_preds"]), r"'outputs' has duplicate")
    _expect(meta, lambda m: m.update(inputs=dict(reversed(list(m["inputs"].items())))), r"'inputs' must name")
    _expect(meta, lambda m: m["inputs"]["image"].update(shape=[1, -6]), r"'inputs\.image\.shape' must be a list of positive")
    _expect(meta, lambda m: m.update(batch="1"), r"'batch' must be int")
    _expect(meta, lambda m: m.update(family="yolo"), r"'family' must be one of")
    _expect(meta, lambda m: m.update(content_hash="abc"), r"'content_hash' must be 64 hex")
    _expect(meta, lambda m: m.update(gpu={"name": "H100", "capability": [9, -1]}), r"'gpu\.capability' must be a list of >= 0")


def test_gpu_engines_metadata_validates(tiny_engine_path):
    # a CUDA build records e.g. sm_90 as [9, 0]: a zero minor version is valid (it was refused once,
    # so every engine built on an H100 failed to load)
    meta = dict(_meta(tiny_engine_path), device_type="cuda", gpu={"name": "NVIDIA H100 80GB HBM3", "capability": [9, 0]})
    validate_metadata(meta, "x.engine")


def test_schema_errors_come_through_load(tiny_engine_path, tmp_path):
    bad = tmp_path / "schema.engine"
    rewrite(tiny_engine_path, bad, replace={"extra/bevdeploy.json": edit_json(
        tiny_engine_path, "extra/bevdeploy.json", lambda m: m.update(outputs=m["outputs"][::-1]))})
    with pytest.raises(ValueError, match=r"schema\.engine: engine metadata field 'outputs'"):
        Engine.load(bad, device="cpu")
    bad2 = tmp_path / "nometa.engine"
    rewrite(tiny_engine_path, bad2, replace={"extra/bevdeploy.json": b"{not json"})
    with pytest.raises(ValueError, match=r"nometa\.engine: engine metadata \(bevdeploy\.json\) is corrupt"):
        Engine.load(bad2, device="cpu")
    old = tmp_path / "old.engine"
    rewrite(tiny_engine_path, old, replace={"extra/bevdeploy.json": edit_json(
        tiny_engine_path, "extra/bevdeploy.json", lambda m: m.update(version=1))})
    with pytest.raises(RuntimeError, match=r"format version 1.*rebuild"):
        Engine.load(old, device="cpu")

"""Untrusted files: engines that would run code when unpickled, foreign ops, non-checkpoints, NaN weights.

Every refusal names the problem, and the crafted payload (a pickle that creates a file when
unpickled) is proven live: plain ``torch.export.load`` does create the file, ``Engine.load`` never.
"""

import io
import json
import pickle
import zipfile

import pytest
import torch
from torch import nn

from bevdeploy.engine import Engine
from bevdeploy.engine.engine_file import read_archive
from bevdeploy.models.checkpoint import load_checkpoint, read_state_dict

from .conftest import edit_json, members, rewrite


class _CreateFile:
    """Unpickling this opens (creates) a file: a stand-in for arbitrary code in an engine file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_sample_inputs_are_refused_and_never_unpickled(tiny_engine_path, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.engine"
    rewrite(tiny_engine_path, evil, replace={"data/sample_inputs/model.pt": pickle.dumps(_CreateFile(marker))})
    with pytest.raises(ValueError, match=r"evil\.engine.*sample_inputs.*pickle"):
        Engine.load(evil, device="cpu")
    assert not marker.exists()
    # the payload is live: torch's own loader runs it
    live = tmp_path / "live"
    rewrite(tiny_engine_path, evil, replace={"data/sample_inputs/model.pt": pickle.dumps(_CreateFile(live))})
    try:
        torch.export.load(io.BytesIO(evil.read_bytes()))
    except Exception:  # noqa: BLE001  (what torch does after unpickling does not matter here)
        pass
    assert live.exists()


def test_weights_marked_pickled_are_refused(tiny_engine_path, tmp_path):
    marker = tmp_path / "pwned"

    def mark(doc):
        first = next(iter(doc["config"].values()))
        first["use_pickle"] = True

    cfg = edit_json(tiny_engine_path, "model_weights_config.json", mark)
    first_file = next(iter(json.loads(cfg)["config"].values()))["path_name"]
    evil = tmp_path / "evil.engine"
    rewrite(tiny_engine_path, evil, replace={"model_weights_config.json": cfg,
                                              f"data/weights/{first_file}": pickle.dumps(_CreateFile(marker))})
    with pytest.raises(ValueError, match=r"use_pickle.*unpickle"):
        Engine.load(evil, device="cpu")
    assert not marker.exists()


@pytest.mark.parametrize("member", ["data/constants/custom_obj_0", "data/constants/opaque_obj_0", "data.pkl",
                                    "data/weights/model.pt", "models/model.pt"])
def test_pickle_members_are_refused(tiny_engine_path, tmp_path, member):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.engine"
    rewrite(tiny_engine_path, evil, add={member: pickle.dumps(_CreateFile(marker))})
    with pytest.raises(ValueError, match=rf"{member.split('/')[-1]}.*pickle"):
        Engine.load(evil, device="cpu")
    assert not marker.exists()


def test_graph_calling_a_foreign_function_is_refused(tiny_engine_path, tmp_path):
    def hijack(doc):
        doc["graph_module"]["graph"]["nodes"][0]["target"] = "torch.os.system"

    evil = tmp_path / "evil.engine"
    rewrite(tiny_engine_path, evil, replace={"models/model.json": edit_json(tiny_engine_path, "models/model.json", hijack)})
    with pytest.raises(ValueError, match=r"torch\.os\.system.*not ATen or bevdeploy"):
        Engine.load(evil, device="cpu")


def test_symbolic_shapes_are_refused(tiny_engine_path, tmp_path):
    def symbolic(doc):  # torch parses these with sympy.sympify, an eval
        doc["graph_module"]["graph"]["sym_int_values"] = {"s0": {"as_expr": {"expr_str": "__import__('os')"}}}

    evil = tmp_path / "evil.engine"
    rewrite(tiny_engine_path, evil, replace={"models/model.json": edit_json(tiny_engine_path, "models/model.json", symbolic)})
    with pytest.raises(ValueError, match="sym_int_values"):
        Engine.load(evil, device="cpu")


def test_our_build_writes_no_pickled_member(tiny_engine_path):
    files = members(tiny_engine_path)
    sample = [n for n in files if n.endswith("sample_inputs/model.pt")]
    assert all(files[n] == b"" for n in sample)
    assert not [n for n in files if n.endswith((".pkl", "custom_obj_0", "opaque_obj_0"))]
    for cfg in ("model_weights_config.json", "model_constants_config.json"):
        config = json.loads(files[next(n for n in files if n.endswith(cfg))])["config"]
        assert config and not any(e["use_pickle"] for e in config.values())
    assert read_archive(tiny_engine_path).content_hash


def test_not_an_engine(tmp_path):
    text = tmp_path / "notes.engine"
    text.write_text("hello\n")
    with pytest.raises(ValueError, match=r"notes\.engine.*corrupt or truncated"):
        Engine.load(text, device="cpu")
    with pytest.raises(ValueError, match="is a directory"):
        Engine.load(tmp_path, device="cpu")
    other = tmp_path / "other.engine"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("archive/models/model.json", "{}")
    with pytest.raises(ValueError, match=r"not a bevdeploy engine file \(missing"):
        Engine.load(other, device="cpu")


def test_text_file_or_directory_as_checkpoint(tmp_path):
    text = tmp_path / "weights.pth"
    text.write_text("not weights\n")
    with pytest.raises(ValueError, match=r"weights\.pth: not a PyTorch checkpoint"):
        read_state_dict(text)
    with pytest.raises(ValueError, match="is a directory"):
        read_state_dict(tmp_path)


def test_nonfinite_weights_are_refused_by_default(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    state = model.state_dict()
    state["1.weight"] = state["1.weight"].clone()
    state["1.weight"][0, 0] = float("nan")
    state["0.bias"] = state["0.bias"].clone()
    state["0.bias"][1] = float("inf")
    path = tmp_path / "nan.pth"
    torch.save(state, path)
    before = model[1].weight.detach().clone()
    with pytest.raises(ValueError, match=r"NaN or inf: 0\.bias, 1\.weight"):
        load_checkpoint(model, path)
    torch.testing.assert_close(model[1].weight.detach(), before)  # nothing loaded
    with pytest.warns(UserWarning, match="loaded anyway"):
        load_checkpoint(model, path, allow_nonfinite=True)
    assert torch.isnan(model[1].weight).any()

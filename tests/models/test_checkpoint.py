"""Checkpoint loading: wrappers and prefixes, every mismatch named and fatal unless partial, bad files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bevdeploy.models.checkpoint import load_checkpoint, read_state_dict
from tests.models._helpers import randomize_, small_config


class Net(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.fc = nn.Linear(3, width)
        self.bn = nn.BatchNorm1d(width)
        self.head = nn.Linear(width, 2)


def _trained() -> Net:
    net = Net()
    randomize_(net, seed=1)
    return net


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("wrap", ["bare", "state_dict", "model", "module."])
def test_wrappers_and_prefix(tmp_path, wrap):
    src = _trained()
    state = src.state_dict()
    if wrap == "module.":
        obj = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    elif wrap == "bare":
        obj = state
    else:
        obj = {wrap: state, "meta": {"epoch": 24, "CLASSES": ("car", "truck")}}
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    dst = Net()
    report = load_checkpoint(dst, path)
    assert report.complete and report.loaded == len(state)
    assert _same(src, dst)


def test_mmcv_meta_with_numpy_scalars_loads(tmp_path):
    """mmcv's meta may hold numpy values, which plain weights_only refuses; they are allowed, code is not."""
    src = _trained()
    path = tmp_path / "mmcv.pth"
    torch.save({"meta": {"best_score": np.float64(0.354), "seed": np.int64(0)}, "state_dict": src.state_dict()}, path)
    dst = Net()
    load_checkpoint(dst, path)
    assert _same(src, dst)


def test_mismatches_are_named_and_fatal(tmp_path):
    state = _trained().state_dict()
    del state["head.bias"]  # missing
    state["extra.weight"] = torch.zeros(1)  # unexpected
    state["fc.weight"] = torch.zeros(5, 3)  # mis-shaped
    path = tmp_path / "bad.pth"
    torch.save({"state_dict": state}, path)
    dst = Net()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ValueError) as err:
        load_checkpoint(dst, path)
    msg = str(err.value)
    for text in ("1 missing", "head.bias", "1 unexpected", "extra.weight", "1 with a different shape",
                 "fc.weight (checkpoint [5, 3], model [4, 3])", "--allow-partial", "bad.pth"):
        assert text in msg, f"{text!r} not in: {msg}"
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items()), "a refused load changed weights"


def test_allow_partial_loads_the_rest_and_warns(tmp_path):
    src = _trained()
    state = src.state_dict()
    del state["head.bias"]
    state["fc.weight"] = torch.zeros(5, 3)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    dst = Net()
    bias_before = dst.head.bias.clone()
    fc_before = dst.fc.weight.clone()
    with pytest.warns(UserWarning, match="partial load"):
        report = load_checkpoint(dst, path, allow_partial=True)
    assert report.missing == ["head.bias"] and [m[0] for m in report.mismatched] == ["fc.weight"]
    assert torch.equal(dst.head.weight, src.head.weight) and torch.equal(dst.bn.running_var, src.bn.running_var)
    assert torch.equal(dst.head.bias, bias_before) and torch.equal(dst.fc.weight, fc_before)


def test_missing_num_batches_tracked_is_not_an_error(tmp_path):
    src = _trained()
    state = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "no_nbt.pth"
    torch.save(state, path)
    dst = Net()
    assert load_checkpoint(dst, path).complete
    assert torch.equal(dst.bn.running_mean, src.bn.running_mean)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(Net(), tmp_path / "nope.pth")
    corrupt = tmp_path / "corrupt.pth"
    torch.save(_trained().state_dict(), corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:200])
    with pytest.raises(ValueError, match="corrupt.pth: not a readable PyTorch checkpoint"):
        load_checkpoint(Net(), corrupt)
    text = tmp_path / "text.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="text.pth"):
        load_checkpoint(Net(), text)
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(ValueError, match="expected a state dict"):
        read_state_dict(listed)
    mixed = tmp_path / "mixed.pth"
    torch.save({"fc.weight": torch.zeros(4, 3), "note": "hello"}, mixed)
    with pytest.raises(ValueError, match="non-tensor entries.*note"):
        read_state_dict(mixed)


def test_refuses_pickled_code(tmp_path):
    """weights_only: a checkpoint carrying an arbitrary Python object is rejected, not executed."""
    path = tmp_path / "code.pth"
    torch.save({"state_dict": _trained().state_dict(), "meta": {"obj": Net}}, path)
    with pytest.raises(ValueError, match="weights only"):
        load_checkpoint(Net(), path)


def test_bevformer_round_trip(tmp_path):
    """An mmcv-style checkpoint of a (reduced) BEVFormer-tiny loads into a fresh one, key for key."""
    from bevdeploy.models import BEVFormer

    cfg = small_config("bevformer-tiny", num_encoder_layers=1, num_decoder_layers=1)
    src = randomize_(BEVFormer.from_config(cfg).pts_bbox_head, seed=2)
    path = tmp_path / "head.pth"
    torch.save({"meta": {"epoch": 24}, "state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    dst = BEVFormer.from_config(cfg).pts_bbox_head
    report = load_checkpoint(dst, path)
    assert report.complete and _same(src, dst)

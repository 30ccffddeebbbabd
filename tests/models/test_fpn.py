"""FPN neck: mmdet key names and the top-down / extra-level math, checked against a hand-written pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bevdeploy.models.fpn import FPN


def _manual(fpn: FPN, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    sd = fpn.state_dict()

    def conv(name, x, stride=1, padding=0):
        return F.conv2d(x, sd[f"{name}.conv.weight"], sd[f"{name}.conv.bias"], stride=stride, padding=padding)

    lat = [conv(f"lateral_convs.{i}", x) for i, x in enumerate(inputs)]
    for i in range(len(lat) - 1, 0, -1):
        lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[2:], mode="nearest")
    outs = [conv(f"fpn_convs.{i}", x, padding=1) for i, x in enumerate(lat)]
    n = len(outs)
    outs.append(conv(f"fpn_convs.{n}", outs[-1], stride=2, padding=1))  # first extra: no ReLU
    for i in range(n + 1, fpn.num_outs):
        outs.append(conv(f"fpn_convs.{i}", F.relu(outs[-1]), stride=2, padding=1))
    return outs


def test_base_neck_keys_and_shapes():
    fpn = FPN(in_channels=(512, 1024, 2048), out_channels=256, num_outs=4, relu_before_extra_convs=True)
    keys = {k: tuple(v.shape) for k, v in fpn.state_dict().items()}
    assert keys["lateral_convs.0.conv.weight"] == (256, 512, 1, 1)
    assert keys["lateral_convs.2.conv.weight"] == (256, 2048, 1, 1)
    assert keys["fpn_convs.3.conv.weight"] == (256, 256, 3, 3) and "fpn_convs.3.conv.bias" in keys
    assert "fpn_convs.4.conv.weight" not in keys and "lateral_convs.3.conv.weight" not in keys
    assert len(keys) == 3 * 2 + 4 * 2


def test_single_level_neck_has_no_extra_conv():
    fpn = FPN(in_channels=(2048,), out_channels=256, num_outs=1, relu_before_extra_convs=True)
    assert sorted(fpn.state_dict()) == [
        "fpn_convs.0.conv.bias",
        "fpn_convs.0.conv.weight",
        "lateral_convs.0.conv.bias",
        "lateral_convs.0.conv.weight",
    ]


def test_matches_hand_written_pass_with_two_extra_levels():
    """Odd sizes (nearest upsampling to the lower level's size) and ReLU only before the second extra."""
    torch.manual_seed(0)
    fpn = FPN(in_channels=(8, 16, 32), out_channels=12, num_outs=5, relu_before_extra_convs=True).eval()
    inputs = [torch.randn(2, 8, 15, 23), torch.randn(2, 16, 8, 12), torch.randn(2, 32, 4, 6)]
    with torch.no_grad():
        got, want = fpn(inputs), _manual(fpn, inputs)
    assert [tuple(o.shape[2:]) for o in got] == [(15, 23), (8, 12), (4, 6), (2, 3), (1, 2)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_outs"):
        FPN(in_channels=(512, 1024), out_channels=256, num_outs=1)
    with pytest.raises(ValueError, match="add_extra_convs"):
        FPN(in_channels=(512,), out_channels=256, num_outs=2, add_extra_convs="on_input")
    fpn = FPN(in_channels=(8, 16), out_channels=4, num_outs=2)
    with pytest.raises(ValueError, match="2 input levels"):
        fpn([torch.randn(1, 8, 4, 4)])

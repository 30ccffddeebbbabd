"""CenterNet's head branches as one conv pair (``fuse_centernet_head``, ``build --fused-epilogues``): the same
maps in float, and in int8 the codes each branch's own scale gave (the branch gains equalise the hidden
ranges that the fused 1x1 reads at one scale)."""

from __future__ import annotations

import logging

import pytest
import torch

from bevdeploy.engine.deploy import fuse_centernet_head, fused_heads, layer_precisions
from bevdeploy.models.centernet import CenterNetHead, FusedCenterNetHead
from bevdeploy.quant.chain import chain_int8
from bevdeploy.quant.modules import QuantConv2d, quantize_modules
from bevdeploy.quant.sensitivity import sqnr_db


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bbox_head = CenterNetHead(num_classes=5, in_channel=16, feat_channel=8)

    def forward(self, x):
        return self.bbox_head(x)


def _net() -> _Net:
    torch.manual_seed(0)
    net = _Net().eval()
    with torch.no_grad():  # branches of very different hidden ranges, as a trained wh branch has
        net.bbox_head.wh_head[0].weight.mul_(8.0)
        net.bbox_head.offset_head[0].weight.mul_(0.25)
    return net


def _hidden_scales(net: _Net, x: torch.Tensor) -> dict[str, float]:
    """Per-layer input scales (amax / 127) of the head's six convs on ``x``."""
    head, scales = net.bbox_head, {}
    for b in FusedCenterNetHead.BRANCHES:
        branch = getattr(head, f"{b}_head")
        scales[f"bbox_head.{b}_head.0"] = x.abs().max().item() / 127
        scales[f"bbox_head.{b}_head.2"] = torch.relu(branch[0](x)).abs().max().item() / 127
    return scales


def test_fused_head_gives_the_unfused_maps_with_and_without_gains():
    net, x = _net(), torch.randn(2, 16, 12, 10)
    with torch.no_grad():
        ref = net(x)
        for gains in (None, [1.0, 0.125, 4.0]):
            fused = FusedCenterNetHead(net.bbox_head, gains=gains)
            out = fused(x)
            assert list(out) == ["heatmap", "wh", "offset"]
            for k in ref:
                assert out[k].shape == ref[k].shape
                torch.testing.assert_close(out[k], ref[k], rtol=1e-5, atol=1e-5)
    first, _, last = fused.convs
    assert (first.in_channels, first.out_channels, first.kernel_size) == (16, 24, (3, 3))
    assert (last.in_channels, last.out_channels, last.kernel_size) == (24, 16, (1, 1))  # 5 + 2 + 2 = 9, padded to 16
    assert not last.weight[9:].any() and not last.bias[9:].any()
    assert not last.weight[5:7, :8].any() and not last.weight[5:7, 16:].any()  # wh reads only its own 8 channels
    with pytest.raises(ValueError, match="positive finite"):
        FusedCenterNetHead(net.bbox_head, gains=[1.0, 0.0, 1.0])


def test_int8_fused_head_keeps_each_branch_at_its_own_resolution(caplog):
    net, x = _net(), torch.randn(2, 16, 12, 10)
    scales = _hidden_scales(net, x)
    assert max(scales[f"bbox_head.{b}_head.2"] for b in FusedCenterNetHead.BRANCHES) > 20 * min(
        scales[f"bbox_head.{b}_head.2"] for b in FusedCenterNetHead.BRANCHES)  # the case the gains exist for
    with torch.no_grad():
        ref = net(x)

    def int8(fuse: bool, gains: bool = True):
        m = _net()
        s = dict(scales)
        if fuse:
            s = fuse_centernet_head(m, s) if gains else fuse_centernet_head(m, None)
            if not gains:  # one scale for the whole hidden tensor, no equalisation: what the gains avoid
                s = {"bbox_head.convs.0": scales["bbox_head.heatmap_head.0"],
                     "bbox_head.convs.2": max(scales[f"bbox_head.{b}_head.2"] for b in FusedCenterNetHead.BRANCHES)}
        quantize_modules(m, s, out_dtype=torch.float32)
        chain_int8(m)
        with torch.no_grad():
            return m, m(x)

    (plain, a), (fused, b) = int8(False), int8(True)
    assert fused_heads(fused) == ["bbox_head"] and isinstance(fused.bbox_head, FusedCenterNetHead)
    first, last = fused.bbox_head.convs[0], fused.bbox_head.convs[2]
    assert isinstance(first, QuantConv2d) and isinstance(last, QuantConv2d)
    assert first.activation == "relu" and first.out_scale is not None  # chained: the 3x3 writes int8 for the 1x1
    for k in ref:  # the fused int8 head computes what the three int8 branches did
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4)
    _, c = int8(True, gains=False)
    assert sqnr_db(ref["offset"], c["offset"]) < sqnr_db(ref["offset"], b["offset"]) - 10  # no gains: offset loses
    rows = dict(layer_precisions(fused, [], "int8"))
    assert rows["bbox_head.convs.0 (fused heatmap_head.0, wh_head.0, offset_head.0)"] == "int8"
    # layers kept float, or with zero points, leave the head as it is
    for kwargs, why in (({"keep_float": ["bbox_head.wh_head.2"]}, "kept float"),
                        ({"zero_points": {"bbox_head.wh_head.0": 3}}, "zero points"),):
        m = _net()
        with caplog.at_level(logging.WARNING, logger="bevdeploy.engine.deploy"):
            assert fuse_centernet_head(m, dict(scales), **kwargs) == scales
        assert type(m.bbox_head) is CenterNetHead and why in caplog.text

"""The deploy form's head fusion (``fuse_head_branches``): BEVDet's CenterPoint branches as one conv
stack, same maps as the unfused head, padded channels, where it is and is not applied.

The engine builds of the reduced BEVDet with the fused head are tested in test_engine_bevdet.py
(fp32 engine vs the unfused eager model; int8 engine vs the unfused int8 deploy form).
"""

import copy
import logging

import pytest
import torch
from torch import nn

from bevdeploy.engine.deploy import apply_precision, fold_batchnorms, fuse_head_branches, fused_heads, layer_precisions
from bevdeploy.models import MODELS
from bevdeploy.models.bevdet import HEAD_OUTPUTS, CenterHead, FusedSeparateHead, SeparateHead
from tests.engine.test_engine_bevdet import SMALL

#: Output channels of the branches, in order (reg, height, dim, rot, vel, heatmap of 10 classes).
CHANNELS = (2, 1, 3, 2, 2, 10)


def _head(num_conv: int = 2, head_conv: int = 16, in_channels: int = 32, seed: int = 0) -> CenterHead:
    """A CenterPoint head with random weights and random BN statistics (folding is not trivial), folded."""
    torch.manual_seed(seed)
    common = tuple((name, c, num_conv) for name, c in zip(HEAD_OUTPUTS[:-1], CHANNELS[:-1]))
    head = CenterHead(in_channels=in_channels, num_classes=10, common_heads=common, share_conv_channels=16,
                      head_conv_channels=head_conv, num_heatmap_convs=num_conv).eval()
    with torch.no_grad():
        for m in head.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    fold_batchnorms(head)
    return head


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("num_conv", [2, 3, 1])
def test_fused_head_gives_the_unfused_maps(dtype, tol, num_conv):
    head = _head(num_conv).to(dtype)
    fused = copy.deepcopy(head)
    assert fuse_head_branches(fused) == ["task_heads.0"] and fused_heads(fused) == ["task_heads.0"]
    assert isinstance(fused.task_heads[0], FusedSeparateHead) and len(fused.task_heads[0].convs) == num_conv
    x = torch.randn(2, 32, 12, 20, dtype=dtype)  # odd, non-square map
    with torch.no_grad():
        ref, out = head(x), fused(x)
    assert list(out) == list(HEAD_OUTPUTS)
    for k in HEAD_OUTPUTS:
        assert out[k].dtype == dtype and out[k].shape == ref[k].shape, k
        torch.testing.assert_close(out[k], ref[k], rtol=tol, atol=tol)


def test_fused_convs_are_concatenated_then_block_diagonal_with_zero_padding():
    head = _head()
    sep = head.task_heads[0]
    fused = FusedSeparateHead.from_separate_head(sep)
    first, last = fused.convs
    # first: the six 16-channel first convs side by side, 96 channels (already a multiple of 8)
    assert (first.in_channels, first.out_channels) == (16, 96)
    for i, name in enumerate(HEAD_OUTPUTS):
        branch = getattr(sep, name)
        assert torch.equal(first.weight[16 * i:16 * (i + 1)], branch[0].conv.weight)
        assert torch.equal(first.bias[16 * i:16 * (i + 1)], branch[0].conv.bias)
    # last: 20 real output channels padded to 24; branch i reads only its own 16 hidden channels
    assert (last.in_channels, last.out_channels) == (96, 24) and sum(fused.channels) == 20
    assert not last.weight[20:].any() and not last.bias[20:].any()
    start = 0
    for i, (name, c) in enumerate(zip(HEAD_OUTPUTS, CHANNELS)):
        w = last.weight[start:start + c]
        assert torch.equal(w[:, 16 * i:16 * (i + 1)], getattr(sep, name)[1].weight)
        assert torch.equal(last.bias[start:start + c], getattr(sep, name)[1].bias)
        assert not torch.cat([w[:, :16 * i], w[:, 16 * (i + 1):]], dim=1).any(), name
        start += c
    # the maps are views of the one padded output, in branch order
    out = fused(torch.randn(1, 16, 8, 8))
    base = out["reg"]._base
    assert base is not None and base.shape == (1, 24, 8, 8)
    assert all(out[k]._base is base for k in HEAD_OUTPUTS)
    assert [out[k].shape[1] for k in HEAD_OUTPUTS] == list(CHANNELS)


def test_pad_to_pads_every_fused_layer():
    sep = _head(num_conv=3, head_conv=5).task_heads[0]  # hidden 6 x 5 = 30 channels
    fused = FusedSeparateHead.from_separate_head(sep, pad_to=16)
    assert [c.out_channels for c in fused.convs] == [32, 32, 32]
    assert [c.in_channels for c in fused.convs] == [16, 32, 32]
    x = torch.randn(1, 16, 6, 6)
    with torch.no_grad():
        ref, out = sep(x), fused(x)
    for k in HEAD_OUTPUTS:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pad_to must be a positive int"):
        FusedSeparateHead.from_separate_head(sep, pad_to=0)


def test_unfusable_heads_are_refused_or_left_alone(caplog):
    torch.manual_seed(0)
    common = (("reg", 2, 2), ("height", 1, 3), ("dim", 3, 2), ("rot", 2, 2), ("vel", 2, 2))
    mixed = CenterHead(in_channels=8, num_classes=3, common_heads=common, share_conv_channels=8,
                       head_conv_channels=8).eval()
    with pytest.raises(ValueError, match="BatchNorm folded"):  # BN not folded yet
        FusedSeparateHead.from_separate_head(mixed.task_heads[0])
    fold_batchnorms(mixed)
    with pytest.raises(ValueError, match="branches of one depth"):
        FusedSeparateHead.from_separate_head(mixed.task_heads[0])
    with caplog.at_level(logging.WARNING, logger="bevdeploy.engine.deploy"):
        assert fuse_head_branches(mixed) == []
    assert type(mixed.task_heads[0]) is SeparateHead and "left unfused" in caplog.text


def _folded_bevdet():
    torch.manual_seed(0)
    model = MODELS["bevdet-r50-cbgs"](**SMALL).eval()
    fold_batchnorms(model)
    return model


@pytest.mark.parametrize("precision", ["fp32", "fp16", "fp16x2"])
def test_apply_precision_fuses_the_head_in_float_precisions(precision):
    model = _folded_bevdet()
    head = copy.deepcopy(model.pts_bbox_head)
    apply_precision(model, precision)
    assert fused_heads(model) == ["pts_bbox_head.task_heads.0"]
    dtype = torch.float32 if precision == "fp32" else torch.float16
    assert all(c.weight.dtype == dtype for c in model.pts_bbox_head.task_heads[0].convs)
    rows = [n for n, p in layer_precisions(model, [], precision) if n.startswith("pts_bbox_head.task_heads")]
    assert rows == ["pts_bbox_head.task_heads.0.convs.0 (fused reg.0.conv, height.0.conv, dim.0.conv, rot.0.conv, "
                    "vel.0.conv, heatmap.0.conv)",
                    "pts_bbox_head.task_heads.0.convs.1 (fused reg.1, height.1, dim.1, rot.1, vel.1, heatmap.1)"]
    # same maps as the unfused head of the same storage dtype (weights copied, not recomputed)
    x = torch.randn(1, 32, 16, 16)
    with torch.no_grad():
        ref = head.to(dtype)(x.to(dtype))
        out = model.pts_bbox_head(x.to(dtype))
    for k in HEAD_OUTPUTS:
        torch.testing.assert_close(out[k].float(), ref[k].float(), rtol=1e-3, atol=1e-3)
    unfused = _folded_bevdet()
    apply_precision(unfused, precision, fuse_heads=False)
    assert fused_heads(unfused) == [] and type(unfused.pts_bbox_head.task_heads[0]) is SeparateHead


def test_onnx_export_keeps_the_reference_head_layout():
    """The ONNX export is the reference system's model: its deploy form folds BN, never fuses the head."""
    from bevdeploy.export.onnx import _load_model

    model = _load_model("bevdet-r50-cbgs", None, SMALL)
    assert type(model.pts_bbox_head.task_heads[0]) is SeparateHead and fused_heads(model) == []

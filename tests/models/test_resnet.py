"""ResNet backbone: mmdet's stride placement per style, DCNv2 placement and wiring, outputs, training flags."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bevdeploy.models.resnet import Bottleneck, ResNet
from bevdeploy.ops.modulated_deform_conv2d import ModulatedDeformConv2dPack


def test_stride_on_conv2_for_pytorch_and_conv1_for_caffe():
    with torch.device("meta"):
        pt = ResNet(depth=50, style="pytorch")
        caffe = ResNet(depth=50, style="caffe")
    for stage in (2, 3, 4):
        first_pt, first_caffe = getattr(pt, f"layer{stage}")[0], getattr(caffe, f"layer{stage}")[0]
        assert (first_pt.conv1.stride, first_pt.conv2.stride) == ((1, 1), (2, 2))
        assert (first_caffe.conv1.stride, first_caffe.conv2.stride) == ((2, 2), (1, 1))
        assert first_pt.downsample[0].stride == first_caffe.downsample[0].stride == (2, 2)
    assert pt.layer1[0].conv2.stride == (1, 1) and pt.layer1[0].downsample is not None  # 64 -> 256 channels


def test_output_shapes_and_channels():
    net = ResNet(depth=50, out_indices=(1, 2, 3)).eval()
    with torch.no_grad():
        outs = net(torch.randn(2, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [(2, 512, 8, 12), (2, 1024, 4, 6), (2, 2048, 2, 3)]
    assert net.out_channels == (512, 1024, 2048)


def test_dcn_placement_and_keys():
    with torch.device("meta"):
        net = ResNet(depth=101, style="caffe", stage_with_dcn=(False, False, True, True))
    for stage, dcn in zip(range(1, 5), (False, False, True, True)):
        for block in getattr(net, f"layer{stage}"):
            assert isinstance(block.conv2, ModulatedDeformConv2dPack) == dcn
    keys = net.state_dict().keys()
    assert "layer3.22.conv2.conv_offset.weight" in keys and "layer4.0.conv2.conv_offset.bias" in keys
    assert "layer3.0.conv2.bias" not in keys and "layer2.0.conv2.conv_offset.weight" not in keys
    assert tuple(net.layer3[0].conv2.conv_offset.weight.shape) == (27, 256, 3, 3)


@pytest.mark.parametrize("style", ["pytorch", "caffe"])
def test_dcn_with_zero_offsets_is_half_a_plain_conv(style):
    """conv_offset starts at zero: offsets 0 and masks sigmoid(0) = 0.5, so a DCN block is the plain
    3x3 conv at half weight, with the same stride (2 here, on conv2 for pytorch style) and padding."""
    torch.manual_seed(0)

    def block(dcn: bool) -> Bottleneck:
        down = nn.Sequential(nn.Conv2d(32, 64, 1, stride=2, bias=False), nn.BatchNorm2d(64))
        return Bottleneck(inplanes=32, planes=16, stride=2, downsample=down, style=style, dcn=dcn).eval()

    deform, plain = block(True), block(False)
    state = {k: v for k, v in deform.state_dict().items() if "conv_offset" not in k}
    state["conv2.weight"] = state["conv2.weight"] * 0.5
    plain.load_state_dict(state)
    x = torch.randn(2, 32, 9, 14)
    with torch.no_grad():
        got, want = deform(x), plain(x)
    assert got.shape == (2, 64, 5, 7)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_train_keeps_frozen_and_norm_eval():
    with torch.device("meta"):
        net = ResNet(depth=50, frozen_stages=1, norm_eval=True)
    net.train()
    assert all(not m.training for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert not any(p.requires_grad for p in net.layer1.parameters())
    assert not net.conv1.weight.requires_grad and net.layer2[0].conv1.weight.requires_grad
    assert net.layer2[0].conv1.training


def test_bad_arguments():
    with pytest.raises(ValueError, match="depth"):
        ResNet(depth=34)
    with pytest.raises(ValueError, match="style"):
        ResNet(depth=50, style="tf")
    with pytest.raises(ValueError, match="out_indices"):
        ResNet(depth=50, out_indices=(4,))
    with pytest.raises(ValueError, match="stage_with_dcn"):
        ResNet(depth=50, stage_with_dcn=(True,))

"""``bevdeploy bench convs`` on the CPU: the conv calls it times are the chained engine's (found on
the meta device), and it refuses to run without a GPU."""

import pytest
import torch

from bevdeploy.eval.bench_convs import _int8_module, backbone_module, conv_calls, run


def test_bevdet_conv_calls_are_the_chained_engines():
    calls = conv_calls(_int8_module(backbone_module("bevdet-r50")), (64, 176), 6)
    by_layer = {name: call for call, names in calls.items() for name in names}
    assert len(by_layer) == 52 + 3 + 1  # ResNet-50 convs (with 4 downsamples) but the stem, CustomFPN, the depth net
    assert "img_backbone.conv1" not in by_layer  # the stem stays a float conv in the int8 engine
    assert by_layer["img_backbone.layer1.0.conv1"].in_shape == (6, 64, 16, 44)  # reads the (float) stem's pool
    first = by_layer["img_backbone.layer1.0.conv3"]
    assert first.residual == "fp16" and first.int8_out  # the downsample branch is the residual
    assert by_layer["img_backbone.layer1.1.conv3"].residual == "int8"  # the identity, as int8 codes
    assert by_layer["img_neck.lateral_convs.0.conv"].residual == "fp16"  # the top-down sum, fused
    assert not by_layer["img_view_transformer.depth_net"].int8_out  # softmax reads it
    assert sum(len(v) for v in calls.values()) == len(by_layer) and len(calls) < len(by_layer)
    assert "3x3 s1 64->64" in by_layer["img_backbone.layer1.1.conv2"].label()


def test_bevformer_small_keeps_dcn_out_of_the_int8_convs():
    calls = conv_calls(_int8_module(backbone_module("bevformer-small")), (64, 96), 6)
    names = {n for v in calls.values() for n in v}
    assert "img_backbone.layer3.0.conv2.conv_offset" in names  # the DCN's offset conv is a plain conv
    assert "img_backbone.layer3.0.conv2" not in names
    assert not any(c.int8_out for c, v in calls.items() if "img_backbone.layer3.0.conv1" in v)  # DCN reads it


def test_yolox_convs_are_its_whole_network_but_the_focus_stem():
    from bevdeploy.models import yolox_x

    calls = conv_calls(_int8_module(backbone_module("yolox-x")), (64, 64), 2)
    names = {n for v in calls.values() for n in v}
    n_convs = sum(type(m) is torch.nn.Conv2d for m in yolox_x().modules())
    assert "backbone.stem.conv.conv" not in names  # the Focus stem reads the image: float, as the engine keeps it
    assert len(names) == n_convs - 1 and any(n.startswith("bbox_head.") for n in names)
    assert all(c.in_shape[0] == 2 for c in calls)  # the batch asked for


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only refusal")
def test_refuses_without_gpu():
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        run(["bevdet-r50"])

"""``bevdeploy bench convs`` on the CPU: the conv calls it times are the chained engine's (found on
the meta device), and it refuses to run without a GPU."""

import pytest
import torch

from bevdeploy.eval.bench_convs import ConvCall, _int8_module, backbone_module, conv_calls, run, to_markdown


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


def test_the_roofline_floor_by_hand():
    # 3x3 s2 pad 1, 16 -> 24 channels, 2 x 10 x 9 input: 5 x 5 output
    call = ConvCall(16, 24, (3, 3), (2, 2), (1, 1), (1, 1), (2, 16, 10, 9), True, "fp16", "relu", True)
    assert call.out_hw() == (5, 5)
    m, k = 2 * 5 * 5, 9 * 16
    assert call.ops() == 2.0 * m * 24 * k
    # int8 input + int8 weights + int8 output + fp16 residual
    assert call.min_bytes() == 2 * 16 * 10 * 9 + 24 * k + m * 24 * 1 + m * 24 * 2
    # at 10^6 op/s (1e-6 TOPS) each op costs a microsecond, at 10^6 B/s (1e-3 GB/s) each byte does
    assert call.floor_us(1e-6, 1e9) == pytest.approx(call.ops())  # MMA-bound
    assert call.floor_us(1e6, 1e-3) == pytest.approx(call.min_bytes())  # traffic-bound
    row = {"backbone": "b", "shape": call.label(), "count": 1, "int8_us": 2.0, "int8_heuristic_us": 2.0,
           "int8_tops": 1.0, "fp16_us": 3.0, "fp16_tflops": 1.0, "ratio": 1.5, "floor_us": 1.0, "roofline_fraction": 0.5}
    old = {k: v for k, v in row.items() if k not in ("floor_us", "roofline_fraction")}
    md = to_markdown({"gpu": "g", "torch": "t", "date": "d", "command": "c", "peaks": {"int8_tops": 1000, "copy_gbs": 3000},
                      "rows": [row, old], "totals": []})
    assert "| 1.0 | 0.50 |" in md and "| - | - |" in md and "1000 TOPS" in md  # a run before the roofline: dashes

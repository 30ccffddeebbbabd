"""YOLOX-x and CenterNet-R18-DCN: official keys, strict checkpoint loading, forward shapes, decoders.

Expected keys come from ``fixtures/derive_det2d_keys.py`` (written from mmdetection's sources,
independently of ``bevdeploy.models``); the JSON files are its output. Decoders are checked on
hand-made head outputs whose boxes are worked out by hand.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from bevdeploy.models import MODELS, load_checkpoint
from bevdeploy.models.centernet import CenterNetConfig, CenterNetDecoder
from bevdeploy.models.yolox import YOLOXConfig, YOLOXDecoder, batched_nms, yolox_priors
from tests.models.fixtures.derive_det2d_keys import DERIVE, fixture_path

SMALL_YOLOX = dict(deepen_factor=0.33, widen_factor=0.125, image_size=(64, 96))


@pytest.mark.parametrize("name", ["yolox-x", "centernet-r18-dcn"])
def test_state_dict_matches_official_keys(name):
    expected = json.loads(fixture_path(name).read_text())
    assert expected == DERIVE[name](), "the JSON fixture is stale: rerun fixtures/derive_det2d_keys.py"
    with torch.device("meta"):
        model = MODELS[name]()
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(ours))
    extra = sorted(set(ours) - set(expected))
    shapes = sorted(k for k in set(ours) & set(expected) if ours[k] != expected[k])
    assert not missing, f"{len(missing)} official keys missing, e.g. {missing[:5]}"
    assert not extra, f"{len(extra)} keys the official model does not have, e.g. {extra[:5]}"
    assert not shapes, f"{len(shapes)} shapes differ, e.g. {[(k, ours[k], expected[k]) for k in shapes[:5]]}"


def test_checkpoint_loads_strictly_and_refuses_a_wrong_one(tmp_path):
    torch.manual_seed(0)
    src = MODELS["centernet-r18-dcn"](image_size=(64, 64))
    path = tmp_path / "ct.pth"
    torch.save({"meta": {}, "state_dict": src.state_dict()}, path)
    dst = MODELS["centernet-r18-dcn"](image_size=(64, 64))
    report = load_checkpoint(dst, path)
    assert report.complete and report.loaded == len(src.state_dict())
    assert torch.equal(dst.bbox_head.wh_head[2].weight, src.bbox_head.wh_head[2].weight)
    small = MODELS["yolox-x"](**SMALL_YOLOX)
    with pytest.raises(ValueError, match="does not match YOLOX"):
        load_checkpoint(small, path)


def test_forward_shapes():
    torch.manual_seed(0)
    yolox = MODELS["yolox-x"](**SMALL_YOLOX).eval()
    with torch.no_grad():
        out = yolox(torch.rand(2, 3, 64, 96) * 255)
    anchors = 8 * 12 + 4 * 6 + 2 * 3
    assert out["cls_scores"].shape == (2, anchors, 80) and out["bbox_preds"].shape == (2, anchors, 4)
    assert out["objectness"].shape == (2, anchors)
    centernet = MODELS["centernet-r18-dcn"](image_size=(64, 96)).eval()
    with torch.no_grad():
        out = centernet(torch.randn(1, 3, 64, 96))
    assert out["heatmap"].shape == (1, 80, 16, 24) and out["wh"].shape == (1, 2, 16, 24)
    assert ((out["heatmap"] >= 0) & (out["heatmap"] <= 1)).all()  # sigmoid applied; NaN fails too


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="image_size must be positive multiples of 32"):
        YOLOXConfig(image_size=(640, 630))
    with pytest.raises(ValueError, match="image_size"):
        CenterNetConfig(image_size=(100, 512))


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_yolox_decoder_on_hand_made_maps():
    """Three confident points: two overlapping boxes of one class (the weaker is suppressed), one of
    another class at the same place (kept: NMS is per class), everything else below the threshold."""
    cfg = YOLOXConfig(image_size=(64, 64), num_classes=3)
    priors = yolox_priors(cfg.image_size)
    a = priors.shape[0]
    assert a == 64 + 16 + 4 and priors[9].tolist() == [8.0, 8.0, 8.0]  # row 1, column 1 of stride 8
    cls = torch.full((1, a, 3), -20.0)
    obj = torch.full((1, a), -20.0)
    deltas = torch.zeros(1, a, 4)
    # point 9 (x=8, y=8, stride 8): centre (8 + 0.5*8, 8 + 0.5*8) = (12, 12), size exp(log 2)*8 = 16
    deltas[0, 9] = torch.tensor([0.5, 0.5, math.log(2.0), math.log(2.0)])
    cls[0, 9, 1], obj[0, 9] = _logit(0.9), _logit(0.8)  # score 0.72, class 1
    # point 10 (x=16, y=8): centre (16, 12) size 16 -> IoU with the first = 12*16 / (2*256 - 192) = 0.6 < 0.65
    deltas[0, 10] = torch.tensor([0.0, 0.5, math.log(2.0), math.log(2.0)])
    cls[0, 10, 1], obj[0, 10] = _logit(0.5), _logit(0.5)  # 0.25, kept
    # point 18 (x=16, y=16): same box as point 9 via deltas (-0.5, -0.5) -> centre (12, 12): suppressed
    deltas[0, 18] = torch.tensor([-0.5, -0.5, math.log(2.0), math.log(2.0)])
    cls[0, 18, 1], obj[0, 18] = _logit(0.6), _logit(0.6)  # 0.36 < 0.72, IoU 1.0
    # point 64 = first of stride 16 (x=0, y=0): centre (24, 24), size 16; class 2
    deltas[0, 64] = torch.tensor([1.5, 1.5, 0.0, 0.0])
    cls[0, 64, 2], obj[0, 64] = _logit(0.5), _logit(0.1)  # 0.05 >= 0.01
    cls[0, 65, 0], obj[0, 65] = _logit(0.09), _logit(0.1)  # 0.009 < 0.01: dropped
    (boxes, scores, labels), = YOLOXDecoder(cfg)({"cls_scores": cls, "bbox_preds": deltas, "objectness": obj})
    assert labels.tolist() == [1, 1, 2]
    torch.testing.assert_close(scores, torch.tensor([0.72, 0.25, 0.05]))
    torch.testing.assert_close(boxes, torch.tensor([[4.0, 4.0, 20.0, 20.0], [8.0, 4.0, 24.0, 20.0],
                                                    [16.0, 16.0, 32.0, 32.0]]))


def test_batched_nms_by_hand():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10], [20, 20, 30, 30], [0, 5, 10, 15]],
                         dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.95])
    labels = torch.tensor([0, 0, 1, 0, 0])
    # IoU(0,1) = 90/110 = 0.82 -> 1 suppressed by 0; IoU(4,0) = 50/150 = 0.33 kept; 2 other class
    assert batched_nms(boxes, scores, labels, 0.65).tolist() == [4, 0, 2, 3]
    assert batched_nms(boxes, scores, labels, 0.2).tolist() == [4, 2, 3]
    assert batched_nms(boxes[:0], scores[:0], labels[:0], 0.5).numel() == 0


def test_centernet_decoder_on_hand_made_maps():
    cfg = CenterNetConfig(image_size=(32, 64), num_classes=2, topk=3)
    heat = torch.zeros(1, 2, 8, 16)
    heat[0, 1, 2, 3] = 0.9
    heat[0, 1, 2, 4] = 0.8  # a neighbour of a higher peak: not a local maximum
    heat[0, 0, 5, 10] = 0.7
    heat[0, 0, 7, 15] = 0.2
    wh = torch.zeros(1, 2, 8, 16)
    offset = torch.zeros(1, 2, 8, 16)
    wh[0, :, 2, 3] = torch.tensor([4.0, 2.0])
    offset[0, :, 2, 3] = torch.tensor([0.5, 0.25])
    wh[0, :, 5, 10] = torch.tensor([2.0, 2.0])
    (boxes, scores, labels), = CenterNetDecoder(cfg)({"heatmap": heat, "wh": wh, "offset": offset})
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.7, 0.2]))
    assert labels.tolist() == [1, 0, 0]
    # centre (3.5, 2.25) map px, size (4, 2) -> map box (1.5, 1.25, 5.5, 3.25), x4 to input pixels
    torch.testing.assert_close(boxes[0], torch.tensor([6.0, 5.0, 22.0, 13.0]))
    torch.testing.assert_close(boxes[1], torch.tensor([36.0, 16.0, 44.0, 24.0]))
    torch.testing.assert_close(boxes[2], torch.tensor([60.0, 28.0, 60.0, 28.0]))


def test_centernet_neck_init_is_mmdets_bilinear_into_one_output_channel():
    """mmdet's ``CTResNetNeck.init_weights``: per input channel the bilinear kernel into output channel 0
    only, the others random. A bilinear kernel in every [in, out] pair makes all output channels the same
    (the neck then carries one channel; CenterNet trained from scratch stayed at mAP ~0)."""
    from torch import nn

    from bevdeploy.models.centernet import CTResNetNeck

    torch.manual_seed(0)
    neck = CTResNetNeck(use_dcn=False)
    deconvs = [m for m in neck.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(deconvs) == 3
    r = torch.tensor([0.25, 0.75, 0.75, 0.25])  # k=4: f=2, c=0.75, 1 - |i/f - c|
    for m in deconvs:
        cin = m.weight.shape[0]
        torch.testing.assert_close(m.weight[:, 0], (r[:, None] * r[None, :]).expand(cin, 4, 4))
        rest = m.weight.detach()[:, 1:]
        assert float(rest.std()) == pytest.approx(math.sqrt(2 / (cin * 16)), rel=0.1)  # Kaiming normal, fan_out
        assert not torch.equal(m.weight[:, 1], m.weight[:, 2])
    neck.train()
    y = neck(torch.randn(2, 512, 3, 5))
    # after every deconv + BN + ReLU the channels differ (they were identical copies before the fix)
    assert y.shape == (2, 64, 24, 40) and y.flatten(2).std(1).mean() > 0.1
    for i in (1, 3):
        assert neck.deconv_layers[: i + 1](torch.randn(2, 512, 3, 5)).flatten(2).std(1).mean() > 0.1


def test_centernet_head_init():
    torch.manual_seed(0)
    head = MODELS["centernet-r18-dcn"](image_size=(64, 64)).bbox_head
    torch.testing.assert_close(head.heatmap_head[-1].bias, torch.full((80,), -math.log(9.0)))
    assert torch.sigmoid(head.heatmap_head[-1].bias).sub(0.1).abs().max() < 1e-6

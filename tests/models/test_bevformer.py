"""BEVFormer: shapes, the official math (vs a transcription of the official head), the temporal gate,
batch independence, decoding, input checks and export. All at reduced sizes on the CPU."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from bevdeploy.models import BEVFORMER_CONFIGS, MODELS, BEVFormer
from bevdeploy.models.bevformer import NMSFreeCoder, denormalize_bbox
from tests.models._helpers import SMALL, can_bus, randomize_, rig_lidar2img, small_config

NAMES = ("bevformer-tiny", "bevformer-small", "bevformer-base")


def _rotate_available() -> bool:
    try:
        import bevdeploy.ops.rotate  # noqa: F401
    except ImportError:
        return False
    return True


needs_rotate = pytest.mark.skipif(not _rotate_available(), reason="bevdeploy.ops.rotate is not written yet")


#: Backbone input of the reduced models: cheap on the CPU (C5 is 1x2). The head tests feed random
#: feature maps of their own (larger) sizes instead of running the backbone.
IMAGE = (32, 64)
#: Feature-map sizes the head tests use per config (base: C3-C5 and the extra level).
HEAD_FEATS = {
    "bevformer-tiny": [(6, 10)],
    "bevformer-small": [(6, 10)],
    "bevformer-base": [(8, 12), (4, 6), (2, 3), (1, 2)],
}


@pytest.fixture(scope="module")
def models() -> dict[str, BEVFormer]:
    """One reduced model per config, built once; random head weights (the backbone keeps its init)."""
    out = {}
    for i, name in enumerate(NAMES):
        model = BEVFormer.from_config(small_config(name, image_size=IMAGE)).eval()
        randomize_(model.pts_bbox_head, seed=i)
        out[name] = model
    return out


def _inputs(model: BEVFormer, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    H, W = model.image_size
    Q, C = model.bev_shape
    image = torch.randn(batch, 6, 3, H, W, generator=g)
    prev = torch.randn(batch, Q, C, generator=g)
    return image, rig_lidar2img(batch, (H, W)), can_bus(batch, seed), prev, torch.ones(batch)


def _feats(name: str, batch: int, seed: int = 0) -> list[torch.Tensor]:
    """Random FPN outputs ``[B, 6, 256, h, w]`` (the head tests skip the backbone)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 6, 256, h, w, generator=g) for h, w in HEAD_FEATS[name]]


@pytest.mark.parametrize("name", NAMES)
def test_forward_shapes_and_decode(models, name):
    """Image to boxes for each config; outputs finite; the split API gives the same as forward."""
    model = models[name]
    cfg = model.config
    batch = 2 if name == "bevformer-tiny" else 1
    image, l2i, cb, prev, use = _inputs(model, batch=batch)
    with torch.no_grad():
        feats = model.extract_img_feat(image)
        bev = model.forward_bev(feats, l2i, cb, prev, use)
        cls, box = model.forward_head(bev)
        out = model(image, l2i, cb, prev, use) if name == "bevformer-tiny" else None
    # C5 of a 32x64 image is 1x2; base adds C3 (4x8), C4 (2x4) and the stride-64 extra level (1x1)
    levels = [(4, 8), (2, 4), (1, 2), (1, 1)] if name == "bevformer-base" else [(1, 2)]
    assert [tuple(f.shape) for f in feats] == [(batch, 6, 256, h, w) for h, w in levels]
    assert bev.shape == (batch, cfg.bev_h * cfg.bev_w, 256)
    assert cls.shape == box.shape == (6, batch, cfg.num_query, 10)
    for key, val in {"bev_embed": bev, "all_cls_scores": cls, "all_bbox_preds": box}.items():
        assert torch.isfinite(val).all(), f"{name}: non-finite {key}"
        if out is not None:
            torch.testing.assert_close(out[key], val, rtol=0, atol=0)
    dets = model.decode({"all_cls_scores": cls, "all_bbox_preds": box})
    assert len(dets) == batch
    for boxes, scores, labels in dets:
        assert boxes.shape[1] == 9 and boxes.shape[0] == scores.shape[0] == labels.shape[0] <= 200
        assert labels.dtype == torch.int64 and int(labels.min()) >= 0 and int(labels.max()) < 10
        assert torch.all(scores[:-1] >= scores[1:]), "scores must come sorted, best first"


def _official_frames(model: BEVFormer, feats, l2i, cb, shift_current_bev_ref: bool):
    """Two frames per sample through the oracle: a scene start, then the next frame with its BEV."""
    from tests.models._official import official_head

    cfg = model.config
    sd = model.state_dict()
    results = []
    for b in range(l2i.shape[0]):
        kw = dict(
            bev_h=cfg.bev_h,
            bev_w=cfg.bev_w,
            num_enc=cfg.num_encoder_layers,
            img_shape=cfg.image_size,
            shift_current_bev_ref=shift_current_bev_ref,
            rotate_center=cfg.rotate_center,
        )
        f1 = [f[b : b + 1] for f in feats[0]]
        f2 = [f[b : b + 1] for f in feats[1]]
        o1 = official_head(sd, f1, l2i[b : b + 1], cb[0][b].double().numpy(), None, **kw)
        o2 = official_head(sd, f2, l2i[b : b + 1], cb[1][b].double().numpy(), o1["bev_embed"], **kw)
        results.append((o1, o2))
    return results


@needs_rotate
@pytest.mark.parametrize(
    "name, shift_current_bev_ref",
    [("bevformer-tiny", True), ("bevformer-tiny", False), ("bevformer-base", True)],
)
def test_matches_official_head(models, name, shift_current_bev_ref):
    """Two frames of two streams vs the official head run per stream (gathered SCA, classic MSDA,
    torchvision rotation, numpy shift): bev_embed, class logits and boxes agree to fp32 rounding.
    Also the batch contract: each stream of the batch equals its own batch-1 official run."""
    model = models[name]
    if not shift_current_bev_ref:
        model.pts_bbox_head.transformer.encoder.shift_current_bev_ref = False
    try:
        B = 2
        feats = [_feats(name, B, seed=1), _feats(name, B, seed=2)]
        l2i = rig_lidar2img(B, model.image_size)
        cb = [can_bus(B, seed=3), can_bus(B, seed=4)]
        ref = _official_frames(model, feats, l2i, cb, shift_current_bev_ref)
        mask = ref[0][0]["bev_mask"].any(-1).sum(0)[0]  # cameras seeing each query, stream 0
        assert (mask == 0).any() and (mask >= 2).any(), "the rig must leave cells unseen and others seen twice"
        head = model.pts_bbox_head
        Q, C = model.bev_shape
        with torch.no_grad():
            bev1 = head.forward_bev(feats[0], l2i, cb[0], torch.randn(B, Q, C), torch.zeros(B))
            bev2 = head.forward_bev(feats[1], l2i, cb[1], bev1, torch.ones(B))
            cls2, box2 = head.forward_head(bev2)
        for b in range(B):
            o1, o2 = ref[b]
            torch.testing.assert_close(bev1[b], o1["bev_embed"][:, 0], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(bev2[b], o2["bev_embed"][:, 0], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(cls2[:, b], o2["all_cls_scores"][:, 0], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(box2[:, b], o2["all_bbox_preds"][:, 0], rtol=1e-4, atol=1e-4)
    finally:
        model.pts_bbox_head.transformer.encoder.shift_current_bev_ref = True


@needs_rotate
def test_temporal_gate(models):
    """use_prev_bev=1 feeds the previous BEV in; use_prev_bev=0 makes prev_bev and the CAN-bus deltas
    irrelevant (the official scene-start rule), per stream."""
    model = models["bevformer-tiny"]
    head = model.pts_bbox_head
    B = 2
    Q, C = model.bev_shape
    feats = _feats("bevformer-tiny", B, seed=5)
    l2i = rig_lidar2img(B, model.image_size)
    cb = can_bus(B, seed=6)
    with torch.no_grad():
        first = head.forward_bev(feats, l2i, cb, torch.zeros(B, Q, C), torch.zeros(B))
        with_prev = head.forward_bev(feats, l2i, cb, first, torch.ones(B))
        without = head.forward_bev(feats, l2i, cb, first, torch.zeros(B))
        other_prev = head.forward_bev(feats, l2i, cb, 5 * torch.randn(B, Q, C), torch.zeros(B))
        cb_no_delta = cb.clone()
        cb_no_delta[:, [0, 1, 2, 17]] = 0
        no_delta = head.forward_bev(feats, l2i, cb_no_delta, first, torch.zeros(B))
        mixed = head.forward_bev(feats, l2i, cb, first, torch.tensor([1.0, 0.0]))
        cb_turn = cb.clone()
        cb_turn[:, 17] += 30.0  # a different yaw change rotates the previous BEV differently
        turned = head.forward_bev(feats, l2i, cb_turn, first, torch.ones(B))
    assert (with_prev - without).abs().max() > 1e-2, "the previous BEV must change the result"
    assert (with_prev - turned).abs().max() > 1e-2, "the yaw delta must rotate the previous BEV"
    torch.testing.assert_close(without, other_prev, rtol=0, atol=0)
    torch.testing.assert_close(without, no_delta, rtol=0, atol=0)
    torch.testing.assert_close(without, first, rtol=0, atol=0)  # same frame, no history
    torch.testing.assert_close(mixed[0], with_prev[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mixed[1], without[1], rtol=1e-6, atol=1e-6)


def test_decode_matches_official_coder():
    """Top-k over (query, class), denormalised boxes, centre range filter, z moved to the bottom."""
    coder = NMSFreeCoder(post_center_range=(-61.2, -61.2, -10.0, 61.2, 61.2, 10.0), max_num=4, num_classes=10)
    cls = torch.full((1, 1, 3, 10), -10.0)
    cls[0, 0, 0, 2] = 3.0  # best: query 0, class 2
    cls[0, 0, 1, 7] = 2.0  # query 1, class 7 (its centre is out of range -> dropped)
    cls[0, 0, 2, 9] = 1.0  # query 2, class 9
    cls[0, 0, 0, 5] = 0.5  # query 0 again, class 5
    box = torch.zeros(1, 1, 3, 10)
    yaw = 0.7
    box[0, 0, 0] = torch.tensor(
        [1.0, 2.0, math.log(1.5), math.log(4.0), -0.5, math.log(2.0), math.sin(yaw), math.cos(yaw), 0.3, -0.2]
    )
    box[0, 0, 1] = torch.tensor([70.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    box[0, 0, 2] = torch.tensor([-5.0, 5.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    (boxes, scores, labels), = coder.decode(cls, box)
    assert labels.tolist() == [2, 9, 5]
    torch.testing.assert_close(scores, torch.sigmoid(torch.tensor([3.0, 1.0, 0.5])))
    want0 = torch.tensor([1.0, 2.0, -0.5 - 1.0, 1.5, 4.0, 2.0, yaw, 0.3, -0.2])
    torch.testing.assert_close(boxes[0], want0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(boxes[2], want0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(boxes[1, [0, 1, 2, 6]], torch.tensor([-5.0, 5.0, 0.5, math.pi / 2]))
    # denormalize_bbox alone keeps the centre z
    assert denormalize_bbox(box[0, 0, :1])[0, 2].item() == pytest.approx(-0.5)


def test_decode_score_threshold_fallback():
    """The official fall-back: a threshold nothing passes is lowered by 0.9x until something does."""
    coder = NMSFreeCoder(post_center_range=(-61.2, -61.2, -10.0, 61.2, 61.2, 10.0), max_num=5, score_threshold=0.9)
    cls = torch.full((1, 1, 2, 10), -10.0)
    cls[0, 0, 0, 0] = math.log(0.8 / 0.2)  # score 0.8: fails 0.9 and 0.81, passes 0.729
    (boxes, scores, labels), = coder.decode(cls, torch.zeros(1, 1, 2, 10))
    assert labels.tolist() == [0]
    assert scores[0].item() == pytest.approx(0.8)


def test_config_validation_names_the_field():
    tiny = BEVFORMER_CONFIGS["bevformer-tiny"]
    with pytest.raises(ValueError, match="bev_h"):
        dataclasses.replace(tiny, bev_h=0)
    with pytest.raises(ValueError, match="num_heads"):
        dataclasses.replace(tiny, num_heads=7)
    with pytest.raises(ValueError, match="fpn_in_channels"):
        dataclasses.replace(tiny, fpn_in_channels=(1024, 2048))
    with pytest.raises(ValueError, match="num_levels"):
        dataclasses.replace(tiny, num_levels=5)
    with pytest.raises(ValueError, match="sca_num_points"):
        dataclasses.replace(tiny, sca_num_points=6)


def test_official_numbers():
    """The config values the official configs set (and the defaults they rely on)."""
    t, s, b = (BEVFORMER_CONFIGS[n] for n in NAMES)
    assert (t.depth, s.depth, b.depth) == (50, 101, 101)
    assert (t.style, s.style, b.style) == ("pytorch", "caffe", "caffe")
    assert t.stage_with_dcn == (False,) * 4 and s.stage_with_dcn == b.stage_with_dcn == (False, False, True, True)
    assert (t.out_indices, s.out_indices, b.out_indices) == ((3,), (3,), (1, 2, 3))
    assert (t.num_levels, s.num_levels, b.num_levels) == (1, 1, 4)
    assert ((t.bev_h, t.bev_w), (s.bev_h, s.bev_w), (b.bev_h, b.bev_w)) == ((50, 50), (150, 150), (200, 200))
    assert (t.num_encoder_layers, s.num_encoder_layers, b.num_encoder_layers) == (3, 3, 6)
    assert (t.image_size, s.image_size, b.image_size) == ((480, 800), (736, 1280), (928, 1600))
    for c in (t, s, b):
        assert (c.embed_dims, c.ffn_dims, c.num_heads, c.num_query, c.num_decoder_layers) == (256, 512, 8, 900, 6)
        assert (c.tsa_num_points, c.sca_num_points, c.decoder_num_points, c.num_points_in_pillar) == (4, 8, 4, 4)
        assert c.pc_range == (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)
        assert c.post_center_range == (-61.2, -61.2, -10.0, 61.2, 61.2, 10.0)
        assert (c.max_num, c.score_threshold, c.rotate_center) == (300, None, (100.0, 100.0))
        assert c.relu_before_extra_convs and c.num_feature_levels == 4


def test_input_checks_name_the_argument(models):
    model = models["bevformer-tiny"]
    image, l2i, cb, prev, use = _inputs(model, batch=1)
    with pytest.raises(ValueError, match=r"image must have shape \[B, 6, 3, 32, 64\]"):
        model(image[:, :5], l2i, cb, prev, use)
    with pytest.raises(ValueError, match="lidar2img"):
        model(image, l2i[:, :, :3], cb, prev, use)
    with pytest.raises(ValueError, match="can_bus"):
        model(image, l2i, cb[:, :17], prev, use)
    with pytest.raises(ValueError, match=r"prev_bev must have shape \[1, 64, 256\]"):
        model(image, l2i, cb, prev.transpose(0, 1), use)
    with pytest.raises(ValueError, match="use_prev_bev"):
        model(image, l2i, cb, prev, use[:, None])


def test_models_registry():
    assert set(NAMES) <= set(MODELS) and "bevdet-r50-cbgs" in MODELS
    model = MODELS["bevformer-tiny"](**SMALL, num_encoder_layers=1)
    assert isinstance(model, BEVFormer) and len(model.pts_bbox_head.transformer.encoder.layers) == 1
    assert model.config.name == "bevformer-tiny" and model.config.image_size == SMALL["image_size"]


@needs_rotate
def test_export_tiny():
    """torch.export with static shapes: the deformable attentions and the rotation stay single op
    nodes, and the exported program reproduces eager (one encoder and one decoder layer: the same
    code paths as the full model, a quarter of the tracing time)."""
    cfg = small_config("bevformer-tiny", image_size=IMAGE, num_encoder_layers=1, num_decoder_layers=1)
    model = BEVFormer.from_config(cfg)
    randomize_(model.pts_bbox_head, seed=3).eval()
    args = _inputs(model, batch=1, seed=9)
    with torch.no_grad():
        ep = torch.export.export(model, args)
        want = model(*args)
        got = ep.module()(*args)
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert sum("bevdeploy.msda_fused" in t for t in targets) == 3  # TSA, SCA, decoder cross-attention
    assert sum("bevdeploy.rotate" in t for t in targets) == 1
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5)

"""BEVDet-R50-CBGS: config, state-dict keys, geometry and its cache, BEVPool path, decoding, NMS, export,
and the test-time preprocessing. Reduced widths and sizes keep the file fast on a CPU."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pyquaternion import Quaternion

from bevdeploy.data.nuscenes import lidar2img
from bevdeploy.data.preprocess_bevdet import (
    BEVDET_CAMERAS,
    BEVDET_R50,
    BEVDetPreprocess,
    bev2lidar,
    image_augmentation,
    prepare_bevdet_inputs,
    stack_bevdet_inputs,
    transform_image,
)
from bevdeploy.models.bevdet import (
    BEVDET_CONFIGS,
    HEAD_OUTPUTS,
    BEVDetGeometry,
    CenterPointDecoder,
    bevdet_boxes_to_lidar,
    bevdet_r50_cbgs,
    circle_nms,
    nms_bev,
    rotated_iou_bev,
)
from bevdeploy.ops.bev_pool_v2 import bev_pool_v2_prepare, scatter_add_reference
from tests.models._helpers import randomize_
from tests.models.fixtures.derive_bevdet_keys import derive

FIXTURES = Path(__file__).parent / "fixtures"

#: Reduced model: 6 cameras of 32x96 (features 2x6), 8 depth bins, BEV 16x16 at 1.6 m, narrow widths.
SMALL = dict(
    image_size=(32, 96),
    depth_bins=(1.0, 17.0, 2.0),
    grid_x=(-12.8, 12.8, 1.6),
    grid_y=(-12.8, 12.8, 1.6),
    fpn_out_channels=32,
    bev_channels=16,
    bev_layer_channels=(16, 32, 64),
    bev_neck_out_channels=32,
    share_conv_channels=16,
    head_conv_channels=16,
)
#: Original image size of the reduced rig (resize 0.6 then crop the bottom 32 rows of 54).
SRC = (90, 160)
SMALL_PRE = BEVDetPreprocess(input_size=SMALL["image_size"], src_size=SRC)
#: Camera yaws (degrees, CCW from ego x) in BEVDet's order, about nuScenes' rig.
YAWS = {"CAM_FRONT_LEFT": 55.0, "CAM_FRONT": 0.0, "CAM_FRONT_RIGHT": -55.0,
        "CAM_BACK_LEFT": 110.0, "CAM_BACK": 180.0, "CAM_BACK_RIGHT": -110.0}


def small_cfg(**kw):
    return dataclasses.replace(BEVDET_CONFIGS["bevdet-r50-cbgs"], **{**SMALL, **kw})


def small_geometry(**kw) -> BEVDetGeometry:
    return BEVDetGeometry.from_config(small_cfg(), **kw)


def cam_rotation(yaw_deg: float, pitch_deg: float = 0.0) -> np.ndarray:
    """Camera -> ego rotation (columns: camera x right, y down, z forward in the ego frame)."""
    t, p = math.radians(yaw_deg), math.radians(pitch_deg)
    fwd = np.array([math.cos(t) * math.cos(p), math.sin(t) * math.cos(p), -math.sin(p)])
    right = np.array([math.sin(t), -math.cos(t), 0.0])
    down = np.cross(fwd, right)
    return np.stack([right, down, fwd], 1)


def rig(batch: int = 1, jitter: float = 0.0, seed: int = 0):
    """sensor2ego [B, 6, 4, 4], intrinsics [B, 6, 3, 3], post_rots [B, 6, 3, 3], post_trans [B, 6, 3]."""
    g = np.random.default_rng(seed)
    H0, W0 = SRC
    resize, _, crop = image_augmentation(H0, W0, SMALL_PRE)
    s2e = np.zeros((batch, 6, 4, 4))
    K = np.zeros((batch, 6, 3, 3))
    for b in range(batch):
        for i, name in enumerate(BEVDET_CAMERAS):
            T = np.eye(4)
            T[:3, :3] = cam_rotation(YAWS[name] + jitter * g.normal() + 4.0 * b, 2.0 + jitter * g.normal())
            T[:3, 3] = [0.5 * math.cos(math.radians(YAWS[name])), 0.5 * math.sin(math.radians(YAWS[name])), 1.5]
            s2e[b, i] = T
            f = 0.79 * W0 * (1 + 0.05 * b)
            K[b, i] = [[f, 0, W0 / 2], [0, f, H0 / 2], [0, 0, 1]]
    post_rot = torch.diag(torch.tensor([resize, resize, 1.0])).expand(batch, 6, 3, 3)
    post_tran = torch.tensor([-crop[0], -crop[1], 0.0]).expand(batch, 6, 3)
    return torch.from_numpy(s2e).float(), torch.from_numpy(K).float(), post_rot.float(), post_tran.float()


# --------------------------------------------------------------------------------------------
# Config and keys
# --------------------------------------------------------------------------------------------


def test_official_config_numbers():
    cfg = BEVDET_CONFIGS["bevdet-r50-cbgs"]
    assert cfg.num_depth_bins == 59 and cfg.grid_size == (128, 128, 1) and cfg.feature_size == (16, 44)
    assert cfg.image_size == (256, 704) and cfg.bev_channels == 64 and cfg.out_indices == (2, 3)
    assert (cfg.nms_type, cfg.nms_thr, cfg.max_num, cfg.score_threshold) == ("rotate", 0.2, 500, 0.1)
    assert cfg.nms_rescale_factor == (1.0, 0.7, 0.7, 0.4, 0.55, 1.1, 1.0, 1.0, 1.5, 3.5)
    with pytest.raises(ValueError, match="image_size"):
        dataclasses.replace(cfg, image_size=(250, 704))
    with pytest.raises(ValueError, match="divisible"):
        dataclasses.replace(cfg, grid_x=(-51.2, 51.2, 1.6 * 1.25))
    with pytest.raises(ValueError, match="nms_rescale_factor"):
        dataclasses.replace(cfg, nms_rescale_factor=(1.0,))


def test_state_dict_matches_official_keys():
    expected = json.loads((FIXTURES / "bevdet_r50_cbgs_keys.json").read_text())
    assert expected == derive(), "the JSON fixture is stale: rerun fixtures/derive_bevdet_keys.py"
    with torch.device("meta"):
        model = bevdet_r50_cbgs()
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(ours))
    extra = sorted(set(ours) - set(expected))
    shapes = sorted(k for k in set(ours) & set(expected) if ours[k] != expected[k])
    assert not missing, f"{len(missing)} official keys missing, e.g. {missing[:5]}"
    assert not extra, f"{len(extra)} keys the official model does not have, e.g. {extra[:5]}"
    assert not shapes, f"{len(shapes)} shapes differ, e.g. {[(k, ours[k], expected[k]) for k in shapes[:5]]}"
    assert ours["img_view_transformer.depth_net.weight"] == [59 + 64, 256, 1, 1]
    assert ours["pts_bbox_head.task_heads.0.heatmap.1.weight"] == [10, 64, 3, 3]


# --------------------------------------------------------------------------------------------
# Model forward
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return randomize_(bevdet_r50_cbgs(**SMALL), seed=1).eval()


def test_forward_random_weights(small_model):
    s2e, K, pr, pt = rig(batch=2, jitter=2.0)
    image = torch.randn(2, 6, 3, *SMALL["image_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = small_model(image, *small_model.prepare(s2e, K, pr, pt))
    assert list(out) == list(HEAD_OUTPUTS)
    channels = {"reg": 2, "height": 1, "dim": 3, "rot": 2, "vel": 2, "heatmap": 10}
    for name, c in channels.items():
        assert tuple(out[name].shape) == (2, c, 16, 16), name
        assert torch.isfinite(out[name]).all(), name
    # (each sample pooling only its own cameras into its own cells: test_splat_equals_dense_scatter_add)
    assert out["heatmap"].std() > 0.01 and not torch.allclose(out["heatmap"][0], out["heatmap"][1])
    decoded = small_model.decode(out)
    assert len(decoded) == 2
    for boxes, scores, labels in decoded:
        assert boxes.shape[1] == 9 and boxes.shape[0] == scores.shape[0] == labels.shape[0]
        assert labels.dtype == torch.int64 and (scores > 0.1).all()
        assert (scores[:-1] >= scores[1:]).all()


def test_forward_rejects_bad_inputs(small_model):
    s2e, K, pr, pt = rig()
    ranks = small_model.prepare(s2e, K, pr, pt)
    with pytest.raises(ValueError, match="image must have shape"):
        small_model(torch.zeros(1, 6, 3, 32, 64), *ranks)
    with pytest.raises(ValueError, match="ranks_bev must be 1-D"):
        small_model(torch.zeros(1, 6, 3, 32, 96), ranks.ranks_bev[None], *ranks[1:])


def test_lift_splits_depth_then_context(small_model):
    vt = small_model.img_view_transformer
    x = torch.randn(6, 32, 2, 6)
    depth, feat = vt.lift(x, batch=1)
    raw = vt.depth_net(x)
    assert depth.shape == (1, 6, 8, 2, 6) and feat.shape == (1, 6, 2, 6, 16)
    torch.testing.assert_close(depth.sum(2), torch.ones(1, 6, 2, 6))
    torch.testing.assert_close(depth[0], raw[:, :8].softmax(1))
    torch.testing.assert_close(feat[0], raw[:, 8:].permute(0, 2, 3, 1))


# --------------------------------------------------------------------------------------------
# Geometry, BEVPool path, cache
# --------------------------------------------------------------------------------------------


def test_ego_coords_invert_the_projection():
    """Every frustum point projects back to its own network pixel at its own depth."""
    geom = small_geometry()
    s2e, K, pr, pt = rig(jitter=3.0)
    coor = geom.ego_coords(s2e, K, pr, pt).double()  # [1, 6, D, fH, fW, 3]
    frustum = geom.frustum().double()
    for n in range(6):
        T = torch.linalg.inv(s2e[0, n].double())
        cam = coor[0, n] @ T[:3, :3].T + T[:3, 3]
        pix = cam @ K[0, n].double().T
        uv = pix[..., :2] / pix[..., 2:3]
        uv = uv @ pr[0, n, :2, :2].double().T + pt[0, n, :2].double()
        torch.testing.assert_close(uv, frustum[..., :2], atol=2e-3, rtol=0)
        torch.testing.assert_close(cam[..., 2], frustum[..., 2], atol=1e-4, rtol=0)


def _dense_lss(depth, feat, coor, geom: BEVDetGeometry):
    """Lift-Splat without BEVPool: every frustum point's depth x feat added into its voxel."""
    B, N, D, H, W, _ = coor.shape
    C = feat.shape[-1]
    X, Y, Z = geom.grid_size
    lo = torch.tensor(geom.grid_lower_bound)
    step = torch.tensor(geom.grid_interval)
    v = ((coor - lo) / step).long()  # truncation toward zero, as BEVDet
    inside = ((v >= 0) & (v < torch.tensor([X, Y, Z]))).all(-1)
    b = torch.arange(B).view(B, 1, 1, 1, 1).expand(B, N, D, H, W)
    cell = ((b * Z + v[..., 2]) * Y + v[..., 1]) * X + v[..., 0]
    rows = (depth.unsqueeze(-1) * feat.unsqueeze(2))[inside]  # [P, C]
    out = torch.zeros(B * Z * Y * X, C).index_add_(0, cell[inside], rows)
    return out.view(B, Z, Y, X, C).permute(0, 4, 1, 2, 3)


def test_splat_equals_dense_scatter_add(small_model):
    geom = small_model.geometry
    s2e, K, pr, pt = rig(batch=2, jitter=5.0, seed=3)
    g = torch.Generator().manual_seed(0)
    depth = torch.rand(2, 6, 8, 2, 6, generator=g).softmax(2)
    feat = torch.randn(2, 6, 2, 6, 16, generator=g)
    ours = small_model.img_view_transformer.splat(depth, feat, geom.ranks(s2e, K, pr, pt))
    coor = geom.ego_coords(s2e, K, pr, pt)
    dense = _dense_lss(depth, feat, coor, geom)[:, :, 0]
    assert ours.shape == (2, 16, 16, 16) and dense.abs().sum() > 0
    torch.testing.assert_close(ours, dense, rtol=1e-5, atol=1e-5)
    ranks_bev, ranks_depth, ranks_feat, _, _ = bev_pool_v2_prepare(
        coor, geom.grid_lower_bound, geom.grid_interval, geom.grid_size
    )
    ref = scatter_add_reference(depth, feat, ranks_depth, ranks_feat, ranks_bev, (2, 1, 16, 16, 16))
    torch.testing.assert_close(ours, ref[:, :, 0], rtol=1e-5, atol=1e-5)


def test_padded_ranks_fixed_sizes_same_result():
    padded, exact = small_geometry(pad=True), small_geometry(pad=False)
    g = torch.Generator().manual_seed(1)
    depth = torch.rand(1, 6, 8, 2, 6, generator=g)
    feat = torch.randn(1, 6, 2, 6, 16, generator=g)
    from bevdeploy.models.bevdet import LSSViewTransformer

    vt = LSSViewTransformer(in_channels=4, out_channels=16, num_depth_bins=8, grid_size=(16, 16, 1))
    sizes = set()
    for seed, jitter in ((0, 0.0), (1, 8.0)):
        cams = rig(jitter=jitter, seed=seed)
        rp, re = padded.ranks(*cams), exact.ranks(*cams)
        sizes.add((rp.ranks_bev.shape[0], rp.interval_starts.shape[0]))
        assert rp.ranks_bev.shape[0] == 6 * 8 * 2 * 6 + 256 and rp.interval_starts.shape[0] == 256
        assert re.interval_starts.shape[0] < 256
        torch.testing.assert_close(vt.splat(depth, feat, rp), vt.splat(depth, feat, re), rtol=0, atol=0)
        # padded intervals are empty and each names its own voxel that no real interval owns
        real = re.interval_starts.shape[0]
        pad_cells = rp.ranks_bev[rp.interval_starts[real:].long()]
        assert (rp.interval_lengths[real:] == 0).all()
        assert len(set(pad_cells.tolist())) == len(pad_cells)
        assert not set(pad_cells.tolist()) & set(re.ranks_bev[re.interval_starts.long()].tolist())
    assert len(sizes) == 1, "padded sizes must not depend on the calibration"


def test_geometry_cache_reuses_and_recomputes():
    geom = small_geometry(cache_size=2)
    s2e, K, pr, pt = rig()
    first = geom.ranks(s2e, K, pr, pt)
    again = geom.ranks(s2e.clone(), K.clone(), pr.clone(), pt.clone())  # same values, new tensors
    assert again is first and (geom.hits, geom.misses) == (1, 1)
    K2 = K.clone()
    K2[..., 0, 0] *= 1.2  # another calibration
    other = geom.ranks(s2e, K2, pr, pt)
    assert geom.misses == 2 and other is not first
    assert not torch.equal(other.ranks_depth, first.ranks_depth)
    assert geom.ranks(s2e, K, pr, pt) is first and geom.hits == 2  # still cached (LRU of 2)
    bda = torch.diag(torch.tensor([1.0, -1.0, 1.0]))[None]  # BEV flip changes the voxels
    geom.ranks(s2e, K, pr, pt, bda)
    assert geom.misses == 3
    geom.ranks(s2e, K2, pr, pt)  # evicted by the bda entry (least recently used)
    assert geom.misses == 4
    with pytest.raises(ValueError, match="intrinsics must have shape"):
        geom.ranks(s2e, K[:, :3], pr, pt)


# --------------------------------------------------------------------------------------------
# Decoding and NMS
# --------------------------------------------------------------------------------------------


def _maps(cfg, peaks):
    """Head maps with background logit -10 and the given peaks (class, row, col, logit, values)."""
    X, Y, _ = cfg.grid_size
    out = {"reg": torch.zeros(1, 2, Y, X), "height": torch.zeros(1, 1, Y, X), "dim": torch.zeros(1, 3, Y, X),
           "rot": torch.zeros(1, 2, Y, X), "vel": torch.zeros(1, 2, Y, X),
           "heatmap": torch.full((1, cfg.num_classes, Y, X), -10.0)}
    for cls, row, col, logit, vals in peaks:
        out["heatmap"][0, cls, row, col] = logit
        for name, v in vals.items():
            out[name][0, :, row, col] = torch.tensor(v)
    return out


def _peak(reg=(0.5, 0.5), height=0.0, dim=(4.0, 2.0, 1.5), yaw=0.0, vel=(0.0, 0.0)):
    return {"reg": reg, "height": [height], "dim": [math.log(d) for d in dim],
            "rot": [math.sin(yaw), math.cos(yaw)], "vel": vel}


def test_decode_single_peak():
    cfg = small_cfg()
    logit = math.log(0.9 / 0.1)
    maps = _maps(cfg, [(3, 5, 9, logit, _peak((0.3, 0.6), 0.5, (4.0, 2.0, 1.5), 0.3, (1.0, -2.0)))])
    (boxes, scores, labels), = CenterPointDecoder(cfg).decode(maps)
    x, y = (9 + 0.3) * 1.6 - 12.8, (5 + 0.6) * 1.6 - 12.8
    expected = torch.tensor([[x, y, 0.5 - 0.75, 4.0, 2.0, 1.5, 0.3, 1.0, -2.0]])  # native: bottom z, dx dy dz
    torch.testing.assert_close(boxes, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores, torch.tensor([0.9]))
    assert labels.tolist() == [3]
    contract = bevdet_boxes_to_lidar(boxes)
    torch.testing.assert_close(
        contract, torch.tensor([[x, y, -0.25, 2.0, 4.0, 1.5, -0.3 - math.pi / 2, 1.0, -2.0]]), atol=1e-5, rtol=0
    )
    # a 90-degree turn and a shift of the frame: centre, heading and velocity turn with it
    T = torch.eye(4, dtype=torch.float64)
    T[:3, :3] = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    T[:3, 3] = torch.tensor([1.0, 2.0, -1.8])
    moved = bevdet_boxes_to_lidar(boxes, T)
    want = torch.tensor([[-y + 1.0, x + 2.0, -0.25 - 1.8, 2.0, 4.0, 1.5, math.pi - 0.3, 2.0, 1.0]])  # wrapped
    torch.testing.assert_close(moved, want, atol=1e-5, rtol=0)


def test_decode_thresholds_and_range():
    cfg = small_cfg(post_center_range=(-61.2, -61.2, -1.0, 61.2, 61.2, 1.0))
    below = math.log(0.09 / 0.91)  # score 0.09 < 0.1
    maps = _maps(cfg, [(0, 2, 2, 2.0, _peak()), (1, 8, 8, below, _peak()), (2, 12, 12, 2.0, _peak(height=3.0))])
    (_, _, labels), = CenterPointDecoder(cfg).decode(maps)
    assert labels.tolist() == [0], "score threshold and post_center_range (z of the centre) must filter"
    (none, _, _), = CenterPointDecoder(cfg).decode(_maps(cfg, []))
    assert none.shape == (0, 9)


def test_rotated_iou_known_values():
    def iou(a, b):
        return rotated_iou_bev(torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64)).item()

    assert iou([0, 0, 1, 1, 0], [0.5, 0, 1, 1, 0]) == pytest.approx(1 / 3, abs=1e-9)
    overlap = 2 * (math.sqrt(2) - 1)  # unit square and the same square turned 45 degrees: an octagon
    assert iou([0, 0, 1, 1, 0], [0, 0, 1, 1, math.pi / 4]) == pytest.approx(overlap / (2 - overlap), abs=1e-9)
    assert iou([0, 0, 4, 2, 0], [0, 0, 4, 2, math.pi / 2]) == pytest.approx(4 / 12, abs=1e-9)
    assert iou([0, 0, 2, 2, 0.3], [0, 0, 1, 1, 1.1]) == pytest.approx(0.25, abs=1e-9)
    assert iou([0, 0, 4, 2, 0.7], [0, 0, 4, 2, 0.7]) == pytest.approx(1.0, abs=1e-9)
    assert iou([0, 0, 1, 1, 0], [3, 0, 1, 1, 0.5]) == 0.0
    # heading convention: a 4x1 box along +45 deg overlaps a 4x1 box at (1, 1) along +45 deg,
    # not one along -45 deg (which only crosses it near the centre)
    assert iou([0, 0, 4, 1, math.pi / 4], [1, 1, 4, 1, math.pi / 4]) > 0.4
    # random pairs against a rasterised estimate
    g = torch.Generator().manual_seed(0)
    a = torch.cat([torch.rand(12, 2, generator=g), 0.5 + 2 * torch.rand(12, 2, generator=g),
                   6 * torch.rand(12, 1, generator=g)], 1).double()
    b = a.clone()
    b[:, :2] += torch.randn(12, 2, generator=g).double() * 0.7
    b[:, 4] += torch.randn(12, generator=g).double()
    got = rotated_iou_bev(a, b)
    assert (got > 0.05).sum() >= 6, "the random pairs should mostly overlap"
    xs = torch.linspace(-4, 5, 400, dtype=torch.float64)
    px, py = torch.meshgrid(xs, xs, indexing="xy")

    def inside(box):
        c, s = math.cos(box[4]), math.sin(box[4])
        lx = (px - box[0]) * c + (py - box[1]) * s
        ly = -(px - box[0]) * s + (py - box[1]) * c
        return (lx.abs() <= box[2] / 2) & (ly.abs() <= box[3] / 2)

    for k in range(12):
        ia, ib = inside(a[k].tolist()), inside(b[k].tolist())
        est = (ia & ib).sum().item() / max((ia | ib).sum().item(), 1)
        assert abs(got[k].item() - est) < 0.02, (k, got[k].item(), est)


def test_nms_bev_suppresses_overlaps():
    boxes = torch.tensor([
        [0.0, 0.0, 4.0, 2.0, 0.0],   # 0: best
        [0.3, 0.1, 4.0, 2.0, 0.1],   # 1: IoU ~0.8 with 0 -> suppressed
        [10.0, 0.0, 4.0, 2.0, 0.0],  # 2: far away -> kept
        [3.5, 0.0, 4.0, 2.0, 0.0],   # 3: IoU 0.5/7.5 with 0 -> kept
        [10.2, 0.3, 4.0, 2.0, 1.0],  # 4: overlaps 2 heavily -> suppressed
    ])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    assert nms_bev(boxes, scores, 0.2).tolist() == [0, 2, 3]
    assert nms_bev(boxes, scores, 0.2, post_max_size=2).tolist() == [0, 2]
    # order comes from the scores, not the input order
    assert nms_bev(boxes.flip(0), scores.flip(0), 0.2).tolist() == [4, 2, 1]
    assert nms_bev(boxes[:0], scores[:0], 0.2).tolist() == []


def test_scale_nms_uses_class_factors():
    """Cones (factor 3.5) 0.8 m apart suppress each other; pedestrians (1.5) and cars (1.0) do not."""
    cfg = small_cfg()
    hi, lo = 3.0, 2.0
    cone, ped, car = 9, 8, 0
    maps = _maps(cfg, [
        (cone, 2, 2, hi, _peak((0.5, 0.5), dim=(0.4, 0.4, 1.0))),
        (cone, 2, 2 + 1, lo, _peak((0.0, 0.5), dim=(0.4, 0.4, 1.0))),  # 0.8 m to the right
        (ped, 8, 2, hi, _peak((0.5, 0.5), dim=(0.6, 0.6, 1.7))),
        (ped, 8, 3, lo, _peak((0.0, 0.5), dim=(0.6, 0.6, 1.7))),
        (car, 13, 4, hi, _peak((0.5, 0.5), dim=(4.0, 2.0, 1.5))),
        (car, 13, 8, lo, _peak((0.5, 0.5), dim=(4.0, 2.0, 1.5))),  # 6.4 m away
    ])
    (boxes, _, labels), = CenterPointDecoder(cfg).decode(maps)
    assert sorted(labels.tolist()) == [car, car, ped, ped, cone]
    # sizes are restored after the scaled NMS
    torch.testing.assert_close(boxes[labels == cone][:, 3:6], torch.tensor([[0.4, 0.4, 1.0]]))
    circle = CenterPointDecoder(dataclasses.replace(cfg, nms_type="circle", min_radius=1.0))
    (_, _, labels_c), = circle.decode(maps)
    assert sorted(labels_c.tolist()) == [car, car, ped, cone], "0.8 m apart: 0.64 m^2 <= 1.0 suppresses"


def test_circle_nms_squared_distance():
    centers = torch.tensor([[0.0, 0.0], [1.5, 0.0], [0.0, 2.5], [5.0, 5.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    assert circle_nms(centers, scores, 4.0).tolist() == [0, 2, 3]  # 1.5^2 <= 4 < 2.5^2
    assert circle_nms(centers, scores, 2.0).tolist() == [0, 1, 2, 3]


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def test_export_keeps_bev_pool_as_one_node(small_model):
    s2e, K, pr, pt = rig()
    ranks = small_model.prepare(s2e, K, pr, pt)
    image = torch.randn(1, 6, 3, *SMALL["image_size"], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ep = torch.export.export(small_model, (image, *ranks))
        want = small_model(image, *ranks)
        got = ep.module()(image, *ranks)
    nodes = [n for n in ep.graph.nodes if n.op == "call_function" and n.target == torch.ops.bevdeploy.bev_pool_v2.default]
    assert len(nodes) == 1
    for name in HEAD_OUTPUTS:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------


def test_official_test_augmentation_numbers():
    resize, size, crop = image_augmentation(900, 1600, BEVDET_R50)
    assert resize == pytest.approx(0.44) and size == (704, 396) and crop == (0, 140, 704, 396)
    resize, size, crop = image_augmentation(*SRC, SMALL_PRE)
    assert size == (96, 54) and crop == (0, 22, 96, 54)


def test_transform_image_resizes_crops_and_swaps_channels():
    from PIL import Image

    g = np.random.default_rng(0)
    img = g.integers(0, 256, (225, 400, 3), dtype=np.uint8)  # resize 1.76 -> 704x396, bottom 256 rows
    x, post_rot, post_tran = transform_image(img)
    assert x.shape == (3, 256, 704) and x.dtype == torch.float32
    torch.testing.assert_close(post_rot, torch.diag(torch.tensor([1.76, 1.76, 1.0])))
    torch.testing.assert_close(post_tran, torch.tensor([0.0, -140.0, 0.0]))
    want = np.asarray(Image.fromarray(img).resize((704, 396), Image.Resampling.BICUBIC), dtype=np.float32)[140:]
    mean, std = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])
    want = (want[..., ::-1] - mean) / std  # the network sees B, G, R with the RGB statistics
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), want, atol=1e-4)
    flat = np.zeros((90, 160, 3), dtype=np.uint8)
    flat[...] = (200, 100, 50)  # R, G, B
    y, _, _ = transform_image(flat, SMALL_PRE)
    torch.testing.assert_close(y[:, 5, 5], torch.tensor([(50 - 123.675) / 58.395, (100 - 116.28) / 57.12,
                                                         (200 - 103.53) / 57.375]))
    with pytest.raises(ValueError, match="uint8"):
        transform_image(img.astype(np.float32))


def _pose(yaw_deg: float, t) -> tuple[list, list]:
    return list(Quaternion(axis=[0, 0, 1], degrees=yaw_deg).elements), list(map(float, t))


def _mat(q, t) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = Quaternion(q).rotation_matrix
    T[:3, 3] = t
    return T


def fake_info() -> dict:
    """An info record whose cameras fire at different ego poses, sensor2lidar as the converter computes it."""
    l2e_r, l2e_t = _pose(-90.0, (0.94, 0.0, 1.84))
    e2g_r, e2g_t = _pose(30.0, (100.0, 200.0, 0.0))
    info = {"token": "t0", "lidar2ego_rotation": l2e_r, "lidar2ego_translation": l2e_t,
            "ego2global_rotation": e2g_r, "ego2global_translation": e2g_t, "cams": {}}
    lidar2global = _mat(e2g_r, e2g_t) @ _mat(l2e_r, l2e_t)
    H0, W0 = SRC
    for i, name in enumerate(BEVDET_CAMERAS):
        heading = math.radians(30.0 + 0.3 * i)
        cam_e2g_r, cam_e2g_t = _pose(30.0 + 0.3 * i, (100.0 + 0.4 * i * math.cos(heading),
                                                      200.0 + 0.4 * i * math.sin(heading), 0.0))
        R = cam_rotation(YAWS[name], 1.0)
        s2e_r = list(Quaternion(matrix=R).elements)
        s2e_t = [0.5 * math.cos(math.radians(YAWS[name])), 0.5 * math.sin(math.radians(YAWS[name])), 1.5]
        s2l = np.linalg.inv(lidar2global) @ _mat(cam_e2g_r, cam_e2g_t) @ _mat(s2e_r, s2e_t)
        f = 0.79 * W0
        info["cams"][name] = {
            "sensor2ego_rotation": s2e_r, "sensor2ego_translation": s2e_t,
            "ego2global_rotation": cam_e2g_r, "ego2global_translation": list(cam_e2g_t),
            "sensor2lidar_rotation": s2l[:3, :3], "sensor2lidar_translation": s2l[:3, 3],
            "cam_intrinsic": np.array([[f, 0, W0 / 2], [0, f, H0 / 2], [0, 0, 1]]),
            "data_path": f"/nonexistent/{name}.jpg",
        }
    return info


def test_prepare_inputs_geometry_agrees_with_lidar2img():
    """Frustum points in the key ego frame, moved to the LiDAR frame and projected with the data
    package's lidar2img (built from sensor2lidar), land on their own pixels at their own depth."""
    info = fake_info()
    inp = prepare_bevdet_inputs(info, SMALL_PRE, load=False)
    assert "image" not in inp and inp["sensor2ego"].shape == (6, 4, 4) and inp["post_rots"].shape == (6, 3, 3)
    geom = small_geometry()
    batch = stack_bevdet_inputs([inp])
    coor = geom.ego_coords(batch["sensor2ego"], batch["intrinsics"], batch["post_rots"], batch["post_trans"])
    key = info["cams"][BEVDET_CAMERAS[0]]
    keyego2lidar = (np.linalg.inv(_mat(info["ego2global_rotation"], info["ego2global_translation"])
                                  @ _mat(info["lidar2ego_rotation"], info["lidar2ego_translation"]))
                    @ _mat(key["ego2global_rotation"], key["ego2global_translation"]))
    from bevdeploy.data.nuscenes import CAMERA_NAMES

    l2i_all = lidar2img(info)
    frustum = geom.frustum().double()
    resize, _, crop = image_augmentation(*SRC, SMALL_PRE)
    for n, name in enumerate(BEVDET_CAMERAS):
        pts = coor[0, n].double().reshape(-1, 3).numpy()
        lidar = pts @ keyego2lidar[:3, :3].T + keyego2lidar[:3, 3]
        q = np.c_[lidar, np.ones(len(lidar))] @ l2i_all[CAMERA_NAMES.index(name)].T
        uv = q[:, :2] / q[:, 2:3] * resize - np.array(crop[:2])
        np.testing.assert_allclose(uv, frustum[..., :2].reshape(-1, 2).numpy(), atol=5e-3)
        np.testing.assert_allclose(q[:, 2], frustum[..., 2].reshape(-1).numpy(), atol=1e-3)
    # without ego motion every camera keeps its calibration alone
    still = prepare_bevdet_inputs(info, SMALL_PRE, load=False, ego_motion=False)
    np.testing.assert_allclose(still["sensor2ego"][1].numpy(), _mat(info["cams"]["CAM_FRONT"]["sensor2ego_rotation"],
                               info["cams"]["CAM_FRONT"]["sensor2ego_translation"]), atol=1e-6)
    assert not torch.allclose(still["sensor2ego"][1], inp["sensor2ego"][1], atol=1e-3)


def test_prepare_inputs_images_in_bevdet_order():
    info = fake_info()
    images = [np.full((*SRC, 3), 10 * (i + 1), dtype=np.uint8) for i in range(6)]
    inp = prepare_bevdet_inputs(info, SMALL_PRE, images=images)
    assert inp["image"].shape == (6, 3, 32, 96)
    levels = inp["image"][:, 1, 0, 0] * 57.12 + 116.28  # green channel back to pixel values
    torch.testing.assert_close(levels, torch.tensor([10.0, 20, 30, 40, 50, 60]), atol=1e-3, rtol=0)
    with pytest.raises(FileNotFoundError, match="CAM_FRONT_LEFT"):
        prepare_bevdet_inputs(info, SMALL_PRE)
    with pytest.raises(ValueError, match="one image per camera"):
        prepare_bevdet_inputs(info, SMALL_PRE, images=images[:5])


def test_decoded_boxes_reach_the_official_global_pose():
    """A box predicted in CAM_FRONT's ego frame, through bev2lidar and the project's evaluation
    conversion, lands where BEVDet's own result formatting puts it (ego_cam ego -> global)."""
    from bevdeploy.eval.nuscenes import to_nusc_results  # the one test needing the evaluation stack

    info = fake_info()
    T = bev2lidar(info)
    native = torch.tensor([[12.0, -3.0, -1.0, 4.5, 1.9, 1.6, 0.4, 2.0, 0.5]], dtype=torch.float64)
    contract = bevdet_boxes_to_lidar(native, T)
    rec, = to_nusc_results("t0", contract, torch.tensor([0.5]), torch.tensor([0]), info, filter_range=False)
    cf = info["cams"]["CAM_FRONT"]
    e2g = _mat(cf["ego2global_rotation"], cf["ego2global_translation"])
    centre = e2g[:3, :3] @ np.array([12.0, -3.0, -1.0 + 0.8]) + e2g[:3, 3]  # gravity centre
    np.testing.assert_allclose(rec["translation"], centre, atol=1e-6)
    np.testing.assert_allclose(rec["size"], [1.9, 4.5, 1.6], atol=1e-6)  # w, l, h
    yaw = Quaternion(rec["rotation"]).yaw_pitch_roll[0]
    assert math.isclose(yaw, 0.4 + math.radians(30.0 + 0.3), abs_tol=1e-6)
    np.testing.assert_allclose(rec["velocity"], (e2g[:3, :3] @ np.array([2.0, 0.5, 0.0]))[:2], atol=1e-6)

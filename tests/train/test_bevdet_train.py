"""BEVDet training: CenterPoint targets against hand-computed values, the losses, and a few steps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bevdeploy.data.nuscenes import load_infos
from bevdeploy.data.preprocess_bevdet import BEVDetPreprocess, prepare_bevdet_inputs
from bevdeploy.data.synthetic import SYNTHETIC_SPLIT, SYNTHETIC_VERSION, generate
from bevdeploy.models import MODELS
from bevdeploy.models.bevdet import bevdet_boxes_to_lidar
from bevdeploy.train import train
from bevdeploy.train.bevdet import (
    BEVDetTraining,
    centerpoint_targets,
    depth_targets,
    draw_heatmap_gaussian,
    gaussian_radius,
    lidar_boxes_to_model_frame,
)
from bevdeploy.train.centernet import gaussian_focal_loss

#: A reduced BEVDet (ResNet-50 kept: its widths are fixed) on a 32x32 grid of 1.6 m cells.
SMALL = dict(image_size=(32, 96), depth_bins=(1.0, 40.0, 1.0), grid_x=(-25.6, 25.6, 1.6), grid_y=(-25.6, 25.6, 1.6),
             fpn_out_channels=32, bev_channels=16, bev_layer_channels=(16, 32, 64), bev_neck_out_channels=32,
             share_conv_channels=16, head_conv_channels=16)


@pytest.fixture(scope="module")
def infos(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-world")
    generate(root, num_scenes=1, samples_per_scene=2, seed=11, image_size=(90, 160), progress=False)
    return load_infos(root, SYNTHETIC_VERSION, SYNTHETIC_SPLIT, progress=False)


def test_gaussian_radius_hand_computed():
    # h=2.5, w=5, overlap 0.1: the third root is (-1.5 + sqrt(1.5^2 + 4*0.4*11.25)) / 2 = (-1.5 + 4.5) / 2
    assert gaussian_radius((2.5, 5.0), 0.1) == pytest.approx(1.5)


def test_heatmap_gaussian_against_hand_computed():
    heat = np.zeros((12, 12), dtype=np.float32)
    draw_heatmap_gaussian(heat, (5, 6), 2)
    sigma = 5 / 6
    expected = np.zeros_like(heat)
    for y in range(12):
        for x in range(12):
            if abs(x - 5) <= 2 and abs(y - 6) <= 2:
                expected[y, x] = math.exp(-((x - 5) ** 2 + (y - 6) ** 2) / (2 * sigma**2))
    np.testing.assert_allclose(heat, expected, rtol=1e-6, atol=1e-7)
    # clipped at the border, and max-combined with what is there
    draw_heatmap_gaussian(heat, (0, 0), 2)
    assert heat[0, 0] == 1.0 and heat[6, 5] == 1.0 and heat[0, 2] == pytest.approx(math.exp(-4 / (2 * sigma**2)))


def test_centerpoint_targets_one_box():
    cfg = MODELS["bevdet-r50-cbgs"](**SMALL).config
    # a 4 m x 2 m car centred at (3.0, -2.0), 1.5 m tall at z 0.75, yaw 0.3, moving (2, 1) m/s
    box = np.array([[3.0, -2.0, 0.75, 4.0, 2.0, 1.5, 0.3, 2.0, 1.0]])
    heat, anno, ind, mask = centerpoint_targets(box, np.array([0]), cfg)
    cx, cy = (3.0 + 25.6) / 1.6, (-2.0 + 25.6) / 1.6  # 17.875, 14.75
    assert mask.sum() == 1 and ind[0] == 14 * 32 + 17
    np.testing.assert_allclose(anno[0], [cx - 17, cy - 14, 0.75, math.log(4), math.log(2), math.log(1.5),
                                         math.sin(0.3), math.cos(0.3), 2.0, 1.0], rtol=1e-6)
    # sizes in cells 2.5 x 1.25: gaussian radius < 2, so the minimum radius 2 (sigma 5/6)
    assert heat[0, 14, 17] == 1.0 and heat[1:].max() == 0.0
    assert heat[0, 14, 19] == pytest.approx(math.exp(-4 / (2 * (5 / 6) ** 2)), rel=1e-6)
    assert heat[0, 14, 20] == 0.0
    # off the grid: skipped
    far = box.copy()
    far[0, 0] = 40.0
    assert centerpoint_targets(far, np.array([0]), cfg)[3].sum() == 0


def test_lidar_boxes_to_model_frame_inverts_the_decoder_conversion():
    g = torch.Generator().manual_seed(0)
    native = torch.cat([torch.rand(5, 3, generator=g) * 20, torch.rand(5, 3, generator=g) * 3 + 0.5,
                        (torch.rand(5, 1, generator=g) - 0.5) * 6, torch.randn(5, 2, generator=g)], 1).double()
    yaw = 0.4
    T = torch.eye(4, dtype=torch.float64)
    T[:2, :2] = torch.tensor([[math.cos(yaw), -math.sin(yaw)], [math.sin(yaw), math.cos(yaw)]])
    T[:3, 3] = torch.tensor([0.9, -0.2, 1.8])
    lidar = bevdet_boxes_to_lidar(native, T).numpy()  # bottom centre, mmdet3d 0.17
    gt = lidar[:, :7].copy()
    gt[:, 2] += gt[:, 5] / 2  # info records hold gravity centres
    back = lidar_boxes_to_model_frame(gt, lidar[:, 7:9], T.numpy())
    expected = native.numpy().copy()
    expected[:, 2] += expected[:, 5] / 2
    np.testing.assert_allclose(back[:, [0, 1, 2, 3, 4, 5, 7, 8]], expected[:, [0, 1, 2, 3, 4, 5, 7, 8]], atol=1e-9)
    np.testing.assert_allclose(np.cos(back[:, 6] - expected[:, 6]), 1.0, atol=1e-9)


def test_gaussian_focal_loss_formula():
    pred = torch.tensor([0.9, 0.2, 0.5])
    target = torch.tensor([1.0, 0.5, 0.0])
    expected = (-math.log(0.9) * 0.1**2) + (-math.log(0.8) * 0.2**2 * 0.5**4) + (-math.log(0.5) * 0.5**2)
    assert gaussian_focal_loss(pred, target).item() == pytest.approx(expected, rel=1e-5)


def test_depth_targets_lie_on_the_ground_or_objects(infos):
    model = MODELS["bevdet-r50-cbgs"](**SMALL)
    cfg = model.config
    pre = BEVDetPreprocess(input_size=cfg.image_size)
    x = prepare_bevdet_inputs(infos[0], pre)
    bins = depth_targets(infos[0], x, cfg, pre, ground=True)
    assert bins.shape == (6, *cfg.feature_size) and bins.dtype == np.int16
    known = bins >= 0
    assert known.mean() > 0.3  # the ground fills the lower image rows
    # the frustum point of the target bin is on the ground (ego z ~ 0) or on an object (above it)
    coords = model.geometry.ego_coords(*(x[k][None] for k in ("sensor2ego", "intrinsics", "post_rots", "post_trans")))
    n, r, c = np.nonzero(known)
    z = coords[0, n, bins[n, r, c], r, c, 2].numpy()
    assert np.all(z > -0.6) and np.median(np.abs(z)) < 0.5
    no_ground = depth_targets(infos[0], x, cfg, pre, ground=False)
    assert (no_ground >= 0).sum() < known.sum()


def test_training_steps_lower_the_loss(infos, ops_on_references):
    torch.manual_seed(0)
    model = MODELS["bevdet-r50-cbgs"](**SMALL)
    model.img_backbone.requires_grad_(False)  # a CPU budget: the ResNet-50's backward is most of a step
    training = BEVDetTraining(model, infos[:1], "cpu", progress=False)
    assert training.mask.sum() > 0
    batch = training.make_batch(torch.tensor([0]))

    class SameBatch:  # the protocol, fed one fixed batch
        def batches(self, batch_size, seed):
            while True:
                yield batch

        def loss(self, m, b):
            return training.loss(m, b)

    with torch.no_grad():
        model.train()
        before = {k: v.item() for k, v in training.loss(model, batch).items()}
    assert set(before) == {"loss_heatmap", "loss_bbox", "loss_depth"}
    history = train(model, SameBatch(), steps=3, batch_size=1, lr=1e-3, warmup=0, progress=False, log_every=1)
    with torch.no_grad():
        model.train()
        after = sum(training.loss(model, batch).values()).item()
    assert all(np.isfinite(h["loss"]) for h in history)
    assert after < sum(before.values())


def test_training_rejects_bad_input(infos):
    with pytest.raises(TypeError, match="BEVDet"):
        BEVDetTraining(torch.nn.Linear(2, 2), infos, "cpu")
    with pytest.raises(ValueError, match="infos"):
        BEVDetTraining(MODELS["bevdet-r50-cbgs"](**SMALL), [], "cpu")


def test_depth_loss_against_its_formula():
    from bevdeploy.train.bevdet import depth_loss

    g = torch.Generator().manual_seed(0)
    depth = torch.rand(1, 2, 4, 3, 5, generator=g).softmax(2)  # [B, N, D, fH, fW]
    target = torch.randint(-1, 4, (1, 2, 3, 5), generator=g)
    expected, count = 0.0, 0
    for n in range(2):
        for r in range(3):
            for c in range(5):
                k = int(target[0, n, r, c])
                if k < 0:
                    continue
                count += 1
                for d in range(4):
                    p = float(depth[0, n, d, r, c])
                    expected -= math.log(p) if d == k else math.log(1 - p)
    assert count > 0
    assert depth_loss(depth, target).item() == pytest.approx(expected / count, rel=1e-5)
    assert depth_loss(depth, torch.full_like(target, -1)).item() == 0.0

"""BEVFormer's multi-view preprocessing and temporal host logic."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bevdeploy.data import synthetic as syn
from bevdeploy.data.nuscenes import lidar2img, load_images, load_infos
from bevdeploy.data.preprocess import (
    BEVFORMER_BASE,
    BEVFORMER_SMALL,
    BEVFORMER_TINY,
    ImagePreprocess,
    TemporalState,
    bevformer_can_bus,
    frame_inputs,
    prepare_frame,
    preprocess_images,
    stack_frames,
)

SIZE = (90, 160)


@pytest.fixture(scope="module")
def infos(tmp_path_factory) -> list[dict]:
    root = syn.generate(tmp_path_factory.getbasetemp() / "synthetic-tiny-png", 2, 3, seed=0, image_size=SIZE,
                        image_format="png", progress=False)
    return load_infos(root, syn.SYNTHETIC_VERSION, syn.SYNTHETIC_SPLIT, progress=False)


def test_configs_match_bevformer():
    assert BEVFORMER_TINY.output_size((900, 1600)) == (480, 800)
    assert BEVFORMER_SMALL.output_size((900, 1600)) == (736, 1280)
    assert BEVFORMER_BASE.output_size((900, 1600)) == (928, 1600)
    assert BEVFORMER_TINY.to_rgb and not BEVFORMER_SMALL.to_rgb and BEVFORMER_BASE.std == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="scale"):
        ImagePreprocess(scale=0.0)


def test_normalisation_channel_order():
    red = np.zeros((40, 64, 3), dtype=np.uint8)
    red[..., 0] = 255
    l2i = np.tile(np.eye(4), (1, 1, 1))
    x, _ = preprocess_images([red], l2i, BEVFORMER_TINY)  # RGB, pytorch style
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([(255 - 123.675) / 58.395, -116.28 / 57.12, -103.53 / 57.375]))
    x, _ = preprocess_images([red], l2i, BEVFORMER_BASE)  # BGR, caffe style
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([-103.53, -116.28, 255 - 123.675]))
    assert x.shape == (1, 3, 64, 64) and (x[0, :, 40:] == 0).all()  # 40 -> 64 rows, zero padding


def test_resize_matches_cv2_inter_linear():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(90, 160, 3), dtype=np.uint8)
    for cfg in (BEVFORMER_TINY, BEVFORMER_SMALL):
        x, _ = preprocess_images([img], np.eye(4)[None], cfg)
        norm = (img[..., ::-1].astype(np.float32) if not cfg.to_rgb else img.astype(np.float32))
        norm = (norm - np.array(cfg.mean, np.float32)) / np.array(cfg.std, np.float32)
        h, w = int(90 * cfg.scale), int(160 * cfg.scale)
        want = cv2.resize(norm, (w, h), interpolation=cv2.INTER_LINEAR)  # mmcv.imresize
        got = x[0, :, :h, :w].permute(1, 2, 0).numpy()
        assert np.abs(got - want).max() < 2e-3 * max(1.0, np.abs(want).max() / 10)
        assert (x[0, :, h:, :] == 0).all() and (x[0, :, :, w:] == 0).all()


def test_pad_and_projection_stay_consistent(infos):
    info = infos[1]
    images = load_images(info)
    proj = lidar2img(info)
    x, l2i = preprocess_images(images, proj, BEVFORMER_TINY)
    assert x.shape == (6, 3, 64, 96) and x.dtype == torch.float32 and l2i.shape == (6, 4, 4)
    checked = 0
    for j, centre in enumerate(info["gt_boxes"][:, :3]):
        for c in range(6):
            q0 = proj[c] @ np.r_[centre, 1.0]
            q1 = l2i[c].double().numpy() @ np.r_[centre, 1.0]
            if q0[2] < 1.0:
                continue
            u0, v0 = q0[:2] / q0[2]
            u1, v1 = q1[:2] / q1[2]
            # the same relative position in the resized image (unpadded extent 45x80 of 90x160)
            assert u1 / 80 == pytest.approx(u0 / 160, abs=1e-5) and v1 / 45 == pytest.approx(v0 / 90, abs=1e-5)
            assert q1[2] == pytest.approx(q0[2])
            checked += 1
    assert checked > 10


def test_temporal_gate_and_deltas(infos):
    first = frame_inputs(infos[0], None)
    assert first["use_prev_bev"] == 0.0
    assert (first["can_bus"][:3] == 0).all() and first["can_bus"][-1] == 0
    full = bevformer_can_bus(infos[1])
    yaw = math.degrees(math.atan2(*_heading_sin_cos(infos[1]["ego2global_rotation"]))) % 360
    assert full[-1] == pytest.approx(yaw) and full[-2] == pytest.approx(math.radians(yaw))
    assert 0 <= full[-2] < 2 * math.pi
    second = frame_inputs(infos[1], infos[0])
    assert second["use_prev_bev"] == 1.0
    assert np.allclose(second["can_bus"][:3],
                       np.subtract(infos[1]["ego2global_translation"], infos[0]["ego2global_translation"]))
    assert second["can_bus"][-1] == pytest.approx(full[-1] - bevformer_can_bus(infos[0])[-1])
    assert second["can_bus"][-2] == pytest.approx(full[-2])  # absolute yaw stays
    assert np.allclose(second["can_bus"][3:16], full[3:16])
    state = TemporalState()
    gates = [state.step(i)["use_prev_bev"] for i in infos]
    assert gates == [0.0, 1.0, 1.0, 0.0, 1.0, 1.0]  # reset at the scene change
    state.reset()
    assert state.step(infos[2])["use_prev_bev"] == 0.0


def _heading_sin_cos(q):
    w, x, y, z = q
    return 2 * (w * z + x * y), 1 - 2 * (y * y + z * z)


def test_prepare_frame_and_stack(infos):
    a = prepare_frame(infos[0], None, BEVFORMER_SMALL)
    b = prepare_frame(infos[1], infos[0], BEVFORMER_SMALL)
    assert a["image"].shape == (6, 3, 96, 128) and a["img_shape"] == (96, 128)
    assert a["lidar2img"].dtype == torch.float32 and a["can_bus"].shape == (18,)
    batch = stack_frames([a, b])
    assert batch["image"].shape == (2, 6, 3, 96, 128) and batch["lidar2img"].shape == (2, 6, 4, 4)
    assert batch["can_bus"].shape == (2, 18) and batch["use_prev_bev"].tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="lidar2img"):
        preprocess_images(load_images(infos[0]), np.eye(4)[None], BEVFORMER_TINY)

"""The nuScenes reader on a (tiny, synthetic) dataset in nuScenes v1.0 form."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from bevdeploy.data import synthetic as syn
from bevdeploy.data.nuscenes import (
    CAMERA_NAMES,
    CLASS_NAMES,
    gt_box_corners,
    lidar2img,
    load_images,
    load_infos,
    quaternion_to_matrix,
)

SIZE = (90, 160)
VERSION, SPLIT = syn.SYNTHETIC_VERSION, syn.SYNTHETIC_SPLIT


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory) -> Path:
    return syn.generate(tmp_path_factory.getbasetemp() / "synthetic-tiny-png", 2, 3, seed=0, image_size=SIZE,
                        image_format="png", progress=False)


@pytest.fixture(scope="module")
def infos(world_dir) -> list[dict]:
    return load_infos(world_dir, VERSION, SPLIT, progress=False)


@pytest.fixture(scope="module")
def nusc(world_dir):
    from nuscenes.nuscenes import NuScenes

    return NuScenes(version=VERSION, dataroot=str(world_dir), verbose=False)


def _yaw(q) -> float:
    m = quaternion_to_matrix(q)
    return math.atan2(m[1, 0], m[0, 0])


def _angle_diff(a, b):
    return np.abs((np.asarray(a) - np.asarray(b) + np.pi) % (2 * np.pi) - np.pi)


def test_missing_data_is_named(tmp_path, world_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_infos(tmp_path / "nowhere", VERSION)
    with pytest.raises(FileNotFoundError, match="v1.0-mini"):
        load_infos(world_dir, "v1.0-mini")
    root = tmp_path / "copy"
    shutil.copytree(world_dir / VERSION, root / VERSION)
    with pytest.raises(FileNotFoundError, match="maps/synthetic-placeholder.png"):
        load_infos(root, VERSION)
    (root / VERSION / "sample_annotation.json").unlink()
    with pytest.raises(FileNotFoundError, match="sample_annotation.json"):
        load_infos(root, VERSION)


def test_bad_split(world_dir):
    with pytest.raises(ValueError, match="split must be one of"):
        load_infos(world_dir, VERSION, "validation", progress=False)
    with pytest.raises(ValueError, match="selects none"):
        load_infos(world_dir, VERSION, "mini_val", progress=False)


def test_record_fields_and_shapes(infos):
    assert len(infos) == 6
    for info in infos:
        assert list(info["cams"]) == list(CAMERA_NAMES)
        assert info["can_bus"].shape == (18,) and info["can_bus"].dtype == np.float64
        assert len(info["lidar2ego_rotation"]) == 4 and len(info["ego2global_translation"]) == 3
        for cam in info["cams"].values():
            rot = cam["sensor2lidar_rotation"]
            assert rot.shape == (3, 3) and np.allclose(rot @ rot.T, np.eye(3))
            assert cam["sensor2lidar_translation"].shape == (3,) and cam["cam_intrinsic"].shape == (3, 3)
            assert Path(cam["data_path"]).is_file() and cam["timestamp"] == info["timestamp"]
        n = len(info["gt_boxes"])
        assert n > 0 and info["gt_boxes"].shape == (n, 7)
        assert info["gt_names"].shape == (n,) and set(info["gt_names"]) <= set(CLASS_NAMES)
        assert info["gt_velocity"].shape == (n, 2)
        assert info["num_lidar_pts"].shape == (n,) and info["valid_flag"].dtype == bool
        assert len(info["sweeps"]) == info["frame_idx"]  # previous key-frame LiDAR sweeps of the scene
        assert all(s["type"] == "lidar" for s in info["sweeps"])


def test_temporal_order(infos):
    scenes = [i["scene_token"] for i in infos]
    assert scenes == sorted(scenes, key=scenes.index)  # each scene contiguous
    for a, b in zip(infos, infos[1:]):
        if a["scene_token"] == b["scene_token"]:
            assert b["frame_idx"] == a["frame_idx"] + 1 and b["timestamp"] > a["timestamp"]
            assert a["next"] == b["token"] and b["prev"] == a["token"]
        else:
            assert b["frame_idx"] == 0 and a["next"] == "" and b["prev"] == "" and b["timestamp"] > a["timestamp"]
    assert infos[0]["frame_idx"] == 0


def test_can_bus_follows_the_ego(infos, world_dir):
    for info in infos:
        cb = info["can_bus"]
        assert np.allclose(cb[:3], info["ego2global_translation"])
        assert np.allclose(cb[3:7], info["ego2global_rotation"])
        assert np.allclose(cb[-2:], 0.0)
        # converter layout: pos 0-2, orientation 3-6, accel 7-9, rotation rate 10-12, velocity 13-15
        assert cb[13] >= 0.0 and np.allclose(cb[14:16], 0.0)  # velocity: forward, in the ego frame
        assert cb[9] == pytest.approx(9.81)
    # ego displacement between frames equals velocity * 0.5 s
    a, b = infos[0], infos[1]
    step = np.linalg.norm(np.subtract(b["ego2global_translation"], a["ego2global_translation"]))
    assert step == pytest.approx(a["can_bus"][13] * 0.5, rel=1e-3, abs=1e-6)
    with pytest.warns(UserWarning, match="CAN bus"):
        no_can = load_infos(world_dir, VERSION, SPLIT, can_bus_root=world_dir / "samples", progress=False)
    assert all((i["can_bus"] == 0).all() for i in no_can)


def test_gt_boxes_match_devkit_annotations(infos, nusc):
    for info in infos:
        sample = nusc.get("sample", info["token"])
        anns = [nusc.get("sample_annotation", t) for t in sample["anns"]]
        l2e_r = quaternion_to_matrix(info["lidar2ego_rotation"])
        e2g_r = quaternion_to_matrix(info["ego2global_rotation"])
        boxes = info["gt_boxes"]
        centres = (boxes[:, :3] @ l2e_r.T + info["lidar2ego_translation"]) @ e2g_r.T + info["ego2global_translation"]
        assert np.allclose(centres, [a["translation"] for a in anns], atol=1e-6)
        assert np.allclose(boxes[:, 3:6], [a["size"] for a in anns])
        # converter yaw convention: yaw = -heading_lidar - pi/2
        heading_global = -boxes[:, 6] - np.pi / 2 + _yaw(info["lidar2ego_rotation"]) + _yaw(info["ego2global_rotation"])
        assert _angle_diff(heading_global, [_yaw(a["rotation"]) for a in anns]).max() < 1e-6
        velo = np.array([nusc.box_velocity(a["token"])[:2] for a in anns])
        v3 = np.c_[info["gt_velocity"], np.zeros(len(velo))] @ l2e_r.T @ e2g_r.T
        ok = np.isfinite(velo).all(1)
        assert ok.any() and np.allclose(v3[ok, :2], velo[ok], atol=1e-6)
        assert np.isnan(info["gt_velocity"][~ok]).all()
        assert (info["num_lidar_pts"] == [a["num_lidar_pts"] for a in anns]).all()


def test_lidar2img_matches_devkit_projection(infos, nusc):
    from nuscenes.utils.geometry_utils import view_points

    info = infos[2]
    proj = lidar2img(info)
    assert proj.shape == (6, 4, 4)
    checked = 0
    for c, cam in enumerate(CAMERA_NAMES):
        cam_info = info["cams"][cam]
        s2l = np.eye(4)
        s2l[:3, :3], s2l[:3, 3] = cam_info["sensor2lidar_rotation"], cam_info["sensor2lidar_translation"]
        k = np.eye(4)
        k[:3, :3] = cam_info["cam_intrinsic"]
        assert np.allclose(proj[c], k @ np.linalg.inv(s2l))
        _, cam_boxes, intrinsic = nusc.get_sample_data(cam_info["sample_data_token"])
        index = {t: i for i, t in enumerate(nusc.get("sample", info["token"])["anns"])}
        for box in cam_boxes:  # boxes in the camera frame, by the devkit
            if box.center[2] < 1.0:
                continue
            want = view_points(box.center[:, None], intrinsic, normalize=True)[:2, 0]
            q = proj[c] @ np.r_[info["gt_boxes"][index[box.token], :3], 1.0]
            assert q[2] == pytest.approx(box.center[2], rel=1e-6)
            assert np.allclose(q[:2] / q[2], want, atol=1e-6)
            checked += 1
    assert checked > 10


def test_gt_box_corners_convention():
    box = np.array([[1.0, 2.0, 0.5, 2.0, 4.0, 1.0, -np.pi / 2]])  # heading 0: length along +x
    c = gt_box_corners(box)[0]
    assert np.allclose(c.min(0), [-1.0, 1.0, 0.0]) and np.allclose(c.max(0), [3.0, 3.0, 1.0])
    with pytest.raises(ValueError, match="gt_boxes"):
        gt_box_corners(np.zeros((3, 5)))


def test_load_images(infos):
    images = load_images(infos[0])
    assert len(images) == 6 and all(im.shape == (*SIZE, 3) and im.dtype == np.uint8 for im in images)
    cams = {**infos[0]["cams"], "CAM_BACK": {**infos[0]["cams"]["CAM_BACK"], "data_path": "/no/such.jpg"}}
    broken = {**infos[0], "cams": cams}
    with pytest.raises(FileNotFoundError, match="/no/such.jpg"):
        load_images(broken)

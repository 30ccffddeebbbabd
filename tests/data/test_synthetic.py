"""The synthetic world: determinism, cache, devkit compatibility and rendering geometry."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from bevdeploy.data import synthetic as syn
from bevdeploy.data.nuscenes import CAMERA_NAMES, CLASS_NAMES, gt_box_corners, lidar2img, load_images, load_infos

SIZE = (90, 160)
LENGTHS = [3, 3]


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory) -> Path:
    # lossless images so rendered pixels can be compared exactly; shared (cached) across test files
    return syn.generate(tmp_path_factory.getbasetemp() / "synthetic-tiny-png", 2, 3, seed=0, image_size=SIZE,
                        image_format="png", progress=False)


@pytest.fixture(scope="module")
def infos(world_dir) -> list[dict]:
    return load_infos(world_dir, syn.SYNTHETIC_VERSION, syn.SYNTHETIC_SPLIT, progress=False)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_and_cache(tmp_path):
    a = syn.generate(tmp_path / "a", 1, 2, seed=3, image_size=SIZE, progress=False)
    b = syn.generate(tmp_path / "b", 1, 2, seed=3, image_size=SIZE, progress=False)
    fa, fb = _files(a), _files(b)
    assert len(fa) > 14 and fa == fb
    c = syn.generate(tmp_path / "c", 1, 2, seed=4, image_size=SIZE, progress=False)
    fc = _files(c)
    images = [k for k in fa if k.endswith(".jpg")]
    assert len(images) == 12 and all(fa[k] != fc.get(k.replace("-s3-", "-s4-")) for k in images)
    # same parameters again: the directory is reused untouched
    stamp = (a / syn.SYNTHETIC_VERSION / "sample.json").stat().st_mtime_ns
    assert syn.generate(tmp_path / "a", 1, 2, seed=3, image_size=SIZE, progress=False) == a
    assert (a / syn.SYNTHETIC_VERSION / "sample.json").stat().st_mtime_ns == stamp
    # other parameters into the same directory regenerate it
    syn.generate(tmp_path / "a", 1, 3, seed=3, image_size=SIZE, progress=False)
    assert len(load_infos(a, syn.SYNTHETIC_VERSION, "val", progress=False)) == 3


def test_generate_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_scenes"):
        syn.generate(tmp_path / "x", 0, 2, progress=False)
    with pytest.raises(ValueError, match="at most 150"):
        syn.SyntheticWorld([1] * 151)
    with pytest.raises(ValueError, match="image_size"):
        syn.generate(tmp_path / "x", 1, 2, image_size=(4, 4), progress=False)
    with pytest.raises(ValueError, match="num_samples"):
        syn.generate(tmp_path / "x", 1, 2, num_samples=3, progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an"):
        syn.generate(foreign, 1, 1, image_size=SIZE, progress=False)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_parse_data_spec():
    assert syn.parse_data_spec("synthetic") == ("synthetic", syn.DEFAULT_NUM_SAMPLES)
    assert syn.parse_data_spec("synthetic:32") == ("synthetic", 32)
    kind, nusc = syn.parse_data_spec("nuscenes:/data/nuscenes")
    assert kind == "nuscenes" and nusc.root == Path("/data/nuscenes") and nusc.version is None
    for bad in ("synthetic:0", "synthetic:x", "nuscenes:", "coco:/x", ""):
        with pytest.raises(ValueError, match="data spec"):
            syn.parse_data_spec(bad)


def test_resolve_data_spec_generates_exact_count(tmp_path):
    src = syn.resolve_data_spec("synthetic:5", cache_dir=tmp_path, image_size=SIZE, samples_per_scene=3,
                                progress=False)
    infos = load_infos(src.dataroot, src.version, src.split, progress=False)
    assert len(infos) == 5 and [i["frame_idx"] for i in infos] == [0, 1, 2, 0, 1]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        syn.resolve_data_spec(f"nuscenes:{tmp_path / 'missing'}")


def test_data_spec_world_seed():
    assert syn.parse_data_spec("synthetic:8@3") == ("synthetic", 8)
    assert syn.split_seed("synthetic:8@3") == ("synthetic:8", 3)
    assert syn.split_seed("synthetic:8") == ("synthetic:8", None)
    for bad in ("synthetic:8@", "synthetic:8@x", "synthetic:8@-1", "nuscenes@2"):
        with pytest.raises(ValueError, match="data spec"):
            syn.parse_data_spec(bad)


def test_train_and_eval_worlds_share_no_token(tmp_path):
    kw = dict(cache_dir=tmp_path, image_size=SIZE, samples_per_scene=2, progress=False)
    train = syn.resolve_data_spec("synthetic:4@1", **kw)
    held_out = syn.resolve_data_spec("synthetic:4@2", **kw)
    assert train.dataroot != held_out.dataroot
    a = load_infos(train.dataroot, train.version, train.split, progress=False)
    b = load_infos(held_out.dataroot, held_out.version, held_out.split, progress=False)
    assert len(a) == len(b) == 4
    assert not {i["scene_token"] for i in a} & {i["scene_token"] for i in b}
    assert not {i["token"] for i in a} & {i["token"] for i in b}
    # different worlds, not renamed copies: the objects differ
    assert not np.allclose(a[0]["gt_boxes"][:3], b[0]["gt_boxes"][:3]) or len(a[0]["gt_boxes"]) != len(b[0]["gt_boxes"])


def test_small_render_scales_intrinsics(infos):
    # rendered at 90x160: intrinsics are nuScenes' 1600x900 ones scaled by 0.1, and BEVDet's
    # test crop resizes from the rendered width (the network geometry is that of the full-size rig)
    from bevdeploy.data.preprocess_bevdet import BEVDetPreprocess, prepare_bevdet_inputs

    full = syn.nuscenes_rig((900, 1600)).intrinsics
    K = np.stack([infos[0]["cams"][c]["cam_intrinsic"] for c in CAMERA_NAMES])
    np.testing.assert_allclose(K[:, :2], full[:, :2] * 0.1, rtol=1e-6)
    x = prepare_bevdet_inputs(infos[0], BEVDetPreprocess(input_size=(48, 144)))
    assert tuple(x["image"].shape) == (6, 3, 48, 144)
    np.testing.assert_allclose(x["post_rots"][0, 0, 0].item(), 144 / 160, rtol=1e-6)
    # so a point lands on the same network pixel as with the full-size rig and full-size images
    full_x = prepare_bevdet_inputs(infos[0], BEVDetPreprocess(input_size=(48, 144), src_size=(900, 1600)), load=False)
    p = np.array([1.0, 0.5, 10.0])
    small = x["post_rots"][1].double().numpy() @ K[1] @ p / 10
    big = full_x["post_rots"][1].double().numpy() @ full[1] @ p / 10
    np.testing.assert_allclose(small[:2], big[:2], rtol=1e-5)


def test_devkit_loads_tables_and_gt(world_dir):
    from nuscenes.eval.common.loaders import add_center_dist, filter_eval_boxes, load_gt
    from nuscenes.eval.detection.config import config_factory
    from nuscenes.eval.detection.data_classes import DetectionBox
    from nuscenes.nuscenes import NuScenes

    nusc = NuScenes(version=syn.SYNTHETIC_VERSION, dataroot=str(world_dir), verbose=False)
    assert len(nusc.scene) == 2 and len(nusc.sample) == 6
    assert {s["name"] for s in nusc.scene} <= set(syn._scene_names())
    gt = load_gt(nusc, "val", DetectionBox)
    assert len(gt.sample_tokens) == 6
    boxes = [b for t in gt.sample_tokens for b in gt[t]]
    assert {b.detection_name for b in boxes} <= set(CLASS_NAMES) and len(boxes) > 50
    # velocities come from the annotation chain: finite for boxes seen in 2+ frames, moving ones non-zero
    assert np.isfinite([b.velocity for b in boxes]).all(axis=1).mean() > 0.8
    assert any(np.linalg.norm(b.velocity) > 1.0 for b in boxes if np.isfinite(b.velocity).all())
    filtered = filter_eval_boxes(nusc, add_center_dist(nusc, gt), config_factory("detection_cvpr_2019").class_range)
    kept = sum(len(filtered[t]) for t in filtered.sample_tokens)
    assert 0 < kept < len(boxes)  # far and fully occluded (0 LiDAR points) boxes are dropped
    # the CAN bus expansion reads the pose stream
    from nuscenes.can_bus.can_bus_api import NuScenesCanBus

    poses = NuScenesCanBus(dataroot=str(world_dir)).get_messages(nusc.scene[0]["name"], "pose")
    assert {"pos", "orientation", "vel", "accel", "rotation_rate", "utime"} <= set(poses[0])


def test_lidar_points_match_counts(world_dir, infos):
    info = infos[1]
    pts = np.fromfile(info["lidar_path"], dtype=np.float32).reshape(-1, 5)
    assert len(pts) == info["num_lidar_pts"].sum() > 0
    # every return lies inside (or on) its box; each box holds exactly its count
    corners = gt_box_corners(info["gt_boxes"])
    inside = np.zeros((len(pts), len(corners)), dtype=bool)
    for j, box in enumerate(info["gt_boxes"]):
        heading = -box[6] - np.pi / 2
        rel = pts[:, :3] - box[:3]
        c, s = math.cos(heading), math.sin(heading)
        x, y = c * rel[:, 0] + s * rel[:, 1], -s * rel[:, 0] + c * rel[:, 1]
        tol = 1e-3
        inside[:, j] = (np.abs(x) <= box[4] / 2 + tol) & (np.abs(y) <= box[3] / 2 + tol) & (
            np.abs(rel[:, 2]) <= box[5] / 2 + tol)
    assert inside.any(axis=1).all()
    assert (inside.sum(0) >= info["num_lidar_pts"]).all()
    assert (info["valid_flag"] == (info["num_lidar_pts"] > 0)).all()


def _surface_points(corners: np.ndarray, n: int = 12) -> np.ndarray:
    g = np.linspace(0.0, 1.0, n)
    a, b = (x.ravel()[:, None] for x in np.meshgrid(g, g))
    faces = [(0, 1, 2, 3), (4, 5, 6, 7), (0, 1, 5, 4), (1, 2, 6, 5), (2, 3, 7, 6), (3, 0, 4, 7)]
    pts = []
    for f in faces:
        p0, p1, p2, p3 = corners[list(f)]
        pts.append((1 - a) * (1 - b) * p0 + a * (1 - b) * p1 + a * b * p2 + (1 - a) * b * p3)
    return np.concatenate(pts)


def test_gt_boxes_project_where_rendered(world_dir, infos):
    """GT boxes projected with lidar2img land on the object's pixels; elsewhere is only ground or sky."""
    world = syn.SyntheticWorld(LENGTHS, seed=0, image_size=SIZE)
    h, w = SIZE
    centres_checked = 0
    for k, info in enumerate(infos):
        images = load_images(info)
        backgrounds = world.render(k // 3, k % 3, objects=False)
        proj = lidar2img(info)
        corners = gt_box_corners(info["gt_boxes"])
        for cam in range(6):
            covered = np.zeros((h, w), dtype=bool)
            rects = []
            for j in range(len(corners)):
                q = np.c_[_surface_points(corners[j]), np.ones(12 * 12 * 6)] @ proj[cam].T
                front = q[:, 2] > 0.05
                if not front.any():
                    rects.append(None)
                    continue
                u, v = q[front, 0] / q[front, 2], q[front, 1] / q[front, 2]
                u0, u1 = math.floor(u.min()) - 1, math.ceil(u.max()) + 1
                v0, v1 = math.floor(v.min()) - 1, math.ceil(v.max()) + 1
                covered[max(v0, 0):max(v1 + 1, 0), max(u0, 0):max(u1 + 1, 0)] = True
                rects.append((u0, v0, u1, v1, q[:, 2].min()))
            diff = np.abs(images[cam].astype(int) - backgrounds[cam].astype(int)).max(-1)
            # outside every projected box, the image is exactly the object-free render
            assert (diff[~covered] == 0).all(), f"sample {k} camera {cam}"
            for j, r in enumerate(rects):
                if r is None or r[4] < 0.5 or r[2] - r[0] < 8 or r[3] - r[1] < 8:
                    continue
                if any(o is not None and i != j and not (o[2] < r[0] or o[0] > r[2] or o[3] < r[1] or o[1] > r[3])
                       for i, o in enumerate(rects)):
                    continue  # overlaps another box: the centre may be occluded
                q = proj[cam] @ np.r_[info["gt_boxes"][j, :3], 1.0]
                u, v = int(round(q[0] / q[2])), int(round(q[1] / q[2]))
                if not (0 <= u < w and 0 <= v < h):
                    continue
                px = images[cam][v, u].astype(float)
                base = np.array(syn.CLASS_COLORS[info["gt_names"][j]], dtype=float)
                cosine = px @ base / (np.linalg.norm(px) * np.linalg.norm(base))
                assert cosine > 0.97 and diff[v, u] > 20, (info["gt_names"][j], px, base)
                centres_checked += 1
    assert centres_checked >= 5


def test_world_is_nuscenes_like():
    rig = syn.nuscenes_rig()
    assert np.allclose(rig.intrinsics[0, 0, 0], 1266.4) and np.allclose(rig.intrinsics[3, 0, 0], 809.2)
    assert (np.abs(rig.translations[:, 2] - 1.5) < 0.1).all()
    yaws = [math.degrees(math.atan2(r[1, 2], r[0, 2])) for r in rig.rotations]  # optical axis in the ego frame
    assert np.allclose(yaws, [0, -55, 55, 180, 110, -110], atol=1e-6) or np.allclose(
        np.mod(yaws, 360), np.mod([0, -55, 55, 180, 110, -110], 360), atol=1e-6)
    world = syn.SyntheticWorld([20, 20, 20, 20], seed=1, image_size=SIZE)
    names = {a.cls for s in world.scenes for a in s.actors}
    assert names == set(CLASS_NAMES)
    speeds = {s.ego_speed for s in world.scenes}
    assert len(speeds) == 4 and max(speeds) > 2.0


def test_missing_nuscenes_devkit_is_named(monkeypatch):
    """The synthetic world takes its scene names from the devkit's splits; without the devkit (a bare GPU
    machine) the error says what to install instead of a ModuleNotFoundError from inside."""
    import sys

    from bevdeploy.data.synthetic import _scene_names

    monkeypatch.setitem(sys.modules, "nuscenes.utils.splits", None)  # makes the import fail
    with pytest.raises(ImportError, match="install nuscenes-devkit"):
        _scene_names()

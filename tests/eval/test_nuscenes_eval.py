"""nuScenes evaluation on a hand-made world with known answers.

The world is a two-sample scene written as nuScenes v1.0 tables (so the devkit's ``NuScenes``,
``load_gt`` and ``DetectionEval`` run on it) plus the info records that mmdet3d's converter would make
of it (boxes from ``get_sample_data`` in the LiDAR frame, ``-yaw - pi/2``, velocity rotated into the
LiDAR frame). Every class has objects; extras exercise the devkit's filters (a car beyond 50 m, a
pedestrian without points, a bicycle in a bicycle rack).
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from nuscenes import NuScenes
from nuscenes.eval.common.config import config_factory
from nuscenes.eval.common.loaders import load_prediction
from nuscenes.eval.detection.constants import DETECTION_NAMES, TP_METRICS
from nuscenes.eval.detection.data_classes import DetectionBox
from nuscenes.utils.data_classes import Box
from pyquaternion import Quaternion

from bevdeploy.data.nuscenes import TABLE_NAMES
from bevdeploy.eval.nuscenes import (
    CLASS_NAMES,
    NuScenesEvaluator,
    boxes_from_info,
    fidelity_metrics,
    from_nusc_results,
    load_results,
    to_nusc_results,
)

VERSION = "v1.0-testworld"
SPLIT = "testworld_val"
LIDAR2EGO_T = [0.94, 0.0, 1.84]
LIDAR2EGO_Q = list(Quaternion(axis=[0, 0, 1], angle=-math.pi / 2).elements)  # LiDAR x to the right, as nuScenes
# A real nuScenes LiDAR mount: -90 deg about z plus a small tilt.
TILTED_LIDAR2EGO_Q = [0.7077955119163518, -0.006492242056004365, 0.010646214713995808, -0.7063073142877817]
EGO_POSES = [((600.0, 1200.0, 0.0), 0.7), ((602.0, 1201.0, 0.0), 0.75)]  # (translation, yaw) per sample
DT = 0.5  # s between the two samples

CATEGORY = {
    "car": "vehicle.car",
    "truck": "vehicle.truck",
    "construction_vehicle": "vehicle.construction",
    "bus": "vehicle.bus.rigid",
    "trailer": "vehicle.trailer",
    "barrier": "movable_object.barrier",
    "motorcycle": "vehicle.motorcycle",
    "bicycle": "vehicle.bicycle",
    "pedestrian": "human.pedestrian.adult",
    "traffic_cone": "movable_object.trafficcone",
    "rack": "static_object.bicycle_rack",
}
NAME_MAPPING = {v: k for k, v in CATEGORY.items() if k != "rack"}  # the converter's NameMapping, restricted
# (name, class, ego-frame xy at sample 0, yaw rel. to ego 0, wlh, global velocity, attribute, lidar points)
OBJECTS = [
    ("car_moving", "car", (10, 3), 0.2, (1.9, 4.5, 1.6), (4.0, 1.0), "vehicle.moving", 120),
    ("car_parked", "car", (-15, -6), 1.0, (1.9, 4.4, 1.5), (0.0, 0.0), "vehicle.parked", 40),
    ("truck", "truck", (20, -8), -0.5, (2.5, 7.0, 3.0), (0.05, 0.0), "vehicle.parked", 60),
    ("cv", "construction_vehicle", (-25, 10), 2.0, (2.8, 6.0, 3.2), (0.0, 0.0), "vehicle.parked", 30),
    ("bus", "bus", (30, 5), 0.1, (2.9, 11.0, 3.5), (0.1, 0.0), "vehicle.stopped", 200),
    ("trailer", "trailer", (-30, -12), -2.5, (2.5, 10.0, 3.8), (0.0, 0.0), "vehicle.parked", 25),
    ("barrier", "barrier", (8, -10), 0.4, (2.0, 0.5, 1.0), (0.0, 0.0), "", 12),
    ("motorcycle", "motorcycle", (12, 12), 1.2, (0.8, 2.1, 1.5), (3.0, 3.0), "cycle.with_rider", 15),
    ("bicycle", "bicycle", (-6, 14), -1.0, (0.6, 1.7, 1.3), (0.0, 0.0), "cycle.without_rider", 9),
    ("ped_walking", "pedestrian", (5, 6), 0.0, (0.7, 0.7, 1.75), (1.0, 0.5), "pedestrian.moving", 30),
    ("ped_standing", "pedestrian", (-4, -3), 0.0, (0.6, 0.7, 1.7), (0.0, 0.0), "pedestrian.standing", 22),
    ("cone", "traffic_cone", (7, -2), 0.0, (0.4, 0.4, 1.0), (0.0, 0.0), "", 5),
    # Extras that the devkit's filters drop from ground truth (and our conversion / filters from predictions).
    ("car_far", "car", (70, 0), 0.0, (1.9, 4.5, 1.6), (0.0, 0.0), "vehicle.parked", 3),
    ("ped_no_points", "pedestrian", (3, -12), 0.0, (0.7, 0.7, 1.7), (0.0, 0.0), "pedestrian.standing", 0),
    ("bicycle_in_rack", "bicycle", (-8, 20), 0.3, (0.6, 1.7, 1.3), (0.0, 0.0), "cycle.without_rider", 7),
    ("rack", "rack", (-8, 20), 0.3, (2.0, 3.0, 1.2), (0.0, 0.0), "", 30),
]
EVALUATED = {o[0] for o in OBJECTS} - {"car_far", "ped_no_points", "bicycle_in_rack", "rack"}


def _quat(yaw: float) -> list[float]:
    return list(Quaternion(axis=[0, 0, 1], angle=yaw).elements)


def _write_world(root) -> None:
    """The world as nuScenes v1.0 tables, one scene of two key frames, with a custom split."""
    tables: dict[str, list] = {name: [] for name in TABLE_NAMES}
    tables["category"] = [{"token": f"cat-{k}", "name": v, "description": ""} for k, v in CATEGORY.items()]
    attributes = [
        "vehicle.moving",
        "vehicle.parked",
        "vehicle.stopped",
        "cycle.with_rider",
        "cycle.without_rider",
        "pedestrian.moving",
        "pedestrian.standing",
        "pedestrian.sitting_lying_down",
    ]
    tables["attribute"] = [{"token": f"attr-{a}", "name": a, "description": ""} for a in attributes]
    tables["visibility"] = [{"token": "4", "level": "v80-100", "description": ""}]
    tables["sensor"] = [{"token": "sensor-lidar", "channel": "LIDAR_TOP", "modality": "lidar"}]
    tables["calibrated_sensor"] = [
        {
            "token": "cs-lidar",
            "sensor_token": "sensor-lidar",
            "translation": LIDAR2EGO_T,
            "rotation": LIDAR2EGO_Q,
            "camera_intrinsic": [],
        }
    ]
    tables["log"] = [{"token": "log-0", "logfile": "", "vehicle": "", "date_captured": "", "location": "test"}]
    tables["map"] = [
        {"token": "map-0", "log_tokens": ["log-0"], "category": "semantic_prior", "filename": "maps/m.png"}
    ]
    samples = [f"sample-{i}" for i in range(2)]
    tables["scene"] = [
        {
            "token": "scene-0",
            "log_token": "log-0",
            "nbr_samples": 2,
            "first_sample_token": samples[0],
            "last_sample_token": samples[1],
            "name": "scene-testworld-0",
            "description": "",
        }
    ]
    ego0 = Quaternion(axis=[0, 0, 1], angle=EGO_POSES[0][1])
    for i, (token, (translation, yaw)) in enumerate(zip(samples, EGO_POSES, strict=True)):
        timestamp = 1_000_000 + int(i * DT * 1e6)
        tables["sample"].append(
            {
                "token": token,
                "timestamp": timestamp,
                "scene_token": "scene-0",
                "prev": samples[i - 1] if i else "",
                "next": samples[i + 1] if i == 0 else "",
            }
        )
        tables["ego_pose"].append(
            {"token": f"pose-{i}", "timestamp": timestamp, "translation": list(translation), "rotation": _quat(yaw)}
        )
        tables["sample_data"].append(
            {
                "token": f"lidar-{i}",
                "sample_token": token,
                "ego_pose_token": f"pose-{i}",
                "calibrated_sensor_token": "cs-lidar",
                "timestamp": timestamp,
                "fileformat": "pcd",
                "is_key_frame": True,
                "height": 0,
                "width": 0,
                "filename": f"samples/LIDAR_TOP/{i}.pcd.bin",
                "prev": f"lidar-{i - 1}" if i else "",
                "next": "lidar-1" if i == 0 else "",
            }
        )
    for name, cls, xy, yaw, wlh, velocity, attribute, points in OBJECTS:
        tables["instance"].append(
            {
                "token": f"inst-{name}",
                "category_token": f"cat-{cls}",
                "nbr_annotations": 2,
                "first_annotation_token": f"ann-{name}-0",
                "last_annotation_token": f"ann-{name}-1",
            }
        )
        start = ego0.rotate([xy[0], xy[1], 0.0]) + np.array(EGO_POSES[0][0])
        for i in range(2):
            center = start + i * DT * np.array([velocity[0], velocity[1], 0.0])
            center[2] = wlh[2] / 2
            tables["sample_annotation"].append(
                {
                    "token": f"ann-{name}-{i}",
                    "sample_token": samples[i],
                    "instance_token": f"inst-{name}",
                    "visibility_token": "4",
                    "attribute_tokens": [f"attr-{attribute}"] if attribute else [],
                    "translation": center.tolist(),
                    "size": list(wlh),
                    "rotation": _quat(EGO_POSES[0][1] + yaw),
                    "prev": f"ann-{name}-0" if i else "",
                    "next": f"ann-{name}-1" if i == 0 else "",
                    "num_lidar_pts": points,
                    "num_radar_pts": 0,
                }
            )
    (root / VERSION).mkdir(parents=True)
    (root / "maps").mkdir()
    (root / "maps" / "m.png").write_bytes(b"")
    for name, rows in tables.items():
        (root / VERSION / f"{name}.json").write_text(json.dumps(rows))
    (root / VERSION / "splits.json").write_text(json.dumps({SPLIT: ["scene-testworld-0"]}))


def _infos(nusc: NuScenes) -> list[dict]:
    """Info records as mmdet3d's nuScenes converter makes them (GT part), plus our optional gt_attributes."""
    infos = []
    for sample in nusc.sample:
        lidar_token = sample["data"]["LIDAR_TOP"]
        sd = nusc.get("sample_data", lidar_token)
        cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
        pose = nusc.get("ego_pose", sd["ego_pose_token"])
        _, boxes, _ = nusc.get_sample_data(lidar_token)
        anns = [nusc.get("sample_annotation", token) for token in sample["anns"]]
        locs = np.array([b.center for b in boxes]).reshape(-1, 3)
        dims = np.array([b.wlh for b in boxes]).reshape(-1, 3)
        rots = np.array([b.orientation.yaw_pitch_roll[0] for b in boxes]).reshape(-1, 1)
        velocity = np.array([nusc.box_velocity(token)[:2] for token in sample["anns"]])
        l2e = Quaternion(cs["rotation"]).rotation_matrix
        e2g = Quaternion(pose["rotation"]).rotation_matrix
        for i in range(len(velocity)):
            velo = np.array([*velocity[i], 0.0]) @ np.linalg.inv(e2g).T @ np.linalg.inv(l2e).T
            velocity[i] = velo[:2]
        attribute_names = {a["token"]: a["name"] for a in nusc.attribute}
        infos.append(
            {
                "token": sample["token"],
                "lidar2ego_translation": cs["translation"],
                "lidar2ego_rotation": cs["rotation"],
                "ego2global_translation": pose["translation"],
                "ego2global_rotation": pose["rotation"],
                "gt_boxes": np.concatenate([locs, dims, -rots - np.pi / 2], axis=1),
                "gt_names": np.array([NAME_MAPPING.get(b.name, b.name) for b in boxes]),
                "gt_velocity": velocity.reshape(-1, 2),
                "num_lidar_pts": np.array([a["num_lidar_pts"] for a in anns]),
                "num_radar_pts": np.array([a["num_radar_pts"] for a in anns]),
                "gt_attributes": np.array(
                    [attribute_names[a["attribute_tokens"][0]] if a["attribute_tokens"] else "" for a in anns]
                ),
                "_object": [a["instance_token"][len("inst-") :] for a in anns],  # test bookkeeping only
            }
        )
    return infos


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("nuscenes_world")
    _write_world(root)
    nusc = NuScenes(version=VERSION, dataroot=str(root), verbose=False)
    return nusc, _infos(nusc)


def _keep(info: dict, objects=EVALUATED) -> dict:
    """The info record restricted to some objects (GT arrays sliced alike)."""
    mask = np.array([name in objects for name in info["_object"]])
    out = dict(info)
    for key in ("gt_boxes", "gt_names", "gt_velocity", "num_lidar_pts", "num_radar_pts", "gt_attributes"):
        out[key] = info[key][mask]
    out["_object"] = [n for n, m in zip(info["_object"], mask, strict=True) if m]
    return out


def _predictions(infos, perturb=None, objects=EVALUATED):
    """Perfect detections of the evaluated objects (distinct scores), optionally perturbed in place."""
    out = []
    for info in infos:
        boxes, labels = boxes_from_info(_keep(info, objects))
        if perturb is not None:
            perturb(boxes)
        scores = 0.9 - 0.01 * np.arange(len(boxes))
        out.append((info["token"], boxes, scores, labels, info))
    return out


def _evaluate(gt, predictions, **kwargs) -> dict:
    split = SPLIT if isinstance(gt, NuScenes) else None
    evaluator = NuScenesEvaluator(gt=gt, split=split, verbose=False, **kwargs)
    for prediction in predictions:
        evaluator.process(*prediction)
    return evaluator.evaluate()


def _gt(world, source):
    nusc, infos = world
    return nusc if source == "nusc" else infos


# --------------------------------------------------------------------------------------------------
# Conversion.
# --------------------------------------------------------------------------------------------------


def test_class_names_are_bevformers_order():
    assert tuple(CLASS_NAMES) == (
        "car",
        "truck",
        "construction_vehicle",
        "bus",
        "trailer",
        "barrier",
        "motorcycle",
        "bicycle",
        "pedestrian",
        "traffic_cone",
    )


def _random_boxes(rng, n):
    boxes = np.zeros((n, 9))
    boxes[:, :2] = rng.uniform(-60, 60, (n, 2))
    boxes[:, 2] = rng.uniform(-3, 1, n)
    boxes[:, 3:6] = rng.uniform(0.3, 5, (n, 3))
    boxes[:, 6] = rng.uniform(-np.pi, np.pi, n)
    boxes[:, 7:9] = rng.uniform(-3, 3, (n, 2)) * (rng.random((n, 1)) > 0.3)
    return boxes


def _tilted_info(token="sample-x"):
    return {
        "token": token,
        "lidar2ego_translation": [0.985, 0.0, 1.84],
        "lidar2ego_rotation": TILTED_LIDAR2EGO_Q,
        "ego2global_translation": [411.3, 1180.9, 0.0],
        "ego2global_rotation": [0.5720, -0.0016, 0.0117, -0.8201],
    }  # a real (slightly off-unit) ego pose


def test_to_nusc_results_follows_mmdet3d_box_by_box():
    """Same records as mmdet3d v0.17's output_to_nusc_box -> lidar_nusc_box_to_global -> _format_bbox path."""
    rng = np.random.default_rng(0)
    boxes, info = _random_boxes(rng, 200), _tilted_info()
    scores, labels = rng.random(200), rng.integers(0, 10, 200)
    records = to_nusc_results("sample-x", torch.from_numpy(boxes).float(), scores, torch.from_numpy(labels), info)
    boxes = torch.from_numpy(boxes).float().double().numpy()  # what the float32 model output holds
    class_range = config_factory("detection_cvpr_2019").class_range
    expected = []
    for i in range(len(boxes)):
        x, y, z, w, length, h, yaw, vx, vy = boxes[i]
        box = Box(
            [x, y, z + h / 2],
            [w, length, h],
            Quaternion(axis=[0, 0, 1], radians=-yaw - np.pi / 2),
            label=labels[i],
            score=scores[i],
            velocity=(vx, vy, 0.0),
        )
        box.rotate(Quaternion(info["lidar2ego_rotation"]))
        box.translate(np.array(info["lidar2ego_translation"]))
        name = CLASS_NAMES[labels[i]]
        if np.linalg.norm(box.center[:2]) > class_range[name]:
            continue
        box.rotate(Quaternion(info["ego2global_rotation"]))
        box.translate(np.array(info["ego2global_translation"]))
        moving = np.hypot(box.velocity[0], box.velocity[1]) > 0.2
        if moving and name in ("car", "construction_vehicle", "bus", "truck", "trailer"):
            attribute = "vehicle.moving"
        elif moving and name in ("bicycle", "motorcycle"):
            attribute = "cycle.with_rider"
        elif not moving and name == "pedestrian":
            attribute = "pedestrian.standing"
        elif not moving and name == "bus":
            attribute = "vehicle.stopped"
        else:
            attribute = {
                "car": "vehicle.parked",
                "pedestrian": "pedestrian.moving",
                "trailer": "vehicle.parked",
                "truck": "vehicle.parked",
                "bus": "vehicle.moving",
                "motorcycle": "cycle.without_rider",
                "construction_vehicle": "vehicle.parked",
                "bicycle": "cycle.without_rider",
                "barrier": "",
                "traffic_cone": "",
            }[name]
        expected.append((box, name, attribute))
    assert 20 < len(expected) < 200, "the range filter must drop some boxes and keep most"
    assert len(records) == len(expected)
    attributes_seen = set()
    for record, (box, name, attribute) in zip(records, expected, strict=True):
        assert record["sample_token"] == "sample-x" and record["detection_name"] == name
        np.testing.assert_allclose(record["translation"], box.center, rtol=0, atol=1e-9)
        np.testing.assert_allclose(record["size"], box.wlh, rtol=0, atol=1e-12)
        np.testing.assert_allclose(record["rotation"], box.orientation.elements, rtol=0, atol=1e-12)
        np.testing.assert_allclose(record["velocity"], box.velocity[:2], rtol=0, atol=1e-12)
        assert record["detection_score"] == pytest.approx(box.score) and isinstance(record["detection_score"], float)
        assert record["attribute_name"] == attribute
        attributes_seen.add(attribute)
    assert len(attributes_seen) >= 6, "the attribute rule was exercised on too few cases"
    json.dumps(records)  # plain Python values only


@pytest.mark.parametrize("tilted", [False, True])
def test_round_trip_model_boxes_global_and_back(tilted):
    rng = np.random.default_rng(1)
    boxes = _random_boxes(rng, 100)
    boxes[:, :2] = rng.uniform(-20, 20, (100, 2))  # inside every class range (30 m at least)
    scores, labels = rng.random(100), rng.integers(0, 10, 100)
    info = _tilted_info()
    if not tilted:
        info["lidar2ego_rotation"], info["ego2global_rotation"] = LIDAR2EGO_Q, _quat(2.1)
    records = to_nusc_results("sample-x", boxes, scores, labels, info)
    assert len(records) == 100
    back, back_scores, back_labels = from_nusc_results(records, info)
    np.testing.assert_allclose(back[:, :6], boxes[:, :6], rtol=0, atol=1e-9)
    yaw_error = np.angle(np.exp(1j * (back[:, 6] - boxes[:, 6])))
    np.testing.assert_allclose(yaw_error, 0, atol=1e-9)
    assert ((back[:, 6] >= -np.pi) & (back[:, 6] < np.pi)).all()
    # A tilted mount gives a horizontal velocity a z component in the global frame, which records drop.
    np.testing.assert_allclose(
        back[:, 7:9], boxes[:, 7:9], rtol=0, atol=1e-2 if tilted else 1e-9
    )  # error ~ tilt^2 * |v|
    if tilted:
        assert np.abs(back[:, 7:9] - boxes[:, 7:9]).max() > 1e-6
    np.testing.assert_allclose(back_scores, scores)
    np.testing.assert_array_equal(back_labels, labels)


def test_info_ground_truth_converts_to_the_devkit_annotations(world):
    """boxes_from_info inverts the converter: its boxes, converted, are the sample_annotation records."""
    nusc, infos = world
    for info in infos:
        boxes, labels = boxes_from_info(info)
        objects = [o for o, n in zip(info["_object"], info["gt_names"], strict=True) if n in CLASS_NAMES]
        assert len(boxes) == len(objects) == len(OBJECTS) - 1  # all but the bicycle rack
        records = to_nusc_results(info["token"], boxes, np.ones(len(boxes)), labels, info, filter_range=False)
        for record, obj in zip(records, objects, strict=True):
            ann = nusc.get("sample_annotation", f"ann-{obj}-{info['token'][-1]}")
            np.testing.assert_allclose(record["translation"], ann["translation"], atol=1e-9)
            np.testing.assert_allclose(record["size"], ann["size"], atol=1e-12)
            np.testing.assert_allclose(
                Quaternion(record["rotation"]).rotation_matrix, Quaternion(ann["rotation"]).rotation_matrix, atol=1e-9
            )
            np.testing.assert_allclose(record["velocity"], nusc.box_velocity(ann["token"])[:2], atol=1e-9)
            expected_attribute = ann["attribute_tokens"][0][len("attr-") :] if ann["attribute_tokens"] else ""
            assert record["attribute_name"] == expected_attribute, obj  # the world follows mmdet3d's speed rule


# --------------------------------------------------------------------------------------------------
# Metrics with known answers.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["nusc", "infos"])
def test_perfect_predictions_score_one(world, source):
    out = _evaluate(_gt(world, source), _predictions(world[1]))
    assert out["mAP"] == pytest.approx(1.0, abs=1e-12)
    for key in ("mATE", "mASE", "mAOE", "mAVE", "mAAE"):
        assert out[key] == pytest.approx(0.0, abs=1e-9), key
    assert out["NDS"] == pytest.approx(1.0, abs=1e-9)
    assert out["num_samples"] == 2 and out["num_gt_boxes"] == 2 * len(EVALUATED) == out["num_pred_boxes"]
    assert all(row["AP"] == pytest.approx(1.0) for row in out["per_class"].values())
    assert math.isnan(out["per_class"]["traffic_cone"]["orient_err"])
    assert math.isnan(out["per_class"]["barrier"]["vel_err"]) and out["per_class"]["barrier"]["orient_err"] < 1e-9


def test_info_ground_truth_without_attributes_has_attribute_error_one(world):
    """Info records carry no attributes: every attribute error is NaN, which the devkit's cummean turns into 1."""
    infos = [{k: v for k, v in info.items() if k != "gt_attributes"} for info in world[1]]
    out = _evaluate(infos, _predictions(world[1]))
    assert out["mAP"] == pytest.approx(1.0) and out["mAVE"] == pytest.approx(0.0, abs=1e-9)
    assert out["mAAE"] == 1.0
    assert out["NDS"] == pytest.approx((5 * 1.0 + 4 * 1.0 + 0.0) / 10)


def _shift_x(d):
    def perturb(boxes):
        boxes[:, 0] += d

    return perturb


@pytest.mark.parametrize("source", ["nusc", "infos"])
def test_half_metre_shift_gives_ate_half(world, source):
    out = _evaluate(_gt(world, source), _predictions(world[1], _shift_x(0.5)))
    assert out["mATE"] == pytest.approx(0.5, abs=1e-9)
    for row in out["per_class"].values():
        assert row["AP@1.0"] == row["AP@2.0"] == row["AP@4.0"] == pytest.approx(1.0)
        assert row["trans_err"] == pytest.approx(0.5, abs=1e-9)
    assert out["mASE"] == pytest.approx(0.0, abs=1e-9) and out["mAOE"] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("d", [0.3, 0.7, 1.5, 3.0])
def test_shift_against_the_distance_thresholds(world, d):
    """A prediction matches when its centre is closer than the threshold: AP is 1 below it, 0 above it."""
    out = _evaluate(world[1], _predictions(world[1], _shift_x(d)))
    thresholds = (0.5, 1.0, 2.0, 4.0)
    for row in out["per_class"].values():
        for th in thresholds:
            assert row[f"AP@{th}"] == pytest.approx(float(d < th)), (d, th)
    assert out["mAP"] == pytest.approx(np.mean([d < th for th in thresholds]))
    if d < 2.0:  # the TP errors are taken at 2 m
        assert out["mATE"] == pytest.approx(d, abs=1e-9)
        assert out["NDS"] == pytest.approx((5 * out["mAP"] + max(0.0, 1 - d) + 4) / 10, abs=1e-9)
    else:  # no true positive at 2 m: every TP error is 1 (calc_tp), every TP score 0
        assert out["mATE"] == out["mASE"] == out["mAOE"] == out["mAVE"] == out["mAAE"] == 1.0
        assert out["NDS"] == pytest.approx(5 * out["mAP"] / 10)


@pytest.mark.parametrize("source", ["nusc", "infos"])
def test_yaw_offset_gives_aoe(world, source):
    theta = 0.3

    def perturb(boxes):
        boxes[:, 6] += theta

    out = _evaluate(_gt(world, source), _predictions(world[1], perturb))
    assert out["mAOE"] == pytest.approx(theta, abs=1e-9)
    assert out["per_class"]["barrier"]["orient_err"] == pytest.approx(theta, abs=1e-9)  # period pi, theta < pi/2
    assert out["mAP"] == pytest.approx(1.0) and out["mATE"] == pytest.approx(0.0, abs=1e-9)


def test_scale_and_velocity_errors(world):
    s, dv = 1.2, (0.3, 0.4)

    def perturb(boxes):
        boxes[:, 3:6] *= s
        boxes[:, 7:9] += dv

    out = _evaluate(world[0], _predictions(world[1], perturb))
    assert out["mASE"] == pytest.approx(1 - 1 / s**3, abs=1e-9)  # scale IoU of aligned boxes = 1 / s^3
    assert out["mAVE"] == pytest.approx(0.5, abs=1e-9)
    assert out["mAP"] == pytest.approx(1.0) and out["mATE"] == pytest.approx(0.0, abs=1e-9)


def _expected_with_missing_classes(present):
    """The devkit's numbers for perfect predictions when only ``present`` classes have ground truth."""
    nan_tp = {"traffic_cone": ("attr_err", "vel_err", "orient_err"), "barrier": ("attr_err", "vel_err")}
    errors = {}
    for metric in TP_METRICS:
        values = [0.0 if name in present else 1.0 for name in DETECTION_NAMES if metric not in nan_tp.get(name, ())]
        errors[metric] = float(np.mean(values))
    m_ap = len(present) / len(DETECTION_NAMES)
    nds = (5 * m_ap + sum(1 - e for e in errors.values())) / 10
    return m_ap, errors, nds


def test_missing_classes_score_ap_zero_and_tp_error_one(world):
    """A class without ground truth is not NaN in the devkit: AP 0 and TP errors 1 (only cone/barrier NaNs)."""
    present = {"car", "pedestrian", "barrier"}
    objects = {o for o in EVALUATED if dict((x[0], x[1]) for x in OBJECTS)[o] in present}
    infos = [_keep(info, objects) for info in world[1]]
    out = _evaluate(infos, _predictions(infos))
    m_ap, errors, nds = _expected_with_missing_classes(present)
    assert out["mAP"] == pytest.approx(m_ap)
    assert errors["orient_err"] == pytest.approx(6 / 9) and errors["vel_err"] == pytest.approx(6 / 8)
    shorts = {"trans_err": "mATE", "scale_err": "mASE", "orient_err": "mAOE", "vel_err": "mAVE", "attr_err": "mAAE"}
    for metric, short in shorts.items():
        assert out[short] == pytest.approx(errors[metric], abs=1e-9), short
    assert out["NDS"] == pytest.approx(nds, abs=1e-9)
    assert out["per_class"]["truck"]["AP"] == 0.0 and out["per_class"]["truck"]["trans_err"] == 1.0

    only_present = _evaluate(infos, _predictions(infos), present_classes_only=True)
    assert set(only_present["per_class"]) == present
    assert only_present["NDS"] == pytest.approx(1.0, abs=1e-9) and only_present["mAP"] == pytest.approx(1.0)


def _noisy_predictions(infos, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for token, boxes, _, labels, info in _predictions(infos, objects={o[0] for o in OBJECTS}):
        n = len(boxes)
        boxes[:, :2] += rng.normal(0, 0.8, (n, 2))
        boxes[:, 3:6] *= rng.uniform(0.8, 1.25, (n, 3))
        boxes[:, 6] += rng.normal(0, 0.4, n)
        boxes[:, 7:9] += rng.normal(0, 0.5, (n, 2))
        extra = _random_boxes(rng, 15)
        extra[:, :2] = rng.uniform(-35, 35, (15, 2))
        boxes = np.concatenate([boxes, extra])
        labels = np.concatenate([labels, rng.integers(0, 10, 15)])
        out.append((token, boxes, rng.random(len(boxes)), labels, info))
    return out


def test_matches_devkit_detection_eval(world, tmp_path):
    """Both GT sources give the numbers of the devkit's DetectionEval on the written results file."""
    from nuscenes.eval.detection.evaluate import DetectionEval

    nusc, infos = world
    predictions = _noisy_predictions(infos)
    path = tmp_path / "results_nusc.json"
    ours = _evaluate(nusc, predictions, output_path=path)
    assert ours["results_path"] == str(path)
    devkit = DetectionEval(
        nusc, config_factory("detection_cvpr_2019"), str(path), SPLIT, str(tmp_path / "out"), verbose=False
    )
    metrics, _ = devkit.evaluate()
    assert 0.1 < metrics.mean_ap < 0.9, "the noisy predictions must be neither perfect nor hopeless"
    assert ours["num_gt_boxes"] == len(devkit.gt_boxes.all) == 2 * len(EVALUATED)
    assert ours["num_pred_boxes"] == len(devkit.pred_boxes.all)
    from_infos = _evaluate(infos, predictions)
    for out in (ours, from_infos):
        assert out["NDS"] == pytest.approx(metrics.nd_score, abs=1e-9)
        assert out["mAP"] == pytest.approx(metrics.mean_ap, abs=1e-9)
        for name in DETECTION_NAMES:
            for th in (0.5, 1.0, 2.0, 4.0):
                assert out["per_class"][name][f"AP@{th}"] == pytest.approx(metrics.get_label_ap(name, th), abs=1e-9)
            for metric in TP_METRICS:
                np.testing.assert_allclose(
                    out["per_class"][name][metric],
                    metrics.get_label_tp(name, metric),
                    atol=1e-9,
                    err_msg=f"{name} {metric}",
                )


def test_results_file_is_the_official_format(world, tmp_path):
    evaluator = NuScenesEvaluator(gt=world[0], split=SPLIT, verbose=False)
    for prediction in _noisy_predictions(world[1]):
        evaluator.process(*prediction)
    path = evaluator.write_results(tmp_path / "r" / "results.json")
    boxes, meta = load_prediction(str(path), 500, DetectionBox)
    assert meta == {"use_camera": True, "use_lidar": False, "use_radar": False, "use_map": False, "use_external": True}
    assert set(boxes.sample_tokens) == {"sample-0", "sample-1"}
    assert len(boxes.all) == sum(len(r) for r in evaluator.results.values()) > 0
    assert load_results(path) == json.loads(path.read_text())["results"]
    evaluator.reset()
    assert evaluator.results == {}
    with pytest.raises(ValueError, match="no sample was processed"):
        evaluator.evaluate()


# --------------------------------------------------------------------------------------------------
# Fidelity.
# --------------------------------------------------------------------------------------------------


def _results(predictions):
    # No range filter: a perturbed box must not cross a class range and leave one side only.
    return {token: to_nusc_results(token, b, s, c, info, filter_range=False) for token, b, s, c, info in predictions}


def test_fidelity_identical_detections_score_one(world):
    reference = _noisy_predictions(world[1], seed=3)
    for _, _, scores, _, _ in reference:
        scores[:] = np.where(np.arange(len(scores)) % 3 == 0, 0.1, 0.5 + 0.4 * scores)  # low-score clutter too
    ref = _results(reference)
    out = fidelity_metrics(copy.deepcopy(ref), {"meta": {}, "results": ref}, score_threshold=0.3)
    assert out["NDS"] == pytest.approx(1.0, abs=1e-9) and out["mAP"] == pytest.approx(1.0)
    for key in ("mATE", "mASE", "mAOE", "mAVE", "mAAE"):
        assert out[key] == pytest.approx(0.0, abs=1e-9)
    assert out["num_reference_boxes"] == sum(r["detection_score"] >= 0.3 for rs in ref.values() for r in rs)
    assert out["num_reference_boxes"] == out["num_pred_boxes"] < sum(len(rs) for rs in ref.values())


def test_fidelity_counts_a_score_crossing_the_threshold(world):
    reference = _noisy_predictions(world[1], seed=6)
    ref = _results(reference)
    engine = copy.deepcopy(ref)
    crossed = max(engine["sample-0"], key=lambda r: r["detection_score"])
    crossed["detection_score"] = 0.29  # a deployment error that drops a confident box below 0.3
    out = fidelity_metrics(engine, ref, score_threshold=0.3)
    assert out["num_pred_boxes"] == out["num_reference_boxes"] - 1
    assert out["per_class"][crossed["detection_name"]]["AP"] < 1.0
    assert out["mATE"] == pytest.approx(0.0, abs=1e-12) and out["NDS"] < 1.0


def test_fidelity_drops_with_perturbed_detections(world, tmp_path):
    reference = _noisy_predictions(world[1], seed=4)
    ref = _results(reference)
    shifted = [(t, b + np.array([0.3, 0, 0, 0, 0, 0, 0.2, 0, 0]), s, c, i) for t, b, s, c, i in reference]
    path = tmp_path / "engine.json"
    path.write_text(json.dumps({"meta": {}, "results": _results(shifted)}))
    out = fidelity_metrics(path, ref, score_threshold=0.0)
    assert out["mATE"] == pytest.approx(0.3, abs=1e-6) and out["mAOE"] == pytest.approx(0.2, abs=1e-6)
    assert out["mAP"] == pytest.approx(1.0)  # 0.3 m is inside every distance threshold
    assert out["NDS"] == pytest.approx((5 * 1.0 + (1 - 0.3) + 1 + (1 - 0.2) + 1 + 1) / 10, abs=1e-6)


def test_fidelity_refuses_mismatched_inputs(world):
    ref = _results(_noisy_predictions(world[1], seed=5))
    with pytest.raises(ValueError, match="same samples"):
        fidelity_metrics({"sample-0": ref["sample-0"]}, ref)
    with pytest.raises(ValueError, match="no reference detection"):
        fidelity_metrics(ref, ref, score_threshold=2.0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fidelity_metrics("/nonexistent/results.json", ref)


# --------------------------------------------------------------------------------------------------
# Errors.
# --------------------------------------------------------------------------------------------------


def test_bad_detections_are_refused():
    info, boxes = _tilted_info(), _random_boxes(np.random.default_rng(2), 4)
    ok = dict(scores=np.ones(4), labels=np.zeros(4, dtype=np.int64), info=info)
    with pytest.raises(ValueError, match=r"boxes must have shape \[N, 9\]"):
        to_nusc_results("s", boxes[:, :7], **ok)
    with pytest.raises(ValueError, match="scores and labels must have shape"):
        to_nusc_results("s", boxes, np.ones(3), ok["labels"], info)
    with pytest.raises(ValueError, match="labels must be integers"):
        to_nusc_results("s", boxes, ok["scores"], np.array([0, 1, 2, 10]), info)
    bad = boxes.copy()
    bad[1, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        to_nusc_results("s", bad, **ok)
    bad = boxes.copy()
    bad[0, 4] = 0.0
    with pytest.raises(ValueError, match="sizes"):
        to_nusc_results("s", bad, **ok)
    with pytest.raises(ValueError, match="lacks key"):
        to_nusc_results("s", boxes, ok["scores"], ok["labels"], {"token": "s"})
    with pytest.raises(ValueError, match="sample_token"):
        to_nusc_results("", boxes, **ok)
    half = torch.from_numpy(boxes).bfloat16()  # engines may hand over low-precision tensors
    records = to_nusc_results("s", half, ok["scores"], ok["labels"], info, filter_range=False)
    np.testing.assert_allclose([r["size"] for r in records], half[:, 3:6].double().numpy())


def test_evaluator_refuses_misuse(world):
    nusc, infos = world
    with pytest.raises(ValueError, match="split must name"):
        NuScenesEvaluator(gt=nusc)
    with pytest.raises(ValueError, match="split applies"):
        NuScenesEvaluator(gt=infos, split="val")
    with pytest.raises(ValueError, match="gt must be"):
        NuScenesEvaluator(gt=42)
    with pytest.raises(ValueError, match="not found"):  # the devkit's message for an unknown custom split
        evaluator = NuScenesEvaluator(gt=nusc, split="no_such_split", verbose=False)
        evaluator.process(*_predictions(infos)[0])
        evaluator.evaluate()
    evaluator = NuScenesEvaluator(gt=nusc, split=SPLIT, verbose=False)
    token, boxes, scores, labels, info = _predictions(infos)[0]
    evaluator.process(token, boxes, scores, labels, info)
    with pytest.raises(ValueError, match="already processed"):
        evaluator.process(token, boxes, scores, labels, info)
    with pytest.raises(ValueError, match="not of sample_token"):
        evaluator.process("sample-1", boxes, scores, labels, info)
    with pytest.raises(ValueError, match="the devkit allows 500"):
        evaluator.add_results("sample-1", [{}] * 501)
    stranger = dict(info, token="sample-unknown")
    evaluator.process("sample-unknown", boxes, scores, labels, stranger)
    with pytest.raises(ValueError, match="have no ground truth"):
        evaluator.evaluate()

"""nuScenes detection evaluation: model boxes -> official results JSON -> NDS / mAP by the devkit's own code.

Our numbers must be the numbers users of the official models know, so every step mirrors public code:

1. **Conversion** (mmdet3d v0.17 ``output_to_nusc_box``, ``lidar_nusc_box_to_global`` and
   ``NuScenesDataset._format_bbox``, which BEVFormer's dataset inherits). Model boxes are in the LiDAR
   frame in mmdet3d 0.17's convention: ``x, y, z`` of the BOTTOM centre, ``w, l, h``, ``yaw`` and
   ``vx, vy``, with ``yaw = -yaw_nuscenes - pi / 2`` (the SECOND convention the info converter writes
   into ``gt_boxes``). A nuScenes record takes the gravity centre (z + h / 2), the size unchanged as
   nuScenes ``wlh``, the quaternion of ``yaw_nuscenes`` about z, and the velocity ``(vx, vy, 0)``;
   the box is moved by lidar2ego, dropped when its ego-frame xy distance exceeds its class range
   (``detection_cvpr_2019``), then moved by ego2global. The attribute follows from the class and the
   speed (> 0.2 m/s: moving), with mmdet3d's ``DefaultAttribute`` otherwise.
2. **Ground truth**, from one of three sources: a devkit ``NuScenes`` plus a split (``load_gt``, as
   ``DetectionEval`` does; real nuScenes and the synthetic world, written in the v1.0 table format),
   info records alone (``gt_boxes`` / ``gt_velocity`` / ``gt_names`` taken back to the global frame),
   or the detections of a reference model (:func:`fidelity_metrics`).
3. **Metrics**: ``add_center_dist``, ``filter_eval_boxes``, then ``accumulate`` / ``calc_ap`` /
   ``calc_tp`` into ``DetectionMetrics``, the loop of ``DetectionEval.evaluate`` without its plots.

A class without any ground-truth box scores AP 0 and TP errors 1 in the devkit (``accumulate`` returns
``no_predictions``), so the official mAP over 10 classes of a world with 3 classes is at most 0.3; only
the TP errors that the devkit hard-codes (traffic_cone: attr/vel/orient; barrier: attr/vel) are NaN
and skipped by ``nanmean``. ``present_classes_only`` averages over the classes that have ground truth.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from nuscenes import NuScenes
from nuscenes.eval.common.config import config_factory
from nuscenes.eval.common.data_classes import EvalBoxes
from nuscenes.eval.common.loaders import (
    add_center_dist,
    filter_eval_boxes,
    get_samples_of_custom_split,
    load_gt,
    load_gt_of_sample_tokens,
)
from nuscenes.eval.detection.algo import accumulate, calc_ap, calc_tp
from nuscenes.eval.detection.constants import DETECTION_NAMES, TP_METRICS
from nuscenes.eval.detection.data_classes import (
    DetectionBox,
    DetectionConfig,
    DetectionMetricDataList,
    DetectionMetrics,
)
from nuscenes.utils.splits import is_predefined_split
from tqdm import tqdm

from bevdeploy.data.nuscenes import CLASS_NAMES

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_ATTRIBUTE",
    "RESULTS_META",
    "NuScenesEvaluator",
    "boxes_from_info",
    "detection_metrics",
    "fidelity_metrics",
    "from_nusc_results",
    "load_results",
    "save_results",
    "summarize",
    "to_nusc_results",
]

#: Attribute of a detection when the speed rule does not decide it (mmdet3d ``NuScenesDataset.DefaultAttribute``).
DEFAULT_ATTRIBUTE: dict[str, str] = {
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
}
#: mmdet3d's speed rule: above this speed (m/s, global xy) vehicles are moving and cycles have riders.
MOVING_SPEED = 0.2
_MOVING_ATTRIBUTE = {
    **{name: "vehicle.moving" for name in ("car", "construction_vehicle", "bus", "truck", "trailer")},
    "bicycle": "cycle.with_rider",
    "motorcycle": "cycle.with_rider",
}
_STILL_ATTRIBUTE = {"pedestrian": "pedestrian.standing", "bus": "vehicle.stopped"}

#: ``meta`` of the results file: BEVFormer's ``input_modality`` (cameras only, ImageNet-pretrained backbone).
RESULTS_META: dict[str, bool] = {
    "use_camera": True,
    "use_lidar": False,
    "use_radar": False,
    "use_map": False,
    "use_external": True,
}
#: Short names of the mean TP errors, as mmdet3d reports them.
TP_METRIC_NAMES = {
    "trans_err": "mATE",
    "scale_err": "mASE",
    "orient_err": "mAOE",
    "vel_err": "mAVE",
    "attr_err": "mAAE",
}
#: TP errors the devkit sets to NaN per class (``DetectionEval.evaluate``): undefined for those classes.
_NAN_TP = {"traffic_cone": ("attr_err", "vel_err", "orient_err"), "barrier": ("attr_err", "vel_err")}
_BIKE_RACK = "static_object.bicycle_rack"
_POSE_KEYS = ("lidar2ego_translation", "lidar2ego_rotation", "ego2global_translation", "ego2global_rotation")


# --------------------------------------------------------------------------------------------------
# Geometry: quaternions (w, x, y, z, Hamilton product, as pyquaternion) on arrays of boxes.
# --------------------------------------------------------------------------------------------------


def _to_numpy(x: Any, name: str, dtype: type = np.float64) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor (any float dtype, bf16 included), without importing torch here
        x = x.detach().cpu()
        x = (x.double() if x.is_floating_point() else x).numpy()
    try:
        return np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be array-like of {np.dtype(dtype).name}, got {type(x).__name__}: {e}") from None


def _unit_quaternion(q: Any, name: str) -> np.ndarray:
    q = _to_numpy(q, name).reshape(-1)
    norm = np.linalg.norm(q) if q.shape == (4,) else 0.0
    if not norm > 0:
        raise ValueError(f"{name} must be a non-zero quaternion (w, x, y, z), got {q.tolist()}")
    return q / norm


def _quat_mul(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    pw, px, py, pz = np.moveaxis(p, -1, 0)
    qw, qx, qy, qz = np.moveaxis(q, -1, 0)
    return np.stack(
        [
            pw * qw - px * qx - py * qy - pz * qz,
            pw * qx + px * qw + py * qz - pz * qy,
            pw * qy - px * qz + py * qw + pz * qx,
            pw * qz + px * qy - py * qx + pz * qw,
        ],
        axis=-1,
    )


def _quat_conj(q: np.ndarray) -> np.ndarray:
    return q * np.array([1.0, -1.0, -1.0, -1.0])


def _quat_matrix(q: np.ndarray) -> np.ndarray:
    w, x, y, z = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def _yaw_quat(yaw: np.ndarray) -> np.ndarray:
    zero = np.zeros_like(yaw)
    return np.stack([np.cos(yaw / 2), zero, zero, np.sin(yaw / 2)], axis=-1)


def _quat_yaw(q: np.ndarray) -> np.ndarray:
    """Yaw of the rotated x axis projected on the xy plane (the devkit's ``quaternion_yaw``)."""
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = np.moveaxis(q, -1, 0)
    return np.arctan2(2 * (x * y + w * z), 1 - 2 * (y * y + z * z))


class _Poses:
    """lidar2ego and ego2global of one info record, as unit quaternions, matrices and translations."""

    def __init__(self, info: Mapping[str, Any]):
        if not isinstance(info, Mapping):
            raise ValueError(f"info must be an info record (dict), got {type(info).__name__}")
        missing = [key for key in _POSE_KEYS if key not in info]
        if missing:
            raise ValueError(f"info record {info.get('token', '?')!r} lacks key(s) {missing}")
        self.l2e_q = _unit_quaternion(info["lidar2ego_rotation"], "info['lidar2ego_rotation']")
        self.e2g_q = _unit_quaternion(info["ego2global_rotation"], "info['ego2global_rotation']")
        self.l2e_t = _to_numpy(info["lidar2ego_translation"], "info['lidar2ego_translation']").reshape(3)
        self.e2g_t = _to_numpy(info["ego2global_translation"], "info['ego2global_translation']").reshape(3)
        self.l2e_r = _quat_matrix(self.l2e_q)
        self.e2g_r = _quat_matrix(self.e2g_q)
        self.l2g_q = _quat_mul(self.e2g_q, self.l2e_q)


def _lidar_to_global(
    center: np.ndarray, yaw_nusc: np.ndarray, velocity: np.ndarray, poses: _Poses
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """LiDAR-frame gravity centres [N, 3], nuScenes yaws [N], velocities [N, 2] -> global frame.

    Returns (translation [N, 3], rotation [N, 4], velocity [N, 2], ego-frame centre [N, 3]): the
    sequence ``Box.rotate(lidar2ego)``, ``translate``, ``rotate(ego2global)``, ``translate`` of mmdet3d,
    on all boxes at once (a velocity is rotated as ``(vx, vy, 0)``; NaN stays NaN).
    """
    ego = center @ poses.l2e_r.T + poses.l2e_t
    translation = ego @ poses.e2g_r.T + poses.e2g_t
    rotation = _quat_mul(poses.l2g_q, _yaw_quat(yaw_nusc))
    vel3 = np.concatenate([velocity, np.zeros_like(velocity[:, :1])], axis=1)
    vel_global = vel3 @ poses.l2e_r.T @ poses.e2g_r.T
    return translation, rotation, vel_global[:, :2], ego


def _attribute_names(names: Sequence[str], velocity: np.ndarray) -> list[str]:
    speed = np.sqrt(velocity[:, 0] ** 2 + velocity[:, 1] ** 2)
    rule = [_MOVING_ATTRIBUTE if s > MOVING_SPEED else _STILL_ATTRIBUTE for s in speed.tolist()]
    return [table.get(name, DEFAULT_ATTRIBUTE[name]) for table, name in zip(rule, names, strict=True)]


# --------------------------------------------------------------------------------------------------
# Model boxes <-> nuScenes records.
# --------------------------------------------------------------------------------------------------


def _check_detections(boxes: Any, scores: Any, labels: Any, num_classes: int) -> tuple[np.ndarray, ...]:
    boxes = _to_numpy(boxes, "boxes")
    scores = _to_numpy(scores, "scores")
    labels = _to_numpy(labels, "labels", dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 9:
        raise ValueError(
            f"boxes must have shape [N, 9] (x, y, z_bottom, w, l, h, yaw, vx, vy), got {list(boxes.shape)}"
        )
    n = len(boxes)
    if scores.shape != (n,) or labels.shape != (n,):
        raise ValueError(f"scores and labels must have shape [{n}], got {list(scores.shape)} and {list(labels.shape)}")
    if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
        raise ValueError("boxes and scores must be finite (the devkit refuses NaN), got NaN/inf")
    if (boxes[:, 3:6] <= 0).any():
        raise ValueError(f"box sizes (w, l, h) must be > 0, got min {boxes[:, 3:6].min():.3g}")
    if ((labels != np.round(labels)) | (labels < 0) | (labels >= num_classes)).any():
        raise ValueError(f"labels must be integers in [0, {num_classes}), got {np.unique(labels).tolist()[:10]}")
    return boxes, scores, labels.astype(np.int64)


def to_nusc_results(
    sample_token: str,
    boxes: Any,
    scores: Any,
    labels: Any,
    info: Mapping[str, Any],
    *,
    class_names: Sequence[str] = CLASS_NAMES,
    class_range: Mapping[str, float] | None = None,
    filter_range: bool = True,
) -> list[dict[str, Any]]:
    """Model boxes of one sample -> nuScenes detection records in the global frame (mmdet3d v0.17's way).

    Args:
        sample_token: The sample's token (key of the results file).
        boxes (Tensor|ndarray[N, 9]): x, y, z (bottom centre), w, l, h, yaw, vx, vy in the LiDAR frame,
            mmdet3d 0.17 ``LiDARInstance3DBoxes`` convention (what BEVFormer's NMSFreeCoder returns).
        scores (Tensor|ndarray[N]): Detection scores.
        labels (Tensor|ndarray[N]): Indices into ``class_names``.
        info: The sample's info record (``lidar2ego_*`` and ``ego2global_*`` are read).
        class_names: Names of the model's classes, in label order (BEVFormer's order by default).
        class_range: Max ego-frame xy distance per class; ``detection_cvpr_2019``'s when None.
        filter_range: Drop boxes beyond their class range, as mmdet3d does before writing results.

    Returns:
        One dict per kept box: ``sample_token``, ``translation`` (gravity centre), ``size`` (w, l, h),
        ``rotation`` (w, x, y, z), ``velocity`` (vx, vy), ``detection_name``, ``detection_score``,
        ``attribute_name``; all plain Python values, ready for ``json.dump``.
    """
    if not isinstance(sample_token, str) or not sample_token:
        raise ValueError(f"sample_token must be a non-empty str, got {sample_token!r}")
    boxes, scores, labels = _check_detections(boxes, scores, labels, len(class_names))
    names = [class_names[i] for i in labels.tolist()]
    unknown = sorted(set(names) - set(DETECTION_NAMES))
    if unknown:
        raise ValueError(f"class_names must be nuScenes detection classes {DETECTION_NAMES}, got {unknown}")
    poses = _Poses(info)
    center = boxes[:, :3] + np.stack([np.zeros(len(boxes)), np.zeros(len(boxes)), boxes[:, 5] / 2], axis=1)
    translation, rotation, velocity, ego = _lidar_to_global(center, -boxes[:, 6] - np.pi / 2, boxes[:, 7:9], poses)
    keep = np.ones(len(boxes), dtype=bool)
    if filter_range:
        ranges = _detection_config().class_range if class_range is None else class_range
        missing = sorted(set(names) - set(ranges))
        if missing:
            raise ValueError(f"class_range has no range for {missing}")
        limit = np.array([ranges[name] for name in names], dtype=np.float64)
        keep = np.linalg.norm(ego[:, :2], axis=1) <= limit
    attributes = _attribute_names(names, velocity)
    return [
        {
            "sample_token": sample_token,
            "translation": translation[i].tolist(),
            "size": boxes[i, 3:6].tolist(),
            "rotation": rotation[i].tolist(),
            "velocity": velocity[i].tolist(),
            "detection_name": names[i],
            "detection_score": float(scores[i]),
            "attribute_name": attributes[i],
        }
        for i in np.flatnonzero(keep).tolist()
    ]


def from_nusc_results(
    records: Sequence[Mapping[str, Any]], info: Mapping[str, Any], *, class_names: Sequence[str] = CLASS_NAMES
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """nuScenes records (global frame) -> model boxes of one sample: the inverse of :func:`to_nusc_results`.

    Yaw comes back in [-pi, pi); position, size and yaw round-trip exactly. The velocity round-trips
    exactly when lidar2ego and ego2global rotate about z only: records keep the global (vx, vy) and
    drop the z component that a tilted sensor gives a horizontal velocity.

    Args:
        records: Detection records of one sample (``translation``, ``size``, ``rotation``,
            ``velocity``, ``detection_name``, ``detection_score``).
        info: The sample's info record.
        class_names: Label order of the returned boxes.

    Returns:
        (boxes ndarray[N, 9] float64, scores ndarray[N] float64, labels ndarray[N] int64).
    """
    poses = _Poses(info)
    n = len(records)
    try:
        translation = np.array([r["translation"] for r in records], dtype=np.float64).reshape(n, 3)
        size = np.array([r["size"] for r in records], dtype=np.float64).reshape(n, 3)
        rotation = np.array([r["rotation"] for r in records], dtype=np.float64).reshape(n, 4)
        velocity = np.array([r.get("velocity", (0.0, 0.0)) for r in records], dtype=np.float64).reshape(n, 2)
        scores = np.array([r.get("detection_score", -1.0) for r in records], dtype=np.float64).reshape(n)
        labels = np.array([list(class_names).index(r["detection_name"]) for r in records], dtype=np.int64)
    except (KeyError, ValueError) as e:
        raise ValueError(f"records must be nuScenes detection records with known detection_name: {e!r}") from None
    lidar = ((translation - poses.e2g_t) @ poses.e2g_r - poses.l2e_t) @ poses.l2e_r
    yaw_nusc = _quat_yaw(_quat_mul(_quat_conj(poses.l2g_q), rotation))
    yaw = np.mod(-yaw_nusc - np.pi / 2 + np.pi, 2 * np.pi) - np.pi
    vel3 = np.concatenate([velocity, np.zeros((n, 1))], axis=1)
    vel_lidar = vel3 @ poses.e2g_r @ poses.l2e_r
    lidar[:, 2] -= size[:, 2] / 2
    boxes = np.concatenate([lidar, size, yaw[:, None], vel_lidar[:, :2]], axis=1)
    return boxes, scores, labels


def boxes_from_info(
    info: Mapping[str, Any], *, class_names: Sequence[str] = CLASS_NAMES
) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth of an info record -> model boxes (what a perfect model would output).

    ``gt_boxes`` hold the gravity centre (nuScenes box centre) in the LiDAR frame with the converter's
    ``-yaw - pi/2``; model boxes hold the bottom centre in the same convention. Boxes whose name is not
    in ``class_names`` are dropped; a NaN velocity (no neighbouring annotation) becomes 0, as
    mmdet3d's ``get_ann_info`` does. No point-count or ``valid_flag`` filtering.

    Returns:
        (boxes ndarray[M, 9] float64, labels ndarray[M] int64).
    """
    gt_boxes, names, velocity = _info_gt_arrays(info)
    keep = np.isin(names, np.asarray(list(class_names)))
    boxes = np.concatenate([gt_boxes[keep], np.nan_to_num(velocity[keep], nan=0.0)], axis=1)
    boxes[:, 2] -= boxes[:, 5] / 2
    labels = np.array([list(class_names).index(name) for name in names[keep].tolist()], dtype=np.int64)
    return boxes, labels


def _info_gt_arrays(info: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    for key in ("gt_boxes", "gt_names"):
        if key not in info:
            raise ValueError(f"info record {info.get('token', '?')!r} lacks key {key!r} (ground truth)")
    gt_boxes = _to_numpy(info["gt_boxes"], "info['gt_boxes']")
    names = np.asarray(info["gt_names"]).reshape(-1).astype(str)
    if gt_boxes.size == 0:
        gt_boxes = gt_boxes.reshape(0, 7)
    if gt_boxes.ndim != 2 or gt_boxes.shape != (len(names), 7):
        raise ValueError(
            f"info['gt_boxes'] must have shape [{len(names)}, 7] (one row per gt_names), got {list(gt_boxes.shape)}"
        )
    velocity = info.get("gt_velocity")
    velocity = (
        np.zeros((len(names), 2)) if velocity is None else _to_numpy(velocity, "info['gt_velocity']").reshape(-1, 2)
    )
    if len(velocity) != len(names):
        raise ValueError(f"info['gt_velocity'] must have shape [{len(names)}, 2], got {list(velocity.shape)}")
    return gt_boxes, names, velocity


# --------------------------------------------------------------------------------------------------
# Results files.
# --------------------------------------------------------------------------------------------------


def save_results(
    results: Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike, meta: Mapping[str, Any] | None = None
) -> Path:
    """Write the official results file ``{"meta": ..., "results": {sample_token: [records]}}``.

    Args:
        results: Records per sample token (every evaluated sample, even without detections).
        path: Output file; parent folders are created.
        meta: Modality flags; :data:`RESULTS_META` (BEVFormer's) when None.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"meta": dict(RESULTS_META if meta is None else meta), "results": dict(results)}, f)
    return path


def load_results(results: str | os.PathLike | Mapping[str, Any], name: str = "results") -> dict[str, list[dict]]:
    """Records per sample token from a results file, a results-file dict, or a ``{token: [records]}`` dict."""
    if isinstance(results, (str, os.PathLike)):
        path = Path(results)
        if not path.is_file():
            raise FileNotFoundError(f"{name}: results file {str(path)!r} does not exist")
        with open(path) as f:
            results = json.load(f)
    if isinstance(results, list):  # what eval --results writes for a 2D model
        raise ValueError(f"{name} is a COCO results list (a 2D detector's), not a nuScenes results file: read it "
                         "with 2D data (synthetic2d:N or coco:PATH)")
    if not isinstance(results, Mapping):
        raise ValueError(f"{name} must be a results path or dict, got {type(results).__name__}")
    if "results" in results and isinstance(results["results"], Mapping):
        results = results["results"]
    for token, records in results.items():
        if not isinstance(records, (list, tuple)):
            raise ValueError(f"{name}[{token!r}] must be a list of detection records, got {type(records).__name__}")
    return {token: list(records) for token, records in results.items()}


# --------------------------------------------------------------------------------------------------
# Metrics (DetectionEval.evaluate without plots).
# --------------------------------------------------------------------------------------------------

_CONFIG_CACHE: dict[str, DetectionConfig] = {}


def _detection_config(config: str | DetectionConfig = "detection_cvpr_2019") -> DetectionConfig:
    if isinstance(config, DetectionConfig):
        return config
    if not isinstance(config, str) or not config.startswith("detection_"):
        raise ValueError(
            f"config must be a DetectionConfig or a devkit config name like 'detection_cvpr_2019', got {config!r}"
        )
    if config not in _CONFIG_CACHE:
        try:
            _CONFIG_CACHE[config] = config_factory(config)
        except AssertionError as e:
            raise ValueError(f"config {config!r}: {e}") from None
    return _CONFIG_CACHE[config]


def detection_metrics(
    gt_boxes: EvalBoxes,
    pred_boxes: EvalBoxes,
    config: str | DetectionConfig = "detection_cvpr_2019",
    class_names: Sequence[str] | None = None,
    verbose: bool = False,
) -> tuple[DetectionMetrics, DetectionMetricDataList]:
    """The metric step of the devkit's ``DetectionEval.evaluate`` on already filtered boxes.

    Args:
        gt_boxes: Ground truth (``DetectionBox`` per sample token, filtered).
        pred_boxes: Predictions, same sample tokens, filtered.
        config: Devkit config name or object.
        class_names: Classes to score and average over (default: the config's 10). A subset is set as
            the config copy's ``class_names``, which ``DetectionMetrics`` averages the TP errors over.
        verbose: Progress bar over classes.

    Returns:
        (DetectionMetrics, DetectionMetricDataList), as ``DetectionEval.evaluate`` returns.
    """
    start = time.time()
    cfg = _detection_config(config)
    names = list(cfg.class_names) if class_names is None else list(class_names)
    unknown = sorted(set(names) - set(cfg.class_names))
    if unknown or not names:
        raise ValueError(f"class_names must be a non-empty subset of {list(cfg.class_names)}, got {names}")
    cfg = DetectionConfig.deserialize(cfg.serialize())
    cfg.class_names = names
    metric_data = DetectionMetricDataList()
    for name in tqdm(names, desc="nuScenes metrics", disable=not verbose, leave=False):
        for dist_th in cfg.dist_ths:
            metric_data.set(name, dist_th, accumulate(gt_boxes, pred_boxes, name, cfg.dist_fcn_callable, dist_th))
    metrics = DetectionMetrics(cfg)
    for name in names:
        for dist_th in cfg.dist_ths:
            metrics.add_label_ap(
                name, dist_th, calc_ap(metric_data[(name, dist_th)], cfg.min_recall, cfg.min_precision)
            )
        for metric_name in TP_METRICS:
            if metric_name in _NAN_TP.get(name, ()):
                tp = np.nan
            else:
                tp = calc_tp(metric_data[(name, cfg.dist_th_tp)], cfg.min_recall, metric_name)
            metrics.add_label_tp(name, metric_name, tp)
    metrics.add_runtime(time.time() - start)
    return metrics, metric_data


def summarize(metrics: DetectionMetrics) -> dict[str, Any]:
    """DetectionMetrics -> ``{"NDS", "mAP", "mATE", ..., "mAAE", "per_class": {name: {...}}, "eval_time"}``.

    ``per_class[name]`` holds ``AP`` (mean over distance thresholds), ``AP@<th>`` per threshold and
    the TP errors under the devkit's names (``trans_err``, ...; NaN where the devkit defines none).
    """
    tp_errors = metrics.tp_errors
    out: dict[str, Any] = {"NDS": float(metrics.nd_score), "mAP": float(metrics.mean_ap)}
    out.update({short: float(tp_errors[name]) for name, short in TP_METRIC_NAMES.items()})
    mean_dist_aps = metrics.mean_dist_aps
    per_class = {}
    for name in metrics.cfg.class_names:
        row = {"AP": float(mean_dist_aps[name])}
        row.update({f"AP@{th}": float(metrics.get_label_ap(name, th)) for th in metrics.cfg.dist_ths})
        row.update({m: float(metrics.get_label_tp(name, m)) for m in TP_METRICS})
        per_class[name] = row
    out["per_class"] = per_class
    out["eval_time"] = metrics.eval_time
    return out


def _filter(tables: Any, boxes: EvalBoxes, class_range: Mapping[str, float], verbose: bool) -> EvalBoxes:
    # The devkit's filter cannot name the box class when no sample has a box; nothing to filter then.
    if not any(len(b) for b in boxes.boxes.values()):
        return boxes
    return filter_eval_boxes(tables, boxes, class_range, verbose=verbose)


def _present_classes(gt_boxes: EvalBoxes, class_names: Sequence[str]) -> list[str]:
    present = {box.detection_name for box in gt_boxes.all}
    return [name for name in class_names if name in present]


def _eval_boxes(results: Mapping[str, Sequence[Mapping[str, Any]]], name: str) -> EvalBoxes:
    try:
        return EvalBoxes.deserialize(results, DetectionBox)
    except (AssertionError, KeyError, TypeError) as e:
        raise ValueError(f"{name}: not valid nuScenes detection records: {e!r}") from None


def fidelity_metrics(
    pred_results: str | os.PathLike | Mapping[str, Any],
    reference_results: str | os.PathLike | Mapping[str, Any],
    *,
    score_threshold: float = 0.3,
    present_classes_only: bool = True,
    config: str | DetectionConfig = "detection_cvpr_2019",
) -> dict[str, Any]:
    """Score an engine's detections against the PyTorch FP32 detections of the same model, as ground truth.

    Deployment (export, compilation, fp16, INT8) should change nothing, so the FP32 model's own boxes
    are the target: the reference detections with ``detection_score >= score_threshold`` become
    ground-truth boxes (with their velocity and attribute), the engine detections above the same
    threshold are the predictions, and the devkit's metrics do the rest. It needs no labels, so random
    or untrained weights still give a measure, and it isolates what deployment changed from what the
    model gets wrong. Identical detections give NDS 1 and mAP 1 exactly; that is why the predictions
    are thresholded too: the devkit's precision interpolation charges false positives ranked after full
    recall to the last recall bin, so the low-score clutter of identical outputs would cost AP. A box
    whose score crosses the threshold in deployment counts as a miss or a false positive. No distance
    filter is applied: both sets were range-filtered by :func:`to_nusc_results` and carry no ego pose.

    Args:
        pred_results: The engine's results (file path, results-file dict, or ``{token: [records]}``).
        reference_results: The FP32 reference's results, same sample tokens.
        score_threshold: Reference detections at or above it become ground truth; engine detections
            at or above it are scored.
        present_classes_only: Average over the classes the reference detects (a class it never
            detects says nothing about deployment; counting it as AP 0 would keep identical outputs
            below 1). False gives the devkit's 10-class averages.
        config: Devkit config name or object (distance thresholds, TP threshold).

    Returns:
        :func:`summarize`'s dict plus ``num_samples``, ``num_reference_boxes``, ``num_pred_boxes``,
        ``score_threshold``.
    """
    pred = load_results(pred_results, "pred_results")
    ref = load_results(reference_results, "reference_results")
    if set(pred) != set(ref):
        only_pred, only_ref = sorted(set(pred) - set(ref)), sorted(set(ref) - set(pred))
        raise ValueError(
            f"pred_results and reference_results must cover the same samples: {len(only_pred)} only in pred "
            f"(e.g. {only_pred[:2]}), {len(only_ref)} only in reference (e.g. {only_ref[:2]})"
        )
    if not pred:
        raise ValueError("pred_results and reference_results hold no samples")
    ref_boxes = _eval_boxes(ref, "reference_results")
    pred_boxes = _eval_boxes(pred, "pred_results")
    gt, kept = EvalBoxes(), EvalBoxes()
    for token in ref:
        kept.add_boxes(token, [box for box in pred_boxes[token] if box.detection_score >= score_threshold])
        gt.add_boxes(
            token,
            [
                DetectionBox(
                    sample_token=token,
                    translation=box.translation,
                    size=box.size,
                    rotation=box.rotation,
                    velocity=box.velocity,
                    detection_name=box.detection_name,
                    attribute_name=box.attribute_name,
                )
                for box in ref_boxes[token]
                if box.detection_score >= score_threshold
            ],
        )
    cfg = _detection_config(config)
    names = _present_classes(gt, list(cfg.class_names)) if present_classes_only else None
    if names == [] or not gt.all:
        raise ValueError(f"no reference detection has detection_score >= {score_threshold=}; lower the threshold")
    metrics, _ = detection_metrics(gt, kept, cfg, names)
    out = summarize(metrics)
    out.update(num_samples=len(ref), num_reference_boxes=len(gt.all), num_pred_boxes=len(kept.all))
    out["score_threshold"] = float(score_threshold)
    return out


# --------------------------------------------------------------------------------------------------
# Ground truth from info records (no devkit tables).
# --------------------------------------------------------------------------------------------------


class _InfoTables:
    """The nuScenes table rows that ``add_center_dist`` and ``filter_eval_boxes`` read, from info records.

    Lets the devkit's own functions run on data without devkit tables: the ego pose of the LiDAR
    sample_data (``ego2global_translation``) and the bicycle racks (``gt_names`` keeps unmapped
    categories such as ``static_object.bicycle_rack``, with their boxes).
    """

    def __init__(self) -> None:
        self._tables: dict[str, dict[str, dict]] = {
            "sample": {},
            "sample_data": {},
            "ego_pose": {},
            "sample_annotation": {},
        }

    def add_sample(self, token: str, ego_translation: np.ndarray, racks: Sequence[dict]) -> None:
        lidar, pose = f"{token}/LIDAR_TOP", f"{token}/ego_pose"
        anns = [f"{token}/{_BIKE_RACK}/{i}" for i in range(len(racks))]
        self._tables["sample"][token] = {"token": token, "data": {"LIDAR_TOP": lidar}, "anns": anns}
        self._tables["sample_data"][lidar] = {"token": lidar, "ego_pose_token": pose}
        self._tables["ego_pose"][pose] = {"token": pose, "translation": ego_translation.tolist()}
        for ann, rack in zip(anns, racks, strict=True):
            self._tables["sample_annotation"][ann] = {"token": ann, "category_name": _BIKE_RACK, **rack}

    def get(self, table_name: str, token: str) -> dict:
        return self._tables[table_name][token]


def _gt_from_infos(infos: Sequence[Mapping[str, Any]], verbose: bool) -> tuple[EvalBoxes, _InfoTables]:
    gt, tables = EvalBoxes(), _InfoTables()
    for info in tqdm(infos, desc="ground truth from infos", disable=not verbose, leave=False):
        token = info.get("token") if isinstance(info, Mapping) else None
        if not isinstance(token, str) or not token:
            raise ValueError(f"every info record needs a 'token' (sample token), got {token!r}")
        if token in gt.boxes:
            raise ValueError(f"info records hold sample token {token!r} twice")
        poses = _Poses(info)
        gt_boxes, names, velocity = _info_gt_arrays(info)
        n = len(names)
        if "num_lidar_pts" not in info:
            raise ValueError(f"info record {token!r} lacks key 'num_lidar_pts' (the devkit drops boxes without points)")
        num_pts = _to_numpy(info["num_lidar_pts"], "info['num_lidar_pts']", np.int64).reshape(-1)
        if "num_radar_pts" in info:
            num_pts = num_pts + _to_numpy(info["num_radar_pts"], "info['num_radar_pts']", np.int64).reshape(-1)
        attributes = np.asarray(info.get("gt_attributes", [""] * n)).reshape(-1).astype(str)
        if len(num_pts) != n or len(attributes) != n:
            raise ValueError(f"info record {token!r}: num_lidar_pts/num_radar_pts/gt_attributes must have {n} entries")
        translation, rotation, vel, _ = _lidar_to_global(gt_boxes[:, :3], -gt_boxes[:, 6] - np.pi / 2, velocity, poses)
        boxes, racks = [], []
        for i, name in enumerate(names.tolist()):
            if name in DETECTION_NAMES:
                boxes.append(
                    DetectionBox(
                        sample_token=token,
                        translation=tuple(translation[i].tolist()),
                        size=tuple(gt_boxes[i, 3:6].tolist()),
                        rotation=tuple(rotation[i].tolist()),
                        velocity=tuple(vel[i].tolist()),
                        num_pts=int(num_pts[i]),
                        detection_name=name,
                        attribute_name=str(attributes[i]),
                    )
                )
            elif name == _BIKE_RACK:
                racks.append(
                    {
                        "translation": translation[i].tolist(),
                        "size": gt_boxes[i, 3:6].tolist(),
                        "rotation": rotation[i].tolist(),
                    }
                )
        gt.add_boxes(token, boxes)
        tables.add_sample(token, poses.e2g_t, racks)
    return gt, tables


# --------------------------------------------------------------------------------------------------
# The evaluator.
# --------------------------------------------------------------------------------------------------


class NuScenesEvaluator:
    """nuScenes detection evaluator in detectron2's ``reset`` / ``process`` / ``evaluate`` style.

    Ground truth (``gt``) is either a devkit ``NuScenes`` with ``split`` (official: ``load_gt``, or
    ``load_gt_of_sample_tokens`` for a custom split in ``<dataroot>/<version>/splits.json``, as
    ``DetectionEval``; this serves real nuScenes and the synthetic world written in the same table
    format), or a sequence of info records (global-frame boxes rebuilt from ``gt_boxes``,
    ``gt_velocity``, ``gt_names``, ``num_lidar_pts`` + ``num_radar_pts``, the LiDAR ego pose; the
    attribute from an optional ``gt_attributes`` array, else none, which the devkit scores as
    attribute error 1). The evaluation covers the processed samples: their ground truth, all of it.

    Example::

        evaluator = NuScenesEvaluator(gt=nusc, split="val")
        for info, (boxes, scores, labels) in zip(infos, detections):
            evaluator.process(info["token"], boxes, scores, labels, info)
        metrics = evaluator.evaluate()   # {"NDS": ..., "mAP": ..., "per_class": {...}}

    Args:
        gt: ``NuScenes`` object, or info records (one per sample, ``token`` keyed).
        split: Split name for a ``NuScenes`` ground truth (``val``, ``mini_val``, or a custom one).
        config: Devkit config name or object.
        class_names: The model's classes, in label order.
        present_classes_only: Average over the classes with ground truth in the processed samples
            instead of the devkit's 10 (official numbers need False).
        output_path: Where :meth:`evaluate` writes the results file (not written when None).
        meta: The results file's ``meta``; :data:`RESULTS_META` when None.
        verbose: Progress bars and the devkit's messages.
    """

    def __init__(
        self,
        gt: NuScenes | Sequence[Mapping[str, Any]],
        *,
        split: str | None = None,
        config: str | DetectionConfig = "detection_cvpr_2019",
        class_names: Sequence[str] = CLASS_NAMES,
        present_classes_only: bool = False,
        output_path: str | os.PathLike | None = None,
        meta: Mapping[str, Any] | None = None,
        verbose: bool = True,
    ):
        if isinstance(gt, NuScenes):
            if not isinstance(split, str) or not split:
                raise ValueError(f"split must name the evaluation split of the NuScenes ground truth, got {split!r}")
        elif isinstance(gt, Sequence) and not isinstance(gt, (str, bytes)):
            if split is not None:
                raise ValueError(
                    f"split applies to a NuScenes ground truth only; info records are the split ({split=})"
                )
            if len(gt) == 0:
                raise ValueError("gt holds no info records")
        else:
            raise ValueError(f"gt must be a nuscenes.NuScenes or a sequence of info records, got {type(gt).__name__}")
        self._gt_source = gt
        self.split = split
        self.config = _detection_config(config)
        self.class_names = tuple(class_names)
        self.present_classes_only = present_classes_only
        self.output_path = None if output_path is None else Path(output_path)
        self.meta = dict(RESULTS_META if meta is None else meta)
        self.verbose = verbose
        self._gt: tuple[EvalBoxes, Any] | None = None
        self.reset()

    def reset(self) -> None:
        """Forget processed samples and the last metrics (the loaded ground truth is kept)."""
        self._results: dict[str, list[dict[str, Any]]] = {}
        self.metrics: DetectionMetrics | None = None
        self.metric_data: DetectionMetricDataList | None = None

    def process(self, sample_token: str, boxes: Any, scores: Any, labels: Any, info: Mapping[str, Any]) -> None:
        """Convert one sample's model boxes (see :func:`to_nusc_results`) and keep the records."""
        if isinstance(info, Mapping) and info.get("token", sample_token) != sample_token:
            raise ValueError(f"info is the record of sample {info['token']!r}, not of {sample_token=}")
        records = to_nusc_results(
            sample_token, boxes, scores, labels, info, class_names=self.class_names, class_range=self.config.class_range
        )
        self.add_results(sample_token, records)

    def add_results(self, sample_token: str, records: Sequence[Mapping[str, Any]]) -> None:
        """Keep already converted records of one sample (e.g. read back from a results file)."""
        if sample_token in self._results:
            raise ValueError(f"sample {sample_token!r} was already processed (call reset() between runs)")
        if len(records) > self.config.max_boxes_per_sample:
            raise ValueError(
                f"sample {sample_token!r} has {len(records)} boxes; "
                f"the devkit allows {self.config.max_boxes_per_sample}"
            )
        self._results[sample_token] = [dict(r) for r in records]

    @property
    def results(self) -> dict[str, list[dict[str, Any]]]:
        """The records so far, per sample token (the ``results`` of the results file)."""
        return self._results

    def write_results(self, path: str | os.PathLike) -> Path:
        """Write the official results file of the processed samples."""
        return save_results(self._results, path, self.meta)

    def _ground_truth(self) -> tuple[EvalBoxes, Any]:
        if self._gt is None:
            source = self._gt_source
            if isinstance(source, NuScenes):
                # the devkit's loader shows an unlabelled bar even when not verbose: silence it then
                quiet, before = not self.verbose, os.environ.get("TQDM_DISABLE")
                if quiet:
                    os.environ["TQDM_DISABLE"] = "1"
                try:
                    if is_predefined_split(self.split):
                        boxes = load_gt(source, self.split, DetectionBox, verbose=self.verbose)
                    else:
                        tokens = get_samples_of_custom_split(self.split, source)
                        boxes = load_gt_of_sample_tokens(source, tokens, DetectionBox, verbose=self.verbose)
                except AssertionError as e:
                    raise ValueError(f"split={self.split!r} of NuScenes {source.version!r}: {e}") from None
                finally:
                    if quiet and before is None:
                        os.environ.pop("TQDM_DISABLE", None)
                self._gt = (boxes, source)
            else:
                self._gt = _gt_from_infos(source, self.verbose)
        return self._gt

    def evaluate(self) -> dict[str, Any]:
        """Metrics of the processed samples, as ``DetectionEval`` computes them.

        Returns:
            :func:`summarize`'s dict (``NDS``, ``mAP``, ``mATE`` ... ``mAAE``, ``per_class``,
            ``eval_time``) plus ``num_samples``, ``num_gt_boxes`` and ``num_pred_boxes`` (after the
            devkit's filters) and ``results_path`` (None unless ``output_path`` was given).
        """
        if not self._results:
            raise ValueError("no sample was processed; call process() first")
        all_gt, tables = self._ground_truth()
        unknown = [token for token in self._results if token not in all_gt.boxes]
        if unknown:
            raise ValueError(
                f"{len(unknown)} processed sample(s) have no ground truth in gt/split (e.g. {unknown[:2]})"
            )
        gt = EvalBoxes()
        for token in self._results:
            gt.add_boxes(token, list(all_gt[token]))
        pred = _eval_boxes(self._results, "results")
        gt = _filter(tables, add_center_dist(tables, gt), self.config.class_range, self.verbose)
        pred = _filter(tables, add_center_dist(tables, pred), self.config.class_range, self.verbose)
        names = _present_classes(gt, list(self.config.class_names)) if self.present_classes_only else None
        if names == []:
            raise ValueError(
                "present_classes_only: the processed samples have no ground-truth box left after filtering"
            )
        self.metrics, self.metric_data = detection_metrics(gt, pred, self.config, names, verbose=self.verbose)
        out = summarize(self.metrics)
        out.update(num_samples=len(self._results), num_gt_boxes=len(gt.all), num_pred_boxes=len(pred.all))
        out["results_path"] = None if self.output_path is None else str(self.write_results(self.output_path))
        return out

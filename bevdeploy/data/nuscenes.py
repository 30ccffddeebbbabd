"""nuScenes reader: info records, camera projections and images.

Turns a nuScenes v1.0 dataset (the devkit's JSON tables, the CAN bus expansion and the camera images)
into the per-sample *info records* that BEVFormer's ``nuscenes_infos_temporal_*.pkl`` files hold, so the
models, the evaluation and the synthetic world (which writes the same tables) share one format.

The record follows BEVFormer's ``tools/data_converter/nuscenes_converter.py`` field for field: camera
extrinsics as ``sensor2lidar_rotation/translation`` (``p_lidar = R @ p_cam + T``), GT boxes as
``[x, y, z (box centre), w, l, h, yaw]`` in the LiDAR frame with the converter's yaw ``-rot - pi/2``
(mmdet3d 0.17's LiDAR box convention), velocities rotated into the LiDAR frame, CAN bus vector of 18
values ``pos(3), orientation(4), accel(3), rotation_rate(3), vel(3), 0, 0``. Unlike the converter,
records come back in temporal order (scenes by start time, samples by timestamp) with ``frame_idx``
counted per scene, which is the order BEVFormer's temporal test loop needs.

The constants below are the shared vocabulary of the project (models, eval and data all import them).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from tqdm import tqdm

#: The 10 nuScenes detection classes in BEVFormer's label order (index = model label).
CLASS_NAMES: tuple[str, ...] = (
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

#: The 6 cameras in the order of BEVFormer's / mmdet3d's data converter (image index = position here).
CAMERA_NAMES: tuple[str, ...] = (
    "CAM_FRONT",
    "CAM_FRONT_RIGHT",
    "CAM_FRONT_LEFT",
    "CAM_BACK",
    "CAM_BACK_LEFT",
    "CAM_BACK_RIGHT",
)

#: The devkit's tables that ``nuscenes.NuScenes`` loads (all must exist under ``dataroot/version``).
TABLE_NAMES: tuple[str, ...] = (
    "category",
    "attribute",
    "visibility",
    "instance",
    "sensor",
    "calibrated_sensor",
    "ego_pose",
    "log",
    "scene",
    "sample",
    "sample_data",
    "sample_annotation",
    "map",
)

#: Split names accepted by :func:`load_infos` besides the devkit's predefined ones.
ALL_SPLIT = "all"


def quaternion_to_matrix(q: Sequence[float]) -> np.ndarray:
    """Rotation matrix (3x3, float64) of a unit quaternion given as ``(w, x, y, z)`` (nuScenes order)."""
    w, x, y, z = (float(v) for v in q)
    n = w * w + x * x + y * y + z * z
    if not n > 0:
        raise ValueError(f"quaternion must be non-zero, got {list(q)}")
    s = 2.0 / n
    return np.array(
        [
            [1 - s * (y * y + z * z), s * (x * y - z * w), s * (x * z + y * w)],
            [s * (x * y + z * w), 1 - s * (x * x + z * z), s * (y * z - x * w)],
            [s * (x * z - y * w), s * (y * z + x * w), 1 - s * (x * x + y * y)],
        ]
    )


def _check_dataroot(dataroot: Path, version: str) -> None:
    if not dataroot.is_dir():
        raise FileNotFoundError(f"nuScenes dataroot {str(dataroot)!r} does not exist (expected a directory)")
    table_root = dataroot / version
    if not table_root.is_dir():
        found = sorted(p.name for p in dataroot.iterdir() if p.is_dir() and p.name.startswith("v1.0"))
        raise FileNotFoundError(
            f"nuScenes tables for version {version!r} not found: {str(table_root)!r} is missing"
            f" (versions found under the dataroot: {found or 'none'})"
        )
    missing = [f"{name}.json" for name in TABLE_NAMES if not (table_root / f"{name}.json").is_file()]
    if missing:
        raise FileNotFoundError(f"nuScenes tables missing under {str(table_root)!r}: {', '.join(missing)}")
    with open(table_root / "map.json") as f:
        maps = json.load(f)
    missing_maps = [m["filename"] for m in maps if not (dataroot / m["filename"]).is_file()]
    if missing_maps:
        raise FileNotFoundError(
            f"nuScenes map masks listed in {str(table_root / 'map.json')!r} are missing under the dataroot: "
            + ", ".join(missing_maps)
        )


def _split_scene_names(split: str) -> set[str] | None:
    """Scene names of a predefined devkit split, or None for every scene."""
    if split == ALL_SPLIT:
        return None
    from nuscenes.utils.splits import create_splits_scenes

    splits = create_splits_scenes()
    if split not in splits:
        raise ValueError(f"split must be one of {sorted(splits) + [ALL_SPLIT]}, got {split!r}")
    return set(splits[split])


#: Split scored by default per table version, and the split calibration takes when the data has it.
DEFAULT_SPLITS: dict[str, tuple[str, str]] = {
    "v1.0-trainval": ("val", "train"),
    "v1.0-mini": ("mini_val", "mini_train"),
    "v1.0-test": ("test", "test"),
}


@dataclass(frozen=True)
class NuScenesSpec:
    """A parsed ``nuscenes:PATH[@version][:split][:N]`` data spec (None: not given, pick the default)."""

    root: Path
    version: str | None = None
    split: str | None = None
    num_samples: int | None = None


def parse_nuscenes_spec(arg: str, spec: str | None = None) -> NuScenesSpec:
    """Parse what follows ``nuscenes:``: ``PATH[@version][:split][:N]``.

    ``/data/nuscenes``, ``/data/nuscenes@v1.0-mini``, ``/data/nuscenes:val:100``,
    ``/data/nuscenes@v1.0-test:test``, ``/data/nuscenes:50`` (first 50 samples of the default split).

    Raises:
        ValueError: Empty PATH or version, or more than a split and a sample count after it.
    """
    spec = spec if spec is not None else f"nuscenes:{arg}"
    form = "'nuscenes:PATH[@version][:split][:N]'"
    head, *tail = arg.strip().split(":")
    split = num = None
    if tail and tail[-1].strip().isdigit():
        num = int(tail.pop().strip())
        if num < 1:
            raise ValueError(f"data spec {spec!r}: N in {form} must be a positive number of samples, got {num}")
    if len(tail) > 1:
        raise ValueError(f"data spec {spec!r} not understood: use {form}")
    if tail:
        split = tail[0].strip()
        if not split:
            raise ValueError(f"data spec {spec!r}: empty split in {form}")
    root, at, version = head.rpartition("@") if "@" in head else (head, "", "")
    if at and (not version.strip() or "/" in version):
        raise ValueError(f"data spec {spec!r}: empty or bad version after '@' in {form} (e.g. @v1.0-mini)")
    if not root.strip():
        raise ValueError(f"data spec {spec!r}: {form} needs the nuScenes dataroot PATH")
    return NuScenesSpec(Path(root.strip()).expanduser(), version.strip() or None, split, num)


def default_split(dataroot: str | Path, version: str, calibration: bool = False) -> str:
    """The split a spec without one means: ``val`` / ``mini_val`` / ``test`` to evaluate; to calibrate,
    ``train`` / ``mini_train`` when the tables hold scenes of it (calibrating on the scored split
    would tune the scales to the test data), else the evaluation split."""
    name = version if version in DEFAULT_SPLITS else next(
        (v for v in DEFAULT_SPLITS if version.endswith(v.split("-")[-1])), None)
    if name is None:
        return ALL_SPLIT
    scored, train = DEFAULT_SPLITS[name]
    if not calibration or train == scored:
        return scored
    try:
        from nuscenes.utils.splits import create_splits_scenes

        with open(Path(dataroot) / version / "scene.json") as f:
            names = {s["name"] for s in json.load(f)}
        return train if names & set(create_splits_scenes()[train]) else scored
    except (OSError, ValueError, KeyError):
        return scored


class _CanBusPoses:
    """The CAN bus ``pose`` messages per scene, with the converter's fallback to zeros."""

    def __init__(self, can_bus_root: Path):
        self._api = None
        self._cache: dict[str, list[dict] | None] = {}
        if not (can_bus_root / "can_bus").is_dir():
            warnings.warn(
                f"CAN bus expansion not found ({str(can_bus_root / 'can_bus')!r} is missing): can_bus is all zeros",
                stacklevel=3,
            )
            return
        from nuscenes.can_bus.can_bus_api import NuScenesCanBus

        self._api = NuScenesCanBus(dataroot=str(can_bus_root))

    def messages(self, scene_name: str) -> list[dict] | None:
        if self._api is None:
            return None
        if scene_name not in self._cache:
            try:
                msgs = self._api.get_messages(scene_name, "pose", print_warnings=False)
                if not msgs:
                    raise ValueError("no pose messages")
            except Exception as err:  # the converter also falls back to zeros for any failure here
                warnings.warn(f"no CAN bus pose data for {scene_name} ({err}): can_bus is all zeros", stacklevel=4)
                msgs = None
            self._cache[scene_name] = msgs
        return self._cache[scene_name]

    def vector(self, scene_name: str, timestamp: int) -> np.ndarray:
        """The 18-value CAN bus vector of BEVFormer's converter at a sample timestamp.

        Position and orientation come from the last message at or before the timestamp (the first one if
        none is); acceleration, rotation rate and velocity from the message the converter's loop stops on,
        the first one after the timestamp (the last one if none is).
        """
        msgs = self.messages(scene_name)
        if msgs is None:
            return np.zeros(18)
        last, stop = msgs[0], msgs[-1]
        for msg in msgs:
            if msg["utime"] > timestamp:
                stop = msg
                break
            last = msg
        values = [*last["pos"], *last["orientation"], *stop["accel"], *stop["rotation_rate"], *stop["vel"], 0.0, 0.0]
        return np.asarray(values, dtype=np.float64)


def _sensor_record(nusc: Any, sd_token: str, l2e_t, l2e_r, e2g_t, e2g_r, sensor_type: str) -> dict:
    """One camera or sweep entry: its paths and poses, plus its transform to the key frame's LiDAR."""
    sd = nusc.get("sample_data", sd_token)
    cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
    pose = nusc.get("ego_pose", sd["ego_pose_token"])
    rec = {
        "data_path": str(nusc.get_sample_data_path(sd_token)),
        "type": sensor_type,
        "sample_data_token": sd["token"],
        "sensor2ego_translation": cs["translation"],
        "sensor2ego_rotation": cs["rotation"],
        "ego2global_translation": pose["translation"],
        "ego2global_rotation": pose["rotation"],
        "timestamp": sd["timestamp"],
    }
    # sensor -> ego(t_s) -> global -> ego(t_key) -> lidar(t_key)
    s2e_r = quaternion_to_matrix(cs["rotation"])
    e2g_r_s = quaternion_to_matrix(pose["rotation"])
    s2g_r = e2g_r_s @ s2e_r
    s2g_t = e2g_r_s @ np.asarray(cs["translation"], dtype=np.float64) + np.asarray(pose["translation"])
    g2l_r = l2e_r.T @ e2g_r.T
    rec["sensor2lidar_rotation"] = g2l_r @ s2g_r
    rec["sensor2lidar_translation"] = l2e_r.T @ (e2g_r.T @ (s2g_t - e2g_t) - l2e_t)
    return rec


def _gt_fields(nusc: Any, sample: dict, boxes: list, e2g_r: np.ndarray, l2e_r: np.ndarray) -> dict:
    from nuscenes.eval.detection.utils import category_to_detection_name

    anns = [nusc.get("sample_annotation", t) for t in sample["anns"]]
    locs = np.array([b.center for b in boxes], dtype=np.float64).reshape(-1, 3)
    dims = np.array([b.wlh for b in boxes], dtype=np.float64).reshape(-1, 3)
    rots = np.array([b.orientation.yaw_pitch_roll[0] for b in boxes], dtype=np.float64).reshape(-1, 1)
    velocity = np.array([nusc.box_velocity(t)[:2] for t in sample["anns"]], dtype=np.float64).reshape(-1, 2)
    # global -> lidar for the velocity vector (rotation only, z = 0 as in the converter)
    velo3 = np.concatenate([velocity, np.zeros((len(velocity), 1))], axis=1)
    velocity = (velo3 @ e2g_r @ l2e_r)[:, :2] if len(velo3) else velocity
    names = []
    for b in boxes:
        det = category_to_detection_name(b.name)
        names.append(det if det is not None else b.name)
    return {
        "gt_boxes": np.concatenate([locs, dims, -rots - np.pi / 2], axis=1),
        "gt_names": np.array(names, dtype=str).reshape(-1),
        "gt_velocity": velocity.reshape(-1, 2),
        "num_lidar_pts": np.array([a["num_lidar_pts"] for a in anns], dtype=np.int64).reshape(-1),
        "num_radar_pts": np.array([a["num_radar_pts"] for a in anns], dtype=np.int64).reshape(-1),
        "valid_flag": np.array([(a["num_lidar_pts"] + a["num_radar_pts"]) > 0 for a in anns], dtype=bool).reshape(-1),
    }


def load_infos(
    dataroot: str | Path,
    version: str = "v1.0-trainval",
    split: str = "val",
    *,
    can_bus_root: str | Path | None = None,
    max_sweeps: int = 10,
    progress: bool = True,
) -> list[dict]:
    """Read a nuScenes dataset into info records, in temporal order.

    Args:
        dataroot: The nuScenes root: holds ``<version>/*.json``, ``samples/``, ``maps/`` and usually
            ``can_bus/``.
        version: Table folder, e.g. ``v1.0-trainval``, ``v1.0-mini``, ``v1.0-test`` (a version ending in
            ``test`` has no annotations: the records then carry no GT fields, as in the converter).
        split: A devkit split (``train``, ``val``, ``test``, ``mini_train``, ``mini_val``, ...; membership
            by scene name through ``nuscenes.utils.splits``) or ``"all"`` for every scene in the tables.
        can_bus_root: Folder holding ``can_bus/`` (default: ``dataroot``, or its parent if the CAN bus
            expansion sits beside it as in BEVFormer's ``data/can_bus``). Missing CAN bus data gives an
            all-zero ``can_bus`` with a warning, as BEVFormer's converter does.
        max_sweeps: Previous LiDAR sweeps kept per sample (the converter's default 10).
        progress: Show a progress bar.

    Returns:
        One dict per sample (fields: see the module docstring), scenes
        ordered by start time, samples within a scene by timestamp, ``frame_idx`` 0 at each scene start.

    Raises:
        FileNotFoundError: The dataroot, the version folder, a table or a map mask is missing.
        ValueError: Unknown split, or the split selects no scene of these tables.
    """
    dataroot = Path(dataroot).expanduser().absolute()
    _check_dataroot(dataroot, version)
    if max_sweeps < 0:
        raise ValueError(f"max_sweeps must be >= 0, got {max_sweeps}")
    wanted = _split_scene_names(split)

    from nuscenes.nuscenes import NuScenes

    nusc = NuScenes(version=version, dataroot=str(dataroot), verbose=False)
    if can_bus_root is None:  # BEVFormer's layout keeps data/can_bus beside data/nuscenes
        can_bus_root = dataroot if (dataroot / "can_bus").is_dir() or not (dataroot.parent / "can_bus").is_dir() \
            else dataroot.parent
    can = _CanBusPoses(Path(can_bus_root).expanduser().absolute())
    with_gt = not version.endswith("test")

    scenes = [s for s in nusc.scene if wanted is None or s["name"] in wanted]
    if not scenes:
        raise ValueError(
            f"split {split!r} selects none of the {len(nusc.scene)} scenes of {version!r} under {str(dataroot)!r}"
        )
    # Follow each scene's linked list of samples; order scenes by their first timestamp.
    ordered: list[tuple[dict, list[dict]]] = []
    for scene in scenes:
        samples, token = [], scene["first_sample_token"]
        while token:
            sample = nusc.get("sample", token)
            samples.append(sample)
            token = sample["next"]
        samples.sort(key=lambda s: s["timestamp"])
        ordered.append((scene, samples))
    ordered.sort(key=lambda item: (item[1][0]["timestamp"] if item[1] else 0, item[0]["name"]))

    total = sum(len(s) for _, s in ordered)
    infos: list[dict] = []
    bar = tqdm(total=total, desc=f"nuScenes {version}/{split}", unit="sample", disable=not progress)
    for scene, samples in ordered:
        for frame_idx, sample in enumerate(samples):
            infos.append(_sample_info(nusc, can, scene, sample, frame_idx, max_sweeps, with_gt))
            bar.update(1)
    bar.close()
    return infos


def _sample_info(nusc: Any, can: _CanBusPoses, scene: dict, sample: dict, frame_idx: int, max_sweeps: int,
                 with_gt: bool) -> dict:
    lidar_token = sample["data"]["LIDAR_TOP"]
    sd = nusc.get("sample_data", lidar_token)
    cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
    pose = nusc.get("ego_pose", sd["ego_pose_token"])
    lidar_path, boxes, _ = nusc.get_sample_data(lidar_token)
    info: dict[str, Any] = {
        "lidar_path": str(lidar_path),
        "token": sample["token"],
        "prev": sample["prev"],
        "next": sample["next"],
        "can_bus": can.vector(scene["name"], sample["timestamp"]),
        "frame_idx": frame_idx,
        "sweeps": [],
        "cams": {},
        "scene_token": sample["scene_token"],
        "lidar2ego_translation": cs["translation"],
        "lidar2ego_rotation": cs["rotation"],
        "ego2global_translation": pose["translation"],
        "ego2global_rotation": pose["rotation"],
        "timestamp": sample["timestamp"],
    }
    l2e_t = np.asarray(cs["translation"], dtype=np.float64)
    e2g_t = np.asarray(pose["translation"], dtype=np.float64)
    l2e_r = quaternion_to_matrix(cs["rotation"])
    e2g_r = quaternion_to_matrix(pose["rotation"])
    for cam in CAMERA_NAMES:
        if cam not in sample["data"]:
            raise ValueError(f"sample {sample['token']} has no {cam} image (expected all of {CAMERA_NAMES})")
        cam_token = sample["data"][cam]
        cam_info = _sensor_record(nusc, cam_token, l2e_t, l2e_r, e2g_t, e2g_r, cam)
        cs_cam = nusc.get("calibrated_sensor", nusc.get("sample_data", cam_token)["calibrated_sensor_token"])
        cam_info["cam_intrinsic"] = np.array(cs_cam["camera_intrinsic"], dtype=np.float64)
        info["cams"][cam] = cam_info
    token = sd["prev"]
    while token and len(info["sweeps"]) < max_sweeps:
        info["sweeps"].append(_sensor_record(nusc, token, l2e_t, l2e_r, e2g_t, e2g_r, "lidar"))
        token = nusc.get("sample_data", token)["prev"]
    if with_gt:
        info.update(_gt_fields(nusc, sample, boxes, e2g_r, l2e_r))
    return info


def lidar2img(info: dict) -> np.ndarray:
    """LiDAR-to-image projections of the 6 cameras, as BEVFormer's dataset computes them.

    ``lidar2img = K (4x4, intrinsic padded with identity) @ inverse(sensor2lidar)``: a homogeneous LiDAR
    point ``p`` lands at pixel ``(u, v) = (q[0] / q[2], q[1] / q[2])`` with ``q = lidar2img @ p`` and
    depth ``q[2]`` (positive in front of the camera).

    Args:
        info: An info record with ``cams`` holding all of :data:`CAMERA_NAMES`.

    Returns:
        np.ndarray[6, 4, 4] (float64) in :data:`CAMERA_NAMES` order.
    """
    cams = info.get("cams")
    if not isinstance(cams, dict):
        raise ValueError("info must have a 'cams' dict (an info record from load_infos)")
    out = np.zeros((len(CAMERA_NAMES), 4, 4))
    for i, cam in enumerate(CAMERA_NAMES):
        if cam not in cams:
            raise ValueError(f"info['cams'] lacks {cam!r} (has {sorted(cams)})")
        c = cams[cam]
        rot = np.asarray(c["sensor2lidar_rotation"], dtype=np.float64)
        trans = np.asarray(c["sensor2lidar_translation"], dtype=np.float64)
        lidar2cam = np.eye(4)
        lidar2cam[:3, :3] = rot.T
        lidar2cam[:3, 3] = -rot.T @ trans
        viewpad = np.eye(4)
        intrinsic = np.asarray(c["cam_intrinsic"], dtype=np.float64)
        viewpad[: intrinsic.shape[0], : intrinsic.shape[1]] = intrinsic
        out[i] = viewpad @ lidar2cam
    return out


def gt_box_corners(gt_boxes: np.ndarray) -> np.ndarray:
    """The 8 corners of info ``gt_boxes`` (converter convention) in the LiDAR frame.

    Args:
        gt_boxes: np [N, 7+]: x, y, z (box centre), w, l, h, yaw with ``yaw = -rot - pi/2`` where ``rot``
            is the devkit box's heading (its length ``l`` runs along the heading, ``w`` across).

    Returns:
        np [N, 8, 3]: top face first (front-left, front-right, back-right, back-left), then the bottom.
    """
    boxes = np.asarray(gt_boxes, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] < 7:
        raise ValueError(f"gt_boxes must be [N, >=7], got shape {boxes.shape}")
    heading = -boxes[:, 6] - np.pi / 2
    w, l, h = boxes[:, 3:4], boxes[:, 4:5], boxes[:, 5:6]
    sx = np.array([1, 1, -1, -1, 1, 1, -1, -1], dtype=np.float64)
    sy = np.array([1, -1, -1, 1, 1, -1, -1, 1], dtype=np.float64)
    sz = np.array([1, 1, 1, 1, -1, -1, -1, -1], dtype=np.float64)
    x, y, z = sx * l / 2, sy * w / 2, sz * h / 2  # [N, 8] in the box frame
    c, s = np.cos(heading)[:, None], np.sin(heading)[:, None]
    return np.stack([c * x - s * y, s * x + c * y, z], axis=-1) + boxes[:, None, :3]


def load_images(info: dict, cameras: Iterable[str] = CAMERA_NAMES) -> list[np.ndarray]:
    """The camera images of a sample, decoded with PIL.

    Args:
        info: An info record.
        cameras: Which cameras, in which order (default: all 6 in :data:`CAMERA_NAMES` order).

    Returns:
        One ``np.uint8`` array ``[H, W, 3]`` (RGB) per camera.

    Raises:
        FileNotFoundError: An image file is missing (the message names it).
    """
    from PIL import Image

    images = []
    for cam in cameras:
        if cam not in info.get("cams", {}):
            raise ValueError(f"info['cams'] lacks {cam!r}")
        path = Path(info["cams"][cam]["data_path"])
        if not path.is_file():
            raise FileNotFoundError(f"camera image {str(path)!r} ({cam} of sample {info.get('token', '?')}) not found")
        with Image.open(path) as im:
            images.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    return images

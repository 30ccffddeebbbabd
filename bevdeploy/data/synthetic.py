"""The synthetic world: a nuScenes-format dataset rendered on the CPU, deterministic by seed.

Why: the project must run end to end (models, engines, calibration, NDS) on a machine with no dataset.
The world is written to disk in nuScenes v1.0 form (the devkit's JSON tables, the CAN bus expansion's
``can_bus/scene-XXXX_pose.json``, JPEG camera images under ``samples/CAM_*``), so it is read by the SAME
reader as real nuScenes (:func:`bevdeploy.data.nuscenes.load_infos`) and scored by the devkit's own GT
loading and metrics.

What is in it:

- a nuScenes-like 6-camera rig (real focal lengths ~1266 px, ~809 px for CAM_BACK, at 1600x900, the
  real yaws 0, -55, +55, 180, +110, -110 deg, cameras ~1.5 m up) and a LIDAR_TOP with nuScenes'
  mounting (1.84 m up, yawed -90 deg, so the LiDAR box conventions are the real ones);
- a (gently curved) four-lane road with lane marks, curbs, sidewalks and grass, textured in world
  coordinates (so the texture moves consistently between frames), and a sky gradient;
- objects of the 10 detection classes as shaded cuboids of nuScenes' mean class sizes (jittered), with
  yaw and constant velocity along lanes and sidewalks, parked vehicles, barriers and cones;
- the ego vehicle driving along the road at a per-scene speed, 2 Hz key frames like nuScenes, a CAN bus
  pose stream (position, orientation, velocity, acceleration, yaw rate);
- LiDAR returns simulated by ray casting a 32-beam sensor against the cuboids: they give each box its
  ``num_lidar_pts`` (0 for fully occluded boxes, which the devkit's evaluation then drops, as it does
  for real data) and its visibility level; the ``.pcd.bin`` files hold the object returns.

Evaluation mechanism: scenes are named after the real nuScenes **val** scenes (``scene-0003``, ...; at most
150 scenes) and the tables live under the version :data:`SYNTHETIC_VERSION`, which ends in ``trainval``,
so ``nuscenes.eval.common.loaders.load_gt(nusc, "val", DetectionBox)`` and ``DetectionEval(...,
eval_set="val")`` accept it unchanged (load them with ``NuScenes(version=SYNTHETIC_VERSION,
dataroot=<dir>)``). A ``splits.json`` with the custom split ``"synthetic"`` is written too.

Rendering is plain numpy: per pixel, a camera ray meets the ground plane (texture) or the sky; each
cuboid is ray-cast (slab test) inside its projected bounding box with a depth buffer, and its faces are
Lambert-shaded from a fixed sun. About 2 s of one core per sample (6 cameras at 900x1600), ~0.5 s at
450x800; ``generate(workers=N)`` renders samples in parallel.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .nuscenes import CAMERA_NAMES, CLASS_NAMES

#: Version folder of the synthetic tables (ends in ``trainval`` so the devkit's ``load_gt(..., "val")`` runs).
SYNTHETIC_VERSION = "v1.0-synthetic-trainval"
#: Split holding every synthetic scene (the scenes carry real nuScenes val scene names).
SYNTHETIC_SPLIT = "val"
#: Bump when the generated content changes, so cached worlds are regenerated.
GENERATOR_VERSION = 1
#: Default number of samples of the ``synthetic`` data spec.
DEFAULT_NUM_SAMPLES = 32
#: Key frames per scene used by :func:`resolve_data_spec` (nuScenes has ~40; 20 = 10 s at 2 Hz).
DEFAULT_SAMPLES_PER_SCENE = 20

_KEYFRAME_US = 500_000  # 2 Hz key frames, as nuScenes
_T0_US = 1_535_000_000_000_000
_ANNOTATION_RADIUS = 60.0  # metres (xy) around the ego: annotated and rendered
_MANIFEST = "synthetic.json"

#: nuScenes category (devkit name) written for each detection class.
CATEGORY_OF_CLASS: dict[str, str] = {
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
}

#: Mean box size (w, l, h) in metres per class, close to nuScenes' training-set means.
CLASS_SIZES: dict[str, tuple[float, float, float]] = {
    "car": (1.95, 4.62, 1.73),
    "truck": (2.51, 6.93, 2.84),
    "construction_vehicle": (2.85, 6.37, 3.19),
    "bus": (2.94, 10.50, 3.47),
    "trailer": (2.90, 12.29, 3.87),
    "barrier": (2.53, 0.50, 0.98),
    "motorcycle": (0.77, 2.11, 1.47),
    "bicycle": (0.60, 1.70, 1.28),
    "pedestrian": (0.67, 0.73, 1.77),
    "traffic_cone": (0.41, 0.41, 1.07),
}

#: Base RGB colour per class (saturated and distinct from the road, grass and sky).
CLASS_COLORS: dict[str, tuple[int, int, int]] = {
    "car": (205, 45, 45),
    "truck": (225, 140, 30),
    "construction_vehicle": (235, 215, 30),
    "bus": (40, 150, 70),
    "trailer": (140, 60, 185),
    "barrier": (225, 85, 160),
    "motorcycle": (30, 180, 195),
    "bicycle": (120, 215, 110),
    "pedestrian": (60, 70, 215),
    "traffic_cone": (250, 95, 10),
}

_SKY_ZENITH = np.array([95.0, 145.0, 215.0], dtype=np.float32)
_SKY_HORIZON = np.array([200.0, 215.0, 228.0], dtype=np.float32)
_HAZE = np.array([185.0, 195.0, 205.0], dtype=np.float32)
_SUN = np.array([0.35, 0.45, 0.82]) / np.linalg.norm([0.35, 0.45, 0.82])

# Rig: (camera, translation in ego frame (m), yaw (deg), focal (px at 1600x900), principal point).
_RIG = (
    ("CAM_FRONT", (1.70, 0.016, 1.51), 0.0, 1266.4, (816.3, 491.5)),
    ("CAM_FRONT_RIGHT", (1.55, -0.493, 1.50), -55.0, 1260.8, (808.0, 495.3)),
    ("CAM_FRONT_LEFT", (1.52, 0.495, 1.51), 55.0, 1272.6, (826.6, 479.8)),
    ("CAM_BACK", (0.03, 0.003, 1.58), 180.0, 809.2, (829.2, 481.8)),
    ("CAM_BACK_LEFT", (1.04, 0.485, 1.59), 110.0, 1256.7, (792.1, 492.8)),
    ("CAM_BACK_RIGHT", (1.01, -0.481, 1.56), -110.0, 1259.5, (807.3, 501.2)),
)
_LIDAR_TRANSLATION = (0.943, 0.0, 1.84)
_LIDAR_YAW = -math.pi / 2
_LIDAR_ELEVATIONS = np.deg2rad(np.linspace(-30.67, 10.67, 32))
_LIDAR_AZIMUTHS = np.linspace(-math.pi, math.pi, 1080, endpoint=False)
_LIDAR_RANGE = 70.0
# The 12 edges of a cuboid as corner index pairs (corner order of _corners).
_EDGES = np.array([[0, 1], [1, 2], [2, 3], [3, 0], [4, 5], [5, 6], [6, 7], [7, 4], [0, 4], [1, 5], [2, 6], [3, 7]])
# Camera axes (x right, y down, z forward) in a forward-looking ego frame (x forward, y left, z up).
_CAM_AXES = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


# ----------------------------------------------------------------------------------------------- geometry
def _rot_z(yaw: float) -> np.ndarray:
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _yaw_quaternion(yaw: float) -> list[float]:
    return [math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)]


def _matrix_to_quaternion(m: np.ndarray) -> list[float]:
    """(w, x, y, z) of a rotation matrix (Shepperd's method, w >= 0)."""
    tr = m[0, 0] + m[1, 1] + m[2, 2]
    if tr > 0:
        s = math.sqrt(tr + 1.0) * 2
        q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = math.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2]) * 2
        q = [(m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
    elif m[1, 1] > m[2, 2]:
        s = math.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2]) * 2
        q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s]
    else:
        s = math.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1]) * 2
        q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s]
    if q[0] < 0:
        q = [-v for v in q]
    return [float(v) for v in q]


@dataclass(frozen=True)
class CameraRig:
    """The camera rig at one image size: per camera intrinsics and sensor-to-ego pose.

    Attributes:
        names: Camera names (:data:`CAMERA_NAMES` order).
        image_size: (H, W) of every image.
        intrinsics: np [6, 3, 3].
        rotations: np [6, 3, 3] sensor-to-ego rotation.
        translations: np [6, 3] sensor-to-ego translation (m).
    """

    names: tuple[str, ...]
    image_size: tuple[int, int]
    intrinsics: np.ndarray
    rotations: np.ndarray
    translations: np.ndarray


def nuscenes_rig(image_size: tuple[int, int] = (900, 1600)) -> CameraRig:
    """The nuScenes-like rig, intrinsics scaled from 1600x900 to ``image_size`` (H, W)."""
    h, w = _check_image_size(image_size)
    sx, sy = w / 1600.0, h / 900.0
    by_name = {r[0]: r for r in _RIG}
    ks, rs, ts = [], [], []
    for name in CAMERA_NAMES:
        _, t, yaw, f, (cx, cy) = by_name[name]
        ks.append(np.array([[f * sx, 0.0, cx * sx], [0.0, f * sy, cy * sy], [0.0, 0.0, 1.0]]))
        rs.append(_rot_z(math.radians(yaw)) @ _CAM_AXES)
        ts.append(np.array(t, dtype=np.float64))
    return CameraRig(tuple(CAMERA_NAMES), (h, w), np.stack(ks), np.stack(rs), np.stack(ts))


def _check_image_size(image_size) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be (H, W), got {image_size!r}") from None
    if h < 8 or w < 8:
        raise ValueError(f"image_size must be at least (8, 8), got {(h, w)}")
    return h, w


@dataclass(frozen=True)
class _Road:
    """A road centreline through ``origin`` with ``heading``; constant curvature ``kappa`` (1/m, left > 0).

    Road coordinates: ``s`` along the centreline (m), ``l`` to the left of it (m).
    """

    origin: tuple[float, float]
    heading: float
    kappa: float

    def to_global(self, s, l):
        """(x, y, tangent heading) of road coordinates (scalars or arrays)."""
        s, l = np.asarray(s, dtype=np.float64), np.asarray(l, dtype=np.float64)
        theta = self.heading + self.kappa * s
        nx, ny = -np.sin(theta), np.cos(theta)
        if self.kappa == 0.0:
            x = self.origin[0] + s * math.cos(self.heading) + l * nx
            y = self.origin[1] + s * math.sin(self.heading) + l * ny
        else:
            r = 1.0 / self.kappa
            cx = self.origin[0] - math.sin(self.heading) * r
            cy = self.origin[1] + math.cos(self.heading) * r
            x = cx + nx * (l - r)
            y = cy + ny * (l - r)
        return x, y, theta

    def to_road(self, x, y):
        """Road coordinates (s, l) of global points (float32 arrays; used per pixel)."""
        if self.kappa == 0.0:
            dx, dy = x - np.float32(self.origin[0]), y - np.float32(self.origin[1])
            c, s_ = np.float32(math.cos(self.heading)), np.float32(math.sin(self.heading))
            return dx * c + dy * s_, -dx * s_ + dy * c
        r = 1.0 / self.kappa
        cx = self.origin[0] - math.sin(self.heading) * r
        cy = self.origin[1] + math.cos(self.heading) * r
        dx, dy = x - np.float32(cx), y - np.float32(cy)
        dist = np.sqrt(dx * dx + dy * dy)
        sign = np.float32(1.0 if self.kappa > 0 else -1.0)
        l = np.float32(r) - sign * dist
        # n(s) = -sign * (dx, dy) / dist = (-sin theta, cos theta)
        theta = np.arctan2(sign * dx, -sign * dy)
        pi = np.float32(math.pi)
        dtheta = (theta - np.float32(self.heading) + pi) % (2 * pi) - pi
        return dtheta * np.float32(r), l


# ------------------------------------------------------------------------------------------------ the world
@dataclass(frozen=True)
class _Actor:
    """One object: class, size, colour, and its motion along the road (s(t) = s0 + speed * t, l fixed)."""

    index: int
    cls: str
    wlh: tuple[float, float, float]
    color: tuple[float, float, float]
    lane: float
    s0: float
    speed: float
    yaw_offset: float  # added to the road tangent (pi = facing backwards, pi/2 = across)
    attribute: str  # nuScenes attribute name or ''


@dataclass(frozen=True)
class _Scene:
    index: int
    name: str
    road: _Road
    ego_lane: float
    ego_speed: float
    num_samples: int
    start_us: int
    actors: tuple[_Actor, ...]


@dataclass(frozen=True)
class ObjectBox:
    """One box at one key frame, in the global frame (what the renderer draws and the tables store)."""

    actor: int
    cls: str
    center: np.ndarray  # (3,), box centre
    wlh: tuple[float, float, float]
    yaw: float
    color: tuple[float, float, float]
    attribute: str


_CLASS_WEIGHTS = {
    "car": 0.30,
    "truck": 0.08,
    "construction_vehicle": 0.05,
    "bus": 0.05,
    "trailer": 0.05,
    "barrier": 0.10,
    "motorcycle": 0.05,
    "bicycle": 0.06,
    "pedestrian": 0.16,
    "traffic_cone": 0.10,
}


def _scene_names() -> list[str]:
    try:
        from nuscenes.utils.splits import create_splits_scenes
    except ImportError as e:
        raise ImportError("the synthetic world names its scenes after nuScenes' val split: install "
                          "nuscenes-devkit (a bevdeploy dependency: pip install nuscenes-devkit)") from e

    return list(create_splits_scenes()["val"])


class SyntheticWorld:
    """The scenes of one seed: road, ego motion and actors, and their rendering.

    Everything is a pure function of (seed, scene lengths, image size), so any sample can be rendered
    alone (and in another process) with identical bytes.

    Args:
        num_samples_per_scene: Key frames of each scene.
        seed: World seed.
        image_size: (H, W) of the camera images.
    """

    def __init__(self, num_samples_per_scene: list[int], seed: int = 0, image_size: tuple[int, int] = (900, 1600)):
        names = _scene_names()
        if not num_samples_per_scene:
            raise ValueError("num_samples_per_scene must name at least one scene")
        if len(num_samples_per_scene) > len(names):
            raise ValueError(
                f"at most {len(names)} synthetic scenes (they carry the nuScenes val scene names), "
                f"got {len(num_samples_per_scene)}"
            )
        if any(int(n) < 1 for n in num_samples_per_scene):
            raise ValueError(f"every scene needs >= 1 sample, got {list(num_samples_per_scene)}")
        self.seed = int(seed)
        self.rig = nuscenes_rig(image_size)
        self.image_size = self.rig.image_size
        self.scenes = [self._make_scene(i, names[i], int(n)) for i, n in enumerate(num_samples_per_scene)]
        h, w = self.image_size
        # Camera rays with z = 1 (the ray parameter is then the depth) are separable: x' depends on the
        # column only, y' on the row only (pixel centres at integers, the calibration's convention).
        k = self.rig.intrinsics
        self._ray_x = [((np.arange(w) - k[i, 0, 2]) / k[i, 0, 0]).astype(np.float32)[None, :] for i in range(len(k))]
        self._ray_y = [((np.arange(h) - k[i, 1, 2]) / k[i, 1, 1]).astype(np.float32)[:, None] for i in range(len(k))]

    # -------------------------------------------------------------------------------------- scene layout
    def _make_scene(self, index: int, name: str, num_samples: int) -> _Scene:
        rng = np.random.default_rng([self.seed, index, 7])
        kappa = 0.0 if rng.random() < 0.3 else float(rng.choice([-1, 1]) / rng.uniform(120.0, 400.0))
        road = _Road(origin=(float(rng.uniform(-500, 500)), float(rng.uniform(-500, 500))),
                     heading=float(rng.uniform(-math.pi, math.pi)), kappa=kappa)
        ego_speed = 0.0 if rng.random() < 0.15 else float(rng.uniform(3.0, 12.0))
        ego_lane = -1.75
        duration = (num_samples - 1) * _KEYFRAME_US / 1e6
        start_us = _T0_US + index * 120_000_000
        actors: list[_Actor] = []
        classes = list(_CLASS_WEIGHTS)
        probs = np.array([_CLASS_WEIGHTS[c] for c in classes])

        def place(lane: float, speed: float, allowed: list[str], gap: tuple[float, float], density: float,
                  yaw_mode: str, facing: int = 0) -> None:
            """Fill one lane with actors of one shared speed (so they never run into each other).

            ``yaw_mode``: "along" the lane (facing +s if ``facing`` > 0, -s if < 0, either if 0),
            "across" it, or "random"; it also sets the along-lane extent used for spacing.
            """
            # span of s0 such that the lane's actors pass the ego's surroundings during the whole scene
            rel = (ego_speed - speed) * duration
            lo = -_ANNOTATION_RADIUS - 15.0 + min(0.0, rel)
            hi = _ANNOTATION_RADIUS + 15.0 + max(0.0, rel)
            weights = probs[[classes.index(c) for c in allowed]]
            weights = weights / weights.sum()
            s = lo + rng.uniform(0.0, gap[1])
            while s < hi:
                cls = allowed[int(rng.choice(len(allowed), p=weights))]
                wlh = tuple(float(v * rng.uniform(0.9, 1.1)) for v in CLASS_SIZES[cls])
                if yaw_mode == "along":
                    flip = rng.random() < 0.5 if facing == 0 else facing < 0
                    yaw_offset, extent = (math.pi if flip else 0.0), wlh[1]
                elif yaw_mode == "across":
                    yaw_offset, extent = math.pi / 2, wlh[0]
                else:
                    yaw_offset, extent = float(rng.uniform(-math.pi, math.pi)), math.hypot(wlh[0], wlh[1])
                center = s + extent / 2
                jitter = rng.integers(-18, 19, size=3)
                color = tuple(float(np.clip(c + j, 0, 255)) for c, j in zip(CLASS_COLORS[cls], jitter))
                lateral = float(rng.uniform(-0.25, 0.25)) if yaw_mode == "along" else float(rng.uniform(-0.1, 0.1))
                keep = rng.random() < density
                # keep the ego's own slot free (ego-lane actors move with the ego)
                clear_of_ego = lane != ego_lane or abs(center) > 2.4 + extent / 2 + 1.5
                if keep and clear_of_ego:
                    actors.append(_Actor(len(actors), cls, wlh, color, lane + lateral, center, speed, yaw_offset,
                                         _attribute(cls, abs(speed) > 0.2, rng)))
                s = center + extent / 2 + rng.uniform(*gap)

        vehicles = ["car", "truck", "bus", "construction_vehicle", "trailer", "motorcycle", "bicycle"]
        movers = ["car", "car", "truck", "bus", "motorcycle"]
        opposite_speed = -float(rng.uniform(3.0, 13.0))
        place(ego_lane, ego_speed, movers, (6.0, 30.0), 0.7, "along", +1)      # ego lane, with the ego
        place(1.75, opposite_speed, movers, (8.0, 35.0), 0.8, "along", -1)     # oncoming lane
        place(-5.25, 0.0, vehicles + ["barrier", "traffic_cone"], (1.0, 14.0), 0.75, "along")  # kerb lane
        place(5.25, 0.0, vehicles + ["barrier", "traffic_cone"], (1.0, 14.0), 0.75, "along")
        for side in (-1.0, 1.0):                                               # sidewalks
            for lane in (8.0, 10.0):
                walk = float(rng.choice([0.0, 1.3, -1.3]) * rng.uniform(0.8, 1.2))
                kinds = ["pedestrian", "pedestrian", "pedestrian", "bicycle"] if walk else ["pedestrian", "bicycle"]
                place(side * lane, walk, kinds, (1.0, 12.0), 0.6, "along" if walk else "random", int(np.sign(walk)))
            place(side * 7.6, 0.0, ["traffic_cone", "barrier"], (2.0, 25.0), 0.4, "across")
            place(side * 15.0, 0.0, ["construction_vehicle", "trailer", "truck", "car"], (4.0, 30.0), 0.5, "along")
        return _Scene(index, name, road, ego_lane, ego_speed, num_samples, start_us, tuple(actors))

    # -------------------------------------------------------------------------------------- kinematics
    @staticmethod
    def timestamp(scene: _Scene, frame: int) -> int:
        return scene.start_us + frame * _KEYFRAME_US

    @staticmethod
    def ego_pose(scene: _Scene, t: float) -> tuple[np.ndarray, float]:
        """Ego translation (3,) and yaw at time ``t`` seconds after the scene start."""
        x, y, theta = scene.road.to_global(scene.ego_speed * t, scene.ego_lane)
        return np.array([float(x), float(y), 0.0]), float(theta)

    def boxes(self, scene: _Scene, frame: int) -> list[ObjectBox]:
        """The boxes within the annotation radius of the ego at a key frame (global frame)."""
        t = frame * _KEYFRAME_US / 1e6
        ego_t, _ = self.ego_pose(scene, t)
        out = []
        for a in scene.actors:
            x, y, theta = scene.road.to_global(a.s0 + a.speed * t, a.lane)
            x, y = float(x), float(y)
            if math.hypot(x - ego_t[0], y - ego_t[1]) > _ANNOTATION_RADIUS:
                continue
            yaw = (float(theta) + a.yaw_offset + math.pi) % (2 * math.pi) - math.pi
            out.append(ObjectBox(a.index, a.cls, np.array([x, y, a.wlh[2] / 2]), a.wlh, yaw, a.color, a.attribute))
        return out

    def camera_poses(self, scene: _Scene, frame: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Camera-to-global (rotation [3, 3], translation [3]) of the 6 cameras at a key frame."""
        ego_t, ego_yaw = self.ego_pose(scene, frame * _KEYFRAME_US / 1e6)
        e2g = _rot_z(ego_yaw)
        return [(e2g @ r, e2g @ t + ego_t) for r, t in zip(self.rig.rotations, self.rig.translations)]

    # -------------------------------------------------------------------------------------- rendering
    def render(self, scene_index: int, frame: int, objects: bool = True) -> list[np.ndarray]:
        """The 6 camera images (uint8 [H, W, 3], RGB, :data:`CAMERA_NAMES` order) of a key frame."""
        return [img for img, _ in self.render_with_ids(scene_index, frame, objects)]

    def render_with_ids(self, scene_index: int, frame: int,
                        objects: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per camera: the image and an int32 [H, W] map of the actor index seen at each pixel (-1: none)."""
        scene = self.scenes[scene_index]
        boxes = self.boxes(scene, frame) if objects else []
        return [self._render_camera(scene, i, r, t, boxes) for i, (r, t) in enumerate(self.camera_poses(scene, frame))]

    def _render_camera(self, scene: _Scene, cam: int, rot: np.ndarray, trans: np.ndarray,
                       boxes: list[ObjectBox]) -> tuple[np.ndarray, np.ndarray]:
        h, w = self.image_size
        rx, ry = self._ray_x[cam], self._ray_y[cam]
        r = rot.astype(np.float32)
        # world-frame ray directions [H, W] per component
        dx = r[0, 0] * rx + r[0, 1] * ry + r[0, 2]
        dy = r[1, 0] * rx + r[1, 1] * ry + r[1, 2]
        dz = r[2, 0] * rx + r[2, 1] * ry + r[2, 2]
        inv_norm = np.float32(1.0) / np.sqrt(dx * dx + dy * dy + dz * dz)
        elev = np.clip(dz * inv_norm, 0.0, 1.0)[..., None]
        img = _SKY_HORIZON + (_SKY_ZENITH - _SKY_HORIZON) * elev  # [H, W, 3]
        with np.errstate(divide="ignore"):
            t_ground = np.where(dz < -1e-6, np.float32(-trans[2]) / dz, np.float32(np.inf)).astype(np.float32)
        ground = t_ground < 400.0 * inv_norm  # ground within 400 m, else sky
        depth = np.where(ground, t_ground, np.float32(np.inf))
        rows = np.flatnonzero(ground.any(axis=1))
        if len(rows):  # shade the band of rows that holds ground densely (no gathers)
            v0, v1 = int(rows[0]), int(rows[-1]) + 1
            tg = np.where(ground[v0:v1], t_ground[v0:v1], np.float32(0.0))
            gx = np.float32(trans[0]) + dx[v0:v1] * tg
            gy = np.float32(trans[1]) + dy[v0:v1] * tg
            col = _ground_color(scene.road, gx.ravel(), gy.ravel(), self.seed).reshape(v1 - v0, w, 3)
            fog = (1.0 - np.exp(-tg / inv_norm[v0:v1] / np.float32(140.0)))[..., None]
            col = col * (1 - fog) + _HAZE * fog
            img[v0:v1] = np.where(ground[v0:v1, :, None], col, img[v0:v1])
        ids = np.full((h, w), -1, dtype=np.int32)
        for box in boxes:  # the depth buffer resolves occlusion
            self._draw_box(box, rot, trans, cam, img, depth, ids)
        return np.clip(img + 0.5, 0, 255).astype(np.uint8), ids

    def _box_window(self, cam_pts: np.ndarray, cam: int) -> tuple[int, int, int, int] | None:
        """Pixel window (u0, v0, u1, v1) holding a box's projection, clipped at the near plane."""
        near = 0.05
        z = cam_pts[:, 2]
        front = z > near
        if not front.any():
            return None
        pts = [cam_pts[front]]
        if not front.all():  # add where the 12 edges cross the near plane
            a, b = _EDGES[:, 0], _EDGES[:, 1]
            cross = front[a] != front[b]
            pa, pb = cam_pts[a[cross]], cam_pts[b[cross]]
            f = (near - pa[:, 2]) / (pb[:, 2] - pa[:, 2])
            pts.append(pa + (pb - pa) * f[:, None])
        p = np.concatenate(pts)
        k = self.rig.intrinsics[cam]
        u = p[:, 0] / p[:, 2] * k[0, 0] + k[0, 2]
        v = p[:, 1] / p[:, 2] * k[1, 1] + k[1, 2]
        h, w = self.image_size
        u0, u1 = max(0, math.floor(u.min())), min(w, math.ceil(u.max()) + 1)
        v0, v1 = max(0, math.floor(v.min())), min(h, math.ceil(v.max()) + 1)
        if u0 >= u1 or v0 >= v1:
            return None
        return u0, v0, u1, v1

    def _draw_box(self, box: ObjectBox, rot: np.ndarray, trans: np.ndarray, cam: int, img: np.ndarray,
                  depth: np.ndarray, ids: np.ndarray) -> None:
        corners = _corners(box.center, box.wlh, box.yaw)  # [8, 3] global
        window = self._box_window((corners - trans) @ rot, cam)
        if window is None:
            return
        u0, v0, u1, v1 = window
        rb = _rot_z(box.yaw)
        # ray-box slab test in the box frame: d_local = rb^T rot (x', y', 1), o_local = rb^T (cam - centre)
        m = (rb.T @ rot).astype(np.float32)
        o = (rb.T @ (trans - box.center)).astype(np.float32)
        rx, ry = self._ray_x[cam][:, u0:u1], self._ray_y[cam][v0:v1]
        half = (box.wlh[1] / 2, box.wlh[0] / 2, box.wlh[2] / 2)
        ds, tmins = [], []
        t_near = t_far = None
        with np.errstate(divide="ignore", invalid="ignore"):
            for c in range(3):
                d = m[c, 0] * rx + m[c, 1] * ry + m[c, 2]
                inv = np.float32(1.0) / d
                t1 = (np.float32(-half[c]) - o[c]) * inv
                t2 = (np.float32(half[c]) - o[c]) * inv
                tmin = np.minimum(t1, t2)
                t_far = np.maximum(t1, t2) if t_far is None else np.minimum(t_far, np.maximum(t1, t2))
                t_near = tmin if t_near is None else np.maximum(t_near, tmin)
                ds.append(d)
                tmins.append(tmin)
        zbuf = depth[v0:v1, u0:u1]
        hit = (t_near <= t_far) & (t_near > 0.05) & (t_near < zbuf)
        if not hit.any():
            return
        # Lambert shade of the entered face (the slab entered last); its outward normal faces the ray
        shade = []
        for c in range(3):
            lit = [0.42 + 0.58 * max(0.0, float(sgn * rb[:, c] @ _SUN)) for sgn in (1.0, -1.0)]
            shade.append(np.where(ds[c] < 0, np.float32(lit[0]), np.float32(lit[1])))
        is_x, is_y = tmins[0] == t_near, tmins[1] == t_near
        factor = np.where(is_x, shade[0], np.where(is_y, shade[1], shade[2]))
        # detail: a dark underbody strip and, on tall vehicles' sides, a window band
        rel_h = (o[2] + t_near * ds[2] + np.float32(half[2])) / np.float32(2 * half[2])
        factor = np.where(rel_h < 0.14, factor * np.float32(0.45), factor)
        if box.cls in ("car", "truck", "bus", "construction_vehicle"):
            band = (is_x | is_y) & (rel_h > 0.58) & (rel_h < 0.86)
            factor = np.where(band, factor * np.float32(0.5), factor)
        color = np.asarray(box.color, dtype=np.float32) * factor[..., None]
        img[v0:v1, u0:u1] = np.where(hit[..., None], color, img[v0:v1, u0:u1])
        depth[v0:v1, u0:u1] = np.where(hit, t_near, zbuf)
        ids[v0:v1, u0:u1][hit] = box.actor

    # -------------------------------------------------------------------------------------- LiDAR
    def lidar_returns(self, scene: _Scene, frame: int,
                      boxes: list[ObjectBox]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ray-cast the 32-beam LiDAR: (points [N, 5] in the LiDAR frame, first-hit counts, unoccluded counts).

        Counts are per box (``boxes`` order). Points are the object returns only (x, y, z, intensity, ring).
        Each box is tested only against the azimuth columns it spans.
        """
        ego_t, ego_yaw = self.ego_pose(scene, frame * _KEYFRAME_US / 1e6)
        origin = _rot_z(ego_yaw) @ np.array(_LIDAR_TRANSLATION) + ego_t
        yaw0 = ego_yaw + _LIDAR_YAW  # global azimuth of the LiDAR's x axis
        n_el, n_az = len(_LIDAR_ELEVATIONS), len(_LIDAR_AZIMUTHS)
        cos_el, sin_el = np.cos(_LIDAR_ELEVATIONS)[:, None], np.sin(_LIDAR_ELEVATIONS)[:, None]
        with np.errstate(divide="ignore"):
            t_ground = np.where(sin_el < 0, -origin[2] / sin_el, np.inf)  # [n_el, 1]
        limit = np.minimum(t_ground, _LIDAR_RANGE)
        best = np.broadcast_to(limit, (n_el, n_az)).copy()
        owner = np.full((n_el, n_az), -1)
        alone = np.zeros(len(boxes), dtype=np.int64)
        step = 2 * math.pi / n_az
        for i, b in enumerate(boxes):
            corners = _corners(b.center, b.wlh, b.yaw)
            rel = np.arctan2(corners[:, 1] - origin[1], corners[:, 0] - origin[0]) - yaw0
            ref = rel[0]
            rel = ref + (rel - ref + math.pi) % (2 * math.pi) - math.pi
            lo = math.floor((rel.min() + math.pi) / step) - 1
            hi = math.ceil((rel.max() + math.pi) / step) + 1
            cols = np.arange(lo, hi + 1) % n_az
            az = _LIDAR_AZIMUTHS[cols][None, :] + yaw0
            dx, dy = cos_el * np.cos(az), cos_el * np.sin(az)
            dz = np.broadcast_to(sin_el, dx.shape)
            rb = _rot_z(b.yaw)
            o = rb.T @ (origin - b.center)
            half = (b.wlh[1] / 2, b.wlh[0] / 2, b.wlh[2] / 2)
            t_near = t_far = None
            with np.errstate(divide="ignore", invalid="ignore"):
                for c, d in enumerate((rb[0, c_] * dx + rb[1, c_] * dy + rb[2, c_] * dz for c_ in range(3))):
                    t1, t2 = (-half[c] - o[c]) / d, (half[c] - o[c]) / d
                    tmin, tmax = np.minimum(t1, t2), np.maximum(t1, t2)
                    t_near = tmin if t_near is None else np.maximum(t_near, tmin)
                    t_far = tmax if t_far is None else np.minimum(t_far, tmax)
            ok = (t_near <= t_far) & (t_near > 0) & (t_near < limit)
            alone[i] = int(ok.sum())
            cur = best[:, cols]
            closer = ok & (t_near < cur)
            best[:, cols] = np.where(closer, t_near, cur)
            owner[:, cols] = np.where(closer, i, owner[:, cols])
        hit = owner >= 0
        counts = np.bincount(owner[hit], minlength=len(boxes)).astype(np.int64)
        el_idx, az_idx = np.nonzero(hit)
        rng_ = best[hit]
        el, az = _LIDAR_ELEVATIONS[el_idx], _LIDAR_AZIMUTHS[az_idx]
        points = np.stack([rng_ * np.cos(el) * np.cos(az), rng_ * np.cos(el) * np.sin(az), rng_ * np.sin(el),
                           np.full(len(rng_), 50.0), el_idx.astype(np.float64)], axis=1).astype(np.float32)
        return points, counts, alone


def _attribute(cls: str, moving: bool, rng: np.random.Generator) -> str:
    if cls in ("car", "truck", "bus", "construction_vehicle", "trailer"):
        return "vehicle.moving" if moving else ("vehicle.parked" if rng.random() < 0.8 else "vehicle.stopped")
    if cls in ("motorcycle", "bicycle"):
        return "cycle.with_rider" if moving else "cycle.without_rider"
    if cls == "pedestrian":
        return "pedestrian.moving" if moving else "pedestrian.standing"
    return ""


def _corners(center: np.ndarray, wlh, yaw: float) -> np.ndarray:
    w, l, h = wlh
    x = np.array([1, 1, 1, 1, -1, -1, -1, -1]) * l / 2
    y = np.array([1, -1, -1, 1, 1, -1, -1, 1]) * w / 2
    z = np.array([1, 1, -1, -1, 1, 1, -1, -1]) * h / 2
    return np.stack([x, y, z], 1) @ _rot_z(yaw).T + center


def _hash_noise(ix: np.ndarray, iy: np.ndarray, salt: int) -> np.ndarray:
    """Value noise in [-0.5, 0.5) from integer cell coordinates (a cheap wrapping uint32 hash)."""
    hsh = ix.astype(np.int32).view(np.uint32) * np.uint32(73856093)
    hsh ^= iy.astype(np.int32).view(np.uint32) * np.uint32(19349663)
    hsh ^= np.uint32((salt * 83492791) & 0xFFFFFFFF)
    hsh ^= hsh >> np.uint32(13)
    hsh *= np.uint32(1274126177)
    return ((hsh >> np.uint32(16)) & np.uint32(255)).astype(np.float32) / np.float32(256.0) - np.float32(0.5)


# Ground materials: base RGB and noise amplitude (grass, sidewalk, grout, kerb, asphalt, yellow, white).
_MATERIAL_RGB = np.array(
    [[92, 112, 62], [158, 154, 146], [110, 108, 104], [185, 185, 180], [84, 85, 88], [215, 180, 40], [225, 225, 220]],
    dtype=np.float32,
)
_MATERIAL_NOISE = np.array([40.0, 14.0, 0.0, 0.0, 22.0, 0.0, 0.0], dtype=np.float32)


def _ground_color(road: _Road, gx: np.ndarray, gy: np.ndarray, seed: int) -> np.ndarray:
    """RGB [N, 3] of ground points: asphalt with lane marks, kerb, sidewalk tiles, grass (world-fixed)."""
    s, l = road.to_road(gx, gy)
    al = np.abs(l)
    mat = np.zeros(len(gx), dtype=np.uint8)  # grass
    mat[al <= 11.0] = 1  # sidewalk
    grout = (np.mod(s, np.float32(1.5)) < 0.06) | (np.mod(l, np.float32(1.5)) < 0.06)
    mat[(mat == 1) & grout] = 2
    mat[al <= 7.2] = 3  # kerb
    on_road = al <= 7.0
    mat[on_road] = 4
    mat[on_road & (np.abs(al - np.float32(0.15)) < 0.06)] = 5  # double yellow centre line
    dashed = (np.abs(al - np.float32(3.5)) < 0.075) & (np.mod(s, np.float32(9.0)) < 3.0)
    mat[on_road & (dashed | (np.abs(al - np.float32(6.8)) < 0.075))] = 6  # lane lines, edge lines
    noise = _hash_noise(np.floor(gx * 3.0), np.floor(gy * 3.0), seed) * np.float32(0.6)
    noise += _hash_noise(np.floor(gx * 0.5), np.floor(gy * 0.5), seed + 1) * np.float32(0.4)
    return _MATERIAL_RGB[mat] + (_MATERIAL_NOISE[mat] * noise)[:, None]


# ------------------------------------------------------------------------------------------------ writing
def _token(seed: int, *parts) -> str:
    return hashlib.md5("/".join(str(p) for p in (seed, *parts)).encode()).hexdigest()


def _scene_lengths(num_scenes: int, samples_per_scene: int, num_samples: int | None) -> list[int]:
    if num_scenes < 1:
        raise ValueError(f"num_scenes must be >= 1, got {num_scenes}")
    if samples_per_scene < 1:
        raise ValueError(f"samples_per_scene must be >= 1, got {samples_per_scene}")
    lengths = [samples_per_scene] * num_scenes
    if num_samples is not None:
        if not 1 <= num_samples <= num_scenes * samples_per_scene:
            raise ValueError(
                f"num_samples must be in [1, num_scenes * samples_per_scene = {num_scenes * samples_per_scene}], "
                f"got {num_samples}"
            )
        lengths = []
        left = num_samples
        while left > 0:
            lengths.append(min(samples_per_scene, left))
            left -= lengths[-1]
    return lengths


def _manifest(seed: int, lengths: list[int], image_size: tuple[int, int], image_format: str, quality: int) -> dict:
    return {
        "image_format": image_format,
        "jpeg_quality": quality if image_format == "jpg" else None,
        "generator": "bevdeploy.data.synthetic",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "scene_lengths": lengths,
        "image_size": list(image_size),
        "version": SYNTHETIC_VERSION,
        "split": SYNTHETIC_SPLIT,
    }


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, separators=(",", ":"))


_WORKER_WORLD: SyntheticWorld | None = None


def _render_job(args: tuple[int, int, str, str, int]) -> tuple[int, int, list, list, list]:
    """Render and write one sample's images and LiDAR file; return its per-box counts (worker-safe)."""
    scene_index, frame, root, image_format, quality = args
    world = _WORKER_WORLD
    assert world is not None
    return _render_and_write(world, scene_index, frame, Path(root), image_format, quality)


def _render_and_write(world: SyntheticWorld, scene_index: int, frame: int, root: Path, image_format: str,
                      quality: int):
    from PIL import Image

    scene = world.scenes[scene_index]
    ts = world.timestamp(scene, frame)
    boxes = world.boxes(scene, frame)
    for cam, image in zip(CAMERA_NAMES, world.render(scene_index, frame)):
        path = root / _file_name(world.seed, scene, cam, ts, image_format)
        if image_format == "jpg":
            Image.fromarray(image).save(path, quality=quality)
        else:
            Image.fromarray(image).save(path, compress_level=1)
    points, counts, alone = world.lidar_returns(scene, frame, boxes)
    points.tofile(root / _file_name(world.seed, scene, "LIDAR_TOP", ts, "pcd.bin"))
    return scene_index, frame, [b.actor for b in boxes], counts.tolist(), alone.tolist()


def _file_name(seed: int, scene: _Scene, channel: str, ts: int, ext: str) -> str:
    return f"samples/{channel}/synthetic-s{seed}-{scene.name}__{channel}__{ts}.{ext}"


def generate(
    out_dir: str | Path,
    num_scenes: int,
    samples_per_scene: int,
    seed: int = 0,
    image_size: tuple[int, int] = (900, 1600),
    *,
    num_samples: int | None = None,
    workers: int = 1,
    image_format: str = "jpg",
    jpeg_quality: int = 92,
    progress: bool = True,
) -> Path:
    """Write a synthetic nuScenes-format dataset (cached: the same parameters reuse the directory).

    Args:
        out_dir: Dataset root to create (tables under ``out_dir/SYNTHETIC_VERSION``). If it already holds
            a complete world of the same parameters it is returned untouched.
        num_scenes: Scenes (at most 150; they carry the nuScenes val scene names).
        samples_per_scene: Key frames per scene (2 Hz).
        seed: World seed: same parameters and seed give the same bytes.
        image_size: (H, W) of the camera images; intrinsics scale from nuScenes' 1600x900.
        num_samples: Total key frames if fewer than ``num_scenes * samples_per_scene`` (scenes are
            filled in order and the last one is cut short; unused scenes are not written).
        workers: Processes rendering in parallel (results do not depend on it).
        image_format: ``"jpg"`` (as nuScenes) or ``"png"`` (lossless: exact pixels, larger files).
        jpeg_quality: JPEG quality of the camera images.
        progress: Show a progress bar.

    Returns:
        ``out_dir`` as a Path: load it with ``load_infos(out_dir, SYNTHETIC_VERSION, SYNTHETIC_SPLIT)``.

    Raises:
        ValueError: Bad sizes, or ``out_dir`` holds something else (another world or foreign files).
    """
    lengths = _scene_lengths(int(num_scenes), int(samples_per_scene), num_samples)
    image_size = _check_image_size(image_size)
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    root = Path(out_dir).expanduser().absolute()
    manifest = _manifest(int(seed), lengths, image_size, image_format, int(jpeg_quality))
    marker = root / _MANIFEST
    if marker.is_file():
        with open(marker) as f:
            old = json.load(f)
        if old == manifest:
            return root
        if old.get("generator") != manifest["generator"]:
            raise ValueError(f"{str(marker)!r} is not a bevdeploy synthetic world; choose another out_dir")
        _remove_world(root)  # same generator, other parameters: regenerate in place
    elif root.exists() and any(p.name != ".in_progress" for p in root.iterdir()):
        if not (root / ".in_progress").exists():
            raise ValueError(f"out_dir {str(root)!r} exists and is not an (unfinished) synthetic world")
        _remove_world(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / ".in_progress").touch()

    world = SyntheticWorld(lengths, seed=int(seed), image_size=image_size)
    for channel in (*CAMERA_NAMES, "LIDAR_TOP"):
        (root / "samples" / channel).mkdir(parents=True, exist_ok=True)
    jobs = [(s.index, f, str(root), image_format, int(jpeg_quality))
            for s in world.scenes for f in range(s.num_samples)]
    results: dict[tuple[int, int], tuple[list, list, list]] = {}
    bar = tqdm(total=len(jobs), desc="synthetic world", unit="sample", disable=not progress)
    if workers == 1:
        for sc, fr, *_ in jobs:
            _, _, actors, counts, alone = _render_and_write(world, sc, fr, root, image_format, int(jpeg_quality))
            results[(sc, fr)] = (actors, counts, alone)
            bar.update(1)
    else:
        import multiprocessing as mp

        global _WORKER_WORLD
        _WORKER_WORLD = world
        try:
            with mp.get_context("fork").Pool(workers) as pool:
                for sc, fr, actors, counts, alone in pool.imap_unordered(_render_job, jobs):
                    results[(sc, fr)] = (actors, counts, alone)
                    bar.update(1)
        finally:
            _WORKER_WORLD = None
    bar.close()
    _write_tables(world, root, results, image_format)
    (root / ".in_progress").unlink()
    _write_json(marker, manifest)
    return root


def _remove_world(root: Path) -> None:
    for name in ("samples", "maps", "can_bus", SYNTHETIC_VERSION):
        if (root / name).exists():
            shutil.rmtree(root / name)
    for name in (_MANIFEST, ".in_progress"):
        if (root / name).exists():
            (root / name).unlink()


def _write_tables(world: SyntheticWorld, root: Path, results: dict, image_format: str) -> None:
    """The devkit's 13 tables, the CAN bus pose streams, splits.json and a placeholder map mask."""
    seed = world.seed
    tok = lambda *p: _token(seed, *p)  # noqa: E731
    table_dir = root / SYNTHETIC_VERSION
    table_dir.mkdir(parents=True, exist_ok=True)
    (root / "maps").mkdir(exist_ok=True)
    (root / "can_bus").mkdir(exist_ok=True)

    category = [{"token": tok("category", c), "name": CATEGORY_OF_CLASS[c], "description": f"synthetic {c}"}
                for c in CLASS_NAMES]
    attr_names = ["vehicle.moving", "vehicle.parked", "vehicle.stopped", "cycle.with_rider", "cycle.without_rider",
                  "pedestrian.moving", "pedestrian.standing", "pedestrian.sitting_lying_down"]
    attribute = [{"token": tok("attribute", a), "name": a, "description": a} for a in attr_names]
    levels = ["v0-40", "v40-60", "v60-80", "v80-100"]
    visibility = [{"token": str(i + 1), "level": lv, "description": f"visibility of whole object is {lv}"}
                  for i, lv in enumerate(levels)]
    channels = [*CAMERA_NAMES, "LIDAR_TOP"]
    sensor = [{"token": tok("sensor", c), "channel": c, "modality": "lidar" if c == "LIDAR_TOP" else "camera"}
              for c in channels]
    calibrated = []
    for i, c in enumerate(CAMERA_NAMES):
        calibrated.append({
            "token": tok("calibrated_sensor", c), "sensor_token": tok("sensor", c),
            "translation": [float(v) for v in world.rig.translations[i]],
            "rotation": _matrix_to_quaternion(world.rig.rotations[i]),
            "camera_intrinsic": world.rig.intrinsics[i].tolist(),
        })
    calibrated.append({"token": tok("calibrated_sensor", "LIDAR_TOP"), "sensor_token": tok("sensor", "LIDAR_TOP"),
                       "translation": list(_LIDAR_TRANSLATION), "rotation": _yaw_quaternion(_LIDAR_YAW),
                       "camera_intrinsic": []})
    map_token = tok("map")
    placeholder = "maps/synthetic-placeholder.png"
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(root / placeholder)

    log, scene_tab, sample_tab, sample_data, ego_pose = [], [], [], [], []
    sample_annotation, instance = [], []
    h, w = world.image_size
    for scene in world.scenes:
        sc = scene.index
        log_token = tok("log", sc)
        log.append({"token": log_token, "logfile": f"synthetic-s{seed}-{scene.name}", "vehicle": "synthetic",
                    "date_captured": "2018-09-01", "location": "synthetic"})
        sample_tokens = [tok("sample", sc, f) for f in range(scene.num_samples)]
        scene_tab.append({"token": tok("scene", sc), "log_token": log_token, "nbr_samples": scene.num_samples,
                          "first_sample_token": sample_tokens[0], "last_sample_token": sample_tokens[-1],
                          "name": scene.name, "description": f"synthetic world seed {seed}"})
        ann_by_actor: dict[int, list[tuple[int, str, ObjectBox, int, float]]] = {}
        for f in range(scene.num_samples):
            ts = world.timestamp(scene, f)
            sample_tab.append({"token": sample_tokens[f], "timestamp": ts,
                               "prev": sample_tokens[f - 1] if f > 0 else "",
                               "next": sample_tokens[f + 1] if f + 1 < scene.num_samples else "",
                               "scene_token": tok("scene", sc)})
            ego_t, ego_yaw = world.ego_pose(scene, f * _KEYFRAME_US / 1e6)
            pose_token = tok("ego_pose", sc, f)
            ego_pose.append({"token": pose_token, "timestamp": ts, "rotation": _yaw_quaternion(ego_yaw),
                             "translation": [float(v) for v in ego_t]})
            for c in channels:
                is_lidar = c == "LIDAR_TOP"
                sample_data.append({
                    "token": tok("sample_data", sc, f, c), "sample_token": sample_tokens[f],
                    "ego_pose_token": pose_token, "calibrated_sensor_token": tok("calibrated_sensor", c),
                    "timestamp": ts, "fileformat": "pcd" if is_lidar else image_format, "is_key_frame": True,
                    "height": 0 if is_lidar else h, "width": 0 if is_lidar else w,
                    "filename": _file_name(seed, scene, c, ts, "pcd.bin" if is_lidar else image_format),
                    "prev": tok("sample_data", sc, f - 1, c) if f > 0 else "",
                    "next": tok("sample_data", sc, f + 1, c) if f + 1 < scene.num_samples else "",
                })
            actors, counts, alone = results[(sc, f)]
            boxes = {b.actor: b for b in world.boxes(scene, f)}
            for a, n, n_alone in zip(actors, counts, alone):
                vis = n / n_alone if n_alone > 0 else 0.0
                ann_by_actor.setdefault(a, []).append((f, tok("sample_annotation", sc, f, a), boxes[a], n, vis))
        for a, anns in sorted(ann_by_actor.items()):
            inst_token = tok("instance", sc, a)
            cls = scene.actors[a].cls
            instance.append({"token": inst_token, "category_token": tok("category", cls), "nbr_annotations": len(anns),
                             "first_annotation_token": anns[0][1], "last_annotation_token": anns[-1][1]})
            for j, (f, ann_token, box, n, vis) in enumerate(anns):
                linked_prev = j > 0 and anns[j - 1][0] == f - 1
                linked_next = j + 1 < len(anns) and anns[j + 1][0] == f + 1
                sample_annotation.append({
                    "token": ann_token, "sample_token": sample_tokens[f], "instance_token": inst_token,
                    "visibility_token": str(1 + int(np.digitize(vis, [0.4, 0.6, 0.8]))),
                    "attribute_tokens": [tok("attribute", box.attribute)] if box.attribute else [],
                    "translation": [float(v) for v in box.center], "size": [float(v) for v in box.wlh],
                    "rotation": _yaw_quaternion(box.yaw),
                    "prev": anns[j - 1][1] if linked_prev else "", "next": anns[j + 1][1] if linked_next else "",
                    "num_lidar_pts": int(n), "num_radar_pts": 0,
                })
        _write_json(root / "can_bus" / f"{scene.name}_pose.json", _can_bus_poses(world, scene))
    map_tab = [{"token": map_token, "log_tokens": [r["token"] for r in log], "category": "semantic_prior",
                "filename": placeholder}]
    tables = {"category": category, "attribute": attribute, "visibility": visibility, "instance": instance,
              "sensor": sensor, "calibrated_sensor": calibrated, "ego_pose": ego_pose, "log": log,
              "scene": scene_tab, "sample": sample_tab, "sample_data": sample_data,
              "sample_annotation": sample_annotation, "map": map_tab}
    for name, rows in tables.items():
        _write_json(table_dir / f"{name}.json", rows)
    _write_json(table_dir / "splits.json", {"synthetic": [s.name for s in world.scenes]})


def _can_bus_poses(world: SyntheticWorld, scene: _Scene) -> list[dict]:
    """A 10 Hz CAN bus ``pose`` stream (global pos/orientation; ego-frame vel, accel, rotation rate)."""
    start = world.timestamp(scene, 0) - 100_000
    end = world.timestamp(scene, scene.num_samples - 1) + 200_000
    yaw_rate = scene.ego_speed * scene.road.kappa
    out = []
    for utime in range(start, end + 1, 100_000):
        t = (utime - scene.start_us) / 1e6
        pos, yaw = world.ego_pose(scene, t)
        out.append({
            "accel": [0.0, float(scene.ego_speed * yaw_rate), 9.81],
            "orientation": _yaw_quaternion(yaw),
            "pos": [float(v) for v in pos],
            "rotation_rate": [0.0, 0.0, float(yaw_rate)],
            "utime": int(utime),
            "vel": [float(scene.ego_speed), 0.0, 0.0],
        })
    return out


# ------------------------------------------------------------------------------------------------ data specs
def split_seed(spec: str) -> tuple[str, int | None]:
    """``"synthetic:N@S"`` -> ``("synthetic:N", S)``; a spec without ``@`` -> ``(spec, None)``.

    The world seed in the spec lets training and evaluation name different worlds (different
    scenes and tokens) through one data argument.

    Raises:
        ValueError: A seed on a non-synthetic spec, or a seed that is not a non-negative integer.
    """
    if not isinstance(spec, str):
        raise ValueError(f"data spec must be a string, got {type(spec).__name__}")
    base, at, seed = spec.strip().rpartition("@")
    if not at:
        return spec, None
    if not base.lower().startswith("synthetic"):
        raise ValueError(f"data spec {spec!r}: only 'synthetic[:N]@SEED' takes a world seed")
    if not seed.isdigit():
        raise ValueError(f"data spec {spec!r}: the world seed after '@' must be a non-negative integer, got {seed!r}")
    return base, int(seed)


def parse_data_spec(spec: str) -> tuple[str, int | Path]:
    """Parse the CLI's data argument.

    ``"synthetic"`` -> ``("synthetic", DEFAULT_NUM_SAMPLES)``; ``"synthetic:N"`` -> ``("synthetic", N)``
    (N samples; ``"synthetic:N@SEED"``: the world seed, see :func:`split_seed`, read by
    :func:`resolve_data_spec`); ``"nuscenes:PATH[@version][:split][:N]"`` -> ``("nuscenes", NuScenesSpec)``
    (:func:`bevdeploy.data.nuscenes.parse_nuscenes_spec`).

    Raises:
        ValueError: Any other form, N not a positive integer, or an empty PATH.
    """
    if not isinstance(spec, str):
        raise ValueError(f"data spec must be a string, got {type(spec).__name__}")
    if not spec.strip().lower().startswith("nuscenes"):
        spec, _ = split_seed(spec)
    kind, sep, arg = spec.strip().partition(":")
    kind = kind.lower()
    if kind == "synthetic":
        if not sep:
            return "synthetic", DEFAULT_NUM_SAMPLES
        try:
            n = int(arg)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"data spec {spec!r}: 'synthetic:N' needs a positive integer number of samples N")
        return "synthetic", n
    if kind == "nuscenes":
        from bevdeploy.data.nuscenes import parse_nuscenes_spec

        return "nuscenes", parse_nuscenes_spec(arg, spec)
    raise ValueError(f"data spec {spec!r} not understood: use 'synthetic', 'synthetic:N[@SEED]' or "
                     "'nuscenes:PATH[@version][:split][:N]'")


@dataclass(frozen=True)
class DataSource:
    """Where a data spec's samples live: pass the three to :func:`bevdeploy.data.nuscenes.load_infos`."""

    dataroot: Path
    version: str
    split: str
    num_samples: int | None = field(default=None)

    def infos(self, *, progress: bool = False, spec: str | None = None) -> list[dict]:
        """The samples' infos in temporal order, the first ``num_samples`` when the spec names a count.

        Raises:
            ValueError: there are none (``spec``, the data spec, names the data in the message).
        """
        from bevdeploy.data.nuscenes import load_infos

        infos = load_infos(self.dataroot, self.version, self.split, progress=progress)
        if self.num_samples is not None:
            infos = infos[: self.num_samples]
        if not infos:
            raise ValueError(f"data {spec or str(self.dataroot)!r} holds no samples")
        return infos


def default_cache_dir() -> Path:
    """Root of cached synthetic worlds: ``$BEVDEPLOY_CACHE`` or ``~/.cache/bevdeploy``, then ``synthetic/``."""
    base = os.environ.get("BEVDEPLOY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "bevdeploy")
    return Path(base) / "synthetic"


def resolve_data_spec(
    spec: str,
    *,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    image_size: tuple[int, int] = (900, 1600),
    samples_per_scene: int = DEFAULT_SAMPLES_PER_SCENE,
    workers: int = 1,
    progress: bool = True,
    calibration: bool = False,
) -> DataSource:
    """Turn a data spec into a dataset on disk, generating (or reusing) the synthetic world if asked.

    A ``synthetic:N@SEED`` spec's seed overrides ``seed`` (worlds of different seeds share no
    scene, sample or annotation token). Real nuScenes: the spec's version, else ``v1.0-trainval`` if
    that folder exists, else ``v1.0-mini``; the spec's split, else ``val`` / ``mini_val`` / ``test``
    (with ``calibration``: ``train`` / ``mini_train`` when the tables hold such scenes); the spec's
    sample count, else all.

    Raises:
        ValueError: Bad spec. FileNotFoundError: the nuScenes PATH or its tables are missing.
    """
    kind, arg = parse_data_spec(spec)
    spec_seed = split_seed(spec)[1] if kind == "synthetic" else None
    seed = int(seed if spec_seed is None else spec_seed)
    if kind == "nuscenes":
        from bevdeploy.data.nuscenes import default_split

        root = Path(arg.root).absolute()
        if not root.is_dir():
            raise FileNotFoundError(f"nuScenes dataroot {str(root)!r} does not exist")
        version = arg.version
        if version is None:
            version = next((v for v in ("v1.0-trainval", "v1.0-mini") if (root / v).is_dir()), None)
            if version is None:
                found = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("v1.0"))
                raise FileNotFoundError(f"no v1.0-trainval or v1.0-mini tables under the nuScenes dataroot {str(root)!r}"
                                        + (f"; choose a version: {', '.join(f'nuscenes:{root}@{v}' for v in found)}"
                                           if found else ""))
        elif not (root / version).is_dir():
            raise FileNotFoundError(f"no {version!r} tables under the nuScenes dataroot {str(root)!r}")
        split = arg.split or default_split(root, version, calibration=calibration)
        return DataSource(root, version, split, arg.num_samples)
    n = int(arg)
    image_size = _check_image_size(image_size)
    # longer scenes when N needs more than the 150 scene names
    samples_per_scene = max(int(samples_per_scene), math.ceil(n / len(_scene_names())))
    num_scenes = math.ceil(n / samples_per_scene)
    key = f"seed{seed}-n{n}x{samples_per_scene}-{image_size[0]}x{image_size[1]}-g{GENERATOR_VERSION}"
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = generate(base / key, num_scenes, samples_per_scene, seed=seed, image_size=image_size, num_samples=n,
                    workers=workers, progress=progress)
    return DataSource(root, SYNTHETIC_VERSION, SYNTHETIC_SPLIT, n)

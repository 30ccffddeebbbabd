"""BEVDet's test-time inputs from an info record: images, camera parameters, and the box frame.

Shared by real and synthetic data. What BEVDet dev2.1 (HuangJunJie2017/BEVDet,
``mmdet3d/datasets/pipelines/loading.py``: ``PrepareImageInputs`` with ``is_train=False``,
``LoadAnnotationsBEVDepth`` at test time; ``mmdet3d/models/detectors/bevdet.py``:
``prepare_inputs``; ``mmdet3d/datasets/nuscenes_dataset.py``: ``_format_bbox``) does per sample:

- cameras in BEVDet's order (:data:`BEVDET_CAMERAS`, ``data_config['cams']``), which differs
  from the info converter's :data:`~bevdeploy.data.nuscenes.CAMERA_NAMES`.
- image: ``resize = 704 / W + resize_test`` (0.44 on 1600x900), PIL ``Image.resize`` to
  ``(int(W * resize), int(H * resize))`` (Pillow's default filter, bicubic), crop
  ``(crop_w, crop_h, crop_w + 704, crop_h + 256)`` with ``crop_h = int((1 - mean(crop_h_range))
  * newH) - 256`` (the bottom 256 rows: 140 on 900 rows) and ``crop_w = int(max(0, newW - 704) /
  2)``; no flip, no rotation. Then mmcv ``imnormalize(mean=[123.675, 116.28, 103.53],
  std=[58.395, 57.12, 57.375], to_rgb=True)`` on the PIL RGB array: ``to_rgb`` swaps channels 0 and
  2, so the network sees **B, G, R** with the RGB means - an official quirk the trained weights
  expect, reproduced here (``swap_rb``).
- ``post_rot = diag(resize, resize, 1)``, ``post_tran = (-crop_w, -crop_h, 0)``: original pixel ->
  network pixel.
- ``sensor2ego``: each camera -> the KEY ego frame, ``inv(ego2global[cam0]) @ ego2global[cam] @
  sensor2ego[cam]`` (cam0 = CAM_FRONT_LEFT; per-camera ego poses at each camera's timestamp),
  ``intrinsics`` the original ``cam_intrinsic``; ``bda`` identity.
- the boxes the model predicts are read in CAM_FRONT's ego frame (``ego_cam``) when they are
  formatted; :func:`bev2lidar` moves them to the sample's LiDAR frame (the project's box contract).

``ego_motion=False`` drops the per-camera ego poses (every camera's ``sensor2ego`` is its
calibration): the camera parameters, and so BEVDet's cached BEVPool indices, then stay fixed for a
whole calibration instead of changing every frame, at the cost of the ego motion between the six
exposures (up to ~40 ms of driving).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .nuscenes import load_images, quaternion_to_matrix

__all__ = [
    "BEVDET_CAMERAS",
    "BEVDET_R50",
    "BEVDetPreprocess",
    "GEOMETRY_KEYS",
    "bev2lidar",
    "camera_inputs",
    "image_augmentation",
    "prepare_bevdet_inputs",
    "stack_bevdet_inputs",
    "transform_image",
]

#: BEVDet's camera order (``data_config['cams']``): image index = position here.
BEVDET_CAMERAS: tuple[str, ...] = (
    "CAM_FRONT_LEFT",
    "CAM_FRONT",
    "CAM_FRONT_RIGHT",
    "CAM_BACK_LEFT",
    "CAM_BACK",
    "CAM_BACK_RIGHT",
)


#: The camera-geometry entries of :func:`prepare_bevdet_inputs`, in ``BEVDet.prepare``'s argument order.
GEOMETRY_KEYS = ("sensor2ego", "intrinsics", "post_rots", "post_trans", "bda")


@dataclass(frozen=True)
class BEVDetPreprocess:
    """BEVDet's test pipeline settings (dev2.1 ``data_config`` and ``mmlabNormalize``).

    Attributes:
        input_size: (H, W) of the network input.
        resize_test: Added to the fit-to-width scale (``data_config['resize_test']``).
        crop_h: ``data_config['crop_h']``: the test crop keeps rows from ``(1 - mean(crop_h)) * newH
            - H``, i.e. the bottom ``H`` rows for (0, 0).
        mean, std: Per-channel normalisation, applied to the channels in the order the network sees.
        swap_rb: Swap channels 0 and 2 of the RGB image before normalising (mmcv ``to_rgb=True`` on
            PIL's RGB array): the network sees BGR.
        cameras: Camera order of the image tensor; the first is the key ego camera.
        ego_cam: Camera whose ego pose is the frame of the predicted boxes.
        src_size: (H, W) of the original images, used when no image is given (geometry only).
    """

    input_size: tuple[int, int] = (256, 704)
    resize_test: float = 0.0
    crop_h: tuple[float, float] = (0.0, 0.0)
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    swap_rb: bool = True
    cameras: tuple[str, ...] = BEVDET_CAMERAS
    ego_cam: str = "CAM_FRONT"
    src_size: tuple[int, int] = (900, 1600)

    def __post_init__(self) -> None:
        if len(self.input_size) != 2 or min(self.input_size) < 1:
            raise ValueError(f"input_size must be (H, W) of positive ints, got {self.input_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(not s > 0 for s in self.std):
            raise ValueError(f"mean and std need 3 values, std > 0; got {self.mean=} {self.std=}")
        if not self.cameras:
            raise ValueError("cameras must name at least one camera")
        if self.ego_cam not in self.cameras:
            raise ValueError(f"ego_cam {self.ego_cam!r} must be one of cameras {self.cameras}")


#: BEVDet-R50-CBGS (dev2.1 ``configs/bevdet/bevdet-r50-cbgs.py``).
BEVDET_R50 = BEVDetPreprocess()


def image_augmentation(height: int, width: int, config: BEVDetPreprocess = BEVDET_R50):
    """The test-time resize and crop of one image (``PrepareImageInputs.sample_augmentation``).

    Returns:
        ``(resize, (new_w, new_h), (x0, y0, x1, y1))``: scale, resized size, and the crop box.
    """
    fH, fW = config.input_size
    resize = float(fW) / float(width) + config.resize_test
    new_w, new_h = int(width * resize), int(height * resize)
    crop_h = int((1 - float(np.mean(config.crop_h))) * new_h) - fH
    crop_w = int(max(0, new_w - fW) / 2)
    return resize, (new_w, new_h), (crop_w, crop_h, crop_w + fW, crop_h + fH)


def _post_transform(resize: float, crop: tuple[int, int, int, int]) -> tuple[Tensor, Tensor]:
    # float32 like the official (torch.eye(2) * resize, zeros(2) - crop)
    post_rot = torch.eye(3)
    post_rot[:2, :2] = torch.eye(2) * resize
    post_tran = torch.zeros(3)
    post_tran[:2] = -torch.tensor(crop[:2], dtype=torch.float32)
    return post_rot, post_tran


def transform_image(image: np.ndarray, config: BEVDetPreprocess = BEVDET_R50) -> tuple[Tensor, Tensor, Tensor]:
    """Resize, crop and normalise one camera image as BEVDet's test pipeline.

    Args:
        image: uint8 ``[H, W, 3]`` RGB (e.g. from :func:`bevdeploy.data.nuscenes.load_images`).
        config: The pipeline settings.

    Returns:
        ``(image [3, h, w] float32, post_rot [3, 3], post_tran [3])``.
    """
    from PIL import Image

    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"image must be a uint8 [H, W, 3] RGB array, got {arr.dtype} {list(arr.shape)}")
    H, W = arr.shape[:2]
    resize, size, crop = image_augmentation(H, W, config)
    bicubic = getattr(Image, "Resampling", Image).BICUBIC  # Pillow < 9.1 has no Resampling
    pil = Image.fromarray(arr).resize(size, bicubic).crop(crop)
    x = np.asarray(pil, dtype=np.float32)
    if config.swap_rb:
        x = x[..., ::-1]
    x = (x - np.asarray(config.mean, dtype=np.float32)) / np.asarray(config.std, dtype=np.float32)
    post_rot, post_tran = _post_transform(resize, crop)
    return torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1).contiguous(), post_rot, post_tran


def _pose(rotation: Sequence[float], translation: Sequence[float]) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = quaternion_to_matrix(rotation)
    T[:3, 3] = np.asarray(translation, dtype=np.float64)
    return T


def _cam(info: dict, name: str) -> dict:
    cams = info.get("cams")
    if not isinstance(cams, dict):
        raise ValueError("info must have a 'cams' dict (an info record from load_infos)")
    if name not in cams:
        raise ValueError(f"info['cams'] lacks {name!r} (has {sorted(cams)})")
    return cams[name]


def camera_inputs(info: dict, config: BEVDetPreprocess = BEVDET_R50, *, ego_motion: bool = True) -> tuple[Tensor, Tensor]:
    """Per camera, camera -> key ego transform and the intrinsics (``prepare_inputs``' ``sensor2keyegos``).

    Args:
        info: An info record (``cams[*]``: ``sensor2ego_*``, ``ego2global_*``, ``cam_intrinsic``).
        config: Camera order (the first camera's ego pose is the key ego frame).
        ego_motion: Include the ego motion between the cameras' timestamps (official); False
            uses each camera's calibration alone (see the module docstring).

    Returns:
        ``sensor2ego`` Tensor[N, 4, 4] and ``intrinsics`` Tensor[N, 3, 3], float32.
    """
    key = _cam(info, config.cameras[0])
    global2key = np.linalg.inv(_pose(key["ego2global_rotation"], key["ego2global_translation"]))
    s2e, intrinsics = [], []
    for name in config.cameras:
        c = _cam(info, name)
        T = _pose(c["sensor2ego_rotation"], c["sensor2ego_translation"])
        if ego_motion:
            T = global2key @ _pose(c["ego2global_rotation"], c["ego2global_translation"]) @ T
        s2e.append(T)
        intrinsics.append(np.asarray(c["cam_intrinsic"], dtype=np.float64)[:3, :3])
    return torch.from_numpy(np.stack(s2e)).float(), torch.from_numpy(np.stack(intrinsics)).float()


def bev2lidar(info: dict, config: BEVDetPreprocess = BEVDET_R50) -> Tensor:
    """Tensor[4, 4] float64: the model's box frame (``ego_cam``'s ego pose) -> the sample's LiDAR frame.

    ``inv(lidar2ego) @ inv(ego2global) @ ego2global[ego_cam]``, as the official result formatting
    (ego_cam ego -> global) followed by the converter's global -> LiDAR.
    """
    for k in ("lidar2ego_rotation", "lidar2ego_translation", "ego2global_rotation", "ego2global_translation"):
        if k not in info:
            raise ValueError(f"info lacks {k!r} (an info record from load_infos)")
    cam = _cam(info, config.ego_cam)
    T = (
        np.linalg.inv(_pose(info["lidar2ego_rotation"], info["lidar2ego_translation"]))
        @ np.linalg.inv(_pose(info["ego2global_rotation"], info["ego2global_translation"]))
        @ _pose(cam["ego2global_rotation"], cam["ego2global_translation"])
    )
    return torch.from_numpy(T)


def prepare_bevdet_inputs(
    info: dict,
    config: BEVDetPreprocess = BEVDET_R50,
    *,
    images: Sequence[np.ndarray] | None = None,
    ego_motion: bool = True,
    load: bool = True,
) -> dict[str, Tensor]:
    """Everything BEVDet needs for one sample.

    Args:
        info: An info record (:func:`bevdeploy.data.nuscenes.load_infos` or the synthetic world).
        config: The pipeline settings (:data:`BEVDET_R50`).
        images: uint8 RGB images in ``config.cameras`` order (None: loaded with
            :func:`bevdeploy.data.nuscenes.load_images`).
        ego_motion: See :func:`camera_inputs`.
        load: With ``images=None``, False skips the images (geometry only; ``src_size`` gives
            their size) and the result has no ``image``.

    Returns:
        dict: ``image`` [N, 3, H, W] float32; ``sensor2ego`` [N, 4, 4]; ``intrinsics`` [N, 3, 3];
        ``post_rots`` [N, 3, 3]; ``post_trans`` [N, 3]; ``bda`` [3, 3] (identity); ``bev2lidar``
        [4, 4] float64. Batch samples with :func:`stack_bevdet_inputs`.
    """
    if images is None and load:
        images = load_images(info, config.cameras)
    if images is not None and len(images) != len(config.cameras):
        raise ValueError(f"images must hold one image per camera ({len(config.cameras)}), got {len(images)}")
    sensor2ego, intrinsics = camera_inputs(info, config, ego_motion=ego_motion)
    out: dict[str, Tensor] = {}
    if images is not None:
        imgs, rots, trans = zip(*(transform_image(im, config) for im in images))
        out["image"] = torch.stack(imgs)
        out["post_rots"], out["post_trans"] = torch.stack(rots), torch.stack(trans)
    else:
        resize, _, crop = image_augmentation(*config.src_size, config)
        rot, tran = _post_transform(resize, crop)
        n = len(config.cameras)
        out["post_rots"], out["post_trans"] = rot.expand(n, 3, 3).clone(), tran.expand(n, 3).clone()
    out["sensor2ego"], out["intrinsics"] = sensor2ego, intrinsics
    out["bda"] = torch.eye(3)
    out["bev2lidar"] = bev2lidar(info, config)
    return out


def stack_bevdet_inputs(samples: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Batch per-sample inputs along a new first dimension (keys of the first sample)."""
    if not samples:
        raise ValueError("samples must hold at least one sample")
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}

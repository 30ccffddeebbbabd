"""Multi-view preprocessing and the temporal host logic of BEVFormer's test loop.

Shared by real and synthetic data; everything a BEVFormer engine needs per frame comes from here:

- images: BEVFormer's test pipeline ``NormalizeMultiviewImage -> RandomScaleImageMultiViewImage(scale)
  -> PadMultiViewImage(size_divisor=32)``: normalise (tiny: ResNet-50 pytorch style, RGB,
  ``mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375]``; small/base: ResNet-101 caffe style,
  BGR, ``mean=[103.530, 116.280, 123.675], std=1``), resize bilinearly by the config's scale (tiny 0.5,
  small 0.8, base none), zero-pad bottom/right to a multiple of 32, and scale ``lidar2img`` by
  ``diag(s, s, 1, 1)``. Note: BEVFormer's ``img_shape`` (which its spatial cross-attention divides
  pixel coordinates by) is the PADDED shape, e.g. 480x800 for tiny on 900x1600 images.
- CAN bus: the dataset's ``get_data_info`` overwrites the converter's vector: ``[:3]`` = ego2global
  translation, ``[3:7]`` = ego2global rotation (w, x, y, z), ``[-2]`` = ego yaw ("patch angle") in
  radians in [0, 2 pi), ``[-1]`` = the same in degrees.
- temporal gate (``BEVFormer.forward_test``): on the first frame of a scene (scene token differs from
  the previous frame's) the previous BEV is dropped (``use_prev_bev = 0``) and ``can_bus[:3]`` and
  ``can_bus[-1]`` are zeroed; otherwise they become the deltas to the previous frame (position in the
  global frame, yaw in degrees, not wrapped, as the original). ``can_bus[-2]`` stays the absolute yaw.
- previous BEV (:func:`carry_prev_bev`, shared by the eval loop and ``Engine.step``): dropped (zeros,
  gate closed) at a scene start, when either scene token is missing, and when it holds NaN/inf (a
  closed gate alone multiplies it by 0, and ``0 * NaN`` is NaN: one bad frame would poison the rest).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .nuscenes import CAMERA_NAMES, lidar2img as _lidar2img, load_images, quaternion_to_matrix


@dataclass(frozen=True)
class ImagePreprocess:
    """How one model's test pipeline turns camera images into its input tensor.

    Attributes:
        scale: Resize factor (BEVFormer's ``RandomScaleImageMultiViewImage`` with one scale).
        mean: Per-channel mean, in the channel order the model sees (RGB if ``to_rgb`` else BGR).
        std: Per-channel std, same order.
        to_rgb: The model takes RGB (mmcv's ``to_rgb=True`` on BGR-loaded images); else BGR.
        size_divisor: Pad height and width up to a multiple of this.
    """

    scale: float = 1.0
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    to_rgb: bool = True
    size_divisor: int = 32

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values, got {self.mean=} {self.std=}")
        if any(not s > 0 for s in self.std):
            raise ValueError(f"std must be > 0, got {self.std}")
        if self.size_divisor < 1:
            raise ValueError(f"size_divisor must be >= 1, got {self.size_divisor}")

    def output_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Padded (H, W) for input images of ``image_size`` (H, W)."""
        h, w = int(image_size[0] * self.scale), int(image_size[1] * self.scale)
        d = self.size_divisor
        return math.ceil(h / d) * d, math.ceil(w / d) * d


_CAFFE = dict(mean=(103.530, 116.280, 123.675), std=(1.0, 1.0, 1.0), to_rgb=False)

#: BEVFormer's test pipelines (fundamentalvision/BEVFormer projects/configs/bevformer/*.py).
BEVFORMER_TINY = ImagePreprocess(scale=0.5, mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375), to_rgb=True)
BEVFORMER_SMALL = ImagePreprocess(scale=0.8, **_CAFFE)
BEVFORMER_BASE = ImagePreprocess(scale=1.0, **_CAFFE)
PREPROCESS: dict[str, ImagePreprocess] = {
    "bevformer-tiny": BEVFORMER_TINY,
    "bevformer-small": BEVFORMER_SMALL,
    "bevformer-base": BEVFORMER_BASE,
}


def preprocess_images(
    images: Sequence[np.ndarray], lidar2img: np.ndarray | Tensor, config: ImagePreprocess = BEVFORMER_TINY
) -> tuple[Tensor, Tensor]:
    """Normalise, resize and pad the camera images; scale the projections to match.

    Args:
        images: One uint8 ``[H, W, 3]`` RGB array per camera (all the same size), e.g. from
            :func:`bevdeploy.data.nuscenes.load_images`.
        lidar2img: ``[N, 4, 4]`` projections of the original images.
        config: The model's pipeline (:data:`PREPROCESS`).

    Returns:
        ``image`` Tensor[N, 3, H', W'] float32 (H', W' multiples of ``size_divisor``; padding is 0 after
        normalisation, as mmcv pads the normalised image) and ``lidar2img`` Tensor[N, 4, 4] float32 for
        the resized image (padding is bottom/right so it does not move pixels).
    """
    if len(images) == 0:
        raise ValueError("images must hold at least one camera image")
    shapes = {tuple(np.shape(im)) for im in images}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3 or next(iter(shapes))[2] != 3:
        raise ValueError(f"images must all be [H, W, 3] of one size, got shapes {sorted(shapes)}")
    l2i = torch.as_tensor(np.asarray(lidar2img), dtype=torch.float64)
    if l2i.shape != (len(images), 4, 4):
        raise ValueError(f"lidar2img must be [{len(images)}, 4, 4] (one per image), got {list(l2i.shape)}")
    x = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float()  # [N, 3, H, W] RGB
    if not config.to_rgb:
        x = x.flip(1)  # RGB -> BGR, the order mmcv loads and caffe-style weights expect
    mean = torch.tensor(config.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(config.std, dtype=torch.float32).view(1, 3, 1, 1)
    x = (x - mean) / std
    h, w = x.shape[-2:]
    if config.scale != 1.0:
        size = (int(h * config.scale), int(w * config.scale))
        # cv2.INTER_LINEAR (mmcv.imresize) samples at half-pixel centres without antialiasing: the same here
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
        scale = torch.diag(torch.tensor([config.scale, config.scale, 1.0, 1.0], dtype=torch.float64))
        l2i = scale @ l2i
    hp, wp = config.output_size((h, w))
    x = F.pad(x, (0, wp - x.shape[-1], 0, hp - x.shape[-2]))
    return x.contiguous(), l2i.float()


def ego_yaw_degrees(rotation: Sequence[float]) -> float:
    """BEVFormer's "patch angle": yaw of a (w, x, y, z) rotation in degrees, in [0, 360)."""
    v = quaternion_to_matrix(rotation) @ np.array([1.0, 0.0, 0.0])
    angle = math.degrees(math.atan2(v[1], v[0]))
    return angle + 360.0 if angle < 0 else angle


def bevformer_can_bus(info: dict) -> np.ndarray:
    """The CAN bus vector as BEVFormer's dataset hands it to the model, before the temporal deltas.

    Returns:
        np.float64 [18]: converter values with ``[:3]`` ego2global translation, ``[3:7]`` ego2global
        rotation, ``[-2]`` yaw in radians, ``[-1]`` yaw in degrees.
    """
    if "can_bus" not in info:
        raise ValueError("info lacks 'can_bus' (an info record from load_infos)")
    can_bus = np.array(info["can_bus"], dtype=np.float64)
    if can_bus.shape != (18,):
        raise ValueError(f"info['can_bus'] must have 18 values, got shape {can_bus.shape}")
    can_bus[:3] = info["ego2global_translation"]
    can_bus[3:7] = info["ego2global_rotation"]
    angle = ego_yaw_degrees(info["ego2global_rotation"])
    can_bus[-2] = angle / 180.0 * math.pi
    can_bus[-1] = angle
    return can_bus


def frame_inputs(info: dict, prev_info: dict | None) -> dict:
    """The temporal inputs of one frame given the frame processed before it in the same stream.

    Args:
        info: This frame's info record.
        prev_info: The previous frame fed to the model in this stream (None at the start).

    Returns:
        ``can_bus`` (np.float64 [18], deltas applied) and ``use_prev_bev`` (float 0/1): 1 only if the
        previous frame belongs to the same scene, as ``BEVFormer.forward_test`` decides.
    """
    if "scene_token" not in info or (prev_info is not None and "scene_token" not in prev_info):
        raise ValueError("info and prev_info need a 'scene_token' (info records from load_infos)")
    can_bus = bevformer_can_bus(info)
    use_prev = prev_info is not None and prev_info["scene_token"] == info["scene_token"]
    if use_prev:
        prev = bevformer_can_bus(prev_info)
        can_bus[:3] -= prev[:3]
        can_bus[-1] -= prev[-1]
    else:
        can_bus[:3] = 0.0
        can_bus[-1] = 0.0
    return {"can_bus": can_bus, "use_prev_bev": 1.0 if use_prev else 0.0}


def carry_prev_bev(
    prev_bev: Tensor | None,
    prev_scene: str | None,
    scene: str | None,
    use_prev_bev: float,
    *,
    shape: Sequence[int],
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    token: str = "",
) -> tuple[Tensor, float]:
    """The ``(prev_bev, use_prev_bev)`` to feed one frame: the carried BEV, or zeros with the gate closed.

    Reset (zeros of ``shape``, gate 0) when there is no previous BEV, the gate is already 0, either
    scene token is None or empty, the scene changed, or the previous BEV holds NaN / inf; the last
    case is reported with a RuntimeWarning naming the frame ``token``. (One host sync per frame:
    the finiteness check.)
    """
    reset = _starts_over(prev_bev is not None, prev_scene, scene, use_prev_bev)
    if not reset and not bool(torch.isfinite(prev_bev).all()):
        _warn_nonfinite(token, stacklevel=2)
        reset = True
    if reset:
        return torch.zeros(*shape, device=device, dtype=dtype), 0.0
    return prev_bev, float(use_prev_bev)


def carry_prev_bevs(
    prev_bevs: Sequence[Tensor | None],
    prev_scenes: Sequence[str | None],
    scenes: Sequence[str | None],
    use_prev_bevs: Sequence[float],
    *,
    shape: Sequence[int],
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    tokens: Sequence[str] | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`carry_prev_bev` for a batch of independent streams, stream ``i`` by its own entries.

    Args:
        prev_bevs: Each stream's previous BEV (any shape with ``prod(shape)`` elements) or None.
        prev_scenes: Each stream's previous scene token.
        scenes: Each stream's scene token for this frame.
        use_prev_bevs: Each frame's gate (0/1).
        shape: One stream's BEV shape (e.g. ``(bev_h * bev_w, C)``).
        device: Where the result lives.
        dtype: Its dtype.
        tokens: Frame tokens, named in the NaN/inf warning.

    Returns:
        ``prev_bev`` [N, *shape] (zeros for the streams that start over) and the gates [N] (float32):
        each stream reset by the same rule as :func:`carry_prev_bev`, one host sync for all the
        finiteness checks.
    """
    n = len(prev_bevs)
    if not (len(prev_scenes) == len(scenes) == len(use_prev_bevs) == n) or (tokens is not None and len(tokens) != n):
        raise ValueError(f"one entry per stream: got {len(prev_bevs)} prev_bevs, {len(prev_scenes)} prev_scenes, "
                         f"{len(scenes)} scenes, {len(use_prev_bevs)} use_prev_bevs"
                         + (f", {len(tokens)} tokens" if tokens is not None else ""))
    keep = [not _starts_over(p is not None, ps, s, u)
            for p, ps, s, u in zip(prev_bevs, prev_scenes, scenes, use_prev_bevs)]
    kept = [i for i in range(n) if keep[i]]
    out = torch.zeros(n, *shape, device=device, dtype=dtype)
    if kept:
        carried = torch.stack([prev_bevs[i].reshape(*shape).to(device, dtype) for i in kept])
        finite = torch.isfinite(carried).flatten(1).all(1).tolist()  # the one sync
        for j, i in enumerate(kept):
            if finite[j]:
                out[i] = carried[j]
            else:
                _warn_nonfinite(tokens[i] if tokens is not None else "", stacklevel=2)
                keep[i] = False
    gates = torch.tensor([float(u) if k else 0.0 for k, u in zip(keep, use_prev_bevs)], device=device)
    return out, gates


def _starts_over(has_prev: bool, prev_scene: str | None, scene: str | None, use_prev_bev: float) -> bool:
    """The reset rule of :func:`carry_prev_bev` before its finiteness check."""
    return not has_prev or float(use_prev_bev) == 0.0 or not scene or not prev_scene or scene != prev_scene


def _warn_nonfinite(token: str, stacklevel: int) -> None:
    warnings.warn(f"frame {token or '?'}: the previous BEV holds NaN/inf; treated as a scene start "
                  "(previous BEV reset to zeros)", RuntimeWarning, stacklevel=stacklevel + 1)


class TemporalState:
    """Per-stream host state of BEVFormer's temporal test loop (one per independent stream of a batch).

    Call :meth:`step` with each frame in temporal order; it remembers the frame so the next call can
    compute ego deltas and decide the ``use_prev_bev`` gate. Keeping the previous BEV itself is the
    engine loop's job: it feeds the last ``bev_embed`` back whatever the gate says (the gate masks it).
    """

    def __init__(self) -> None:
        self._prev: dict | None = None

    def reset(self) -> None:
        """Forget the previous frame (the next frame starts a new sequence)."""
        self._prev = None

    def step(self, info: dict) -> dict:
        """See :func:`frame_inputs`; records ``info`` as the previous frame."""
        out = frame_inputs(info, self._prev)
        self._prev = info
        return out


def prepare_frame(
    info: dict,
    prev_info: dict | None,
    config: ImagePreprocess = BEVFORMER_TINY,
    images: Sequence[np.ndarray] | None = None,
) -> dict:
    """Everything a BEVFormer engine takes for one frame of one stream.

    Args:
        info: The frame's info record.
        prev_info: The previous frame of the stream (see :func:`frame_inputs`), or None.
        config: Image pipeline of the model.
        images: Already-decoded images in :data:`CAMERA_NAMES` order (default: read from disk).

    Returns:
        dict with ``image`` Tensor[6, 3, H, W] float32, ``lidar2img`` Tensor[6, 4, 4] float32,
        ``can_bus`` Tensor[18] float32, ``use_prev_bev`` Tensor[1] float32, ``img_shape`` (H, W) (padded,
        what BEVFormer's ``img_metas['img_shape']`` holds), ``token``, ``scene_token``.
    """
    if images is None:
        images = load_images(info, CAMERA_NAMES)
    image, l2i = preprocess_images(images, _lidar2img(info), config)
    temporal = frame_inputs(info, prev_info)
    return {
        "image": image,
        "lidar2img": l2i,
        "can_bus": torch.from_numpy(temporal["can_bus"]).float(),
        "use_prev_bev": torch.tensor([temporal["use_prev_bev"]], dtype=torch.float32),
        "img_shape": tuple(image.shape[-2:]),
        "token": info.get("token", ""),
        "scene_token": info.get("scene_token", ""),
    }


def stack_frames(frames: Sequence[dict]) -> dict:
    """Batch frames of B independent streams: ``image`` [B, 6, 3, H, W], ``lidar2img`` [B, 6, 4, 4],
    ``can_bus`` [B, 18], ``use_prev_bev`` [B]; ``token``/``scene_token`` as lists."""
    if not frames:
        raise ValueError("frames must not be empty")
    shapes = {tuple(f["image"].shape) for f in frames}
    if len(shapes) != 1:
        raise ValueError(f"frames must share one image shape, got {sorted(shapes)}")
    return {
        "image": torch.stack([f["image"] for f in frames]),
        "lidar2img": torch.stack([f["lidar2img"] for f in frames]),
        "can_bus": torch.stack([f["can_bus"] for f in frames]),
        "use_prev_bev": torch.cat([f["use_prev_bev"] for f in frames]),
        "img_shape": frames[0]["img_shape"],
        "token": [f["token"] for f in frames],
        "scene_token": [f["scene_token"] for f in frames],
    }

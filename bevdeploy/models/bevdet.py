"""BEVDet-R50-CBGS: six camera images -> Lift-Splat BEV features -> CenterPoint boxes, tensors in and out.

BEVDet (Huang et al., 2021, https://arxiv.org/abs/2112.11790) lifts each camera's stride-16 features
into a frustum of depth bins (a softmax depth distribution times a 64-channel context per pixel, as
Lift-Splat-Shoot), sums the frustum points of every BEV cell with BEVPoolv2
(https://arxiv.org/abs/2211.17111), encodes the 128x128 BEV map with a small ResNet + FPN and
decodes CenterPoint heatmaps. Origin of every number and name: HuangJunJie2017/BEVDet branch dev2.1
(``configs/bevdet/bevdet-r50-cbgs.py``; ``mmdet3d/models/detectors/bevdet.py``;
``mmdet3d/models/necks/{fpn.py (CustomFPN), view_transformer.py (LSSViewTransformer), lss_fpn.py
(FPN_LSS)}``; ``mmdet3d/models/backbones/resnet.py (CustomResNet)``;
``mmdet3d/models/dense_heads/centerpoint_head.py``; ``mmdet3d/core/bbox/coders/
centerpoint_bbox_coders.py``; ``mmdet3d/core/post_processing/box3d_nms.py``) and the reference
system's deploy form (DerryHub/BEVFormer_tensorrt ``configs/bevdet/bevdet-r50-cbgs_trt.py``,
``det2trt/models/detector/bevdet.py``). Read for facts; the code is ours.

**State dict.** Module names follow the official model (``img_backbone``, ``img_neck``,
``img_view_transformer.depth_net``, ``img_bev_encoder_backbone.layers``, ``img_bev_encoder_neck``,
``pts_bbox_head.{shared_conv, task_heads.0.{reg,height,dim,rot,vel,heatmap}}``) so the dev2.1
``bevdet-r50-cbgs.pth`` loads with :func:`bevdeploy.models.checkpoint.load_checkpoint`. dev2.1 has
ONE task head of 10 classes and a depth net emitting 59 depth bins + 64 channels (the older dev2.0
checkpoint's 6 task groups do not load).

**Inputs** (the reference engine's): ``image`` [B, 6, 3, 256, 704] in BEVDet's camera order
(:data:`bevdeploy.data.preprocess_bevdet.BEVDET_CAMERAS`), normalised as
:mod:`bevdeploy.data.preprocess_bevdet` does; ``ranks_bev, ranks_depth, ranks_feat,
interval_starts, interval_lengths`` (int32) from :class:`BEVDetGeometry`, which depends on the
camera parameters only and is computed on the host once per calibration (cached).

**Outputs**: the CenterPoint maps ``reg`` [B, 2, Y, X], ``height`` [B, 1, ..], ``dim`` [B, 3, ..]
(log sizes), ``rot`` [B, 2, ..] (sin, cos), ``vel`` [B, 2, ..], ``heatmap`` [B, 10, ..] (logits),
rows along the grid's y, columns along x. :meth:`BEVDet.decode` turns them into boxes of the
project's model-box contract.

**Frames.** dev2.1 predicts in an ego frame: the frustum goes to the ego frame of the FIRST camera
(CAM_FRONT_LEFT's ego pose; ``BEVDet.prepare_inputs``), the ground truth and the official result
formatting use CAM_FRONT's ego pose (``create_data_bevdet.get_gt``, ``NuScenesDataset._format_bbox``,
``ego_cam='CAM_FRONT'``); the two differ by the ego motion between the camera exposures, an
official quirk kept as is. Boxes come out in mmdet3d 1.0's convention (``dx, dy, dz`` = length,
width, height; yaw = the nuScenes yaw). :func:`bevdet_boxes_to_lidar` converts them to the contract
(LiDAR frame, mmdet3d 0.17: ``w, l, h``, ``yaw = -yaw_nuscenes - pi/2``, bottom centre) with the
sample's ``bev2lidar`` from :func:`bevdeploy.data.preprocess_bevdet.bev2lidar`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bevdeploy.models.fpn import ConvModule
from bevdeploy.models.resnet import ResNet
from bevdeploy.ops.bev_pool_v2 import bev_pool_v2, bev_pool_v2_prepare
from bevdeploy.quant.calibrate import CalibrationPoint
from bevdeploy.quant.int8_kernels import quantize_per_tensor

__all__ = [
    "BEVDET_CONFIGS",
    "FPNLSS",
    "FusedSeparateHead",
    "HEAD_OUTPUTS",
    "BEVDet",
    "BEVDetConfig",
    "BEVDetGeometry",
    "BEVPoolRanks",
    "BasicBlock",
    "CenterHead",
    "CenterPointDecoder",
    "ConvBNReLU",
    "CustomFPN",
    "CustomResNet",
    "LSSViewTransformer",
    "SeparateHead",
    "bevdet_boxes_to_lidar",
    "bevdet_r50_cbgs",
    "circle_nms",
    "nms_bev",
    "pad_ranks",
    "rotated_iou_bev",
]

#: Output names of the head, in the reference engine's order.
HEAD_OUTPUTS: tuple[str, ...] = ("reg", "height", "dim", "rot", "vel", "heatmap")


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BEVDetConfig:
    """Every number of BEVDet-R50-CBGS (dev2.1 ``configs/bevdet/bevdet-r50-cbgs.py``, flattened).

    Override fields with :func:`dataclasses.replace` or the constructor's keywords (tests shrink
    ``image_size``, the grid and ``depth_bins``). State-dict shapes depend on the grid and the
    image size not at all, on ``depth_bins`` through ``depth_net`` only.

    The box coder's ``pc_range[:2]`` (-51.2, -51.2) and cell size ``out_size_factor * voxel_size``
    (8 * 0.1 = 0.8 m) equal the grid's lower bound and interval in the official config (the BEV
    encoder returns to the grid resolution); they are derived from ``grid_x``/``grid_y`` here so
    a reduced grid decodes consistently.
    """

    name: str = "bevdet-r50-cbgs"
    image_size: tuple[int, int] = (256, 704)  # data_config['input_size']
    num_cams: int = 6
    # img_backbone: mmdet ResNet-50, out_indices (2, 3), pytorch style
    depth: int = 50
    out_indices: tuple[int, ...] = (2, 3)
    style: str = "pytorch"
    frozen_stages: int = -1
    norm_eval: bool = False
    # img_neck: CustomFPN(in_channels=[1024, 2048], out_channels=256, num_outs=1, out_ids=[0])
    fpn_in_channels: tuple[int, ...] = (1024, 2048)
    fpn_out_channels: int = 256
    # img_view_transformer: LSSViewTransformer(in 256, out numC_Trans=64, downsample=16)
    downsample: int = 16
    depth_bins: tuple[float, float, float] = (1.0, 60.0, 1.0)  # grid_config['depth']: arange -> 59 bins
    grid_x: tuple[float, float, float] = (-51.2, 51.2, 0.8)
    grid_y: tuple[float, float, float] = (-51.2, 51.2, 0.8)
    grid_z: tuple[float, float, float] = (-5.0, 3.0, 8.0)
    bev_channels: int = 64  # numC_Trans
    # img_bev_encoder_backbone: CustomResNet(numC_input=64, num_channels=[128, 256, 512]), Basic blocks
    bev_num_layers: tuple[int, ...] = (2, 2, 2)
    bev_strides: tuple[int, ...] = (2, 2, 2)
    bev_layer_channels: tuple[int, ...] = (128, 256, 512)
    # img_bev_encoder_neck: FPN_LSS(in_channels=512 + 128, out_channels=256), defaults below
    bev_neck_out_channels: int = 256
    bev_neck_scale_factor: int = 4
    bev_neck_input_index: tuple[int, int] = (0, 2)
    bev_neck_extra_upsample: int = 2
    # pts_bbox_head: CenterHead, one task of 10 classes
    num_classes: int = 10
    share_conv_channels: int = 64
    head_conv_channels: int = 64  # SeparateHead head_conv default
    final_kernel: int = 3
    common_heads: tuple[tuple[str, int, int], ...] = (
        ("reg", 2, 2),
        ("height", 1, 2),
        ("dim", 3, 2),
        ("rot", 2, 2),
        ("vel", 2, 2),
    )
    num_heatmap_convs: int = 2
    heatmap_init_bias: float = -2.19
    # CenterPointBBoxCoder + test_cfg
    post_center_range: tuple[float, float, float, float, float, float] = (-61.2, -61.2, -10.0, 61.2, 61.2, 10.0)
    max_num: int = 500
    score_threshold: float = 0.1
    nms_type: str = "rotate"  # test_cfg nms_type=['rotate'] (Scale-NMS)
    nms_thr: float = 0.2
    nms_rescale_factor: tuple[float, ...] = (1.0, 0.7, 0.7, 0.4, 0.55, 1.1, 1.0, 1.0, 1.5, 3.5)
    pre_max_size: int = 1000
    post_max_size: int = 500
    min_radius: float = 4.0  # test_cfg min_radius[0], used only by nms_type='circle'
    # deployment: pad the BEVPool index arrays to calibration-independent sizes
    pad_ranks: bool = True

    def __post_init__(self) -> None:
        positive = {
            "num_cams": self.num_cams,
            "fpn_out_channels": self.fpn_out_channels,
            "downsample": self.downsample,
            "bev_channels": self.bev_channels,
            "num_classes": self.num_classes,
            "max_num": self.max_num,
            "pre_max_size": self.pre_max_size,
            "post_max_size": self.post_max_size,
        }
        for key, val in positive.items():
            if not (isinstance(val, int) and val > 0):
                raise ValueError(f"BEVDetConfig.{key} must be a positive int, got {val!r}")
        if len(self.image_size) != 2 or any(s % self.downsample or s <= 0 for s in self.image_size):
            raise ValueError(
                f"BEVDetConfig.image_size must be (H, W), both positive multiples of downsample={self.downsample}, "
                f"got {self.image_size}"
            )
        if len(self.out_indices) != len(self.fpn_in_channels):
            raise ValueError(f"fpn_in_channels {self.fpn_in_channels} needs one entry per out_indices {self.out_indices}")
        if 2 ** (self.out_indices[0] + 2) != self.downsample:
            raise ValueError(
                f"downsample ({self.downsample}) must be the stride of the first backbone output "
                f"(stage {self.out_indices[0]}: {2 ** (self.out_indices[0] + 2)})"
            )
        for axis in ("grid_x", "grid_y", "grid_z", "depth_bins"):
            lo, hi, step = getattr(self, axis)
            if not (step > 0 and hi > lo):
                raise ValueError(f"BEVDetConfig.{axis} must be (lower, upper, step) with upper > lower, step > 0")
        X, Y, _ = self.grid_size
        stride = math.prod(self.bev_strides)
        if X % stride or Y % stride:
            raise ValueError(f"the BEV grid {X}x{Y} must be divisible by the BEV encoder's stride {stride}")
        if not len(self.bev_num_layers) == len(self.bev_strides) == len(self.bev_layer_channels):
            raise ValueError("bev_num_layers, bev_strides and bev_layer_channels need one entry per layer")
        if len(self.nms_rescale_factor) != self.num_classes:
            raise ValueError(
                f"nms_rescale_factor needs one factor per class ({self.num_classes}), got {len(self.nms_rescale_factor)}"
            )
        if self.nms_type not in ("rotate", "circle"):
            raise ValueError(f"nms_type must be 'rotate' or 'circle', got {self.nms_type!r}")
        if [h[0] for h in self.common_heads] != list(HEAD_OUTPUTS[:-1]):
            raise ValueError(f"common_heads must be named {HEAD_OUTPUTS[:-1]} in that order (decode reads them)")

    @property
    def num_depth_bins(self) -> int:
        """D: ``len(torch.arange(*depth_bins))`` (59 for 1..59 m)."""
        return int(torch.arange(*self.depth_bins, dtype=torch.float32, device="cpu").numel())

    @property
    def grid_size(self) -> tuple[int, int, int]:
        """(X, Y, Z) cells of the BEV grid (128, 128, 1)."""
        return tuple(round((hi - lo) / step) for lo, hi, step in (self.grid_x, self.grid_y, self.grid_z))

    @property
    def feature_size(self) -> tuple[int, int]:
        """(fH, fW) of the depth net's output (16, 44)."""
        return self.image_size[0] // self.downsample, self.image_size[1] // self.downsample


#: The official config (dev2.1), by CLI name.
BEVDET_CONFIGS: dict[str, BEVDetConfig] = {"bevdet-r50-cbgs": BEVDetConfig()}


# --------------------------------------------------------------------------------------------
# Geometry: frustum -> ego coordinates -> BEVPool ranks (host side, cached per calibration)
# --------------------------------------------------------------------------------------------


class BEVPoolRanks(NamedTuple):
    """The index inputs of :func:`bevdeploy.ops.bev_pool_v2.bev_pool_v2`, in the engine's input order."""

    ranks_bev: Tensor
    ranks_depth: Tensor
    ranks_feat: Tensor
    interval_starts: Tensor
    interval_lengths: Tensor


def pad_ranks(ranks: BEVPoolRanks, num_points: int, num_intervals: int, num_voxels: int) -> BEVPoolRanks:
    """Pad BEVPool indices to fixed sizes without changing the pooled result.

    The point and interval counts depend on the calibration (BEVDet-R50 on nuScenes: ~180k points,
    ~11.4k intervals); the reference engine fixes them from the first sample, which breaks on any
    other calibration. Padded here: extra intervals have length 0 and each starts at its own extra
    point, whose ``ranks_bev`` is a voxel no real interval owns, so a kernel that writes every
    interval's (zero) sum - BEVDet's CUDA kernel does - writes 0 where 0 already is, and ours skips
    them; extra points belong to no interval and are never read.

    Args:
        ranks: Unpadded indices (int32) of ``B*Z*Y*X = num_voxels`` voxels.
        num_points: Padded length of the three ``ranks_*`` (>= real points + empty voxels; the
            frustum size plus ``num_voxels`` always is).
        num_intervals: Padded number of intervals (``num_voxels`` always suffices).
        num_voxels: Voxels of the grid, over the batch.

    Returns:
        :class:`BEVPoolRanks` of sizes ``num_points`` / ``num_intervals``, int32, on the input's device.
    """
    P, I = ranks.ranks_bev.shape[0], ranks.interval_starts.shape[0]
    extra_i = num_intervals - I
    if extra_i < 0 or num_intervals > num_voxels:
        raise ValueError(f"num_intervals must be in [{I} (the real intervals), {num_voxels} (the voxels)], got {num_intervals}")
    if num_points - P < extra_i:
        raise ValueError(f"num_points must be >= {P + extra_i} (real points + padded intervals), got {num_points}")
    device = ranks.ranks_bev.device
    occupied = torch.zeros(num_voxels, dtype=torch.bool, device=device)
    occupied[ranks.ranks_bev[ranks.interval_starts.long()].long()] = True
    empty = torch.nonzero(~occupied).flatten()[:extra_i]
    pad_bev = torch.zeros(num_points - P, dtype=torch.long, device=device)
    pad_bev[:extra_i] = empty
    zeros = torch.zeros(num_points - P, dtype=torch.int32, device=device)
    i32 = {"dtype": torch.int32, "device": device}
    return BEVPoolRanks(
        torch.cat([ranks.ranks_bev, pad_bev.to(torch.int32)]).contiguous(),
        torch.cat([ranks.ranks_depth, zeros]).contiguous(),
        torch.cat([ranks.ranks_feat, zeros]).contiguous(),
        torch.cat([ranks.interval_starts, P + torch.arange(extra_i, **i32)]).contiguous(),
        torch.cat([ranks.interval_lengths, torch.zeros(extra_i, **i32)]).contiguous(),
    )


class BEVDetGeometry:
    """Frustum points -> ego coordinates -> BEVPool ranks, cached by the camera parameters.

    The voxel of every frustum point depends on the cameras only, so deployment computes the ranks
    once per calibration (:func:`bevdeploy.ops.bev_pool_v2.bev_pool_v2_prepare`: a sort of ~250k
    points) and reuses them for every frame with the same parameters; a change of any parameter
    (another vehicle, another nuScenes log, per-frame ego motion) recomputes them. The cache is
    keyed by the bytes of the float32 parameters and keeps the ``cache_size`` most recent entries.

    Math (dev2.1 ``LSSViewTransformer.create_frustum`` / ``get_lidar_coor``, float32 like the
    official): pixel ``(u, v)`` of the network input at ``linspace(0, W-1, fW)`` x ``linspace(0,
    H-1, fH)`` and depth ``d`` in ``arange(*depth_bins)``; undo the image augmentation
    ``p = post_rots^-1 (p - post_trans)``; camera ray ``(u d, v d, d)``; ego point
    ``sensor2ego[:3, :3] K^-1 ray + sensor2ego[:3, 3]``; then ``bda`` (identity at test time).

    Args:
        image_size: (H, W) of the network input.
        downsample: Feature stride (16).
        depth_bins: (start, stop, step) of the depth bins in metres.
        grid_x, grid_y, grid_z: (lower, upper, cell) of the BEV grid in metres.
        pad: Pad the ranks to calibration-independent sizes (:func:`pad_ranks`): points =
            frustum points + voxels, intervals = voxels (per batch), so one exported engine serves
            every calibration.
        cache_size: Calibrations remembered.
    """

    def __init__(
        self,
        *,
        image_size: tuple[int, int],
        downsample: int,
        depth_bins: tuple[float, float, float],
        grid_x: tuple[float, float, float],
        grid_y: tuple[float, float, float],
        grid_z: tuple[float, float, float],
        pad: bool = True,
        cache_size: int = 8,
    ) -> None:
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.downsample = int(downsample)
        self.depth_bins = tuple(float(v) for v in depth_bins)
        self.grid_lower_bound = tuple(float(g[0]) for g in (grid_x, grid_y, grid_z))
        self.grid_interval = tuple(float(g[2]) for g in (grid_x, grid_y, grid_z))
        self.grid_size = tuple(round((g[1] - g[0]) / g[2]) for g in (grid_x, grid_y, grid_z))
        self.pad = pad
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, BEVPoolRanks] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @classmethod
    def from_config(cls, cfg: BEVDetConfig, **kwargs) -> BEVDetGeometry:
        """The geometry of a model config; keywords (``pad``, ``cache_size``) override."""
        return cls(
            image_size=cfg.image_size,
            downsample=cfg.downsample,
            depth_bins=cfg.depth_bins,
            grid_x=cfg.grid_x,
            grid_y=cfg.grid_y,
            grid_z=cfg.grid_z,
            **{"pad": cfg.pad_ranks, **kwargs},
        )

    @property
    def feature_size(self) -> tuple[int, int]:
        return self.image_size[0] // self.downsample, self.image_size[1] // self.downsample

    def frustum(self, device: torch.device | str = "cpu") -> Tensor:
        """Tensor[D, fH, fW, 3]: (u, v, d) of every frustum point in network-input pixels, float32."""
        H, W = self.image_size
        fH, fW = self.feature_size
        kw = {"dtype": torch.float32, "device": device}
        d = torch.arange(*self.depth_bins, **kw).view(-1, 1, 1).expand(-1, fH, fW)
        D = d.shape[0]
        u = torch.linspace(0, W - 1, fW, **kw).view(1, 1, fW).expand(D, fH, fW)
        v = torch.linspace(0, H - 1, fH, **kw).view(1, fH, 1).expand(D, fH, fW)
        return torch.stack((u, v, d), -1)

    def _check(self, sensor2ego: Tensor, intrinsics: Tensor, post_rots: Tensor, post_trans: Tensor, bda: Tensor | None):
        if sensor2ego.dim() != 4 or tuple(sensor2ego.shape[2:]) != (4, 4):
            raise ValueError(f"sensor2ego must be [B, N, 4, 4], got {list(sensor2ego.shape)}")
        B, N = sensor2ego.shape[:2]
        expected = {"intrinsics": (intrinsics, (B, N, 3, 3)), "post_rots": (post_rots, (B, N, 3, 3)),
                    "post_trans": (post_trans, (B, N, 3))}
        for name, (t, shape) in expected.items():
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {list(shape)} (like sensor2ego), got {list(t.shape)}")
        if bda is None:
            bda = torch.eye(3, dtype=torch.float32, device=sensor2ego.device).expand(B, 3, 3)
        if tuple(bda.shape) != (B, 3, 3):
            raise ValueError(f"bda must have shape [{B}, 3, 3], got {list(bda.shape)}")
        return bda

    def ego_coords(
        self, sensor2ego: Tensor, intrinsics: Tensor, post_rots: Tensor, post_trans: Tensor, bda: Tensor | None = None
    ) -> Tensor:
        """Ego-frame coordinates of every frustum point.

        Args:
            sensor2ego (Tensor[B, N, 4, 4]): camera -> (key) ego frame.
            intrinsics (Tensor[B, N, 3, 3]): camera intrinsics of the ORIGINAL image.
            post_rots (Tensor[B, N, 3, 3]), post_trans (Tensor[B, N, 3]): original pixel ->
                network-input pixel (resize and crop; :mod:`bevdeploy.data.preprocess_bevdet`).
            bda (Tensor[B, 3, 3] | None): BEV augmentation (None: identity, as at test time).

        Returns:
            Tensor[B, N, D, fH, fW, 3] float32 (x, y, z) in metres.
        """
        bda = self._check(sensor2ego, intrinsics, post_rots, post_trans, bda)
        B, N = sensor2ego.shape[:2]
        s2e, K = sensor2ego.float(), intrinsics.float()
        prot, ptrans, bda = post_rots.float(), post_trans.float(), bda.float()
        points = self.frustum(s2e.device) - ptrans.view(B, N, 1, 1, 1, 3)
        points = torch.inverse(prot).view(B, N, 1, 1, 1, 3, 3).matmul(points.unsqueeze(-1))
        points = torch.cat((points[..., :2, :] * points[..., 2:3, :], points[..., 2:3, :]), 5)
        combine = s2e[:, :, :3, :3].matmul(torch.inverse(K))
        points = combine.view(B, N, 1, 1, 1, 3, 3).matmul(points).squeeze(-1)
        points = points + s2e[:, :, :3, 3].view(B, N, 1, 1, 1, 3)
        return bda.view(B, 1, 1, 1, 1, 3, 3).matmul(points.unsqueeze(-1)).squeeze(-1)

    def num_points(self, batch: int, num_cams: int) -> int:
        """Padded ``ranks_*`` length: frustum points + voxels."""
        fH, fW = self.feature_size
        D = int(torch.arange(*self.depth_bins, dtype=torch.float32).numel())
        return batch * num_cams * D * fH * fW + self.num_voxels(batch)

    def num_voxels(self, batch: int) -> int:
        return batch * math.prod(self.grid_size)

    @staticmethod
    def _key(*tensors: Tensor) -> tuple:
        h = hashlib.sha1()
        for t in tensors:
            a = t.detach().to("cpu", torch.float32).contiguous()
            h.update(str(tuple(a.shape)).encode())
            h.update(a.numpy().tobytes())
        return (h.hexdigest(),)

    def ranks(
        self,
        sensor2ego: Tensor,
        intrinsics: Tensor,
        post_rots: Tensor,
        post_trans: Tensor,
        bda: Tensor | None = None,
    ) -> BEVPoolRanks:
        """BEVPool indices for these cameras: from the cache, or computed (and cached).

        Arguments as :meth:`ego_coords`. The result lives on ``sensor2ego``'s device; treat it as
        read-only (it is shared by every call with the same parameters).
        """
        bda = self._check(sensor2ego, intrinsics, post_rots, post_trans, bda)
        key = self._key(sensor2ego, intrinsics, post_rots, post_trans, bda) + (str(sensor2ego.device),)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            self.hits += 1
            return hit
        self.misses += 1
        coor = self.ego_coords(sensor2ego, intrinsics, post_rots, post_trans, bda)
        ranks = BEVPoolRanks(*bev_pool_v2_prepare(coor, self.grid_lower_bound, self.grid_interval, self.grid_size))
        if self.pad:
            B, N = sensor2ego.shape[:2]
            ranks = pad_ranks(ranks, self.num_points(B, N), self.num_voxels(B), self.num_voxels(B))
        self._cache[key] = ranks
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return ranks

    def cache_clear(self) -> None:
        self._cache.clear()
        self.hits = self.misses = 0

    def __repr__(self) -> str:
        return (
            f"BEVDetGeometry(image_size={self.image_size}, downsample={self.downsample}, "
            f"depth_bins={self.depth_bins}, grid_size={self.grid_size}, pad={self.pad}, "
            f"cached={len(self._cache)}, hits={self.hits}, misses={self.misses})"
        )


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


class ConvBNReLU(nn.Module):
    """mmcv ``ConvModule`` with BN and ReLU: ``conv`` (no bias) -> ``bn`` -> ReLU (the head's convs)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


class CustomFPN(nn.Module):
    """BEVDet's ``CustomFPN``: laterals on every input, top-down sum, output convs only at ``out_ids``.

    With ``in_channels=(1024, 2048)`` and ``out_ids=[0]``: ``fpn_convs.0(lateral(C4) +
    nearest_upsample(lateral(C5)))``, one stride-16 map of 256 channels. No norm, no activation
    (every conv has a bias, mmcv ``ConvModule`` names).
    """

    def __init__(self, *, in_channels: Sequence[int], out_channels: int, out_ids: Sequence[int] = (0,)) -> None:
        super().__init__()
        self.out_ids = tuple(int(i) for i in out_ids)
        if not self.out_ids or max(self.out_ids) >= len(in_channels):
            raise ValueError(f"out_ids must index the {len(in_channels)} inputs, got {self.out_ids}")
        self.lateral_convs = nn.ModuleList(ConvModule(c, out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(ConvModule(out_channels, out_channels, 3, padding=1) for _ in self.out_ids)

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        if len(inputs) != len(self.lateral_convs):
            raise ValueError(f"CustomFPN expects {len(self.lateral_convs)} input levels, got {len(inputs)}")
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], mode="nearest")
        return self.fpn_convs[0](laterals[self.out_ids[0]])


class LSSViewTransformer(nn.Module):
    """Lift (depth net: softmax depth x context) and splat (BEVPoolv2) into the BEV grid.

    ``depth_net`` is a 1x1 conv emitting ``D`` depth logits then ``out_channels`` context channels
    per pixel (dev2.1: 59 + 64 = 123). The pooled ``[B, C, Z, Y, X]`` grid is collapsed along Z
    into channels (z-major, as ``torch.cat(bev.unbind(2), 1)``); with Z = 1 it is the op's
    channels-last map, returned without a copy.

    Deployment knobs (set by the engine builder, not in the state dict): ``op_variant`` picks the
    op's float variant; ``feat_scale`` (a calibrated per-tensor scale of the context features, read
    at ``feat_point``) switches the pooling to the int8 variant: depth and context quantised to int8
    (depth, a softmax in [0, 1], with the fixed scale 1/127), the pooled map in the float dtype.
    """

    #: int8 scale of the softmax depth: its range is exactly [0, 1].
    DEPTH_SCALE = 1.0 / 127.0

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        num_depth_bins: int,
        grid_size: tuple[int, int, int],
    ) -> None:
        super().__init__()
        self.D = num_depth_bins
        self.out_channels = out_channels
        self.grid_size = tuple(int(s) for s in grid_size)  # (X, Y, Z)
        self.depth_net = nn.Conv2d(in_channels, self.D + out_channels, kernel_size=1, padding=0)
        self.feat_point = CalibrationPoint()
        self.op_variant: str | None = None
        self.feat_scale: float | None = None

    def lift(self, x: Tensor, batch: int) -> tuple[Tensor, Tensor]:
        """``x [B*N, C_in, fH, fW]`` -> depth ``[B, N, D, fH, fW]`` (softmax) and context ``[B, N, fH, fW, C]``."""
        x = self.depth_net(x)
        BN, _, fH, fW = x.shape
        N = BN // batch
        depth = x[:, : self.D].softmax(dim=1).view(batch, N, self.D, fH, fW)
        feat = x[:, self.D : self.D + self.out_channels].permute(0, 2, 3, 1).view(batch, N, fH, fW, self.out_channels)
        return depth, self.feat_point(feat)

    def splat(self, depth: Tensor, feat: Tensor, ranks: Sequence[Tensor]) -> Tensor:
        """BEVPoolv2 of ``depth x feat`` into ``[B, C*Z, Y, X]`` (ranks in :class:`BEVPoolRanks` order)."""
        ranks_bev, ranks_depth, ranks_feat, interval_starts, interval_lengths = ranks
        X, Y, Z = self.grid_size
        B = depth.shape[0]
        shape = (B, Z, Y, X, self.out_channels)
        if self.feat_scale is not None:
            bev = bev_pool_v2(
                quantize_per_tensor(depth, self.DEPTH_SCALE), quantize_per_tensor(feat, self.feat_scale),
                ranks_depth, ranks_feat, ranks_bev, shape, interval_starts, interval_lengths,
                variant="int8", depth_scale=self.DEPTH_SCALE, feat_scale=self.feat_scale,
            ).to(feat.dtype)
        else:
            bev = bev_pool_v2(depth, feat, ranks_depth, ranks_feat, ranks_bev, shape, interval_starts,
                              interval_lengths, variant=self.op_variant)
        if Z == 1:
            return bev[:, :, 0]
        return torch.cat(bev.unbind(dim=2), 1)

    def forward(self, x: Tensor, batch: int, ranks: Sequence[Tensor]) -> Tensor:
        depth, feat = self.lift(x, batch)
        return self.splat(depth, feat, ranks)


class BasicBlock(nn.Module):
    """mmdet ``BasicBlock`` as ``CustomResNet`` builds it: the projection is a plain 3x3 conv with bias."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class CustomResNet(nn.Module):
    """BEV encoder backbone (BEVDet ``CustomResNet``, Basic blocks): ``layers.{i}.{j}``, every stage output.

    Each stage: a strided BasicBlock whose identity is projected by ``Conv2d(c_in, c_out, 3, stride,
    1)`` (bias, no BN), then ``num_layer - 1`` plain BasicBlocks. BEVDet-R50: 64 -> 128 (64x64)
    -> 256 (32x32) -> 512 (16x16).
    """

    def __init__(
        self, *, in_channels: int, num_layers: Sequence[int], num_channels: Sequence[int], strides: Sequence[int]
    ) -> None:
        super().__init__()
        layers = []
        c = in_channels
        for n, out, s in zip(num_layers, num_channels, strides):
            blocks = [BasicBlock(c, out, stride=s, downsample=nn.Conv2d(c, out, 3, s, 1))]
            blocks += [BasicBlock(out, out) for _ in range(n - 1)]
            layers.append(nn.Sequential(*blocks))
            c = out
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = []
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return feats


class FPNLSS(nn.Module):
    """BEV encoder neck (BEVDet ``FPN_LSS``): upsample the deepest map x4, concat with the first,
    two 3x3 conv-BN-ReLU, then ``up2`` (x2 bilinear, 3x3 conv-BN-ReLU, 1x1 conv with bias).

    Upsampling is bilinear with ``align_corners=True`` (``nn.Upsample`` in the official).
    Sequential indices are the official ones: ``conv.{0,1,3,4}``, ``up2.{1,2,4}``.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        scale_factor: int = 4,
        input_feature_index: tuple[int, int] = (0, 2),
        extra_upsample: int = 2,
    ) -> None:
        super().__init__()
        self.input_feature_index = tuple(input_feature_index)
        self.scale_factor = scale_factor
        self.extra_upsample = extra_upsample
        mid = out_channels * 2  # channels_factor 2 with extra_upsample
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, mid, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
        )
        self.up2 = nn.Sequential(
            nn.Upsample(scale_factor=extra_upsample, mode="bilinear", align_corners=True),
            nn.Conv2d(mid, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 1, padding=0),
        )

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        x2, x1 = feats[self.input_feature_index[0]], feats[self.input_feature_index[1]]
        x1 = F.interpolate(x1, scale_factor=self.scale_factor, mode="bilinear", align_corners=True)
        return self.up2(self.conv(torch.cat([x2, x1], dim=1)))


class SeparateHead(nn.Module):
    """CenterPoint ``SeparateHead``: one branch per output, ``(num_conv - 1)`` conv-BN-ReLU then a conv.

    Branch ``name`` is ``Sequential(ConvBNReLU(..), ..., Conv2d(head_conv, channels, k))`` under the
    attribute ``name`` (official keys ``task_heads.0.reg.0.conv.weight``, ``...reg.1.weight``).
    """

    def __init__(
        self, *, in_channels: int, heads: Sequence[tuple[str, int, int]], head_conv: int = 64, final_kernel: int = 3
    ) -> None:
        super().__init__()
        self.head_names = tuple(name for name, _, _ in heads)
        for name, channels, num_conv in heads:
            layers: list[nn.Module] = []
            c = in_channels
            for _ in range(num_conv - 1):
                layers.append(ConvBNReLU(c, head_conv, final_kernel, padding=final_kernel // 2))
                c = head_conv
            layers.append(nn.Conv2d(c, channels, final_kernel, padding=final_kernel // 2, bias=True))
            self.add_module(name, nn.Sequential(*layers))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {name: getattr(self, name)(x) for name in self.head_names}


class FusedSeparateHead(nn.Module):
    """A :class:`SeparateHead` whose branches run as ONE conv stack (the engine's deploy form).

    Every branch reads the same input through the same number of layers (``(num_conv - 1)``
    conv-ReLU then a conv). Layer 0 of all branches becomes one conv with their output channels
    concatenated; every later layer one dense, block-diagonal conv: branch ``i``'s filters read only
    branch ``i``'s slice of the previous layer's channels, zeros elsewhere. Each layer's output
    channels are padded up to a multiple of ``pad_to`` with zero filters and zero bias (cuDNN pads
    other counts with an extra ``nhwcAddPaddingKernel`` per call; the padded channels are ReLU(0) = 0
    and read with zero weights). The forward returns the branch maps as views (channel slices) of
    the last conv's output, under the branch names, in the branch order.

    The math is the unfused head's: the extra products are exact zeros (for finite activations; an
    inf in one branch's hidden layer would turn the other branches' maps NaN through ``0 * inf``).
    BEVDet-R50 (one task, 6 branches of 64 hidden channels): 12 convs -> 2, a 64 -> 384 conv-ReLU
    and a 384 -> 24 conv (20 real output channels).

    Build with :meth:`from_separate_head`. ``fused_from[l]`` names the layers (relative to the
    head) that conv ``l`` replaces, for the engine's layer-precision report.
    """

    def __init__(self, *, head_names: Sequence[str], channels: Sequence[int], convs: Sequence[nn.Conv2d],
                 fused_from: Sequence[Sequence[str]] = ()) -> None:
        super().__init__()
        if len(head_names) != len(channels):
            raise ValueError(f"head_names and channels need one entry per branch, got {len(head_names)} and "
                             f"{len(channels)}")
        if not convs or convs[-1].out_channels < sum(channels):
            raise ValueError(f"the last conv must have at least sum(channels)={sum(channels)} output channels")
        self.head_names = tuple(head_names)
        self.channels = tuple(int(c) for c in channels)
        self.convs = nn.ModuleList(convs)
        self.fused_from = tuple(tuple(f) for f in fused_from)

    @classmethod
    def from_separate_head(cls, head: SeparateHead, *, pad_to: int = 8) -> FusedSeparateHead:
        """The fused form of ``head`` (BatchNorm folded: every ``ConvBNReLU.bn`` an ``nn.Identity``).

        The new convs are built in the head's dtype and on its device; ``head`` is left unchanged.

        Raises:
            ValueError: ``pad_to`` < 1; branches of different depths or conv geometries, a layer that
                is not a plain ``nn.Conv2d`` (e.g. already quantized), or an unfolded BatchNorm.
        """
        if not (isinstance(pad_to, int) and pad_to >= 1):
            raise ValueError(f"pad_to must be a positive int, got {pad_to!r}")
        stacks = [_branch_convs(name, getattr(head, name)) for name in head.head_names]
        convs = stack_branch_convs(stacks, pad_to=pad_to, names=head.head_names)
        fused_from = [[f"{name}.{_layer_name(getattr(head, name), layer)}" for name in head.head_names]
                      for layer in range(len(convs))]
        channels = [s[-1].out_channels for s in stacks]
        return cls(head_names=head.head_names, channels=channels, convs=convs, fused_from=fused_from)

    @property
    def fused_layers(self) -> dict[str, tuple[str, ...]]:
        """``convs.<l>`` -> the branch layers it replaces (relative to the head)."""
        return {f"convs.{i}": tuple(f) for i, f in enumerate(self.fused_from)}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        for conv in self.convs[:-1]:
            x = F.relu(conv(x))
        y = self.convs[-1](x)  # [B, sum(channels) rounded up to pad_to, H, W]
        out, start = {}, 0
        for name, c in zip(self.head_names, self.channels):
            out[name] = y[:, start:start + c]
            start += c
        return out

    def extra_repr(self) -> str:
        return f"heads={dict(zip(self.head_names, self.channels))}"


def stack_branch_convs(stacks: Sequence[Sequence[nn.Conv2d]], *, pad_to: int = 8, names: Sequence[str] = (),
                       gains: Sequence[float] | None = None) -> list[nn.Conv2d]:
    """Branches of equal depth that read one input (conv -> ReLU -> ... -> conv each) as one conv stack:
    layer 0 concatenated, every later layer block-diagonal (branch ``i``'s filters read only branch ``i``'s
    channels of the layer before, zeros elsewhere), output channels padded to a multiple of ``pad_to`` with
    zero filters and bias. New convs in the branches' dtype and device; the branches are left unchanged.

    ``gains`` (one positive float per branch, two-layer branches): branch ``i``'s hidden channels are
    multiplied by ``gains[i]`` (its layer-0 filters and bias; ReLU commutes with a positive factor) and its
    layer-1 filters divided by it: the same maps, with the hidden ranges of the branches made equal, so one
    int8 scale on the concatenated hidden tensor resolves every branch as its own scale did
    (:func:`bevdeploy.engine.deploy.fuse_centernet_head`).

    Raises:
        ValueError: branches of different depths or conv geometries, layer-0 convs reading different
            channel counts, a layer reading more or fewer channels than its branch's previous one writes,
            or gains that are not positive and finite / given for branches of other than two layers.
    """
    names = tuple(names) or tuple(str(i) for i in range(len(stacks)))
    depths = {len(s) for s in stacks}
    if len(depths) != 1:
        raise ValueError(f"branches of one depth fuse; got depths {[len(s) for s in stacks]}")
    if gains is not None and (len(gains) != len(stacks) or depths != {2}
                              or not all(math.isfinite(g) and g > 0 for g in gains)):
        raise ValueError(f"gains: one positive finite factor per two-layer branch, got {list(gains)} for "
                         f"depths {sorted(depths)}")
    convs = []
    in_offsets = None  # branch i reads channels [in_offsets[i], in_offsets[i + 1]) of the previous layer
    in_total = stacks[0][0].in_channels
    for layer in range(len(stacks[0])):
        group = [s[layer] for s in stacks]
        ref = group[0]
        geometry = {(c.kernel_size, c.stride, c.padding, c.dilation, c.padding_mode, c.weight.dtype, c.weight.device)
                    for c in group}
        if len(geometry) != 1:
            raise ValueError(f"branch convs of one geometry, dtype and device fuse; layer {layer} has "
                             f"{sorted(map(str, geometry))}")
        if in_offsets is None and len({c.in_channels for c in group}) != 1:
            raise ValueError("the first convs of all branches must read the same input channels")
        out_offsets = [0]
        for c in group:
            out_offsets.append(out_offsets[-1] + c.out_channels)
        out_total = -(-out_offsets[-1] // pad_to) * pad_to
        conv = nn.Conv2d(in_total, out_total, ref.kernel_size, ref.stride, ref.padding, ref.dilation,
                         bias=True, padding_mode=ref.padding_mode, device=ref.weight.device,
                         dtype=ref.weight.dtype)
        with torch.no_grad():
            conv.weight.zero_()
            conv.bias.zero_()
            for i, c in enumerate(group):
                o0, o1 = out_offsets[i], out_offsets[i + 1]
                i0, i1 = (0, in_total) if in_offsets is None else (in_offsets[i], in_offsets[i + 1])
                if c.in_channels != i1 - i0:
                    raise ValueError(f"branch {names[i]} layer {layer} reads {c.in_channels} channels, "
                                     f"its previous layer writes {i1 - i0}")
                gain = 1.0 if gains is None else float(gains[i]) if layer == 0 else 1.0 / float(gains[i])
                conv.weight[o0:o1, i0:i1] = c.weight * gain
                if c.bias is not None:
                    conv.bias[o0:o1] = c.bias * gain if layer == 0 else c.bias
        convs.append(conv)
        in_offsets, in_total = out_offsets, out_total
    return convs


def _branch_convs(name: str, branch: nn.Module) -> list[nn.Conv2d]:
    """The convs of one SeparateHead branch, in order (ReLU after all but the last)."""
    if not isinstance(branch, nn.Sequential) or len(branch) == 0:
        raise ValueError(f"branch {name} must be a non-empty nn.Sequential, got {type(branch).__name__}")
    convs = []
    for i, layer in enumerate(branch):
        last = i == len(branch) - 1
        if not last and type(layer) is ConvBNReLU and type(layer.bn) is nn.Identity:
            layer = layer.conv
        elif not last:
            raise ValueError(f"branch {name} layer {i} must be a ConvBNReLU with its BatchNorm folded (nn.Identity), "
                             f"got {type(layer).__name__}" + (f" with bn {type(layer.bn).__name__}"
                                                              if isinstance(layer, ConvBNReLU) else ""))
        if type(layer) is not nn.Conv2d or layer.groups != 1:
            raise ValueError(f"branch {name} layer {i} must be a plain nn.Conv2d (groups=1), got "
                             f"{type(layer).__name__}")
        convs.append(layer)
    return convs


def _layer_name(branch: nn.Sequential, index: int) -> str:
    return f"{index}.conv" if index < len(branch) - 1 else str(index)


class CenterHead(nn.Module):
    """CenterPoint head: ``shared_conv`` (3x3 conv-BN-ReLU, 256 -> 64) then one SeparateHead per task.

    dev2.1 BEVDet has one task (all 10 classes); the forward returns that task's maps.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        common_heads: Sequence[tuple[str, int, int]],
        share_conv_channels: int = 64,
        head_conv_channels: int = 64,
        final_kernel: int = 3,
        num_heatmap_convs: int = 2,
    ) -> None:
        super().__init__()
        self.shared_conv = ConvBNReLU(in_channels, share_conv_channels, 3, padding=1)
        heads = list(common_heads) + [("heatmap", num_classes, num_heatmap_convs)]
        self.task_heads = nn.ModuleList(
            [SeparateHead(in_channels=share_conv_channels, heads=heads, head_conv=head_conv_channels,
                          final_kernel=final_kernel)]
        )

    def init_weights(self, heatmap_bias: float = -2.19) -> None:
        """The official heatmap prior: final heatmap bias -2.19 (sigmoid ~0.1)."""
        with torch.no_grad():
            for task in self.task_heads:
                task.heatmap[-1].bias.fill_(heatmap_bias)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.task_heads[0](self.shared_conv(x))


# --------------------------------------------------------------------------------------------
# Box decoding and NMS (CenterPointBBoxCoder + CenterHead.get_bboxes, test time)
# --------------------------------------------------------------------------------------------


def _box_corners_bev(boxes: Tensor) -> Tensor:
    """[M, 5] (x, y, dx, dy, yaw) -> [M, 4, 2] corners, counter-clockwise (dx along yaw, CCW yaw)."""
    x, y, dx, dy, yaw = boxes.unbind(-1)
    c, s = torch.cos(yaw), torch.sin(yaw)
    lx = torch.stack([dx, -dx, -dx, dx], -1) / 2
    ly = torch.stack([dy, dy, -dy, -dy], -1) / 2
    return torch.stack([x[:, None] + c[:, None] * lx - s[:, None] * ly, y[:, None] + s[:, None] * lx + c[:, None] * ly], -1)


def _cross(a: Tensor, b: Tensor) -> Tensor:
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def _inside(points: Tensor, poly: Tensor, eps: float) -> Tensor:
    """points [K, P, 2] inside convex CCW poly [K, 4, 2] (boundary included) -> [K, P] bool."""
    edges = poly.roll(-1, dims=1) - poly  # [K, 4, 2]
    rel = points[:, :, None, :] - poly[:, None, :, :]  # [K, P, 4, 2]
    return (_cross(edges[:, None].expand_as(rel), rel) >= -eps).all(-1)


def rotated_iou_bev(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """Pairwise IoU of rotated BEV rectangles, row ``k`` of ``boxes_a`` with row ``k`` of ``boxes_b``.

    The overlap polygon is the convex hull of the corners of each box inside the other and the
    edge-edge crossings, ordered by angle about its centroid (mmcv ``box_iou_rotated``'s method;
    its box ``(x, y, w, h, a)`` has ``w`` along ``a``, counter-clockwise, as here). Float64 inside.

    Args:
        boxes_a, boxes_b (Tensor[K, 5]): (x, y, dx, dy, yaw), ``dx`` along the heading ``yaw``.

    Returns:
        Tensor[K] float64: intersection / union (0 for disjoint boxes).
    """
    a, b = boxes_a.double(), boxes_b.double()
    K = a.shape[0]
    if K == 0:
        return a.new_zeros(0)
    pa, pb = _box_corners_bev(a), _box_corners_bev(b)  # [K, 4, 2]
    scale = torch.maximum(a[:, 2:4].abs().amax(-1), b[:, 2:4].abs().amax(-1)).clamp_min(1e-12)
    eps = 1e-9 * float(scale.max())
    in_a = _inside(pb, pa, eps)  # corners of b inside a
    in_b = _inside(pa, pb, eps)
    # edge i of a against edge j of b: p + t r = q + u s
    p, r = pa[:, :, None, :], (pa.roll(-1, 1) - pa)[:, :, None, :]
    q, s = pb[:, None, :, :], (pb.roll(-1, 1) - pb)[:, None, :, :]
    denom = _cross(r, s)  # [K, 4, 4]
    safe = torch.where(denom.abs() > 1e-12, denom, torch.ones_like(denom))
    t = _cross(q - p, s) / safe
    u = _cross(q - p, r) / safe
    crossing = (denom.abs() > 1e-12) & (t >= 0) & (t <= 1) & (u >= 0) & (u <= 1)
    cross_pts = (p + t[..., None] * r).reshape(K, 16, 2)
    pts = torch.cat([pa, pb, cross_pts], 1)  # [K, 24, 2]
    valid = torch.cat([in_b, in_a, crossing.reshape(K, 16)], 1)
    n = valid.sum(1)
    centre = (pts * valid[..., None]).sum(1) / n.clamp_min(1)[:, None]
    ang = torch.atan2(pts[..., 1] - centre[:, None, 1], pts[..., 0] - centre[:, None, 0])
    ang = torch.where(valid, ang, torch.full_like(ang, 10.0))  # invalid points sort last
    order = ang.argsort(1)
    pts = pts.gather(1, order[..., None].expand(-1, -1, 2))
    valid = valid.gather(1, order)
    pts = torch.where(valid[..., None], pts, pts[:, :1].expand_as(pts))  # pad with the first point: closes the ring
    inter = 0.5 * _cross(pts, pts.roll(-1, 1)).sum(1).abs()
    inter = torch.where(n >= 3, inter, torch.zeros_like(inter))
    union = a[:, 2] * a[:, 3] + b[:, 2] * b[:, 3] - inter
    return inter / union.clamp_min(1e-12)


def _greedy(suppress: np.ndarray) -> list[int]:
    """Greedy NMS over boxes sorted by score: keep i unless a kept box suppresses it."""
    removed = np.zeros(suppress.shape[0], dtype=bool)
    keep = []
    for i in range(suppress.shape[0]):
        if removed[i]:
            continue
        keep.append(i)
        removed |= suppress[i]
    return keep


def nms_bev(
    boxes: Tensor, scores: Tensor, thresh: float, pre_max_size: int | None = None, post_max_size: int | None = None
) -> Tensor:
    """Rotated BEV NMS (mmdet3d 1.0 ``nms_bev`` over mmcv ``nms_rotated``): drop a box whose IoU with
    a higher-scoring kept box is above ``thresh``. Class-agnostic, as BEVDet calls it per task.

    Args:
        boxes (Tensor[N, 5]): (x, y, dx, dy, yaw).
        scores (Tensor[N]).
        thresh: IoU threshold (BEVDet: 0.2).
        pre_max_size / post_max_size: keep the best this many before / after.

    Returns:
        Tensor[M] int64: indices into ``boxes``, by descending score.
    """
    order = torch.sort(scores, descending=True, stable=True).indices
    if pre_max_size is not None:
        order = order[:pre_max_size]
    b = boxes[order].detach().double().cpu()
    n = b.shape[0]
    suppress = np.zeros((n, n), dtype=bool)
    if n > 1:
        # only pairs whose circumscribed circles meet can overlap
        radius = 0.5 * torch.hypot(b[:, 2], b[:, 3])
        dist = torch.cdist(b[:, :2], b[:, :2])
        cand = torch.triu((dist <= radius[:, None] + radius[None, :]), diagonal=1).nonzero()
        if cand.numel():
            iou = rotated_iou_bev(b[cand[:, 0]], b[cand[:, 1]])
            hit = cand[iou > thresh].numpy()
            suppress[hit[:, 0], hit[:, 1]] = True
    keep = torch.as_tensor(_greedy(suppress), dtype=torch.long)
    keep = order.cpu()[keep].to(boxes.device)
    return keep[:post_max_size] if post_max_size is not None else keep


def circle_nms(centers: Tensor, scores: Tensor, thresh: float, post_max_size: int | None = None) -> Tensor:
    """CenterPoint's circle NMS: drop a box whose centre lies within squared distance ``thresh``
    (``min_radius`` of the task, compared with the SQUARED distance as in mmdet3d) of a kept box.

    Returns:
        Tensor[M] int64: indices into ``centers`` [N, 2], by descending score.
    """
    order = torch.sort(scores, descending=True, stable=True).indices
    c = centers[order].detach().double().cpu()
    d2 = torch.cdist(c, c).pow(2)
    suppress = torch.triu(d2 <= thresh, diagonal=1).numpy()
    keep = order.cpu()[torch.as_tensor(_greedy(suppress), dtype=torch.long)].to(centers.device)
    return keep[:post_max_size] if post_max_size is not None else keep


def bevdet_boxes_to_lidar(boxes: Tensor, bev2lidar: Tensor | None = None) -> Tensor:
    """BEVDet boxes (mmdet3d 1.0, model frame) -> the project's model-box contract (LiDAR frame).

    Args:
        boxes (Tensor[N, 9]): x, y, z (bottom centre), dx (length), dy (width), dz (height), yaw
            (nuScenes yaw: heading of dx, counter-clockwise from x), vx, vy.
        bev2lidar (Tensor[4, 4] | None): model frame -> LiDAR frame
            (:func:`bevdeploy.data.preprocess_bevdet.bev2lidar`); None keeps the model frame.

    Returns:
        Tensor[N, 9]: x, y, z (bottom centre), w, l, h, yaw (mmdet3d 0.17: ``-yaw_nuscenes - pi/2``,
        wrapped to [-pi, pi)), vx, vy. The box moves rigidly: its gravity centre and heading are
        transformed, then the bottom is taken along the new z.
    """
    if boxes.dim() != 2 or boxes.shape[1] != 9:
        raise ValueError(f"boxes must be [N, 9], got {list(boxes.shape)}")
    b = boxes.double()
    centre = b[:, :3].clone()
    centre[:, 2] = centre[:, 2] + b[:, 5] / 2
    heading = torch.stack([torch.cos(b[:, 6]), torch.sin(b[:, 6]), torch.zeros_like(b[:, 6])], -1)
    vel = torch.cat([b[:, 7:9], torch.zeros_like(b[:, 7:8])], -1)
    if bev2lidar is not None:
        T = torch.as_tensor(bev2lidar, dtype=torch.float64, device=b.device)
        if T.shape != (4, 4):
            raise ValueError(f"bev2lidar must be [4, 4], got {list(T.shape)}")
        R, t = T[:3, :3], T[:3, 3]
        centre = centre @ R.T + t
        heading = heading @ R.T
        vel = vel @ R.T
    yaw_nus = torch.atan2(heading[:, 1], heading[:, 0])
    yaw = torch.remainder(-yaw_nus - math.pi / 2 + math.pi, 2 * math.pi) - math.pi
    bottom = centre.clone()
    bottom[:, 2] = bottom[:, 2] - b[:, 5] / 2
    out = torch.cat([bottom, b[:, 4:5], b[:, 3:4], b[:, 5:6], yaw[:, None], vel[:, :2]], 1)
    return out.to(boxes.dtype)


class CenterPointDecoder:
    """CenterPoint test-time decoding as BEVDet dev2.1 runs it (``CenterPointBBoxCoder.decode`` +
    ``CenterHead.get_bboxes`` with ``nms_type='rotate'``).

    Per sample: sigmoid heatmap; the ``max_num`` best (class, cell) scores (the official two-stage
    top-k, per class then overall, selects the same set); centre ``((col, row) + reg) * cell +
    lower bound``; ``z`` = height (gravity centre); sizes ``exp(dim)``; yaw ``atan2(sin, cos)``;
    keep score > ``score_threshold`` and centre inside ``post_center_range``; Scale-NMS: sizes
    multiplied by the class's ``nms_rescale_factor``, class-agnostic rotated NMS at IoU
    ``nms_thr`` (or circle NMS), sizes restored; finally z -> bottom centre (``z - h/2``).
    """

    def __init__(self, cfg: BEVDetConfig) -> None:
        self.cfg = cfg
        self.lower = (cfg.grid_x[0], cfg.grid_y[0])
        self.cell = (cfg.grid_x[2], cfg.grid_y[2])

    def decode_single(self, maps: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """One sample's maps (each ``[C, Y, X]``) -> native boxes [N, 9], scores [N], labels [N] int64."""
        cfg = self.cfg
        heat = maps["heatmap"].float().sigmoid()
        _, H, W = heat.shape
        k = min(cfg.max_num, heat.numel())
        scores, idx = heat.reshape(-1).topk(k)
        labels = idx // (H * W)
        pix = idx % (H * W)
        rows, cols = (pix // W).float(), (pix % W).float()

        def at(name: str) -> Tensor:
            m = maps[name].float()
            return m.reshape(m.shape[0], -1)[:, pix].T  # [k, C]

        reg = at("reg")
        x = (cols + reg[:, 0]) * self.cell[0] + self.lower[0]
        y = (rows + reg[:, 1]) * self.cell[1] + self.lower[1]
        z = at("height")[:, 0]
        dims = at("dim").exp()
        rot = at("rot")
        yaw = torch.atan2(rot[:, 0], rot[:, 1])
        vel = at("vel")
        boxes = torch.cat([x[:, None], y[:, None], z[:, None], dims, yaw[:, None], vel], 1)
        lo = torch.tensor(cfg.post_center_range[:3], device=boxes.device)
        hi = torch.tensor(cfg.post_center_range[3:], device=boxes.device)
        mask = (boxes[:, :3] >= lo).all(1) & (boxes[:, :3] <= hi).all(1) & (scores > cfg.score_threshold)
        boxes, scores, labels = boxes[mask], scores[mask], labels[mask]
        if boxes.shape[0]:
            if cfg.nms_type == "circle":
                keep = circle_nms(boxes[:, :2], scores, cfg.min_radius, cfg.post_max_size)
            else:
                factor = torch.tensor(cfg.nms_rescale_factor, device=boxes.device)[labels]
                bev = torch.cat([boxes[:, :2], boxes[:, 3:5] * factor[:, None], boxes[:, 6:7]], 1)
                keep = nms_bev(bev, scores, cfg.nms_thr, cfg.pre_max_size, cfg.post_max_size)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        boxes = boxes.clone()
        boxes[:, 2] = boxes[:, 2] - boxes[:, 5] * 0.5
        return boxes, scores, labels.long()

    def decode(self, outputs: dict[str, Tensor]) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Batched head maps -> per sample (native boxes [N, 9], scores [N], labels [N] int64)."""
        missing = [k for k in HEAD_OUTPUTS if k not in outputs]
        if missing:
            raise ValueError(f"outputs lacks {missing} (expected the head maps {HEAD_OUTPUTS})")
        B = outputs["heatmap"].shape[0]
        return [self.decode_single({k: outputs[k][b] for k in HEAD_OUTPUTS}) for b in range(B)]

    def decode_to_lidar(
        self, outputs: dict[str, Tensor], bev2lidar: Tensor | Sequence[Tensor] | None = None
    ) -> list[tuple[Tensor, Tensor, Tensor]]:
        """:meth:`decode`, then boxes moved to the LiDAR frame (see :meth:`BEVDet.decode`)."""
        native = self.decode(outputs)
        if bev2lidar is not None and len(bev2lidar) != len(native):
            raise ValueError(f"bev2lidar needs one [4, 4] per sample ({len(native)}), got {len(bev2lidar)}")
        return [
            (bevdet_boxes_to_lidar(b, None if bev2lidar is None else bev2lidar[i]), s, lab)
            for i, (b, s, lab) in enumerate(native)
        ]


# --------------------------------------------------------------------------------------------
# Detector
# --------------------------------------------------------------------------------------------


class BEVDet(nn.Module):
    """The detector: images + BEVPool indices -> CenterPoint maps (the reference engine's I/O).

    Build with :meth:`from_config` or :func:`bevdet_r50_cbgs`. ``geometry`` (host side, not in the
    state dict) turns camera parameters into the index inputs: ``model(image, *model.prepare(...))``.

    Example:
        >>> model = bevdet_r50_cbgs(image_size=(64, 176), grid_x=(-12.8, 12.8, 0.8),
        ...                         grid_y=(-12.8, 12.8, 0.8), depth_bins=(1.0, 13.0, 1.0)).eval()
        >>> eye = torch.eye(4).expand(1, 6, 4, 4)
        >>> K = torch.tensor([[80.0, 0, 88], [0, 80, 32], [0, 0, 1]]).expand(1, 6, 3, 3)
        >>> ranks = model.prepare(eye, K, torch.eye(3).expand(1, 6, 3, 3), torch.zeros(1, 6, 3))
        >>> out = model(torch.randn(1, 6, 3, 64, 176), *ranks)
        >>> tuple(out["heatmap"].shape)
        (1, 10, 32, 32)
    """

    def __init__(
        self,
        *,
        img_backbone: ResNet,
        img_neck: CustomFPN,
        img_view_transformer: LSSViewTransformer,
        img_bev_encoder_backbone: CustomResNet,
        img_bev_encoder_neck: FPNLSS,
        pts_bbox_head: CenterHead,
        config: BEVDetConfig,
    ) -> None:
        super().__init__()
        self.img_backbone = img_backbone
        self.img_neck = img_neck
        self.img_view_transformer = img_view_transformer
        self.img_bev_encoder_backbone = img_bev_encoder_backbone
        self.img_bev_encoder_neck = img_bev_encoder_neck
        self.pts_bbox_head = pts_bbox_head
        self.config = config
        self.geometry = BEVDetGeometry.from_config(config)
        self.decoder = CenterPointDecoder(config)

    @classmethod
    def from_config(cls, cfg: BEVDetConfig) -> BEVDet:
        """Build the whole model from a :class:`BEVDetConfig` (official heatmap bias init)."""
        backbone = ResNet(
            depth=cfg.depth, out_indices=cfg.out_indices, style=cfg.style,
            frozen_stages=cfg.frozen_stages, norm_eval=cfg.norm_eval,
        )
        neck = CustomFPN(in_channels=cfg.fpn_in_channels, out_channels=cfg.fpn_out_channels, out_ids=(0,))
        view = LSSViewTransformer(
            in_channels=cfg.fpn_out_channels, out_channels=cfg.bev_channels,
            num_depth_bins=cfg.num_depth_bins, grid_size=cfg.grid_size,
        )
        Z = cfg.grid_size[2]
        bev_backbone = CustomResNet(
            in_channels=cfg.bev_channels * Z, num_layers=cfg.bev_num_layers,
            num_channels=cfg.bev_layer_channels, strides=cfg.bev_strides,
        )
        i0, i1 = cfg.bev_neck_input_index
        bev_neck = FPNLSS(
            in_channels=cfg.bev_layer_channels[i0] + cfg.bev_layer_channels[i1],
            out_channels=cfg.bev_neck_out_channels,
            scale_factor=cfg.bev_neck_scale_factor,
            input_feature_index=cfg.bev_neck_input_index,
            extra_upsample=cfg.bev_neck_extra_upsample,
        )
        head = CenterHead(
            in_channels=cfg.bev_neck_out_channels, num_classes=cfg.num_classes, common_heads=cfg.common_heads,
            share_conv_channels=cfg.share_conv_channels, head_conv_channels=cfg.head_conv_channels,
            final_kernel=cfg.final_kernel, num_heatmap_convs=cfg.num_heatmap_convs,
        )
        head.init_weights(cfg.heatmap_init_bias)
        return cls(
            img_backbone=backbone, img_neck=neck, img_view_transformer=view,
            img_bev_encoder_backbone=bev_backbone, img_bev_encoder_neck=bev_neck,
            pts_bbox_head=head, config=cfg,
        )

    def prepare(
        self, sensor2ego: Tensor, intrinsics: Tensor, post_rots: Tensor, post_trans: Tensor, bda: Tensor | None = None
    ) -> BEVPoolRanks:
        """The index inputs for these cameras (cached per calibration); see :meth:`BEVDetGeometry.ranks`."""
        return self.geometry.ranks(sensor2ego, intrinsics, post_rots, post_trans, bda)

    def extract_img_feat(self, image: Tensor) -> Tensor:
        """``image [B, N, 3, H, W]`` -> stride-16 features ``[B*N, 256, fH, fW]``."""
        return self.img_neck(self.img_backbone(image.flatten(0, 1)))

    def forward_bev(self, img_feat: Tensor, batch: int, ranks: Sequence[Tensor]) -> Tensor:
        """Lift-splat then the BEV encoder: ``[B, 256, Y, X]``."""
        bev = self.img_view_transformer(img_feat, batch, ranks)
        return self.img_bev_encoder_neck(self.img_bev_encoder_backbone(bev))

    def forward_head(self, bev_feat: Tensor) -> dict[str, Tensor]:
        return self.pts_bbox_head(bev_feat)

    def forward(
        self,
        image: Tensor,
        ranks_bev: Tensor,
        ranks_depth: Tensor,
        ranks_feat: Tensor,
        interval_starts: Tensor,
        interval_lengths: Tensor,
    ) -> dict[str, Tensor]:
        """One frame of B samples.

        Args:
            image (Tensor[B, N, 3, H, W]): normalised network input, BEVDet's camera order.
            ranks_bev, ranks_depth, ranks_feat (Tensor[P] int32), interval_starts,
                interval_lengths (Tensor[I] int32): from :meth:`prepare` for these B samples.

        Returns:
            dict: ``reg``, ``height``, ``dim``, ``rot``, ``vel``, ``heatmap``, each [B, c, Y, X].
        """
        cfg = self.config
        H, W = cfg.image_size
        if image.dim() != 5 or tuple(image.shape[1:]) != (cfg.num_cams, 3, H, W):
            raise ValueError(f"image must have shape [B, {cfg.num_cams}, 3, {H}, {W}], got {list(image.shape)}")
        ranks = (ranks_bev, ranks_depth, ranks_feat, interval_starts, interval_lengths)
        for name, t in zip(BEVPoolRanks._fields, ranks):
            if t.dim() != 1:
                raise ValueError(f"{name} must be 1-D (from BEVDet.prepare), got shape {list(t.shape)}")
        img_feat = self.extract_img_feat(image)
        bev_feat = self.forward_bev(img_feat, image.shape[0], ranks)
        return self.forward_head(bev_feat)

    def decode(
        self, outputs: dict[str, Tensor], bev2lidar: Tensor | Sequence[Tensor] | None = None
    ) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per sample ``(boxes [N, 9], scores [N], labels [N] int64)`` in the model-box contract.

        Args:
            outputs: The forward's maps.
            bev2lidar (Tensor[B, 4, 4] | None): per sample, model frame -> LiDAR frame
                (:func:`bevdeploy.data.preprocess_bevdet.bev2lidar`); None keeps the model frame.

        Returns:
            ``boxes`` x, y, z (bottom centre), w, l, h, yaw, vx, vy in the LiDAR frame with mmdet3d
            0.17's convention (what ``bevdeploy.eval`` takes), after the official Scale-NMS.
        """
        return self.decoder.decode_to_lidar(outputs, bev2lidar)


# --------------------------------------------------------------------------------------------
# Named constructor
# --------------------------------------------------------------------------------------------


def bevdet_r50_cbgs(**overrides) -> BEVDet:
    """BEVDet-R50-CBGS (dev2.1): R50 + CustomFPN, LSS 59 depth bins x 64 channels, BEV 128x128 @ 0.8 m,
    CenterPoint head with one 10-class task; 256x704 input.

    Keyword arguments override :class:`BEVDetConfig` fields (e.g. a smaller ``image_size`` and grid).
    """
    base = BEVDET_CONFIGS["bevdet-r50-cbgs"]
    cfg = dataclasses.replace(base, **overrides) if overrides else base
    return BEVDet.from_config(cfg)

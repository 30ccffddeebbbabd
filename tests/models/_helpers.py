"""Shared pieces of the model tests: a nuScenes-like camera rig, reduced configs, random weights."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from bevdeploy.models import BEVFORMER_CONFIGS, BEVFormerConfig

#: Reduced sizes: 6 cameras of 64x96 (C5 2x3), BEV 8x8, 20 object queries. The previous BEV rotates
#: about the grid's centre: the official (100, 100) is base's 200x200 centre and would rotate an
#: 8x8 grid entirely out of view, leaving the rotation untested.
SMALL = dict(image_size=(64, 96), bev_h=8, bev_w=8, num_query=20, rotate_center=(4.0, 4.0))

#: Camera yaw (degrees, CCW from the LiDAR x axis) in CAMERA_NAMES order, about nuScenes' rig.
CAMERA_YAWS = (0.0, -55.0, 55.0, 180.0, 110.0, -110.0)


def small_config(name: str, **overrides) -> BEVFormerConfig:
    return dataclasses.replace(BEVFORMER_CONFIGS[name], **{**SMALL, **overrides})


def rig_lidar2img(batch: int, image_size: tuple[int, int], focal_scale: float = 0.9) -> Tensor:
    """[B, 6, 4, 4] LiDAR -> pixel matrices of six cameras 1.5 m up, looking out horizontally.

    Fields of view are narrower than the 60-degree spacing so some BEV cells fall between cameras
    (seen by none) while others are seen by two; batch entries differ by a small yaw so streams differ.
    """
    H, W = image_size
    f = W * focal_scale
    K = torch.tensor([[f, 0, W / 2, 0], [0, f, H / 2, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.float64)
    out = torch.empty(batch, 6, 4, 4, dtype=torch.float64)
    for b in range(batch):
        for c, yaw in enumerate(CAMERA_YAWS):
            t = math.radians(yaw + 3.0 * b)
            fwd = torch.tensor([math.cos(t), math.sin(t), 0.0], dtype=torch.float64)
            right = torch.tensor([math.sin(t), -math.cos(t), 0.0], dtype=torch.float64)
            down = torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64)
            R = torch.stack([right, down, fwd], 1)  # camera -> LiDAR rotation (columns = camera axes)
            lidar2cam = torch.eye(4, dtype=torch.float64)
            lidar2cam[:3, :3] = R.T
            lidar2cam[:3, 3] = -R.T @ torch.tensor([0.0, 0.0, 1.5], dtype=torch.float64)
            out[b, c] = K @ lidar2cam
    return out.float()


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights of a sensible scale everywhere (the official init zeroes the attention weights,
    which would hide mistakes in the sampling); outputs stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
        elif name.endswith("weight"):  # 1-D weights are BatchNorm / LayerNorm scales
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    for name, b in module.named_buffers():
        if name.endswith("running_var"):
            b.copy_(1.0 + 0.1 * torch.rand(b.shape, generator=g))
        elif name.endswith("running_mean"):
            b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return module


def can_bus(batch: int, seed: int = 0) -> Tensor:
    """[B, 18] CAN bus with metre-scale translation deltas, a yaw (rad) and a yaw delta (degrees)."""
    g = torch.Generator().manual_seed(seed)
    cb = torch.randn(batch, 18, generator=g)
    cb[:, 0:3] = torch.randn(batch, 3, generator=g) * 2.0
    cb[:, 16] = torch.rand(batch, generator=g) * 2 * math.pi
    cb[:, 17] = torch.randn(batch, generator=g) * 5.0
    return cb

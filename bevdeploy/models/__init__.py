"""Native PyTorch models with the official state-dict key names (``MODELS``: name -> constructor).

Each constructor takes keyword overrides of its config dataclass, e.g.
``MODELS["bevformer-tiny"](image_size=(64, 96), bev_h=8, bev_w=8, num_query=20)`` for a fast test
model. Checkpoints load with :func:`bevdeploy.models.checkpoint.load_checkpoint`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from bevdeploy.models.bevformer import (
    BEVFORMER_CONFIGS,
    BEVFormer,
    BEVFormerConfig,
    bevformer_base,
    bevformer_small,
    bevformer_tiny,
)
from bevdeploy.models.bevdet import BEVDET_CONFIGS, BEVDet, BEVDetConfig, bevdet_r50_cbgs
from bevdeploy.models.centernet import CenterNet, CenterNetConfig, centernet_r18_dcn
from bevdeploy.models.checkpoint import load_checkpoint
from bevdeploy.models.yolox import YOLOX, YOLOXConfig, yolox_x

__all__ = [
    "MODELS",
    "BEVFORMER_CONFIGS",
    "BEVFormer",
    "BEVFormerConfig",
    "bevformer_tiny",
    "bevformer_small",
    "bevformer_base",
    "BEVDET_CONFIGS",
    "BEVDet",
    "BEVDetConfig",
    "bevdet_r50_cbgs",
    "load_checkpoint",
    "YOLOX",
    "YOLOXConfig",
    "yolox_x",
    "CenterNet",
    "CenterNetConfig",
    "centernet_r18_dcn",
    "DET2D_MODELS",
]

#: Every model by its CLI name.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "bevformer-tiny": bevformer_tiny,
    "bevformer-small": bevformer_small,
    "bevformer-base": bevformer_base,
    "bevdet-r50-cbgs": bevdet_r50_cbgs,
    "bevdet-r50": bevdet_r50_cbgs,  # the short name the reference system's tables use
    "yolox-x": yolox_x,
    "centernet-r18-dcn": centernet_r18_dcn,
}

#: The 2D (COCO) detectors among ``MODELS``.
DET2D_MODELS = ("yolox-x", "centernet-r18-dcn")

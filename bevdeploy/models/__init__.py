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
from bevdeploy.models.checkpoint import load_checkpoint

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
]

#: Every model by its CLI name.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "bevformer-tiny": bevformer_tiny,
    "bevformer-small": bevformer_small,
    "bevformer-base": bevformer_base,
    "bevdet-r50-cbgs": bevdet_r50_cbgs,
    "bevdet-r50": bevdet_r50_cbgs,  # the short name the reference system's tables use
}

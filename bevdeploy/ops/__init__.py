"""The reference system's TensorRT plugins as ``torch.library`` ops with Triton kernels.

Importing this package registers every ``torch.ops.bevdeploy.*`` op. See ``ops/README.md`` for the
variants (fp32, fp16, fp16x2, int8), the dispatch rule and the registration choice.
Note: the functions shadow their modules' names here (``bevdeploy.ops.msda`` is the function);
import module-level helpers with ``from bevdeploy.ops.msda import reference``.
"""

from bevdeploy.ops.bev_pool_v2 import BEVPoolV2, bev_pool_v2, bev_pool_v2_prepare
from bevdeploy.ops.flash_attention import FlashAttention, flash_attention
from bevdeploy.ops.grid_sample import GridSample, grid_sample
from bevdeploy.ops.inverse import Inverse, inverse
from bevdeploy.ops.modulated_deform_conv2d import (
    ModulatedDeformConv2d,
    ModulatedDeformConv2dPack,
    modulated_deform_conv2d,
)
from bevdeploy.ops.msda import MSDA, MSDAFused, msda, msda_fused
from bevdeploy.ops.rotate import Rotate, rotate

__all__ = [
    "BEVPoolV2", "bev_pool_v2", "bev_pool_v2_prepare",
    "FlashAttention", "flash_attention",
    "GridSample", "grid_sample",
    "Inverse", "inverse",
    "ModulatedDeformConv2d", "ModulatedDeformConv2dPack", "modulated_deform_conv2d",
    "MSDA", "MSDAFused", "msda", "msda_fused",
    "Rotate", "rotate",
]

"""A small module that calls every bevdeploy op once, for export / compile / ONNX round trips."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bevdeploy.ops._utils import quantize_int8

SHAPES = [(4, 5), (2, 3)]
_FLOAT = {"fp32": torch.float32, "fp16": torch.float16, "fp16x2": torch.float16}


class AllOps(nn.Module):
    """Calls grid_sample, msda, msda_fused, modulated_deform_conv2d, rotate, inverse, bev_pool_v2
    and flash_attention in one forward with one variant; returns a tuple of their outputs."""

    def __init__(self, variant: str = "fp32", scale: float = 0.05):
        super().__init__()
        self.variant = variant
        self.scale = scale if variant == "int8" else None
        g = torch.Generator().manual_seed(0)
        weight = torch.randn(3, 4, 3, 3, generator=g) / 6
        if variant == "int8":
            from bevdeploy.ops.modulated_deform_conv2d import quantize_weight_per_channel

            wq, ws = quantize_weight_per_channel(weight)
            self.register_buffer("dcn_weight", wq)
            self.register_buffer("dcn_weight_scale", ws)
        else:
            self.register_buffer("dcn_weight", weight.to(_FLOAT[variant]))
            self.dcn_weight_scale = None
        self.register_buffer("dcn_bias", torch.randn(3, generator=g))
        from bevdeploy.ops.bev_pool_v2 import bev_pool_v2_prepare

        coor = torch.stack([torch.randint(0, n, (1, 2, 3, 2, 3), generator=g) for n in (5, 4, 1)], -1)
        for name, t in zip(("ranks_bev", "ranks_depth", "ranks_feat", "interval_starts", "interval_lengths"),
                           bev_pool_v2_prepare(coor, grid_size=(5, 4, 1))):
            self.register_buffer(name, t)

    def forward(self, img: Tensor, grid: Tensor, value: Tensor, ref: Tensor, offsets: Tensor, logits: Tensor,
                locations: Tensor, weights: Tensor, dcn_offset: Tensor, dcn_mask: Tensor, bev: Tensor, angle: Tensor,
                mats: Tensor, depth: Tensor, feat: Tensor, q: Tensor, k: Tensor, v: Tensor):
        from bevdeploy.ops.bev_pool_v2 import bev_pool_v2
        from bevdeploy.ops.flash_attention import flash_attention
        from bevdeploy.ops.grid_sample import grid_sample
        from bevdeploy.ops.inverse import inverse
        from bevdeploy.ops.modulated_deform_conv2d import modulated_deform_conv2d
        from bevdeploy.ops.msda import msda, msda_fused
        from bevdeploy.ops.rotate import rotate

        var, s = self.variant, self.scale
        return (
            grid_sample(img, grid, variant=var, input_scale=s),
            msda(value, SHAPES, locations, weights, variant=var, value_scale=s),
            msda_fused(value, SHAPES, ref, offsets, logits, variant=var, value_scale=s),
            modulated_deform_conv2d(img, dcn_offset, dcn_mask, self.dcn_weight, self.dcn_bias.to(dcn_offset.dtype),
                                        1, 1, 1, variant=var, input_scale=s, weight_scale=self.dcn_weight_scale),
            rotate(bev, angle, (2.0, 3.0), interpolation="bilinear", variant=var, img_scale=s),
            inverse(mats),
            bev_pool_v2(depth, feat, self.ranks_depth, self.ranks_feat, self.ranks_bev, (1, 1, 4, 5, 4),
                            self.interval_starts, self.interval_lengths, variant=var, depth_scale=s, feat_scale=s),
            flash_attention(q, k, v, variant=var, q_scale=s, k_scale=s, v_scale=s),
        )


def all_ops_inputs(variant: str = "fp32", seed: int = 0, scale: float = 0.05) -> tuple[Tensor, ...]:
    """Inputs for :class:`AllOps`: the big tensors in the variant's storage, the small ones float."""
    g = torch.Generator().manual_seed(seed)

    def big(*shape):
        x = torch.randn(*shape, generator=g)
        return quantize_int8(x, scale) if variant == "int8" else x.to(_FLOAT[variant])

    def small(*shape, rand=False):
        x = torch.rand(*shape, generator=g) if rand else torch.randn(*shape, generator=g)
        return x if variant == "fp32" else x.half()

    S = sum(h * w for h, w in SHAPES)
    loc = small(1, 6, 2, 2, 4, 2, rand=True)
    w = torch.rand(1, 6, 2, 2, 4, generator=g)
    w = (w / w.sum((-1, -2), keepdim=True)).to(loc.dtype)
    return (
        big(1, 4, 6, 8),                        # img
        small(1, 5, 5, 2),                      # grid
        big(1, S, 2, 4),                        # value
        small(1, 6, 2, 2, rand=True),           # ref
        small(1, 6, 2, 2, 4, 2),                # offsets (pixels)
        small(1, 6, 2, 8),                      # logits
        loc,                                    # locations
        w,                                      # weights
        small(1, 18, 6, 8),                     # dcn offset
        small(1, 9, 6, 8, rand=True),           # dcn mask
        big(4, 6, 6),                           # bev to rotate
        torch.tensor([12.0]),                   # angle
        torch.randn(6, 4, 4, generator=g) + 4 * torch.eye(4),  # matrices
        big(1, 2, 3, 2, 3).abs() if variant != "int8" else quantize_int8(torch.rand(1, 2, 3, 2, 3, generator=g), 1 / 127),
        big(1, 2, 2, 3, 4),                     # feat
        big(1, 2, 5, 4), big(1, 2, 5, 4), big(1, 2, 5, 4),  # q, k, v
    )

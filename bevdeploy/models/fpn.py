"""Feature pyramid network with mmdet's module names (``lateral_convs.i.conv``, ``fpn_convs.i.conv``).

Origin: mmdetection 2.x ``mmdet/models/necks/fpn.py`` as BEVFormer configures it: no norm, no
activation (so every conv has a bias), nearest-neighbour top-down upsampling to the lower level's
size, and ``add_extra_convs="on_output"``: each level beyond the backbone's is a 3x3 stride-2 conv,
the first one on the last FPN output, the following ones on ``relu(previous)`` when
``relu_before_extra_convs``.

The ``.conv`` in the names comes from mmcv's ``ConvModule``, which wraps the conv (and would hold
``.bn``/``.activate`` if the config had any); :class:`ConvModule` here keeps just that name.

BEVFormer-tiny/small: ``in_channels=(2048,)``, ``num_outs=1`` (one 1x1 lateral, one 3x3 output).
BEVFormer-base: ``in_channels=(512, 1024, 2048)``, ``num_outs=4`` (strides 8, 16, 32 + one extra at 64).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ConvModule", "FPN"]


class ConvModule(nn.Module):
    """A conv under the attribute name ``conv`` (mmcv ``ConvModule`` without norm/activation)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class FPN(nn.Module):
    """Top-down feature pyramid (Lin et al., 2017) with optional extra stride-2 levels.

    Args:
        in_channels: Channels of each backbone level, low to high stride.
        out_channels: Channels of every output level.
        num_outs: Number of outputs (``>= len(in_channels) - start_level``).
        start_level: First backbone level used.
        add_extra_convs: ``"on_output"`` (the only mode BEVFormer uses) or ``None`` (max-pool extras).
        relu_before_extra_convs: Apply ReLU before the second and later extra convs.

    Returns (forward): a list of ``num_outs`` tensors ``[N, out_channels, h_l, w_l]``.
    """

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        out_channels: int,
        num_outs: int,
        start_level: int = 0,
        add_extra_convs: str | None = "on_output",
        relu_before_extra_convs: bool = False,
    ) -> None:
        super().__init__()
        in_channels = tuple(int(c) for c in in_channels)
        if not in_channels:
            raise ValueError("in_channels must name at least one backbone level")
        if not 0 <= start_level < len(in_channels):
            raise ValueError(f"start_level must be in [0, {len(in_channels)}), got {start_level}")
        if num_outs < len(in_channels) - start_level:
            raise ValueError(
                f"num_outs must be >= the {len(in_channels) - start_level} backbone levels used, got {num_outs}"
            )
        if add_extra_convs not in (None, "on_output"):
            raise ValueError(f"add_extra_convs must be 'on_output' or None, got {add_extra_convs!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_outs = num_outs
        self.start_level = start_level
        self.add_extra_convs = add_extra_convs
        self.relu_before_extra_convs = relu_before_extra_convs

        self.lateral_convs = nn.ModuleList()
        self.fpn_convs = nn.ModuleList()
        for c in in_channels[start_level:]:
            self.lateral_convs.append(ConvModule(c, out_channels, 1))
            self.fpn_convs.append(ConvModule(out_channels, out_channels, 3, padding=1))
        extra_levels = num_outs - (len(in_channels) - start_level)
        if add_extra_convs is not None:
            for _ in range(extra_levels):
                self.fpn_convs.append(ConvModule(out_channels, out_channels, 3, stride=2, padding=1))

    def forward(self, inputs: Sequence[Tensor]) -> list[Tensor]:
        if len(inputs) != len(self.in_channels):
            raise ValueError(f"FPN expects {len(self.in_channels)} input levels, got {len(inputs)}")
        laterals = [conv(inputs[i + self.start_level]) for i, conv in enumerate(self.lateral_convs)]
        for i in range(len(laterals) - 1, 0, -1):
            upsampled = F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], mode="nearest")
            laterals[i - 1] = laterals[i - 1] + upsampled
        used = len(laterals)
        outs = [self.fpn_convs[i](laterals[i]) for i in range(used)]
        if self.num_outs > used:
            if self.add_extra_convs is None:
                for _ in range(self.num_outs - used):
                    outs.append(F.max_pool2d(outs[-1], 1, stride=2))
            else:
                outs.append(self.fpn_convs[used](outs[-1]))
                for i in range(used + 1, self.num_outs):
                    src = F.relu(outs[-1]) if self.relu_before_extra_convs else outs[-1]
                    outs.append(self.fpn_convs[i](src))
        return outs

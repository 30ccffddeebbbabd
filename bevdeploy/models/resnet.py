"""ResNet-50/101 image backbone with mmdet's module names, so official checkpoints load as they are.

Origin: the ``ResNet`` / ``Bottleneck`` / ``ResLayer`` of mmdetection 2.x (``mmdet/models/backbones/
resnet.py``), which every BEVFormer config builds. What matters for loading and for identical
numbers:

* Names: ``conv1``, ``bn1`` (stem), ``layer{1..4}.{i}.conv1/bn1/conv2/bn2/conv3/bn3`` and
  ``layer{s}.0.downsample.0`` (1x1 conv) / ``.1`` (BN). No conv has a bias.
* ``style``: ``"pytorch"`` puts the stride-2 of a stage's first block on the 3x3 ``conv2``
  (torchvision's ResNet, BEVFormer-tiny); ``"caffe"`` puts it on the 1x1 ``conv1`` (the
  FCOS3D-pretrained R101-DCN of BEVFormer-small/base). Same keys, different feature maps.
* DCNv2 (``stage_with_dcn``): every block of a marked stage swaps its 3x3 ``conv2`` for a modulated
  deformable conv (mmcv ``ModulatedDeformConv2dPack``: keys ``conv2.weight`` and
  ``conv2.conv_offset.weight/bias``, no ``conv2.bias``), from :mod:`bevdeploy.ops`.
* ``frozen_stages`` / ``norm_eval`` only matter for training: BN stays in eval mode when
  ``norm_eval`` (as the configs set it), and the stem plus the first ``frozen_stages`` stages get
  ``requires_grad=False``.

Shapes: ``forward(x (Tensor[N, 3, H, W]))`` returns one ``Tensor[N, 256 * 2**i, H / 2**(i+2),
W / 2**(i+2)]`` per ``i`` in ``out_indices`` (stage i = ``layer{i+1}``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["Bottleneck", "ResNet", "ARCH_SETTINGS"]

#: depth -> blocks per stage (mmdet's ``arch_settings`` for the Bottleneck depths).
ARCH_SETTINGS: dict[int, tuple[int, int, int, int]] = {
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}


def _deform_conv3x3(channels: int, stride: int, dilation: int) -> nn.Module:
    # Imported here so the non-DCN backbones (BEVFormer-tiny) never need the op module.
    from bevdeploy.ops.modulated_deform_conv2d import ModulatedDeformConv2dPack

    return ModulatedDeformConv2dPack(
        channels,
        channels,
        3,
        stride=stride,
        padding=dilation,
        dilation=dilation,
        groups=1,
        deform_groups=1,
        bias=False,
    )


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (or DCNv2) -> 1x1 residual block, expansion 4 (mmdet ``Bottleneck``).

    Args:
        inplanes: Input channels.
        planes: Width of the 3x3 conv; the block outputs ``4 * planes`` channels.
        stride: Stride of the block (on ``conv2`` for ``"pytorch"`` style, ``conv1`` for ``"caffe"``).
        dilation: Dilation (and padding) of the 3x3 conv.
        downsample: Projection of the identity when shape changes (``Sequential(conv, bn)``).
        style: ``"pytorch"`` or ``"caffe"``.
        dcn: Use a modulated deformable 3x3 conv (DCNv2) as ``conv2``.
    """

    expansion = 4

    def __init__(
        self,
        *,
        inplanes: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
        style: str = "pytorch",
        dcn: bool = False,
    ) -> None:
        super().__init__()
        if style not in ("pytorch", "caffe"):
            raise ValueError(f"style must be 'pytorch' or 'caffe', got {style!r}")
        conv1_stride, conv2_stride = (1, stride) if style == "pytorch" else (stride, 1)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=conv1_stride, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        if dcn:
            self.conv2 = _deform_conv3x3(planes, conv2_stride, dilation)
        else:
            self.conv2 = nn.Conv2d(
                planes, planes, 3, stride=conv2_stride, padding=dilation, dilation=dilation, bias=False
            )
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet backbone returning the stages in ``out_indices`` (mmdet ``ResNet``, Bottleneck depths).

    Args:
        depth: 50, 101 or 152.
        out_indices: Stages to return, 0-based (``(3,)`` = C5 only; ``(1, 2, 3)`` = C3-C5).
        style: ``"pytorch"`` (stride on the 3x3 conv) or ``"caffe"`` (stride on the first 1x1).
        stage_with_dcn: Per stage, whether its blocks use DCNv2 for ``conv2``.
        frozen_stages: Stem plus this many stages get ``requires_grad=False`` (-1: none).
        norm_eval: Keep every BatchNorm in eval mode even in ``train()`` (frozen statistics).
        in_channels: Image channels.

    Example:
        >>> net = ResNet(depth=50, out_indices=(3,)).eval()
        >>> [tuple(f.shape) for f in net(torch.zeros(1, 3, 64, 96))]
        [(1, 2048, 2, 3)]
    """

    def __init__(
        self,
        *,
        depth: int,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        style: str = "pytorch",
        stage_with_dcn: Sequence[bool] = (False, False, False, False),
        frozen_stages: int = -1,
        norm_eval: bool = True,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if depth not in ARCH_SETTINGS:
            raise ValueError(f"depth must be one of {sorted(ARCH_SETTINGS)}, got {depth}")
        out_indices = tuple(int(i) for i in out_indices)
        if not out_indices or min(out_indices) < 0 or max(out_indices) > 3:
            raise ValueError(f"out_indices must be non-empty stage indices in 0..3, got {out_indices}")
        if len(stage_with_dcn) != 4:
            raise ValueError(f"stage_with_dcn must have 4 entries (one per stage), got {tuple(stage_with_dcn)}")
        if style not in ("pytorch", "caffe"):
            raise ValueError(f"style must be 'pytorch' or 'caffe', got {style!r}")
        self.depth = depth
        self.out_indices = out_indices
        self.style = style
        self.stage_with_dcn = tuple(bool(d) for d in stage_with_dcn)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval

        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        inplanes = 64
        for i, num_blocks in enumerate(ARCH_SETTINGS[depth]):
            planes = 64 * 2**i
            stride = 1 if i == 0 else 2
            layer = self._make_layer(inplanes, planes, num_blocks, stride, self.stage_with_dcn[i])
            self.add_module(f"layer{i + 1}", layer)
            inplanes = planes * Bottleneck.expansion
        self._freeze_stages()

    def _make_layer(self, inplanes: int, planes: int, num_blocks: int, stride: int, dcn: bool) -> nn.Sequential:
        downsample = None
        if stride != 1 or inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        blocks = [
            Bottleneck(
                inplanes=inplanes, planes=planes, stride=stride, downsample=downsample, style=self.style, dcn=dcn
            )
        ]
        for _ in range(1, num_blocks):
            blocks.append(Bottleneck(inplanes=planes * Bottleneck.expansion, planes=planes, style=self.style, dcn=dcn))
        return nn.Sequential(*blocks)

    @property
    def out_channels(self) -> tuple[int, ...]:
        """Channels of each returned stage (256, 512, 1024, 2048 for stages 0..3)."""
        return tuple(256 * 2**i for i in self.out_indices)

    def _freeze_stages(self) -> None:
        if self.frozen_stages < 0:
            return
        frozen = [self.conv1, self.bn1] + [getattr(self, f"layer{i}") for i in range(1, self.frozen_stages + 1)]
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> ResNet:
        """Like ``nn.Module.train``, but frozen parts and (with ``norm_eval``) every BN stay in eval."""
        super().train(mode)
        if mode:
            if self.frozen_stages >= 0:
                self.bn1.eval()
                for i in range(1, self.frozen_stages + 1):
                    getattr(self, f"layer{i}").eval()
            if self.norm_eval:
                for m in self.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
            if i in self.out_indices:
                outs.append(x)
            if i >= max(self.out_indices):
                break  # later stages would be computed and thrown away
        return outs

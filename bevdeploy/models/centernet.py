"""CenterNet ResNet-18 + DCNv2 neck with mmdetection 2.x's module names (``centernet_resnet18_dcnv2_140e_coco``).

Origin: mmdetection 2.x ``ResNet`` (depth 18: ``BasicBlock``), ``CTResNetNeck``
(``necks/ct_resnet_neck.py``) and ``CenterNetHead`` (``dense_heads/centernet_head.py``) as the config
sets them: the neck takes C5 (512 channels) through three stages of [3x3 modulated deformable conv
(mmcv ``DCNv2``, our op) + BN + ReLU, 4x4 stride-2 transposed conv + BN + ReLU] with 256, 128, 64
filters (stride 32 -> 4); the head has three branches of 3x3 conv (bias) + ReLU + 1x1 conv (bias):
``heatmap_head`` (80 classes, sigmoid), ``wh_head`` (2) and ``offset_head`` (2). Input: RGB normalised
with ImageNet mean/std (:mod:`bevdeploy.data.det2d`).

:class:`CenterNetDecoder` is ``CenterNetHead.get_bboxes`` without NMS (the config's default): 3x3
local maxima of the heatmap, top 100 over all classes and positions, boxes from the size and
offset maps, in network-input pixels.

Initialisation (what training from scratch starts from; a checkpoint overwrites it): the neck's as
mmdet's (:meth:`CTResNetNeck.init_weights`: the transposed convs Kaiming-normal with the
bilinear-upsampling kernel into output channel 0 only), the heatmap's bias -log 9. Not official (named,
:meth:`CenterNetHead.init_weights`): the ``wh`` / ``offset`` branches keep PyTorch's default init instead
of mmdet's normal(std 0.001), which slows a short from-scratch training's size regression.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BasicBlock", "ResNet18", "CTResNetNeck", "CenterNetHead", "CenterNet", "CenterNetConfig",
           "CenterNetDecoder", "CENTERNET_OUTPUTS", "centernet_r18_dcn"]

#: The engine's outputs, in order.
CENTERNET_OUTPUTS = ("heatmap", "wh", "offset")


class BasicBlock(nn.Module):
    """3x3 -> 3x3 residual block (mmdet ``BasicBlock``, expansion 1; stride on ``conv1``)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    """mmdet ``ResNet(depth=18)``: stem ``conv1``/``bn1``/maxpool, ``layer1..4`` of two BasicBlocks.

    ``forward`` returns C5 only (Tensor[N, 512, H/32, W/32]): CenterNet's neck reads the last stage.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        for i in range(4):
            planes, stride = 64 * 2**i, 1 if i == 0 else 2
            downsample = None
            if stride != 1 or inplanes != planes:
                downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                                           nn.BatchNorm2d(planes))
            self.add_module(f"layer{i + 1}", nn.Sequential(BasicBlock(inplanes, planes, stride, downsample),
                                                           BasicBlock(planes, planes)))
            inplanes = planes

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _conv_module(conv: nn.Module, channels: int) -> nn.Sequential:
    """mmcv ConvModule (conv, BN, ReLU) as a Sequential with its key names."""
    return nn.Sequential(OrderedDict(conv=conv, bn=nn.BatchNorm2d(channels), activate=nn.ReLU(inplace=True)))


class CTResNetNeck(nn.Module):
    """``deconv_layers``: per stage a DCNv2 3x3 ConvModule and a 4x4 stride-2 transposed-conv ConvModule."""

    def __init__(self, *, in_channel: int = 512, num_deconv_filters: tuple[int, ...] = (256, 128, 64),
                 num_deconv_kernels: tuple[int, ...] = (4, 4, 4), use_dcn: bool = True) -> None:
        super().__init__()
        if len(num_deconv_filters) != len(num_deconv_kernels):
            raise ValueError(f"num_deconv_filters and num_deconv_kernels must have the same length, got "
                             f"{num_deconv_filters} and {num_deconv_kernels}")
        from bevdeploy.ops.modulated_deform_conv2d import ModulatedDeformConv2dPack

        layers: list[nn.Module] = []
        cin = in_channel
        for filters, kernel in zip(num_deconv_filters, num_deconv_kernels):
            if use_dcn:
                conv = ModulatedDeformConv2dPack(cin, filters, 3, padding=1, bias=False)
            else:
                conv = nn.Conv2d(cin, filters, 3, padding=1, bias=False)
            layers.append(_conv_module(conv, filters))
            layers.append(_conv_module(nn.ConvTranspose2d(filters, filters, kernel, stride=2, padding=1, bias=False),
                                       filters))
            cin = filters
        self.deconv_layers = nn.Sequential(*layers)
        self.init_weights()

    def init_weights(self) -> None:
        """mmdet's initialisation of the neck (mmcv ``ConvModule`` then ``CTResNetNeck.init_weights``).

        Each transposed conv (weight ``[in, out, k, k]``) is first Kaiming-normal (fan_out, ReLU: what
        ``ConvModule`` gives a conv without its own ``init_weights``), then, for every input channel,
        only its kernel into output channel 0 is set to the bilinear-upsampling kernel (CenterNet's
        ``fill_up_weights``: ``w[c, 0] = bilinear`` for all ``c``). The other output channels stay
        random. Writing the bilinear kernel into *every* ``[in, out]`` pair (an earlier version did)
        makes all output channels identical sums of the input: each deconv stage then passes one
        channel's worth of information, the net cannot localise and its loss stalls (CenterNet trained
        from scratch scored mAP 0.0001 that way). The DCNv2 convs keep their own init (mmcv's uniform,
        zero offsets) and the BNs weight 1, bias 0.
        """
        import math

        for m in self.modules():
            if isinstance(m, nn.ConvTranspose2d):
                k = m.weight.shape[2]
                f = math.ceil(k / 2)
                c = (2 * f - 1 - f % 2) / (2.0 * f)
                r = 1 - (torch.arange(k, dtype=torch.float32) / f - c).abs()
                with torch.no_grad():
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    m.weight[:, 0] = r[:, None] * r[None, :]
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.deconv_layers(x)


def _branch(in_channel: int, feat_channel: int, out_channel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channel, feat_channel, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(feat_channel, out_channel, 1))


class CenterNetHead(nn.Module):
    """Three branches: ``heatmap_head`` (sigmoid in forward, as mmdet), ``wh_head``, ``offset_head``."""

    def __init__(self, *, num_classes: int, in_channel: int = 64, feat_channel: int = 64) -> None:
        super().__init__()
        self.heatmap_head = _branch(in_channel, feat_channel, num_classes)
        self.wh_head = _branch(in_channel, feat_channel, 2)
        self.offset_head = _branch(in_channel, feat_channel, 2)
        self.init_weights()

    def init_weights(self) -> None:
        """The heatmap's last bias is mmdet's ``bias_init_with_prob(0.1)`` (-log 9 = -2.197: every class
        starts at probability 0.1); every other weight keeps PyTorch's default.

        Not official (named): mmdet's ``CenterNetHead.init_weights`` also sets the ``wh`` and ``offset``
        branches' convs to normal(std 0.001), bias 0. Both convs of a branch then start near zero and
        its gradients are products of near-zero weights: trained from scratch for a few hundred steps
        (a reduced CenterNet overfitting 8 synthetic views on the CPU, 150 steps) ``loss_wh`` stayed ~30x
        higher and the mAP on those views was 0.58-0.61 against 0.92-1.0 with the default init. An
        official checkpoint overwrites all of these, so only training from scratch sees the difference.
        """
        import math

        with torch.no_grad():
            self.heatmap_head[-1].bias.fill_(-math.log((1 - 0.1) / 0.1))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out = self.forward_logits(x)
        return {"heatmap": out.pop("heatmap_logits").sigmoid(), **out}

    def forward_logits(self, x: Tensor) -> dict[str, Tensor]:
        """The branches before the heatmap's sigmoid: training takes that sigmoid in fp32 (a bf16 one
        saturates at 1.0 with zero gradient, see :mod:`bevdeploy.train.centernet`)."""
        return {"heatmap_logits": self.heatmap_head(x), "wh": self.wh_head(x), "offset": self.offset_head(x)}


class FusedCenterNetHead(nn.Module):
    """A :class:`CenterNetHead` whose three branches run as ONE conv pair (the engine's fused deploy form,
    ``build --fused-epilogues``): ``convs = Sequential(conv 3x3 in -> 3 x feat, ReLU, conv 1x1 3 x feat ->
    num_classes + 4 padded to 8, block-diagonal)``; the forward returns the three maps as channel views of
    the one output, the heatmap through its sigmoid.

    Why: the unfused head is three 3x3 convs with 64 output channels reading one 128x128 map each, and
    three 1x1 convs of 80, 2 and 2 channels; at 64 output channels the int8 conv reaches 39% of its
    roofline on an H100 and the 2-channel ones 52% at 5 TOPS (``convs-tma.md``). One 192-channel conv
    reads the map once for all three. ``gains`` (see :func:`bevdeploy.models.bevdet.stack_branch_convs`)
    equalise the branches' hidden ranges, so the int8 1x1 reads every branch at the resolution its own
    scale had. Build with :func:`bevdeploy.engine.deploy.fuse_centernet_head`.
    """

    BRANCHES = ("heatmap", "wh", "offset")

    def __init__(self, head: CenterNetHead, *, gains: Sequence[float] | None = None, pad_to: int = 8) -> None:
        super().__init__()
        from bevdeploy.models.bevdet import stack_branch_convs

        branches = [head.heatmap_head, head.wh_head, head.offset_head]
        for name, b in zip(self.BRANCHES, branches):
            if not (isinstance(b, nn.Sequential) and len(b) == 3 and type(b[0]) is nn.Conv2d
                    and isinstance(b[1], nn.ReLU) and type(b[2]) is nn.Conv2d):
                raise ValueError(f"{name}_head must be Sequential(Conv2d, ReLU, Conv2d) of plain convs, got {b}")
        first, last = stack_branch_convs([[b[0], b[2]] for b in branches], pad_to=pad_to, names=self.BRANCHES,
                                         gains=gains)
        self.convs = nn.Sequential(first, nn.ReLU(inplace=True), last)
        self.channels = tuple(b[2].out_channels for b in branches)
        #: the layers each fused conv replaces (relative to the head), for the engine's layer-precision report
        self.fused_layers = {"convs.0": tuple(f"{n}_head.0" for n in self.BRANCHES),
                             "convs.2": tuple(f"{n}_head.2" for n in self.BRANCHES)}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        y = self.convs(x)
        c_hm, c_wh, c_off = self.channels
        return {"heatmap": y[:, :c_hm].sigmoid(), "wh": y[:, c_hm:c_hm + c_wh],
                "offset": y[:, c_hm + c_wh:c_hm + c_wh + c_off]}

    def extra_repr(self) -> str:
        return f"heads={dict(zip(self.BRANCHES, self.channels))}"


@dataclass(frozen=True)
class CenterNetConfig:
    """CenterNet-R18-DCN as ``centernet_resnet18_dcnv2_140e_coco`` (defaults).

    Attributes:
        num_classes: Classes (COCO: 80).
        image_size: (H, W) of the engine's static input, multiples of 32. The official test pipeline
            pads each image to its own size rounded up to a multiple of 32 (640x480 COCO images: 672x512);
            a static engine takes one canvas, the image centred in it. 512x512 is the engine size the
            benchmarks use; ``(672, 672)`` holds every COCO image (longest side 640) unscaled, which
            reproduces the official test pipeline up to the extent of the padding.
        use_dcn: DCNv2 in the neck (the config: True).
        topk: Decoder: boxes per image (top-k over the local-maximum heatmap).
        local_maximum_kernel: Decoder: max-pool window of the local-maximum test.
    """

    num_classes: int = 80
    image_size: tuple[int, int] = (512, 512)
    use_dcn: bool = True
    topk: int = 100
    local_maximum_kernel: int = 3

    def __post_init__(self) -> None:
        h, w = self.image_size
        if h % 32 or w % 32 or h <= 0 or w <= 0:
            raise ValueError(f"image_size must be positive multiples of 32 (H, W), got {self.image_size}")
        if self.num_classes < 1 or self.topk < 1:
            raise ValueError(f"num_classes and topk must be >= 1, got {self.num_classes}, {self.topk}")


class CenterNet(nn.Module):
    """CenterNet: ``backbone`` (ResNet-18), ``neck`` (CTResNetNeck), ``bbox_head`` (CenterNetHead).

    ``forward(image (Tensor[B, 3, H, W]), normalised RGB)`` returns ``heatmap`` [B, C, H/4, W/4]
    (sigmoid), ``wh`` and ``offset`` [B, 2, H/4, W/4] (output-map pixels). :meth:`decode` gives boxes.
    """

    def __init__(self, *, config: CenterNetConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = ResNet18()
        self.neck = CTResNetNeck(use_dcn=config.use_dcn)
        self.bbox_head = CenterNetHead(num_classes=config.num_classes)

    @classmethod
    def from_config(cls, config: CenterNetConfig) -> CenterNet:
        return cls(config=config)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.config.image_size

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        return self.bbox_head(self.neck(self.backbone(image)))

    def forward_logits(self, image: Tensor) -> dict[str, Tensor]:
        """:meth:`forward` with ``heatmap_logits`` before the sigmoid (training: see
        :meth:`CenterNetHead.forward_logits`)."""
        return self.bbox_head.forward_logits(self.neck(self.backbone(image)))

    def decode(self, outputs: dict[str, Tensor]) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Boxes per image (xyxy in input pixels, score, label); see :class:`CenterNetDecoder`."""
        return CenterNetDecoder(self.config)(outputs)


class CenterNetDecoder:
    """``CenterNetHead.get_bboxes`` (``with_nms=False``): local maxima (max-pool ``kernel``), top-k over
    classes x positions, centre = position + offset, box = centre -+ wh / 2, scaled to input pixels.

    Returns per image ``(boxes [k, 4] xyxy in network-input pixels, scores [k], labels [k])``.
    """

    def __init__(self, config: CenterNetConfig) -> None:
        self.config = config

    def __call__(self, outputs: dict[str, Tensor]) -> list[tuple[Tensor, Tensor, Tensor]]:
        cfg = self.config
        heat = outputs["heatmap"].float()
        wh, offset = outputs["wh"].float(), outputs["offset"].float()
        b, c, h, w = heat.shape
        pad = (cfg.local_maximum_kernel - 1) // 2
        hmax = F.max_pool2d(heat, cfg.local_maximum_kernel, stride=1, padding=pad)
        heat = heat * (hmax == heat)
        k = min(cfg.topk, c * h * w)
        scores, inds = heat.reshape(b, -1).topk(k)
        labels = inds // (h * w)
        pos = inds % (h * w)
        ys, xs = (pos // w).float(), (pos % w).float()
        wh_k = wh.flatten(2).gather(2, pos[:, None].expand(b, 2, k))  # [B, 2, k]
        off_k = offset.flatten(2).gather(2, pos[:, None].expand(b, 2, k))
        cx, cy = xs + off_k[:, 0], ys + off_k[:, 1]
        sx, sy = cfg.image_size[1] / w, cfg.image_size[0] / h
        boxes = torch.stack([(cx - wh_k[:, 0] / 2) * sx, (cy - wh_k[:, 1] / 2) * sy,
                             (cx + wh_k[:, 0] / 2) * sx, (cy + wh_k[:, 1] / 2) * sy], -1)
        return [(boxes[i], scores[i], labels[i]) for i in range(b)]


def centernet_r18_dcn(**overrides) -> CenterNet:
    """CenterNet-R18-DCNv2 (``centernet_resnet18_dcnv2_140e_coco``); overrides of :class:`CenterNetConfig`."""
    return CenterNet(config=dataclasses.replace(CenterNetConfig(), **overrides))

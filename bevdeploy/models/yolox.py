"""YOLOX-x with mmdetection 2.x's module names, so the official ``yolox_x_8x8_300e_coco`` checkpoint loads.

Origin: mmdetection 2.x ``CSPDarknet`` (``backbones/csp_darknet.py``, with ``Focus`` and
``SPPBottleneck``), ``CSPLayer`` / ``DarknetBottleneck`` (``utils/csp_layer.py``), ``YOLOXPAFPN``
(``necks/yolox_pafpn.py``) and ``YOLOXHead`` (``dense_heads/yolox_head.py``), configured as
``configs/yolox/yolox_x_8x8_300e_coco.py``: deepen 1.33, widen 1.25, neck ``[320, 640, 1280] -> 320``
with 4 CSP blocks, head 320 channels, 80 classes. Every conv of a ConvModule is bias-free and followed
by BatchNorm (eps 1e-3, momentum 0.03) and SiLU (mmcv's ``Swish``). Input: BGR pixels 0..255, not
normalised, resized keep-ratio into 640x640 and padded with 114 (:mod:`bevdeploy.data.det2d`).

The forward returns the head's raw maps flattened over the three levels (strides 8, 16, 32, row-major
per level): class logits, box deltas, objectness logits. :class:`YOLOXDecoder` turns them into boxes
as ``YOLOXHead.get_bboxes`` does (score = sigmoid(cls) * sigmoid(obj) of the best class >= 0.01,
class-aware NMS at IoU 0.65; the official test config sets no per-image cap).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["ConvModule", "CSPDarknet", "YOLOXPAFPN", "YOLOXHead", "YOLOX", "YOLOXConfig", "YOLOXDecoder",
           "YOLOX_OUTPUTS", "yolox_x", "batched_nms"]

#: The engine's outputs, in order.
YOLOX_OUTPUTS = ("cls_scores", "bbox_preds", "objectness")


class ConvModule(nn.Sequential):
    """mmcv ``ConvModule``: conv (no bias) -> BatchNorm -> activation; keys ``conv.*``, ``bn.*``.

    A Sequential so the deploy form folds ``bn`` into ``conv`` and fuses the activation into an int8
    conv's epilogue.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 *, act: type[nn.Module] = nn.SiLU, bn_eps: float = 1e-3, bn_momentum: float = 0.03) -> None:
        super().__init__(OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False),
            bn=nn.BatchNorm2d(out_channels, eps=bn_eps, momentum=bn_momentum),
            activate=act(),
        ))


class Focus(nn.Module):
    """Space-to-depth (2x2 pixels -> 4x channels, order TL, BL, TR, BR) then a 3x3 ConvModule."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = ConvModule(in_channels * 4, out_channels, kernel_size, 1, (kernel_size - 1) // 2)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat((x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]), dim=1)
        return self.conv(x)


class SPPBottleneck(nn.Module):
    """1x1 halving conv, max pools 5/9/13 (stride 1) concatenated with their input, 1x1 conv."""

    def __init__(self, in_channels: int, out_channels: int, kernel_sizes: tuple[int, ...] = (5, 9, 13)) -> None:
        super().__init__()
        mid = in_channels // 2
        self.conv1 = ConvModule(in_channels, mid, 1)
        self.poolings = nn.ModuleList(nn.MaxPool2d(k, stride=1, padding=k // 2) for k in kernel_sizes)
        self.conv2 = ConvModule(mid * (len(kernel_sizes) + 1), out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        return self.conv2(torch.cat([x] + [pool(x) for pool in self.poolings], dim=1))


class DarknetBottleneck(nn.Module):
    """1x1 then 3x3 ConvModule, plus the input when ``add_identity`` and the channels agree."""

    def __init__(self, in_channels: int, out_channels: int, expansion: float = 0.5, add_identity: bool = True) -> None:
        super().__init__()
        hidden = int(out_channels * expansion)
        self.conv1 = ConvModule(in_channels, hidden, 1)
        self.conv2 = ConvModule(hidden, out_channels, 3, 1, 1)
        self.add_identity = add_identity and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(self.conv1(x))
        return out + x if self.add_identity else out


class CSPLayer(nn.Module):
    """Cross-stage partial layer: ``final_conv(cat(blocks(main_conv(x)), short_conv(x)))``."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, add_identity: bool = True,
                 expand_ratio: float = 0.5) -> None:
        super().__init__()
        mid = int(out_channels * expand_ratio)
        self.main_conv = ConvModule(in_channels, mid, 1)
        self.short_conv = ConvModule(in_channels, mid, 1)
        self.final_conv = ConvModule(2 * mid, out_channels, 1)
        self.blocks = nn.Sequential(*[DarknetBottleneck(mid, mid, 1.0, add_identity) for _ in range(num_blocks)])

    def forward(self, x: Tensor) -> Tensor:
        return self.final_conv(torch.cat((self.blocks(self.main_conv(x)), self.short_conv(x)), dim=1))


#: CSPDarknet P5 stages: (in channels, out channels, blocks, shortcut in blocks, SPP), before scaling.
P5_STAGES = ((64, 128, 3, True, False), (128, 256, 9, True, False), (256, 512, 9, True, False),
             (512, 1024, 3, False, True))


def _scaled_blocks(n: int, deepen_factor: float) -> int:
    return max(round(n * deepen_factor), 1)


class CSPDarknet(nn.Module):
    """The YOLOX backbone: ``stem`` (Focus) and ``stage1..4`` (stride-2 conv, [SPP], CSPLayer).

    Returns the outputs of stages 2, 3, 4 (strides 8, 16, 32), mmdet's ``out_indices=(2, 3, 4)``.
    """

    def __init__(self, *, deepen_factor: float, widen_factor: float) -> None:
        super().__init__()
        self.stem = Focus(3, int(P5_STAGES[0][0] * widen_factor), 3)
        for i, (cin, cout, blocks, shortcut, spp) in enumerate(P5_STAGES):
            cin, cout = int(cin * widen_factor), int(cout * widen_factor)
            stage: list[nn.Module] = [ConvModule(cin, cout, 3, 2, 1)]
            if spp:
                stage.append(SPPBottleneck(cout, cout))
            stage.append(CSPLayer(cout, cout, _scaled_blocks(blocks, deepen_factor), add_identity=shortcut))
            self.add_module(f"stage{i + 1}", nn.Sequential(*stage))

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stage1(self.stem(x))
        c3 = self.stage2(x)
        c4 = self.stage3(c3)
        return [c3, c4, self.stage4(c4)]


class YOLOXPAFPN(nn.Module):
    """Top-down (1x1 reduce, 2x nearest upsample, CSP) then bottom-up (3x3 stride-2, CSP) path
    aggregation, then a 1x1 ``out_convs`` ConvModule per level to ``out_channels``."""

    def __init__(self, *, in_channels: tuple[int, ...], out_channels: int, num_csp_blocks: int) -> None:
        super().__init__()
        self.in_channels = tuple(in_channels)
        n = len(in_channels)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.reduce_layers = nn.ModuleList()
        self.top_down_blocks = nn.ModuleList()
        for idx in range(n - 1, 0, -1):
            self.reduce_layers.append(ConvModule(in_channels[idx], in_channels[idx - 1], 1))
            self.top_down_blocks.append(
                CSPLayer(in_channels[idx - 1] * 2, in_channels[idx - 1], num_csp_blocks, add_identity=False))
        self.downsamples = nn.ModuleList()
        self.bottom_up_blocks = nn.ModuleList()
        for idx in range(n - 1):
            self.downsamples.append(ConvModule(in_channels[idx], in_channels[idx], 3, 2, 1))
            self.bottom_up_blocks.append(
                CSPLayer(in_channels[idx] * 2, in_channels[idx + 1], num_csp_blocks, add_identity=False))
        self.out_convs = nn.ModuleList(ConvModule(c, out_channels, 1) for c in in_channels)

    def _up(self, x: Tensor) -> Tensor:
        """The top-down 2x upsampling (the int8 chain's subclass gathers int8 codes instead)."""
        return self.upsample(x)

    def forward(self, inputs: list[Tensor]) -> list[Tensor]:
        n = len(self.in_channels)
        inner = [inputs[-1]]
        for idx in range(n - 1, 0, -1):
            high = self.reduce_layers[n - 1 - idx](inner[0])
            inner[0] = high
            inner.insert(0, self.top_down_blocks[n - 1 - idx](torch.cat([self._up(high), inputs[idx - 1]], 1)))
        outs = [inner[0]]
        for idx in range(n - 1):
            down = self.downsamples[idx](outs[-1])
            outs.append(self.bottom_up_blocks[idx](torch.cat([down, inner[idx + 1]], 1)))
        return [conv(o) for conv, o in zip(self.out_convs, outs)]


class YOLOXHead(nn.Module):
    """Decoupled head per level: two 3x3 ConvModules for classes, two for boxes; 1x1 predictors
    ``conv_cls`` (classes), ``conv_reg`` (4 deltas) and ``conv_obj`` (1) on them (the last two on the
    box branch)."""

    def __init__(self, *, num_classes: int, in_channels: int, feat_channels: int, stacked_convs: int = 2,
                 strides: tuple[int, ...] = (8, 16, 32)) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.strides = tuple(strides)

        def tower() -> nn.Sequential:
            return nn.Sequential(*[ConvModule(in_channels if i == 0 else feat_channels, feat_channels, 3, 1, 1)
                                   for i in range(stacked_convs)])

        self.multi_level_cls_convs = nn.ModuleList(tower() for _ in strides)
        self.multi_level_reg_convs = nn.ModuleList(tower() for _ in strides)
        self.multi_level_conv_cls = nn.ModuleList(nn.Conv2d(feat_channels, num_classes, 1) for _ in strides)
        self.multi_level_conv_reg = nn.ModuleList(nn.Conv2d(feat_channels, 4, 1) for _ in strides)
        self.multi_level_conv_obj = nn.ModuleList(nn.Conv2d(feat_channels, 1, 1) for _ in strides)
        prior = -4.59511985013459  # log(0.01 / 0.99): mmdet's bias_init_with_prob(0.01)
        with torch.no_grad():
            for conv in (*self.multi_level_conv_cls, *self.multi_level_conv_obj):
                conv.bias.fill_(prior)

    def forward(self, feats: list[Tensor]) -> dict[str, Tensor]:
        cls, reg, obj = [], [], []
        for i, x in enumerate(feats):
            cls_feat = self.multi_level_cls_convs[i](x)
            reg_feat = self.multi_level_reg_convs[i](x)
            cls.append(self.multi_level_conv_cls[i](cls_feat).flatten(2))  # [B, C, H*W]
            reg.append(self.multi_level_conv_reg[i](reg_feat).flatten(2))
            obj.append(self.multi_level_conv_obj[i](reg_feat).flatten(2))
        return {
            "cls_scores": torch.cat(cls, 2).transpose(1, 2),  # [B, A, num_classes] logits
            "bbox_preds": torch.cat(reg, 2).transpose(1, 2),  # [B, A, 4]: dx, dy (strides), log w, log h
            "objectness": torch.cat(obj, 2)[:, 0],  # [B, A] logits
        }


@dataclass(frozen=True)
class YOLOXConfig:
    """YOLOX-x as ``yolox_x_8x8_300e_coco`` (the defaults); smaller factors give a fast test model.

    Attributes:
        deepen_factor: Scales the CSP block counts (``max(round(n * f), 1)``).
        widen_factor: Scales every channel count (``int(c * f)``).
        num_classes: Classes (COCO: 80).
        image_size: (H, W) of the network input (the engine's static size), multiples of 32.
        score_thr: Decoder: minimum sigmoid(cls) * sigmoid(obj).
        nms_iou: Decoder: class-aware NMS IoU threshold.
        max_per_img: Decoder: keep at most this many boxes per image (None: all, as the official config).
    """

    deepen_factor: float = 1.33
    widen_factor: float = 1.25
    num_classes: int = 80
    image_size: tuple[int, int] = (640, 640)
    score_thr: float = 0.01
    nms_iou: float = 0.65
    max_per_img: int | None = None

    def __post_init__(self) -> None:
        h, w = self.image_size
        if h % 32 or w % 32 or h <= 0 or w <= 0:
            raise ValueError(f"image_size must be positive multiples of 32 (H, W), got {self.image_size}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")


class YOLOX(nn.Module):
    """YOLOX: ``backbone`` (CSPDarknet), ``neck`` (YOLOXPAFPN), ``bbox_head`` (YOLOXHead).

    ``forward(image (Tensor[B, 3, H, W]), BGR 0..255 padded with 114)`` returns the raw maps
    ``cls_scores [B, A, C]``, ``bbox_preds [B, A, 4]``, ``objectness [B, A]``, A = sum over strides
    8/16/32 of (H/s)*(W/s). :meth:`decode` gives boxes.
    """

    def __init__(self, *, config: YOLOXConfig) -> None:
        super().__init__()
        self.config = config
        w = config.widen_factor
        self.backbone = CSPDarknet(deepen_factor=config.deepen_factor, widen_factor=w)
        channels = (int(256 * w), int(512 * w), int(1024 * w))
        self.neck = YOLOXPAFPN(in_channels=channels, out_channels=channels[0],
                               num_csp_blocks=_scaled_blocks(3, config.deepen_factor))
        self.bbox_head = YOLOXHead(num_classes=config.num_classes, in_channels=channels[0],
                                   feat_channels=channels[0])

    @classmethod
    def from_config(cls, config: YOLOXConfig) -> YOLOX:
        return cls(config=config)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.config.image_size

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        return self.bbox_head(self.neck(self.backbone(image)))

    def decode(self, outputs: dict[str, Tensor]) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Boxes per image (xyxy in input pixels, score, label); see :class:`YOLOXDecoder`."""
        return YOLOXDecoder(self.config)(outputs)


def yolox_priors(image_size: tuple[int, int], strides: tuple[int, ...] = (8, 16, 32),
                 device: torch.device | str = "cpu") -> Tensor:
    """[A, 3] point priors (x, y, stride), x = column * stride (mmdet's ``MlvlPointGenerator``, offset 0)."""
    out = []
    for s in strides:
        h, w = image_size[0] // s, image_size[1] // s
        ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        out.append(torch.stack([xs.reshape(-1) * s, ys.reshape(-1) * s, torch.full((h * w,), s, device=device)], 1))
    return torch.cat(out).float()


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """[N, M] IoU of xyxy boxes (areas without the +1 of old detectors, as mmcv's nms)."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return inter / (area_a[:, None] + area_b[None] - inter).clamp(min=1e-12)


def batched_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float) -> Tensor:
    """Indices kept by greedy NMS within each label, by decreasing score (mmcv's ``batched_nms``).

    Boxes of different labels never suppress each other (each label's boxes are shifted apart).
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    shifted = boxes.float() + (labels.float() * (boxes.float().max() + 1))[:, None]
    order = scores.argsort(descending=True, stable=True)
    iou = box_iou(shifted[order], shifted[order]).cpu()
    suppress = (iou > iou_threshold).triu(1).numpy()
    keep = []
    removed = torch.zeros(len(order), dtype=torch.bool).numpy()
    for i in range(len(order)):
        if removed[i]:
            continue
        keep.append(i)
        removed |= suppress[i]
    return order[torch.tensor(keep, dtype=torch.long, device=order.device)]


class YOLOXDecoder:
    """``YOLOXHead.get_bboxes`` on the raw maps: decode against the point priors, keep the best class
    with sigmoid(cls) * sigmoid(obj) >= ``score_thr``, class-aware NMS.

    Returns per image ``(boxes [n, 4] xyxy in network-input pixels, scores [n], labels [n])``,
    sorted by decreasing score.
    """

    def __init__(self, config: YOLOXConfig) -> None:
        self.config = config

    def __call__(self, outputs: dict[str, Tensor]) -> list[tuple[Tensor, Tensor, Tensor]]:
        cfg = self.config
        cls = outputs["cls_scores"].float().sigmoid()
        obj = outputs["objectness"].float().sigmoid()
        deltas = outputs["bbox_preds"].float()
        priors = yolox_priors(cfg.image_size, device=deltas.device)
        if priors.shape[0] != deltas.shape[1]:
            raise ValueError(f"bbox_preds has {deltas.shape[1]} points but image_size {cfg.image_size} gives "
                             f"{priors.shape[0]}")
        xy = deltas[..., :2] * priors[:, 2:] + priors[:, :2]
        wh = deltas[..., 2:].exp() * priors[:, 2:]
        boxes = torch.cat([xy - wh / 2, xy + wh / 2], -1)
        results = []
        for b in range(cls.shape[0]):
            best, labels = cls[b].max(1)
            score = best * obj[b]
            valid = score >= cfg.score_thr
            bx, sc, lb = boxes[b][valid], score[valid], labels[valid]
            keep = batched_nms(bx, sc, lb, cfg.nms_iou)
            if cfg.max_per_img is not None:
                keep = keep[: cfg.max_per_img]
            results.append((bx[keep], sc[keep], lb[keep]))
        return results


def yolox_x(**overrides) -> YOLOX:
    """YOLOX-x (mmdetection 2.x ``yolox_x_8x8_300e_coco``); keyword overrides of :class:`YOLOXConfig`."""
    return YOLOX(config=dataclasses.replace(YOLOXConfig(), **overrides))

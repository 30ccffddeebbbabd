"""CenterNet training: mmdetection 2.x ``CenterNetHead`` targets and losses, and batches of a COCO-format set.

Official (``centernet_resnet18_dcnv2_140e_coco``, ``CenterNetHead.get_targets`` / ``loss``):

- targets on the output map (stride 4): per box a gaussian on its class's heatmap at the integer
  centre, radius ``max(0, int(gaussian_radius((h, w), min_overlap=0.3)))`` (CornerNet's radius),
  sigma = diameter / 6, overlapping gaussians combined by maximum; at the centre cell the size target
  ``(w, h)`` and the sub-cell offset ``centre - int(centre)`` in map pixels;
- loss: gaussian focal loss (alpha 2, gamma 4, weight 1) on the sigmoid heatmap averaged over the
  number of peaks; L1 on ``wh`` (weight 0.1) and ``offset`` (weight 1) at the centre cells, averaged
  over the target cells of both channels.

Not official (named): no augmentation (the official random centre crop, flip and photometric
distortion are omitted: every image uses the test-time canvas, preprocessed once and kept on the
device in fp16). Without augmentation the targets never change, so they are built once too (the
per-box loop would otherwise cost more host time per step than the GPU's forward and backward).
The ``wh`` / ``offset`` branches start from PyTorch's default init, not mmdet's normal(std 0.001)
(named in :meth:`bevdeploy.models.centernet.CenterNetHead.init_weights`: it slows the size regression
of a short from-scratch training).

Loss precision: the heatmap's sigmoid runs in fp32 on the bf16 logits, and the focal loss and the L1
terms in fp32 (as mmdet's ``force_fp32`` loss). A bf16 sigmoid rounds every logit above ~6.5 to exactly
1.0, where its gradient ``y * (1 - y)`` is exactly 0: a background cell that overshot there would keep
its loss (-log(1e-12) x its weight) and never move again; an fp32 sigmoid saturates only above ~17.
This guards a hazard; it is not the measured cause of the run-to-run drift of the H100 trainings (same
seed and budget: final loss 1.80 and mAP 0.030 once, 0.23-0.37 twice). A reduced CenterNet trained in
bf16 on the CPU (96x160, 8 views, AdamW 2e-3 without decay) had no saturated cell in either form, and
its runs still parted late (heatmap loss 0.08 with the bf16 sigmoid, 1.31 with the fp32 one, 0.42 in
fp32 throughout): the recipe itself is sensitive at that rate. At 1e-3 both forms converged alike
(0.034 / 0.022, mAP 0.69 / 0.73 on the views).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["Det2DBatch", "CenterNetTraining", "centernet_targets", "gaussian_focal_loss", "gaussian_radius"]


class Det2DBatch(NamedTuple):
    """Images [B, 3, H, W] on the device and per image ground truth (xyxy input pixels, labels);
    ``targets``: the family's prebuilt training targets of these images, if it keeps them."""

    images: Tensor
    boxes: list[Tensor]
    labels: list[Tensor]
    targets: dict[str, Tensor] | None = None


def gaussian_radius(height: float, width: float, min_overlap: float) -> float:
    """CornerNet's radius: the smallest of three cases that keeps IoU >= ``min_overlap`` with the box."""
    a1, b1 = 1.0, height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 - math.sqrt(b1**2 - 4 * a1 * c1)) / 2
    a2, b2 = 4.0, 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 - math.sqrt(b2**2 - 4 * a2 * c2)) / 2
    a3, b3 = 4 * min_overlap, -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + math.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def _draw_gaussian(heat: Tensor, cx: int, cy: int, radius: int) -> None:
    d = 2 * radius + 1
    sigma = d / 6
    r = torch.arange(-radius, radius + 1, dtype=heat.dtype, device=heat.device)
    g = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma * sigma))
    h, w = heat.shape
    left, right = min(cx, radius), min(w - cx, radius + 1)
    top, bottom = min(cy, radius), min(h - cy, radius + 1)
    patch = heat[cy - top:cy + bottom, cx - left:cx + right]
    torch.maximum(patch, g[radius - top:radius + bottom, radius - left:radius + right], out=patch)


def centernet_targets(boxes: list[Tensor], labels: list[Tensor], num_classes: int, feat_hw: tuple[int, int],
                      image_hw: tuple[int, int]) -> dict[str, Tensor]:
    """Heatmap [B, C, h, w], wh and offset targets [B, 2, h, w] and their weight [B, 2, h, w]."""
    h, w = feat_hw
    b = len(boxes)
    device = boxes[0].device if b else torch.device("cpu")
    heat = torch.zeros(b, num_classes, h, w, device=device)
    wh = torch.zeros(b, 2, h, w, device=device)
    offset = torch.zeros(b, 2, h, w, device=device)
    weight = torch.zeros(b, 2, h, w, device=device)
    sx, sy = w / image_hw[1], h / image_hw[0]
    for i, (bx, lb) in enumerate(zip(boxes, labels)):
        for (x0, y0, x1, y1), c in zip(bx.tolist(), lb.tolist()):
            cx, cy = (x0 + x1) / 2 * sx, (y0 + y1) / 2 * sy
            ix, iy = int(cx), int(cy)
            if not (0 <= ix < w and 0 <= iy < h):
                continue
            bw, bh = (x1 - x0) * sx, (y1 - y0) * sy
            radius = max(0, int(gaussian_radius(bh, bw, 0.3)))
            _draw_gaussian(heat[i, c], ix, iy, radius)
            wh[i, :, iy, ix] = torch.tensor([bw, bh])
            offset[i, :, iy, ix] = torch.tensor([cx - ix, cy - iy])
            weight[i, :, iy, ix] = 1.0
    return {"heatmap": heat, "wh": wh, "offset": offset, "weight": weight}


def gaussian_focal_loss(pred: Tensor, target: Tensor, alpha: float = 2.0, gamma: float = 4.0,
                        eps: float = 1e-12) -> Tensor:
    """Sum over all cells of CornerNet's focal loss on a probability map against a gaussian target."""
    pos = target.eq(1).float()
    pos_loss = -(pred + eps).log() * (1 - pred).pow(alpha) * pos
    neg_loss = -(1 - pred + eps).log() * pred.pow(alpha) * (1 - target).pow(gamma) * (1 - pos)
    return (pos_loss + neg_loss).sum()


class CenterNetTraining:
    """:class:`bevdeploy.train.FamilyTraining` of CenterNet on a COCO-format set (``CocoSet``)."""

    def __init__(self, model: nn.Module, data, device) -> None:
        from bevdeploy.data.det2d import load_training_set

        self.device = torch.device(device)
        self.num_classes = model.config.num_classes
        self.image_size = tuple(model.config.image_size)
        images, boxes, labels = load_training_set(data, "centernet", self.image_size)
        self.images = images.to(self.device)
        self.boxes = [b.to(self.device) for b in boxes]
        self.labels = [lb.to(self.device) for lb in labels]
        # the head's map is the input at stride 4 (CTResNetNeck: stride 32, three 2x deconvs)
        feat_hw = (self.image_size[0] // 4, self.image_size[1] // 4)
        chunks = [centernet_targets(boxes[i:i + 64], labels[i:i + 64], self.num_classes, feat_hw, self.image_size)
                  for i in range(0, len(boxes), 64)]  # on the CPU: a loop over boxes
        self.targets = {k: torch.cat([c[k] for c in chunks]).to(self.device, torch.float16 if k == "heatmap" else None)
                        for k in chunks[0]}  # gaussian peaks are exactly 1.0 in fp16

    def batches(self, batch_size: int, seed: int) -> Iterator[Det2DBatch]:
        """Endless, shuffled (by ``seed``) batches, already on the device."""
        g = torch.Generator().manual_seed(seed)
        n = self.images.shape[0]
        while True:
            order = torch.randperm(n, generator=g).tolist()
            for start in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
                idx = order[start:start + batch_size]
                t = {k: v[idx].float() for k, v in self.targets.items()}
                yield Det2DBatch(self.images[idx].float(), [self.boxes[i] for i in idx], [self.labels[i] for i in idx], t)

    def loss(self, model: nn.Module, batch: Det2DBatch) -> dict[str, Tensor]:
        """``loss_center_heatmap``, ``loss_wh`` and ``loss_offset`` of ``model`` on ``batch``."""
        out = model.forward_logits(batch.images)  # the heatmap's sigmoid in fp32 (see the module docstring)
        heat = out["heatmap_logits"].float().sigmoid()
        t = batch.targets
        if t is None:
            t = centernet_targets(batch.boxes, batch.labels, self.num_classes, tuple(heat.shape[-2:]), self.image_size)
        peaks = t["heatmap"].eq(1).sum().clamp(min=1)
        cells = t["weight"].sum().clamp(min=1)
        return {
            "loss_center_heatmap": gaussian_focal_loss(heat, t["heatmap"]) / peaks,
            "loss_wh": 0.1 * ((out["wh"].float() - t["wh"]).abs() * t["weight"]).sum() / cells,
            "loss_offset": ((out["offset"].float() - t["offset"]).abs() * t["weight"]).sum() / cells,
        }

"""YOLOX training: mmdetection 2.x ``YOLOXHead.loss`` with the SimOTA assigner, and batches of a COCO-format set.

Official (``yolox_s_8x8_300e_coco`` train_cfg ``SimOTAAssigner(center_radius=2.5)``, ``YOLOXHead``):

- assignment per image (SimOTA): candidate points are those whose centre (point + stride / 2) lies
  in a GT box or within 2.5 strides of its centre; cost = 3 * BCE(sqrt(sigmoid(cls) * sigmoid(obj)),
  one-hot class) + 3 * (-log IoU) + 1e5 unless the point is in both the box and its centre region;
  each GT takes its ``k`` cheapest points, ``k`` = max(1, int(sum of its 10 best IoUs)); a point
  claimed by several GTs keeps the cheapest;
- losses: objectness BCE (logits) on every point against the foreground mask, class BCE on the
  positives against one-hot * IoU(prediction, its GT), IoU loss ``1 - IoU^2`` (weight 5) on the
  positives' boxes; each summed and divided by the number of positives (at least 1).

Not official (named): the extra L1 loss of the last 15 epochs is left out, and there is no
augmentation (no Mosaic / MixUp / random affine / HSV / flip): every image uses the test-time
canvas, preprocessed once and kept on the device in fp16.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bevdeploy.models.yolox import box_iou, yolox_priors
from bevdeploy.train.centernet import Det2DBatch

__all__ = ["YOLOXTraining", "simota_assign", "decode_boxes"]


def decode_boxes(priors: Tensor, deltas: Tensor) -> Tensor:
    """[..., A, 4] xyxy boxes from YOLOX deltas and [A, 3] priors (x, y, stride) (the head's decoder)."""
    xy = deltas[..., :2] * priors[:, 2:] + priors[:, :2]
    wh = deltas[..., 2:].exp() * priors[:, 2:]
    return torch.cat([xy - wh / 2, xy + wh / 2], -1)


def simota_assign(scores: Tensor, boxes: Tensor, priors: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
                  center_radius: float = 2.5, candidate_topk: int = 10) -> tuple[Tensor, Tensor, Tensor]:
    """SimOTA for one image.

    Args:
        scores: [A, C] sigmoid(cls) * sigmoid(obj), detached.
        boxes: [A, 4] decoded boxes, detached.
        priors: [A, 3] (x, y, stride).
        gt_boxes: [G, 4] xyxy; gt_labels: [G].

    Returns:
        ``(fg [A] bool, gt_index [A] long (valid where fg), iou [A] (IoU with the assigned GT))``.
    """
    a = priors.shape[0]
    fg = torch.zeros(a, dtype=torch.bool, device=priors.device)
    gt_index = torch.zeros(a, dtype=torch.long, device=priors.device)
    ious_out = torch.zeros(a, device=priors.device)
    if gt_boxes.numel() == 0:
        return fg, gt_index, ious_out
    centre = priors[:, :2] + priors[:, 2:] * 0.5  # [A, 2]
    in_box = ((centre[:, None] > gt_boxes[None, :, :2]) & (centre[:, None] < gt_boxes[None, :, 2:])).all(-1)
    gt_c = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    r = priors[:, None, 2:] * center_radius
    in_ctr = ((centre[:, None] > gt_c[None] - r) & (centre[:, None] < gt_c[None] + r)).all(-1)  # [A, G]
    valid = (in_box | in_ctr).any(1)
    if not valid.any():
        return fg, gt_index, ious_out
    vidx = valid.nonzero()[:, 0]
    iou = box_iou(boxes[vidx], gt_boxes)  # [V, G]
    onehot = F.one_hot(gt_labels, scores.shape[1]).float()  # [G, C]
    p = scores[vidx].float().sqrt()[:, None, :].expand(-1, gt_boxes.shape[0], -1).clamp(1e-12, 1 - 1e-7)
    with torch.autocast(p.device.type, enabled=False):  # CUDA autocast refuses binary_cross_entropy
        cls_cost = F.binary_cross_entropy(p, onehot[None].expand_as(p), reduction="none").sum(-1)
    both = (in_box & in_ctr)[vidx]
    cost = 3.0 * cls_cost + 3.0 * -torch.log(iou + 1e-7) + (~both).float() * 1e5
    # dynamic k per GT
    k = min(candidate_topk, vidx.numel())
    dyn = iou.topk(k, dim=0).values.sum(0).int().clamp(min=1, max=k)  # [G] (sum of k IoUs <= k)
    # each GT's dyn[g] cheapest points, for all GTs at once (no host sync per GT)
    cheapest = cost.topk(k, dim=0, largest=False).indices  # [k, G], cheapest first
    take = torch.arange(k, device=cost.device)[:, None] < dyn[None, :]  # [k, G]
    match = torch.zeros_like(cost, dtype=torch.bool)
    match.scatter_(0, cheapest, take)
    multi = match.sum(1) > 1
    if multi.any():
        best = cost[multi].argmin(1)
        match[multi] = False
        match[multi.nonzero()[:, 0], best] = True
    pos = match.any(1)
    assigned = match.float().argmax(1)
    fg[vidx[pos]] = True
    gt_index[vidx[pos]] = assigned[pos]
    ious_out[vidx[pos]] = iou[pos, assigned[pos]]
    return fg, gt_index, ious_out


class YOLOXTraining:
    """:class:`bevdeploy.train.FamilyTraining` of YOLOX on a COCO-format set (``CocoSet``)."""

    def __init__(self, model: nn.Module, data, device) -> None:
        from bevdeploy.data.det2d import load_training_set

        self.device = torch.device(device)
        self.num_classes = model.config.num_classes
        self.image_size = tuple(model.config.image_size)
        images, boxes, labels = load_training_set(data, "yolox", self.image_size)
        self.images = images.to(self.device)
        self.boxes = [b.to(self.device) for b in boxes]
        self.labels = [lb.to(self.device) for lb in labels]
        self.priors = yolox_priors(self.image_size, device=self.device)

    def batches(self, batch_size: int, seed: int) -> Iterator[Det2DBatch]:
        """Endless, shuffled (by ``seed``) batches, already on the device."""
        g = torch.Generator().manual_seed(seed)
        n = self.images.shape[0]
        while True:
            order = torch.randperm(n, generator=g).tolist()
            for start in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
                idx = order[start:start + batch_size]
                yield Det2DBatch(self.images[idx].float(), [self.boxes[i] for i in idx], [self.labels[i] for i in idx])

    def loss(self, model: nn.Module, batch: Det2DBatch) -> dict[str, Tensor]:
        """``loss_cls``, ``loss_bbox`` and ``loss_obj`` of ``model`` on ``batch``."""
        out = model(batch.images)
        cls, obj, deltas = out["cls_scores"].float(), out["objectness"].float(), out["bbox_preds"].float()
        boxes = decode_boxes(self.priors, deltas)
        scores = (cls.sigmoid() * obj.sigmoid()[..., None]).detach()
        obj_target = torch.zeros_like(obj)
        cls_preds, cls_targets, box_preds, box_targets = [], [], [], []
        for i in range(cls.shape[0]):
            fg, gi, iou = simota_assign(scores[i], boxes[i].detach(), self.priors, batch.boxes[i], batch.labels[i])
            obj_target[i] = fg.float()
            if fg.any():
                cls_preds.append(cls[i][fg])
                cls_targets.append(F.one_hot(batch.labels[i][gi[fg]], self.num_classes).float() * iou[fg, None])
                box_preds.append(boxes[i][fg])
                box_targets.append(batch.boxes[i][gi[fg]])
        num_pos = max(float(sum(len(p) for p in box_preds)), 1.0)
        loss_obj = F.binary_cross_entropy_with_logits(obj, obj_target, reduction="sum") / num_pos
        if box_preds:
            pb, tb = torch.cat(box_preds), torch.cat(box_targets)
            iou = _paired_iou(pb, tb)
            loss_bbox = 5.0 * (1 - iou.pow(2)).sum() / num_pos
            loss_cls = F.binary_cross_entropy_with_logits(torch.cat(cls_preds), torch.cat(cls_targets),
                                                          reduction="sum") / num_pos
        else:
            loss_bbox = loss_cls = cls.sum() * 0.0
        return {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "loss_obj": loss_obj}


def _paired_iou(a: Tensor, b: Tensor) -> Tensor:
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda x: (x[:, 2] - x[:, 0]).clamp(min=0) * (x[:, 3] - x[:, 1]).clamp(min=0)  # noqa: E731
    return inter / (area(a) + area(b) - inter).clamp(min=1e-12)

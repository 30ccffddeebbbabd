"""BEVFormer training: Hungarian-matched focal + L1 losses on every decoder layer, with the temporal queue.

The family part of the generic training loop (``batches`` and ``loss``); the loop (optimiser,
schedule, autocast, clipping) is not here. Every number follows the official BEVFormer-tiny
training config and code (fundamentalvision/BEVFormer ``projects/configs/bevformer/
bevformer_tiny.py``, ``dense_heads/bevformer_head.py``, ``core/bbox/match_costs/match_cost.py``,
``core/bbox/util.py``, ``datasets/nuscenes_dataset.py``; mmdet 2.x ``FocalLossCost``, ``FocalLoss``,
``L1Loss``, ``DETRHead``):

- **Targets**: boxes in the LiDAR frame the head predicts in, ``(x, y, z, w, l, h, yaw, vx, vy)`` with
  z the gravity centre (the head's ``cz``) and the info converter's yaw, i.e. the inverse of the
  evaluation's model-box -> global conversion (:func:`bevdeploy.eval.nuscenes.boxes_from_info` with
  z moved back up by h / 2). Kept as the official train pipeline keeps them: ``valid_flag``
  (``use_valid_flag=True``), the 10 detection classes, centre inside ``pc_range`` in BEV
  (``ObjectRangeFilter``); a NaN velocity becomes 0.
- **Box code** (:func:`normalize_bbox`): ``(cx, cy, log w, log l, cz, log h, sin yaw, cos yaw, vx,
  vy)``, the layout of the head's ``all_bbox_preds``.
- **Assignment** per decoder layer and sample (:func:`hungarian_assign`): cost =
  2.0 * focal cost (alpha 0.25, gamma 2) + 0.25 * L1 over the first 8 code entries (+ IoU cost of
  weight 0, omitted), solved by ``scipy.optimize.linear_sum_assignment``; NaN/inf costs are clamped
  to +-100 first.
- **Loss** per decoder layer (:func:`bevformer_loss`): sigmoid focal loss (alpha 0.25, gamma 2,
  weight 2.0) over all queries x 10 classes, unmatched queries all-negative; L1 (weight 0.25) on
  matched queries with ``code_weights`` [1]*8 + [0.2, 0.2]; both divided by the batch's number of
  matched GT boxes (at least 1; all GT boxes when there are at least as many queries). Terms are
  named as the official head names them (``loss_cls``, ``loss_bbox`` for the last layer,
  ``d0.loss_cls`` ... for the others).
- **Temporal queue** (``queue_length`` 3): for each sample, 2 of the 3 frames before it (random,
  in time order) run first with the model in eval mode and without grad, each feeding its
  ``bev_embed`` to the next; then the sample itself runs with grad. The per-frame CAN-bus deltas and
  the ``use_prev_bev`` gate are :func:`bevdeploy.data.preprocess.frame_inputs` along the queue, so a
  frame of another scene (or the queue's first frame) resets the chain, exactly as the official
  ``union2one`` and ``obtain_history_bev``.
- **Images** are decoded, resized and padded once by :func:`bevdeploy.data.preprocess.preprocess_images`
  (with the identity normalisation) and kept as uint8 (on the GPU when training there); each batch
  is normalised with the model's mean/std on the device.

Not reproduced (augmentations of the official pipeline): ``PhotoMetricDistortionMultiViewImage`` and
``GridMask``.

Optional, for a short budget (off by default):

- ``group_queries=G`` > 1: Group DETR (one-to-many assignment through G independent query groups,
  each matched one-to-one, losses averaged over groups; groups do not attend to each other because
  each runs the decoder on its own). The official repository has it (``BEVFormerHead_GroupDETR``,
  its BEVFormer v2 configs); the official BEVFormer-tiny config does not. The extra G - 1 query
  embeddings are training-only parameters (:meth:`BEVFormerTraining.extra_parameters`, to add to
  the optimiser); the checkpoint keeps the official layout and inference uses group 0.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from bevdeploy.data.nuscenes import CLASS_NAMES, lidar2img, load_images
from bevdeploy.data.preprocess import PREPROCESS, ImagePreprocess, frame_inputs, preprocess_images
from bevdeploy.eval.nuscenes import boxes_from_info

__all__ = [
    "BEVFormerTraining",
    "normalize_bbox",
    "focal_cost",
    "l1_cost",
    "hungarian_assign",
    "sigmoid_focal_loss",
    "bevformer_loss",
]

#: Official BEVFormer-tiny training numbers (config ``loss_cls``, ``loss_bbox``, ``train_cfg.assigner``).
FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0
CLS_COST_WEIGHT = 2.0
REG_COST_WEIGHT = 0.25
CLS_LOSS_WEIGHT = 2.0
BBOX_LOSS_WEIGHT = 0.25
QUEUE_LENGTH = 3


# --------------------------------------------------------------------------------------------------
# Box code, match costs, assignment.
# --------------------------------------------------------------------------------------------------


def normalize_bbox(boxes: Tensor) -> Tensor:
    """Boxes -> BEVFormer's regression code (the head's ``all_bbox_preds`` layout).

    Args:
        boxes (Tensor[..., 9]): (x, y, z gravity centre, w, l, h, yaw, vx, vy) in the LiDAR frame.

    Returns:
        Tensor[..., 10]: (cx, cy, log w, log l, cz, log h, sin yaw, cos yaw, vx, vy).
    """
    if boxes.shape[-1] != 9:
        raise ValueError(f"boxes must have 9 values per box (x, y, z, w, l, h, yaw, vx, vy), got {boxes.shape[-1]}")
    x, y, z = boxes[..., 0:1], boxes[..., 1:2], boxes[..., 2:3]
    w, l, h = boxes[..., 3:4].log(), boxes[..., 4:5].log(), boxes[..., 5:6].log()
    yaw = boxes[..., 6:7]
    return torch.cat([x, y, w, l, z, h, yaw.sin(), yaw.cos(), boxes[..., 7:9]], -1)


def focal_cost(
    cls_logits: Tensor, gt_labels: Tensor, alpha: float = FOCAL_ALPHA, gamma: float = FOCAL_GAMMA, eps: float = 1e-12
) -> Tensor:
    """Classification match cost: the focal loss of calling each query positive for each GT's class,
    minus that of calling it negative (mmdet ``FocalLossCost``, unweighted).

    Args:
        cls_logits (Tensor[Q, num_classes]): logits.
        gt_labels (Tensor[M]): class indices.

    Returns:
        Tensor[Q, M].
    """
    p = cls_logits.sigmoid()
    neg = -(1 - p + eps).log() * (1 - alpha) * p.pow(gamma)
    pos = -(p + eps).log() * alpha * (1 - p).pow(gamma)
    return pos[:, gt_labels] - neg[:, gt_labels]


def l1_cost(pred_code: Tensor, gt_code: Tensor) -> Tensor:
    """Box match cost: L1 distance between codes (``BBox3DL1Cost``, unweighted; BEVFormer passes the
    first 8 entries, no velocity). ``[Q, K]`` x ``[M, K]`` -> ``[Q, M]``."""
    return torch.cdist(pred_code, gt_code, p=1)


def match_cost(cls_logits: Tensor, bbox_pred: Tensor, gt_labels: Tensor, gt_code: Tensor) -> Tensor:
    """The assigner's weighted cost ``[Q, M]`` of one decoder layer and sample (float32, NaN/inf clamped)."""
    cost = CLS_COST_WEIGHT * focal_cost(cls_logits.float(), gt_labels) + REG_COST_WEIGHT * l1_cost(
        bbox_pred[:, :8].float(), gt_code[:, :8].float()
    )
    return torch.nan_to_num(cost, nan=100.0, posinf=100.0, neginf=-100.0)


def hungarian_assign(cost: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost one-to-one matching of queries (rows) to GT boxes (columns).

    Args:
        cost (Tensor[Q, M] or ndarray): Q >= M for every GT box to be matched.

    Returns:
        (query indices, gt indices), int64 arrays of length min(Q, M), sorted by query.
    """
    c = cost.detach().float().cpu().numpy() if isinstance(cost, Tensor) else np.asarray(cost, dtype=np.float64)
    if c.ndim != 2:
        raise ValueError(f"cost must be a [num_query, num_gt] matrix, got shape {list(c.shape)}")
    if not np.isfinite(c).all():
        raise ValueError("cost must be finite (clamp NaN/inf first, as match_cost does)")
    if c.shape[1] == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    rows, cols = linear_sum_assignment(c)
    return rows.astype(np.int64), cols.astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Losses.
# --------------------------------------------------------------------------------------------------


def sigmoid_focal_loss(
    logits: Tensor, targets: Tensor, alpha: float = FOCAL_ALPHA, gamma: float = FOCAL_GAMMA
) -> Tensor:
    """Elementwise sigmoid focal loss (Lin et al. 2017), as mmdet's ``FocalLoss(use_sigmoid=True)``.

    Args:
        logits (Tensor[N, C]), targets (Tensor[N, C]) 0/1.

    Returns:
        Tensor[N, C], unreduced.
    """
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return ce * (1 - p_t).pow(gamma) * alpha_t


def bevformer_loss(
    all_cls_scores: Tensor,
    all_bbox_preds: Tensor,
    gt_boxes: Sequence[Tensor],
    gt_labels: Sequence[Tensor],
    code_weights: Tensor,
) -> dict[str, Tensor]:
    """Hungarian-matched focal + L1 losses of every decoder layer (the official head's ``loss``).

    Args:
        all_cls_scores (Tensor[L, B, Q, num_classes]): logits.
        all_bbox_preds (Tensor[L, B, Q, 10]): box codes (centres in metres).
        gt_boxes: per sample, Tensor[M_b, 9] (x, y, z gravity centre, w, l, h, yaw, vx, vy).
        gt_labels: per sample, Tensor[M_b] int64 class indices.
        code_weights (Tensor[10]): per-entry L1 weights.

    Returns:
        ``loss_cls``/``loss_bbox`` (last layer) and ``d{i}.loss_cls``/``d{i}.loss_bbox`` (the others),
        float32 scalars.
    """
    if all_cls_scores.dim() != 4 or all_bbox_preds.shape[:3] != all_cls_scores.shape[:3]:
        raise ValueError(
            f"all_cls_scores [L, B, Q, C] and all_bbox_preds [L, B, Q, 10] must agree, got "
            f"{list(all_cls_scores.shape)} and {list(all_bbox_preds.shape)}"
        )
    L, B, Q, C = all_cls_scores.shape
    if len(gt_boxes) != B or len(gt_labels) != B:
        raise ValueError(
            f"gt_boxes and gt_labels need one entry per sample ({B}), got {len(gt_boxes)} and {len(gt_labels)}"
        )
    cls_all, box_all = all_cls_scores.float(), all_bbox_preds.float()
    codes = [normalize_bbox(b.float()) for b in gt_boxes]
    # All costs of all layers and samples go to the host in one transfer (one sync per step).
    with torch.no_grad():
        costs = [
            torch.stack([match_cost(cls_all[l, b], box_all[l, b], gt_labels[b], codes[b]) for l in range(L)])
            for b in range(B)
        ]  # each [L, Q, M_b]
        flat = torch.cat([c.flatten() for c in costs]).cpu().numpy() if costs else np.zeros(0)
    sizes = np.cumsum([0] + [c.numel() for c in costs])
    # the number of matched queries (= GT boxes when Q >= M), as the official num_total_pos
    num_pos = max(sum(min(Q, int(lab.numel())) for lab in gt_labels), 1)
    weights = code_weights.to(box_all)
    losses: dict[str, Tensor] = {}
    for l in range(L):
        targets = torch.zeros(B, Q, C, device=cls_all.device)
        pred_rows, target_rows = [], []
        for b in range(B):
            M = int(gt_labels[b].numel())
            cost = flat[sizes[b] : sizes[b + 1]].reshape(L, Q, M)[l]
            q_idx, g_idx = hungarian_assign(cost)
            q = torch.as_tensor(q_idx, device=cls_all.device)
            g = torch.as_tensor(g_idx, device=cls_all.device)
            targets[b, q, gt_labels[b][g]] = 1.0
            pred_rows.append(box_all[l, b, q])
            target_rows.append(codes[b][g])
        loss_cls = sigmoid_focal_loss(cls_all[l], targets).sum() / num_pos * CLS_LOSS_WEIGHT
        pred, target = torch.cat(pred_rows), torch.cat(target_rows)
        finite = torch.isfinite(target).all(-1)
        loss_bbox = ((pred[finite] - target[finite]).abs() * weights).sum() / num_pos * BBOX_LOSS_WEIGHT
        prefix = "" if l == L - 1 else f"d{l}."
        losses[f"{prefix}loss_cls"] = torch.nan_to_num(loss_cls)
        losses[f"{prefix}loss_bbox"] = torch.nan_to_num(loss_bbox)
    return losses


# --------------------------------------------------------------------------------------------------
# Data: targets, images, the temporal queue.
# --------------------------------------------------------------------------------------------------


def gt_targets(info: dict, pc_range: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Training targets of one info record: (boxes [M, 9] float32 with the gravity-centre z, labels [M]).

    The evaluation's GT boxes (bottom centre) moved back to the gravity centre, then filtered as
    the official train pipeline filters: ``valid_flag``, class, BEV centre strictly inside pc_range.
    """
    boxes, labels = boxes_from_info(info)
    boxes = boxes.copy()
    boxes[:, 2] += boxes[:, 5] / 2
    names = np.asarray(info["gt_names"]).reshape(-1).astype(str)
    in_classes = np.isin(names, np.asarray(CLASS_NAMES))
    valid = np.asarray(info.get("valid_flag", np.ones(len(names), dtype=bool)), dtype=bool).reshape(-1)[in_classes]
    x0, y0, _, x1, y1, _ = (float(v) for v in pc_range)
    in_range = (boxes[:, 0] > x0) & (boxes[:, 1] > y0) & (boxes[:, 0] < x1) & (boxes[:, 1] < y1)
    keep = valid & in_range
    return boxes[keep].astype(np.float32), labels[keep]


def _load_sample(info: dict, resize: ImagePreprocess) -> tuple[Tensor, Tensor]:
    """uint8 [6, 3, H, W] resized and padded RGB images and the matching float32 lidar2img [6, 4, 4]."""
    image, l2i = preprocess_images(load_images(info), lidar2img(info), resize)
    return image.round().clamp(0, 255).to(torch.uint8), l2i


@dataclass
class _Frames:
    """The frames of one batch at one queue step (all on the device)."""

    image: Tensor  # [B, 6, 3, H, W] normalised
    lidar2img: Tensor  # [B, 6, 4, 4]
    can_bus: Tensor  # [B, 18]
    use_prev_bev: Tensor  # [B]


class BEVFormerTraining:
    """BEVFormer's part of the training loop: endless temporal batches and the official loss.

    Args:
        model: A :class:`bevdeploy.models.BEVFormer` (its ``config.name`` picks the image pipeline).
        infos: Info records in temporal order (:func:`bevdeploy.data.nuscenes.load_infos`), with GT.
        device: Where batches live and the model runs.
        queue_length: Frames per sample including itself (official 3); 1 trains without history.
        group_queries: Group DETR query groups (1 = off; see the module docstring).
        workers: Threads decoding images at construction (default: up to 16).
        progress: Show a progress bar while loading images.
    """

    def __init__(
        self,
        model: nn.Module,
        infos: Sequence[dict],
        device: torch.device | str,
        *,
        queue_length: int = QUEUE_LENGTH,
        group_queries: int = 1,
        workers: int | None = None,
        progress: bool = True,
    ) -> None:
        cfg = getattr(model, "config", None)
        if cfg is None or cfg.name not in PREPROCESS:
            raise ValueError(f"model must be a BEVFormer built from a config named one of {sorted(PREPROCESS)}")
        if not infos:
            raise ValueError("infos must hold at least one info record")
        missing = [i for i, info in enumerate(infos) if "gt_boxes" not in info or "scene_token" not in info]
        if missing:
            raise ValueError(
                f"info records need 'gt_boxes' and 'scene_token' (with GT); record {missing[0]} lacks them"
            )
        if not (isinstance(queue_length, int) and queue_length >= 1):
            raise ValueError(f"queue_length must be an int >= 1, got {queue_length!r}")
        if not (isinstance(group_queries, int) and group_queries >= 1):
            raise ValueError(f"group_queries must be an int >= 1, got {group_queries!r}")
        self.infos = list(infos)
        self.device = torch.device(device)
        self.queue_length = queue_length
        self.group_queries = group_queries
        self.preprocess = PREPROCESS[cfg.name]
        self.pc_range = tuple(cfg.pc_range)

        # Decode, resize and pad once (identity normalisation: pixels stay 0..255, the padding 0).
        resize = ImagePreprocess(
            scale=self.preprocess.scale, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), to_rgb=True,
            size_divisor=self.preprocess.size_divisor,
        )
        workers = workers or min(16, os.cpu_count() or 1)
        from tqdm import tqdm

        with ThreadPoolExecutor(max_workers=workers) as pool:
            loaded = list(
                tqdm(pool.map(lambda info: _load_sample(info, resize), self.infos), total=len(self.infos),
                     desc="images", unit="sample", disable=not progress)
            )
        size = tuple(loaded[0][0].shape[-2:])
        if size != tuple(model.image_size):
            src = load_images(self.infos[0])[0].shape[:2]
            need = tuple(round(v / self.preprocess.scale) for v in model.image_size)
            raise ValueError(
                f"camera images of {src[0]}x{src[1]} preprocess to {size} (scale {self.preprocess.scale}, padded) but "
                f"{cfg.name} takes {tuple(model.image_size)}: render the world at about {need[0]}x{need[1]} "
                f"(the evaluation uses the same pipeline)"
            )
        first = load_images(self.infos[0])[0].shape
        self._valid_hw = (int(first[0] * self.preprocess.scale), int(first[1] * self.preprocess.scale))
        self.images = torch.stack([im for im, _ in loaded]).to(self.device)  # [N, 6, 3, H, W] uint8
        self.lidar2img = torch.stack([l2i for _, l2i in loaded]).to(self.device)  # [N, 6, 4, 4]
        targets = [gt_targets(info, self.pc_range) for info in self.infos]
        self.gt_boxes = [torch.from_numpy(b).to(self.device) for b, _ in targets]
        self.gt_labels = [torch.from_numpy(lab).to(self.device) for _, lab in targets]
        self._mean = torch.tensor(self.preprocess.mean, device=self.device).view(1, 1, 3, 1, 1)
        self._std = torch.tensor(self.preprocess.std, device=self.device).view(1, 1, 3, 1, 1)

        self.group_query_embedding: nn.Parameter | None = None
        if group_queries > 1:
            base = model.pts_bbox_head.query_embedding.weight
            extra = torch.empty(group_queries - 1, *base.shape, device=self.device)
            nn.init.normal_(extra)  # nn.Embedding's own init
            self.group_query_embedding = nn.Parameter(extra)

    # ----------------------------------------------------------------------------------------------

    def extra_parameters(self) -> list[nn.Parameter]:
        """Training-only parameters the optimiser must also update (Group DETR's extra queries)."""
        return [] if self.group_query_embedding is None else [self.group_query_embedding]

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 ``[B, 6, 3, H, W]`` RGB -> the model's normalised float input (padding stays 0)."""
        x = images.float()
        if not self.preprocess.to_rgb:
            x = x.flip(2)
        x = (x - self._mean) / self._std
        h, w = self._valid_hw
        x[..., h:, :] = 0.0
        x[..., :, w:] = 0.0
        return x

    def queue(self, index: int, rng: np.random.Generator) -> list[int | None]:
        """Sample indices of one training queue, oldest first, ending with ``index``.

        As the official dataset: ``queue_length - 1`` of the ``queue_length`` samples before it,
        chosen at random, in time order. Slots before the start of ``infos`` are None (a reset).
        """
        q = self.queue_length
        earlier = list(range(max(0, index - q), index))
        chosen = sorted(rng.permutation(earlier)[: q - 1].tolist()) if earlier else []
        return [None] * (q - 1 - len(chosen)) + chosen + [index]

    def make_batch(self, indices: Sequence[int], rng: np.random.Generator | None = None) -> dict:
        """One batch for the given sample indices (history frames chosen with ``rng``)."""
        rng = rng if rng is not None else np.random.default_rng(0)
        queues = [self.queue(int(i), rng) for i in indices]
        steps: list[_Frames] = []
        prev: list[dict | None] = [None] * len(queues)
        for t in range(self.queue_length):
            idx, can_bus, use = [], [], []
            for b, qu in enumerate(queues):
                j = qu[t]
                if j is None:  # before the data: a dummy frame whose BEV the next frame drops
                    j = qu[-1]
                    inputs, prev[b] = frame_inputs(self.infos[j], None), None
                else:
                    inputs = frame_inputs(self.infos[j], prev[b])
                    prev[b] = self.infos[j]
                idx.append(j)
                can_bus.append(inputs["can_bus"])
                use.append(inputs["use_prev_bev"])
            sel = torch.as_tensor(idx, device=self.device)
            steps.append(
                _Frames(
                    image=self.normalize(self.images[sel]),
                    lidar2img=self.lidar2img[sel],
                    can_bus=torch.as_tensor(np.stack(can_bus), dtype=torch.float32, device=self.device),
                    use_prev_bev=torch.as_tensor(use, dtype=torch.float32, device=self.device),
                )
            )
        return {
            "frames": steps,
            "gt_boxes": [self.gt_boxes[int(i)] for i in indices],
            "gt_labels": [self.gt_labels[int(i)] for i in indices],
            "index": [int(i) for i in indices],
        }

    def batches(self, batch_size: int, seed: int) -> Iterator[dict]:
        """Endless batches: each epoch a fresh permutation of the samples (last partial batch dropped
        unless it is the only one), history frames drawn at random, everything on the device."""
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        rng = np.random.default_rng(seed)
        n = len(self.infos)
        while True:
            order = rng.permutation(n)
            stop = max(n - n % batch_size, 1) if n >= batch_size else n
            for start in range(0, stop, batch_size):
                yield self.make_batch(order[start : start + batch_size].tolist(), rng)

    # ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def history_bev(self, model: nn.Module, batch: dict) -> Tensor:
        """The previous BEV of each sample's last frame: the queue's earlier frames run in eval mode
        without grad (official ``obtain_history_bev``). Zero where the gate drops it."""
        frames: list[_Frames] = batch["frames"]
        B = frames[0].image.shape[0]
        prev_bev = torch.zeros(B, *model.bev_shape, device=self.device)
        was_training = model.training
        model.eval()
        try:
            for f in frames[:-1]:
                prev_bev = prev_bev * f.use_prev_bev[:, None, None]
                feats = model.extract_img_feat(f.image)
                prev_bev = model.forward_bev(feats, f.lidar2img, f.can_bus, prev_bev, f.use_prev_bev).float()
        finally:
            model.train(was_training)
        return prev_bev * frames[-1].use_prev_bev[:, None, None]

    def forward(self, model: nn.Module, batch: dict) -> dict[str, Tensor]:
        """The current frame with grad: ``bev_embed``, ``all_cls_scores``, ``all_bbox_preds`` (group 0)
        plus, with Group DETR, ``group_outputs`` (a list of (cls, box) of the extra groups)."""
        prev_bev = self.history_bev(model, batch)
        f: _Frames = batch["frames"][-1]
        feats = model.extract_img_feat(f.image)
        bev = model.forward_bev(feats, f.lidar2img, f.can_bus, prev_bev, f.use_prev_bev)
        cls, box = model.forward_head(bev)
        out = {"bev_embed": bev, "all_cls_scores": cls, "all_bbox_preds": box, "prev_bev": prev_bev}
        if self.group_query_embedding is not None:
            head = model.pts_bbox_head
            out["group_outputs"] = [
                head.transformer.decode(
                    bev, q.to(bev.dtype), (head.bev_h, head.bev_w), head.reg_branches, head.cls_branches, head.pc_range
                )
                for q in self.group_query_embedding
            ]
        return out

    def loss(self, model: nn.Module, batch: dict) -> dict[str, Tensor]:
        """Named loss terms of one batch (total = their sum); see the module docstring."""
        out = self.forward(model, batch)
        code_weights = model.pts_bbox_head.code_weights
        groups = [(out["all_cls_scores"], out["all_bbox_preds"])] + out.get("group_outputs", [])
        total: dict[str, Tensor] = {}
        for cls, box in groups:
            for k, v in bevformer_loss(cls, box, batch["gt_boxes"], batch["gt_labels"], code_weights).items():
                total[k] = total[k] + v / len(groups) if k in total else v / len(groups)
        return total

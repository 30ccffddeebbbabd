"""BEVDet training: CenterPoint targets and losses (BEVDet dev2.1 / mmdet3d ``CenterHead``), and batches.

Official (dev2.1 ``configs/bevdet/bevdet-r50-cbgs.py``, mmdet3d ``CenterHead.get_targets_single``
and ``loss``), reproduced here:

- targets on the head's BEV grid (cell = ``out_size_factor * voxel_size`` = the config's grid
  interval, origin = the grid's lower bound): per box a gaussian on its class's heatmap at the
  integer centre cell, radius ``max(min_radius=2, int(gaussian_radius((dx, dy) in cells,
  min_overlap=0.1)))`` (CornerNet's radius as mmdet3d computes it), sigma = diameter / 6; up to
  ``max_objs=500`` regression targets ``(centre - cell, z gravity centre, log(dx, dy, dz), sin yaw,
  cos yaw, vx, vy)`` at the centre cells;
- loss: gaussian focal loss (alpha 2, gamma 4) on the clamped sigmoid heatmap, averaged over the
  number of target peaks; L1 on the 10 box codes at the target cells with ``code_weights`` (1 x 8,
  0.2 for the velocities), averaged over the number of boxes, weight 0.25;
- GT boxes of the 10 classes with at least one LiDAR/radar point (``use_valid_flag=True``; the
  devkit's evaluation drops the others too); boxes off the grid get no target (``ObjectRangeFilter``).

Not official, named (they speed convergence on a short from-scratch budget):

- **depth supervision** (``depth_weight``, default 3.0; BEVDepth has it, BEVDet-R50 does not):
  binary cross-entropy of the depth net's softmax against the one-hot bin of the nearest LiDAR
  return in each feature cell (BEVDepth's ``get_downsampled_gt_depth``, with nearest-bin rounding).
  In the synthetic world the LiDAR files hold object returns only, so the ground's depth is added
  analytically (``ground_depth``: the ray of each feature cell meets the flat ground, z = 0 in the
  ego frame): exact there, and off by default for other data;
- no EMA of the weights (the official config has ``MEGVIIEMAHook``) and no CBGS class resampling;
- no image or BEV augmentation (the official random resize / crop / flip / rotate and BDA are
  omitted): every frame uses the test-time crop, so the images are resized once, kept on the
  device as uint8 and the BEVPool indices are shared by all frames of a camera rig;
- bf16 autocast around everything but the pooling, which takes float32 (the bev_pool_v2 op takes
  fp32/fp16; its backward is the reference's); warm-up + cosine decay (official: 200 warm-up
  steps then step decay).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bevdeploy.data.nuscenes import CLASS_NAMES
from bevdeploy.data.preprocess_bevdet import GEOMETRY_KEYS, BEVDetPreprocess, prepare_bevdet_inputs
from bevdeploy.models.bevdet import HEAD_OUTPUTS, BEVDetConfig
from bevdeploy.train.centernet import gaussian_focal_loss  # CenterNet's focal loss, on BEVDet's BEV heatmap

__all__ = [
    "BEVDetBatch",
    "BEVDetTraining",
    "CODE_WEIGHTS",
    "centerpoint_targets",
    "depth_targets",
    "draw_heatmap_gaussian",
    "gaussian_radius",
    "lidar_boxes_to_model_frame",
]

#: ``train_cfg.pts.code_weights`` of bevdet-r50-cbgs (reg 2, height 1, dim 3, rot 2, vel 2).
CODE_WEIGHTS: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.2, 0.2)
#: ``loss_bbox=dict(type='L1Loss', loss_weight=0.25)``.
BBOX_LOSS_WEIGHT = 0.25
MAX_OBJS = 500
MIN_RADIUS = 2
GAUSSIAN_OVERLAP = 0.1


# --------------------------------------------------------------------------------------------
# CenterPoint targets
# --------------------------------------------------------------------------------------------


def gaussian_radius(det_size: tuple[float, float], min_overlap: float = 0.5) -> float:
    """CornerNet's gaussian radius as mmdet3d computes it (each root halved, not divided by 2a).

    Args:
        det_size: (height, width) of the box in heatmap cells.
        min_overlap: Minimum IoU of a box whose corner is shifted within the radius.
    """
    height, width = det_size
    b1 = height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1**2 - 4 * c1)) / 2
    b2 = 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + math.sqrt(b2**2 - 16 * c2)) / 2
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + math.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def _gaussian_2d(radius: int) -> np.ndarray:
    diameter = 2 * radius + 1
    sigma = diameter / 6
    y, x = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    h = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    h[h < np.finfo(h.dtype).eps * h.max()] = 0
    return h


def draw_heatmap_gaussian(heatmap: np.ndarray, center: tuple[int, int], radius: int) -> np.ndarray:
    """Max a gaussian of ``radius`` (sigma = (2 radius + 1) / 6, peak 1) into ``heatmap [Y, X]`` at
    ``center = (x, y)`` (integer cell), clipped at the borders; in place, also returned."""
    radius = int(radius)
    g = _gaussian_2d(radius)
    x, y = int(center[0]), int(center[1])
    height, width = heatmap.shape
    left, right = min(x, radius), min(width - x, radius + 1)
    top, bottom = min(y, radius), min(height - y, radius + 1)
    if right <= -left or bottom <= -top:
        return heatmap
    window = heatmap[y - top : y + bottom, x - left : x + right]
    patch = g[radius - top : radius + bottom, radius - left : radius + right]
    np.maximum(window, patch, out=window)
    return heatmap


def lidar_boxes_to_model_frame(gt_boxes: np.ndarray, gt_velocity: np.ndarray, bev2lidar: np.ndarray) -> np.ndarray:
    """Info-record GT boxes (LiDAR frame) -> the frame and convention BEVDet's head predicts.

    Args:
        gt_boxes: [N, 7] x, y, z (gravity centre), w, l, h, yaw (mmdet3d 0.17: ``-yaw_nuscenes - pi/2``).
        gt_velocity: [N, 2] vx, vy in the LiDAR frame.
        bev2lidar: [4, 4] model frame -> LiDAR frame (:func:`bevdeploy.data.preprocess_bevdet.bev2lidar`).

    Returns:
        [N, 9] x, y, z (gravity centre), dx (length), dy (width), dz (height), yaw (nuScenes yaw:
        heading of dx), vx, vy, in the model frame (the inverse of
        :func:`bevdeploy.models.bevdet.bevdet_boxes_to_lidar`, before its bottom-centre shift).
    """
    b = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 7)
    v = np.asarray(gt_velocity, dtype=np.float64).reshape(-1, 2)
    T = np.linalg.inv(np.asarray(bev2lidar, dtype=np.float64))
    R, t = T[:3, :3], T[:3, 3]
    centre = b[:, :3] @ R.T + t
    yaw_nus = -b[:, 6] - np.pi / 2
    heading = np.stack([np.cos(yaw_nus), np.sin(yaw_nus), np.zeros_like(yaw_nus)], 1) @ R.T
    vel = np.concatenate([v, np.zeros((len(v), 1))], 1) @ R.T
    yaw = np.arctan2(heading[:, 1], heading[:, 0])
    return np.concatenate([centre, b[:, 4:5], b[:, 3:4], b[:, 5:6], yaw[:, None], vel[:, :2]], 1)


def centerpoint_targets(boxes: np.ndarray, labels: np.ndarray, cfg: BEVDetConfig, *, max_objs: int = MAX_OBJS,
                        min_radius: int = MIN_RADIUS, min_overlap: float = GAUSSIAN_OVERLAP
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CenterPoint's training targets of one sample (``CenterHead.get_targets_single``, one task).

    Args:
        boxes: [N, 9] in the model frame (:func:`lidar_boxes_to_model_frame`).
        labels: [N] class indices in ``CLASS_NAMES`` order.
        cfg: The model config (grid lower bound and cell; ``num_classes``).

    Returns:
        ``heatmap [C, Y, X]`` float32, ``anno_box [max_objs, 10]`` float32, ``ind [max_objs]`` int64
        (``y * X + x``), ``mask [max_objs]`` uint8. Boxes whose centre cell is off the grid are skipped.
    """
    X, Y, _ = cfg.grid_size
    (x0, cell_x), (y0, cell_y) = (cfg.grid_x[0], cfg.grid_x[2]), (cfg.grid_y[0], cfg.grid_y[2])
    heatmap = np.zeros((cfg.num_classes, Y, X), dtype=np.float32)
    anno_box = np.zeros((max_objs, 10), dtype=np.float32)
    ind = np.zeros(max_objs, dtype=np.int64)
    mask = np.zeros(max_objs, dtype=np.uint8)
    k = 0
    for box, label in zip(np.asarray(boxes, dtype=np.float64).reshape(-1, 9), np.asarray(labels).reshape(-1)):
        if k >= max_objs:
            break
        length, width = box[3] / cell_x, box[4] / cell_y
        if not (length > 0 and width > 0):
            continue
        radius = max(min_radius, int(gaussian_radius((width, length), min_overlap)))
        cx, cy = (box[0] - x0) / cell_x, (box[1] - y0) / cell_y
        ix, iy = int(cx), int(cy)  # truncation toward zero, as the official .to(torch.int32)
        if not (0 <= ix < X and 0 <= iy < Y):
            continue
        draw_heatmap_gaussian(heatmap[int(label)], (ix, iy), radius)
        ind[k] = iy * X + ix
        mask[k] = 1
        anno_box[k] = (cx - ix, cy - iy, box[2], math.log(box[3]), math.log(box[4]), math.log(box[5]),
                       math.sin(box[6]), math.cos(box[6]), box[7], box[8])
        k += 1
    return heatmap, anno_box, ind, mask


def depth_targets(info: dict, x: dict[str, Tensor], cfg: BEVDetConfig, preprocess: BEVDetPreprocess, *,
                  ground: bool) -> np.ndarray:
    """Per feature cell, the depth bin of the nearest LiDAR return (and of the flat ground if ``ground``).

    Args:
        info: The info record (``lidar_path``, per camera ``sensor2lidar_*``, ``lidar2ego_translation``).
        x: Its :func:`prepare_bevdet_inputs` output (``intrinsics``, ``post_rots``, ``post_trans``).
        ground: Add the ground plane z = 0 of the ego frame (exact in the synthetic world).

    Returns:
        int16 ``[N, fH, fW]``: bin index in ``arange(*depth_bins)`` (nearest), -1 where unknown.
    """
    H, W = cfg.image_size
    fH, fW = cfg.feature_size
    d0, d1, step = cfg.depth_bins
    D = cfg.num_depth_bins
    points = np.fromfile(info["lidar_path"], dtype=np.float32).reshape(-1, 5)[:, :3].astype(np.float64)
    # the ground z = 0 of the ego frame in LiDAR coordinates (the mount only yaws: z axes shared)
    ground_z = -float(np.asarray(info["lidar2ego_translation"])[2])
    out = np.full((len(preprocess.cameras), fH, fW), -1, dtype=np.int16)
    us = np.linspace(0, W - 1, fW)
    vs = np.linspace(0, H - 1, fH)
    for n, name in enumerate(preprocess.cameras):
        cam = info["cams"][name]
        R = np.asarray(cam["sensor2lidar_rotation"], dtype=np.float64)
        t = np.asarray(cam["sensor2lidar_translation"], dtype=np.float64)
        K = x["intrinsics"][n].double().numpy()
        prot, ptran = x["post_rots"][n].double().numpy(), x["post_trans"][n].double().numpy()
        best = np.full((fH, fW), np.inf)
        if len(points):
            pc = (points - t) @ R  # lidar -> camera
            pc = pc[pc[:, 2] > 0.1]
            uvw = pc @ K.T
            uv = uvw[:, :2] / uvw[:, 2:3]
            net = np.concatenate([uv, np.ones((len(uv), 1))], 1) @ prot.T + ptran
            col, row = np.floor(net[:, 0] / cfg.downsample).astype(int), np.floor(net[:, 1] / cfg.downsample).astype(int)
            ok = (col >= 0) & (col < fW) & (row >= 0) & (row < fH)
            np.minimum.at(best, (row[ok], col[ok]), pc[ok, 2])
        if ground:
            uu, vv = np.meshgrid(us, vs)
            net = np.stack([uu, vv, np.ones_like(uu)], -1) - ptran
            orig = net @ np.linalg.inv(prot).T
            rays = np.stack([orig[..., 0], orig[..., 1], np.ones_like(uu)], -1) @ np.linalg.inv(K).T  # z = 1
            dz = rays @ R[2]  # lidar-frame z of the ray direction
            with np.errstate(divide="ignore", invalid="ignore"):
                depth = (ground_z - t[2]) / dz
            depth = np.where((dz < 0) & np.isfinite(depth), depth, np.inf)
            best = np.minimum(best, depth)
        idx = np.round((best - d0) / step)
        valid = np.isfinite(best) & (idx >= 0) & (idx < D)
        out[n][valid] = idx[valid].astype(np.int16)
    return out


@dataclass
class BEVDetBatch:
    """One training batch, on the device."""

    image: Tensor  # [B, N, 3, H, W] float32, normalised
    ranks: tuple[Tensor, ...]  # BEVPoolRanks of the batch's cameras
    heatmap: Tensor  # [B, C, Y, X]
    anno_box: Tensor  # [B, M, 10]
    ind: Tensor  # [B, M] int64
    mask: Tensor  # [B, M] bool
    depth: Tensor | None  # [B, N, fH, fW] int64 bin, -1 unknown


def _worker_init() -> None:
    # forked after the parent ran torch ops: no intra-op thread pool in the children (not fork-safe)
    torch.set_num_threads(1)


def _load_frame(args) -> tuple:
    info, cfg, preprocess, with_depth, ground = args
    x = prepare_bevdet_inputs(info, preprocess)
    mean = np.asarray(preprocess.mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(preprocess.std, dtype=np.float32).reshape(1, 3, 1, 1)
    # the pipeline's uint8 pixels back (exact: they were uint8 before the normalisation)
    image = np.clip(np.round(x["image"].numpy() * std + mean), 0, 255).astype(np.uint8)
    # numpy, not tensors: tensors sent back by worker processes each keep a file descriptor open
    geometry = tuple(x[k].numpy() for k in GEOMETRY_KEYS)
    labels = np.array([CLASS_NAMES.index(n) if n in CLASS_NAMES else -1 for n in info.get("gt_names", [])],
                      dtype=np.int64)
    keep = labels >= 0
    if "valid_flag" in info:
        keep &= np.asarray(info["valid_flag"], dtype=bool)
    boxes = lidar_boxes_to_model_frame(np.asarray(info["gt_boxes"])[keep], np.asarray(info["gt_velocity"])[keep],
                                       x["bev2lidar"].numpy())
    targets = centerpoint_targets(boxes, labels[keep], cfg)
    depth = depth_targets(info, x, cfg, preprocess, ground=ground) if with_depth else None
    return image, geometry, targets, depth


class BEVDetTraining:
    """BEVDet's training data and losses (see the module docstring for what is official).

    All frames are loaded once (test-time crop, uint8 on the device), with their CenterPoint
    targets and depth targets. Batches draw frames in a shuffled order, epoch after epoch.

    Args:
        model: A :class:`bevdeploy.models.bevdet.BEVDet`.
        infos: Info records of the training world.
        device: Where batches live.
        depth_weight: Weight of the depth supervision (0 turns it off: the official BEVDet loss).
        ground_depth: Add the ground plane's depth (None: on for the synthetic world, whose LiDAR
            files hold object returns only).
        workers: Processes loading frames.
        progress: Progress bar while loading.
    """

    def __init__(self, model: nn.Module, infos: Sequence[dict], device, *, depth_weight: float = 3.0,
                 ground_depth: bool | None = None, workers: int = 1, progress: bool = True) -> None:
        from tqdm import tqdm

        cfg = getattr(model, "config", None)
        if not isinstance(cfg, BEVDetConfig):
            raise TypeError(f"model must be a BEVDet (with a BEVDetConfig), got {type(model).__name__}")
        if not infos:
            raise ValueError("infos must hold at least one training frame")
        if any("gt_boxes" not in i for i in infos):
            raise ValueError("every info record needs GT boxes (a test split cannot train)")
        self.cfg = cfg
        self.device = torch.device(device)
        self.depth_weight = float(depth_weight)
        if ground_depth is None:
            ground_depth = all("synthetic-s" in str(i.get("lidar_path", "")) for i in infos)
        self.ground_depth = bool(ground_depth)
        self.preprocess = BEVDetPreprocess(input_size=cfg.image_size)
        jobs = [(info, cfg, self.preprocess, self.depth_weight > 0, self.ground_depth) for info in infos]
        bar = tqdm(total=len(jobs), desc="load frames", disable=not progress, unit="frame")
        if workers > 1:
            import multiprocessing as mp

            with mp.get_context("fork").Pool(workers, initializer=_worker_init) as pool:
                frames = []
                for f in pool.imap(_load_frame, jobs, chunksize=4):
                    frames.append(f)
                    bar.update(1)
        else:
            frames = []
            for job in jobs:
                frames.append(_load_frame(job))
                bar.update(1)
        bar.close()
        dev = self.device
        self.images = torch.from_numpy(np.stack([f[0] for f in frames])).to(dev)  # [F, N, 3, H, W] uint8
        self.geometry = [torch.from_numpy(np.stack([f[1][i] for f in frames])).float()
                         for i in range(len(GEOMETRY_KEYS))]  # CPU
        # One camera rig for every frame (the synthetic world; a nuScenes log) up to float noise:
        # share frame 0's parameters, so the BEVPool indices are computed once per batch size.
        self.shared_geometry = all(torch.allclose(g, g[:1].expand_as(g), atol=1e-5) for g in self.geometry)
        if self.shared_geometry:
            self.geometry = [g[:1].expand_as(g).contiguous() for g in self.geometry]
        self._ranks: dict[int, tuple[Tensor, ...]] = {}  # batch size -> ranks, with a shared rig
        self.heatmaps = torch.from_numpy(np.stack([f[2][0] for f in frames])).to(dev, torch.float16)
        self.anno_box = torch.from_numpy(np.stack([f[2][1] for f in frames])).to(dev)
        self.ind = torch.from_numpy(np.stack([f[2][2] for f in frames])).to(dev)
        self.mask = torch.from_numpy(np.stack([f[2][3] for f in frames])).to(dev).bool()
        self.depth = (torch.from_numpy(np.stack([f[3] for f in frames])).to(dev) if self.depth_weight > 0 else None)
        self.mean = torch.tensor(self.preprocess.mean, device=dev).view(1, 1, 3, 1, 1)
        self.std = torch.tensor(self.preprocess.std, device=dev).view(1, 1, 3, 1, 1)
        self.code_weights = torch.tensor(CODE_WEIGHTS, device=dev)
        self.model = model

    def __len__(self) -> int:
        return self.images.shape[0]

    def make_batch(self, idx: Tensor) -> BEVDetBatch:
        """The batch of frames ``idx`` (int64 indices)."""
        dev = self.device
        cpu_idx = idx.cpu()
        ranks = self._ranks.get(len(cpu_idx)) if self.shared_geometry else None
        if ranks is None:
            ranks = tuple(self.model.prepare(*(g[cpu_idx].to(dev) for g in self.geometry)))
            if self.shared_geometry:  # no per-step cache lookup (it hashes the parameters on the host)
                self._ranks[len(cpu_idx)] = ranks
        d = idx.to(dev)
        image = (self.images[d].float() - self.mean) / self.std
        return BEVDetBatch(image=image, ranks=ranks, heatmap=self.heatmaps[d].float(), anno_box=self.anno_box[d],
                           ind=self.ind[d], mask=self.mask[d], depth=None if self.depth is None else self.depth[d].long())

    def batches(self, batch_size: int, seed: int) -> Iterator[BEVDetBatch]:
        g = torch.Generator().manual_seed(seed)
        n = len(self)
        while True:
            order = torch.randperm(n, generator=g)
            if n < batch_size:  # tiny worlds: repeat frames to fill a batch
                order = order.repeat(math.ceil(batch_size / n))
            for s in range(0, len(order) - batch_size + 1, batch_size):
                yield self.make_batch(order[s : s + batch_size])

    def forward(self, model: nn.Module, batch: BEVDetBatch) -> tuple[dict[str, Tensor], Tensor]:
        """The model's forward, split to expose the depth distribution: (head maps, depth [B, N, D, fH, fW])."""
        B = batch.image.shape[0]
        img_feat = model.extract_img_feat(batch.image)
        vt = model.img_view_transformer
        depth, feat = vt.lift(img_feat, B)
        bev = vt.splat(depth.float(), feat.float(), batch.ranks)  # the op takes fp32 (not bf16)
        bev_feat = model.img_bev_encoder_neck(model.img_bev_encoder_backbone(bev))
        return model.forward_head(bev_feat), depth

    def loss(self, model: nn.Module, batch: BEVDetBatch) -> dict[str, Tensor]:
        out, depth = self.forward(model, batch)
        heat = out["heatmap"].float().sigmoid().clamp(1e-4, 1 - 1e-4)
        num_pos = batch.heatmap.eq(1).float().sum().clamp_min(1.0)
        loss_heatmap = gaussian_focal_loss(heat, batch.heatmap) / num_pos
        preds = torch.cat([out[k].float() for k in HEAD_OUTPUTS[:-1]], 1)  # [B, 10, Y, X]
        B, C = preds.shape[:2]
        preds = preds.flatten(2).gather(2, batch.ind[:, None, :].expand(B, C, -1)).transpose(1, 2)  # [B, M, 10]
        mask = batch.mask.float()[..., None]
        target = batch.anno_box
        mask = mask * (~torch.isnan(target)).float()
        weights = mask * self.code_weights
        loss_bbox = BBOX_LOSS_WEIGHT * ((preds - torch.nan_to_num(target)).abs() * weights).sum() / (
            batch.mask.float().sum() + 1e-4)
        terms = {"loss_heatmap": loss_heatmap, "loss_bbox": loss_bbox}
        if self.depth_weight > 0 and batch.depth is not None:
            terms["loss_depth"] = self.depth_weight * depth_loss(depth, batch.depth)
        return terms


def depth_loss(depth: Tensor, target: Tensor) -> Tensor:
    """BEVDepth's depth loss: BCE of the softmax depth against the one-hot bin, summed over the bins of
    the known cells and divided by their number (masked rather than indexed: no host sync per step).

    Args:
        depth (Tensor[B, N, D, fH, fW]): the depth net's softmax.
        target (Tensor[B, N, fH, fW] int64): bin index, -1 where unknown.
    """
    D = depth.shape[2]
    prob = depth.float().permute(0, 1, 3, 4, 2).reshape(-1, D)
    t = target.reshape(-1)
    known = (t >= 0).float()[:, None]
    one_hot = F.one_hot(t.clamp_min(0), D).float()
    with torch.autocast(depth.device.type, enabled=False):
        bce = F.binary_cross_entropy(prob.clamp(1e-6, 1 - 1e-6), one_hot, weight=known, reduction="sum")
    return bce / known.sum().clamp_min(1.0)

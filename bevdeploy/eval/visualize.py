"""``bevdeploy show``: pictures of what a detector sees, as PNG files.

2D detectors (YOLOX, CenterNet): per image, the picture with its COCO boxes, ground truth green and
predictions red with class and score. BEV detectors: per frame, a bird's-eye view (ground truth green,
predictions red, the ego car, range rings every 10 m; the nuScenes LiDAR frame: x right, y forward, up in
the picture) and the six cameras with the same 3D boxes projected. Boxes are drawn by the nuScenes devkit's
``Box.render`` (its corner order and edge colours), so a box here is the box the devkit scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["GT_COLOR", "PRED_COLOR", "bev_figure", "camera_figure", "devkit_boxes", "image_figure", "show"]

#: Colours of ground-truth and predicted boxes (RGB in [0, 1]).
GT_COLOR = (0.0, 0.7, 0.0)
PRED_COLOR = (0.9, 0.0, 0.0)
#: Half-width of the BEV plot in metres (BEVFormer's perception range is +-51.2 m).
BEV_RANGE = 55.0


def devkit_boxes(boxes: np.ndarray, labels: Sequence[int] | None = None, scores: Sequence[float] | None = None):
    """Model boxes ``[N, 9]`` (LiDAR frame, bottom centre, w, l, h, yaw = -heading - pi/2, vx, vy) ->
    devkit ``Box`` objects in the LiDAR frame (gravity centre, heading quaternion about z)."""
    from nuscenes.utils.data_classes import Box
    from pyquaternion import Quaternion

    from bevdeploy.data.nuscenes import CLASS_NAMES

    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 9)
    out = []
    for i, b in enumerate(boxes):
        center = [b[0], b[1], b[2] + b[5] / 2]
        heading = -b[6] - np.pi / 2
        out.append(Box(center, list(b[3:6]), Quaternion(axis=[0, 0, 1], angle=heading),
                       label=np.nan if labels is None else int(labels[i]),
                       score=np.nan if scores is None else float(scores[i]),
                       velocity=(b[7], b[8], 0.0),
                       name=None if labels is None else CLASS_NAMES[int(labels[i])]))
    return out


def bev_figure(gt: np.ndarray, pred: np.ndarray, title: str = "", size_px: int = 800):
    """The BEV picture as a matplotlib figure (Agg) of ``size_px`` square pixels; returns (fig, ax).

    The axes are the LiDAR frame's x (right) and y (forward, up in the picture). ``gt`` and
    ``pred`` are model boxes ``[N, 9]``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle, Rectangle

    dpi = 100
    fig = Figure(figsize=(size_px / dpi, size_px / dpi), dpi=dpi)
    ax = fig.add_axes((0.09, 0.06, 0.88, 0.88))
    ax.set_xlim(-BEV_RANGE, BEV_RANGE)
    ax.set_ylim(-BEV_RANGE, BEV_RANGE)
    ax.set_aspect("equal")
    ax.set_xlabel("x (m, right)")
    ax.set_ylabel("y (m, forward)")
    ax.set_title(title, fontsize=9)
    for r in range(10, int(BEV_RANGE) + 1, 10):
        ax.add_patch(Circle((0, 0), r, fill=False, color="0.8", lw=0.6))
        ax.text(r * 0.7071, r * 0.7071, f"{r} m", color="0.6", fontsize=6)
    ax.add_patch(Rectangle((-0.95, -2.3), 1.9, 4.6, color="0.2"))  # the ego car, about 1.9 x 4.6 m

    view = np.eye(3)  # the nuScenes LiDAR frame: x right, y forward; drawn as seen from above
    for boxes, color, width in ((gt, GT_COLOR, 2.0), (pred, PRED_COLOR, 1.2)):
        for box in devkit_boxes(boxes):
            box.render(ax, view=view, normalize=False, colors=(color, color, color), linewidth=width)
    ax.plot([], [], color=GT_COLOR, label=f"ground truth ({len(gt)})")
    ax.plot([], [], color=PRED_COLOR, label=f"predictions ({len(pred)})")
    ax.legend(loc="upper right", fontsize=7)
    return fig, ax


def camera_figure(info: dict, gt: np.ndarray, pred: np.ndarray, title: str = "", width_px: int = 1500):
    """The six cameras (2 x 3, front row first) with ``gt`` / ``pred`` model boxes projected; returns fig."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from nuscenes.utils.geometry_utils import BoxVisibility, box_in_image
    from pyquaternion import Quaternion

    from bevdeploy.data.nuscenes import load_images

    order = ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT")
    images = load_images(info, order)
    h, w = images[0].shape[:2]
    dpi = 100
    fig = Figure(figsize=(width_px / dpi, width_px / dpi * (2 * h) / (3 * w) + 0.3), dpi=dpi)
    fig.suptitle(title, fontsize=9)
    sets = ((devkit_boxes(gt), GT_COLOR, 2.0), (devkit_boxes(pred), PRED_COLOR, 1.2))
    for k, (cam, img) in enumerate(zip(order, images)):
        ax = fig.add_axes((k % 3 / 3, (1 - k // 3) / 2 * 0.95, 1 / 3, 0.95 / 2))
        ax.imshow(img)
        ax.set_axis_off()
        ax.text(8, 8, cam, color="white", fontsize=7, va="top", bbox={"facecolor": "black", "alpha": 0.5, "lw": 0})
        c = info["cams"][cam]
        to_cam = Quaternion(matrix=np.asarray(c["sensor2lidar_rotation"], dtype=np.float64).T, atol=1e-6)
        shift = -np.asarray(c["sensor2lidar_translation"], dtype=np.float64)
        intrinsic = np.asarray(c["cam_intrinsic"], dtype=np.float64)
        for boxes, color, width in sets:
            for box in boxes:
                box = box.copy()
                box.translate(shift)
                box.rotate(to_cam)
                if box_in_image(box, intrinsic, (w, h), vis_level=BoxVisibility.ANY):
                    box.render(ax, view=intrinsic, normalize=True, colors=(color, color, color), linewidth=width)
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
    return fig


def image_figure(rgb: np.ndarray, gt: Sequence[dict], pred: Sequence[dict], title: str = "", width_px: int = 1000):
    """One image with COCO boxes (``bbox`` [x, y, w, h] in pixels, ``category_id``; predictions also ``score``):
    ground truth green, predictions red and labelled with class and score; returns the figure (Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from bevdeploy.data.coco import COCO_CATEGORIES

    names = dict(COCO_CATEGORIES)
    h, w = rgb.shape[:2]
    dpi = 100
    image_in = width_px / dpi * h / w
    fig = Figure(figsize=(width_px / dpi, image_in + 0.3), dpi=dpi)  # the image, and a title strip above it
    ax = fig.add_axes((0, 0, 1, image_in / (image_in + 0.3)))
    ax.imshow(rgb)
    ax.set_axis_off()
    fig.text(0.5, 1 - 0.15 / (image_in + 0.3), title, ha="center", va="center", fontsize=9)
    for boxes, color, width in ((gt, GT_COLOR, 2.0), (pred, PRED_COLOR, 1.2)):
        for b in boxes:
            x, y, bw, bh = b["bbox"]
            ax.add_patch(Rectangle((x, y), bw, bh, fill=False, edgecolor=color, linewidth=width))
            if "score" in b:
                ax.text(x, y, f"{names.get(b['category_id'], b['category_id'])} {b['score']:.2f}", color="white",
                        fontsize=6, va="bottom", bbox={"facecolor": color, "alpha": 0.7, "lw": 0, "pad": 1})
    ax.plot([], [], color=GT_COLOR, label=f"ground truth ({len(gt)})")
    ax.plot([], [], color=PRED_COLOR, label=f"predictions ({len(pred)})")
    ax.legend(loc="upper right", fontsize=7)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    return fig


def _show_det2d(data: str, out: Path, runner, model_name: str | None, dev, results, frames: int,
                score_threshold: float, progress: bool) -> list[Path]:
    """``show`` for a 2D detector or a 2D data spec: ``<i>_<image id>_det.png`` per image."""
    import dataclasses
    import json

    from PIL import Image

    from bevdeploy.data.det2d import resolve_det2d_spec
    from bevdeploy.eval.coco import run_det2d

    source = resolve_det2d_spec(data, progress=progress)
    source = dataclasses.replace(source, num_images=min(frames, len(source.images())))
    images = source.images()
    pred: list[dict] = []
    if results is not None:
        pred = json.loads(Path(results).read_text())
        if not isinstance(pred, list) or any(not isinstance(d, dict) or not {"image_id", "bbox", "score",
                                                                              "category_id"} <= set(d) for d in pred):
            raise ValueError(f"results {str(results)!r}: not a COCO results JSON (a list of image_id, category_id, "
                             "bbox, score records; eval --results writes one)")
        ids = {r["id"] for r in images}
        if not any(d["image_id"] in ids for d in pred):
            raise ValueError(f"results {str(results)!r} hold none of the first {len(images)} images of {data!r}")
    elif runner is not None:
        from bevdeploy.engine import Engine

        if isinstance(runner, Engine):
            forward, config, batch = (lambda x: runner(image=x)), runner.metadata["model_config"], runner.batch
        else:
            forward, config, batch = runner, runner.config, min(len(images), 8)
        pred, _ = run_det2d(forward, source, model_name, config, batch=batch, device=dev, progress=progress)
    coco = source.coco()
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, rec in enumerate(images):
        gt = coco.loadAnns(coco.getAnnIds(imgIds=[rec["id"]], iscrowd=None))
        mine = [d for d in pred if d["image_id"] == rec["id"] and d["score"] >= score_threshold]
        rgb = np.asarray(Image.open(source.image_dir / rec["file_name"]).convert("RGB"))
        what = model_name or ("results" if results else "ground truth")
        fig = image_figure(rgb, gt, mine, f"{what}: image {rec['id']} ({rec['file_name']})")
        paths.append(out / f"{k:03d}_{rec['id']}_det.png")
        fig.savefig(paths[-1], dpi=fig.dpi)
    return paths


def show(
    data: str,
    out_dir: str | Path,
    *,
    model_name: str | None = None,
    engine: str | Path | None = None,
    results: str | Path | None = None,
    checkpoint: str | None = None,
    frames: int = 4,
    score_threshold: float = 0.3,
    device: str | None = None,
    workers: int = 1,
    progress: bool = True,
    predictions: dict | None = None,
) -> list[Path]:
    """Write ``<i>_<token>_bev.png`` and ``<i>_<token>_cams.png`` for the first ``frames`` frames of ``data``
    (2D models or 2D data, ``synthetic2d:N`` / ``coco:PATH``: ``<i>_<image id>_det.png`` per image, ``results``
    then a COCO results JSON; ``synthetic[:N]`` given to a 2D model means ``synthetic2d[:N]``).

    Predictions come from ``model_name``, an ``engine`` file, a nuScenes ``results`` file, or
    ``predictions`` (``{token: (boxes, scores, labels)}``, e.g. a :class:`DetectionRun`'s boxes);
    with none of them only the ground truth is drawn. Predictions below ``score_threshold`` are left
    out (a random-weight model's boxes are mostly clutter). Returns the paths written.
    """
    from bevdeploy.data.nuscenes import load_infos
    from bevdeploy.data.synthetic import resolve_data_spec
    from bevdeploy.eval.nuscenes import boxes_from_info

    if not (isinstance(frames, int) and frames >= 1):
        raise ValueError(f"frames must be a positive int, got {frames!r}")
    if sum(x is not None for x in (model_name, engine, results, predictions)) > 1:
        raise ValueError("give at most one of model, engine, results and predictions")
    runner = dev = None
    if model_name or engine:  # built before the data is rendered or read: a bad name or file is reported at once
        import torch

        from bevdeploy.eval.detection import model_or_engine

        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        runner, model_name = model_or_engine(model_name, engine, dev, checkpoint=checkpoint)
    from bevdeploy.models import DET2D_MODELS

    det2d_data = str(data).startswith(("synthetic2d", "coco:"))
    if model_name in DET2D_MODELS or (model_name is None and det2d_data):
        if model_name:
            from bevdeploy.data.det2d import as_2d_spec

            data = as_2d_spec(data)
        if predictions is not None:
            raise ValueError("predictions ({token: boxes}) are BEV boxes; a 2D model draws its own or --results")
        return _show_det2d(data, Path(out_dir), runner, model_name, dev, results, frames, score_threshold, progress)
    if model_name and det2d_data:
        raise ValueError(f"{model_name} is a BEV model: show it BEV data (synthetic:N or nuscenes:PATH), not {data!r}")
    if results is not None:  # read before the world is rendered: a wrong file is reported at once
        from bevdeploy.eval.nuscenes import from_nusc_results, load_results

        records = load_results(results, "results")
    source = resolve_data_spec(data, workers=workers, progress=progress)
    infos = load_infos(source.dataroot, source.version, source.split, progress=progress)
    if results is not None:
        infos = [i for i in infos if i["token"] in records][:frames]
        if not infos:
            raise ValueError(f"results {str(results)!r} hold none of the samples of {data!r}")
        predictions = {i["token"]: from_nusc_results(records[i["token"]], i) for i in infos}
    infos = infos[:frames]
    if model_name:
        from bevdeploy.eval.detection import run_model

        predictions = run_model(runner, infos, model_name, dev, progress=progress).boxes
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, info in enumerate(infos):
        gt = boxes_from_info(info)[0] if "gt_boxes" in info else np.zeros((0, 9))
        pred = np.zeros((0, 9))
        if predictions and info["token"] in predictions:
            boxes, scores, _ = predictions[info["token"]]
            pred = np.asarray(boxes, dtype=np.float64).reshape(-1, 9)[np.asarray(scores) >= score_threshold]
        title = f"{info.get('scene_token', '')[:8]} frame {info.get('frame_idx', k)} sample {info['token'][:8]}"
        stem = f"{k:03d}_{info['token'][:8]}"
        fig, _ = bev_figure(gt, pred, title)
        paths.append(out / f"{stem}_bev.png")
        fig.savefig(paths[-1], dpi=fig.dpi)
        fig = camera_figure(info, gt, pred, title)
        paths.append(out / f"{stem}_cams.png")
        fig.savefig(paths[-1], dpi=fig.dpi)
    return paths

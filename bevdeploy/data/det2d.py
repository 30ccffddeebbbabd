"""COCO-format images for the 2D detectors: data specs, the official test-time pipelines, box mapping.

Data specs: ``coco:PATH`` (real COCO 2017: ``PATH/annotations/instances_val2017.json`` and
``PATH/val2017/``) or ``synthetic2d:N[@SEED]`` (N camera views of the synthetic world in the same
layout, generated once and cached, :func:`bevdeploy.data.coco.generate_coco`; sets of different seeds
share no scene and no image id, so ``synthetic2d:600@1`` trains and ``synthetic2d:120@2`` scores).

Pipelines (mmdetection 2.x test configs), each to a fixed canvas so one static engine serves all images:

* YOLOX (``yolox_x_8x8_300e_coco``): keep-ratio resize into the canvas (640x640; cv2 bilinear as
  mmcv), pad right/bottom with 114, BGR 0..255, no normalisation.
* CenterNet (``centernet_resnet18_dcnv2_140e_coco``): no resize; the image is pasted at the canvas
  centre (RandomCenterCropPad test mode: the canvas is the image size ``| 31`` plus 1, 672x512 for a
  640x480 COCO image; here a fixed canvas, 512x512 by default, and an image larger than it is first
  shrunk keep-ratio to fit), zero padding, then RGB normalised with ImageNet mean/std.

:func:`boxes_to_image` maps network-input boxes back to original pixels (undo paste and scale, clip).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["CocoSet", "ImageMeta", "PIPELINES", "resolve_det2d_spec", "preprocess_image", "boxes_to_image",
           "load_batch", "load_training_set"]

#: Pipeline kind of each 2D model.
PIPELINES = {"yolox-x": "yolox", "centernet-r18-dcn": "centernet"}
_MEAN_RGB = np.array([123.675, 116.28, 103.53], dtype=np.float32)
_STD_RGB = np.array([58.395, 57.12, 57.375], dtype=np.float32)
_YOLOX_PAD = 114.0


@dataclass(frozen=True)
class CocoSet:
    """A COCO-format detection set on disk: annotation file, image folder, how many images to use, and
    the data spec it was resolved from (for tables; empty if none)."""

    ann_file: Path
    image_dir: Path
    num_images: int | None = None
    spec: str = ""

    def coco(self):
        """The ``pycocotools.coco.COCO`` of the annotation file (quietly loaded)."""
        import contextlib
        import io

        from pycocotools.coco import COCO

        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(self.ann_file))

    def images(self) -> list[dict]:
        """Image records (``id``, ``file_name``, ``height``, ``width``) in id order, the first N."""
        imgs = sorted(json.loads(self.ann_file.read_text())["images"], key=lambda r: r["id"])
        return imgs[: self.num_images] if self.num_images is not None else imgs


def as_2d_spec(data):
    """The BEV spellings of the synthetic world (``synthetic``, ``synthetic:N[@SEED]``, the commands' defaults)
    read as its 2D views for a 2D model (``synthetic2d[:N[@SEED]]``); any other spec or a ``CocoSet`` as given."""
    if isinstance(data, str) and (data == "synthetic" or data.startswith("synthetic:")):
        return "synthetic2d" + data[len("synthetic"):]
    return data


def _coco_parts(arg: str, spec: str) -> tuple[str, str, int | None]:
    """``PATH[:SPLIT][:N]`` -> (PATH, SPLIT, N): SPLIT names the annotation file and image folder (default
    ``val2017``; ``train2017`` to train or calibrate on other images than those scored), N the first images."""
    parts = arg.split(":")
    count = None
    if len(parts) > 1 and parts[-1].isdigit():
        count = int(parts.pop())
        if count < 1:
            raise ValueError(f"data spec {spec!r}: the image count N must be positive")
    split = "val2017"
    if len(parts) > 1 and re.fullmatch(r"[a-z]+\d{4}", parts[-1]):
        split = parts.pop()
    return ":".join(parts), split, count


def resolve_det2d_spec(spec: str, *, cache_dir: str | Path | None = None, seed: int = 0,
                       image_size: tuple[int, int] = (360, 640), progress: bool = True, workers: int = 1) -> CocoSet:
    """``coco:PATH[:SPLIT][:N]`` or ``synthetic2d:N[@SEED]`` -> :class:`CocoSet` (the synthetic set is generated
    if needed; COCO's SPLIT defaults to ``val2017``, N to every image).

    A spec's ``@SEED`` overrides ``seed``; ``image_size`` is the (H, W) the synthetic views are rendered at,
    by ``workers`` processes.

    Raises:
        ValueError: a spec of another form. FileNotFoundError: COCO PATH without its annotation file.
    """
    kind, _, arg = str(spec).partition(":")
    if kind == "synthetic2d" and "@" in arg:
        arg, _, seed_text = arg.rpartition("@")
        if not seed_text.isdigit():
            raise ValueError(f"data spec {spec!r}: the world seed after '@' must be a non-negative integer, "
                             f"got {seed_text!r}")
        seed = int(seed_text)
    if kind == "coco" and arg:
        path, split, count = _coco_parts(arg, spec)
        root = Path(path).expanduser().absolute()
        ann = root / "annotations" / f"instances_{split}.json"
        if not ann.is_file():
            raise FileNotFoundError(f"COCO annotations not found: {str(ann)!r} (PATH must hold "
                                    f"annotations/instances_{split}.json and {split}/)")
        return CocoSet(ann, root / split, count, spec=str(spec))
    if kind == "synthetic2d":
        try:
            n = int(arg) if arg else 64
        except ValueError:
            n = -1
        if n < 1:
            raise ValueError(f"synthetic2d:N needs a positive image count, got {spec!r}")
        from bevdeploy.data.coco import generate_coco
        from bevdeploy.data.synthetic import default_cache_dir

        base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        root = generate_coco(base / f"coco-seed{seed}-n{n}-{image_size[0]}x{image_size[1]}", n, seed=seed,
                             image_size=image_size, progress=progress, workers=workers)
        return CocoSet(root / "annotations" / "instances_val2017.json", root / "val2017", n, spec=str(spec))
    raise ValueError(f"2D data must be 'coco:PATH[:SPLIT][:N]' or 'synthetic2d:N[@SEED]', got {spec!r}")


@dataclass(frozen=True)
class ImageMeta:
    """Where the original image sits in the network input: ``x_in = x * scale_x + left`` (same for y)."""

    scale_x: float
    scale_y: float
    left: float
    top: float
    height: int
    width: int


def _resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    if (img.shape[1], img.shape[0]) == (w, h):
        return img
    try:
        import cv2

        return cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
    except ImportError:  # PIL's bilinear differs from cv2's by rounding only
        from PIL import Image

        return np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))


def preprocess_image(img_bgr: np.ndarray, kind: str, input_size: tuple[int, int]) -> tuple[Tensor, ImageMeta]:
    """One BGR uint8 image [h, w, 3] -> the network input [3, H, W] float32 and its :class:`ImageMeta`.

    Args:
        img_bgr: As ``cv2.imread`` returns it.
        kind: ``"yolox"`` or ``"centernet"`` (:data:`PIPELINES`).
        input_size: (H, W) of the canvas (the engine's static input).
    """
    if kind not in ("yolox", "centernet"):
        raise ValueError(f"kind must be 'yolox' or 'centernet', got {kind!r}")
    if img_bgr.ndim != 3 or img_bgr.shape[2] != 3:
        raise ValueError(f"img_bgr must be [h, w, 3], got shape {img_bgr.shape}")
    H, W = input_size
    h, w = img_bgr.shape[:2]
    if kind == "yolox":
        scale = min(H / h, W / w)
        nw, nh = int(w * scale + 0.5), int(h * scale + 0.5)
        canvas = np.full((H, W, 3), _YOLOX_PAD, dtype=np.float32)
        canvas[:nh, :nw] = _resize(img_bgr, nw, nh)
        meta = ImageMeta(nw / w, nh / h, 0.0, 0.0, h, w)
        return torch.from_numpy(canvas).permute(2, 0, 1).contiguous(), meta
    scale = min(1.0, H / h, W / w)
    nw, nh = (w, h) if scale == 1.0 else (max(1, int(w * scale)), max(1, int(h * scale)))
    img = _resize(img_bgr, nw, nh)
    top, left = H // 2 - nh // 2, W // 2 - nw // 2
    canvas = np.zeros((H, W, 3), dtype=np.float32)
    canvas[top:top + nh, left:left + nw] = img[..., ::-1]  # RGB
    canvas = (canvas - _MEAN_RGB) / _STD_RGB
    meta = ImageMeta(nw / w, nh / h, float(left), float(top), h, w)
    return torch.from_numpy(canvas).permute(2, 0, 1).contiguous(), meta


def boxes_to_image(boxes: Tensor, meta: ImageMeta) -> Tensor:
    """xyxy boxes in network-input pixels -> original image pixels, clipped to the image."""
    out = boxes.float().clone()
    out[:, 0::2] = ((out[:, 0::2] - meta.left) / meta.scale_x).clamp(0, meta.width)
    out[:, 1::2] = ((out[:, 1::2] - meta.top) / meta.scale_y).clamp(0, meta.height)
    return out


def load_batch(data: CocoSet, records: list[dict], kind: str, input_size: tuple[int, int]
               ) -> tuple[Tensor, list[ImageMeta]]:
    """Read and preprocess ``records`` (from :meth:`CocoSet.images`): [B, 3, H, W] and their metas."""
    from PIL import Image

    images, metas = [], []
    for rec in records:
        path = data.image_dir / rec["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"image of COCO id {rec['id']} not found: {str(path)!r}")
        rgb = np.asarray(Image.open(path).convert("RGB"))
        x, meta = preprocess_image(np.ascontiguousarray(rgb[..., ::-1]), kind, input_size)
        images.append(x)
        metas.append(meta)
    return torch.stack(images), metas


def load_training_set(data: CocoSet, kind: str, input_size: tuple[int, int], *, dtype: torch.dtype = torch.float16,
                      min_size: float = 1.0) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Every image of ``data`` through the test pipeline, with its ground truth in network-input pixels.

    Returns ``(images [N, 3, H, W] of dtype, boxes: per image Tensor[n, 4] xyxy, labels: per image
    Tensor[n] contiguous 0..79)``; crowd boxes and boxes under ``min_size`` pixels are dropped.
    """
    from bevdeploy.data.coco import COCO_CATEGORIES

    label_of = {cid: i for i, (cid, _) in enumerate(COCO_CATEGORIES)}
    coco = data.coco()
    records = data.images()
    images, all_boxes, all_labels = [], [], []
    for start in range(0, len(records), 16):
        chunk = records[start:start + 16]
        x, metas = load_batch(data, chunk, kind, input_size)
        images.append(x.to(dtype))
        for rec, meta in zip(chunk, metas):
            anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=rec["id"])) if not a.get("iscrowd", 0)]
            xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
            boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
            boxes[:, 0::2] = boxes[:, 0::2] * meta.scale_x + meta.left
            boxes[:, 1::2] = boxes[:, 1::2] * meta.scale_y + meta.top
            labels = torch.tensor([label_of[a["category_id"]] for a in anns], dtype=torch.long)
            keep = ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)
            all_boxes.append(boxes[keep])
            all_labels.append(labels[keep])
    return torch.cat(images), all_boxes, all_labels

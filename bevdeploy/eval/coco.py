"""COCO evaluation of the 2D detectors with pycocotools: run, write the results JSON, score, fidelity.

``bevdeploy eval --model yolox-x --data coco:PATH|synthetic2d:N [--results FILE]``: every image
through the model's official test pipeline (:mod:`bevdeploy.data.det2d`) in batches, decoded by the
model's own decoder, boxes mapped back to original pixels, written in the COCO results format
(``image_id``, ``category_id``, ``bbox`` [x, y, w, h], ``score``) and scored by ``COCOeval`` (bbox).
Fidelity: an engine's detections scored with the PyTorch model's confident detections as ground
truth (deployment should change nothing, so random weights still give a measure).
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["to_coco_results", "coco_map", "run_det2d", "evaluate_det2d", "decoder_for", "fidelity_map",
           "STAT_NAMES"]

#: COCOeval.stats in order.
STAT_NAMES = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l", "AR_1", "AR_10", "AR_100", "AR_s", "AR_m",
              "AR_l")


def to_coco_results(image_id: int, boxes: Tensor, scores: Tensor, labels: Tensor) -> list[dict]:
    """Detections of one image (xyxy original pixels, contiguous labels 0..79) as COCO result dicts."""
    from bevdeploy.data.coco import COCO_CATEGORIES

    out = []
    for (x0, y0, x1, y1), s, lab in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
        out.append({"image_id": int(image_id), "category_id": COCO_CATEGORIES[int(lab)][0],
                    "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)], "score": round(s, 5)})
    return out


def coco_map(coco_gt, results: list[dict], image_ids: Sequence[int] | None = None) -> dict[str, float]:
    """pycocotools bbox metrics of ``results`` against ``coco_gt`` (a ``COCO``), on ``image_ids``
    (default: all of the ground truth's). No detections scores 0 (COCOeval cannot load an empty list)."""
    from pycocotools.cocoeval import COCOeval

    if not results:
        return dict.fromkeys(STAT_NAMES, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, dt, "bbox")
        if image_ids is not None:
            ev.params.imgIds = list(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: max(float(v), 0.0) for k, v in zip(STAT_NAMES, ev.stats)}  # -1 (no such objects) -> 0


def decoder_for(model_name: str, config: dict | object) -> Callable[[dict[str, Tensor]], list]:
    """The decoder of ``model_name`` for a config (its dataclass, or the dict an engine's metadata holds)."""
    if model_name == "yolox-x":
        from bevdeploy.models.yolox import YOLOXConfig, YOLOXDecoder

        cls, dec = YOLOXConfig, YOLOXDecoder
    elif model_name == "centernet-r18-dcn":
        from bevdeploy.models.centernet import CenterNetConfig, CenterNetDecoder

        cls, dec = CenterNetConfig, CenterNetDecoder
    else:
        raise ValueError(f"no 2D decoder for {model_name!r} (2D models: yolox-x, centernet-r18-dcn)")
    if isinstance(config, dict):
        config = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    return dec(config)


def run_det2d(forward: Callable[[Tensor], dict[str, Tensor]], data, model_name: str, config, *, batch: int,
              device: torch.device, dtype: torch.dtype = torch.float32, progress: bool = False
              ) -> tuple[list[dict], float | None]:
    """Detections of every image of ``data`` (a ``CocoSet``) in COCO result form, and images/s.

    ``forward`` takes an image batch [batch, 3, H, W] and returns the raw head maps (a model, or
    ``lambda x: engine(image=x)``). The last batch is filled up with copies of its first image (a
    static engine takes exactly ``batch``); those results are dropped. Images/s counts forward +
    decode of full batches, synchronised, excluding image loading.
    """
    from tqdm import tqdm

    from bevdeploy.data.det2d import PIPELINES, boxes_to_image, load_batch

    decode = decoder_for(model_name, config)
    records = data.images()
    results: list[dict] = []
    seconds, timed = 0.0, 0
    for start in tqdm(range(0, len(records), batch), desc=model_name, disable=not progress):
        chunk = records[start:start + batch]
        x, metas = load_batch(data, chunk, PIPELINES[model_name], tuple(config.image_size)
                              if not isinstance(config, dict) else tuple(config["image_size"]))
        if len(chunk) < batch:
            x = torch.cat([x, x[:1].expand(batch - len(chunk), *x.shape[1:])])
        x = x.to(device, dtype)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            dets = decode(forward(x))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if len(chunk) == batch:
            seconds += time.perf_counter() - t0
            timed += batch
        for rec, meta, (boxes, scores, labels) in zip(chunk, metas, dets):
            results += to_coco_results(rec["id"], boxes_to_image(boxes.cpu(), meta), scores.cpu(), labels.cpu())
    return results, (timed / seconds if timed else None)


def fidelity_map(results: list[dict], reference: list[dict], image_ids: Sequence[int], images: list[dict],
                 score_threshold: float) -> float:
    """COCO mAP of ``results`` with ``reference``'s detections scoring >= ``score_threshold`` as ground truth."""
    from pycocotools.coco import COCO

    from bevdeploy.data.coco import COCO_CATEGORIES

    anns = []
    for r in reference:
        if r["score"] >= score_threshold:
            x, y, w, h = r["bbox"]
            anns.append({"id": len(anns) + 1, "image_id": r["image_id"], "category_id": r["category_id"],
                         "bbox": [x, y, w, h], "area": max(w * h, 1e-6), "iscrowd": 0})
    if not anns:
        return float("nan")
    gt = COCO()
    gt.dataset = {"images": [{"id": i["id"], "height": i["height"], "width": i["width"]} for i in images],
                  "annotations": anns, "categories": [{"id": c, "name": n} for c, n in COCO_CATEGORIES]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return coco_map(gt, results, image_ids)["mAP"]


def evaluate_det2d(model_name: str | None, data: str, *, engine: str | Path | None = None,
                   checkpoint: str | None = None, allow_partial: bool = False, device: str | None = None,
                   batch: int | None = None, results_file: str | Path | None = None, progress: bool = True,
                   model_overrides: dict | None = None) -> dict:
    """Run ``model_name`` (PyTorch eager) or a 2D ``engine`` file over ``data`` and score it with pycocotools.

    The model (and its checkpoint) or the engine is loaded before the images are read or rendered, so a
    bad file is reported at once.

    Args:
        model_name: ``yolox-x`` or ``centernet-r18-dcn``; None with ``engine`` (the engine names its model).
        data: ``coco:PATH`` or ``synthetic2d:N``.
        engine: A 2D engine file (``bevdeploy build``); its static batch is the batch.
        checkpoint: Official mmdetection checkpoint (random weights, seed 0, otherwise); model only.
        allow_partial: Passed to ``load_checkpoint``.
        device: ``cuda`` / ``cpu`` (default: cuda when available).
        batch: Images per forward (default 32 on a GPU, 2 on a CPU; an engine's own batch).
        results_file: Write the COCO results JSON here.
        model_overrides: Config overrides (tests).

    Returns:
        dict with ``model``, ``data``, ``images``, ``fps`` (images/s), ``detections``, ``engine`` and the
        COCOeval stats (``mAP``, ``mAP_50``, ...).
    """
    from bevdeploy.data.det2d import resolve_det2d_spec
    from bevdeploy.eval.detection import model_or_engine
    from bevdeploy.models import DET2D_MODELS

    if engine is None and model_name not in DET2D_MODELS:
        raise ValueError(f"evaluate_det2d takes a 2D model {DET2D_MODELS}, got {model_name!r}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    runner, model_name = model_or_engine(model_name, engine, dev, checkpoint=checkpoint, allow_partial=allow_partial,
                                         model_overrides=model_overrides)
    if engine is not None:
        if model_name not in DET2D_MODELS:
            raise ValueError(f"engine {str(engine)!r} was built from {model_name!r}, a BEV model: evaluate it on BEV "
                             "data (synthetic:N or nuscenes:PATH), not 2D images")
        if batch is not None and batch != runner.batch:
            raise ValueError(f"engine {str(engine)!r} has the static batch {runner.batch}; --batch {batch} cannot run "
                             f"on it (drop --batch, or build with --batch {batch})")
        batch, config = runner.batch, runner.metadata["model_config"]
        forward = lambda x: runner(image=x)  # noqa: E731
    else:
        batch = batch or (32 if dev.type == "cuda" else 2)
        forward, config = runner, runner.config
    source = resolve_det2d_spec(data, progress=progress)
    results, fps = run_det2d(forward, source, model_name, config, batch=batch, device=dev, progress=progress)
    if results_file:
        Path(results_file).parent.mkdir(parents=True, exist_ok=True)
        Path(results_file).write_text(json.dumps(results))
    images = source.images()
    metrics = coco_map(source.coco(), results, [r["id"] for r in images])
    return {"model": model_name, "data": data, "images": len(images), "fps": fps, "detections": len(results),
            "engine": None if engine is None else str(engine), **metrics}

"""``bevdeploy eval``: run a BEV detector over a dataset in temporal order and score it.

The loop is the reference system's host loop: frames of each scene in order, the previous
``bev_embed`` fed back, the ``use_prev_bev`` gate and the CAN-bus ego deltas from
:class:`bevdeploy.data.preprocess.TemporalState`. Anything with the model's forward signature runs
here (the PyTorch model, later an engine), so PyTorch and engines are scored by the same code.
Timing covers the forward alone (CUDA events on a GPU), not image decoding.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

Forward = Callable[..., dict[str, Tensor]]
Decode = Callable[[dict[str, Tensor]], list[tuple[Tensor, Tensor, Tensor]]]


@dataclass
class DetectionRun:
    """Boxes per sample token (model-box convention) and per-frame forward latencies."""

    boxes: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def fps(self) -> float | None:
        """Frames per second from the median latency, skipping the first frames (warm-up)."""
        lat = self.latencies_ms[3:] if len(self.latencies_ms) > 6 else self.latencies_ms
        return 1000.0 / statistics.median(lat) if lat else None

    def save(self, path: str | Path) -> None:
        """JSON of the raw boxes, so NDS can be scored on another machine (e.g. one with the devkit)."""
        data = {"latencies_ms": self.latencies_ms,
                "boxes": {t: [b.tolist(), s.tolist(), lab.tolist()] for t, (b, s, lab) in self.boxes.items()}}
        Path(path).write_text(json.dumps(data))

    @classmethod
    def load(cls, path: str | Path) -> DetectionRun:
        try:
            data = json.loads(Path(path).read_text())
            boxes = {t: (np.asarray(b, dtype=np.float64).reshape(-1, 9), np.asarray(s, dtype=np.float64), np.asarray(lab, dtype=np.int64))
                     for t, (b, s, lab) in data["boxes"].items()}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a bevdeploy detection-run file ({e})") from e
        return cls(boxes=boxes, latencies_ms=list(data.get("latencies_ms", [])))


def _timer(device: torch.device):
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def begin():
            start.record()

        def finish() -> float:
            end.record()
            end.synchronize()
            return start.elapsed_time(end)

        return begin, finish
    t0 = [0.0]

    def begin():
        t0[0] = time.perf_counter()

    def finish() -> float:
        return (time.perf_counter() - t0[0]) * 1000.0

    return begin, finish


def run_bevformer(
    forward: Forward,
    decode: Decode,
    infos: Sequence[dict],
    *,
    preprocess,
    bev_shape: tuple[int, int],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> DetectionRun:
    """Run one stream over ``infos`` (temporal order) and collect decoded boxes and latencies.

    Args:
        forward: ``forward(image, lidar2img, can_bus, prev_bev, use_prev_bev) -> dict`` with
            ``bev_embed``, ``all_cls_scores``, ``all_bbox_preds`` (the model or an engine).
        decode: outputs -> per-sample ``(boxes [N, 9], scores, labels)``.
        infos: info records, sorted by scene and timestamp (``load_infos`` returns them so).
        preprocess: the model's :class:`bevdeploy.data.preprocess.ImagePreprocess`.
        bev_shape: ``(bev_h * bev_w, C)`` of ``prev_bev``.
    """
    from tqdm import tqdm

    from bevdeploy.data.preprocess import carry_prev_bev, prepare_frame

    run = DetectionRun()
    prev_bev = None
    prev_info = None
    begin, finish = _timer(device)
    for info in tqdm(infos, desc="frames", disable=not progress, file=sys.stderr):
        if prev_info is not None and prev_info.get("scene_token") != info.get("scene_token"):
            prev_info = None  # a new scene: the gate closes, ego deltas are zeroed
        frame = prepare_frame(info, prev_info, preprocess)
        prev_bev, gate = carry_prev_bev(prev_bev, prev_info and prev_info.get("scene_token"), info.get("scene_token"),
                                        frame["use_prev_bev"].item(), shape=(1, *bev_shape), device=device,
                                        dtype=dtype, token=info.get("token", ""))
        inputs = {
            "image": frame["image"][None].to(device, dtype),
            "lidar2img": frame["lidar2img"][None].to(device),
            "can_bus": frame["can_bus"][None].to(device),
            "prev_bev": prev_bev,
            "use_prev_bev": torch.tensor([gate], device=device),
        }
        with torch.no_grad():
            begin()
            outputs = forward(**inputs)
            run.latencies_ms.append(finish())
            boxes, scores, labels = decode(outputs)[0]
        prev_bev = outputs["bev_embed"].to(dtype)
        run.boxes[info["token"]] = (boxes.float().cpu().numpy(), scores.float().cpu().numpy(), labels.cpu().numpy())
        prev_info = info
    return run


def run_bevdet(
    forward: Forward,
    prepare: Callable[..., Sequence[Tensor]],
    decode: Callable[..., list[tuple[Tensor, Tensor, Tensor]]],
    infos: Sequence[dict],
    *,
    image_size: tuple[int, int],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> DetectionRun:
    """Run BEVDet (the model or an engine) over ``infos`` and collect boxes in the LiDAR frame.

    Per sample: BEVDet's test pipeline (:func:`bevdeploy.data.preprocess_bevdet.prepare_bevdet_inputs`
    at ``image_size``), the pooling indices of its camera geometry from ``prepare`` (cached per
    geometry: with per-frame ego motion every sample is a new geometry, as in the official test),
    ``forward(image=..., ranks_bev=..., ...)`` and ``decode(outputs, bev2lidar)``. Timing covers
    the forward alone (as for BEVFormer; ``prepare`` is host-side set-up).
    """
    from tqdm import tqdm

    from bevdeploy.data.preprocess_bevdet import GEOMETRY_KEYS, BEVDetPreprocess, prepare_bevdet_inputs
    from bevdeploy.models.bevdet import BEVPoolRanks

    config = BEVDetPreprocess(input_size=tuple(image_size))
    run = DetectionRun()
    begin, finish = _timer(device)
    for info in tqdm(infos, desc="frames", disable=not progress, file=sys.stderr):
        x = prepare_bevdet_inputs(info, config)
        ranks = prepare(*(x[k][None].to(device) for k in GEOMETRY_KEYS))
        inputs = {"image": x["image"][None].to(device, dtype), **dict(zip(BEVPoolRanks._fields, ranks))}
        with torch.no_grad():
            begin()
            outputs = forward(**inputs)
            run.latencies_ms.append(finish())
            boxes, scores, labels = decode(outputs, x["bev2lidar"][None])[0]
        run.boxes[info["token"]] = (boxes.float().cpu().numpy(), scores.float().cpu().numpy(), labels.cpu().numpy())
    return run


def run_model(model, infos: Sequence[dict], model_name: str, device: torch.device, progress: bool = True) -> DetectionRun:
    """:func:`run_bevformer` or :func:`run_bevdet`, for a model or a loaded engine of ``model_name``."""
    from bevdeploy.data.preprocess import PREPROCESS
    from bevdeploy.engine import Engine
    from bevdeploy.engine.model_io import family

    if isinstance(model, Engine):
        fam, image_size = model.family, tuple(model.input_spec["image"][0][-2:])
    else:
        fam, image_size = family(model), tuple(model.config.image_size)
    if fam == "bevdet":
        return run_bevdet(model, model.prepare, model.decode, infos, image_size=image_size, device=device,
                          progress=progress)
    if model_name not in PREPROCESS:
        raise ValueError(f"no image pipeline for {model_name!r} (known: {sorted(PREPROCESS)})")
    return run_bevformer(model, model.decode, infos, preprocess=PREPROCESS[model_name], bev_shape=model.bev_shape,
                         device=device, progress=progress)


def score_run(run: DetectionRun, infos: Sequence[dict], dataroot: str | Path, version: str, split: str,
              output_path: str | Path | None = None, verbose: bool = False) -> dict:
    """NDS/mAP of a run with nuscenes-devkit's metric code (GT from the dataset's own tables)."""
    from nuscenes.nuscenes import NuScenes

    from bevdeploy.eval.nuscenes import NuScenesEvaluator

    nusc = NuScenes(version=version, dataroot=str(dataroot), verbose=verbose)
    evaluator = NuScenesEvaluator(gt=nusc, split=split, output_path=output_path, verbose=verbose)
    by_token = {i["token"]: i for i in infos}
    for token, (boxes, scores, labels) in run.boxes.items():
        evaluator.process(token, boxes, scores, labels, by_token[token])
    return evaluator.evaluate()


def evaluate(
    model_name: str,
    data: str,
    *,
    checkpoint: str | None = None,
    allow_partial: bool = False,
    device: str | None = None,
    workers: int = 1,
    save_run: str | Path | None = None,
    score: bool = True,
) -> dict:
    """Build ``model_name`` (random weights unless ``checkpoint``), run it over ``data`` and score it.

    Returns a dict with ``NDS``, ``mAP`` (when scored), ``fps``, ``frames``, ``device``.
    """
    from bevdeploy.data.nuscenes import load_infos
    from bevdeploy.data.synthetic import resolve_data_spec
    from bevdeploy.models import MODELS
    from bevdeploy.models.checkpoint import load_checkpoint

    if model_name not in MODELS:
        raise ValueError(f"unknown model {model_name!r}; choose from {sorted(MODELS)}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    source = resolve_data_spec(data, workers=workers)
    infos = load_infos(source.dataroot, source.version, source.split)
    if source.num_samples is not None:
        infos = infos[: source.num_samples]
    if not infos:
        raise ValueError(f"data {data!r} holds no samples")
    torch.manual_seed(0)
    model = MODELS[model_name]()
    if checkpoint:
        report = load_checkpoint(model, checkpoint, allow_partial=allow_partial)
        print(report, file=sys.stderr)
    model = model.to(dev).eval()
    run = run_model(model, infos, model_name, dev)
    if save_run:
        run.save(save_run)
    result = {"model": model_name, "data": data, "frames": len(run.latencies_ms), "fps": run.fps, "device": str(dev),
              "checkpoint": checkpoint}
    if score:
        metrics = score_run(run, infos, source.dataroot, source.version, source.split)
        result.update(NDS=metrics["NDS"], mAP=metrics["mAP"], metrics=metrics)
    return result

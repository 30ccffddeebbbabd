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
    """Boxes per sample token (model-box convention), per-frame forward latencies and the pass's wall time."""

    boxes: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    #: Seconds of the whole pass (frames read and preprocessed, forwards, decoding); with several processes
    #: the slowest one's, since they run side by side.
    wall_s: float | None = None
    processes: int = 1

    @property
    def fps(self) -> float | None:
        """Frames per second from the median latency, skipping the first frames (warm-up)."""
        lat = self.latencies_ms[3:] if len(self.latencies_ms) > 6 else self.latencies_ms
        return 1000.0 / statistics.median(lat) if lat else None

    @property
    def throughput(self) -> float | None:
        """Frames per second of the whole pass (all processes together): what a dataset pass takes, where
        :attr:`fps` is one forward's rate."""
        return len(self.latencies_ms) / self.wall_s if self.wall_s and self.latencies_ms else None

    def save(self, path: str | Path) -> None:
        """JSON of the raw boxes, so NDS can be scored on another machine (e.g. one with the devkit)."""
        data = {"latencies_ms": self.latencies_ms, "wall_s": self.wall_s, "processes": self.processes,
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
        return cls(boxes=boxes, latencies_ms=list(data.get("latencies_ms", [])), wall_s=data.get("wall_s"),
                   processes=int(data.get("processes", 1)))


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
    """:func:`run_bevformer` or :func:`run_bevdet`, for a model or a loaded engine of ``model_name``; the run's
    ``wall_s`` is the whole pass."""
    t0 = time.perf_counter()
    run = _run_family(model, infos, model_name, device, progress)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    run.wall_s = time.perf_counter() - t0
    return run


def _run_family(model, infos: Sequence[dict], model_name: str, device: torch.device, progress: bool) -> DetectionRun:
    from bevdeploy.data.preprocess import PREPROCESS
    from bevdeploy.engine import Engine
    from bevdeploy.engine.model_io import family

    if isinstance(model, Engine):
        if model.batch != 1:
            raise ValueError(f"{model.path.name}: the detection loop runs one frame per call and this engine has "
                             f"batch {model.batch}; evaluate a batch-1 engine (a batch-N engine runs N streams "
                             "with Engine.step_batch)")
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


def run_sharded(model, infos: Sequence[dict], model_name: str, device: torch.device, dist=None,
                progress: bool = True) -> DetectionRun | None:
    """:func:`run_model` split over the processes of a ``torchrun`` job, by scene.

    Each process runs whole scenes (:func:`bevdeploy.distributed.shard_by_scene`: the temporal chain
    stays in one process); rank 0 gathers every process's boxes and latencies and returns them in
    the order of ``infos``; the other ranks return None. One process (``dist`` None or of size 1):
    :func:`run_model` itself.
    """
    from bevdeploy.distributed import gather_objects, shard_by_scene

    if dist is None or not dist.enabled:
        return run_model(model, infos, model_name, device, progress=progress)
    mine = shard_by_scene(infos, dist.rank, dist.world_size)
    run = run_model(model, mine, model_name, device, progress=progress and dist.is_main)
    runs = gather_objects(run, dist)
    if not dist.is_main:
        return None
    boxes = {token: b for r in runs for token, b in r.boxes.items()}
    return DetectionRun(boxes={i["token"]: boxes[i["token"]] for i in infos if i["token"] in boxes},
                        latencies_ms=[ms for r in runs for ms in r.latencies_ms],
                        wall_s=max(r.wall_s for r in runs), processes=dist.world_size)


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


def random_weights_warning(model_name: str, context: str = "") -> str:
    """The one line printed whenever a model runs without trained weights (NDS near 0 is then expected)."""
    where = f" ({context})" if context else ""
    return (f"WARNING: {model_name} has RANDOM weights{where}: its boxes and NDS/mAP are meaningless; "
            "pass --checkpoint FILE.pth for real detections")


def warn_random_weights(model_name: str, context: str = "") -> None:
    """Print :func:`random_weights_warning` to stderr."""
    print(random_weights_warning(model_name, context), file=sys.stderr)


def model_or_engine(model_name: str | None, engine: str | Path | None, device: torch.device, *,
                    checkpoint: str | None = None, allow_partial: bool = False,
                    model_overrides: dict | None = None):
    """``(runner, model name)``: a loaded ``engine`` file (its model name from its metadata; ``model_name``, if
    given, must agree) or ``model_name`` with its ``checkpoint`` (random weights, seed 0, without one), in eval
    mode on ``device``. Either lacking trained weights is said on stderr."""
    from bevdeploy.models import MODELS
    from bevdeploy.models.checkpoint import load_checkpoint

    if engine is not None:
        from bevdeploy.engine import Engine

        if checkpoint:
            raise ValueError("--checkpoint applies to --model only: an engine holds the weights it was built with")
        runner = Engine.load(engine, device=device)
        built = runner.metadata["model"]
        if model_name is not None and MODELS.get(model_name) is not MODELS.get(built):
            raise ValueError(f"engine {str(engine)!r} was built from {built!r}, not --model {model_name!r}")
        if not runner.metadata.get("checkpoint"):
            warn_random_weights(built, f"engine {Path(engine).name}")
        return runner, built
    if model_name not in MODELS:
        raise ValueError(f"unknown model {model_name!r}; choose from {sorted(MODELS)}")
    torch.manual_seed(0)
    model = MODELS[model_name](**(model_overrides or {}))
    if checkpoint:
        print(load_checkpoint(model, checkpoint, allow_partial=allow_partial), file=sys.stderr)
    else:
        warn_random_weights(model_name)
    return model.to(device).eval(), model_name


def write_results(run: DetectionRun, infos: Sequence[dict], path: str | Path) -> Path:
    """Write the nuScenes detection submission file of ``run`` (global frame, devkit conventions).

    Every run sample is listed, also those without detections; boxes beyond their class range are
    dropped as the official tooling does. Needs no ground truth (works for v1.0-test).
    """
    from bevdeploy.eval.nuscenes import save_results, to_nusc_results

    by_token = {i["token"]: i for i in infos}
    missing = [t for t in run.boxes if t not in by_token]
    if missing:
        raise ValueError(f"{len(missing)} run sample(s) have no info record (e.g. {missing[:2]})")
    results = {t: to_nusc_results(t, b, s, lab, by_token[t]) for t, (b, s, lab) in run.boxes.items()}
    return save_results(results, path)


def _plain(value):
    """JSON-safe copy of a metrics dict: NaN (an undefined TP error) becomes null."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    return value


def write_metrics(metrics: dict, path: str | Path) -> Path:
    """Write the metrics summary (NDS, mAP, TP errors, per-class AP) as strict JSON (NaN -> null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_plain(metrics), indent=1, allow_nan=False))
    return path


def format_metrics(metrics: dict) -> str:
    """The devkit's summary as text: NDS, mAP, the five mean TP errors, then AP and errors per class."""
    def num(v):
        return "  nan" if v is None or v != v else f"{v:.4f}"

    lines = [f"NDS: {num(metrics['NDS'])}   mAP: {num(metrics['mAP'])}",
             "   ".join(f"{k}: {num(metrics.get(k))}" for k in ("mATE", "mASE", "mAOE", "mAVE", "mAAE"))]
    per_class = metrics.get("per_class") or {}
    if per_class:
        cols = ("trans_err", "scale_err", "orient_err", "vel_err", "attr_err")
        lines.append(f"{'class':<22}{'AP':>8}" + "".join(f"{c.split('_')[0][:6] + 'E':>9}" for c in cols))
        for name, row in per_class.items():
            lines.append(f"{name:<22}{num(row['AP']):>8}" + "".join(f"{num(row.get(c)):>9}" for c in cols))
    return "\n".join(lines)


def evaluate(
    model_name: str | None,
    data: str,
    *,
    engine: str | Path | None = None,
    checkpoint: str | None = None,
    allow_partial: bool = False,
    device: str | None = None,
    workers: int = 1,
    save_run: str | Path | None = None,
    score: bool = True,
    results_path: str | Path | None = None,
    model_overrides: dict | None = None,
    progress: bool = True,
    dist=None,
) -> dict | None:
    """Run ``model_name`` (random weights unless ``checkpoint``) or an ``engine`` file over ``data`` and score it.

    The model and an engine go through the same loop and the same scoring, so their numbers compare.
    ``results_path`` gets the nuScenes submission JSON. A test split (no annotations) is run and
    written but not scored. With ``dist`` (a :class:`bevdeploy.distributed.DistContext` of several
    processes) the scenes are split over the processes and rank 0 scores all boxes once; the other
    ranks return None.

    Returns a dict with ``NDS``, ``mAP`` and ``metrics`` (the full summary, when scored), ``fps`` (one forward's
    rate, median), ``throughput`` (frames per second of the whole pass, all processes together), ``wall_s``,
    ``processes``, ``frames``, ``device``, ``model``, ``data``, ``checkpoint``, ``engine``, ``results_path``.
    """
    from bevdeploy.data.synthetic import resolve_data_spec

    if engine is None and model_name is None:
        raise ValueError("say what to evaluate: a model name (--model) or an engine file (--engine)")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dist is not None and dist.enabled and dev.type == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
    # the model and its checkpoint, or the engine, before the data: a missing, corrupt or mismatched file is
    # reported at once, not after the dataset is rendered or read
    runner, model_name = model_or_engine(model_name, engine, dev, checkpoint=checkpoint, allow_partial=allow_partial,
                                         model_overrides=model_overrides)
    if engine is not None:
        checkpoint = runner.metadata.get("checkpoint")
    source = resolve_data_spec(data, workers=workers)
    infos = source.infos(progress=progress, spec=data)
    run = run_sharded(runner, infos, model_name, dev, dist, progress=progress)
    if run is None:
        return None
    if save_run:
        run.save(save_run)
    result = {"model": model_name, "data": data, "frames": len(run.latencies_ms), "fps": run.fps,
              "throughput": run.throughput, "wall_s": run.wall_s, "processes": run.processes, "device": str(dev),
              "checkpoint": checkpoint, "engine": None if engine is None else str(engine), "results_path": None}
    if results_path:
        result["results_path"] = str(write_results(run, infos, results_path))
    if score and source.version.endswith("test"):
        print(f"{source.version} has no annotations: not scored", file=sys.stderr)
    elif score:
        metrics = score_run(run, infos, source.dataroot, source.version, source.split)
        result.update(NDS=metrics["NDS"], mAP=metrics["mAP"], metrics=metrics)
    return result

"""``bevdeploy bench --model yolox-x|centernet-r18-dcn``: the reference system's 2D table on one GPU.

The BEV table's shape (:mod:`bevdeploy.eval.bench_models`) with COCO mAP instead of NDS: PyTorch
eager FP32 then each engine precision, all at one static batch (32, as the reference), FPS in images
per second (CUDA events around whole forwards after warm-up, median), engine MB, device memory in
use, COCO mAP (pycocotools) over the data, ``fidelity_map`` (the engine's detections scored with
the PyTorch model's confident detections as ground truth) and the worst output SQNR against PyTorch
on the timing batch.
"""

from __future__ import annotations

import datetime
import gc
import sys
from pathlib import Path

import torch

__all__ = ["bench_det2d"]


def _r(v: float | None) -> float | None:
    """Rounded for the table; None for a figure not measured (NaN, None)."""
    return None if v is None or v != v else round(float(v), 4)


def _data_spec(data: str) -> str:
    """The BEV default ``synthetic:N`` means the synthetic world's 2D views for a 2D model."""
    return "synthetic2d:" + data.split(":", 1)[1] if data.startswith("synthetic:") else data


def bench_det2d(
    name: str,
    precisions: list[str],
    *,
    data: str = "synthetic2d:64",
    calib: str | None = None,
    checkpoint: str | None = None,
    batch: int = 32,
    work_dir: str | Path = "out/engines",
    iters: int = 30,
    out_dir: str | Path = "bench/results",
    command: str = "",
    append: bool = False,
) -> Path:
    """The table for one 2D model at ``batch``; returns the JSON path (``<out_dir>/<gpu>/<name>.json``).

    Args:
        name: ``yolox-x`` or ``centernet-r18-dcn``.
        precisions: Engine precisions (the PyTorch row is always measured first).
        data: ``synthetic2d:N`` (``synthetic:N`` is read as that) or ``coco:PATH``: scored for mAP.
        calib: int8 calibration data (default: ``data``).
        checkpoint: Official checkpoint (random weights, seed 0, otherwise).
        batch: The static batch of every row (images per forward).
        work_dir: Where the engine files go.
        iters: Timed forwards per row.
        out_dir: Results root.
        command: Recorded in the results.
        append: Keep earlier runs' rows for precisions not measured now.
    """
    from bevdeploy.data.det2d import PIPELINES, load_batch, resolve_det2d_spec
    from bevdeploy.engine import Engine, build
    from bevdeploy.engine.deploy import precision_spec
    from bevdeploy.eval.bench_models import _ROW_KEYS, _device_memory_mb, earlier_rows, pth_size_mb, write_results
    from bevdeploy.eval.coco import coco_map, fidelity_map, run_det2d
    from bevdeploy.eval.timing import gpu_dirname, time_eager
    from bevdeploy.models import MODELS
    from bevdeploy.models.checkpoint import load_checkpoint
    from bevdeploy.quant.sensitivity import sqnr_db

    if not torch.cuda.is_available():
        raise RuntimeError("bevdeploy bench --model times engines on a CUDA GPU and none is visible here; on a CPU, "
                           "`bevdeploy eval --model NAME --data synthetic2d:N` runs the model")
    for precision in precisions:
        precision_spec(precision)
    data = _data_spec(data)
    source = resolve_det2d_spec(data)
    images = source.images()
    if not images:
        raise ValueError(f"data {data!r} holds no images")
    image_ids = [r["id"] for r in images]
    import importlib.util

    scored = importlib.util.find_spec("pycocotools") is not None
    if not scored:
        print("pycocotools is not installed: the rows get FPS, size, memory and SQNR but no mAP", file=sys.stderr)
    coco_gt = source.coco() if scored else None
    dev = torch.device("cuda")
    keep_rows = earlier_rows(Path(out_dir) / gpu_dirname() / f"{name}.json", set(precisions)) if append else []
    run_id = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    torch.manual_seed(0)
    model = MODELS[name]()
    if checkpoint:
        load_checkpoint(model, checkpoint)
    pth_mb = pth_size_mb(model)
    config = model.config
    timing_records = (images * (batch // len(images) + 1))[:batch]
    x, _ = load_batch(source, timing_records, PIPELINES[name], tuple(config.image_size))
    x = x.to(dev)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base_mem = _device_memory_mb()
    model = model.to(dev).eval()
    with torch.no_grad():
        ms = time_eager(lambda: model(x), iters=iters, warmup=3)
        ref_out = {k: v.detach().clone() for k, v in model(x).items()}
        mem = _device_memory_mb()
        ref_results, _ = run_det2d(model, source, name, config, batch=batch, device=dev)
    nan = dict.fromkeys(("mAP", "mAP_50"), float("nan"))
    metrics = coco_map(coco_gt, ref_results, image_ids) if scored else nan
    best = max((r["score"] for r in ref_results), default=0.0)
    threshold = min(0.3, 0.5 * best)  # random weights score low: keep the reference's most confident boxes
    row = dict.fromkeys(_ROW_KEYS)
    row.update(model=name, precision="pytorch", batch=batch, fps=round(1000.0 * batch / ms, 2), fps_ratio=1.0,
               engine_mb=round(pth_mb, 1), size_ratio=1.0, memory_mb=round(mem, 1), memory_ratio=1.0,
               map=_r(metrics["mAP"]), map_50=_r(metrics["mAP_50"]), latency_ms=round(ms, 3),
               peak_allocated_mb=round(torch.cuda.max_memory_allocated() / 2**20, 1),
               memory_before_model_mb=round(base_mem, 1), fidelity_threshold=round(threshold, 4),
               images=len(images), data=data, note="engine_mb = the .pth of the state dict; fps = images/s",
               run=run_id)
    rows = [row]
    print(f"{name} pytorch: {row['fps']} images/s, mAP {row['map']}", file=sys.stderr)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    for precision in precisions:
        path = work / f"{name}-b{batch}-{precision}.engine"
        build(name, precision, out=path, checkpoint=checkpoint, batch=batch,
              calib=_data_spec(calib or data) if precision.startswith("int8") else None)
        gc.collect()
        torch.cuda.empty_cache()
        engine = Engine.load(path, device="cuda")
        ms = time_eager(lambda: engine(image=x), iters=iters, warmup=3)
        mem = _device_memory_mb()
        out = engine(image=x)
        sqnr = {k: round(sqnr_db(ref_out[k], out[k]), 1) for k in engine.output_names}
        results, _ = run_det2d(lambda im: engine(image=im), source, name, config, batch=batch, device=dev)
        m = coco_map(coco_gt, results, image_ids) if scored else nan
        fid = fidelity_map(results, ref_results, image_ids, images, threshold) if scored else float("nan")
        fps = 1000.0 * batch / ms
        r = dict.fromkeys(_ROW_KEYS)
        r.update(model=name, precision=precision, batch=batch, fps=round(fps, 2), fps_ratio=round(fps / row["fps"], 2),
                 engine_mb=round(engine.file_mb, 1), size_ratio=round(engine.file_mb / pth_mb, 3),
                 memory_mb=round(mem, 1), memory_ratio=round(mem / row["memory_mb"], 3), map=_r(m["mAP"]),
                 map_50=_r(m["mAP_50"]), map_change=_r(m["mAP"] - metrics["mAP"]),
                 fidelity_map=_r(fid), latency_ms=round(ms, 3), output_sqnr_db=min(sqnr.values()),
                 output_sqnr_db_each=sqnr,
                 int8_layers=sum(1 for _, p in engine.layer_precisions if p == "int8") if precision.startswith("int8") else None,
                 run=run_id)
        rows.append(r)
        print(f"{name} {precision}: {r['fps']} images/s ({r['fps_ratio']}x), {r['engine_mb']} MB, mem {r['memory_mb']} MB, "
              f"mAP {r['map']}, fidelity mAP {r['fidelity_map']}, SQNR {r['output_sqnr_db']} dB", file=sys.stderr)
        del engine, out
        gc.collect()
        torch.cuda.empty_cache()
        write_results(name, rows, out_dir, command, keep_rows)  # a run cut short keeps what it measured
    return write_results(name, rows, out_dir, command, keep_rows)

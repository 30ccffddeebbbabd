"""``bevdeploy bench --model yolox-x|centernet-r18-dcn``: the reference system's 2D table on one GPU.

The BEV table's shape (:mod:`bevdeploy.eval.bench_models`) with COCO mAP instead of NDS: PyTorch
eager FP32 then each engine precision, all at one static batch (32, as the reference), FPS in images
per second (CUDA events around whole forwards after warm-up, median), engine MB, device memory in
use, COCO mAP (pycocotools) over the data, ``fidelity_map`` (the engine's detections scored with
the PyTorch model's confident detections as ground truth) and the worst output SQNR against PyTorch
on the timing batch.

The accuracy flow (:mod:`bevdeploy.eval.accuracy`, 2D models) calls :func:`bench_det2d` with trained
weights, the held-out set, calibration on training images and ``results_name="accuracy-<model>"``.
"""

from __future__ import annotations

import datetime
import gc
import sys
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["bench_det2d", "fused_jobs"]


def _r(v: float | None) -> float | None:
    """Rounded for the table; None for a figure not measured (NaN, None)."""
    return None if v is None or v != v else round(float(v), 4)


def _median_ms(fn, device: torch.device, iters: int) -> float:
    """Median ms per call: CUDA events on a GPU (:func:`bevdeploy.eval.timing.time_eager`), wall clock on a CPU."""
    if device.type == "cuda":
        from bevdeploy.eval.timing import time_eager

        return time_eager(fn, iters=iters, warmup=3)
    import statistics
    import time

    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(1000.0 * (time.perf_counter() - t0))
    return statistics.median(times)


def _median_ms_without_tf32(fn, device: torch.device, iters: int) -> float:
    """:func:`_median_ms` with TF32 off for cuDNN convs and cuBLAS matmuls (strict FP32); restores the flags."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return _median_ms(fn, device, iters)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


#: A checkpoint whose PyTorch FP32 mAP is below this gets a warning on top of its table: near-zero detections
#: change little under any rounding, so the engines' dmap bounds almost nothing (a CenterNet at mAP 0.030 "met"
#: the int8 target with d -0.0004 on 2026-12-07; its next, trained checkpoint at 0.109 gave d -0.0022).
WEAK_MAP = 0.05


def fused_jobs(precisions) -> list[tuple[str, str, dict]]:
    """``extra_jobs`` of :func:`bench_det2d` for a "<precision> (fused)" row of each precision
    (``build(fused_epilogues=True)``)."""
    return [(f"{p} (fused)", p, {"fused_epilogues": True}) for p in precisions]


def bench_det2d(
    name: str,
    precisions: list[str],
    *,
    data="synthetic2d:64",
    calib=None,
    checkpoint: str | None = None,
    batch: int = 32,
    work_dir: str | Path = "out/engines",
    iters: int = 30,
    out_dir: str | Path = "bench/results",
    command: str = "",
    append: bool = False,
    model_overrides: dict | None = None,
    device: str | None = None,
    results_name: str | None = None,
    extra: dict | None = None,
    notes: list[str] | None = None,
    int8_options: dict | None = None,
    extra_jobs: list[tuple[str, str, dict]] | None = None,
    float_controls: list[tuple[str, Callable]] | None = None,
) -> Path:
    """The table for one 2D model at ``batch``; returns the JSON path (``<out_dir>/<gpu>/<name>.json``).

    Args:
        name: ``yolox-x`` or ``centernet-r18-dcn``.
        precisions: Engine precisions (the PyTorch row is always measured first).
        data: ``synthetic2d:N[@SEED]`` (``synthetic:N`` is read as that), ``coco:PATH`` or a
            :class:`bevdeploy.data.det2d.CocoSet`: scored for mAP.
        calib: int8 calibration data, a spec or a ``CocoSet`` (default: ``data``).
        checkpoint: Official checkpoint (random weights, seed 0, otherwise).
        batch: The static batch of every row (images per forward).
        work_dir: Where the engine files go.
        iters: Timed forwards per row.
        out_dir: Results root.
        command: Recorded in the results.
        append: Keep earlier runs' rows for precisions not measured now.
        model_overrides: Config overrides of the model and every engine (e.g. the ``image_size`` a
            checkpoint was trained at; reduced models in tests).
        device: ``cuda`` (default) or ``cpu`` (tests of the rows: wall-clock timing, no memory figures).
        results_name: File stem of the results (default ``name``).
        extra: More top-level entries of the results JSON (e.g. the training budget).
        notes: Paragraphs of the markdown above the table.
        int8_options: More ``build`` arguments of the int8* rows (``smooth_alpha``, ``keep_float_below_db``),
            recorded in those rows.
        extra_jobs: More rows after ``precisions``: ``(label, precision, build arguments)``, e.g.
            ``("int8-fp16 (QAT)", "int8-fp16", {"qat_steps": 300, "qat_data": train_set})``; the row is
            named ``label`` and records the scalar arguments (and the QAT losses of the engine).
        float_controls: More float rows right after the PyTorch row, scored in PyTorch eager like it (no
            timing): ``(label, make)`` with ``make(device) -> (model, info)``, e.g. the checkpoint fine-tuned
            with a QAT row's recipe without fake quantization (the control that row is judged against);
            ``info``'s entries go into the row.
    """
    from bevdeploy.data.det2d import PIPELINES, CocoSet, as_2d_spec, load_batch, resolve_det2d_spec
    from bevdeploy.engine import Engine, build
    from bevdeploy.engine.deploy import precision_spec
    from bevdeploy.eval.bench_models import (_ROW_KEYS, _device_memory_mb, earlier_rows, nonfinite_note, pth_size_mb,
                                              write_results)
    from bevdeploy.eval.coco import coco_map, fidelity_map, run_det2d
    from bevdeploy.eval.timing import gpu_dirname
    from bevdeploy.models import MODELS
    from bevdeploy.models.checkpoint import load_checkpoint
    from bevdeploy.quant.sensitivity import sqnr_db

    dev = torch.device(device or "cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("bevdeploy bench --model times engines on a CUDA GPU and none is visible here; on a CPU, "
                           "`bevdeploy eval --model NAME --data synthetic2d:N` runs the model")
    on_gpu = dev.type == "cuda"
    for precision in precisions:
        precision_spec(precision)
    data = as_2d_spec(data)
    source = data if isinstance(data, CocoSet) else resolve_det2d_spec(data)
    data_label = source.spec or str(source.ann_file.parent.parent)
    images = source.images()
    if not images:
        raise ValueError(f"data {data_label!r} holds no images")
    image_ids = [r["id"] for r in images]
    import importlib.util

    scored = importlib.util.find_spec("pycocotools") is not None
    if not scored:
        print("pycocotools is not installed: the rows get FPS, size, memory and SQNR but no mAP", file=sys.stderr)
    coco_gt = source.coco() if scored else None
    results_name = results_name or name
    keep_rows = (earlier_rows(Path(out_dir) / (gpu_dirname() if on_gpu else "cpu") / f"{results_name}.json",
                              set(precisions) | {job[0] for job in extra_jobs or []}) if append else [])
    run_id = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    def settle() -> None:
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()

    torch.manual_seed(0)
    model = MODELS[name](**(model_overrides or {}))
    if checkpoint:
        load_checkpoint(model, checkpoint)
    pth_mb = pth_size_mb(model)
    config = model.config
    timing_records = (images * (batch // len(images) + 1))[:batch]
    x, _ = load_batch(source, timing_records, PIPELINES[name], tuple(config.image_size))
    x = x.to(dev)
    settle()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    base_mem = _device_memory_mb() if on_gpu else None
    model = model.to(dev).eval()
    with torch.no_grad():
        ms = _median_ms(lambda: model(x), dev, iters)
        ref_out = {k: v.detach().clone() for k, v in model(x).items()}
        mem = _device_memory_mb() if on_gpu else None
        peak = torch.cuda.max_memory_allocated() / 2**20 if on_gpu else None
        # torch's defaults (what a user's eager FP32 runs): cuDNN convs in TF32, matmuls in FP32. The same
        # forward with TF32 off is strict FP32, the other baseline a reader may mean by "PyTorch FP32".
        # Timed after the memory reading: its cuDNN workspaces would inflate PyTorch's memory (H100: 8.9 GB
        # instead of 5.0 GB for YOLOX-x at batch 32).
        ms_strict = _median_ms_without_tf32(lambda: model(x), dev, iters) if on_gpu else None
        ref_results, _ = run_det2d(model, source, name, config, batch=batch, device=dev)
    nan = dict.fromkeys(("mAP", "mAP_50"), float("nan"))
    metrics = coco_map(coco_gt, ref_results, image_ids) if scored else nan
    best = max((r["score"] for r in ref_results), default=0.0)
    threshold = min(0.3, 0.5 * best)  # random weights score low: keep the reference's most confident boxes
    row = dict.fromkeys(_ROW_KEYS)
    row.update(model=name, precision="pytorch", batch=batch, fps=round(1000.0 * batch / ms, 2), fps_ratio=1.0,
               engine_mb=round(pth_mb, 1), size_ratio=1.0, memory_mb=_r1(mem), memory_ratio=1.0 if on_gpu else None,
               map=_r(metrics["mAP"]), map_50=_r(metrics["mAP_50"]), latency_ms=round(ms, 3),
               peak_allocated_mb=_r1(peak),
               memory_before_model_mb=_r1(base_mem), fidelity_threshold=round(threshold, 4),
               images=len(images), data=data_label, image_size=list(config.image_size),
               tf32_convs=torch.backends.cudnn.allow_tf32 if on_gpu else None,
               fps_no_tf32=round(1000.0 * batch / ms_strict, 2) if ms_strict else None,
               note="engine_mb = the .pth of the state dict; fps = images/s", run=run_id)
    rows = [row]
    print(f"{name} pytorch: {row['fps']} images/s, mAP {row['map']}", file=sys.stderr)
    if checkpoint and row["map"] is not None and row["map"] < WEAK_MAP:
        warning = (f"WEAK WEIGHTS: PyTorch FP32 scores mAP {row['map']} (below {WEAK_MAP}) on {data_label}; the "
                   "engines' dmap on these weights says little about their accuracy on a trained model (train longer, "
                   "or read the training log).")
        notes = [warning, *(notes or [])]
        print(f"{name}: {warning}", file=sys.stderr)
    if on_gpu:
        notes = [*(notes or []), "fps is the engine called as `engine(image=x)` (the batch copied into the CUDA "
                 "graph's input, the outputs copied out as float32); fps_bound is the graph alone on its own buffers "
                 "(`Engine.bindings()` + `replay()`, the serving loop of TensorRT's bindings), fps_ratio_bound its "
                 "ratio to PyTorch. The PyTorch row is the model's forward on the batch, with no copies either way."]
    write = lambda: write_results(results_name, rows, out_dir, command, keep_rows, extra=extra, notes=notes)  # noqa: E731
    write()  # a run cut during the first engine's build keeps the PyTorch row (its mAP is the baseline)
    del model
    settle()
    for label, make in float_controls or []:
        try:
            control, info = make(dev)
            with torch.no_grad():
                results, _ = run_det2d(control.eval(), source, name, config, batch=batch, device=dev)
        except Exception as e:  # the control failing must not cost the engine rows
            print(f"{name} {label}: FAILED {type(e).__name__}: {e}", file=sys.stderr)
            rows.append({"model": name, "precision": label, "batch": batch, "run": run_id,
                         "error": f"{type(e).__name__}: {str(e)[:300]}"})
            write()
            continue
        m = coco_map(coco_gt, results, image_ids) if scored else nan
        r = dict.fromkeys(_ROW_KEYS)
        r.update(model=name, precision=label, batch=batch, map=_r(m["mAP"]), map_50=_r(m["mAP_50"]),
                 dmap=_r(m["mAP"] - metrics["mAP"]),
                 fidelity_map=_r(fidelity_map(results, ref_results, image_ids, images, threshold) if scored else nan),
                 run=run_id, **info)
        rows.append(r)
        print(f"{name} {label}: mAP {r['map']} (d {r['dmap']})", file=sys.stderr)
        del control
        settle()
        write()
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    jobs = [(p, p, {}) for p in precisions] + list(extra_jobs or [])
    for label, precision, job_args in jobs:
        path = work / f"{name}-b{batch}-{label.replace(' ', '').replace('(', '-').replace(')', '')}.engine"
        int8 = precision.startswith("int8")
        options = {**((int8_options or {}) if int8 else {}), **job_args}  # a row's own arguments win
        try:
            build(name, precision, out=path, checkpoint=checkpoint, batch=batch, model_overrides=model_overrides,
                  device=dev.type, progress=False, calib=as_2d_spec(calib or data) if int8 else None, **options)
            settle()
            engine = Engine.load(path, device=dev.type)
            ms = _median_ms(lambda: engine(image=x), dev, iters)
            ms_bound = _bound_ms(engine, x, dev, iters) if on_gpu else None
            mem = _device_memory_mb() if on_gpu else None
            out = engine(image=x)
            # identical outputs give inf dB: capped so the JSON stays strict (JSON has no Infinity)
            sqnr = {k: round(min(sqnr_db(ref_out[k].float(), out[k].float()), 300.0), 1) for k in engine.output_names}
            results, _ = run_det2d(lambda im: engine(image=im), source, name, config, batch=batch, device=dev)
        except Exception as e:  # one precision failing must not cost the other rows
            print(f"{name} {label}: FAILED {type(e).__name__}: {e}", file=sys.stderr)
            rows.append({"model": name, "precision": label, "batch": batch, "run": run_id,
                         "error": f"{type(e).__name__}: {str(e)[:300]}"})
            settle()
            write()
            continue
        m = coco_map(coco_gt, results, image_ids) if scored else nan
        fid = fidelity_map(results, ref_results, image_ids, images, threshold) if scored else float("nan")
        fps = 1000.0 * batch / ms
        r = dict.fromkeys(_ROW_KEYS)
        r.update(model=name, precision=label, batch=batch, fps=round(fps, 2), fps_ratio=round(fps / row["fps"], 2),
                 fps_ratio_no_tf32=round(fps / row["fps_no_tf32"], 2) if row["fps_no_tf32"] else None,
                 engine_mb=round(engine.file_mb, 1), size_ratio=round(engine.file_mb / pth_mb, 3),
                 memory_mb=_r1(mem), memory_ratio=round(mem / row["memory_mb"], 3) if on_gpu else None,
                 map=_r(m["mAP"]), map_50=_r(m["mAP_50"]), dmap=_r(m["mAP"] - metrics["mAP"]),
                 fidelity_map=_r(fid), latency_ms=round(ms, 3), output_sqnr_db=min(sqnr.values()),
                 fps_bound=round(1000.0 * batch / ms_bound, 2) if ms_bound else None,
                 fps_ratio_bound=round(1000.0 * batch / ms_bound / row["fps"], 2) if ms_bound else None,
                 output_sqnr_db_each=sqnr,
                 int8_layers=sum(1 for _, p in engine.layer_precisions if p == "int8") if precision.startswith("int8") else None,
                 # the int8 chain's reach: layers writing int8 for the next; smoothed layers reading int8 codes
                 int8_writers=len(engine.metadata.get("int8_outputs") or []) if int8 else None,
                 smoothing_folded=(len(engine.metadata.get("smoothing_folded") or [])
                                   if engine.metadata.get("smoothed_layers") else None),
                 bias_correction_layers=(len(engine.metadata["bias_correction"])
                                         if engine.metadata.get("bias_correction") is not None else None),
                 **{k: v for k, v in options.items() if v is not None and isinstance(v, (int, float, str))},
                 **({"qat_loss_first": round(q["loss_first"], 4), "qat_loss_last": round(q["loss_last"], 4)}
                    if (q := engine.metadata.get("qat")) else {}),
                 run=run_id, note=nonfinite_note(name, label, out))
        rows.append(r)
        bound = f" (graph alone {r['fps_bound']}, {r['fps_ratio_bound']}x)" if r["fps_bound"] else ""
        print(f"{name} {label}: {r['fps']} images/s ({r['fps_ratio']}x){bound}, {r['engine_mb']} MB, "
              f"mem {r['memory_mb']} MB, "
              f"mAP {r['map']} (d {r['dmap']}), fidelity mAP {r['fidelity_map']}, SQNR {r['output_sqnr_db']} dB",
              file=sys.stderr)
        del engine, out
        settle()
        write()  # a run cut short keeps what it measured
    return write()


def _bound_ms(engine, x: torch.Tensor, device: torch.device, iters: int) -> float:
    """Median ms of the engine's CUDA graph alone, the batch written once into its input binding and the outputs
    left in its own buffers (:meth:`~bevdeploy.engine.Engine.bindings`): a serving loop that decodes into the
    binding, as TensorRT's. A call adds the input copy and the float32 copies of the outputs (CenterNet's batch-32
    heatmaps: 84 MB)."""
    inputs, _ = engine.bindings()
    inputs["image"].copy_(x)
    return _median_ms(engine.replay, device, iters)


def _r1(v: float | None) -> float | None:
    return None if v is None else round(float(v), 1)

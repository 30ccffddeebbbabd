"""Accuracy of every precision on trained weights: train on one synthetic world, score on another.

``python -m bevdeploy.eval.accuracy --model M --stage all`` (``scripts/gpu_accuracy.sh M`` on the GPU):

1. ``--stage train``: render the training world (``--train-data``, default ``synthetic:600@1``) and
   the held-out world (``--eval-data``, default ``synthetic:120@2``: other seed, so other scenes and
   tokens) in parallel processes, train the model from scratch with a fixed seed
   (:func:`bevdeploy.train.train_model`) within ``--train-seconds`` (the cosine schedule is fitted
   to the steps that fit, measured after 25 steps) and write ``<work-dir>/<model>.pth``;
2. ``--stage eval``: with that checkpoint, PyTorch FP32 and every engine precision (``fp32 fp16
   fp16x2 int8 int8-fp16``, int8 calibrated on training frames; plus ``int8-fp16 (QAT)`` with
   ``--qat-steps``) run over the held-out world in temporal order and are scored with the devkit's
   metrics (NDS, mAP, the five TP errors), against PyTorch FP32 (dNDS, dmAP), against PyTorch's own
   boxes (fidelity NDS, :func:`bevdeploy.eval.nuscenes.fidelity_metrics`) and by the raw outputs'
   SQNR on a held-out frame; results in ``<out>/<gpu>/accuracy-<model>.{json,md}``.

The stages share ``--work-dir`` (worlds, checkpoint, engines), so they can run as two device calls
on one warm machine; ``--stage all`` runs both. Same flags, same seed: same numbers.

2D models (``yolox-x``, ``centernet-r18-dcn``): the same two stages on the synthetic 2D views
(``--train-data synthetic2d:600@1``, ``--eval-data synthetic2d:120@2``: other seed, so other scenes
and image ids), trained with the official losses (YOLOX: SimOTA; CenterNet: gaussian focal + L1) at
``--image-size`` (default: the official canvas); the eval stage is the 2D bench
(:func:`bevdeploy.eval.bench_det2d.bench_det2d`) on the trained checkpoint: PyTorch FP32 eager and
every engine at ``--eval-batch`` (32, the reference's) in images/s, COCO mAP (pycocotools) on the
held-out views, dmap vs PyTorch FP32, fidelity mAP and output SQNR, int8 calibrated on the first
``--calib-frames`` training images; results in ``<out>/<gpu>/accuracy-<model>.{json,md}``.
Why the bench and not the BEV eval below: the 2D rows (batch-32 timing, pycocotools, fidelity mAP)
already exist there, and the BEV eval's temporal frame loop and devkit metrics do not apply.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

#: The engine precisions scored by default (the table of the issue).
DEFAULT_PRECISIONS = ("fp32", "fp16", "fp16x2", "int8", "int8-fp16")
#: 2D models: the issue's rows, most wanted first (each row is written when done: a cut run keeps them).
DET2D_PRECISIONS = ("fp16", "int8-fp16", "fp16x2", "int8")
#: 2D training / held-out sets (images of the synthetic world's cameras, 360x640).
DET2D_TRAIN_DATA, DET2D_EVAL_DATA = "synthetic2d:600@1", "synthetic2d:120@2"
#: The row of a QAT table's float control (:func:`_float_control`) and the table's note on it.
CONTROL_LABEL = "pytorch (float control)"
CONTROL_NOTE = ("The pytorch (float control) row: the checkpoint fine-tuned with the QAT rows' recipe ({steps} steps x "
                "batch {batch}, lr {lr}, the same data and batches, BatchNorm folded as for QAT) without fake "
                "quantization, scored in PyTorch FP32: what the extra training alone gives. A QAT row's change minus "
                "the control's is what int8 costs after QAT.")
QAT_PRECISION = "int8-fp16"
_METRICS = ("NDS", "mAP", "mATE", "mASE", "mAOE", "mAVE", "mAAE")


def _render_sets(args, progress: bool):
    """Render (or reuse) the training and held-out sets in parallel processes: the BEV worlds
    (``synthetic:N@SEED``) or, for the 2D models, their views (``synthetic2d:N@SEED``)."""
    from bevdeploy.train import is_det2d

    if is_det2d(args.model):
        from bevdeploy.data.det2d import resolve_det2d_spec as resolve
    else:
        from bevdeploy.data.synthetic import resolve_data_spec as resolve

    kw = dict(cache_dir=Path(args.work_dir) / "worlds", image_size=tuple(args.render_size), workers=args.workers,
              progress=progress)
    t0 = time.perf_counter()
    train, held_out = resolve(args.train_data, **kw), resolve(args.eval_data, **kw)
    return train, held_out, time.perf_counter() - t0


def checkpoint_path(args) -> Path:
    return Path(args.work_dir) / f"{args.model}.pth"


def _det2d_overrides(args) -> dict | None:
    """Model config overrides of a 2D run: ``--model-overrides`` plus ``--image-size``."""
    overrides = dict(args.model_overrides or {})
    if args.image_size is not None:
        overrides["image_size"] = tuple(args.image_size)
    return overrides or None


def stage_train(args) -> Path:
    """Render both worlds and train; returns the checkpoint (its meta holds the training budget)."""
    from bevdeploy.train import is_det2d, train_model

    if is_det2d(args.model):
        _, _, t_render = _render_sets(args, progress=True)
        print(f"[accuracy] 2D sets ready in {t_render:.0f} s", file=sys.stderr)
        return train_model(args.model, args.train_data, steps=args.steps, batch=args.batch, out=checkpoint_path(args),
                           lr=args.lr, warmup=args.warmup, seed=args.seed, workers=args.workers,
                           render_size=tuple(args.render_size), model_overrides=_det2d_overrides(args),
                           cache_dir=Path(args.work_dir) / "worlds",
                           extra_meta={"render_seconds_both_worlds": round(t_render, 1), "command": args.command,
                                       "train_seconds": args.train_seconds},
                           time_limit=args.train_seconds if args.train_seconds > 0 else None)
    _, _, t_render = _render_sets(args, progress=True)
    print(f"[accuracy] worlds ready in {t_render:.0f} s", file=sys.stderr)
    options = {"depth_weight": args.depth_weight} if args.depth_weight is not None else None
    return train_model(args.model, args.train_data, steps=args.steps, batch=args.batch, out=checkpoint_path(args),
                       lr=args.lr, warmup=args.warmup, seed=args.seed, workers=args.workers, render_size=tuple(args.render_size),
                       model_overrides=args.model_overrides, training_options=options,
                       cache_dir=Path(args.work_dir) / "worlds",
                       extra_meta={"render_seconds_both_worlds": round(t_render, 1), "command": args.command},
                       time_limit=args.train_seconds if args.train_seconds > 0 else None)


class _Capture:
    """Keeps the keyword inputs of one call of the wrapped forward (the held-out frame for SQNR)."""

    def __init__(self, index: int):
        self.index, self.calls, self.inputs = index, 0, None

    def hook(self, module, args, kwargs):
        if self.calls == self.index:
            self.inputs = {k: v.detach().clone() for k, v in kwargs.items()}
        self.calls += 1


def _rounded(x: float | None, digits: int = 2) -> float | None:
    return None if x is None else round(float(x), digits)


def _row(precision: str, metrics: dict, ref: dict | None) -> dict:
    row = {"precision": precision, "nds": round(float(metrics["NDS"]), 4), "map": round(float(metrics["mAP"]), 4)}
    row.update({k: round(float(metrics[k]), 4) for k in _METRICS[2:]})
    if ref is not None:
        row["dnds"] = round(row["nds"] - ref["nds"], 4)
        row["dmap"] = round(row["map"] - ref["map"], 4)
    return row


def stage_eval(args) -> Path:
    """Build every precision from the checkpoint, score all on the held-out world, write the table."""
    import inspect

    from bevdeploy.data.synthetic import DataSource
    from bevdeploy.engine import Engine, build
    from bevdeploy.eval.bench_models import fidelity_threshold, results_records
    from bevdeploy.eval.detection import run_model, score_run
    from bevdeploy.eval.nuscenes import fidelity_metrics
    from bevdeploy.models import MODELS
    from bevdeploy.models.checkpoint import load_checkpoint
    from bevdeploy.quant.sensitivity import sqnr_db

    ckpt = checkpoint_path(args)
    if not ckpt.is_file():
        raise FileNotFoundError(f"no checkpoint {ckpt}: run --stage train first (same --work-dir)")
    meta = torch.load(ckpt, map_location="cpu", weights_only=True).get("meta", {})
    meta["checkpoint_sha256"] = hashlib.sha256(ckpt.read_bytes()).hexdigest()[:16]
    overrides = meta.get("model_overrides") or args.model_overrides or None
    train_src, eval_src, _ = _render_sets(args, progress=False)
    infos = eval_src.infos()
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def score(run):
        return score_run(run, infos, eval_src.dataroot, eval_src.version, eval_src.split)

    torch.manual_seed(0)
    model = MODELS[args.model](**(overrides or {}))
    load_checkpoint(model, ckpt)
    model = model.to(dev).eval()
    capture = _Capture(min(1, len(infos) - 1))  # frame 1: BEVFormer then runs with a previous BEV
    handle = model.register_forward_pre_hook(capture.hook, with_kwargs=True)
    t0 = time.perf_counter()
    ref_run = run_model(model, infos, args.model, dev, progress=False)
    handle.remove()
    with torch.no_grad():
        ref_out = {k: v.detach().float().clone() for k, v in model(**capture.inputs).items()}
    ref_metrics = score(ref_run)
    ref_records = results_records(ref_run, infos)
    threshold = fidelity_threshold(ref_records)
    pytorch = _row("pytorch", ref_metrics, None)
    pytorch.update(fidelity_nds=None, output_sqnr_db=None, seconds=round(time.perf_counter() - t0, 1),
                   fps=_rounded(ref_run.fps), fps_ratio=1.0)
    rows = [pytorch]
    print(f"[accuracy] PyTorch FP32: NDS {pytorch['nds']}, mAP {pytorch['map']}", file=sys.stderr)
    del model
    gc.collect()
    qat_data = DataSource(train_src.dataroot, train_src.version, train_src.split, args.qat_frames)
    if args.qat_steps:  # the QAT row's control: the same fine-tuning in float, scored like the PyTorch row
        t0 = time.perf_counter()
        try:
            control, info = _float_control(args, ckpt, overrides, qat_data, dev)
            control_run = run_model(control, infos, args.model, dev, progress=False)
        except Exception as e:  # noqa: BLE001  (the control failing must not cost the engine rows)
            print(f"[accuracy] {CONTROL_LABEL}: FAILED {type(e).__name__}: {e}", file=sys.stderr)
            rows.append({"precision": CONTROL_LABEL, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        else:
            row = _row(CONTROL_LABEL, score(control_run), pytorch)
            row.update(fidelity_nds=round(float(fidelity_metrics(results_records(control_run, infos), ref_records,
                                                                 score_threshold=threshold)["NDS"]), 4),
                       **dict(info, seconds=round(time.perf_counter() - t0, 1)))
            rows.append(row)
            print(f"[accuracy] {CONTROL_LABEL}: NDS {row['nds']} (d {row['dnds']:+.4f})", file=sys.stderr)
            del control
        gc.collect()

    calib = DataSource(train_src.dataroot, train_src.version, train_src.split, args.calib_frames)
    build_kw = dict(checkpoint=str(ckpt), model_overrides=overrides, device=dev.type, progress=False)
    if args.calib_method:
        build_kw["calib_method"] = args.calib_method
    jobs = [(p, p, {}) for p in args.precisions]
    if args.qat_steps:
        if "qat_steps" in inspect.signature(build).parameters:
            qat_job = (f"{QAT_PRECISION} (QAT)", QAT_PRECISION,
                       {"qat_steps": args.qat_steps, "qat_data": qat_data, "qat_batch": args.qat_batch,
                        "qat_lr": args.qat_lr})
            # right after its PTQ row: the two rows the QAT target compares come first in a cut run
            at = next((i + 1 for i, (label, _, _) in enumerate(jobs) if label == QAT_PRECISION), len(jobs))
            jobs.insert(at, qat_job)
        else:
            print("[accuracy] this build has no QAT (build() takes no qat_steps): QAT row skipped", file=sys.stderr)
    if args.asymmetric:  # right after the symmetric PTQ row it is compared with
        at = next((i + 1 for i, (label, _, _) in enumerate(jobs) if label == QAT_PRECISION), len(jobs))
        jobs.insert(at, (f"{QAT_PRECISION} (asymmetric)", QAT_PRECISION, {"asymmetric": True}))
    if args.int8_dcn:  # after the int8 rows: the same engine with its DCNv2 convs int8 too
        at = max((i + 1 for i, (_, p, _) in enumerate(jobs) if p == QAT_PRECISION), default=len(jobs))
        jobs.insert(at, (f"{QAT_PRECISION} (int8 DCN)", QAT_PRECISION, {"int8_dcn": True}))
    kept = _earlier_rows(args, meta["checkpoint_sha256"], {label for label, _, _ in jobs}) if args.keep_rows else []
    work = Path(args.work_dir) / "engines"
    for label, precision, extra in jobs:
        t0 = time.perf_counter()
        path = work / f"{args.model}-{label.replace(' ', '').replace('(', '-').replace(')', '')}.engine"
        quantized = precision.startswith(("int8", "fp8"))
        chain_error = None
        try:
            try:
                build(args.model, precision, out=path, calib=calib if quantized else None, **build_kw, **extra)
                engine = Engine.load(path, device=dev)
                run = run_model(engine, infos, args.model, dev, progress=False)
            except Exception as e:
                if not precision.startswith("int8"):
                    raise
                # the int8 chain is the newest path: score the per-layer int8 form rather than nothing
                chain_error = f"{type(e).__name__}: {str(e)[:300]}"
                print(f"[accuracy] {label}: int8 chain failed ({chain_error}); retrying without it", file=sys.stderr)
                build(args.model, precision, out=path, calib=calib, int8_chain=False, **build_kw, **extra)
                engine = Engine.load(path, device=dev)
                run = run_model(engine, infos, args.model, dev, progress=False)
        except Exception as e:  # one precision failing must not cost the other rows
            print(f"[accuracy] {label}: FAILED {type(e).__name__}: {e}", file=sys.stderr)
            rows.append({"precision": label, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            write_accuracy(args, rows + kept, meta, threshold)
            continue
        with torch.no_grad():
            out = engine(**capture.inputs)
        sqnr = {k: round(sqnr_db(ref_out[k], out[k].float()), 1) for k in engine.output_names if k in ref_out}
        m = score(run)
        fid = fidelity_metrics(results_records(run, infos), ref_records, score_threshold=threshold)
        row = _row(label, m, pytorch)
        row.update(fps=_rounded(run.fps), fps_ratio=_rounded(run.fps / ref_run.fps if run.fps and ref_run.fps else None),
                   fidelity_nds=round(float(fid["NDS"]), 4), output_sqnr_db=min(sqnr.values()) if sqnr else None,
                   output_sqnr_db_each=sqnr, seconds=round(time.perf_counter() - t0, 1))
        if precision.startswith("int8"):
            row["int8_layers"] = sum(1 for _, p in engine.layer_precisions if p == "int8")
            row["asymmetric"] = bool(extra.get("asymmetric"))
            row["int8_dcn"] = bool(extra.get("int8_dcn"))
            row["int8_chain"] = chain_error is None
            if chain_error:
                row["chain_error"] = chain_error
        rows.append(row)
        print(f"[accuracy] {label}: NDS {row['nds']} (d {row['dnds']:+.4f}), mAP {row['map']} (d {row['dmap']:+.4f}), "
              f"fidelity NDS {row['fidelity_nds']}, SQNR {row['output_sqnr_db']} dB", file=sys.stderr)
        del engine, out
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        write_accuracy(args, rows + kept, meta, threshold)  # after every row: a cut run keeps its rows
    return write_accuracy(args, rows + kept, meta, threshold)


def stage_eval_det2d(args) -> Path:
    """2D models: the bench table (:func:`bevdeploy.eval.bench_det2d.bench_det2d`) of the trained checkpoint
    on the held-out set, int8 calibrated on training images; ``<out>/<gpu>/accuracy-<model>.{json,md}``."""
    from bevdeploy.data.det2d import CocoSet
    from bevdeploy.engine.model_io import default_calibration_method
    from bevdeploy.eval.bench_det2d import bench_det2d, fused_jobs

    ckpt = checkpoint_path(args)
    if not ckpt.is_file():
        raise FileNotFoundError(f"no checkpoint {ckpt}: run --stage train first (same --work-dir)")
    meta = torch.load(ckpt, map_location="cpu", weights_only=True).get("meta", {})
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()[:16]
    # the size the weights were trained at (recorded in the checkpoint) is the size they are scored at
    overrides = meta.get("model_overrides") or _det2d_overrides(args)
    if overrides and "image_size" in overrides:
        overrides = dict(overrides, image_size=tuple(overrides["image_size"]))
    trained_size = (overrides or {}).get("image_size")
    if args.image_size is not None and tuple(args.image_size) != (trained_size or ()):
        raise ValueError(f"--image-size {tuple(args.image_size)}: the checkpoint was trained at "
                         f"{trained_size or 'the official size'}; score it there (drop --image-size)")
    train_set, eval_set, _ = _render_sets(args, progress=False)
    n_calib = min(args.calib_frames, len(train_set.images()))
    calib = CocoSet(train_set.ann_file, train_set.image_dir, n_calib, spec=f"{train_set.spec} (first {n_calib})")
    training = _training_summary(meta)
    calib_method = args.calib_method or default_calibration_method("yolox" if args.model.startswith("yolox")
                                                                    else "centernet")
    size = (overrides or {}).get("image_size")
    official = {"yolox-x": (640, 640), "centernet-r18-dcn": (512, 512)}.get(args.model)
    t = training
    notes = [
        f"Trained weights: {t['steps']} steps (planned {t['steps_planned']}"
        + (f", fitted to a {meta['train_seconds']} s budget" if meta.get("train_seconds") else ", a fixed number")
        + f") x batch {t['batch']} ({t['frames_seen']} images seen) on {t['frames_in_world']} images of "
        f"`{t['data']}` (synthetic camera views rendered at {t['render_size']}), from scratch, AdamW lr {t['lr']} "
        f"with linear warm-up ({t['warmup']} steps) and cosine decay, bf16 autocast, seed {t['seed']}; "
        f"{t['minutes']} min (render + load + train); final loss {t['final_loss'] and round(t['final_loss'], 4)}; "
        f"throughput {t['throughput']}. Losses official (" + ("YOLOX: SimOTA, objectness / class BCE, IoU loss"
        if args.model.startswith("yolox") else "CenterNet: gaussian focal heatmap, L1 size and offset") + ").",
        f"Network input: {tuple(size) if size else official} (official canvas {official}"
        + ("" if size is None or tuple(size) == official else "; DEPARTURE: set by --image-size for the training "
           "budget, every row (PyTorch and engines) runs at it") + ").",
        f"Scored on the held-out `{args.eval_data}` (other seed: no shared scene or image id) with pycocotools; "
        f"int8 calibrated ({calib_method}) on the first {calib.num_images} training images. dmap: vs the PyTorch FP32 "
        "row; "
        "fidelity_map: engine detections scored against the PyTorch FP32 detections (score >= fidelity_threshold); "
        "output_sqnr_db: worst head output vs PyTorch on the timing batch. fps: images/s at the static batch "
        f"{args.eval_batch} (CUDA events around whole forwards, median of {args.iters}; engines replay their CUDA "
        "graph), ratio vs PyTorch FP32 eager of the same run. PyTorch FP32 eager runs with torch's defaults "
        "(tf32_convs: cuDNN convs in TF32, matmuls in FP32); fps_no_tf32 times the same forward with TF32 off "
        "(strict FP32) and fps_ratio_no_tf32 is each engine's ratio to it.",
        "Departures from the official training (named in bevdeploy/train/yolox.py, centernet.py): no augmentation "
        "(every image on the test-time canvas), AdamW + cosine instead of SGD, "
        + ("no extra L1 loss of YOLOX's last 15 epochs, gradient clip 35 (YOLOX clips none)."
           if args.model.startswith("yolox") else "gradient clip 35 as the official config; the wh and offset "
           "branches start from PyTorch's default init, not mmdet's normal(std 0.001) (bevdeploy/models/centernet.py)."),
    ]
    int8_options = {"smooth_alpha": args.smooth_alpha, "keep_float_below_db": args.keep_float_below,
                    "calib_method": args.calib_method}
    if any(v is not None for v in int8_options.values()):
        notes.append("int8 rows built with " + ", ".join(f"{k}={v}" for k, v in int8_options.items() if v is not None)
                     + " (recorded in each int8 row).")
    extra = {"model": args.model, "train_data": args.train_data, "eval_data": args.eval_data,
             "calib_images": calib.num_images, "checkpoint_sha256": sha, "model_overrides": _jsonable(overrides),
             "training": training}
    extra_jobs = []
    qat = {"qat_steps": args.qat_steps, "qat_data": train_set, "qat_batch": args.qat_batch, "qat_lr": args.qat_lr}
    if args.asymmetric:  # its QAT row replaces the symmetric one
        extra_jobs.append((f"{QAT_PRECISION} (asymmetric)", QAT_PRECISION, {"asymmetric": True}))
        if args.qat_steps:
            extra_jobs.append((f"{QAT_PRECISION} (asymmetric QAT)", QAT_PRECISION, {"asymmetric": True, **qat}))
        notes.append(f"The (asymmetric) rows: {QAT_PRECISION} with zero points on the int8 inputs (codes over each "
                     "input's signed calibrated range, `build(asymmetric=True)`); the (asymmetric QAT) row starts "
                     "QAT from them (zero points fixed, scales learned).")
    if args.int8_dcn:
        extra_jobs.append((f"{QAT_PRECISION} (int8 DCN)", QAT_PRECISION, {"int8_dcn": True}))
        notes.append(f"The (int8 DCN) row: {QAT_PRECISION} with the DCNv2 convs int8 too (`build(int8_dcn=True)`: "
                     "int8 corner gathers, fp16 samples x int8 weight codes); the other int8 rows run them in fp16.")
    # the smoothed build's arguments, shared by every (smoothed ...) row
    smoothed = ({"smooth_alpha": args.smoothed_row, "fused_epilogues": bool(args.fused_epilogues)}
                if args.smoothed_row is not None else None)
    if smoothed:  # beside the plain int8 row, the same build smoothed
        extra_jobs.append((f"{QAT_PRECISION} (smoothed)", QAT_PRECISION, smoothed))
        notes.append(f"The {QAT_PRECISION} (smoothed) row: {QAT_PRECISION} with SmoothQuant alpha {args.smoothed_row} "
                     "(`build(smooth_alpha=...)`; fused epilogues as the (fused) rows when they are measured); "
                     "smoothing_folded: the smoothed convs whose divisor runs in their producer's int8 epilogue, "
                     "int8_writers: the convs writing int8 codes for the next (the chain's reach).")
        if args.qat_steps and not args.asymmetric:  # its QAT row replaces the plain one
            extra_jobs.append((f"{QAT_PRECISION} (smoothed QAT)", QAT_PRECISION, {**smoothed, **qat}))
            notes.append(f"The {QAT_PRECISION} (smoothed QAT) row starts QAT from the (smoothed) row's calibration "
                         "(the smoothed weights fine-tuned, the divisors fixed).")
    if args.bias_corrected_row:  # beside the plain (and smoothed) int8 rows, the same builds bias-corrected
        extra_jobs.append((f"{QAT_PRECISION} (bias-corrected)", QAT_PRECISION, {"bias_correction": True}))
        if smoothed:
            extra_jobs.append((f"{QAT_PRECISION} (smoothed, bias-corrected)", QAT_PRECISION,
                               {**smoothed, "bias_correction": True}))
        notes.append(f"The (bias-corrected) rows: the {QAT_PRECISION} build with `build(bias_correction=True)`: each "
                     "int8 layer's bias shifted by the mean error of its own rounding on the calibration images "
                     "(bevdeploy/quant/bias_correction.py); bias_correction_layers: how many.")
    if args.float_identity_row:  # the (smoothed) build again, its residual identities read as floats
        extra_jobs.append((f"{QAT_PRECISION} ({'smoothed, ' if smoothed else ''}float identities)", QAT_PRECISION,
                           {**(smoothed or {}), "int8_chain": "float-identity"}))
        notes.append(f"The (float identities) row: the {QAT_PRECISION} build (smoothed when a smoothed row is measured) "
                     "with `build(int8_chain='float-identity')`: the residual blocks' identities are added as floats "
                     "instead of int8 codes (on a CPU-trained reduced YOLOX-x the int8 identity cost 0.003 mAP, "
                     "bench/results/cpu/diagnose-int8-yolox-float-identity.md).")
    if args.fused_epilogues:  # after the plain rows: each precision again, its float convs' epilogues fused
        extra_jobs += fused_jobs(args.precisions)
        notes.append("The (fused) rows: the same precision built with `build(fused_epilogues=True)`: the float "
                     "convs (the image-reading stem; all convs of a float engine) run bias + residual + ReLU in "
                     "cuDNN's fused call, the stem reads the image through one NHWC 4-channel pass.")
    if args.qat_steps and not args.asymmetric and args.smoothed_row is None:  # the QAT row: every training image
        extra_jobs.append((f"{QAT_PRECISION} (QAT)", QAT_PRECISION, qat))
        notes.append(f"The {QAT_PRECISION} (QAT) row: the PTQ start fine-tuned {args.qat_steps} steps x batch "
                     f"{args.qat_batch} (AdamW, weights lr {args.qat_lr} with cosine decay, scales LSQ) on the "
                     f"{len(train_set.images())} training images with the training loss, fake-quant int8 forward "
                     "(bevdeploy/quant/qat.py), then built from the learned scales. Its weights differ from the "
                     "checkpoint's, so its output_sqnr_db (against the checkpoint's float outputs) measures the "
                     "fine-tuning as well as the rounding; its dmap mixes the recovered rounding with the extra "
                     "training (the pytorch (float control) row separates them).")
    controls = []
    if args.qat_steps:
        controls.append((CONTROL_LABEL, lambda dev: _float_control(args, ckpt, overrides, train_set, dev)))
        notes.append(CONTROL_NOTE.format(steps=args.qat_steps, batch=args.qat_batch, lr=args.qat_lr))
    return bench_det2d(args.model, list(args.precisions), data=eval_set, calib=calib, checkpoint=str(ckpt),
                       batch=args.eval_batch, work_dir=Path(args.work_dir) / "engines", iters=args.iters,
                       out_dir=args.out, command=args.command, model_overrides=overrides, device=args.device,
                       append=bool(args.keep_rows and _same_weights_results(args, sha)),
                       results_name=_results_name(args), extra=extra,
                       notes=notes, int8_options=int8_options, extra_jobs=extra_jobs, float_controls=controls)


def _float_control(args, ckpt: Path, overrides: dict | None, qat_data, dev: torch.device):
    """The QAT rows' control: the BN-folded checkpoint fine-tuned with ``build``'s QAT recipe, data and batches
    (``bevdeploy.engine.build._qat_training``, ``qat_seed`` 0, :func:`bevdeploy.quant.qat.float_finetune`)
    but no fake quantization. Returns the model (eval mode) and the row's recipe entries."""
    from bevdeploy.distributed import DistContext
    from bevdeploy.engine.build import _qat_training
    from bevdeploy.engine.deploy import fold_batchnorms
    from bevdeploy.models import MODELS
    from bevdeploy.models.checkpoint import load_checkpoint
    from bevdeploy.quant.qat import float_finetune

    torch.manual_seed(0)
    model = MODELS[args.model](**(overrides or {}))
    load_checkpoint(model, str(ckpt))
    model = model.to(dev).eval()
    fold_batchnorms(model)
    training, _ = _qat_training(args.model, model, qat_data, dev, False, DistContext())
    t0 = time.perf_counter()
    losses = float_finetune(model, training.loss, training.batches(args.qat_batch, 0), steps=args.qat_steps,
                            lr=args.qat_lr, progress=False)
    info = {"qat_steps": args.qat_steps, "qat_batch": args.qat_batch, "qat_lr": args.qat_lr,
            "qat_loss_first": round(losses[0], 4), "qat_loss_last": round(losses[-1], 4),
            "seconds": round(time.perf_counter() - t0, 1)}
    return model.eval(), info



def _jsonable(obj):
    return json.loads(json.dumps(obj, default=list)) if obj is not None else None


def _training_summary(meta: dict) -> dict:
    """The training budget of a checkpoint's meta, for the tables."""
    training = {k: meta.get(k) for k in ("data", "frames_in_world", "steps", "steps_planned", "warmup", "batch", "lr",
                                         "seed", "render_size", "final_loss", "seconds", "render_seconds_both_worlds",
                                         "throughput", "training_options", "model_overrides", "command")}
    training["frames_seen"] = (meta.get("steps") or 0) * (meta.get("batch") or 0)
    seconds = dict(meta.get("seconds") or {})
    seconds["render"] = max(seconds.get("render", 0.0), meta.get("render_seconds_both_worlds") or 0.0)
    training["minutes"] = round(sum(seconds.values()) / 60, 2) if meta.get("seconds") else None
    return training


def _results_name(args) -> str:
    tag = getattr(args, "results_tag", None)
    return f"accuracy-{args.model}" + (f"-{tag}" if tag else "")


def _same_weights_results(args, sha: str) -> dict | None:
    """The results file this run writes, if an earlier run wrote it for the SAME checkpoint; None if it is
    missing or holds another checkpoint's rows (those must not be mixed into this run's table)."""
    path = _results_dir(args) / f"{_results_name(args)}.json"
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    if doc.get("checkpoint_sha256") != sha:
        print(f"[accuracy] --keep-rows: {path} holds another checkpoint's rows; it is rewritten", file=sys.stderr)
        return None
    return doc


def _earlier_rows(args, sha: str, measured: set[str]) -> list[dict]:
    """Rows of an earlier eval of the SAME checkpoint for precisions this run does not measure
    (an eval split over several device calls); none if the file is from other weights."""
    doc = _same_weights_results(args, sha) or {}
    return [r for r in doc.get("rows", []) if r["precision"] != "pytorch" and r["precision"] not in measured]


def _results_dir(args) -> Path:
    if torch.cuda.is_available():
        from bevdeploy.eval.timing import gpu_dirname

        return Path(args.out) / gpu_dirname()
    return Path(args.out) / "cpu"


def write_accuracy(args, rows: list[dict], meta: dict, threshold: float) -> Path:
    """``<out>/<gpu>/accuracy-<model>.{json,md}``: the rows, the training budget and the command."""
    training = _training_summary(meta)
    doc = {
        "model": args.model,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": args.command,
        "train_data": args.train_data,
        "eval_data": args.eval_data,
        "calib_frames": args.calib_frames,
        "checkpoint_sha256": meta.get("checkpoint_sha256"),
        "fidelity_threshold": round(threshold, 4),
        "training": training,
        "rows": rows,
    }
    folder = _results_dir(args)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{_results_name(args)}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    keys = ["precision", "nds", "map", "mATE", "mASE", "mAOE", "mAVE", "mAAE", "dnds", "dmap", "fidelity_nds",
            "output_sqnr_db", "int8_layers", "fps", "fps_ratio", "error"]
    t = training
    md = [f"# Accuracy of {args.model} on {doc['gpu']} (trained on the synthetic world, scored on held-out scenes)", "",
          f"torch {doc['torch']}, written {doc['date']}", "",
          f"Command: `{args.command}`" + (f" (training: `{t['command']}`)" if t.get("command") not in (None, args.command)
                                          else ""), "",
          f"Training: {t['steps']} steps (planned {t['steps_planned']}; `--steps {t['steps']} --warmup {t['warmup']} "
          f"--train-seconds 0` replays the schedule) "
          f"x batch {t['batch']} ({t['frames_seen']} frames seen) on {t['frames_in_world']} "
          f"frames of `{t['data']}` rendered at {t['render_size']}, lr {t['lr']}, seed {t['seed']}, "
          f"{t['minutes']} min (render + load + train), final loss {t['final_loss'] and round(t['final_loss'], 4)}, "
          f"throughput {t['throughput']}.", "",
          f"Held-out world: `{args.eval_data}` (other seed: no shared scene token). int8 calibrated on "
          f"{args.calib_frames} training frames ({args.calib_method or 'entropy; fp8 rows minmax'}). dnds/dmap: vs "
          f"PyTorch FP32; fidelity_nds: engine boxes scored against the PyTorch FP32 boxes (score >= "
          f"{doc['fidelity_threshold']}); output_sqnr_db: worst "
          "head output vs PyTorch on held-out frame 1. fps: the evaluation loop's median forward latency (CUDA "
          "events around each frame's forward, engines replaying their CUDA graph; batch 1), PyTorch FP32 eager "
          "in the same run as the ratio's base.", "",
          *([CONTROL_NOTE.format(steps=args.qat_steps, batch=args.qat_batch, lr=args.qat_lr), ""]
            if any(r.get("precision") == CONTROL_LABEL for r in rows) else []),
          "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    md += ["| " + " | ".join("" if r.get(k) is None else str(r.get(k)) for k in keys) + " |" for r in rows]
    path.with_suffix(".md").write_text("\n".join(md) + "\n")
    return path


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m bevdeploy.eval.accuracy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--stage", choices=["train", "eval", "all"], default="all")
    p.add_argument("--work-dir", default=env("BEVACC_WORK", "/tmp/bevacc"), help="worlds, checkpoint, engines")
    p.add_argument("--train-data", default=None,
                   help=f"default $BEVACC_TRAIN_DATA or synthetic:600@1; 2D models {DET2D_TRAIN_DATA}")
    p.add_argument("--eval-data", default=None,
                   help=f"default $BEVACC_EVAL_DATA or synthetic:120@2; 2D models {DET2D_EVAL_DATA}")
    p.add_argument("--render-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="camera image size of both worlds (default: 900 1600 for BEVFormer, whose official "
                        "pipeline halves nuScenes' size to its 480x800 input; 450 800 for BEVDet's 256x704 crop; "
                        "360 640 for the 2D views)")
    p.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="2D models: network input canvas of training and every row (default: official, YOLOX "
                        "640 640, CenterNet 512 512); a departure is named in the table's notes")
    p.add_argument("--eval-batch", type=int, default=32, help="2D models: static batch of every row (images/s)")
    p.add_argument("--iters", type=int, default=30, help="2D models: timed forwards per row")
    p.add_argument("--steps", type=int, default=int(env("BEVACC_STEPS", "4000")),
                   help="planned steps (fewer if --train-seconds cannot hold them; the table says how many ran)")
    p.add_argument("--batch", type=int, default=int(env("BEVACC_BATCH", "8")))
    p.add_argument("--train-seconds", type=float, default=float(env("BEVACC_TRAIN_SECONDS", "300")),
                   help="training time budget: the schedule is shortened to the steps that fit (10-min device calls); "
                        "0: none (exactly --steps, e.g. to reproduce a table's run)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: min(500, steps // 10))")
    p.add_argument("--lr", type=float, default=float(env("BEVACC_LR", "2e-4")))
    p.add_argument("--depth-weight", type=float, default=None, help="BEVDet depth supervision weight (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precisions", nargs="*", default=None,
                   help=f"default {' '.join(DEFAULT_PRECISIONS)}; 2D models {' '.join(DET2D_PRECISIONS)}")
    p.add_argument("--calib-frames", type=int, default=int(env("BEVACC_CALIB", "64")))
    p.add_argument("--calib-method", choices=("entropy", "minmax", "percentile"), default=None,
                   help="int8 calibration of every int8 row (default: the model family's, "
                        "bevdeploy.engine.model_io.default_calibration_method)")
    p.add_argument("--qat-steps", type=int, default=int(env("BEVACC_QAT_STEPS", "0")),
                   help="add the 'int8-fp16 (QAT)' row, fine-tuned this many steps (0: no QAT row)")
    p.add_argument("--qat-frames", type=int, default=int(env("BEVACC_QAT_FRAMES", "200")))
    p.add_argument("--qat-batch", type=int, default=int(env("BEVACC_QAT_BATCH", "4")))
    p.add_argument("--qat-lr", type=float, default=float(env("BEVACC_QAT_LR", "1e-5")),
                   help="QAT peak learning rate of the weights (cosine decay)")
    p.add_argument("--asymmetric", action="store_true",
                   help="one more row, the int8-fp16 engine with zero points on the int8 inputs (build "
                        "--asymmetric), beside the symmetric rows; 2D models with --qat-steps: the QAT row starts from it")
    p.add_argument("--int8-dcn", action="store_true",
                   help="one more row, the int8-fp16 engine with its DCNv2 convs int8 too (build --int8-dcn)")
    p.add_argument("--fused-epilogues", action="store_true",
                   help="2D models: one more row per precision, built with fused conv epilogues (build "
                        "--fused-epilogues)")
    p.add_argument("--smooth-alpha", type=float, default=None,
                   help="2D models: int8 rows built with SmoothQuant of this alpha (build --smooth-alpha)")
    p.add_argument("--smoothed-row", type=float, default=None, metavar="A",
                   help="2D models: one more row, int8-fp16 built with SmoothQuant of alpha A beside the plain one")
    p.add_argument("--bias-corrected-row", action="store_true",
                   help="2D models: one more row, int8-fp16 with its int8 layers' biases corrected (build "
                        "--bias-correction); with --smoothed-row, the smoothed build corrected too")
    p.add_argument("--float-identity-row", action="store_true",
                   help="2D models: one more row, int8-fp16 (smoothed, with --smoothed-row) with float residual "
                        "identities (build --int8-chain float-identity)")
    p.add_argument("--keep-float-below", type=float, default=None, metavar="DB",
                   help="2D models: int8 rows keep float the layers below DB alone in int8 (build --keep-float-below)")
    p.add_argument("--results-tag", default="",
                   help="2D models: results file accuracy-MODEL-TAG (a variant run beside the default one)")
    p.add_argument("--keep-rows", action="store_true",
                   help="keep rows of an earlier eval of the same checkpoint for precisions not measured now")
    p.add_argument("--model-overrides", type=json.loads, default=None, help="JSON config overrides (reduced models)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="bench/results")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command = "python -m bevdeploy.eval.accuracy " + " ".join(sys.argv[1:] if argv is None else argv)
    from bevdeploy.train import DET2D_RENDER_SIZE, is_det2d

    det2d = is_det2d(args.model)
    env = os.environ.get
    if det2d:
        args.train_data = args.train_data or DET2D_TRAIN_DATA
        args.eval_data = args.eval_data or DET2D_EVAL_DATA
        args.precisions = list(DET2D_PRECISIONS) if args.precisions is None else args.precisions
    else:
        args.train_data = args.train_data or env("BEVACC_TRAIN_DATA", "synthetic:600@1")
        args.eval_data = args.eval_data or env("BEVACC_EVAL_DATA", "synthetic:120@2")
        args.precisions = list(DEFAULT_PRECISIONS) if args.precisions is None else args.precisions
    if args.render_size is None:
        args.render_size = (list(DET2D_RENDER_SIZE) if det2d else
                            [900, 1600] if args.model.startswith("bevformer") else [450, 800])
    try:
        if args.image_size is not None and not det2d:
            raise ValueError(f"--image-size sets a 2D model's canvas; {args.model} has its official input size")
        if not det2d and (args.smooth_alpha is not None or args.keep_float_below is not None or args.results_tag
                          or args.fused_epilogues or args.smoothed_row is not None or args.bias_corrected_row
                          or args.float_identity_row):
            raise ValueError("--smooth-alpha, --smoothed-row, --bias-corrected-row, --float-identity-row, "
                             "--keep-float-below, --fused-epilogues and --results-tag apply to the 2D models' rows; "
                             f"not to {args.model}")
        if args.stage in ("train", "all"):
            print(f"[accuracy] checkpoint: {stage_train(args)}", file=sys.stderr)
        if args.stage in ("eval", "all"):
            path = stage_eval_det2d(args) if det2d else stage_eval(args)
            print(path.with_suffix(".md").read_text())
    except (ValueError, FileNotFoundError, RuntimeError, NotImplementedError) as e:
        print(f"accuracy: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

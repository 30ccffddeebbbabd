"""``bevdeploy build``: model + precision (+ calibration) -> one engine file.

The engine file is ``torch.export.save`` of the deploy form (:mod:`bevdeploy.engine.deploy`),
exported with static shapes, with the metadata JSON in ``extra_files["bevdeploy.json"]``: model
config, precision, calibration table, layer precisions, torch / triton versions, GPU name and
compute capability, input spec, the program's content hash and one integrity hash over graph,
weights, constants and metadata (re-checked on load, :mod:`bevdeploy.engine.engine_file`). The
archive holds no pickled member (weights and constants as raw bytes, no sample inputs), which the
build verifies on the file it wrote. Output paths are checked before any work, and an existing
engine is replaced atomically. For the int8 and fp8 precisions the calibration table (activation
ranges ``amax``, the same for both: int8 scales are ``amax / 127``, fp8 scales ``amax / 448``) is
also written next to the engine (``<out>.calib.json``) and can be reused with ``calib_table`` (no
calibration data needed then); it must cover the quantized layers exactly unless
``allow_partial_calib``.

With ``qat_steps`` the int8 form is fine-tuned first (quantization-aware training,
:mod:`bevdeploy.quant.qat`), starting from the calibrated scales, with the model family's training
loss; the engine is then built by the same int8 path from the fine-tuned weights and the learned
scales (written to ``<out>.qat.calib.json``; metadata ``qat``).

Several processes (``torchrun --nproc-per-node N -m bevdeploy.cli build ...``, ``dist=``): rank 0
checks the output paths before any work; the calibration frames are split by whole scenes
(:func:`bevdeploy.distributed.shard_by_scene`: the previous-BEV chain of every frame is the one a
single process runs, so the merged table is the one-process table); QAT draws batches per rank
(seed + rank) and averages the gradients; then rank 0 alone converts, exports and writes, while the
other ranks wait and write nothing. An error on any rank stops every rank
(:func:`bevdeploy.distributed.fail_together`).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import io
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from bevdeploy.engine.deploy import (
    ExportWrapper,
    apply_precision,
    fold_batchnorms,
    fused_heads,
    int8_scope,
    layer_precisions,
    precision_spec,
)
from bevdeploy.engine.engine_file import (
    ENGINE_FORMAT,
    ENGINE_VERSION,
    METADATA_KEY,
    _members,
    integrity_hash,
    program_hash,
    read_archive,
)
from bevdeploy.engine.model_io import (
    DET2D_FAMILIES,
    calibration_forward_loop,
    det2d_calibration_loop,
    calibration_method_overrides,
    default_calibration_method,
    image_input_convs,
    example_inputs,
    family,
    input_names,
    int8_scope_prefixes,
    output_names,
)
from bevdeploy.distributed import DistContext, broadcast_object, fail_together, rank0_first, shard_by_scene
from bevdeploy.paths import atomic_output, check_output_path

__all__ = ["build", "ENGINE_FORMAT", "ENGINE_VERSION", "METADATA_KEY", "resolve_device", "runtime_facts"]

logger = logging.getLogger(__name__)
#: Calibration samples taken from a dataset when the data spec does not say how many (the reference: 500).
DEFAULT_CALIB_SAMPLES = 500


def runtime_facts(device: torch.device) -> dict:
    """torch / triton versions and the GPU (name, compute capability) of ``device`` (None on CPU)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = None
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        gpu = {"name": torch.cuda.get_device_name(idx), "capability": list(torch.cuda.get_device_capability(idx))}
    return {"torch": torch.__version__, "triton": triton_version, "device_type": device.type, "gpu": gpu}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` (default: cuda when available) as a torch.device; ValueError for an unknown name
    or for CUDA on a machine without a usable GPU."""
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'cuda', 'cuda:N' or 'cpu', got {device!r}") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} asked for, but no CUDA GPU is available here (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif dev.type != "cpu":
        raise ValueError(f"device must be 'cuda', 'cuda:N' or 'cpu', got {device!r}")
    return dev


def _load_float_model(model_name: str | nn.Module, checkpoint: str | None, allow_partial: bool,
                      overrides: dict | None, allow_nonfinite: bool = False,
                      verbose: bool = True) -> tuple[str, nn.Module]:
    """(preset name, float eval model): a fresh ``MODELS`` model, or a copy of the user's module."""
    from bevdeploy.models import MODELS
    from bevdeploy.models.checkpoint import load_checkpoint

    if isinstance(model_name, nn.Module):
        family(model_name)  # NotImplementedError for a model the engine cannot take
        if overrides:
            raise ValueError("model_overrides apply to a model name; a module is built already")
        model = copy.deepcopy(model_name).cpu()  # build folds BN and swaps layers: leave the user's module alone
        model_name = model.config.name
        if checkpoint:
            report = load_checkpoint(model, checkpoint, allow_partial=allow_partial)
            if verbose:
                print(report, file=sys.stderr)
        return model_name, model.float().eval()
    if model_name not in MODELS:
        raise ValueError(f"unknown model {model_name!r}; choose from {sorted(MODELS)}")
    torch.manual_seed(0)  # random weights (no checkpoint) are reproducible
    model = MODELS[model_name](**(overrides or {}))
    family(model)  # NotImplementedError for a model the engine cannot take
    if checkpoint:
        report = load_checkpoint(model, checkpoint, allow_partial=allow_partial, allow_nonfinite=allow_nonfinite)
        if verbose:
            print(report, file=sys.stderr)
    elif verbose:
        from bevdeploy.eval.detection import warn_random_weights

        warn_random_weights(model_name, "engine build")
    return model_name, model.float().eval()


def _calibration_infos(calib, model_name: str, progress: bool) -> tuple[list[dict], str]:
    """Info records (temporal order) of the calibration data; ``calib`` is a data spec or a DataSource."""
    from bevdeploy.data.nuscenes import load_infos
    from bevdeploy.data.synthetic import DataSource, resolve_data_spec

    if isinstance(calib, DataSource):
        source = calib
    elif isinstance(calib, str):
        source = resolve_data_spec(calib, progress=progress, calibration=True)
    else:
        raise ValueError(f"calib must be a data spec ('synthetic:N' or 'nuscenes:PATH[@version][:split][:N]'), got {calib!r}")
    infos = load_infos(source.dataroot, source.version, source.split, progress=progress)
    n = source.num_samples if source.num_samples is not None else DEFAULT_CALIB_SAMPLES
    infos = infos[:n]
    if not infos:
        raise ValueError(f"calibration data {calib!r} holds no samples")
    return infos, f"{source.dataroot} {source.version} {source.split}[:{len(infos)}]"


def _qat_training(model_name: str, model: nn.Module, data, device: torch.device, progress: bool, ctx: DistContext):
    """The model family's training (``bevdeploy.train``) for QAT and a description of its data.

    BEV models train on the info records of ``data`` (a BEV data spec or ``DataSource``); the 2D
    detectors on a COCO-format set (a ``CocoSet`` or a ``synthetic2d:N@SEED`` / ``coco:PATH`` spec,
    all its images: QAT wants more images than the calibration's first N).
    """
    from bevdeploy.train import make_training

    if family(model) in DET2D_FAMILIES:
        from bevdeploy.data.det2d import CocoSet, resolve_det2d_spec

        if not isinstance(data, (CocoSet, str)):
            raise ValueError(f"{model_name} QAT data must be a 2D data spec ('synthetic2d:N@SEED' or 'coco:PATH') "
                             f"or a CocoSet, got {type(data).__name__}")
        cocoset = rank0_first(lambda: data if isinstance(data, CocoSet) else resolve_det2d_spec(data, progress=progress),
                              ctx)
        with fail_together(ctx):
            training = make_training(model_name, model, cocoset, device)
        return training, f"{cocoset.spec or cocoset.ann_file} [:{len(cocoset.images())}]"
    infos, dataset = rank0_first(lambda: _calibration_infos(data, model_name, progress), ctx)
    with fail_together(ctx):
        training = make_training(model_name, model, infos, device, progress=progress)
    return training, dataset


def _qat(model: nn.Module, model_name: str, scales: dict[str, float], keep_float: Sequence[str], data,
         dev: torch.device, *, steps: int, lr: float, scale_lr: float, batch: int, seed: int,
         progress: bool, ctx: DistContext, zero_points: dict[str, int] | None = None,
         deform_convs: bool = False) -> tuple[dict[str, float], dict]:
    """Fine-tune the folded float ``model`` in its int8 form, in place (plain layers again afterwards);
    returns the learned scales and the ``qat`` metadata.

    Several processes (``ctx``): every rank reads the whole data set and draws its own batches
    (``seed + rank``, as ``bevdeploy.train.train(dist=)``), gradients are averaged, so the learned
    weights and scales are the same on every rank; the losses in the metadata are rank 0's.
    """
    from bevdeploy.quant.qat import learned_scales, prepare_qat, qat_finetune, strip_qat, tie_shared_inputs

    training, dataset = _qat_training(model_name, model, data, dev, progress, ctx)
    with fail_together(ctx):
        prepare_qat(model, scales, keep_float=keep_float, scope=int8_scope_prefixes(model), zero_points=zero_points,
                    deform_convs=deform_convs)
        # readers of one tensor share one learned scale, as the chained engine quantizes it once
        tied = tie_shared_inputs(model, lambda: training.loss(model, next(iter(training.batches(batch, seed)))))
    try:
        t0 = time.perf_counter()
        losses = qat_finetune(model, training.loss, training.batches(batch, seed + ctx.rank), steps=steps, lr=lr,
                              scale_lr=scale_lr, progress=progress, dist=ctx)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - t0
        learned = learned_scales(model)
    finally:
        strip_qat(model)
        model.eval()
    meta = {"steps": steps, "lr": lr, "scale_lr": scale_lr, "batch": batch, "seed": seed, "data": dataset,
            "layers": len(learned), "tied_groups": len(tied), "loss_first": losses[0], "loss_last": losses[-1],
            "processes": ctx.world_size, "global_batch": batch * ctx.world_size, "seconds": round(seconds, 2),
            "frames_per_s": round(steps * batch * ctx.world_size / seconds, 2) if seconds > 0 else None}
    return learned, meta


def _calibration_loop(model: nn.Module, model_name: str, calib, dev: torch.device, ctx: DistContext, *,
                      progress: bool):
    """(a function running this rank's share of the calibration data through ``model``, the data's name)."""
    if family(model) in DET2D_FAMILIES:
        shard = (ctx.rank, ctx.world_size) if ctx.enabled else None
        return rank0_first(
            lambda: det2d_calibration_loop(calib, model_name, model, dev, progress=progress, shard=shard), ctx)
    infos, dataset = rank0_first(lambda: _calibration_infos(calib, model_name, progress), ctx)
    with fail_together(ctx):
        mine = shard_by_scene(infos, ctx.rank, ctx.world_size) if ctx.enabled else infos
        loop = calibration_forward_loop(mine, model_name, model, dev, progress)
    return loop, dataset


def _calibration_run(model: nn.Module, model_name: str, calib, method: str, dev: torch.device, ctx: DistContext,
                     *, two_pass: bool, progress: bool, smooth: tuple[float, list[str]] | None = None):
    """Calibrate ``model`` on ``calib``: (table, the inputs of this rank's first two frames).

    Several processes (``ctx``): rank 0 resolves (renders) the data first; each rank runs its share
    (BEV models: whole scenes in temporal order, :func:`bevdeploy.distributed.shard_by_scene`; 2D
    models: a contiguous share of the images); ranges and histograms are merged before the threshold
    search (:func:`bevdeploy.quant.calibrate.calibrate`), which is the one-process table with
    ``two_pass``. A contiguous split of the frames would not be: a share starting mid-scene would
    run its first frame without the previous BEV that one process feeds it.
    """
    from bevdeploy.quant.calibrate import calibrate

    loop, dataset = _calibration_loop(model, model_name, calib, dev, ctx, progress=progress)
    if smooth is not None:  # SmoothQuant first (one more pass over the data), then calibrate the smoothed model
        from bevdeploy.quant.chain import smoothing_ties
        from bevdeploy.quant.smooth import input_channel_ranges, smooth_inputs

        alpha, layers = smooth
        smooth_inputs(model, input_channel_ranges(model, loop, layers), alpha, ties=smoothing_ties(model))
    recorded: list[dict] = []  # the first frames' inputs, for the sensitivity report
    names = input_names(model)  # the loop's positional order
    hook = model.register_forward_pre_hook(
        lambda m, args: recorded.append(dict(zip(names, (a.clone() for a in args)))) if len(recorded) < 2 else None)
    try:
        table = calibrate(model, loop, method, model_name=model_name, dataset=dataset, two_pass=two_pass,
                          dist=ctx, method_overrides=calibration_method_overrides(model))
    finally:
        hook.remove()
    return table, recorded


def _jsonable(obj):
    if dataclasses.is_dataclass(obj):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def build(
    model_name: str | nn.Module,
    precision: str,
    *,
    out: str | Path,
    checkpoint: str | None = None,
    allow_partial: bool = False,
    calib=None,
    calib_method: str | None = None,
    calib_table: str | None = None,
    keep_float: Sequence[str] = (),
    model_overrides: dict | None = None,
    batch: int = 1,
    device: str | None = None,
    progress: bool = True,
    sensitivity: bool = False,
    keep_float_below_db: float | None = None,
    smooth_alpha: float | None = None,
    bias_correction: bool = False,
    qat_steps: int = 0,
    qat_data=None,
    qat_lr: float = 1e-5,
    qat_scale_lr: float = 1e-3,
    qat_batch: int = 1,
    qat_seed: int = 0,
    int8_chain: bool | str = True,
    int8_stem: bool = False,
    asymmetric: bool = False,
    int8_dcn: bool = False,
    fused_epilogues: bool = False,
    autotune: bool = True,
    autotune_cache: str | os.PathLike | None = None,
    allow_partial_calib: bool = False,
    allow_nonfinite: bool = False,
    calib_two_pass: bool = False,
    dist: DistContext | None = None,
) -> Path | None:
    """Build an engine file for ``model_name`` at ``precision``; returns its path.

    Args:
        model_name: A key of ``bevdeploy.models.MODELS`` (BEVFormer variants, BEVDet, 2D detectors), or
            your own ``BEVFormer`` / ``BEVDet`` module (e.g. fine-tuned; it is copied, not changed; its
            ``config.name`` picks the image pipeline).
        precision: ``fp32``, ``fp16``, ``fp16x2``, ``int8``, ``int8-fp16``, ``int8-fp16x2``, ``fp8`` or
            ``fp8-fp16`` (e4m3 convs / linears, float rest in fp32 / fp16).
        out: The engine file to write (its parent is created).
        checkpoint: Official checkpoint to load (random weights, seed 0, otherwise).
        allow_partial: Passed to ``load_checkpoint``.
        allow_nonfinite: Passed to ``load_checkpoint`` (NaN / inf weights are refused otherwise).
        calib: Calibration data for int8* / fp8*: a data spec (``synthetic:N`` / ``nuscenes:PATH``; 2D
            models ``synthetic2d:N[@SEED]`` / ``coco:PATH`` or a ``bevdeploy.data.det2d.CocoSet``) or a
            ``bevdeploy.data.synthetic.DataSource``; its first
            N (default 500) samples in temporal order. A nuScenes spec without a split calibrates on
            ``train`` / ``mini_train`` when present.
        calib_method: ``entropy``, ``minmax`` or ``percentile``; default
            :func:`~bevdeploy.engine.model_io.default_calibration_method`: ``entropy`` for int8*, except
            ``percentile`` for YOLOX and ``minmax`` for CenterNet (YOLOX's SiLU activations and CenterNet's
            heatmap lose to the KL thresholds' clipping, YOLOX's PAN outliers to the max: measured) and
            ``minmax`` for fp8* (e4m3's relative precision gains nothing from clipping; see
            :mod:`bevdeploy.quant.fp8_modules`).
        calib_table: A saved calibration table to reuse instead of calibrating.
        keep_float: Layer names to keep float in the int8 / fp8 precisions.
        model_overrides: Config overrides (e.g. reduced sizes in tests); recorded in the metadata.
        batch: Static batch size (independent streams) the engine is exported for.
        device: ``cuda`` / ``cpu`` (default: cuda when available). Build on the GPU you run on.
        progress: tqdm bars for calibration.
        sensitivity: int8*: also rank every int8 candidate layer by the output SQNR when it alone
            runs int8 (on the first two calibration frames), written to ``<out>.sensitivity.json``;
            the worst layers are the ones to pass as ``keep_float``.
        keep_float_below_db: int8*: keep float every layer whose alone-in-int8 output SQNR (the
            sensitivity ranking, computed and written as with ``sensitivity``) is below this many dB,
            besides ``keep_float``: mixed precision chosen by measured error, for networks where a few
            layers carry most of the int8 loss (YOLOX-x: the CSP concat convs of the neck). Recorded
            in the metadata (``keep_float_below_db``, ``keep_float_measured``).
        smooth_alpha: int8*: per-input-channel smoothing (SmoothQuant, :mod:`bevdeploy.quant.smooth`) of
            every int8 candidate conv / linear not kept float, with this alpha, measured on the
            calibration data before calibrating; the smoothed layers are recorded
            (``smoothed_layers``). One process only.
        bias_correction: int8*: shift each int8 layer's bias by the mean error of its own rounding on the
            calibration data (:mod:`bevdeploy.quant.bias_correction`; one more pass over it, after the
            calibration and before QAT); the shifts are recorded (``bias_correction``). One process only.
        qat_steps: int8*: quantization-aware fine-tuning steps before conversion (0: plain PTQ).
        qat_data: QAT training data (default: ``calib``); the loss is the family's training loss
            (``bevdeploy.train.make_training``). BEV models: a data spec or DataSource, its first N
            (default 500) samples; 2D models: a 2D spec or CocoSet, all its images.
        qat_lr: Peak learning rate of the weights during QAT (cosine decay).
        qat_scale_lr: Learning rate of the scales (relative change per step).
        qat_batch: QAT batch size.
        qat_seed: Seed of the QAT batch order.
        int8_chain: int8*: int8 activations flow between int8 layers (``chain_int8``); False: off;
            ``"float-identity"``: residual blocks keep float boundaries (more accurate).
        int8_stem: int8* / fp8*: quantize the convs reading the camera image too (the backbone stem;
            :func:`~bevdeploy.engine.model_io.image_input_convs`). Off by default: they are faster float.
        asymmetric: int8*: the convs' and linears' inputs get zero points (asymmetric codes over each
            layer's signed calibrated range clipped at the method's threshold,
            ``CalibrationTable.qparams``): ReLU / SiLU outputs are one-sided, so symmetric codes waste
            a bit on them. Free at run time (the zero point folds into the epilogue); QAT keeps the
            zero points and learns the scales. Recorded in the metadata (``zero_points``).
        int8_dcn: int8*: the DCNv2 convs (BEVFormer-small/base's R101 stages 3-4, CenterNet's neck) run
            int8 too: int8 corner gathers, fp16 samples x int8 weight codes, chained int8 in and out
            (:class:`bevdeploy.quant.modules.QuantDeformConv2d`), with ``asymmetric`` zero points too. QAT trains
            them in that form (``QATDeformConv2d``: input codes at the offset conv's learned scale).
            Recorded in the metadata (``int8_dcn``).
        fused_epilogues: Run the convs of each float ResNet block and stem with their bias (+ residual) +
            ReLU fused into one cuDNN call (:mod:`bevdeploy.engine.conv_epilogue`) instead of a conv and an
            Inductor pass; blocks with int8 / fp8 convs keep their own epilogues. The fused blocks and stems
            are listed in the metadata (``fused_epilogues``). CenterNet's three head branches then run as one
            conv pair (:func:`bevdeploy.engine.deploy.fuse_centernet_head`).
        autotune: int8* on CUDA: time a few launch configurations per int8 layer shape and store the
            fastest in the layer (it lands in the engine; loading never re-tunes). CPU: the heuristic.
        autotune_cache: a JSON tuning cache (default: ``$BEVDEPLOY_AUTOTUNE_CACHE`` if set): layer shapes
            tuned before on this GPU and Triton version are not timed again; new choices are added.
        allow_partial_calib: Build although the calibration table misses int8 layers, names layers
            the model lacks, or has zero / non-finite ranges (warned; those layers stay float).
            Without it any of these is an error naming the layers.
        calib_two_pass: entropy / percentile: histograms over each layer's exact range, from a first
            pass over the data (twice the calibration time; the table no longer depends on the
            frame order). Always on with several processes, whose table equals a one-process build
            with it.
        dist: A :class:`bevdeploy.distributed.DistContext` of several processes (``torchrun``; every
            rank calls ``build`` with the same arguments): rank 0 checks the output paths first, the
            calibration frames are split by scene and the histograms merged (the table of one process
            with ``calib_two_pass``), QAT averages gradients over the ranks (``qat_batch`` per rank,
            seed ``qat_seed + rank``), and rank 0 alone converts, exports and writes every file while
            the other ranks wait. An error on any rank raises on every rank (the others:
            :class:`bevdeploy.distributed.PeerError`). Sensitivity uses rank 0's first two frames.

    Returns:
        Path of the engine file (None on ranks other than 0); for int8* / fp8* also ``<out>.calib.json``
        is written (with ``qat_steps`` it holds the calibrated start, and ``<out>.qat.calib.json`` the
        learned scales).

    Raises:
        ValueError: Unknown precision / model, int8* / fp8* without ``calib`` or ``calib_table``, bad
            batch, an output path that cannot take a file (checked before any work), a calibration
            table that does not cover the quantized layers.
    """
    from bevdeploy.quant.calibrate import CalibrationPoint, CalibrationTable

    ctx = dist if dist is not None and dist.enabled else DistContext()
    show = progress and ctx.is_main  # bars and reports on rank 0 only
    with fail_together(ctx):  # argument errors (the same on every rank) and rank 0's output paths
        spec = precision_spec(precision)
        if not (isinstance(batch, int) and batch >= 1):
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        if isinstance(qat_steps, bool) or not isinstance(qat_steps, int) or qat_steps < 0:
            raise ValueError(f"qat_steps must be an int >= 0, got {qat_steps!r}")
        if qat_steps and not spec.int8:
            raise ValueError(f"qat_steps fine-tunes an int8 form: precision must be int8*, got {precision!r}")
        if asymmetric and not spec.int8:
            raise ValueError(f"asymmetric gives int8 inputs zero points: precision must be int8*, got {precision!r}")
        if int8_dcn and not spec.int8:
            raise ValueError(f"int8_dcn runs the DCNv2 convs int8: precision must be int8*, got {precision!r}")
        if qat_steps and qat_data is None and calib is None:
            raise ValueError("QAT needs training data: qat_data='synthetic:N' (default: the calib data)")
        if not (isinstance(qat_batch, int) and qat_batch >= 1):
            raise ValueError(f"qat_batch must be a positive int, got {qat_batch!r}")
        if keep_float_below_db is not None:
            if not (isinstance(keep_float_below_db, (int, float)) and math.isfinite(keep_float_below_db)):
                raise ValueError(f"keep_float_below_db must be a finite number of dB, got {keep_float_below_db!r}")
            if calib_table is not None:
                raise ValueError("keep_float_below_db ranks layers on the calibration frames; it needs calib, "
                                 "not a saved calib_table")
            sensitivity = True
        if sensitivity and not spec.int8:
            raise ValueError(f"sensitivity ranks layers by their int8 error; precision {precision!r} is not int8")
        if smooth_alpha is not None:
            if not spec.int8:
                raise ValueError(f"smooth_alpha smooths int8 inputs; precision {precision!r} is not int8")
            if not (isinstance(smooth_alpha, (int, float)) and 0.0 <= smooth_alpha <= 1.0):
                raise ValueError(f"smooth_alpha must be in [0, 1], got {smooth_alpha!r}")
            if calib_table is not None:
                raise ValueError("smooth_alpha measures channel ranges on the calibration data; it needs calib, "
                                 "not a saved calib_table (whose layer names predate the smoothing)")
            if ctx.enabled:
                raise ValueError("smooth_alpha runs in one process (its channel ranges are not merged across ranks)")
        if bias_correction:
            if not spec.int8:
                raise ValueError(f"bias_correction corrects int8 rounding; precision {precision!r} is not int8")
            if calib is None:
                raise ValueError("bias_correction measures each layer's rounding error on the calibration data; it "
                                 "needs calib (a saved calib_table has the scales but not the data)")
            if ctx.enabled:
                raise ValueError("bias_correction runs in one process (its error means are not merged across ranks)")
        if not spec.quantized and (calib is not None or calib_table is not None or sensitivity or keep_float):
            raise ValueError(f"calib, calib_table, keep_float and sensitivity apply to the int8 / fp8 precisions only, "
                             f"not {precision!r}")
        if spec.quantized and calib is None and calib_table is None:
            raise ValueError(f"precision {precision!r} needs calibration data (--calib / calib= 'synthetic:N' or "
                             "'nuscenes:PATH') or a saved calibration table "
                             "(--calib-table / calib_table= FILE.calib.json)")
        table_in = None
        if ctx.is_main:  # only rank 0 writes
            out = check_output_path(out, "engine file")
            if spec.quantized:
                check_output_path(f"{out}.calib.json", "calibration table output")
                if sensitivity:
                    check_output_path(f"{out}.sensitivity.json", "sensitivity report output")
                if qat_steps:
                    check_output_path(f"{out}.qat.calib.json", "QAT calibration table output")
            if calib_table is not None and spec.quantized:
                table_in = CalibrationTable.load(calib_table)  # a bad table fails before the model is built
        out = Path(out)
        dev = resolve_device(device)
        if ctx.enabled and dev.type == "cuda":  # torchrun: the GPU of this rank (init_from_env set it)
            dev = torch.device("cuda", torch.cuda.current_device())
    table_in = broadcast_object(table_in, ctx)
    import bevdeploy.ops  # noqa: F401  (op registrations)
    import bevdeploy.quant.fp8_kernels  # noqa: F401
    import bevdeploy.quant.int8_kernels  # noqa: F401

    with fail_together(ctx):
        model_name, model = _load_float_model(model_name, checkpoint, allow_partial, model_overrides, allow_nonfinite,
                                              verbose=ctx.is_main)
        model = model.to(dev)
        fold_batchnorms(model)
        if calib_method is None:
            calib_method = default_calibration_method(family(model), fp8=spec.fp8)
        if spec.quantized and not int8_stem:
            keep_float = list(dict.fromkeys([*keep_float, *image_input_convs(model)]))

    table = None
    table_path = None
    measured: list[str] = []  # layers kept float by keep_float_below_db
    smoothed: list[str] = []  # layers given a ChannelScale by smooth_alpha (their names before it)
    if spec.quantized:
        recorded: list[dict] = []
        if calib_table is not None:
            table = table_in
        else:
            smooth = None
            if smooth_alpha is not None:
                from bevdeploy.quant.smooth import smoothable

                skip = set(keep_float) | set(calibration_method_overrides(model))
                smoothed = [n for n in int8_scope(model) if n not in skip and smoothable(model.get_submodule(n))]
                smooth = (float(smooth_alpha), smoothed)
            table, recorded = _calibration_run(model, model_name, calib, calib_method, dev, ctx,
                                               two_pass=calib_two_pass, progress=show, smooth=smooth)
        table_path = Path(f"{out}.calib.json")
        with fail_together(ctx):  # the table is the same on every rank: rank 0 checks and writes it
            if ctx.is_main:
                if sensitivity and recorded:
                    from bevdeploy.quant.sensitivity import save_report, sensitivity_report

                    # the ranking's default layers: the convs and linears among these (a CalibrationPoint,
                    # e.g. BEVDet's pooled features, has no int8 twin)
                    scope = [n for n in int8_scope(model) if n in table.amax and table.amax[n] > 0]
                    sens = sensitivity_report(model, {n: table.scale(n) for n in scope}, recorded,
                                              out_dtype=torch.float32)
                    save_report(sens, f"{out}.sensitivity.json")
                    if keep_float_below_db is not None:
                        measured = [r.layer for r in sens if r.sqnr_db < keep_float_below_db]
                layers = [n for n, m in model.named_modules()
                          if isinstance(m, (nn.Conv2d, nn.Linear, CalibrationPoint))]
                table.check_coverage(int8_scope(model), layers, keep_float,
                                     source=str(calib_table) if calib_table is not None else "the calibration run",
                                     allow_partial=allow_partial_calib)
                with atomic_output(table_path, "calibration table output") as tmp:
                    table.save(tmp)
        if keep_float_below_db is not None:  # rank 0 measured: every rank's QAT must keep the same layers float
            measured = broadcast_object(measured, ctx)
            keep_float = list(dict.fromkeys([*keep_float, *measured]))
        if spec.fp8:
            from bevdeploy.quant.fp8_kernels import FP8_MAX

            scales = {n: a / FP8_MAX for n, a in table.amax.items() if math.isfinite(a)}
        else:
            scales = {n: table.scale(n) for n in table.amax if math.isfinite(table.amax[n])}
    else:
        scales = None
    zero_points: dict[str, int] = {}
    if int8_dcn and ctx.is_main:
        from bevdeploy.ops.modulated_deform_conv2d import ModulatedDeformConv2dPack

        if not any(isinstance(m, ModulatedDeformConv2dPack) for m in model.modules()):
            logger.warning("int8_dcn: %s has no DCNv2 conv; the engine is the plain %s one", model_name, precision)
    if asymmetric:  # the convs' and linears' inputs (an int8 pooling input stays symmetric)
        with fail_together(ctx):
            for n in list(scales):
                if scales[n] > 0 and isinstance(model.get_submodule(n), (nn.Conv2d, nn.Linear)):
                    scales[n], zp = table.qparams(n, asymmetric=True)
                    if zp:
                        zero_points[n] = zp
    corrected = None
    if bias_correction:  # after the final scales (and zero points), before QAT starts from them
        from bevdeploy.quant.bias_correction import correct_biases

        loop, _ = _calibration_loop(model, model_name, calib, dev, ctx, progress=show)
        corrected = correct_biases(model, loop, scales, zero_points=zero_points, keep_float=keep_float,
                                   scope=int8_scope_prefixes(model))
    qat_meta = None
    if qat_steps:
        learned, qat_meta = _qat(model, model_name, scales, keep_float, qat_data if qat_data is not None else calib,
                                 dev, steps=qat_steps, lr=qat_lr, scale_lr=qat_scale_lr, batch=qat_batch,
                                 seed=qat_seed, progress=show, ctx=ctx, zero_points=zero_points, deform_convs=int8_dcn)
        scales.update(learned)  # the engine's int8 layers take exactly these
        qat_meta["init_calibration_table_file"] = table_path.name
        # the learned scales as amax = 127 * scale (for an asymmetric layer the scale is (hi - lo) / 255:
        # its zero point is in the engine's metadata, ``zero_points``); ranges kept from the calibration
        table = CalibrationTable(amax={n: learned[n] * 127 if n in learned else a for n, a in table.amax.items()},
                                 method=table.method, num_samples=table.num_samples,
                                 metadata={**table.metadata, "qat": qat_meta}, ranges=table.ranges)
        table_path = Path(f"{out}.qat.calib.json")
    with fail_together(ctx):  # rank 0 converts, exports and writes; the others wait here for it
        if ctx.is_main:
            _convert_and_write(model, model_name, precision, out=out, scales=scales, keep_float=keep_float,
                               int8_chain=int8_chain, batch=batch, dev=dev, autotune=autotune,
                               autotune_cache=autotune_cache or os.environ.get("BEVDEPLOY_AUTOTUNE_CACHE"), table=table,
                               table_path=table_path, qat_meta=qat_meta, model_overrides=model_overrides,
                               checkpoint=checkpoint, keep_float_below_db=keep_float_below_db,
                               keep_float_measured=measured, smooth_alpha=smooth_alpha, smoothed_layers=smoothed,
                               zero_points=zero_points, int8_dcn=int8_dcn, fused_epilogues=fused_epilogues,
                               bias_corrected=corrected)
    return out if ctx.is_main else None


def _folded_smoothing(model: nn.Module, smoothed_layers: Sequence[str]) -> list[str]:
    """The smoothed layers whose ``ChannelScale`` the chain folded into their producers (now an Identity)."""
    out = []
    for name in smoothed_layers:
        try:
            wrapper = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(wrapper, nn.Sequential) and len(wrapper) == 2 and type(wrapper[0]) is nn.Identity:
            out.append(name)
    return out


def _convert_and_write(model: nn.Module, model_name: str, precision: str, *, out: Path,
                       scales: dict[str, float] | None, keep_float: Sequence[str], int8_chain: bool | str, batch: int,
                       dev: torch.device, autotune: bool, table, table_path: Path | None, qat_meta: dict | None,
                       autotune_cache: str | os.PathLike | None = None,
                       model_overrides: dict | None, checkpoint: str | None, keep_float_below_db: float | None = None,
                       keep_float_measured: Sequence[str] = (), smooth_alpha: float | None = None,
                       smoothed_layers: Sequence[str] = (), zero_points: dict[str, int] | None = None,
                       int8_dcn: bool = False, fused_epilogues: bool = False,
                       bias_corrected: dict[str, float] | None = None) -> None:
    """The deploy form of the folded (fine-tuned) float ``model`` at ``precision``, exported and written to
    ``out`` with its metadata (and the QAT table, when ``qat_meta``)."""
    spec = precision_spec(precision)
    if qat_meta is not None:
        with atomic_output(table_path, "QAT calibration table output") as tmp:
            table.save(tmp)
    if fused_epilogues:  # CenterNet's head branches as one conv pair (scales renamed and equalised for it)
        from bevdeploy.engine.deploy import fuse_centernet_head

        scales = fuse_centernet_head(model, scales, keep_float, zero_points)
    report = apply_precision(model, precision, scales=scales, keep_float=keep_float, int8_chain=int8_chain,
                             zero_points=zero_points, int8_dcn=int8_dcn)
    precisions = layer_precisions(model, report, precision)
    fused = []
    if fused_epilogues:
        from bevdeploy.engine.conv_epilogue import fuse_conv_epilogues

        fused = fuse_conv_epilogues(model)
        if not fused:
            logger.warning("fused_epilogues: %s has no float ResNet block, ResNet stem or Focus stem; the engine is "
                           "the plain one", model_name)
    model.eval()

    outputs = output_names(model)
    wrapper = ExportWrapper(model, outputs).eval()
    example = example_inputs(model, batch, spec.float_dtype, dev)
    tuned: dict[str, list[int]] = {}
    if spec.int8 and autotune and dev.type == "cuda":
        from bevdeploy.quant.autotune import autotune_int8_layers, load_tuning_cache

        try:
            cache = load_tuning_cache(autotune_cache) if autotune_cache else None
            with torch.no_grad():
                tuned = autotune_int8_layers(model, tuple(example.values()), cache=cache, cache_path=autotune_cache)
        except Exception as e:  # noqa: BLE001  (tuning is an optimisation: the heuristic still runs)
            logger.warning("int8 launch autotune failed, keeping the heuristic configs: %s: %s", type(e).__name__, e)
    int8_outputs = [n for n, m in model.named_modules() if getattr(m, "out_scale", None) is not None]
    folded = _folded_smoothing(model, smoothed_layers)
    if smoothed_layers:
        logger.info("smoothing: %d of %d smoothed layers read int8 codes their producer divided (the divisor in its "
                    "epilogue); the rest multiply a float input", len(folded), len(smoothed_layers))
    with torch.no_grad():
        ep = torch.export.export(wrapper, tuple(example.values()), strict=False)

    metadata = {
        "format": ENGINE_FORMAT,
        "version": ENGINE_VERSION,
        "model": model_name,
        "family": family(model),
        "model_config": _jsonable(model.config),
        "model_overrides": _jsonable(model_overrides or {}),
        "checkpoint": str(checkpoint) if checkpoint else None,
        "precision": precision,
        "op_variant": spec.op_variant,
        "sca_gathered": any(getattr(m, "gathered", None) is True for m in model.modules()),
        # the CenterPoint heads whose branches run as one conv stack (deploy.fuse_head_branches)
        "head_branches_fused": fused_heads(model),
        "float_dtype": str(spec.float_dtype).replace("torch.", ""),
        "int8_layers": sum(p == "int8" for _, p in precisions),
        "fp8_layers": sum(p == "fp8" for _, p in precisions),
        "layer_precisions": [list(r) for r in precisions],
        "int8_outputs": int8_outputs,
        "launch_configs": tuned,
        "keep_float": list(keep_float),
        "keep_float_below_db": keep_float_below_db,
        "keep_float_measured": list(keep_float_measured),
        "smooth_alpha": smooth_alpha,
        "smoothed_layers": list(smoothed_layers),
        # of those, the ones whose divisor runs in their producers' int8 epilogues (chain_int8's fold)
        "smoothing_folded": folded,
        # bias_correction: layer -> its largest bias shift over its channels, relative to its output RMS
        "bias_correction": {n: round(v, 6) for n, v in bias_corrected.items()} if bias_corrected is not None else None,
        # asymmetric int8: the calibrated input zero points (the chain may have merged readers' ranges)
        "zero_points": dict(zero_points or {}),
        "int8_dcn": bool(int8_dcn),
        "fused_epilogues": fused,
        "calibration": json.loads(table.to_json()) if table is not None else None,
        "calibration_table_file": table_path.name if table_path is not None else None,
        "qat": qat_meta,
        "batch": batch,
        "inputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                   for k, v in example.items()},
        "outputs": list(outputs),
        "bev_shape": list(model.bev_shape) if family(model) == "bevformer" else None,
        "preprocess": model_name,
        "content_hash": None,  # filled in below, from the archive's members
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **runtime_facts(dev),
    }
    # export keeps the example inputs for re-tracing; an engine never re-traces, they are the size
    # of a frame (tiny: 30 MB of zeros), and torch would pickle them: the metadata has their spec
    ep.example_inputs = None
    first = io.BytesIO()  # the hashes are over the archive's members, so save once to read them
    torch.export.save(ep, first, extra_files={METADATA_KEY: json.dumps(metadata)})
    metadata["content_hash"] = program_hash(_members(first.getvalue(), "engine being built"))
    del first
    metadata["integrity_hash"] = integrity_hash(metadata["content_hash"], metadata)
    with atomic_output(out, "engine file") as tmp:
        with open(tmp, "wb") as f:  # a file object: torch wants a ".pt2" suffix on paths
            torch.export.save(ep, f, extra_files={METADATA_KEY: json.dumps(metadata)})
        written = read_archive(tmp)  # the loader's own checks: no pickled member, hashes reproduce
        if (written.content_hash, written.integrity_hash) != (metadata["content_hash"], metadata["integrity_hash"]):
            raise RuntimeError(f"torch {torch.__version__} wrote a different archive for the same program on a "
                               "second save; the engine's hash cannot be recorded")
    logger.info("wrote %s (%.1f MB, %s, %d int8 / %d fp8 layers)", out, out.stat().st_size / 2**20, precision,
                metadata["int8_layers"], metadata["fp8_layers"])

"""``bevdeploy build``: model + precision (+ calibration) -> one engine file.

The engine file is ``torch.export.save`` of the deploy form (:mod:`bevdeploy.engine.deploy`),
exported with static shapes, with the metadata JSON in ``extra_files["bevdeploy.json"]``: model
config, precision, calibration table, layer precisions, torch / triton versions, GPU name and
compute capability, input spec, the program's content hash and one integrity hash over graph,
weights, constants and metadata (re-checked on load, :mod:`bevdeploy.engine.engine_file`). The
archive holds no pickled member (weights and constants as raw bytes, no sample inputs), which the
build verifies on the file it wrote. Output paths are checked before any work, and an existing
engine is replaced atomically. For the int8 precisions the calibration table is also written
next to the engine (``<out>.calib.json``) and can be reused with ``calib_table`` (no calibration
data needed then); it must cover the int8 layers exactly unless ``allow_partial_calib``.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from bevdeploy.engine.deploy import (
    ExportWrapper,
    apply_precision,
    fold_batchnorms,
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
from bevdeploy.engine.model_io import calibration_forward_loop, example_inputs, family, input_names, output_names
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


def _load_float_model(model_name: str, checkpoint: str | None, allow_partial: bool,
                      overrides: dict | None, allow_nonfinite: bool = False) -> nn.Module:
    from bevdeploy.models import MODELS
    from bevdeploy.models.checkpoint import load_checkpoint

    if model_name not in MODELS:
        raise ValueError(f"unknown model {model_name!r}; choose from {sorted(MODELS)}")
    torch.manual_seed(0)  # random weights (no checkpoint) are reproducible
    model = MODELS[model_name](**(overrides or {}))
    family(model)  # NotImplementedError for a model the engine cannot take
    if checkpoint:
        report = load_checkpoint(model, checkpoint, allow_partial=allow_partial, allow_nonfinite=allow_nonfinite)
        print(report, file=sys.stderr)
    return model.float().eval()


def _calibration_infos(calib, model_name: str, progress: bool) -> tuple[list[dict], str]:
    """Info records (temporal order) of the calibration data; ``calib`` is a data spec or a DataSource."""
    from bevdeploy.data.nuscenes import load_infos
    from bevdeploy.data.synthetic import DataSource, resolve_data_spec

    if isinstance(calib, DataSource):
        source = calib
    elif isinstance(calib, str):
        source = resolve_data_spec(calib, progress=progress)
    else:
        raise ValueError(f"calib must be a data spec ('synthetic:N' or 'nuscenes:PATH'), got {calib!r}")
    infos = load_infos(source.dataroot, source.version, source.split, progress=progress)
    n = source.num_samples if source.num_samples is not None else DEFAULT_CALIB_SAMPLES
    infos = infos[:n]
    if not infos:
        raise ValueError(f"calibration data {calib!r} holds no samples")
    return infos, f"{source.dataroot} {source.version} {source.split}[:{len(infos)}]"


def _jsonable(obj):
    if dataclasses.is_dataclass(obj):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def build(
    model_name: str,
    precision: str,
    *,
    out: str | Path,
    checkpoint: str | None = None,
    allow_partial: bool = False,
    calib=None,
    calib_method: str = "entropy",
    calib_table: str | None = None,
    keep_float: Sequence[str] = (),
    model_overrides: dict | None = None,
    batch: int = 1,
    device: str | None = None,
    progress: bool = True,
    sensitivity: bool = False,
    allow_partial_calib: bool = False,
    allow_nonfinite: bool = False,
) -> Path:
    """Build an engine file for ``model_name`` at ``precision``; returns its path.

    Args:
        model_name: A key of ``bevdeploy.models.MODELS`` (BEVFormer variants, BEVDet).
        precision: ``fp32``, ``fp16``, ``fp16x2``, ``int8``, ``int8-fp16`` or ``int8-fp16x2``.
        out: The engine file to write (its parent is created).
        checkpoint: Official checkpoint to load (random weights, seed 0, otherwise).
        allow_partial: Passed to ``load_checkpoint``.
        allow_nonfinite: Passed to ``load_checkpoint`` (NaN / inf weights are refused otherwise).
        calib: Calibration data for int8*: a data spec (``synthetic:N`` / ``nuscenes:PATH``) or a
            ``bevdeploy.data.synthetic.DataSource``; its first N (default 500) samples in temporal order.
        calib_method: ``entropy`` (default), ``minmax`` or ``percentile``.
        calib_table: A saved calibration table to reuse instead of calibrating.
        keep_float: Layer names to keep float in the int8 precisions.
        model_overrides: Config overrides (e.g. reduced sizes in tests); recorded in the metadata.
        batch: Static batch size (independent streams) the engine is exported for.
        device: ``cuda`` / ``cpu`` (default: cuda when available). Build on the GPU you run on.
        progress: tqdm bars for calibration.
        sensitivity: int8*: also rank every int8 candidate layer by the output SQNR when it alone
            runs int8 (on the first two calibration frames), written to ``<out>.sensitivity.json``;
            the worst layers are the ones to pass as ``keep_float``.
        allow_partial_calib: Build although the calibration table misses int8 layers, names layers
            the model lacks, or has zero / non-finite ranges (warned; those layers stay float).
            Without it any of these is an error naming the layers.

    Returns:
        Path of the engine file; for int8* also ``<out>.calib.json`` is written.

    Raises:
        ValueError: Unknown precision / model, int8* without ``calib`` or ``calib_table``, bad batch,
            an output path that cannot take a file (checked before any work), a calibration table
            that does not cover the int8 layers.
    """
    from bevdeploy.quant.calibrate import CalibrationPoint, CalibrationTable, calibrate

    spec = precision_spec(precision)
    if not (isinstance(batch, int) and batch >= 1):
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if spec.int8 and calib is None and calib_table is None:
        raise ValueError(f"precision {precision!r} needs calibration data (calib='synthetic:N' or "
                         "'nuscenes:PATH') or a saved calibration table (calib_table=PATH)")
    out = check_output_path(out, "engine file")
    if spec.int8:
        check_output_path(f"{out}.calib.json", "calibration table output")
        if sensitivity:
            check_output_path(f"{out}.sensitivity.json", "sensitivity report output")
    if calib_table is not None and spec.int8:
        table_in = CalibrationTable.load(calib_table)  # a bad table fails before the model is built
    dev = resolve_device(device)
    import bevdeploy.ops  # noqa: F401  (op registrations)
    import bevdeploy.quant.int8_kernels  # noqa: F401

    model = _load_float_model(model_name, checkpoint, allow_partial, model_overrides, allow_nonfinite).to(dev)
    cfg = model.config
    fold_batchnorms(model)

    table = None
    table_path = None
    if spec.int8:
        if calib_table is not None:
            table = table_in
        else:
            infos, dataset = _calibration_infos(calib, model_name, progress)
            loop = calibration_forward_loop(infos, model_name, model, dev, progress)
            recorded: list[dict] = []  # the first frames' inputs, for the sensitivity report
            names = input_names(model)  # the loop's positional order
            hook = model.register_forward_pre_hook(
                lambda m, args: recorded.append(dict(zip(names, (a.clone() for a in args)))) if len(recorded) < 2 else None)
            try:
                table = calibrate(model, loop, calib_method, model_name=model_name, dataset=dataset)
            finally:
                hook.remove()
            if sensitivity:
                from bevdeploy.quant.sensitivity import save_report, sensitivity_report

                scope = [n for n in int8_scope(model) if n in table.amax and table.amax[n] > 0]
                sens = sensitivity_report(model, {n: table.scale(n) for n in scope}, recorded, layers=scope,
                                          out_dtype=torch.float32)
                save_report(sens, f"{out}.sensitivity.json")
        layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear, CalibrationPoint))]
        table.check_coverage(int8_scope(model), layers, keep_float,
                             source=str(calib_table) if calib_table is not None else "the calibration run",
                             allow_partial=allow_partial_calib)
        table_path = Path(f"{out}.calib.json")
        with atomic_output(table_path, "calibration table output") as tmp:
            table.save(tmp)
        scales = {n: table.scale(n) for n in table.amax if math.isfinite(table.amax[n])}
    else:
        scales = None
    report = apply_precision(model, precision, scales=scales, keep_float=keep_float)
    precisions = layer_precisions(model, report, precision)
    model.eval()

    outputs = output_names(model)
    wrapper = ExportWrapper(model, outputs).eval()
    example = example_inputs(model, batch, spec.float_dtype, dev)
    with torch.no_grad():
        ep = torch.export.export(wrapper, tuple(example.values()), strict=False)

    metadata = {
        "format": ENGINE_FORMAT,
        "version": ENGINE_VERSION,
        "model": model_name,
        "family": family(model),
        "model_config": _jsonable(cfg),
        "model_overrides": _jsonable(model_overrides or {}),
        "checkpoint": str(checkpoint) if checkpoint else None,
        "precision": precision,
        "op_variant": spec.op_variant,
        "float_dtype": str(spec.float_dtype).replace("torch.", ""),
        "int8_layers": sum(p == "int8" for _, p in precisions),
        "layer_precisions": [list(r) for r in precisions],
        "keep_float": list(keep_float),
        "calibration": json.loads(table.to_json()) if table is not None else None,
        "calibration_table_file": table_path.name if table_path is not None else None,
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
    logger.info("wrote %s (%.1f MB, %s, %d int8 layers)", out, out.stat().st_size / 2**20, precision,
                metadata["int8_layers"])
    return out

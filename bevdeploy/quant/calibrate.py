"""The calibration pass of INT8 PTQ: per-layer input ranges, saved as an inspectable table.

:func:`calibrate` hooks the INPUT of every ``nn.Conv2d`` / ``nn.Linear`` (what the int8 kernels
quantise, per tensor, with scale ``amax / 127``) and of every :class:`CalibrationPoint` (a tensor an
int8 op reads), runs the caller's forward loop once, and returns a
:class:`CalibrationTable` {qualified module name -> amax}. Conversion (swapping in
``QuantConv2d`` / ``QuantLinear``) is a separate step that reads the table
(``bevdeploy.quant.modules``), as in gpt-fast's two-step flow. The table also keeps each layer's
signed input range, for asymmetric quantization (:meth:`CalibrationTable.qparams`,
:func:`asymmetric_qparams`): ReLU / SiLU inputs are one-sided, and symmetric codes waste half the range.

The forward loop owns the data and its order. A temporal model (BEVFormer) must be run in frame
order, carrying ``prev_bev`` and resetting it at scene boundaries, exactly as at inference, so that
the temporal-attention layers see realistic inputs (the reference calibrates on 500 train samples,
batch 1, after an FP32 pass for ``prev_bev``)::

    def forward_loop(model):
        prev_bev = None
        for sample in calib_samples:                 # frame order
            if sample.is_first_frame:
                prev_bev = None
            prev_bev = model(sample.img, sample.img_metas, prev_bev=prev_bev)["bev_embed"]

    table = calibrate(model.eval(), forward_loop, "entropy", model_name="bevformer_tiny",
                      dataset="nuscenes v1.0-trainval train[:500]")
    table.save("bevformer_tiny.calib.json")
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from bevdeploy.distributed import DistContext, fail_together
from bevdeploy.quant.calib import CALIB_METHODS, Calibrator, MaxCalibrator, make_calibrator

__all__ = ["CalibrationPoint", "CalibrationTable", "asymmetric_qparams", "calibrate"]

logger = logging.getLogger(__name__)

#: int8 symmetric range: scale = amax / INT8_MAX.
INT8_MAX = 127

_FORMAT = "bevdeploy.calibration_table"
_VERSION = 1


def asymmetric_qparams(lo: float, hi: float) -> tuple[float, int]:
    """``(scale, zero_point)`` of asymmetric per-tensor int8 over ``[lo, hi]``: ``x ~= scale * (q - z)``,
    ``q`` in ``[-128, 127]``.

    Why: ReLU / SiLU outputs are (nearly) one-sided, so the symmetric ``amax / 127`` spends half of the
    codes on values that never occur; spreading all 256 codes over ``[lo, hi]`` halves the step.
    The range is widened to hold 0 and ``z`` is an integer, so 0 (padding, ReLU's zeros) is exact.
    Convention: ``z == 0`` means the symmetric scheme (codes clamped to ``[-127, 127]``), ``z != 0``
    clamps to ``[-128, 127]``. A ReLU input (``lo = 0``) gets ``z = -128``, ``scale = hi / 255``; a
    zero-width range gets ``(1.0, 0)``.

    Raises:
        ValueError: ``lo`` or ``hi`` not finite, or ``lo > hi``.
    """
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ValueError(f"need finite lo <= hi, got {lo=}, {hi=}")
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo <= 0.0:
        return 1.0, 0
    scale = (hi - lo) / 255
    return scale, min(max(round(-128 - lo / scale), -128), 127)


class CalibrationPoint(nn.Identity):
    """An identity a model calls on a tensor that an int8 op (not a conv / linear) reads, so that
    :func:`calibrate` records that tensor's range under the point's module name.

    BEVDet's context features feed the int8 ``bev_pool_v2``; the model passes them through a
    ``CalibrationPoint`` and the engine builder reads the point's scale from the table.
    """


@dataclass
class CalibrationTable:
    """Per-tensor activation ranges from one calibration run.

    Attributes:
        amax: qualified module name -> ``amax`` of that layer's input (``scale = amax / 127``),
            in module order.
        method: ``"entropy"``, ``"minmax"`` or ``"percentile"``.
        num_samples: samples the forward loop ran (what it returned, else the model's forward calls).
        metadata: free-form JSON-able facts: ``model``, ``dataset``, ``date`` (UTC, ISO 8601),
            ``percentile``, ``torch``, ``not_run`` (hooked layers that never ran), ...
        ranges: qualified module name -> signed ``(min, max)`` of that layer's input, unclipped (for
            asymmetric quantization, :meth:`qparams`); empty for tables written before it existed.
    """

    amax: dict[str, float]
    method: str
    num_samples: int
    metadata: dict[str, Any] = field(default_factory=dict)
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)

    def scale(self, name: str) -> float:
        """The int8 scale of layer ``name``'s input: ``amax / 127``."""
        if name not in self.amax:
            raise KeyError(f"no calibrated range for layer {name!r} (the table has {len(self.amax)} layers)")
        return self.amax[name] / INT8_MAX

    def qparams(self, name: str, asymmetric: bool) -> tuple[float, int]:
        """``(scale, zero_point)`` of layer ``name``'s input.

        Symmetric: ``(scale(name), 0)``. Asymmetric: the method's clip (``amax``, the entropy /
        percentile threshold; minmax's is ``max |x|`` and clips nothing) applied to the signed range,
        ``[max(min, -amax), min(max, amax)]``, then :func:`asymmetric_qparams`. A layer whose input was
        all zeros (amax 0) gets ``(1.0, 0)`` here: the table's coverage check flags it (it stays float).

        Raises:
            KeyError: no calibrated amax, or (asymmetric) no signed range for ``name``.
        """
        scale = self.scale(name)
        if not asymmetric:
            return scale, 0
        if name not in self.ranges:
            raise KeyError(f"no signed input range for layer {name!r}: asymmetric quantization needs a table "
                           "calibrated by a bevdeploy that records ranges (this one was written before): re-calibrate")
        lo, hi = self.ranges[name]
        amax = self.amax[name]
        # widened to hold 0 first (as asymmetric_qparams does), so a clip past a one-sided range keeps lo <= hi
        return asymmetric_qparams(max(min(lo, 0.0), -amax), min(max(hi, 0.0), amax))

    def __len__(self) -> int:
        return len(self.amax)

    def __contains__(self, name: object) -> bool:
        return name in self.amax

    def to_json(self) -> str:
        """The table as indented JSON (what :meth:`save` writes; engines embed it as is)."""
        doc = {
            "format": _FORMAT,
            "version": _VERSION,
            "method": self.method,
            "num_samples": self.num_samples,
            "metadata": self.metadata,
            "amax": self.amax,
            "ranges": {name: list(r) for name, r in self.ranges.items()},
        }
        return json.dumps(doc, indent=1, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "<string>") -> CalibrationTable:
        """Parse :meth:`to_json` output; ``source`` names the file in error messages.

        Raises:
            ValueError: not JSON, not a calibration table, another format version, or bad entries.
        """
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source}: not a calibration table: invalid JSON ({err})") from None
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
            found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise ValueError(f"{source}: not a calibration table (format {found!r}, expected {_FORMAT!r})")
        if doc.get("version") != _VERSION:
            raise ValueError(
                f"{source}: calibration table version {doc.get('version')!r}, this bevdeploy reads version "
                f"{_VERSION}: recalibrate"
            )
        missing = [key for key in ("method", "num_samples", "metadata", "amax") if key not in doc]
        if missing:
            raise ValueError(f"{source}: calibration table lacks {missing}")
        method, num_samples, metadata, amax = doc["method"], doc["num_samples"], doc["metadata"], doc["amax"]
        if method not in CALIB_METHODS:
            raise ValueError(f"{source}: method {method!r} is not one of {CALIB_METHODS}")
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 0:
            raise ValueError(f"{source}: num_samples must be a non-negative integer, got {num_samples!r}")
        if not isinstance(metadata, dict):
            raise ValueError(f"{source}: metadata must be an object, got {type(metadata).__name__}")
        if not isinstance(amax, dict):
            raise ValueError(f"{source}: amax must be an object {{layer: amax}}, got {type(amax).__name__}")
        for name, value in amax.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{source}: amax of {name!r} must be a finite number >= 0, got {value!r}")
        ranges = doc.get("ranges", {})  # absent in tables written before asymmetric quantization
        if not isinstance(ranges, dict):
            raise ValueError(f"{source}: ranges must be an object {{layer: [min, max]}}, got {type(ranges).__name__}")
        for name, r in ranges.items():
            if (not isinstance(r, list) or len(r) != 2
                    or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in r)
                    or r[0] > r[1]):
                raise ValueError(f"{source}: range of {name!r} must be [min, max] of finite numbers, got {r!r}")
        return cls(
            amax={name: float(value) for name, value in amax.items()},
            method=method,
            num_samples=num_samples,
            metadata=metadata,
            ranges={name: (float(r[0]), float(r[1])) for name, r in ranges.items()},
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write the table as human-readable JSON."""
        with open(path, "w") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationTable:
        """Read a table written by :meth:`save`.

        Raises:
            ValueError: the file is corrupt or of another format version (the message names it).
        """
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError:
            raise ValueError(f"{os.fspath(path)}: not a calibration table (not UTF-8 text)") from None
        return cls.from_json(text, source=os.fspath(path))

    def coverage_problems(self, scope: Sequence[str], layers: Sequence[str],
                          keep_float: Sequence[str] = ()) -> list[str]:
        """Why this table does not cover the int8 ``scope`` exactly (empty list: it does).

        Args:
            scope: The layers that will run int8 (names, e.g. ``int8_scope(model)``).
            layers: Every layer of the model a table may name (its convs / linears / points).
            keep_float: Layers of ``scope`` that stay float and need no range.

        Problems, each naming up to 5 layers: scope layers without a range; table layers the model
        does not have (a table of another model or config); scope layers whose range is 0 or not
        finite (they would quantize to nothing).
        """
        keep = set(keep_float)
        need = [n for n in scope if n not in keep]
        known = set(layers)
        problems = []
        missing = [n for n in need if n not in self.amax]
        extra = [n for n in self.amax if n not in known]
        zero = [n for n in need if n in self.amax and self.amax[n] == 0]
        nonfinite = [n for n in need if n in self.amax and not math.isfinite(self.amax[n])]
        for what, names in (("int8 layers without a range", missing),
                            ("layers this model does not have", extra),
                            ("int8 layers with a zero range", zero),
                            ("int8 layers with a non-finite range", nonfinite)):
            if names:
                more = f", ... ({len(names) - 5} more)" if len(names) > 5 else ""
                problems.append(f"{len(names)} {what}: {', '.join(names[:5])}{more}")
        return problems

    def check_coverage(self, scope: Sequence[str], layers: Sequence[str], keep_float: Sequence[str] = (), *,
                       source: str = "calibration table", allow_partial: bool = False) -> list[str]:
        """Raise ValueError naming the layers unless the table covers ``scope`` exactly
        (:meth:`coverage_problems`); with ``allow_partial`` warn and return the problems instead
        (layers without a usable range then stay float)."""
        problems = self.coverage_problems(scope, layers, keep_float)
        if problems and not allow_partial:
            raise ValueError(f"{source} does not cover this model's int8 layers exactly: {'; '.join(problems)}. "
                             "Recalibrate for this model, or pass --allow-partial-calib (allow_partial_calib=True) "
                             "to build with those layers in float")
        if problems:
            warnings.warn(f"{source}: partial calibration accepted (allow_partial_calib): {'; '.join(problems)}; "
                          "layers without a usable range stay float", stacklevel=2)
        return problems

    def __str__(self) -> str:
        return self.format(top=20)

    def format(self, top: int = 20) -> str:
        """A text table: the header, then the ``top`` layers with the largest ranges."""
        meta = self.metadata
        extra = f", percentile {meta['percentile']}" if self.method == "percentile" and "percentile" in meta else ""
        lines = [
            f"CalibrationTable: {len(self.amax)} layers, method {self.method}{extra}, {self.num_samples} samples",
            f"  model {meta.get('model', '?')}, dataset {meta.get('dataset') or '?'}, date {meta.get('date', '?')}",
        ]
        if meta.get("not_run"):
            lines.append(f"  not run (left out): {', '.join(meta['not_run'])}")
        if not self.amax:
            return "\n".join(lines)
        ranked = sorted(self.amax.items(), key=lambda item: item[1], reverse=True)[:top]
        width = max(len("layer"), *(len(name) for name, _ in ranked))
        lines.append(f"  {'layer':<{width}}  {'amax':>12}  {'scale':>12}")
        lines += [f"  {name:<{width}}  {value:>12.6g}  {value / INT8_MAX:>12.6g}" for name, value in ranked]
        if len(self.amax) > len(ranked):
            lines.append(f"  ... {len(self.amax) - len(ranked)} more (smaller amax)")
        return "\n".join(lines)


def _layer_input(args: tuple, kwargs: dict) -> Any:
    """The activation a conv/linear layer reads: its first positional argument (or ``input=``)."""
    if args:
        return args[0]
    return kwargs.get("input")


def calibrate(
    model: nn.Module,
    forward_loop: Callable[[nn.Module], int | None],
    method: str = "entropy",
    *,
    layer_types: Sequence[type[nn.Module]] = (nn.Conv2d, nn.Linear, CalibrationPoint),
    percentile: float = 99.99,
    model_name: str | None = None,
    dataset: str = "",
    two_pass: bool = False,
    dist: DistContext | None = None,
    method_overrides: Mapping[str, str] | None = None,
) -> CalibrationTable:
    """Calibrate the input range of every layer of ``layer_types`` in ``model``.

    Attaches a forward pre-hook to each such module (keyed by its qualified name from
    ``model.named_modules()``; a module called several times per forward collects every call), runs
    ``forward_loop(model)`` once under ``torch.no_grad()``, removes the hooks (also when the loop
    raises), and computes one ``amax`` per layer. The loop owns the data: what it feeds, in which
    order (frame order with ``prev_bev`` for temporal models), and how many samples. Inputs may be
    fp16/bf16 (collected in fp32) and on any device (histograms are built there; one host sync per
    layer call). Layers that never ran are logged and left out of the table (listed in
    ``metadata["not_run"]``). Pass the model in eval mode: the mode is not changed here.

    Args:
        model: the float model, in eval mode.
        forward_loop: ``forward_loop(model)`` runs the calibration data through ``model``; it may
            return the number of samples it ran (else the model's forward calls are counted).
        method: ``"entropy"`` (TensorRT's KL threshold, the default), ``"minmax"`` or ``"percentile"``.
        layer_types: module types whose INPUT is calibrated (exact ``isinstance``).
        percentile: the percentile of ``|x|`` for ``method="percentile"``.
        model_name: recorded in the metadata (default: the model's class name).
        dataset: a description of the calibration data, recorded in the metadata.
        two_pass: histogram methods only: run the loop twice, first for every layer's ``max |x|``,
            then binning over exactly that range (an exact histogram, independent of batch order;
            the one-pass histogram grows with the running max and is exact to within a bin).
        dist: the process group's context (``bevdeploy.distributed``): each process runs the loop
            on its own share of the data, and the ranges (minmax) or the two-pass histograms are
            merged across processes before the threshold search, so every process gets the table
            that one process running all the data computes with ``two_pass=True``. An error in one
            process's loop stops every process (:func:`bevdeploy.distributed.fail_together`).
        method_overrides: layer name -> the method for that layer instead of ``method`` (e.g.
            ``"minmax"`` for a sparse input whose rare large values carry the signal: the entropy
            threshold of a histogram dominated by zeros clips them). Recorded in the metadata.

    Returns:
        The :class:`CalibrationTable`; besides ``amax`` it records every layer's signed input range
        (``ranges``, one ``aminmax`` per call, merged over processes) for asymmetric quantization
        (:meth:`CalibrationTable.qparams`), whatever the method.

    Raises:
        ValueError: unknown ``method``, or no module of ``layer_types`` in ``model``.
        RuntimeError: a layer's input held NaN/inf (the message names the layer).
    """
    if method not in CALIB_METHODS:
        raise ValueError(f"method must be one of {CALIB_METHODS}, got {method=}")
    layer_types = tuple(layer_types)
    names = [name for name, module in model.named_modules() if isinstance(module, layer_types)]
    if not names:
        kinds = ", ".join(t.__name__ for t in layer_types)
        raise ValueError(f"{type(model).__name__} has no module of the types to calibrate ({kinds})")
    overrides = dict(method_overrides or {})
    for name, m in overrides.items():
        if name not in names:
            raise ValueError(f"method_overrides names {name!r}, not a calibrated layer of the model "
                             f"(a {', '.join(t.__name__ for t in layer_types)} module)")
        if m not in CALIB_METHODS:
            raise ValueError(f"method_overrides[{name!r}] must be one of {CALIB_METHODS}, got {m!r}")
    method_of = {name: overrides.get(name, method) for name in names}
    if model.training:
        logger.warning("calibrating a model in training mode (BatchNorm batch statistics, dropout): call model.eval()")
    merge = dist is not None and dist.enabled
    if any(m != "minmax" for m in method_of.values()) and (two_pass or merge):
        # pass 1: every layer's range (merged over processes); pass 2: histograms over exactly that range
        ranges = {name: MaxCalibrator() for name in names}
        with fail_together(dist if merge else None):  # a rank's error stops all, not a hang in all_reduce
            _run_hooked(model, forward_loop, ranges)
        calibrators: dict[str, Calibrator] = {}
        for name, cal in ranges.items():
            if merge:
                cal.all_reduce()
            if method_of[name] == "minmax":
                calibrators[name] = cal  # a max is idempotent: collecting the same data again keeps it
                continue
            calibrators[name] = make_calibrator(method_of[name], percentile=percentile)
            try:
                calibrators[name].fix_range(cal.compute_amax())
            except RuntimeError:
                pass  # the layer never ran (anywhere): left out of the table below
    else:
        calibrators = {name: make_calibrator(method_of[name], percentile=percentile) for name in names}
    with fail_together(dist if merge else None):
        calls, forward_calls, returned, signed = _run_hooked(model, forward_loop, calibrators)
    if merge:
        for cal in calibrators.values():
            cal.all_reduce()
        signed = _min_max_over_processes(signed)
        calls = dict(zip(names, _sum_over_processes([calls[n] for n in names])))
        forward_calls = _sum_over_processes([forward_calls])[0]
        if isinstance(returned, int) and not isinstance(returned, bool):
            returned = _sum_over_processes([returned])[0]

    amax: dict[str, float] = {}
    not_run = [name for name, n in calls.items() if n == 0]
    for name, calibrator in calibrators.items():
        if calls[name] == 0:
            continue
        try:
            amax[name] = float(calibrator.compute_amax())
        except RuntimeError:  # it only ever saw empty tensors
            not_run.append(name)
    if not_run:
        logger.warning(
            "%d of %d layers never ran during calibration and are left out of the table: %s",
            len(not_run), len(calibrators), ", ".join(not_run),
        )
    zero = [name for name, value in amax.items() if value == 0.0]
    if zero:
        logger.warning("layers whose calibration input was all zeros (amax 0, scale 0): %s", ", ".join(zero))
    if isinstance(returned, int) and not isinstance(returned, bool):
        num_samples = returned
    else:
        num_samples = forward_calls
    metadata: dict[str, Any] = {
        "model": model_name or type(model).__name__,
        "dataset": dataset,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "layer_types": [t.__name__ for t in layer_types],
        "not_run": not_run,
        "two_pass": any(m != "minmax" for m in method_of.values()) and (two_pass or merge),
        "processes": dist.world_size if merge else 1,
    }
    if "percentile" in method_of.values():
        metadata["percentile"] = percentile
    if overrides:
        metadata["method_overrides"] = overrides
    return CalibrationTable(amax=amax, method=method, num_samples=num_samples, metadata=metadata,
                            ranges={name: signed[name] for name in amax})


def _sum_over_processes(values: list[int]) -> list[int]:
    import torch.distributed as torch_dist

    from bevdeploy.distributed import comm_device

    t = torch.tensor(values, dtype=torch.float64, device=comm_device())
    torch_dist.all_reduce(t)
    return [int(v) for v in t.tolist()]


def _min_max_over_processes(signed: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """Every layer's (min, max) over all processes (a layer may have run on some only); the layer order
    is the same everywhere (``model.named_modules()``)."""
    import torch.distributed as torch_dist

    from bevdeploy.distributed import comm_device

    names = list(signed)
    lo = torch.tensor([signed[n][0] for n in names], dtype=torch.float64, device=comm_device())
    hi = torch.tensor([signed[n][1] for n in names], dtype=torch.float64, device=comm_device())
    torch_dist.all_reduce(lo, op=torch_dist.ReduceOp.MIN)
    torch_dist.all_reduce(hi, op=torch_dist.ReduceOp.MAX)
    return {n: (a, b) for n, a, b in zip(names, lo.tolist(), hi.tolist())}


def _run_hooked(model: nn.Module, forward_loop: Callable,
                calibrators: dict[str, Calibrator]) -> tuple[dict, int, Any, dict[str, tuple[float, float]]]:
    """Run ``forward_loop(model)`` once with each calibrator collecting its layer's input.

    Returns (calls per layer, the model's forward calls, what the loop returned, signed (min, max) of
    each layer's input: (inf, -inf) where it saw no element). The running min / max stay on the
    input's device (one ``aminmax`` per call, no host sync) and are read once at the end.
    """
    calls = dict.fromkeys(calibrators, 0)
    mins: dict[str, Tensor] = {}
    maxs: dict[str, Tensor] = {}

    def make_hook(name: str, calibrator: Calibrator) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = _layer_input(args, kwargs)
            if not isinstance(x, Tensor):
                raise TypeError(f"layer {name!r}: expected a Tensor input to calibrate, got {type(x).__name__}")
            try:
                calibrator.collect(x)  # refuses NaN / inf and non-float inputs first
            except RuntimeError as err:
                raise RuntimeError(f"layer {name!r}: {err}") from err
            calls[name] += 1
            if x.numel():
                lo, hi = torch.aminmax(x.detach())
                lo, hi = lo.float(), hi.float()
                mins[name] = torch.minimum(mins[name], lo) if name in mins else lo
                maxs[name] = torch.maximum(maxs[name], hi) if name in maxs else hi

        return hook

    modules = dict(model.named_modules())
    forward_calls = 0

    def count_forward(module: nn.Module, args: tuple) -> None:
        nonlocal forward_calls
        forward_calls += 1

    handles = [model.register_forward_pre_hook(count_forward)]
    try:
        for name, calibrator in calibrators.items():
            handles.append(modules[name].register_forward_pre_hook(make_hook(name, calibrator), with_kwargs=True))
        with torch.no_grad():
            returned = forward_loop(model)
    finally:
        for handle in handles:
            handle.remove()
    signed = {name: tuple(torch.stack([mins[name], maxs[name].to(mins[name].device)]).tolist()) if name in mins
              else (math.inf, -math.inf) for name in calibrators}
    return calls, forward_calls, returned, signed

"""Activation-range calibrators for INT8 post-training quantization (per tensor, symmetric).

Each calibrator follows one protocol (modelopt's ``_Calibrator``): ``collect(x)`` once per batch,
``compute_amax() -> float`` at the end, ``reset()`` to start over. The int8 scale is
``amax / 127``.

* ``minmax``: :class:`MaxCalibrator`, the running ``max |x|``.
* ``entropy``: :class:`EntropyCalibrator`, TensorRT's KL-divergence threshold (the default).
* ``percentile``: :class:`PercentileCalibrator`, a percentile of ``|x|`` (99.99 by default).

All refuse NaN/inf inputs (``RuntimeError``) and raise if ``compute_amax`` comes before any data.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

from bevdeploy.quant.calib.entropy import EntropyCalibrator, HistogramCalibrator
from bevdeploy.quant.calib.max import MaxCalibrator
from bevdeploy.quant.calib.percentile import PercentileCalibrator

__all__ = [
    "CALIB_METHODS",
    "Calibrator",
    "EntropyCalibrator",
    "HistogramCalibrator",
    "MaxCalibrator",
    "PercentileCalibrator",
    "make_calibrator",
]

#: Method names accepted by :func:`make_calibrator` and ``bevdeploy.quant.calibrate.calibrate``.
CALIB_METHODS = ("entropy", "minmax", "percentile")


@runtime_checkable
class Calibrator(Protocol):
    """What :func:`bevdeploy.quant.calibrate.calibrate` needs from a calibrator."""

    def collect(self, x: Tensor) -> None: ...

    def reset(self) -> None: ...

    def compute_amax(self) -> float: ...


def make_calibrator(method: str, *, percentile: float = 99.99) -> Calibrator:
    """A fresh calibrator for ``method`` (one of :data:`CALIB_METHODS`).

    Args:
        method: ``"entropy"``, ``"minmax"`` or ``"percentile"``.
        percentile: used by ``"percentile"`` only, in ``[0, 100]``.
    """
    if method == "entropy":
        return EntropyCalibrator()
    if method == "minmax":
        return MaxCalibrator()
    if method == "percentile":
        return PercentileCalibrator(percentile)
    raise ValueError(f"method must be one of {CALIB_METHODS}, got {method=}")

"""Minmax calibration: the running maximum of ``|x|`` over every collected batch.

``amax = max over batches of max |x|``; the int8 scale is ``amax / 127``. Nothing is clipped, so
one outlier stretches the scale for every other value (TensorRT's ``IInt8MinMaxCalibrator``,
pytorch_quantization's / modelopt's ``MaxCalibrator`` per tensor).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["MaxCalibrator", "check_calib_input"]


def check_calib_input(x: Tensor) -> tuple[Tensor, float]:
    """Returns ``(|x| as fp32, max |x|)``; refuses non-float tensors and NaN/inf.

    One host sync (the max): NaN and inf both surface in ``max |x|``, so the check is free.
    Empty tensors give ``(x, 0.0)``.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"calibrators collect tensors, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"calibrators collect floating-point activations, got dtype {x.dtype}")
    x = x.detach().float().abs()  # fp16/bf16 inputs are binned in fp32
    if x.numel() == 0:
        return x, 0.0
    x_max = x.max().item()
    if not math.isfinite(x_max):
        bad = "NaN" if math.isnan(x_max) else "inf"
        raise RuntimeError(
            f"calibration input contains {bad} (shape {list(x.shape)}): fix the model or the data; "
            "a non-finite range would give every value of this tensor the same int8 code"
        )
    return x, x_max


class MaxCalibrator:
    """Per-tensor minmax calibrator: ``compute_amax() = max |x|`` over all collected batches."""

    def __init__(self) -> None:
        self._amax: float | None = None

    def collect(self, x: Tensor) -> None:
        """Update the running maximum of ``|x|`` with one batch (any shape, float dtype, any device).

        Raises:
            RuntimeError: ``x`` holds NaN or inf.
            TypeError: ``x`` is not a floating-point tensor.
        """
        x, x_max = check_calib_input(x)
        if x.numel() == 0:
            return
        self._amax = x_max if self._amax is None else max(self._amax, x_max)

    def reset(self) -> None:
        """Forget everything collected."""
        self._amax = None

    def all_reduce(self) -> None:
        """The running maximum over every process of the job (``torch.distributed``), in place."""
        import torch
        import torch.distributed as dist

        from bevdeploy.distributed import comm_device

        t = torch.tensor([-1.0 if self._amax is None else self._amax], dtype=torch.float64, device=comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        self._amax = None if t.item() < 0 else float(t.item())

    def compute_amax(self) -> float:
        """The calibrated range ``amax`` (int8 scale = amax / 127).

        Raises:
            RuntimeError: nothing was collected.
        """
        if self._amax is None:
            raise RuntimeError("MaxCalibrator.compute_amax() called before any data was collected (call collect() first)")
        return float(self._amax)

    def __repr__(self) -> str:
        return f"MaxCalibrator(amax={self._amax})"

"""Empirical bias correction: each int8 layer's bias shifted by the mean error its own rounding makes.

Rounding is not only noise. Clipping a calibrated input (a percentile threshold cuts SiLU's long tail) and
rounding the weights move each output channel's mean, and the shifts add up through the network. Nagel et al.
(2019, "Data-Free Quantization Through Weight Equalization and Bias Correction") correct it in the bias; NNCF's
post-training quantization does so by default (its fast bias correction). Here, on the calibration data, every
layer the int8 build converts sees the float model's own input ``x``; its channel means of ``layer(x)`` and of
its fake-quant form (:mod:`bevdeploy.quant.qat`: the int8 kernels' codes, input scale and zero point, per-channel
weight codes) give ``shift = E[layer(x)] - E[fake_quant_layer(x)]``, added to the layer's bias. Each layer's
correction is its own (the layer-isolated form): measured on float inputs, it does not chase the errors of the
layers before it. The engine runs the same kernels with the new bias: no run-time cost.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["correct_biases"]


def _channel_sums(err: Tensor, conv: bool) -> tuple[Tensor, int]:
    """Per-output-channel sums of ``err`` (conv: [N, C, H, W]; linear: [..., C]) and the count per channel."""
    flat = err.transpose(0, 1).reshape(err.shape[1], -1) if conv else err.reshape(-1, err.shape[-1]).t()
    return flat.double().sum(dim=1), flat.shape[1]


def correct_biases(
    model: nn.Module,
    run: Callable[[nn.Module], object],
    scales: dict[str, float],
    *,
    zero_points: dict[str, int] | None = None,
    keep_float: Iterable[str] = (),
    scope: Sequence[str] | None = None,
) -> dict[str, float]:
    """Shift the bias of every layer the int8 build would convert by the mean of its own quantization error.

    Args:
        model: float model, BatchNorm folded, eval mode (the form the int8 build calibrates); biases changed in place
            (a layer without one gets one).
        run: ``run(model)`` runs the calibration data through it (the build's calibration loop).
        scales, zero_points, keep_float, scope: the int8 layers and their input quantization, as
            :func:`bevdeploy.quant.qat.prepare_qat` takes them (the same selection as the int8 build).

    Returns:
        layer name -> the largest |shift| over its channels, relative to the layer's output RMS on the data (0
        where a layer never ran), for the record.

    Raises:
        ValueError: as :func:`~bevdeploy.quant.qat.prepare_qat` (no layer selected, a BatchNorm left, bad scales).
    """
    from bevdeploy.quant.qat import QATConv2d, QATLinear, prepare_qat

    # the fake-quant twins on a copy: prepare_qat swaps modules and shares parameters, and the model stays float
    shadow = prepare_qat(copy.deepcopy(model), scales, zero_points=zero_points, keep_float=keep_float, scope=scope)
    twins = {n: m.eval() for n, m in shadow.named_modules() if isinstance(m, (QATConv2d, QATLinear))}
    sums: dict[str, Tensor] = {}
    squares: dict[str, float] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        conv = isinstance(twins[name], QATConv2d)

        def fn(module, args, out):
            y = out.float()
            s, n = _channel_sums(y - twins[name](args[0]), conv)
            sums[name] = sums[name] + s if name in sums else s
            squares[name] = squares.get(name, 0.0) + float(y.double().pow(2).sum())
            counts[name] = counts.get(name, 0) + n
        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in twins]
    try:
        with torch.no_grad():
            run(model)
    finally:
        for h in handles:
            h.remove()
    report = dict.fromkeys(twins, 0.0)
    del shadow, twins
    for name in sums:
        layer = model.get_submodule(name)
        shift = sums[name] / counts[name]
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(shift.numel(), dtype=layer.weight.dtype, device=layer.weight.device),
                                      requires_grad=layer.weight.requires_grad)
        with torch.no_grad():
            layer.bias.add_(shift.to(layer.bias.dtype))
        rms = (squares[name] / (counts[name] * shift.numel())) ** 0.5
        report[name] = float(shift.abs().max()) / rms if rms > 0 else 0.0
    return report

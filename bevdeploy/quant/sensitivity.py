"""Per-layer INT8 sensitivity: which layers lose the most when they alone run in int8.

For each calibrated layer, swap only that layer for its int8 version (the real int8 module, not fake
quantisation), run the model on a few recorded inputs, and measure the SQNR of every output against
the float model; the worst output counts. Layers with the lowest SQNR are the ones to pass to
``bevdeploy build --keep-float``. One forward per layer per input: cheap on a GPU, slow on a CPU.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from bevdeploy.quant.modules import QuantConv2d, QuantLinear


@dataclass(frozen=True)
class LayerSensitivity:
    """SQNR (dB) of the model outputs with only ``layer`` in int8; ``worst_output`` names the output."""

    layer: str
    sqnr_db: float
    worst_output: str


def _tensors(out) -> dict[str, Tensor]:
    if isinstance(out, Tensor):
        return {"output": out}
    if isinstance(out, Mapping):
        return {k: v for k, v in out.items() if isinstance(v, Tensor)}
    if isinstance(out, (tuple, list)):
        return {str(i): v for i, v in enumerate(out) if isinstance(v, Tensor)}
    raise TypeError(f"model output of type {type(out).__name__} has no tensors to compare")


def sqnr_db(ref: Tensor, x: Tensor) -> float:
    """10 log10(|ref|^2 / |ref - x|^2) in float64; inf when equal, -inf when ``x`` holds NaN / inf."""
    if not torch.isfinite(x).all():
        return float("-inf")
    noise = (x.double() - ref.double()).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.double().pow(2).sum() / noise))


def sensitivity_report(
    model: nn.Module,
    scales: Mapping[str, float],
    inputs: Sequence[Mapping[str, Tensor]],
    *,
    layers: Sequence[str] | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> list[LayerSensitivity]:
    """Quantise one layer at a time and rank the layers by output SQNR (worst first).

    Args:
        model: The float model (BN folded, as it will be converted); left unchanged on return.
        scales: Input scale (amax / 127) per layer name, e.g. from ``CalibrationTable.scale``.
        inputs: Keyword inputs of a few forwards (e.g. recorded calibration frames).
        layers: Layer names to test (default: every nn.Conv2d / nn.Linear that has a scale).
        out_dtype: Output dtype of the int8 layer (float32 for FP32/INT8 engines).
    """
    if not inputs:
        raise ValueError("sensitivity_report needs at least one input")
    modules = dict(model.named_modules())
    if layers is None:
        layers = [n for n, m in modules.items() if type(m) in (nn.Conv2d, nn.Linear) and n in scales]
    unknown = [n for n in layers if n not in modules or n not in scales]
    if unknown:
        raise ValueError(f"layers without a module or a calibrated scale: {unknown[:5]} ({len(unknown)} in all)")
    with torch.no_grad():
        refs = [_tensors(model(**x)) for x in inputs]
        report = []
        for name in layers:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            original = getattr(parent, attr)
            quant_cls = QuantConv2d if isinstance(original, nn.Conv2d) else QuantLinear
            setattr(parent, attr, quant_cls.from_float(original, scales[name], out_dtype=out_dtype))
            try:
                worst, worst_key = float("inf"), ""
                for x, ref in zip(inputs, refs):
                    for key, value in _tensors(model(**x)).items():
                        s = sqnr_db(ref[key], value.to(ref[key].dtype))
                        if s < worst:
                            worst, worst_key = s, key
            finally:
                setattr(parent, attr, original)
            report.append(LayerSensitivity(name, worst, worst_key))
    return sorted(report, key=lambda r: r.sqnr_db)


def save_report(report: Sequence[LayerSensitivity], path: str | Path) -> None:
    Path(path).write_text(json.dumps([asdict(r) for r in report], indent=1) + "\n")


def format_report(report: Sequence[LayerSensitivity], top: int = 15) -> str:
    lines = [f"{'layer':<60}{'SQNR dB':>10}  worst output"]
    lines += [f"{r.layer:<60}{r.sqnr_db:>10.1f}  {r.worst_output}" for r in report[:top]]
    if len(report) > top:
        lines.append(f"... {len(report) - top} more (least sensitive last)")
    return "\n".join(lines)

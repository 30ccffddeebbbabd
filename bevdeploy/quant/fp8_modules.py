"""Conversion to fp8 (e4m3) layers: ``Fp8Linear``, ``Fp8Conv2d`` and ``quantize_modules_fp8``.

The fp8 counterpart of :mod:`bevdeploy.quant.modules`: calibration gives each layer's input range
``amax`` (the same tables, calibrators and scope as int8); the input scale is ``amax / 448`` (e4m3's
largest finite value), the weights are quantized per output channel (``amax_o / 448``) into the
K-contiguous layouts the kernels read (Linear ``[N, K]``, Conv2d ``[O, kh, kw, C]``), and every
calibrated ``nn.Linear`` / ``nn.Conv2d`` is swapped for its fp8 module. A converted layer computes
(see :mod:`bevdeploy.quant.fp8_kernels`)::

    y = act( input_scale * weight_scale[o] * sum(e4m3(x / input_scale) * weight) + bias[o] [+ residual] )

with fp8 x fp8 -> fp32 tensor-core math; it returns fp16 (or fp32) and, for convs, channels-last
4-D tensors.

Calibration for fp8. e4m3 keeps 3 mantissa bits at every magnitude from 2^-6 * scale up to 448 *
scale, so its relative rounding error (<= 1/16) does not shrink when the range is clipped, unlike
int8's 127 uniform steps. The max calibrator (no clipping, nothing saturates) is therefore the fp8
default. The entropy calibrator's KL search models int8's 128 uniform levels; applied to fp8 it
acts as an outlier-clipping heuristic (values above its threshold saturate at +-448) and is
accepted, not tuned for e4m3.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from bevdeploy.ops._utils import use_triton
from bevdeploy.quant import fp8_kernels
from bevdeploy.quant.fp8_kernels import (
    FP8_DTYPE,
    FP8_MAX,
    fp8_conv2d,
    fp8_linear,
    quantize_fp8,
    quantize_weight_fp8,
    reference_quantize_fp8,
)
from bevdeploy.quant.modules import (
    LayerReport,
    ScaledInputLayer,
    conv_unsupported,
    explicit_padding,
    fusable_activation,
)

__all__ = ["FP8_MAX", "Fp8Conv2d", "Fp8Linear", "quantize_modules_fp8", "scaled_mm_layer"]

_OUT_DTYPES = (torch.float16, torch.float32)


class _Fp8Base(ScaledInputLayer):
    """Shared by the fp8 layers: the input cast to e4m3 and the epilogue outside the scaled product."""

    #: Quantize the input with plain torch ops (divide, clamp, cast) instead of the quantize op: under
    #: a compiler they fuse into the kernel that produces the input. Engines set it.
    quantize_in_graph: bool = False
    #: Run only the scaled product in the fp8 op and the epilogue (bias, residual, activation) as plain
    #: torch ops after it, which a compiler fuses with whatever consumes the output (the next layer's
    #: quantization included). Set by ``quantize_modules_fp8`` for the layers ``torch._scaled_mm``
    #: takes (cuBLASLt has no residual / activation epilogue); the Triton kernels fuse it themselves.
    epilogue_in_graph: bool = False

    def _epilogue(self, y: Tensor, residual: Tensor | None, channel_dim: int) -> Tensor:
        """act(y + bias + residual) in ``y``'s dtype (fp32 math where it is fp32)."""
        if self.bias is not None:
            shape = [1] * y.dim()
            shape[channel_dim] = -1
            y = y + self.bias.view(shape).to(y.dtype)
        if residual is not None:
            y = y + residual.to(y.dtype)
        if self.activation == "relu":
            y = torch.relu(y)
        elif self.activation == "silu":
            y = torch.nn.functional.silu(y)
        return y

    def _quantize_input(self, x: Tensor) -> Tensor:
        if x.dtype == FP8_DTYPE:
            return x
        if self.quantize_in_graph:
            return reference_quantize_fp8(x, self._input_scale)
        return quantize_fp8(x, self._input_scale)

    def _precision(self) -> str:
        try:
            if self.weight.device.type == "cuda":
                kernel = "torch._scaled_mm / triton fp8 tl.dot"
            elif use_triton(self.weight):
                kernel = "triton fp8 tl.dot (interpreter)"
            else:
                kernel = "torch reference on e4m3 codes"
        except NotImplementedError:
            kernel = "unavailable (CUDA without Triton)"
        out = "fp16" if self.out_dtype == torch.float16 else "fp32"
        return f"precision=fp8 (e4m3 x e4m3 -> fp32, per-channel weights, {kernel}), out={out}"


class Fp8Linear(_Fp8Base):
    """``nn.Linear`` running e4m3 x e4m3 -> fp32 (see :func:`bevdeploy.quant.fp8_kernels.fp8_linear`).

    Buffers: ``weight`` (Tensor[N, K] float8_e4m3fn), ``weight_scale`` (Tensor[N] float32), ``bias``
    (Tensor[N] float32 or None), ``input_scale_tensor`` (float64 scalar). Build with :meth:`from_float`.

    Args:
        in_features (int): K.
        out_features (int): N.
        bias (bool): whether a bias buffer exists.
        input_scale (float): calibrated per-tensor scale of the input (amax / 448).
        activation (str): ``"none"``, ``"relu"`` or ``"silu"``, fused in the epilogue.
        out_dtype (torch.dtype): torch.float16 (default) or torch.float32.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, input_scale: float = 1.0,
                 activation: str = "none", out_dtype: torch.dtype = torch.float16, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._init_common(input_scale, activation, out_dtype, device)
        self.register_buffer("weight", torch.zeros(out_features, in_features, device=device).to(FP8_DTYPE))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, input_scale: float, activation: str = "none", *,
                   out_dtype: torch.dtype = torch.float16) -> Fp8Linear:
        """Quantize ``linear``'s weight per output channel; ``input_scale`` (amax / 448) comes from calibration."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Fp8Linear.from_float takes an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, input_scale=input_scale,
                activation=activation, out_dtype=out_dtype, device=w.device)
        wq, ws = quantize_weight_fp8(w)
        with torch.no_grad():
            q.weight.copy_(wq)
            q.weight_scale.copy_(ws)
            if linear.bias is not None:
                q.bias.copy_(linear.bias.detach().float())
        return q

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """x (Tensor[..., K]) float (quantized here with ``input_scale``) or e4m3 codes -> Tensor[..., N]."""
        x_q = self._quantize_input(x)
        if self.epilogue_in_graph:
            y = fp8_linear(x_q, self.weight, self._input_scale, self.weight_scale, out_dtype=self.out_dtype)
            return self._epilogue(y, residual, -1)
        return fp8_linear(x_q, self.weight, self._input_scale, self.weight_scale, self.bias,
                          residual=residual, activation=self.activation, out_dtype=self.out_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"input_scale={self._input_scale:.6g}, activation={self.activation}, "
                f"epilogue_in_graph={self.epilogue_in_graph}, {self._precision()}")


class Fp8Conv2d(_Fp8Base):
    """``nn.Conv2d`` (groups=1, zero padding) on e4m3 codes (see :func:`bevdeploy.quant.fp8_kernels.fp8_conv2d`);
    outputs are channels-last 4-D.

    Buffers: ``weight`` (Tensor[O, kh, kw, C] float8_e4m3fn, K-contiguous), ``weight_scale`` (Tensor[O]
    float32), ``bias`` (Tensor[O] float32 or None), ``input_scale_tensor``. Build with :meth:`from_float`
    (fold BatchNorm first).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, *, input_scale: float = 1.0, activation: str = "none",
                 out_dtype: torch.dtype = torch.float16, device=None) -> None:
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.groups = 1
        self._init_common(input_scale, activation, out_dtype, device)
        kh, kw = self.kernel_size
        self.register_buffer("weight", torch.zeros(out_channels, kh, kw, in_channels, device=device).to(FP8_DTYPE))
        self.register_buffer("weight_scale", torch.ones(out_channels, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_channels, device=device) if bias else None)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, input_scale: float, activation: str = "none", *,
                   out_dtype: torch.dtype = torch.float16) -> Fp8Conv2d:
        """Quantize ``conv``'s weight per output channel into the [O, kh, kw, C] layout.

        Raises:
            NotImplementedError: groups != 1, a non-zero padding mode, or asymmetric 'same' padding.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"Fp8Conv2d.from_float takes an nn.Conv2d, got {type(conv).__name__}")
        reason = conv_unsupported(conv, "fp8_conv2d")
        if reason is not None:
            raise NotImplementedError(f"Fp8Conv2d: {reason}")
        w = conv.weight
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, explicit_padding(conv),
                conv.dilation, conv.bias is not None, input_scale=input_scale, activation=activation,
                out_dtype=out_dtype, device=w.device)
        wq, ws = quantize_weight_fp8(w)
        with torch.no_grad():
            q.weight.copy_(wq.permute(0, 2, 3, 1))
            q.weight_scale.copy_(ws)
            if conv.bias is not None:
                q.bias.copy_(conv.bias.detach().float())
        return q

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """x (Tensor[N, C, H, W]) float or e4m3 codes -> Tensor[N, O, Ho, Wo] channels-last;
        ``residual`` (same shape) is added before the activation."""
        x_q = self._quantize_input(x)
        if self.epilogue_in_graph:
            y = fp8_conv2d(x_q, self.weight, self._input_scale, self.weight_scale, None, self.stride, self.padding,
                           self.dilation, out_dtype=self.out_dtype)
            return self._epilogue(y, residual, 1)
        return fp8_conv2d(x_q, self.weight, self._input_scale, self.weight_scale, self.bias,
                          self.stride, self.padding, self.dilation, residual=residual, activation=self.activation,
                          out_dtype=self.out_dtype)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, "
                f"input_scale={self._input_scale:.6g}, activation={self.activation}, "
                f"epilogue_in_graph={self.epilogue_in_graph}, {self._precision()}")


def scaled_mm_layer(layer: nn.Module) -> bool:
    """Whether ``layer``'s fp8 form is a GEMM that ``torch._scaled_mm`` takes on CUDA: a Linear, or a
    1x1 / stride-1 / unpadded Conv2d (a GEMM on the NHWC view), with K and N multiples of 16."""
    if type(layer) is nn.Linear:
        k, n = layer.in_features, layer.out_features
    elif type(layer) is nn.Conv2d and layer.groups == 1:
        if tuple(layer.kernel_size) != (1, 1) or tuple(layer.stride) != (1, 1) or explicit_padding(layer) != (0, 0):
            return False
        k, n = layer.in_channels, layer.out_channels
    else:
        return False
    return k % 16 == 0 and n % 16 == 0


def quantize_modules_fp8(
    model: nn.Module,
    scales: dict[str, float],
    *,
    keep_float: set[str] | frozenset[str] = frozenset(),
    fuse_relu: bool = True,
    out_dtype: torch.dtype = torch.float16,
    quantize_in_graph: bool = False,
) -> list[LayerReport]:
    """Swap every calibrated ``nn.Linear`` / ``nn.Conv2d`` of ``model`` for its fp8 module, in place.

    The rules of :func:`bevdeploy.quant.modules.quantize_modules` (which layers, fused ReLU / SiLU,
    subclasses left alone), with fp8 modules.

    Args:
        model (nn.Module): float model (eval mode, BatchNorm folded), modified in place.
        scales (dict[str, float]): calibrated per-tensor input scale (amax / 448) per layer name.
        keep_float (set[str]): layer names to leave float even when calibrated.
        fuse_relu (bool): fuse following ReLU / SiLU modules into the fp8 epilogue.
        out_dtype (torch.dtype): output dtype of the fp8 layers (torch.float16 or torch.float32).
        quantize_in_graph (bool): quantize inputs with plain torch ops (fusable by a compiler), and for
            the layers that ``torch._scaled_mm`` takes on CUDA (:func:`scaled_mm_layer`, with
            ``fp8_kernels.GEMM_BACKEND == "scaled_mm"``) run the epilogue as plain torch ops too.

    Returns:
        list[LayerReport]: ``(name, "fp8" | "float" | "fused", reason)`` for every Linear / Conv2d (and
        subclass) of the model in module order, plus the fused activations.
    """
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be torch.float16 or torch.float32, got {out_dtype}")
    unknown = set(keep_float) - {n for n, _ in model.named_modules()}
    if unknown:
        raise ValueError(f"keep_float names no module of the model: {sorted(unknown)}")
    for name, s in scales.items():
        if not (isinstance(s, (int, float)) and not isinstance(s, bool) and 0.0 < float(s) < math.inf):
            raise ValueError(f"scales[{name!r}] must be a positive finite float, got {s!r}")
    modules = dict(model.named_modules())
    report: list[LayerReport] = []
    for name, mod in list(modules.items()):
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            continue
        if type(mod) not in (nn.Linear, nn.Conv2d):
            report.append(LayerReport(name, "float", f"{type(mod).__name__} is a subclass, not a plain "
                                                     "nn.Linear / nn.Conv2d: left alone"))
            continue
        if name == "":
            raise ValueError("model is itself a Linear/Conv2d: wrap it in a module (e.g. nn.Sequential) to swap it")
        if name not in scales:
            report.append(LayerReport(name, "float", "no calibrated input scale"))
            continue
        if name in keep_float:
            report.append(LayerReport(name, "float", "kept float (keep_float)"))
            continue
        if isinstance(mod, nn.Conv2d) and (why := conv_unsupported(mod, "fp8_conv2d")) is not None:
            report.append(LayerReport(name, "float", why))
            continue
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name]
        activation, act_child = "none", None
        if fuse_relu and (found := fusable_activation(parent, child)) is not None:
            act_child, activation = found
        qcls = Fp8Linear if isinstance(mod, nn.Linear) else Fp8Conv2d
        qmod = qcls.from_float(mod, float(scales[name]), activation, out_dtype=out_dtype)
        qmod.quantize_in_graph = quantize_in_graph
        qmod.epilogue_in_graph = quantize_in_graph and fp8_kernels.GEMM_BACKEND == "scaled_mm" and scaled_mm_layer(mod)
        qmod.train(mod.training)
        setattr(parent, child, qmod)
        what = "linear" if isinstance(mod, nn.Linear) else "conv {}x{} stride {}".format(
            *mod.kernel_size, "x".join(map(str, mod.stride)))
        fused_txt = f", {activation} fused" if activation != "none" else ""
        if qmod.epilogue_in_graph:
            fused_txt += ", torch._scaled_mm GEMM with the epilogue in the graph"
        report.append(LayerReport(name, "fp8", f"fp8 {what}, input_scale={float(scales[name]):.6g}{fused_txt}"))
        if act_child is not None:
            setattr(parent, act_child, nn.Identity())
            act_name = f"{parent_name}.{act_child}" if parent_name else act_child
            report.append(LayerReport(act_name, "fused", f"{activation} runs in {name}'s fp8 epilogue"))
    return report

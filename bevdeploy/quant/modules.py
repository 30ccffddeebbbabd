"""Conversion to int8 layers: ``QuantLinear``, ``QuantConv2d``, ``fold_bn`` and ``quantize_modules``.

The second step of post-training quantization (gpt-fast's ``convert_for_runtime``): calibration
(``bevdeploy.quant.calibrate``) gives each layer's per-tensor input scale; here the float weights are
quantized per output channel (symmetric, ``scale = amax / 127``), stored as int8 buffers in the
K-contiguous layout the int8 kernels read (Linear ``[N, K]``, Conv2d ``[O, kh, kw, C]``), and every
calibrated ``nn.Linear`` / ``nn.Conv2d`` is swapped for its int8 module. The engine folds BatchNorm
into the convs first (``fold_bn``), so a conv's bias carries the BN shift.

A converted layer computes (see :mod:`bevdeploy.quant.int8_kernels`)::

    y = act( input_scale * weight_scale[o] * sum(int8(x / input_scale) * weight) + bias[o] [+ residual] )

or, with an input zero point ``z`` (asymmetric activations, ``quantize_modules(zero_points=...)``),
``sum((int8(x / input_scale + z) - z) * weight)``: ReLU / SiLU inputs are one-sided, and the full
code range on them halves the rounding step (measured +6 dB per layer on YOLOX / CenterNet).

with int8 x int8 -> int32 tensor-core math and the rest fused in the kernel's epilogue; it returns
fp16 (or fp32) and, for convs, channels-last 4-D tensors; or int8 codes when
:func:`bevdeploy.quant.chain.chain_int8` has set its ``out_scale`` (the consumer's input scale).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from bevdeploy.ops._utils import quantize_weight_per_channel, use_triton
from bevdeploy.quant.int8_kernels import (
    ACTIVATIONS,
    _check_zero_point,
    int8_conv2d,
    int8_linear,
    quantize_per_tensor,
    reference_quantize_per_tensor,
    weight_sums,
)
from bevdeploy.quant.smooth import ChannelScale

__all__ = ["LayerReport", "QuantConv2d", "QuantDeformConv2d", "QuantLinear", "fold_bn", "format_report", "quantize_modules",
           "quantize_weight_per_channel"]

_OUT_DTYPES = (torch.float16, torch.float32)




def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new conv equal to ``bn(conv(x))`` with ``bn`` in eval mode (running statistics).

    ``w' = w * gamma / sqrt(var + eps)`` per output channel, ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``.
    Computed in float64, stored in the conv's dtype; ``conv`` and ``bn`` are left untouched.

    Args:
        conv (nn.Conv2d): any groups / stride / padding.
        bn (nn.BatchNorm2d): ``num_features == conv.out_channels``, with running statistics.

    Returns:
        nn.Conv2d: same geometry as ``conv``, with a bias.
    """
    if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
        raise TypeError(f"fold_bn takes (nn.Conv2d, nn.BatchNorm2d), got ({type(conv).__name__}, {type(bn).__name__})")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"bn.num_features must equal conv.out_channels={conv.out_channels}, got {bn.num_features}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("bn has no running statistics (track_running_stats=False): nothing to fold")
    w = conv.weight.detach().double()
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=torch.float64,
                                                                               device=w.device)
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(b)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(b)
    inv_std = torch.rsqrt(bn.running_var.detach().double() + bn.eps)
    factor = gamma * inv_std
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
                      device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(w * factor[:, None, None, None])
        fused.bias.copy_((b - bn.running_mean.detach().double()) * factor + beta)
    fused.train(conv.training)
    return fused


def _check_common(input_scale: float, activation: str, out_dtype: torch.dtype) -> float:
    if isinstance(input_scale, bool) or not isinstance(input_scale, (int, float)):
        raise TypeError(f"input_scale must be a python float, got {type(input_scale).__name__}")
    input_scale = float(input_scale)
    if not (0.0 < input_scale < math.inf):
        raise ValueError(f"input_scale must be a positive finite float, got {input_scale}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be torch.float16 or torch.float32, got {out_dtype}")
    return input_scale


class ScaledInputLayer(nn.Module):
    """Base of the int8 and fp8 layers: ``input_scale`` is a python float (a constant in exported graphs)
    mirrored by the float64 buffer ``input_scale_tensor`` (saved in state dicts and engine files; loading
    restores the float)."""

    def _init_common(self, input_scale: float, activation: str, out_dtype: torch.dtype, device) -> None:
        self._input_scale = _check_common(input_scale, activation, out_dtype)
        self.register_buffer("input_scale_tensor", torch.tensor(self._input_scale, dtype=torch.float64, device=device))
        self.activation = activation
        self.out_dtype = out_dtype

    @property
    def input_scale(self) -> float:
        return self._input_scale

    @input_scale.setter
    def input_scale(self, value: float) -> None:
        self._input_scale = _check_common(value, self.activation, self.out_dtype)
        with torch.no_grad():
            self.input_scale_tensor.fill_(self._input_scale)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "input_scale_tensor" in state_dict:
            self._input_scale = _check_common(float(state_dict[prefix + "input_scale_tensor"]), self.activation,
                                              self.out_dtype)


class _QuantBase(ScaledInputLayer):
    """Shared by the int8 layers: zero points, the chain's int8 output, the tuned launch config."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        zp = state_dict.get(prefix + "input_zero_point_tensor")
        if zp is not None:  # an asymmetric layer's state: take its zero point (and buffers) before loading
            self.set_input_zero_point(int(zp))
        mul = state_dict.get(prefix + "out_mul")
        if mul is not None and getattr(self, "out_mul", None) is None:  # a folded smoothing divisor: its buffer
            self.set_out_mul(torch.ones_like(mul, dtype=torch.float32, device=self.weight.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.input_zero_point and self._zero_point_weight_sums:  # the weight sums follow the loaded weights
            self.w_sum = weight_sums(self.weight)

    #: Quantize the input with plain torch ops instead of the quantize kernel: under a compiler
    #: (the engine's Inductor) they fuse into the kernel that produces the input (its bias / residual
    #: / ReLU epilogue), saving a read and a write of the float activation. Codes may differ from the
    #: kernel's by one step where x / scale is a tie and the compiler's division is approximate.
    quantize_in_graph: bool = False
    _nhwc_input: bool = False  # True for convs (int8_conv2d reads channels-last codes)
    #: Set by :func:`bevdeploy.quant.chain.chain_int8`: the epilogue writes int8 codes of this scale
    #: (the consumer's input scale) instead of floats. None: float output (``out_dtype``).
    out_scale: float | None = None
    #: Set by :func:`bevdeploy.quant.chain.chain_int8` for YOLOX's ``DarknetBottleneck``: the epilogue
    #: adds ``residual`` after the activation (``act(conv + bias) + residual``) instead of before it.
    residual_after_act: bool = False
    #: Launch configuration (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages) picked by the build's
    #: autotune (:func:`bevdeploy.quant.autotune.autotune_int8_layers`); it is an argument of the op
    #: call, so it lands in the exported engine and loading never re-tunes. None: the heuristic.
    launch_config: tuple[int, ...] | None = None
    #: Zero point of the input codes (``x ~= input_scale * (q - input_zero_point)``; 0: symmetric). Set
    #: with :meth:`set_input_zero_point` (it precomputes the weight sums the epilogue needs).
    input_zero_point: int = 0
    #: Set by :func:`bevdeploy.quant.chain.chain_int8` with ``out_scale``: the zero point of the int8
    #: codes the epilogue writes (the consumer's ``input_zero_point``).
    out_zero_point: int = 0
    #: Whether an input zero point costs the epilogue ``z * w_sum`` (the GEMM layers); the int8 DCN
    #: subtracts it from its samples instead.
    _zero_point_weight_sums: bool = True

    def set_input_zero_point(self, zero_point: int) -> None:
        """Asymmetric input codes with this zero point (an int in [-128, 127]; 0: symmetric). Keeps
        ``w_sum`` (int32 per output channel, a non-persistent buffer: an engine constant) and, for a
        non-zero point, the int32 buffer ``input_zero_point_tensor`` (state dicts carry it, so a
        reloaded layer cannot silently lose it; symmetric layers keep their old keys)."""
        self.input_zero_point = _check_zero_point("input zero point", zero_point)
        sums = zero_point and self._zero_point_weight_sums
        self.register_buffer("w_sum", weight_sums(self.weight) if sums else None, persistent=False)
        self.register_buffer("input_zero_point_tensor", torch.tensor(zero_point, dtype=torch.int32,
                                                                     device=self.weight.device) if zero_point else None)

    def set_out_mul(self, mul: Tensor | None) -> None:
        """Multiply output channel n by ``mul[n]`` in the epilogue, after the activation and the residual and
        before the store or requantization (buffer ``out_mul``, fp32 [out channels]; None: no multiplier).
        :func:`bevdeploy.quant.chain.chain_int8` sets it to a smoothed consumer's divisor (``ChannelScale``),
        which the consumer then no longer applies, so the tensor between them can stay int8."""
        if mul is not None:
            n = self.weight.shape[0]
            if mul.shape != (n,):
                raise ValueError(f"out_mul must have shape [{n}] (one per output channel), got {list(mul.shape)}")
            if not bool(torch.isfinite(mul).all()):
                raise ValueError("out_mul must be finite")
            mul = mul.detach().to(device=self.weight.device, dtype=torch.float32).clone()
        self.register_buffer("out_mul", mul)

    def _kernel_args(self) -> dict:
        """The int8 op's keyword arguments this layer's state sets: zero points, weight sums, out_mul."""
        return {"x_zero_point": self.input_zero_point, "w_sum": getattr(self, "w_sum", None),
                "out_zero_point": self.out_zero_point if self.out_scale is not None else 0,
                "out_mul": getattr(self, "out_mul", None)}

    def _quantize_input(self, x: Tensor) -> Tensor:
        if x.dtype == torch.int8:
            return x
        if self.quantize_in_graph:
            q = reference_quantize_per_tensor(x, self._input_scale, self.input_zero_point)
            # convs read NHWC codes: a compiler fuses this layout into the quantize pass
            return q.contiguous(memory_format=torch.channels_last) if q.dim() == 4 and self._nhwc_input else q
        return quantize_per_tensor(x, self._input_scale, self.input_zero_point)

    def _precision(self) -> str:
        try:
            kernel = "triton int8 tl.dot" if use_triton(self.weight) else "torch reference on int8 codes"
        except NotImplementedError:
            kernel = "unavailable (CUDA without Triton)"
        out = "fp16" if self.out_dtype == torch.float16 else "fp32"
        if self.out_scale is not None:
            out = f"int8 (scale {self.out_scale:.6g})"
        tuned = f", config={list(self.launch_config)}" if self.launch_config is not None else ""
        after = ", residual after activation" if self.residual_after_act else ""
        if self.input_zero_point:
            after += f", input zero point {self.input_zero_point}"
        if self.out_scale is not None and self.out_zero_point:
            after += f", output zero point {self.out_zero_point}"
        if getattr(self, "out_mul", None) is not None:
            after += ", per-channel out multiplier (folded smoothing)"
        return f"precision=int8 (int8 x int8 -> int32, per-channel weights, {kernel}), out={out}{after}{tuned}"


class QuantLinear(_QuantBase):
    """``nn.Linear`` running int8 x int8 -> int32 (see :func:`bevdeploy.quant.int8_kernels.int8_linear`).

    Buffers: ``weight`` (Tensor[N, K] int8), ``weight_scale`` (Tensor[N] float32), ``bias``
    (Tensor[N] float32 or None), ``input_scale_tensor`` (float64 scalar). Build with :meth:`from_float`.

    Args:
        in_features (int): K.
        out_features (int): N.
        bias (bool): whether a bias buffer exists.
        input_scale (float): calibrated per-tensor scale of the input (amax / 127).
        activation (str): ``"none"``, ``"relu"`` or ``"silu"``, fused in the kernel's epilogue.
        out_dtype (torch.dtype): torch.float16 (default) or torch.float32.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, input_scale: float = 1.0,
                 activation: str = "none", out_dtype: torch.dtype = torch.float16, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._init_common(input_scale, activation, out_dtype, device)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, input_scale: float, activation: str = "none", *,
                   out_dtype: torch.dtype = torch.float16) -> QuantLinear:
        """Quantize ``linear``'s weight per output channel; ``input_scale`` comes from calibration."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QuantLinear.from_float takes an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, input_scale=input_scale,
                activation=activation, out_dtype=out_dtype, device=w.device)
        wq, ws = quantize_weight_per_channel(w)
        with torch.no_grad():
            q.weight.copy_(wq)
            q.weight_scale.copy_(ws)
            if linear.bias is not None:
                q.bias.copy_(linear.bias.detach().float())
        return q

    def forward(self, x: Tensor, residual: Tensor | None = None, residual_scale: float | None = None,
                residual_zero_point: int = 0, residual_mul: Tensor | None = None) -> Tensor:
        """x (Tensor[..., K]) float (quantized here with ``input_scale``) or int8 codes of ``input_scale``
        (and ``input_zero_point``) -> Tensor[..., N] (int8 codes of ``out_scale`` when set); an int8
        ``residual`` needs its scale and zero point (added before the activation, after it when
        ``residual_after_act`` is set)."""
        return int8_linear(self._quantize_input(x), self.weight, self._input_scale, self.weight_scale, self.bias,
                           residual=residual, residual_scale=residual_scale, activation=self.activation,
                           out_dtype=self.out_dtype, out_scale=self.out_scale, config=self.launch_config,
                           residual_after_act=self.residual_after_act, residual_zero_point=residual_zero_point,
                           residual_mul=residual_mul,
                           **self._kernel_args())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"input_scale={self._input_scale:.6g}, activation={self.activation}, {self._precision()}")


def explicit_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """Symmetric zero padding of ``conv`` as two ints (None when it pads asymmetrically: 'same' with an even
    dilated kernel)."""
    if not isinstance(conv.padding, str):
        return tuple(conv.padding)
    if conv.padding == "valid":
        return (0, 0)
    pads = []
    for k, d in zip(conv.kernel_size, conv.dilation):  # 'same' (stride 1)
        total = d * (k - 1)
        if total % 2:
            return None
        pads.append(total // 2)
    return tuple(pads)


def conv_unsupported(conv: nn.Conv2d, kernel: str = "int8_conv2d") -> str | None:
    """Why ``conv`` cannot run on ``kernel`` (the int8 or fp8 conv: groups 1, symmetric zero padding); None
    when it can."""
    if conv.groups != 1:
        return f"groups={conv.groups} ({kernel} supports groups=1)"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} ({kernel} pads with zeros)"
    if explicit_padding(conv) is None:
        return f"padding='same' with an even dilated kernel pads asymmetrically ({kernel} pads symmetrically)"
    return None


class QuantConv2d(_QuantBase):
    """``nn.Conv2d`` (groups=1, zero padding) running int8 implicit GEMM
    (see :func:`bevdeploy.quant.int8_kernels.int8_conv2d`); outputs are channels-last 4-D.

    Buffers: ``weight`` (Tensor[O, kh, kw, C] int8, K-contiguous), ``weight_scale`` (Tensor[O] float32),
    ``bias`` (Tensor[O] float32 or None), ``input_scale_tensor``. Build with :meth:`from_float`
    (fold BatchNorm first with :func:`fold_bn`).
    """

    _nhwc_input = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, *, input_scale: float = 1.0, activation: str = "none",
                 out_dtype: torch.dtype = torch.float16, device=None) -> None:
        super().__init__()
        from torch.nn.modules.utils import _pair

        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.groups = 1
        self._init_common(input_scale, activation, out_dtype, device)
        kh, kw = self.kernel_size
        self.register_buffer("weight", torch.zeros(out_channels, kh, kw, in_channels, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_channels, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_channels, device=device) if bias else None)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, input_scale: float, activation: str = "none", *,
                   out_dtype: torch.dtype = torch.float16) -> QuantConv2d:
        """Quantize ``conv``'s weight per output channel into the [O, kh, kw, C] layout.

        Raises:
            NotImplementedError: groups != 1, a non-zero padding mode, or asymmetric 'same' padding.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"QuantConv2d.from_float takes an nn.Conv2d, got {type(conv).__name__}")
        reason = conv_unsupported(conv)
        if reason is not None:
            raise NotImplementedError(f"QuantConv2d: {reason}")
        w = conv.weight
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, explicit_padding(conv),
                conv.dilation, conv.bias is not None, input_scale=input_scale, activation=activation,
                out_dtype=out_dtype, device=w.device)
        wq, ws = quantize_weight_per_channel(w)
        with torch.no_grad():
            q.weight.copy_(wq.permute(0, 2, 3, 1))
            q.weight_scale.copy_(ws)
            if conv.bias is not None:
                q.bias.copy_(conv.bias.detach().float())
        return q

    def forward(self, x: Tensor, residual: Tensor | None = None, residual_scale: float | None = None,
                residual_zero_point: int = 0, residual_mul: Tensor | None = None) -> Tensor:
        """x (Tensor[N, C, H, W]) float or int8 codes of ``input_scale`` and ``input_zero_point``
        (channels-last memory avoids a relayout) -> Tensor[N, O, Ho, Wo] channels-last (int8 codes of
        ``out_scale`` when set); ``residual`` (same shape; float, or int8 with ``residual_scale`` and
        ``residual_zero_point``) is added before the activation (after it when ``residual_after_act`` is set)."""
        return int8_conv2d(self._quantize_input(x), self.weight, self._input_scale, self.weight_scale, self.bias,
                           self.stride, self.padding, self.dilation, residual=residual,
                           residual_scale=residual_scale, activation=self.activation, out_dtype=self.out_dtype,
                           out_scale=self.out_scale, config=self.launch_config,
                           residual_after_act=self.residual_after_act, residual_zero_point=residual_zero_point,
                           residual_mul=residual_mul,
                           **self._kernel_args())

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, "
                f"input_scale={self._input_scale:.6g}, activation={self.activation}, {self._precision()}")


class QuantDeformConv2d(_QuantBase):
    """A DCNv2 conv (``ModulatedDeformConv2dPack``, groups 1) on int8 codes: the offset conv reads the
    same codes (a :class:`QuantConv2d` at the same input scale, or float when kept float), then the
    ``int8`` variant of :func:`bevdeploy.ops.modulated_deform_conv2d.modulated_deform_conv2d` gathers
    int8 corners (half the bytes of fp16), blends them into fp16 samples, multiplies them with the int8
    weight codes on fp16 MMAs (the samples are not rounded to codes: that cost 16 dB on the CPU-trained
    CenterNet) and ends in the int8 layers' epilogue (bias, fused ReLU, fp16 or the next layer's codes).

    An input zero point (asymmetric codes) is sampled as ``q - z``, so a sample outside the image still
    reads the value 0; the offset conv takes the same point. Buffers:
    ``weight`` (Tensor[O, C, kh, kw] int8, channels-last memory: the kernel's K-contiguous layout),
    ``weight_scale``, ``bias``, ``input_scale_tensor``; child ``conv_offset``. Build with :meth:`from_pack`.
    The kernel writes fp16: an fp32 ``out_dtype`` costs a cast.
    """

    _nhwc_input = True
    _zero_point_weight_sums = False  # the kernel samples q - z: nothing for the epilogue

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 deform_groups: int = 1, bias: bool = True, *, input_scale: float = 1.0, activation: str = "none",
                 out_dtype: torch.dtype = torch.float16, device=None) -> None:
        super().__init__()
        from torch.nn.modules.utils import _pair

        if activation not in ("none", "relu"):
            raise ValueError(f"QuantDeformConv2d fuses 'none' or 'relu', got {activation!r}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.deform_groups = int(deform_groups)
        self._init_common(input_scale, activation, out_dtype, device)
        kh, kw = self.kernel_size
        w = torch.zeros(out_channels, in_channels, kh, kw, dtype=torch.int8, device=device)
        self.register_buffer("weight", w.contiguous(memory_format=torch.channels_last))
        self.register_buffer("weight_scale", torch.ones(out_channels, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_channels, device=device) if bias else None)
        self.conv_offset: nn.Module = nn.Conv2d(in_channels, 3 * self.deform_groups * kh * kw, self.kernel_size,
                                                self.stride, self.padding, self.dilation, device=device)

    @classmethod
    def from_pack(cls, pack: nn.Module, input_scale: float, activation: str = "none", *,
                  out_dtype: torch.dtype = torch.float16) -> QuantDeformConv2d:
        """Quantize ``pack``'s weight per output channel; ``conv_offset`` is taken over as it is (convert
        it first: :func:`quantize_modules` does). ``input_scale``: the calibrated scale of the pack's input
        (the offset conv's)."""
        from bevdeploy.ops.modulated_deform_conv2d import ModulatedDeformConv2dPack
        from bevdeploy.ops.modulated_deform_conv2d import quantize_weight_per_channel as dcn_weight_per_channel

        if not isinstance(pack, ModulatedDeformConv2dPack):
            raise TypeError(f"QuantDeformConv2d.from_pack takes a ModulatedDeformConv2dPack, got {type(pack).__name__}")
        if pack.groups != 1:
            raise NotImplementedError(f"QuantDeformConv2d: groups={pack.groups} (the int8 kernel takes groups=1)")
        w = pack.weight
        q = cls(pack.in_channels, pack.out_channels, pack.kernel_size, pack.stride, pack.padding, pack.dilation,
                pack.deform_groups, pack.bias is not None, input_scale=input_scale, activation=activation,
                out_dtype=out_dtype, device=w.device)
        wq, ws = dcn_weight_per_channel(w.detach().float())
        with torch.no_grad():
            q.weight.copy_(wq)
            q.weight_scale.copy_(ws)
            if pack.bias is not None:
                q.bias.copy_(pack.bias.detach().float())
        q.conv_offset = pack.conv_offset
        q.input_scale = input_scale  # the offset conv, when int8, reads the same codes
        return q

    @_QuantBase.input_scale.setter
    def input_scale(self, value: float) -> None:
        _QuantBase.input_scale.fset(self, value)
        if isinstance(getattr(self, "conv_offset", None), QuantConv2d):
            self.conv_offset.input_scale = self._input_scale

    def set_input_zero_point(self, zero_point: int) -> None:
        """Asymmetric input codes; the offset conv (int8) reads the same codes, so it takes the same point.
        The kernel samples ``q - z`` (a sample outside the image reads the value 0): no weight sums."""
        super().set_input_zero_point(zero_point)
        if isinstance(getattr(self, "conv_offset", None), QuantConv2d):
            self.conv_offset.set_input_zero_point(zero_point)

    def forward(self, x: Tensor) -> Tensor:
        """x (Tensor[N, C, H, W]) float or int8 codes of ``input_scale`` -> Tensor[N, O, Ho, Wo]
        channels-last: fp16, or int8 codes of ``out_scale`` when set."""
        from bevdeploy.ops.modulated_deform_conv2d import modulated_deform_conv2d, split_offset_mask

        xq = self._quantize_input(x)
        z = self.input_zero_point
        if isinstance(self.conv_offset, QuantConv2d) and self.conv_offset.input_zero_point == z:
            off_in = xq  # the same scale and zero point (see the setters): no second quantize pass
        elif x.dtype == torch.int8:  # a float offset conv behind an int8 producer reads the dequantized codes
            off_in = ((x.float() - z) * self._input_scale).to(self.conv_offset.weight.dtype)
        else:
            off_in = x
        offset, mask = split_offset_mask(self.conv_offset(off_in))
        out_scale = self.out_scale
        y = modulated_deform_conv2d(xq, offset, mask, self.weight, self.bias, self.stride, self.padding,
                                    self.dilation, 1, self.deform_groups, variant="int8",
                                    input_scale=self._input_scale, weight_scale=self.weight_scale,
                                    activation=self.activation, out_scale=out_scale,
                                    out_zero_point=self.out_zero_point if out_scale is not None else 0,
                                    input_zero_point=z)
        # the kernel writes fp16; fp32 storage (the ``int8`` precision) takes a cast
        return y if out_scale is not None or y.dtype == self.out_dtype else y.to(self.out_dtype)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, deform_groups={self.deform_groups}, "
                f"bias={self.bias is not None}, input_scale={self._input_scale:.6g}, activation={self.activation}, "
                f"{self._precision().replace('int8 x int8 -> int32', 'int8 gathers, fp16 samples x int8 weight codes')}")


class LayerReport(NamedTuple):
    """One row of :func:`quantize_modules`'s report."""

    name: str
    precision: str  # "int8" or "float"
    reason: str


FUSABLE = {nn.ReLU: "relu", nn.SiLU: "silu"}


def fusable_activation(parent: nn.Module, child_name: str) -> tuple[str, str] | None:
    """(name of the activation module, activation) when ``child_name`` is followed in the nn.Sequential
    ``parent`` by an nn.ReLU / nn.SiLU, with only nn.Identity (e.g. a folded BatchNorm) in between."""
    if not isinstance(parent, nn.Sequential):
        return None
    names = list(parent._modules)
    for nxt in names[names.index(child_name) + 1:]:
        mod = parent._modules[nxt]
        if type(mod) is nn.Identity:
            continue
        act = FUSABLE.get(type(mod))
        return (nxt, act) if act is not None else None
    return None


def quantize_modules(
    model: nn.Module,
    scales,
    *,
    keep_float: set[str] | frozenset[str] = frozenset(),
    fuse_relu: bool = True,
    out_dtype: torch.dtype = torch.float16,
    quantize_in_graph: bool = False,
    zero_points: dict[str, int] | None = None,
    deform_convs: bool = False,
) -> list[LayerReport]:
    """Swap every calibrated ``nn.Linear`` / ``nn.Conv2d`` of ``model`` for its int8 module, in place.

    A layer is converted when its qualified name (``model.named_modules()``) has an input scale in
    ``scales`` and is not in ``keep_float``; convs with groups != 1, a non-zero padding mode or
    asymmetric 'same' padding stay float. Fold BatchNorm into the convs first (:func:`fold_bn`).
    With ``deform_convs``, DCNv2 convs (``ModulatedDeformConv2dPack``, groups 1) become
    :class:`QuantDeformConv2d` with their offset conv's input scale and zero point (the same tensor),
    unless kept float.

    With ``fuse_relu`` (default), an ``nn.ReLU`` (or ``nn.SiLU``: the epilogue has both) that directly
    follows a converted layer inside an ``nn.Sequential`` (``nn.Identity`` modules in between are
    skipped) becomes the int8 layer's fused activation and is replaced by ``nn.Identity`` in that
    Sequential. Activations called from ``forward`` code (torchvision's ``self.relu``) are not
    fused: the module graph does not say what runs after what.

    Args:
        model (nn.Module): float model (eval mode), modified in place.
        scales (dict[str, float] | CalibrationTable): calibrated per-tensor input scale (amax / 127)
            per layer name, or the table :func:`bevdeploy.quant.calibrate.calibrate` returns.
        keep_float (set[str]): layer names to leave float even when calibrated.
        fuse_relu (bool): fuse following ReLU / SiLU modules into the int8 epilogue.
        out_dtype (torch.dtype): output dtype of the int8 layers (torch.float16 or torch.float32).
        quantize_in_graph (bool): the layers quantize their input with plain torch ops (fusable by a
            compiler, see ``_QuantBase.quantize_in_graph``) instead of the quantize kernel.
        zero_points (dict[str, int], optional): input zero point per layer name (asymmetric codes;
            ``scales`` then holds the asymmetric scales, e.g. ``CalibrationTable.qparams(name, True)``);
            layers not named are symmetric.
        deform_convs (bool): convert the DCNv2 convs too (off by default: QAT does not model them, and
            their accuracy on trained models is still being measured).

    Only exact ``nn.Linear`` / ``nn.Conv2d`` are swapped: subclasses (``nn.MultiheadAttention``'s
    ``out_proj``, whose parent reads its weight directly) are reported float and left alone.

    Returns:
        list[LayerReport]: ``(name, "int8" | "float", reason)`` for every Linear / Conv2d (and subclass)
        of the model, in module order, plus ``(name, "fused", ...)`` rows for the activations folded into
        an int8 layer's epilogue.
    """
    if hasattr(scales, "amax") and hasattr(scales, "scale"):  # a CalibrationTable, straight from calibrate()
        scales = {name: scales.scale(name) for name in scales.amax}
    unknown = set(keep_float) - {n for n, _ in model.named_modules()}
    if unknown:
        raise ValueError(f"keep_float names no module of the model: {sorted(unknown)}")
    for name, s in scales.items():
        if not (isinstance(s, (int, float)) and not isinstance(s, bool) and 0.0 < float(s) < math.inf):
            raise ValueError(f"scales[{name!r}] must be a positive finite float, got {s!r}")
    modules = dict(model.named_modules())
    report: list[LayerReport] = []
    for name, mod in list(modules.items()):
        if not isinstance(mod, (nn.Linear, nn.Conv2d)) or isinstance(mod, _QuantBase):
            continue
        if type(mod) not in (nn.Linear, nn.Conv2d):
            # e.g. nn.MultiheadAttention's out_proj (its parent reads .weight directly): not swappable
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
        if isinstance(mod, nn.Conv2d) and (why := conv_unsupported(mod)) is not None:
            report.append(LayerReport(name, "float", why))
            continue
        qcls = QuantLinear if isinstance(mod, nn.Linear) else QuantConv2d
        zp = int((zero_points or {}).get(name, 0))
        activation, act_name = _swap_in(
            modules, name, mod, lambda act: qcls.from_float(mod, float(scales[name]), act, out_dtype=out_dtype),
            fusable=tuple(FUSABLE.values()) if fuse_relu else (), quantize_in_graph=quantize_in_graph, zero_point=zp)
        what = "linear" if isinstance(mod, nn.Linear) else "conv {}x{} stride {}".format(
            *mod.kernel_size, "x".join(map(str, mod.stride)))
        report.append(LayerReport(name, "int8", f"int8 {what}, input_scale={float(scales[name]):.6g}"
                                                f"{_int8_suffix(zp, activation)}"))
        if act_name is not None:
            report.append(LayerReport(act_name, "fused", f"{activation} runs in {name}'s int8 epilogue"))
    if deform_convs:
        _quantize_deform_convs(model, modules, scales, keep_float, fuse_relu, quantize_in_graph, zero_points or {},
                               out_dtype, report)
    return report


def _swap_in(modules: dict[str, nn.Module], name: str, mod: nn.Module, make, *, fusable: tuple[str, ...],
             quantize_in_graph: bool, zero_point: int) -> tuple[str, str | None]:
    """Replace ``name`` (``mod``) by ``make(activation)``, fusing the activation that follows it in its
    ``nn.Sequential`` when it is one of ``fusable`` (the activation module becomes ``nn.Identity``); returns
    (activation, the fused activation module's name or None)."""
    parent_name, _, child = name.rpartition(".")
    parent = modules[parent_name]
    # a smoothed layer (smooth_inputs' Sequential(ChannelScale, layer)): its activation follows the wrapper
    outer_name, outer_child = parent_name, child
    if (type(parent) is nn.Sequential and len(parent) == 2 and child == "1" and isinstance(parent[0], ChannelScale)
            and parent_name):
        outer_name, _, outer_child = parent_name.rpartition(".")
    outer = modules[outer_name]
    activation, act_name = "none", None
    if (found := fusable_activation(outer, outer_child)) is not None and found[1] in fusable:
        act_child, activation = found
        act_name = f"{outer_name}.{act_child}" if outer_name else act_child
    qmod = make(activation)
    qmod.quantize_in_graph = quantize_in_graph
    if zero_point:
        qmod.set_input_zero_point(zero_point)
    qmod.train(mod.training)
    setattr(parent, child, qmod)
    if act_name is not None:
        setattr(outer, act_name.rpartition(".")[2], nn.Identity())
    return activation, act_name


def _int8_suffix(zero_point: int, activation: str) -> str:
    return (f", zero point {zero_point}" if zero_point else "") + (f", {activation} fused" if activation != "none" else "")


def _quantize_deform_convs(model, modules, scales, keep_float, fuse_relu, quantize_in_graph, zero_points,
                           out_dtype, report) -> None:
    """DCNv2 convs (``ModulatedDeformConv2dPack``) -> :class:`QuantDeformConv2d`, after the plain layers:
    the pack's ``conv_offset`` (already converted) reads the same input, so its calibrated scale is the
    DCN's (scale and zero point). A row per DCN goes into ``report`` in front of its offset conv's."""
    from bevdeploy.ops.modulated_deform_conv2d import ModulatedDeformConv2dPack

    for name, mod in list(modules.items()):
        if not isinstance(mod, ModulatedDeformConv2dPack):
            continue
        off_name = f"{name}.conv_offset"
        at = next((i for i, r in enumerate(report) if r.name.startswith(f"{name}.")), len(report))
        zp = int(zero_points.get(off_name, 0))
        why = ("kept float (keep_float)" if name in keep_float
               else "no calibrated input scale (its conv_offset's)" if off_name not in scales
               else f"groups={mod.groups} (the int8 DCN kernel takes groups=1)" if mod.groups != 1 else None)
        if why is not None:
            report.insert(at, LayerReport(name, "float", why))
            continue
        activation, act_name = _swap_in(
            modules, name, mod,
            lambda act: QuantDeformConv2d.from_pack(mod, float(scales[off_name]), act, out_dtype=out_dtype),
            fusable=("relu",) if fuse_relu else (), quantize_in_graph=quantize_in_graph, zero_point=zp)
        report.insert(at, LayerReport(name, "int8", f"int8 DCNv2 {mod.kernel_size[0]}x{mod.kernel_size[1]} stride "
                                                    f"{'x'.join(map(str, mod.stride))}, input_scale="
                                                    f"{float(scales[off_name]):.6g}{_int8_suffix(zp, activation)}"))
        if act_name is not None:
            report.append(LayerReport(act_name, "fused", f"{activation} runs in {name}'s int8 epilogue"))


def format_report(report: list[LayerReport]) -> str:
    """The report as an aligned text table (one layer a line) with an int8 / float count."""
    if not report:
        return "(no Linear / Conv2d layers)"
    width = max(len(r.name) for r in report)
    lines = [f"{r.name:<{width}}  {r.precision:<5}  {r.reason}" for r in report]
    n_int8 = sum(r.precision == "int8" for r in report)
    n_float = sum(r.precision == "float" for r in report)
    lines.append(f"{n_int8} int8, {n_float} float")
    return "\n".join(lines)
